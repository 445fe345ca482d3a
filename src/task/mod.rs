//! Task vocabulary shared by every part of bmw, at the bottom of the module
//! layering: [`Kind`], [`TaskType`], the canonical payload form, daemon
//! [`UniId`]s and their KV keys, [`Options`] ([`options`]), what a caller
//! asks for ([`Command`], [`request`]) and what it gets back ([`Outcome`],
//! [`OpError`], [`outcome`]).
//!
//! Everything here is pure (no I/O): the operations validate input with it
//! before anything is written to NATS.

pub mod options;
pub mod outcome;
pub mod request;

pub use options::{DEFAULT_QUEUE, Options, Overlap, duration};
pub use outcome::{OpError, Outcome, check_fits};
pub use request::{Command, CreateCommand, DeleteTarget, Origin};

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Why an input (kind, payload, option) was refused. `field` names what was wrong,
/// so the bridge can answer 400 with a message a caller can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {message}")]
pub struct ValidationError {
    /// The offending field, e.g. `kind` or `options.retry`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ValidationError {
    /// A refusal of `field` with a reason.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The type part of a kind: decides how a task runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskType {
    /// An endless loop held by exactly one worker.
    Daemon,
    /// A one-shot background job.
    Async,
    /// A schedule that enqueues async tasks.
    Periodic,
}

impl TaskType {
    /// The lowercase name used in kinds, subjects and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskType::Daemon => "daemon",
            TaskType::Async => "async",
            TaskType::Periodic => "periodic",
        }
    }

    /// Parses `daemon`, `async` or `periodic`.
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        match s {
            "daemon" => Ok(TaskType::Daemon),
            "async" => Ok(TaskType::Async),
            "periodic" => Ok(TaskType::Periodic),
            other => Err(ValidationError::new(
                "task_type",
                format!("unknown task type {other:?}, expected daemon, async or periodic"),
            )),
        }
    }
}

impl fmt::Display for TaskType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task's registered name: its type, then a name of one or more parts, all
/// separated by `:`: `daemon:demo:demo`, or `async:collect_es_task` as BMW's
/// clients name theirs (BMW dispatches on the type prefix alone).
///
/// Each part is non-empty and made of `[A-Za-z0-9_-]`, so a kind is a valid NATS
/// subject token and maps to a KV key by turning `:` into `.`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Kind {
    name: String,
    task_type: TaskType,
}

impl Kind {
    /// Validates and parses a kind.
    ///
    /// ```
    /// let kind = bmw::task::Kind::parse("daemon:demo:demo").unwrap();
    /// assert_eq!(kind.task_type(), bmw::task::TaskType::Daemon);
    /// assert!(bmw::task::Kind::parse("async:collect_es_task").is_ok());
    /// assert!(bmw::task::Kind::parse("cron:demo:demo").is_err());
    /// assert!(bmw::task::Kind::parse("daemon").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let Some((type_part, _)) = s.split_once(':') else {
            return Err(ValidationError::new(
                "kind",
                format!(
                    "{s:?} must be a type and a name separated by `:`, e.g. daemon:demo:demo or async:collect_es_task"
                ),
            ));
        };
        let valid = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        };
        if !s.split(':').all(valid) {
            return Err(ValidationError::new(
                "kind",
                format!("{s:?}: each part must be non-empty and use only A-Z a-z 0-9 _ -"),
            ));
        }
        let task_type = TaskType::parse(type_part).map_err(|_| {
            ValidationError::new(
                "kind",
                format!(
                    "{s:?} has unknown type prefix {type_part:?}, expected daemon, async or periodic"
                ),
            )
        })?;
        Ok(Kind {
            name: s.to_owned(),
            task_type,
        })
    }

    /// The type part.
    pub fn task_type(&self) -> TaskType {
        self.task_type
    }

    /// The kind as written.
    pub fn as_str(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl TryFrom<String> for Kind {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Kind::parse(&s)
    }
}

impl From<Kind> for String {
    fn from(k: Kind) -> String {
        k.name
    }
}

/// The canonical bytes of a payload: compact JSON with sorted object keys and
/// Go's HTML escaping, i.e. what Go's `json.Marshal` of a map produces, so that
/// uni_ids match BMW's.
///
/// ```
/// let p = serde_json::json!({"content": "ok"});
/// assert_eq!(bmw::task::canonical_payload(&p), br#"{"content":"ok"}"#);
/// ```
pub fn canonical_payload(payload: &Value) -> Vec<u8> {
    // serde_json's map is a BTreeMap (no `preserve_order`), so keys come out sorted.
    let compact = serde_json::to_string(payload).unwrap_or_default();
    // `<`, `>`, `&`, U+2028 and U+2029 only occur inside strings, so replacing
    // them in the text is exactly Go's escaping.
    compact
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
        .into_bytes()
}

/// Lowercase hex of bytes.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The longest task id: it becomes a subject token and a KV key.
pub const MAX_TASK_ID_LEN: usize = 128;
/// The longest queue name: it becomes a subject token and a consumer name.
pub const MAX_QUEUE_LEN: usize = 64;

fn subject_safe(s: &str, extra: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || extra.contains(c))
}

/// Checks a task id where it enters (options, deletes, lookups, requeues):
/// 1 to [`MAX_TASK_ID_LEN`] of `A-Z a-z 0-9 - _ =`, so it can never be a
/// wildcard, hold a separator or whitespace, or name something else in a
/// subject filter.
///
/// ```
/// assert!(bmw::task::check_task_id("task_id", "order-42").is_ok());
/// assert!(bmw::task::check_task_id("task_id", "*").is_err());
/// assert!(bmw::task::check_task_id("task_id", "a.b").is_err());
/// ```
pub fn check_task_id(field: &str, id: &str) -> Result<(), ValidationError> {
    if !id.is_empty() && id.len() <= MAX_TASK_ID_LEN && subject_safe(id, "=") {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!("{id:?}: use 1-{MAX_TASK_ID_LEN} of A-Z a-z 0-9 - _ ="),
        ))
    }
}

/// Checks a queue name where it enters: 1 to [`MAX_QUEUE_LEN`] of
/// `A-Z a-z 0-9 _ -`.
pub fn check_queue(field: &str, queue: &str) -> Result<(), ValidationError> {
    if !queue.is_empty() && queue.len() <= MAX_QUEUE_LEN && subject_safe(queue, "") {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!("{queue:?}: a queue name uses 1-{MAX_QUEUE_LEN} of A-Z a-z 0-9 _ -"),
        ))
    }
}

/// Identity of a daemon task instance: `kind-hex(dimension or canonical payload)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UniId(String);

impl UniId {
    /// The uni_id of `kind` with `payload`, given the operator's dimension.
    ///
    /// ```
    /// use bmw::task::{Kind, UniId};
    /// let kind = Kind::parse("daemon:demo:demo").unwrap();
    /// let id = UniId::new(&kind, "", &serde_json::json!({"content": "ok"}));
    /// assert_eq!(id.as_str(), "daemon:demo:demo-7b22636f6e74656e74223a226f6b227d");
    /// ```
    pub fn new(kind: &Kind, dimension: &str, payload: &Value) -> Self {
        let hex = if dimension.is_empty() {
            to_hex(&canonical_payload(payload))
        } else {
            to_hex(dimension.as_bytes())
        };
        UniId(format!("{kind}-{hex}"))
    }

    /// Wraps a uni_id given by a caller (not validated: it is only looked up).
    pub fn from_raw(s: impl Into<String>) -> Self {
        UniId(s.into())
    }

    /// The uni_id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The KV key of this task in `bmw_daemon_tasks` and `bmw_daemon_claims`.
    ///
    /// `:` becomes `.` (kinds have no dots, so this is reversible); a uni_id that
    /// is too long for a subject, or has other characters, maps to its kind
    /// followed by a SHA-256 of the whole uni_id. The uni_id itself is always
    /// kept in the stored value.
    pub fn key(&self) -> String {
        const MAX_KEY: usize = 200;
        let dotted = self.0.replace(':', ".");
        let allowed = |c: char| c.is_ascii_alphanumeric() || "-/_=.".contains(c);
        if dotted.len() <= MAX_KEY && dotted.chars().all(allowed) && dots_separate_tokens(&dotted) {
            return dotted;
        }
        let kind_part: String = dotted
            .split('-')
            .next()
            .unwrap_or("")
            .chars()
            .filter(|c| allowed(*c))
            .take(100)
            .collect();
        // Only whole tokens: no empty one between, before or after dots.
        let kind_part: Vec<&str> = kind_part.split('.').filter(|t| !t.is_empty()).collect();
        let kind_part = match kind_part.join(".") {
            joined if joined.is_empty() => "uni".to_owned(),
            joined => joined,
        };
        let digest = Sha256::digest(self.0.as_bytes());
        format!("{kind_part}.h-{}", to_hex(&digest))
    }
}

/// Whether `s` is non-empty dot-separated tokens, none of them empty (what a
/// KV key and a subject need).
fn dots_separate_tokens(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(|t| !t.is_empty())
}

impl fmt::Display for UniId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
pub(crate) mod arbitrary;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn seed_uni_ids() {
        let kind = Kind::parse("daemon:demo:demo").unwrap();
        let ok = UniId::new(&kind, "", &json!({"content": "ok"}));
        assert_eq!(
            ok.as_str(),
            "daemon:demo:demo-7b22636f6e74656e74223a226f6b227d"
        );
        let not_ok = UniId::new(&kind, "", &json!({"content": "not_ok"}));
        assert_eq!(
            not_ok.as_str(),
            "daemon:demo:demo-7b22636f6e74656e74223a226e6f745f6f6b227d"
        );
        assert_eq!(
            ok.key(),
            "daemon.demo.demo-7b22636f6e74656e74223a226f6b227d"
        );
    }

    #[test]
    fn dimension_wins_over_payload() {
        let kind = Kind::parse("daemon:apm:pre").unwrap();
        let id = UniId::new(&kind, "1001", &json!({"data_id": 1001, "x": 1}));
        assert_eq!(id.as_str(), "daemon:apm:pre-31303031");
    }

    #[test]
    fn canonical_form_sorts_and_escapes_like_go() {
        let p = json!({"b": 1, "a": {"z": "<&>", "y": [1, 2]}});
        assert_eq!(
            String::from_utf8(canonical_payload(&p)).unwrap(),
            r#"{"a":{"y":[1,2],"z":"\u003c\u0026\u003e"},"b":1}"#
        );
    }

    #[test]
    fn long_uni_ids_hash_into_a_valid_key() {
        let kind = Kind::parse("daemon:demo:demo").unwrap();
        let big = json!({"content": "x".repeat(500)});
        let key = UniId::new(&kind, "", &big).key();
        assert!(key.starts_with("daemon.demo.demo.h-"), "{key}");
        assert_eq!(key.len(), "daemon.demo.demo.h-".len() + 64);
    }

    #[test]
    fn kinds_are_validated() {
        assert_eq!(
            Kind::parse("async:a:b").unwrap().task_type(),
            TaskType::Async
        );
        // BMW's clients name kinds with one part after the type, or more.
        for good in ["async:collect_es_task", "daemon:foo", "periodic:a:b:c"] {
            assert!(Kind::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "daemon",
            "daemon:",
            ":demo",
            "daemon:demo:",
            "cron:a",
            "cron:a:b",
            "daemon::x",
            "daemon:a b:c",
            "daemon:a.b:c",
        ] {
            let err = Kind::parse(bad).unwrap_err();
            assert_eq!(err.field, "kind", "{bad}");
        }
    }

    #[test]
    fn odd_uni_ids_still_have_a_key_and_odd_task_ids_are_refused() {
        for raw in ["", ".", "a..b", "daemon:demo:demo-..x", "x.", "a b", "*"] {
            let key = UniId::from_raw(raw).key();
            assert!(
                !key.is_empty() && key.split('.').all(|t| !t.is_empty()),
                "{raw:?} -> {key:?}"
            );
        }
        for bad in ["", "a b", "*", ">", "a..b", ".a", "a."] {
            assert_eq!(
                check_task_id("task_id", bad).unwrap_err().field,
                "task_id",
                "{bad:?}"
            );
        }
        assert!(check_task_id("task_id", "550e8400-e29b-41d4-a716-446655440000").is_ok());
    }

    /// What NATS takes as a KV key (and as subject tokens after `$KV.<bucket>.`).
    fn is_kv_key(key: &str) -> bool {
        !key.is_empty()
            && key.split('.').all(|t| !t.is_empty())
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-/_=.".contains(c))
    }

    mod properties {
        use super::*;
        use crate::task::arbitrary;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(arbitrary::config())]

            #[test]
            fn kinds_parse_or_are_refused_by_name(s in prop_oneof![arbitrary::kind_text(), any::<String>()]) {
                match Kind::parse(&s) {
                    Ok(kind) => {
                        prop_assert_eq!(kind.as_str(), s.as_str());
                        prop_assert!(s.starts_with(kind.task_type().as_str()));
                        // A kind is a subject token once `:` becomes `.`.
                        prop_assert!(is_kv_key(&s.replace(':', ".")));
                    }
                    Err(e) => prop_assert_eq!(e.field, "kind"),
                }
            }

            #[test]
            fn any_uni_id_has_a_valid_key(s in prop_oneof![arbitrary::id_text(), any::<String>()]) {
                let key = UniId::from_raw(s.clone()).key();
                prop_assert!(is_kv_key(&key), "{:?} -> {:?}", s, key);
                prop_assert!(key.len() <= 200 + 64 + 3, "{}", key.len());
            }

            #[test]
            fn uni_ids_of_any_payload_have_valid_keys(
                kind in arbitrary::kind_text(),
                dimension in arbitrary::text(),
                payload in arbitrary::json(),
            ) {
                if let Ok(kind) = Kind::parse(&kind) {
                    let id = UniId::new(&kind, &dimension, &payload);
                    prop_assert!(id.as_str().starts_with(kind.as_str()));
                    prop_assert!(is_kv_key(&id.key()), "{:?}", id.key());
                }
            }

            #[test]
            fn task_ids_pass_only_as_keys(s in prop_oneof![arbitrary::id_text(), any::<String>()]) {
                match check_task_id("task_id", &s) {
                    Ok(()) => prop_assert!(is_kv_key(&s) && !s.contains('/'), "{:?}", s),
                    Err(e) => prop_assert_eq!(e.field, "task_id"),
                }
            }

            #[test]
            fn task_types_parse_or_are_refused_by_name(s in any::<String>()) {
                if let Err(e) = TaskType::parse(&s) {
                    prop_assert_eq!(e.field, "task_type");
                }
            }
        }
    }
}
