//! `[nova_notifications]`: Nova's versioned notifications on RabbitMQ.

use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::secrets::url_password;
use super::{ConfigError, err};

/// Where Nova's versioned notifications arrive (oslo.messaging on RabbitMQ).
#[derive(Debug, Clone)]
pub struct NotificationSettings {
    /// The AMQP URL (`amqp://user@host:5672/vhost`), with the password from `password_file`
    /// already in it; secret.
    pub url: SecretString,
    /// Nova's control exchange (`nova`).
    pub exchange: String,
    /// The notification topic (`versioned_notifications`); metapass binds `<topic>.info`.
    pub topic: String,
    /// metapass's own queue on that exchange.
    pub queue: String,
    /// Whether the exchange and queue are durable (oslo.messaging's `amqp_durable_queues`).
    pub durable: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNotifications {
    enabled: bool,
    url: SecretString,
    password_file: Option<PathBuf>,
    #[serde(default = "default_exchange")]
    exchange: String,
    #[serde(default = "default_topic")]
    topic: String,
    #[serde(default = "default_queue")]
    queue: String,
    #[serde(default)]
    durable: bool,
}

fn default_exchange() -> String {
    "nova".into()
}

fn default_topic() -> String {
    "versioned_notifications".into()
}

fn default_queue() -> String {
    "metapass.versioned_notifications".into()
}

impl RawNotifications {
    /// The settings when enabled: an `amqp://` URL (its password from a file outside dev mode)
    /// and names of 1 to 255 characters.
    pub(super) fn validate(
        self,
        path: &Path,
        base: &Path,
        dev_mode: bool,
        warnings: &mut Vec<String>,
    ) -> Result<Option<NotificationSettings>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        let mut url = url::Url::parse(self.url.expose_secret())
            .map_err(|_| err(path, "[nova_notifications] url is not an AMQP URL"))?;
        if url.scheme() != "amqp" {
            return Err(err(
                path,
                "[nova_notifications] url must be amqp:// (this build has no AMQP over TLS; keep the broker on a protected network)",
            ));
        }
        url_password(
            &mut url,
            "nova_notifications",
            self.password_file.as_deref(),
            path,
            base,
            dev_mode,
            warnings,
        )?;
        for (name, value) in [
            ("exchange", &self.exchange),
            ("topic", &self.topic),
            ("queue", &self.queue),
        ] {
            if value.is_empty() || value.len() > 255 {
                return Err(err(
                    path,
                    format!("[nova_notifications] {name} must be 1 to 255 characters"),
                ));
            }
        }
        Ok(Some(NotificationSettings {
            url: SecretString::from(url.to_string()),
            exchange: self.exchange,
            topic: self.topic,
            queue: self.queue,
            durable: self.durable,
        }))
    }
}
