//! Follows Nova's versioned notifications on RabbitMQ to keep the registry true.
//!
//! oslo.messaging publishes notifications to Nova's control exchange (`nova`, a topic exchange)
//! with routing key `versioned_notifications.<priority>`. metapass binds its own queue to
//! `<topic>.info` and acts on three events:
//!
//! | event | what metapass does | audited as |
//! |---|---|---|
//! | `instance.create.end` | registers the instance to its project (`tenant_id`) | `sync:create` |
//! | `instance.delete.end` | deletes it and purges its password | `sync:delete` |
//! | `instance.rebuild.start` | clears its password, so the rebuilt guest can post a new one (Nova keeps the old one, and cloudbase-init then meets 409) | `sync:rebuild` |
//!
//! Other events are acknowledged and ignored. A message that cannot be read (not JSON, no event
//! type, no valid instance or project id) is audited as `sync:malformed` and dropped; it never
//! stops the consumer. Delivery is at least once: a message is acknowledged only after its change
//! is committed with its audit event, and each change is idempotent (registering twice, deleting
//! or clearing what is gone, all change nothing). If the store or the audit log fails, the message
//! goes back to the queue and the consumer reconnects with backoff (0.5 s doubling to 30 s), as it
//! does when the broker goes away.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use http::StatusCode;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use secrecy::ExposeSecret;
use serde_json::Value;

use super::{finish, refuse, register, task};
use crate::api::respond::ApiError;
use crate::app::App;
use crate::audit::gate::gated;
use crate::audit::{Activity, Facts, Reason};
use crate::config::NotificationSettings;
use crate::ids::{InstanceId, ProjectId};
use crate::store::{ClearOutcome, DeleteOutcome, Store};

/// The first pause before reconnecting; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Messages the broker may hand over before they are acknowledged.
const PREFETCH: u16 = 32;

/// What a notification asks of metapass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// `instance.create.end`: register the instance to its project.
    Register {
        /// The instance.
        id: InstanceId,
        /// Its project.
        project: ProjectId,
    },
    /// `instance.delete.end`: forget the instance and its password.
    Delete {
        /// The instance.
        id: InstanceId,
    },
    /// `instance.rebuild.start`: clear the password so the guest may post again.
    ClearPassword {
        /// The instance.
        id: InstanceId,
    },
    /// Any other event.
    Ignore,
}

/// A notification metapass could not read: why, and the instance it named, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Malformed {
    /// What is wrong (never quotes the message).
    pub problem: String,
    /// The instance id the message claimed, if it had a readable one.
    pub instance: Option<String>,
}

fn malformed(problem: impl Into<String>, instance: Option<&str>) -> Malformed {
    Malformed {
        problem: problem.into(),
        instance: instance.map(|s| s.chars().take(64).collect()),
    }
}

/// Reads an oslo.messaging notification (the `oslo.message` envelope, or a bare message) into
/// its event type and the change it asks for.
pub(crate) fn parse(body: &[u8]) -> Result<(String, Change), Malformed> {
    let outer: Value =
        serde_json::from_slice(body).map_err(|_| malformed("the message is not JSON", None))?;
    let message = match outer.get("oslo.message") {
        Some(Value::String(inner)) => serde_json::from_str::<Value>(inner)
            .map_err(|_| malformed("oslo.message is not JSON", None))?,
        Some(_) => return Err(malformed("oslo.message is not a string", None)),
        None => outer,
    };
    let event_type = message
        .get("event_type")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("the message has no event_type", None))?
        .chars()
        .take(128)
        .collect::<String>();
    let acts = matches!(
        event_type.as_str(),
        "instance.create.end" | "instance.delete.end" | "instance.rebuild.start"
    );
    if !acts {
        return Ok((event_type, Change::Ignore));
    }
    let data = message
        .get("payload")
        .and_then(|p| p.get("nova_object.data"))
        .ok_or_else(|| {
            malformed(
                format!("{event_type} has no payload.nova_object.data"),
                None,
            )
        })?;
    let uuid = data.get("uuid").and_then(Value::as_str);
    let id = uuid
        .and_then(|u| InstanceId::parse(u).ok())
        .ok_or_else(|| malformed(format!("{event_type} has no valid instance uuid"), uuid))?;
    let change = match event_type.as_str() {
        "instance.create.end" => {
            let project = data
                .get("tenant_id")
                .and_then(Value::as_str)
                .and_then(|p| ProjectId::parse(p).ok())
                .ok_or_else(|| malformed(format!("{event_type} has no valid tenant_id"), uuid))?;
            Change::Register { id, project }
        }
        "instance.delete.end" => Change::Delete { id },
        _ => Change::ClearPassword { id },
    };
    Ok((event_type, change))
}

fn answer_delete(outcome: &DeleteOutcome, facts: &mut Facts) -> Result<StatusCode, ApiError> {
    if *outcome == DeleteOutcome::NotFound {
        facts.detail = Some("not registered; nothing to delete".into());
    }
    Ok(StatusCode::OK)
}

fn answer_clear(outcome: &ClearOutcome, facts: &mut Facts) -> Result<StatusCode, ApiError> {
    match outcome {
        ClearOutcome::Cleared { was_set, version } => {
            facts.record_version = Some(*version);
            if !was_set {
                facts.detail = Some("no password was set".into());
            }
            Ok(StatusCode::OK)
        }
        ClearOutcome::NotFound => {
            facts.detail = Some("not registered; nothing to clear".into());
            Ok(StatusCode::OK)
        }
    }
}

/// Applies one notification's change, audited. `Err` means it could not be committed (the store
/// or the audit log failed) and the message should be delivered again.
pub(crate) async fn apply(app: &App, event_type: &str, change: Change) -> Result<(), ApiError> {
    let detail = format!("Nova notification {event_type}");
    match change {
        Change::Ignore => Ok(()),
        Change::Register { id, project } => {
            register(app, "sync:create", &id, &project, detail).await?;
            Ok(())
        }
        Change::Delete { id } => {
            let mut task = task("sync:delete", Activity::Delete, Some(id.as_str()), None);
            task.facts.detail = Some(detail);
            let result = gated(&mut task, &app.auditor, answer_delete, |gate| {
                app.store.delete_instance(&id, gate)
            })
            .await;
            finish(app, task, result).await.map(drop)
        }
        Change::ClearPassword { id } => {
            let mut task = task("sync:rebuild", Activity::Update, Some(id.as_str()), None);
            task.facts.detail = Some(detail);
            let result = gated(&mut task, &app.auditor, answer_clear, |gate| {
                app.store.clear_password(&id, gate)
            })
            .await;
            finish(app, task, result).await.map(drop)
        }
    }
}

/// Handles one delivery body: `Ok` to acknowledge it, `Err` to deliver it again later.
pub(crate) async fn handle(app: &App, body: &[u8]) -> Result<(), ApiError> {
    match parse(body) {
        Ok((event_type, change)) => apply(app, &event_type, change).await,
        Err(bad) => {
            tracing::warn!(problem = %bad.problem, "dropping a malformed Nova notification");
            let error = ApiError::bad_request(Reason::BodyInvalid, bad.problem);
            refuse(app, "sync:malformed", bad.instance.as_deref(), None, &error).await
        }
    }
}

/// Consumes notifications until shutdown, reconnecting with backoff whenever the connection or
/// the channel fails.
pub(crate) async fn run(app: Arc<App>, settings: NotificationSettings) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        if app.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = consume(&app, &settings, &mut backoff).await {
            tracing::warn!(error = %e, retry_in = ?backoff, "Nova notifications: not consuming; reconnecting");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection's life: connect, declare the exchange and queue, bind, consume until the
/// connection fails (the caller reconnects with backoff). Long on purpose: the AMQP setup steps
/// must happen in this order, and each failure is told apart for the log.
async fn consume(
    app: &App,
    settings: &NotificationSettings,
    backoff: &mut Duration,
) -> Result<(), String> {
    let text = |e: lapin::Error| e.to_string();
    let uri: lapin::uri::AMQPUri = settings
        .url
        .expose_secret()
        .parse()
        .map_err(|_| "the AMQP URL does not parse".to_owned())?;
    let properties = ConnectionProperties::default().with_connection_name("metapass".into());
    let connection = Connection::connect_uri(uri, properties)
        .await
        .map_err(text)?;
    let channel = connection.create_channel().await.map_err(text)?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(text)?;
    channel
        .exchange_declare(
            settings.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: settings.durable,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(text)?;
    channel
        .queue_declare(
            settings.queue.as_str().into(),
            QueueDeclareOptions {
                durable: settings.durable,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(text)?;
    let routing_key = format!("{}.info", settings.topic);
    channel
        .queue_bind(
            settings.queue.as_str().into(),
            settings.exchange.as_str().into(),
            routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(text)?;
    let mut consumer = channel
        .basic_consume(
            settings.queue.as_str().into(),
            "metapass".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(text)?;
    tracing::info!(exchange = %settings.exchange, queue = %settings.queue, %routing_key, "consuming Nova notifications");
    *backoff = FIRST_BACKOFF;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.map_err(text)?;
        match handle(app, &delivery.data).await {
            Ok(()) => {
                delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(text)?;
            }
            Err(e) => {
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
                    .map_err(text)?;
                return Err(format!("a change could not be committed: {}", e.message));
            }
        }
        if app.shutting_down.load(Ordering::SeqCst) {
            return Ok(());
        }
    }
    Err("the broker ended the consumer".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(message: &Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "oslo.version": "2.0",
            "oslo.message": message.to_string(),
        }))
        .unwrap()
    }

    fn notification(event_type: &str, data: Value) -> Value {
        serde_json::json!({
            "message_id": "1b8d2c5e-0000-4000-8000-000000000000",
            "publisher_id": "nova-compute:compute-1",
            "event_type": event_type,
            "priority": "INFO",
            "payload": {
                "nova_object.name": "InstanceActionPayload",
                "nova_object.namespace": "nova",
                "nova_object.version": "1.8",
                "nova_object.data": data,
            },
            "timestamp": "2026-11-23 18:00:00.000000",
        })
    }

    const UUID: &str = "8a2e6d4c-0b1f-4c53-9a4e-2f1d3c5b7a90";

    #[test]
    fn the_three_events_and_the_rest() {
        let data = serde_json::json!({"uuid": UUID, "tenant_id": "project-a"});
        let id = InstanceId::parse(UUID).unwrap();
        let (event, change) = parse(&envelope(&notification(
            "instance.create.end",
            data.clone(),
        )))
        .unwrap();
        assert_eq!(event, "instance.create.end");
        assert_eq!(
            change,
            Change::Register {
                id: id.clone(),
                project: ProjectId::parse("project-a").unwrap()
            }
        );
        let bare = serde_json::to_vec(&notification("instance.delete.end", data.clone())).unwrap();
        assert_eq!(parse(&bare).unwrap().1, Change::Delete { id: id.clone() });
        let rebuild = envelope(&notification("instance.rebuild.start", data.clone()));
        assert_eq!(parse(&rebuild).unwrap().1, Change::ClearPassword { id });
        let other = envelope(&notification("instance.power_off.end", data));
        assert_eq!(parse(&other).unwrap().1, Change::Ignore);
    }

    #[test]
    fn malformed_messages_say_why() {
        assert!(parse(b"not json").unwrap_err().problem.contains("not JSON"));
        let inner_not_json = br#"{"oslo.version": "2.0", "oslo.message": "{"}"#;
        assert!(
            parse(inner_not_json)
                .unwrap_err()
                .problem
                .contains("oslo.message")
        );
        assert!(parse(b"{}").unwrap_err().problem.contains("event_type"));
        let no_tenant = envelope(&notification(
            "instance.create.end",
            serde_json::json!({"uuid": UUID}),
        ));
        let bad = parse(&no_tenant).unwrap_err();
        assert!(bad.problem.contains("tenant_id"));
        assert_eq!(bad.instance.as_deref(), Some(UUID));
        let bad_uuid = envelope(&notification(
            "instance.delete.end",
            serde_json::json!({"uuid": "../../etc"}),
        ));
        assert!(parse(&bad_uuid).unwrap_err().problem.contains("uuid"));
    }
}
