//! The store against the log: what the audit log says each instance's state is, compared with
//! what the store holds.
//!
//! Every change to the store is committed only after its event is durable, so a log that verifies
//! (chain and anchor) is a complete history of the store. Replaying its successful changes gives
//! each instance's registered project, whether a password is set, and the record version and key
//! of that password. A store that differs was changed behind metapass's back: a record rolled back
//! to an older version, a record or an instance planted, an instance moved to another project or
//! deleted. Events that a correction event withdrew (the store did not commit them) are skipped.
//!
//! The replay needs the whole log, from its first line: a log whose oldest files were retired
//! cannot vouch for instances registered before it begins.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde_json::Value;

use crate::store::InventoryRow;

/// What the log says of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The project it was registered to.
    pub project: String,
    /// Whether a password is set.
    pub password_set: bool,
    /// The record version, when the log recorded it (every set, clear and rewrap does).
    pub version: Option<u64>,
    /// The key the password is sealed under.
    pub key_id: Option<u32>,
    /// The sequence number of the last event that changed it.
    pub seq: u64,
}

/// One way the store differs from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// In the store, but the log never registered it (planted).
    NotInLog(InventoryRow),
    /// Registered in the log, absent from the store (deleted behind metapass's back).
    NotInStore {
        /// The instance.
        id: String,
        /// What the log says.
        expected: Expected,
    },
    /// Registered to another project than the log says (moved).
    Moved {
        /// The store's row.
        row: InventoryRow,
        /// What the log says.
        expected: Expected,
    },
    /// The password state differs: set or not, record version, key (rolled back or planted).
    Password {
        /// The store's row.
        row: InventoryRow,
        /// What the log says.
        expected: Expected,
    },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = |set: bool, version: Option<u64>, key: Option<u32>| {
            let version = version.map_or_else(|| "?".to_owned(), |v| v.to_string());
            let key = key.map_or_else(|| "-".to_owned(), |k| k.to_string());
            format!(
                "password {}, version {version}, key {key}",
                if set { "set" } else { "not set" }
            )
        };
        match self {
            Self::NotInLog(row) => write!(
                f,
                "{}: in the store (project {}, {}) but never registered in the log: planted",
                row.id,
                row.project,
                state(row.password_set, Some(row.version), row.key_id)
            ),
            Self::NotInStore { id, expected } => write!(
                f,
                "{id}: registered to {} in the log (last change at sequence {}) but absent from the store: deleted behind metapass's back",
                expected.project, expected.seq
            ),
            Self::Moved { row, expected } => write!(
                f,
                "{}: the store says project {}, the log says {} (sequence {}): moved",
                row.id, row.project, expected.project, expected.seq
            ),
            Self::Password { row, expected } => write!(
                f,
                "{}: the store has {}, the log says {} (sequence {}): rolled back or planted",
                row.id,
                state(row.password_set, Some(row.version), row.key_id),
                state(expected.password_set, expected.version, expected.key_id),
                expected.seq
            ),
        }
    }
}

/// Replays the successful changes of `events` (in chain order).
pub fn replay(events: &[Value]) -> BTreeMap<String, Expected> {
    let withdrawn: HashSet<&str> = events
        .iter()
        .filter(|e| e["unmapped"]["corrects_earlier_event"] == true)
        .filter_map(|e| e["metadata"]["uid"].as_str())
        .collect();
    let mut state: BTreeMap<String, Expected> = BTreeMap::new();
    for event in events {
        if event["unmapped"]["outcome"] != "success"
            || event["metadata"]["uid"]
                .as_str()
                .is_some_and(|uid| withdrawn.contains(uid))
        {
            continue;
        }
        let Some(id) = event["resources"][0]["uid"].as_str() else {
            continue;
        };
        let seq = event["metadata"]["sequence"].as_u64().unwrap_or(0);
        let version = event["unmapped"]["record_version"].as_u64();
        let key_id = event["unmapped"]["key_id"]
            .as_u64()
            .and_then(|k| u32::try_from(k).ok());
        let operation = event["api"]["operation"].as_str().unwrap_or_default();
        match operation {
            "instance:register" | "import:instance" | "sync:create" | "registry:lookup" => {
                let Some(project) = event["resources"][0]["owner"]["account"]["uid"].as_str()
                else {
                    continue;
                };
                let created = event["status_code"] == "201" || !state.contains_key(id);
                if created {
                    state.insert(
                        id.to_owned(),
                        Expected {
                            project: project.to_owned(),
                            password_set: false,
                            version: None,
                            key_id: None,
                            seq,
                        },
                    );
                }
            }
            "instance:delete" | "sync:delete" => {
                state.remove(id);
            }
            "password:set" | "import:password" | "password:rewrap" => {
                if let Some(entry) = state.get_mut(id) {
                    entry.password_set = true;
                    entry.version = version;
                    entry.key_id = key_id;
                    entry.seq = seq;
                }
            }
            "password:clear" | "sync:rebuild" => {
                if let Some(entry) = state.get_mut(id) {
                    entry.password_set = false;
                    entry.version = version;
                    entry.key_id = None;
                    entry.seq = seq;
                }
            }
            _ => {}
        }
    }
    state
}

/// Compares the log's `expected` state with the store's `rows`: every difference, in instance
/// order.
pub fn compare(
    mut expected: BTreeMap<String, Expected>,
    rows: Vec<InventoryRow>,
) -> Vec<Difference> {
    let mut differences = Vec::new();
    for row in rows {
        let Some(expected) = expected.remove(&row.id) else {
            differences.push(Difference::NotInLog(row));
            continue;
        };
        if row.project != expected.project {
            differences.push(Difference::Moved { row, expected });
            continue;
        }
        let version_differs = expected.version.is_some_and(|v| v != row.version);
        let key_differs = expected.password_set && expected.key_id != row.key_id;
        if row.password_set != expected.password_set || version_differs || key_differs {
            differences.push(Difference::Password { row, expected });
        }
    }
    differences.extend(
        expected
            .into_iter()
            .map(|(id, expected)| Difference::NotInStore { id, expected }),
    );
    differences.sort_by(|a, b| id_of(a).cmp(id_of(b)));
    differences
}

fn id_of(d: &Difference) -> &str {
    match d {
        Difference::NotInLog(row)
        | Difference::Moved { row, .. }
        | Difference::Password { row, .. } => &row.id,
        Difference::NotInStore { id, .. } => id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(seq: u64, op: &str, id: &str, extra: Value) -> Value {
        let mut e = json!({
            "api": {"operation": op},
            "status_code": "200",
            "metadata": {"uid": format!("req-{seq}"), "sequence": seq},
            "resources": [{"uid": id, "owner": {"account": {"uid": "project-a"}}}],
            "unmapped": {"outcome": "success"},
        });
        for (k, v) in extra.as_object().unwrap() {
            e["unmapped"][k] = v.clone();
        }
        e
    }

    fn row(id: &str, set: bool, version: u64, key: Option<u32>) -> InventoryRow {
        InventoryRow {
            id: id.into(),
            project: "project-a".into(),
            password_set: set,
            version,
            key_id: key,
        }
    }

    #[test]
    fn a_replayed_history_matches_and_every_kind_of_bending_is_named() {
        let events = vec![
            event(1, "instance:register", "a", json!({})),
            event(
                2,
                "password:set",
                "a",
                json!({"record_version": 5, "key_id": 1}),
            ),
            event(3, "instance:register", "b", json!({})),
            event(
                4,
                "password:set",
                "b",
                json!({"record_version": 6, "key_id": 1}),
            ),
            event(5, "password:clear", "b", json!({"record_version": 7})),
            // Withdrawn by its correction: never committed.
            event(
                6,
                "password:set",
                "b",
                json!({"record_version": 8, "key_id": 1}),
            ),
            {
                let mut c = event(
                    6,
                    "password:set",
                    "b",
                    json!({"corrects_earlier_event": true}),
                );
                c["unmapped"]["outcome"] = json!("error");
                c
            },
        ];
        let expected = replay(&events);
        assert!(
            compare(
                expected.clone(),
                vec![row("a", true, 5, Some(1)), row("b", false, 7, None)]
            )
            .is_empty()
        );

        let bent = compare(
            expected,
            vec![
                row("a", true, 2, Some(1)), // rolled back to an older record
                row("c", true, 3, Some(1)), // planted
            ],
        );
        assert!(
            matches!(&bent[0], Difference::Password { row, .. } if row.id == "a"),
            "{bent:?}"
        );
        assert!(
            matches!(&bent[1], Difference::NotInStore { id, .. } if id == "b"),
            "{bent:?}"
        );
        assert!(
            matches!(&bent[2], Difference::NotInLog(row) if row.id == "c"),
            "{bent:?}"
        );
    }
}
