//! May this caller do this action to this instance?
//!
//! A policy is a list of grants per action. A grant names who (`instance = "self"`, or a role) and,
//! for roles, where (`project = "owner"`: the target's own project; `project = "any"`). A request is
//! allowed if any grant of its action matches; the decision records which grant matched, or that
//! none did, so that every audit event says which rule decided.
//!
//! The defaults are Nova's: an instance may get and set its own password only; readers and members
//! of the instance's project may read it; members may clear it; admins may do anything. Operators
//! override rules in a TOML file (see `policy/policy.toml`) without recompiling. An unknown action,
//! role or key in the file is a startup error that names the line.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::identity::{Role, holds};
use crate::ids::{InstanceId, ProjectId};

/// An action the policy decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub enum Action {
    /// Read an instance's password (Nova's `os_compute_api:os-server-password:show`).
    #[serde(
        rename = "password:get",
        alias = "os_compute_api:os-server-password:show"
    )]
    PasswordGet,
    /// Post an instance's password.
    #[serde(rename = "password:set")]
    PasswordSet,
    /// Clear an instance's password (Nova's `os_compute_api:os-server-password:clear`).
    #[serde(
        rename = "password:clear",
        alias = "os_compute_api:os-server-password:clear"
    )]
    PasswordClear,
    /// Register an instance to a project.
    #[serde(rename = "instance:register")]
    InstanceRegister,
    /// Show an instance (registry row, or the minimal server document).
    #[serde(rename = "instance:show")]
    InstanceShow,
    /// Delete an instance and purge its metadata.
    #[serde(rename = "instance:delete")]
    InstanceDelete,
    /// See the data keys' ids, record and seal counts (never a secret).
    #[serde(rename = "keys:status")]
    KeysStatus,
    /// Reload the keyring file.
    #[serde(rename = "keys:reload")]
    KeysReload,
    /// Start resealing passwords under the active key.
    #[serde(rename = "keys:rewrap")]
    KeysRewrap,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 9] = [
        Action::PasswordGet,
        Action::PasswordSet,
        Action::PasswordClear,
        Action::InstanceRegister,
        Action::InstanceShow,
        Action::InstanceDelete,
        Action::KeysStatus,
        Action::KeysReload,
        Action::KeysRewrap,
    ];

    /// The action's name in policy files and audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::PasswordGet => "password:get",
            Action::PasswordSet => "password:set",
            Action::PasswordClear => "password:clear",
            Action::InstanceRegister => "instance:register",
            Action::InstanceShow => "instance:show",
            Action::InstanceDelete => "instance:delete",
            Action::KeysStatus => "keys:status",
            Action::KeysReload => "keys:reload",
            Action::KeysRewrap => "keys:rewrap",
        }
    }

    /// Whether the action concerns the whole service rather than one instance (its grants must
    /// then reach `project = "any"`).
    pub fn is_service_wide(self) -> bool {
        matches!(
            self,
            Action::KeysStatus | Action::KeysReload | Action::KeysRewrap
        )
    }
}

/// Which projects a role grant reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjectScope {
    /// Only instances of the caller's own project.
    Owner,
    /// Every instance.
    Any,
}

/// The only instance scope: an instance acts on itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceScope {
    /// The calling instance is the target.
    #[serde(rename = "self")]
    SelfOnly,
}

/// One way to be allowed an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// The calling instance, acting on itself.
    Instance,
    /// A token holding `role`, on instances within `scope`.
    Role {
        /// The role required.
        role: Role,
        /// Which instances it reaches.
        scope: ProjectScope,
    },
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Grant::Instance => f.write_str("instance:self"),
            Grant::Role { role, scope } => {
                let scope = match scope {
                    ProjectScope::Owner => "owner",
                    ProjectScope::Any => "any",
                };
                write!(f, "role:{} project:{scope}", role.as_str())
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantSpec {
    instance: Option<InstanceScope>,
    role: Option<Role>,
    project: Option<ProjectScope>,
}

impl TryFrom<GrantSpec> for Grant {
    type Error = String;

    fn try_from(spec: GrantSpec) -> Result<Self, String> {
        match spec {
            GrantSpec {
                instance: Some(InstanceScope::SelfOnly),
                role: None,
                project: None,
            } => Ok(Grant::Instance),
            GrantSpec {
                instance: None,
                role: Some(role),
                project: Some(scope),
            } => Ok(Grant::Role { role, scope }),
            GrantSpec {
                instance: None,
                role: Some(_),
                project: None,
            } => Err("a role grant needs `project = \"owner\"` or `project = \"any\"`".into()),
            _ => Err(
                "a grant is either `{ instance = \"self\" }` or `{ role = ..., project = ... }`"
                    .into(),
            ),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    allow: Vec<toml::Spanned<GrantSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    /// By name, so that an action named twice (its own name and Nova's rule name) is an error
    /// rather than one silently replacing the other.
    #[serde(default)]
    actions: BTreeMap<toml::Spanned<String>, RuleSpec>,
}

/// Why a policy file was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(String);

/// The acting party, as far as policy cares.
#[derive(Debug, Clone, Copy)]
pub enum Principal<'a> {
    /// A verified instance.
    Instance {
        /// Its id.
        instance_id: &'a InstanceId,
    },
    /// A verified token.
    Token {
        /// Its project.
        project: &'a ProjectId,
        /// Its roles.
        roles: &'a [Role],
    },
}

/// What the action is applied to.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The target instance (`None` for an action on no instance: the key endpoints).
    pub instance_id: Option<&'a InstanceId>,
    /// Its project, if it exists; `None` for an instance that does not (yet) exist.
    pub project: Option<&'a ProjectId>,
}

/// How a request is refused, so that callers never learn about other projects' instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The caller could see the target but may not do this to it: 403.
    Forbidden,
    /// The caller has no business with the target at all: answered exactly like a missing
    /// instance, 404.
    NotVisible,
}

/// A policy decision with the rule that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `None` if allowed, or how to refuse.
    pub refusal: Option<Refusal>,
    /// The grant that allowed, or `no grant matched`.
    pub rule: String,
}

impl Verdict {
    /// Whether the action is allowed.
    pub fn allowed(&self) -> bool {
        self.refusal.is_none()
    }
}

/// A loaded policy.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: BTreeMap<Action, Vec<Grant>>,
}

impl Default for Policy {
    fn default() -> Self {
        Self::nova_defaults()
    }
}

impl Policy {
    /// Nova's defaults (see the module docs).
    pub fn nova_defaults() -> Self {
        use Grant::*;
        use ProjectScope::*;
        let admin = Role {
            role: crate::identity::Role::Admin,
            scope: Any,
        };
        let owner = |role| Role { role, scope: Owner };
        let (reader, member) = (crate::identity::Role::Reader, crate::identity::Role::Member);
        let rules = BTreeMap::from([
            (
                Action::PasswordGet,
                vec![Instance, owner(reader), owner(member), admin],
            ),
            (Action::PasswordSet, vec![Instance]),
            (Action::PasswordClear, vec![owner(member), admin]),
            (Action::InstanceRegister, vec![admin]),
            (
                Action::InstanceShow,
                vec![owner(reader), owner(member), admin],
            ),
            (Action::InstanceDelete, vec![admin]),
            (Action::KeysStatus, vec![admin]),
            (Action::KeysReload, vec![admin]),
            (Action::KeysRewrap, vec![admin]),
        ]);
        Self { rules }
    }

    /// Nova's defaults with the actions named in `text` (a policy file) replaced.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| PolicyError(e.to_string()))?;
        let mut policy = Self::nova_defaults();
        let mut named: BTreeMap<Action, String> = BTreeMap::new();
        for (name, spec) in file.actions {
            let line = line_of(text, name.span().start);
            let name = name.into_inner();
            let action = Action::deserialize(serde::de::value::StrDeserializer::<
                serde::de::value::Error,
            >::new(&name))
            .map_err(|e| PolicyError(format!("line {line}: unknown action {name:?}: {e}")))?;
            if let Some(earlier) = named.insert(action, name.clone()) {
                return Err(PolicyError(format!(
                    "line {line}: {name:?} and {earlier:?} name the same action; give its rule once"
                )));
            }
            let mut grants = Vec::with_capacity(spec.allow.len());
            for spanned in spec.allow {
                let line = line_of(text, spanned.span().start);
                let grant = Grant::try_from(spanned.into_inner()).map_err(|e| {
                    PolicyError(format!(
                        "line {line}: in the rule for {}: {e}",
                        action.as_str()
                    ))
                })?;
                if grant == Grant::Instance
                    && !matches!(action, Action::PasswordGet | Action::PasswordSet)
                {
                    return Err(PolicyError(format!(
                        "line {line}: `instance = \"self\"` only applies to password:get and password:set"
                    )));
                }
                if action.is_service_wide()
                    && matches!(
                        grant,
                        Grant::Role {
                            scope: ProjectScope::Owner,
                            ..
                        }
                    )
                {
                    return Err(PolicyError(format!(
                        "line {line}: {} concerns the whole service; its grants need `project = \"any\"`",
                        action.as_str()
                    )));
                }
                grants.push(grant);
            }
            policy.rules.insert(action, grants);
        }
        Ok(policy)
    }

    /// The grants of `action`.
    pub fn grants(&self, action: Action) -> &[Grant] {
        self.rules.get(&action).map_or(&[], Vec::as_slice)
    }

    /// Decides whether `principal` may do `action` to `target`.
    pub fn decide(&self, principal: Principal<'_>, action: Action, target: Target<'_>) -> Verdict {
        for grant in self.grants(action) {
            if grant_matches(*grant, principal, target) {
                return Verdict {
                    refusal: None,
                    rule: format!("{}: {grant}", action.as_str()),
                };
            }
        }
        // Refused. If no grant of this action could ever apply to this caller (a reader clearing,
        // a member registering), the answer is 403 whatever the target: it reveals nothing about
        // it. Otherwise the caller was refused for this target only, and learns whether it exists
        // only if it may see it (its own project, or a cross-project grant): 403, else 404.
        let grants = self.grants(action);
        let could_apply = match principal {
            Principal::Instance { .. } => grants.contains(&Grant::Instance),
            Principal::Token { roles, .. } => grants
                .iter()
                .any(|g| matches!(g, Grant::Role { role, .. } if holds(roles, *role))),
        };
        let visible = match principal {
            Principal::Instance { instance_id } => Some(instance_id) == target.instance_id,
            Principal::Token { project, roles } => {
                target.project == Some(project)
                    || self.rules.values().flatten().any(|g| {
                        matches!(g, Grant::Role { role, scope: ProjectScope::Any } if holds(roles, *role))
                    })
            }
        };
        let refusal = if !could_apply || (visible && target.project.is_some()) {
            Refusal::Forbidden
        } else {
            Refusal::NotVisible
        };
        Verdict {
            refusal: Some(refusal),
            rule: format!("{}: no grant matched", action.as_str()),
        }
    }
}

fn grant_matches(grant: Grant, principal: Principal<'_>, target: Target<'_>) -> bool {
    match (grant, principal) {
        (Grant::Instance, Principal::Instance { instance_id }) => {
            Some(instance_id) == target.instance_id
        }
        (Grant::Role { role, scope }, Principal::Token { project, roles }) => {
            holds(roles, role)
                && match scope {
                    ProjectScope::Any => true,
                    ProjectScope::Owner => target.project == Some(project),
                }
        }
        _ => false,
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role::*;

    const I: &str = "8a2e6d4c-0b1f-4c53-9a4e-2f1d3c5b7a90";
    const J: &str = "00000000-0000-4000-8000-000000000000";

    /// Identifiers that live for the test (leaked: a test process is short).
    fn iid(id: &str) -> &'static InstanceId {
        Box::leak(Box::new(InstanceId::parse(id).unwrap()))
    }

    fn pid(project: &str) -> &'static ProjectId {
        Box::leak(Box::new(ProjectId::parse(project).unwrap()))
    }

    fn target(project: &str) -> Target<'static> {
        Target {
            instance_id: Some(iid(I)),
            project: Some(pid(project)),
        }
    }

    #[test]
    fn nova_defaults() {
        let p = Policy::nova_defaults();
        let tok = |project, roles| Principal::Token {
            project: pid(project),
            roles,
        };
        let a = target("project-a");
        let get = |who| p.decide(who, Action::PasswordGet, a).refusal;
        let clear = |who| p.decide(who, Action::PasswordClear, a).refusal;
        assert_eq!(get(tok("project-a", &[Reader])), None);
        assert_eq!(get(tok("project-a", &[Member])), None);
        assert_eq!(
            get(tok("project-b", &[Reader, Member])),
            Some(Refusal::NotVisible)
        );
        assert_eq!(get(tok("admin", &[Admin])), None);
        assert_eq!(clear(tok("project-a", &[Reader])), Some(Refusal::Forbidden));
        assert_eq!(clear(tok("project-a", &[Member])), None);
        assert_eq!(
            clear(tok("project-b", &[Member])),
            Some(Refusal::NotVisible)
        );
        assert_eq!(
            get(Principal::Instance {
                instance_id: iid(I)
            }),
            None
        );
        assert_eq!(
            get(Principal::Instance {
                instance_id: iid(J)
            }),
            Some(Refusal::NotVisible)
        );
        let set = p.decide(
            Principal::Instance {
                instance_id: iid(I),
            },
            Action::PasswordSet,
            a,
        );
        assert!(set.allowed());
        assert_eq!(set.rule, "password:set: instance:self");
        assert_eq!(
            p.decide(tok("project-a", &[Member]), Action::PasswordSet, a)
                .rule,
            "password:set: no grant matched"
        );
        // A role that can never do the action is refused with 403 whatever the target, which
        // tells nothing about the target.
        let missing = Target {
            instance_id: Some(iid(I)),
            project: None,
        };
        for t in [missing, a, target("project-b")] {
            assert_eq!(
                p.decide(tok("project-a", &[Member]), Action::InstanceDelete, t)
                    .refusal,
                Some(Refusal::Forbidden)
            );
            assert_eq!(
                p.decide(tok("project-b", &[Reader]), Action::PasswordClear, t)
                    .refusal,
                Some(Refusal::Forbidden)
            );
        }
        // A role that could, but not for this target, sees a missing instance and another
        // project's instance alike: 404.
        assert_eq!(
            p.decide(tok("project-b", &[Member]), Action::PasswordClear, missing)
                .refusal,
            Some(Refusal::NotVisible)
        );
        assert_eq!(
            p.decide(
                Principal::Instance {
                    instance_id: iid(I)
                },
                Action::PasswordClear,
                a
            )
            .refusal,
            Some(Refusal::Forbidden)
        );
    }

    #[test]
    fn overrides_replace_one_action() {
        let p = Policy::from_toml(
            r#"
            [actions."password:get"]
            allow = [{ role = "member", project = "owner" }, { role = "admin", project = "any" }]
            "#,
        )
        .unwrap();
        let reader = Principal::Token {
            project: pid("project-a"),
            roles: &[Reader],
        };
        assert_eq!(
            p.decide(reader, Action::PasswordGet, target("project-a"))
                .refusal,
            Some(Refusal::Forbidden)
        );
        assert_eq!(
            p.grants(Action::PasswordClear),
            Policy::nova_defaults().grants(Action::PasswordClear)
        );
    }

    #[test]
    fn novas_rule_names_are_aliases_and_roles_imply_as_keystones_do() {
        let p = Policy::from_toml(
            r#"
            [actions."os_compute_api:os-server-password:clear"]
            allow = [{ role = "manager", project = "owner" }]
            [actions."os_compute_api:os-server-password:show"]
            allow = [{ role = "member", project = "owner" }]
            "#,
        )
        .unwrap();
        let who = |roles: &'static [crate::identity::Role]| Principal::Token {
            project: pid("project-a"),
            roles,
        };
        let a = target("project-a");
        let clear = |roles| p.decide(who(roles), Action::PasswordClear, a).refusal;
        let get = |roles| p.decide(who(roles), Action::PasswordGet, a).refusal;
        assert_eq!(clear(&[Member]), Some(Refusal::Forbidden));
        assert_eq!(clear(&[Manager]), None);
        assert_eq!(clear(&[Admin]), None, "admin implies manager");
        assert_eq!(get(&[Reader]), Some(Refusal::Forbidden));
        assert_eq!(get(&[Manager]), None, "manager implies member");
        // Both names of one action in one file: refused, naming both.
        let twice = "[actions.\"password:get\"]\nallow = []\n[actions.\"os_compute_api:os-server-password:show\"]\nallow = []\n";
        let e = Policy::from_toml(twice).unwrap_err().to_string();
        assert!(e.contains("name the same action"), "{e}");
    }

    #[test]
    fn bad_files_name_the_line() {
        let unknown_action = "\n\n[actions.\"password:steal\"]\nallow = []\n";
        let e = Policy::from_toml(unknown_action).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("password:steal"), "{e}");
        let unknown_role =
            "[actions.\"password:get\"]\nallow = [\n  { role = \"root\", project = \"any\" },\n]\n";
        let e = Policy::from_toml(unknown_role).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("root"), "{e}");
        let no_scope = "[actions.\"password:get\"]\nallow = [\n  { role = \"reader\" },\n]\n";
        let e = Policy::from_toml(no_scope).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("project"), "{e}");
        let instance_clear = "[actions.\"password:clear\"]\nallow = [{ instance = \"self\" }]\n";
        assert!(
            Policy::from_toml(instance_clear)
                .unwrap_err()
                .to_string()
                .contains("line 2")
        );
        // Key actions concern every instance: a project-scoped grant would be meaningless.
        let owner_keys = "[actions.\"keys:status\"]\nallow = [\n  { role = \"reader\", project = \"owner\" },\n]\n";
        let e = Policy::from_toml(owner_keys).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("keys:status"), "{e}");
        let any_keys =
            "[actions.\"keys:status\"]\nallow = [{ role = \"reader\", project = \"any\" }]\n";
        assert!(Policy::from_toml(any_keys).is_ok());
        let typo =
            "[actions.\"password:get\"]\nallow = [{ rol = \"reader\", project = \"any\" }]\n";
        assert!(
            Policy::from_toml(typo)
                .unwrap_err()
                .to_string()
                .contains("line 2")
        );
    }
}
