//! [`Options`]: a task's options, validated where they enter, and which of
//! them apply to which task type ([`Options::check_for`], the one place that
//! says so).
//!
//! Every way options come in (a command, a raw task message, a stored spec)
//! goes through [`Options::from_json`]: a duration is at most
//! [`MAX_DURATION`] and a time is a year from 0 to 9999, so the time
//! arithmetic done with them elsewhere cannot overflow. The bounds an operator
//! sets (`--max-task-delay`...) are checked by the operations, on creates.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{TaskType, ValidationError};

/// The default queue of a task without `options.queue`.
pub const DEFAULT_QUEUE: &str = "default";

/// The longest duration an option may hold: 100 years (of 365.25 days, as
/// humantime counts them, so it prints as `100years`). Now plus this is far
/// inside the range of dates (chrono's, and RFC 3339's year 9999).
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// A task's options, validated. Unknown option names are refused so that a typo
/// does not silently change nothing; a `null` option is one not given.
/// Durations accept humantime strings (`"1h 30m"`) and integer seconds, up to
/// [`MAX_DURATION`]; times are RFC 3339. Deserializing validates the same way
/// ([`Options::from_json`]), so a raw task message gets the same refusals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Options {
    /// Queue the task runs on; workers listen on a set of queues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Max retries (async).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<u32>,
    /// Per-attempt timeout (async).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_duration"
    )]
    pub timeout: Option<Duration>,
    /// Absolute deadline, RFC 3339 (async).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    /// Unique window (async).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_duration"
    )]
    pub unique_ttl: Option<Duration>,
    /// Delayed start at an RFC 3339 time (async).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_at: Option<String>,
    /// Delayed start after a duration (async).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_duration"
    )]
    pub process_in: Option<Duration>,
    /// How long a finished task stays inspectable (async).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_duration"
    )]
    pub retention: Option<Duration>,
    /// Caller-chosen task id (async).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// Cron schedule with seconds (periodic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// Interval schedule (periodic).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_duration"
    )]
    pub every: Option<Duration>,
    /// Time zone of a cron schedule (periodic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Whether a tick may start while the previous run of its periodic task
    /// is still active (periodic; `None`: [`Overlap::Skip`], as BMW).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap: Option<Overlap>,
}

/// What a periodic tick does when the previous run of its task is still
/// active.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlap {
    /// It is skipped (BMW's behaviour: a tick's task id is its kind, unique
    /// while a run is active).
    #[default]
    Skip,
    /// It starts anyway: runs of one periodic task may overlap.
    Allow,
}

fn overlap(field: &str, v: &Value) -> Result<Overlap, ValidationError> {
    match v.as_str() {
        Some("skip") => Ok(Overlap::Skip),
        Some("allow") => Ok(Overlap::Allow),
        _ => Err(ValidationError::new(
            field,
            format!("must be \"skip\" (the default) or \"allow\", got {v}"),
        )),
    }
}

impl Options {
    /// Validates the `options` object of a create, naming the field at fault.
    pub fn from_json(value: Option<&Value>) -> Result<Options, ValidationError> {
        let map = match value {
            None | Some(Value::Null) => return Ok(Options::default()),
            Some(Value::Object(map)) => map,
            Some(_) => return Err(ValidationError::new("options", "must be a JSON object")),
        };
        let mut o = Options::default();
        for (name, v) in map {
            o.set(name, v)?;
        }
        Ok(o)
    }

    /// Sets one option from its JSON (`null`: not given), validating it. The
    /// field's name is only built for an error: this runs for every task a
    /// worker decodes.
    fn set(&mut self, name: &str, v: &Value) -> Result<(), ValidationError> {
        if v.is_null() {
            return Ok(());
        }
        let set = match name {
            "queue" => queue_name("", v).map(|x| self.queue = Some(x)),
            "retry" => non_negative_int("", v).map(|x| self.retry = Some(x)),
            "timeout" => duration("", v).map(|x| self.timeout = Some(x)),
            "deadline" => rfc3339("", v).map(|x| self.deadline = Some(x)),
            "unique_ttl" => duration("", v).map(|x| self.unique_ttl = Some(x)),
            "process_at" => rfc3339("", v).map(|x| self.process_at = Some(x)),
            "process_in" => duration("", v).map(|x| self.process_in = Some(x)),
            "retention" => duration("", v).map(|x| self.retention = Some(x)),
            "task_id" => string("", v).map(|x| self.task_id = Some(x)),
            "cron" => string("", v).map(|x| self.cron = Some(x)),
            "every" => duration("", v).map(|x| self.every = Some(x)),
            "timezone" => string("", v).map(|x| self.timezone = Some(x)),
            "overlap" => overlap("", v).map(|x| self.overlap = Some(x)),
            _ => Err(ValidationError::new("", "unknown option")),
        };
        set.map_err(|mut e| {
            e.field = format!("options.{name}");
            e
        })
    }

    /// The queue, or [`DEFAULT_QUEUE`].
    pub fn queue(&self) -> &str {
        self.queue.as_deref().unwrap_or(DEFAULT_QUEUE)
    }

    /// The names of the options that are set.
    fn given(&self) -> impl Iterator<Item = &'static str> {
        let set = [
            ("queue", self.queue.is_some()),
            ("retry", self.retry.is_some()),
            ("timeout", self.timeout.is_some()),
            ("deadline", self.deadline.is_some()),
            ("unique_ttl", self.unique_ttl.is_some()),
            ("process_at", self.process_at.is_some()),
            ("process_in", self.process_in.is_some()),
            ("retention", self.retention.is_some()),
            ("task_id", self.task_id.is_some()),
            ("cron", self.cron.is_some()),
            ("every", self.every.is_some()),
            ("timezone", self.timezone.is_some()),
            ("overlap", self.overlap.is_some()),
        ];
        set.into_iter().filter(|(_, on)| *on).map(|(name, _)| name)
    }

    /// Refuses an option that does not apply to `task_type`, naming it.
    ///
    /// | option | daemon | async | periodic |
    /// | --- | --- | --- | --- |
    /// | `queue` | yes | yes | yes (of each tick) |
    /// | `retry`, `timeout`, `deadline`, `retention` | kept, as BMW does | yes | yes (of each tick) |
    /// | `unique_ttl`, `process_at`, `process_in`, `task_id` | kept, as BMW does | yes | no |
    /// | `cron`, `every`, `timezone`, `overlap` | no | no | yes |
    ///
    /// Daemon specs keep asynq's options because BMW's clients send them with
    /// daemon creates; only `queue` changes how a daemon task runs.
    ///
    /// ```
    /// use bmw::task::{Options, TaskType};
    /// let o = Options::from_json(Some(&serde_json::json!({"every": "30s"}))).unwrap();
    /// assert!(o.check_for(TaskType::Periodic).is_ok());
    /// assert_eq!(o.check_for(TaskType::Async).unwrap_err().field, "options.every");
    /// ```
    pub fn check_for(&self, task_type: TaskType) -> Result<(), ValidationError> {
        for name in self.given() {
            let applies = match name {
                "cron" | "every" | "timezone" | "overlap" => task_type == TaskType::Periodic,
                "unique_ttl" | "process_at" | "process_in" | "task_id" => {
                    task_type != TaskType::Periodic
                }
                _ => true,
            };
            if !applies {
                return Err(ValidationError::new(
                    format!("options.{name}"),
                    format!("does not apply to {task_type} tasks"),
                ));
            }
        }
        Ok(())
    }
}

fn string(field: &str, v: &Value) -> Result<String, ValidationError> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| ValidationError::new(field, format!("must be a string, got {v}")))
}

fn queue_name(field: &str, v: &Value) -> Result<String, ValidationError> {
    let s = string(field, v)?;
    super::check_queue(field, &s)?;
    Ok(s)
}

fn non_negative_int(field: &str, v: &Value) -> Result<u32, ValidationError> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| {
            ValidationError::new(field, format!("must be a non-negative integer, got {v}"))
        })
}

/// Parses a duration given as integer seconds or a humantime string, at
/// most [`MAX_DURATION`].
pub fn duration(field: &str, v: &Value) -> Result<Duration, ValidationError> {
    let d = unbounded_duration(field, v)?;
    if d > MAX_DURATION {
        return Err(ValidationError::new(
            field,
            format!(
                "{} is longer than {} (the most any duration may be)",
                humantime::format_duration(d),
                humantime::format_duration(MAX_DURATION)
            ),
        ));
    }
    Ok(d)
}

fn unbounded_duration(field: &str, v: &Value) -> Result<Duration, ValidationError> {
    match v {
        Value::Number(n) => n.as_u64().map(Duration::from_secs).ok_or_else(|| {
            ValidationError::new(
                field,
                format!("must be non-negative whole seconds, got {n}"),
            )
        }),
        Value::String(s) => humantime::parse_duration(s.trim()).map_err(|e| {
            ValidationError::new(
                field,
                format!("{s:?} is not a duration ({e}); use e.g. \"30s\" or \"1h 30m\""),
            )
        }),
        other => Err(ValidationError::new(
            field,
            format!("must be a duration string or integer seconds, got {other}"),
        )),
    }
}

fn rfc3339(field: &str, v: &Value) -> Result<String, ValidationError> {
    let s = string(field, v)?;
    chrono::DateTime::parse_from_rfc3339(&s)
        .map(|_| s.clone())
        .map_err(|e| ValidationError::new(field, format!("{s:?} is not an RFC 3339 time ({e})")))
}

/// Decoding validates as [`Options::from_json`] does, one entry at a time
/// (no intermediate map: a worker decodes the options of every task).
impl<'de> Deserialize<'de> for Options {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct OptionsVisitor;
        impl<'de> serde::de::Visitor<'de> for OptionsVisitor {
            type Value = Options;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an options object")
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<Options, E> {
                Ok(Options::default())
            }

            fn visit_none<E: serde::de::Error>(self) -> Result<Options, E> {
                Ok(Options::default())
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Options, A::Error> {
                let mut o = Options::default();
                while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let v: Value = map.next_value()?;
                    o.set(&name, &v).map_err(serde::de::Error::custom)?;
                }
                Ok(o)
            }
        }
        d.deserialize_any(OptionsVisitor)
    }
}

/// An `Option<Duration>` as a humantime string (which [`duration`] reads back).
fn serialize_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn options_name_the_bad_field() {
        let o = Options::from_json(Some(
            &json!({"queue": "q1", "timeout": "1m 30s", "retention": 60}),
        ))
        .unwrap();
        assert_eq!(o.queue(), "q1");
        assert_eq!(o.timeout, Some(Duration::from_secs(90)));
        assert_eq!(o.retention, Some(Duration::from_secs(60)));
        let cases = [
            (json!({"retry": "ten"}), "options.retry"),
            (json!({"retry": -1}), "options.retry"),
            (json!({"timeout": "soon"}), "options.timeout"),
            (json!({"timeout": -5}), "options.timeout"),
            (json!({"queue": 3}), "options.queue"),
            (json!({"deadline": "tomorrow"}), "options.deadline"),
            (json!({"queu": "x"}), "options.queu"),
            (json!({"overlap": "never"}), "options.overlap"),
            (json!({"overlap": true}), "options.overlap"),
        ];
        for (input, field) in cases {
            assert_eq!(
                Options::from_json(Some(&input)).unwrap_err().field,
                field,
                "{input}"
            );
        }
        assert_eq!(
            Options::from_json(Some(&json!([1]))).unwrap_err().field,
            "options"
        );
    }

    #[test]
    fn options_apply_to_their_task_types() {
        let periodic_only = Options::from_json(Some(&json!({"cron": "* * * * * *"}))).unwrap();
        assert!(periodic_only.check_for(TaskType::Periodic).is_ok());
        assert!(periodic_only.check_for(TaskType::Daemon).is_err());
        let one_shot = Options::from_json(Some(&json!({"process_in": 5, "queue": "q"}))).unwrap();
        assert!(one_shot.check_for(TaskType::Async).is_ok());
        assert!(one_shot.check_for(TaskType::Daemon).is_ok());
        assert_eq!(
            one_shot.check_for(TaskType::Periodic).unwrap_err().field,
            "options.process_in"
        );
    }

    #[test]
    fn options_round_trip_through_json() {
        let o = Options::from_json(Some(&json!({"queue": "q", "timeout": 30}))).unwrap();
        let text = serde_json::to_value(&o).unwrap();
        assert_eq!(text, json!({"queue": "q", "timeout": "30s"}));
        let back: Options = serde_json::from_value(text).unwrap();
        assert_eq!(back, o);
    }

    #[test]
    fn durations_are_bounded_and_nulls_are_not_given() {
        let max = MAX_DURATION.as_secs();
        assert_eq!(
            Options::from_json(Some(&json!({"timeout": max})))
                .unwrap()
                .timeout,
            Some(MAX_DURATION)
        );
        for field in ["timeout", "unique_ttl", "process_in", "retention", "every"] {
            for v in [
                json!(max + 1),
                json!(10_000_000_000_000u64),
                json!("101years"),
            ] {
                let err = Options::from_json(Some(&json!({ field: v }))).unwrap_err();
                assert_eq!(err.field, format!("options.{field}"), "{v}");
                assert!(err.message.contains("100years"), "{err}");
            }
        }
        let o = Options::from_json(Some(&json!({"queue": null, "retry": null}))).unwrap();
        assert_eq!(o, Options::default());
    }

    #[test]
    fn deserializing_validates_like_from_json() {
        let err = serde_json::from_value::<Options>(json!({"retention": 10_000_000_000_000u64}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`options.retention`"), "{err}");
        assert!(serde_json::from_value::<Options>(json!({"nope": 1})).is_err());
        assert_eq!(
            serde_json::from_value::<Options>(Value::Null).unwrap(),
            Options::default()
        );
    }

    mod properties {
        use super::*;
        use crate::task::arbitrary;
        use proptest::prelude::*;

        const NAMES: [&str; 14] = arbitrary::OPTION_NAMES;
        use arbitrary::option_value;

        proptest! {
            #![proptest_config(arbitrary::config())]

            #[test]
            fn any_options_value_is_taken_or_refused_by_name(v in arbitrary::json()) {
                match Options::from_json(Some(&v)) {
                    Ok(o) => prop_assert_eq!(serde_json::from_value::<Options>(serde_json::to_value(&o).unwrap()).unwrap(), o),
                    Err(e) => prop_assert!(e.field.starts_with("options"), "{}", e),
                }
            }

            #[test]
            fn each_option_takes_or_refuses_any_value_by_its_name(
                options in prop::collection::btree_map(prop::sample::select(NAMES.to_vec()), option_value(), 1..4),
            ) {
                let object: serde_json::Map<String, Value> =
                    options.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
                match Options::from_json(Some(&Value::Object(object))) {
                    Ok(o) => {
                        for d in [o.timeout, o.unique_ttl, o.process_in, o.retention, o.every].into_iter().flatten() {
                            prop_assert!(d <= MAX_DURATION);
                        }
                        for t in [&o.deadline, &o.process_at].into_iter().flatten() {
                            prop_assert!(chrono::DateTime::parse_from_rfc3339(t).is_ok());
                        }
                        // What is stored reads back the same.
                        let back: Options = serde_json::from_value(serde_json::to_value(&o).unwrap()).unwrap();
                        prop_assert_eq!(back, o);
                    }
                    Err(e) => {
                        let name = e.field.strip_prefix("options.").unwrap_or_default();
                        prop_assert!(options.contains_key(name), "{} not among {:?}", e, options.keys());
                        prop_assert!(!e.message.is_empty());
                    }
                }
            }

            #[test]
            fn durations_parse_within_bounds_or_are_refused_by_name(v in option_value()) {
                match duration("options.x", &v) {
                    Ok(d) => prop_assert!(d <= MAX_DURATION),
                    Err(e) => prop_assert_eq!(e.field, "options.x"),
                }
            }

            #[test]
            fn options_apply_or_are_refused_by_name(
                options in prop::collection::btree_map(prop::sample::select(NAMES[..12].to_vec()), option_value(), 1..4),
                task_type in prop::sample::select(vec![TaskType::Daemon, TaskType::Async, TaskType::Periodic]),
            ) {
                let object: serde_json::Map<String, Value> =
                    options.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
                if let Ok(o) = Options::from_json(Some(&Value::Object(object)))
                    && let Err(e) = o.check_for(task_type)
                {
                    let name = e.field.strip_prefix("options.").unwrap_or_default();
                    prop_assert!(options.contains_key(name), "{}", e);
                }
            }
        }
    }
}
