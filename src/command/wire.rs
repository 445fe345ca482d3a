//! The wire form of commands on `bmw.task.*`: one JSON object per message,
//! `{"id", "kind", "payload", "options"}` for a create, `{"id", "task_type",
//! "task_uni_id" | "task_id" | "kind"}` for a delete (`{"id", "task_type",
//! "all": true}` deletes every task of the type), `{"id", "task_uni_id",
//! "payload"?}` for a reload (the payload's keys are merged into the stored
//! one). [`parse`] validates it into a [`Command`] ([`parse_delivered`]
//! as it arrived on the command stream); [`encode`] and [`subject`] are what
//! a producer publishes.

use async_nats::jetstream;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::nats::names;
use crate::task::{
    Command, CreateCommand, DeleteTarget, Kind, Options, Origin, TaskType, UniId, ValidationError,
};

/// Every field any command may carry.
#[derive(Debug, Default, Deserialize)]
struct Wire {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    kind: Option<Value>,
    #[serde(default)]
    payload: Value,
    #[serde(default)]
    options: Option<Value>,
    #[serde(default)]
    task_type: Option<String>,
    #[serde(default)]
    task_uni_id: Option<String>,
    #[serde(default)]
    task_id: Option<String>,
    #[serde(default)]
    all: Option<bool>,
}

fn required(field: &str, v: Option<String>) -> Result<String, ValidationError> {
    v.filter(|s| !s.is_empty())
        .ok_or_else(|| ValidationError::new(field, "is required"))
}

/// Parses and validates a command published on `subject`. A missing `id`
/// gets a fresh one.
pub fn parse(subject: &str, body: &[u8]) -> Result<Command, ValidationError> {
    parse_with(subject, body, || uuid::Uuid::new_v4().to_string())
}

/// Parses a command as it arrived on the command stream, which may deliver
/// one message more than once: a missing `id` is the message's
/// `Nats-Msg-Id`, else its stream and sequence, so every delivery parses to
/// the same command; a create is marked [`Origin::Message`] (its async task
/// id is derived from the command id).
pub fn parse_delivered(message: &jetstream::Message) -> Result<Command, ValidationError> {
    let message_id = message
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        .map(|v| v.as_str().to_owned())
        .filter(|id| !id.is_empty());
    let sequence = || match message.info() {
        Ok(info) => format!("{}-{}", info.stream, info.stream_sequence),
        // Not from a stream (never on the command consumer): nothing stable.
        Err(_) => uuid::Uuid::new_v4().to_string(),
    };
    let mut command = parse_with(message.subject.as_str(), &message.payload, || {
        message_id.unwrap_or_else(sequence)
    })?;
    if let Command::Create(create) = &mut command {
        create.origin = Origin::Message;
    }
    Ok(command)
}

/// Parses and validates a command already read as JSON (an item of a
/// batch), as [`parse`] does its bytes.
pub fn parse_value(subject: &str, body: Value) -> Result<Command, ValidationError> {
    let wire: Wire = serde_json::from_value(body).map_err(not_a_command)?;
    from_wire(subject, wire, || uuid::Uuid::new_v4().to_string())
}

fn not_a_command(e: serde_json::Error) -> ValidationError {
    ValidationError::new("body", format!("not a JSON command object: {e}"))
}

fn parse_with(
    subject: &str,
    body: &[u8],
    missing_id: impl FnOnce() -> String,
) -> Result<Command, ValidationError> {
    let wire: Wire = serde_json::from_slice(body).map_err(not_a_command)?;
    from_wire(subject, wire, missing_id)
}

fn from_wire(
    subject: &str,
    wire: Wire,
    missing_id: impl FnOnce() -> String,
) -> Result<Command, ValidationError> {
    let id = wire.id.clone().unwrap_or_else(missing_id);
    match subject {
        names::SUBJECT_CREATE => {
            let kind = match wire.kind {
                Some(Value::String(k)) => Kind::parse(&k)?,
                Some(other) => {
                    return Err(ValidationError::new(
                        "kind",
                        format!("must be a string, got {other}"),
                    ));
                }
                None => return Err(ValidationError::new("kind", "is required")),
            };
            let options = Options::from_json(wire.options.as_ref())?;
            Ok(Command::Create(Box::new(CreateCommand {
                id,
                kind,
                payload: wire.payload,
                options,
                origin: Origin::Direct,
            })))
        }
        names::SUBJECT_DELETE => {
            let task_type = TaskType::parse(&required("task_type", wire.task_type)?)?;
            let target = match task_type {
                _ if wire.all == Some(true) => DeleteTarget::All(task_type),
                TaskType::Daemon => DeleteTarget::Daemon(UniId::from_raw(required(
                    "task_uni_id",
                    wire.task_uni_id,
                )?)),
                TaskType::Async => DeleteTarget::Async(required("task_id", wire.task_id)?),
                TaskType::Periodic => DeleteTarget::Periodic(required(
                    "kind",
                    wire.kind.and_then(|k| k.as_str().map(str::to_owned)),
                )?),
            };
            Ok(Command::Delete { id, target })
        }
        names::SUBJECT_RELOAD => Ok(Command::Reload {
            id,
            uni_id: UniId::from_raw(required("task_uni_id", wire.task_uni_id)?),
            payload: match wire.payload {
                Value::Null => None,
                Value::Object(keys) => Some(keys),
                other => {
                    return Err(ValidationError::new(
                        "payload",
                        format!(
                            "a reload's payload is an object of the keys to change, got {other}"
                        ),
                    ));
                }
            },
        }),
        other => Err(ValidationError::new(
            "subject",
            format!("{other} is not a command subject"),
        )),
    }
}

/// The subject a command is published on.
pub fn subject(command: &Command) -> &'static str {
    match command {
        Command::Create(_) => names::SUBJECT_CREATE,
        Command::Delete { .. } => names::SUBJECT_DELETE,
        Command::Reload { .. } => names::SUBJECT_RELOAD,
    }
}

/// The JSON a command is published as.
pub fn encode(command: &Command) -> Value {
    match command {
        Command::Create(c) => {
            json!({"id": c.id, "kind": c.kind, "payload": c.payload, "options": c.options})
        }
        Command::Delete { id, target } => match target {
            DeleteTarget::Daemon(u) => json!({"id": id, "task_type": "daemon", "task_uni_id": u}),
            DeleteTarget::Async(t) => json!({"id": id, "task_type": "async", "task_id": t}),
            DeleteTarget::Periodic(k) => json!({"id": id, "task_type": "periodic", "kind": k}),
            DeleteTarget::All(t) => json!({"id": id, "task_type": t, "all": true}),
        },
        Command::Reload {
            id,
            uni_id,
            payload: None,
        } => json!({"id": id, "task_uni_id": uni_id}),
        Command::Reload {
            id,
            uni_id,
            payload: Some(keys),
        } => json!({"id": id, "task_uni_id": uni_id, "payload": keys}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_seed_commands() {
        let c = parse(names::SUBJECT_CREATE, br#"{"kind":"daemon:demo:demo","payload":{"content":"ok"},"options":{"queue":"default"}}"#).unwrap();
        let Command::Create(c) = c else { panic!() };
        assert_eq!(c.kind.as_str(), "daemon:demo:demo");
        assert_eq!(c.options.queue(), "default");
        let d = parse(
            names::SUBJECT_DELETE,
            br#"{"task_type":"daemon","task_uni_id":"x"}"#,
        )
        .unwrap();
        assert!(matches!(
            d,
            Command::Delete {
                target: DeleteTarget::Daemon(_),
                ..
            }
        ));
        let r = parse(names::SUBJECT_RELOAD, br#"{"id":"7","task_uni_id":"x"}"#).unwrap();
        assert_eq!(r.id(), "7");
        assert_eq!(
            parse(subject(&r), encode(&r).to_string().as_bytes()).unwrap(),
            r
        );
    }

    #[test]
    fn bad_commands_name_the_field() {
        let cases: [(&str, &[u8], &str); 7] = [
            (names::SUBJECT_CREATE, b"not json", "body"),
            (names::SUBJECT_CREATE, br#"{"payload":{}}"#, "kind"),
            (names::SUBJECT_CREATE, br#"{"kind":"cron:a:b"}"#, "kind"),
            (
                names::SUBJECT_CREATE,
                br#"{"kind":"daemon:a:b","options":{"retry":"x"}}"#,
                "options.retry",
            ),
            (
                names::SUBJECT_DELETE,
                br#"{"task_type":"daemon"}"#,
                "task_uni_id",
            ),
            (names::SUBJECT_RELOAD, br#"{}"#, "task_uni_id"),
            (
                names::SUBJECT_RELOAD,
                br#"{"task_uni_id":"x","payload":"token"}"#,
                "payload",
            ),
        ];
        for (subject, body, field) in cases {
            assert_eq!(
                parse(subject, body).unwrap_err().field,
                field,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    mod properties {
        use super::*;
        use crate::task::arbitrary;
        use proptest::prelude::*;

        fn subject() -> impl Strategy<Value = String> {
            prop_oneof![
                Just(names::SUBJECT_CREATE.to_owned()),
                Just(names::SUBJECT_DELETE.to_owned()),
                Just(names::SUBJECT_RELOAD.to_owned()),
                arbitrary::text(),
            ]
        }

        /// A command-shaped object: the fields commands have, with any values.
        fn command_object() -> impl Strategy<Value = Value> {
            let field = prop::sample::select(vec![
                "id",
                "kind",
                "payload",
                "options",
                "task_type",
                "task_uni_id",
                "task_id",
                "all",
            ]);
            let value = prop_oneof![
                arbitrary::json(),
                arbitrary::kind_text().prop_map(Value::from),
                arbitrary::id_text().prop_map(Value::from),
                prop::sample::select(vec!["daemon", "async", "periodic"]).prop_map(Value::from),
                any::<bool>().prop_map(Value::from),
            ];
            prop::collection::btree_map(field, value, 0..6).prop_map(|m| {
                Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            })
        }

        fn check(subject: &str, body: &[u8]) -> Result<(), TestCaseError> {
            match parse(subject, body) {
                Ok(command) => {
                    prop_assert_eq!(wire::subject(&command), subject);
                    // What a producer publishes parses back to the same command.
                    let again = parse(subject, encode(&command).to_string().as_bytes());
                    prop_assert_eq!(again.as_ref().ok(), Some(&command), "{:?}", again);
                }
                Err(e) => {
                    prop_assert!(!e.field.is_empty());
                    prop_assert!(!e.message.is_empty());
                }
            }
            Ok(())
        }

        use crate::command::wire;

        proptest! {
            #![proptest_config(arbitrary::config())]

            #[test]
            fn any_bytes_parse_or_are_refused_by_name(subject in subject(), body in prop::collection::vec(any::<u8>(), 0..256)) {
                check(&subject, &body)?;
            }

            #[test]
            fn any_json_parses_or_is_refused_by_name(subject in subject(), body in arbitrary::json()) {
                check(&subject, body.to_string().as_bytes())?;
            }

            #[test]
            fn command_shaped_json_parses_or_is_refused_by_name(subject in subject(), body in command_object()) {
                check(&subject, body.to_string().as_bytes())?;
            }
        }
    }
}
