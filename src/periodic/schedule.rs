//! [`Schedule`]: when a periodic task fires: a cron expression in a time
//! zone, or an interval of at least one second. Cron is told apart by its
//! number of fields: five is standard cron as BMW takes it (minute, hour,
//! day of month, month, day of week; it fires at second 0), six has seconds
//! first; or a predefined `@hourly`, `@daily`.... Parsed and checked here
//! (croner, chrono-tz) so bad input is refused before anything is written;
//! the `Nats-Schedule` header that nats-server fires on always has six
//! fields (a five-field expression gets `0 ` in front).

use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};
use croner::Cron;
use serde::{Deserialize, Serialize};

use crate::task::ValidationError;

/// A periodic task's schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Cron as given: five fields (`*/5 * * * *`), six with seconds first
    /// (`*/5 * * * * *`), or a predefined `@daily` etc.
    Cron(String),
    /// A fixed interval (whole seconds, at least 1 s).
    #[serde(with = "humantime_serde_secs")]
    Every(Duration),
}

mod humantime_serde_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

const PREDEFINED: [(&str, &str); 7] = [
    ("@yearly", "0 0 0 1 1 *"),
    ("@annually", "0 0 0 1 1 *"),
    ("@monthly", "0 0 0 1 * *"),
    ("@weekly", "0 0 0 * * 0"),
    ("@daily", "0 0 0 * * *"),
    ("@midnight", "0 0 0 * * *"),
    ("@hourly", "0 0 * * * *"),
];

impl Schedule {
    /// Builds a schedule from `cron` or `every` (exactly one), checking it.
    pub fn from_options(
        cron: Option<&str>,
        every: Option<Duration>,
    ) -> Result<Schedule, ValidationError> {
        match (cron, every) {
            (Some(_), Some(_)) => Err(ValidationError::new(
                "options.every",
                "give cron or every, not both",
            )),
            (None, None) => Err(ValidationError::new(
                "options.cron",
                "a periodic task needs options.cron or options.every",
            )),
            (Some(expr), None) => {
                let expr = expr.trim().to_owned();
                Self::parse_cron(&expr)?;
                Ok(Schedule::Cron(expr))
            }
            (None, Some(every)) => {
                if every < Duration::from_secs(1) || every.subsec_nanos() != 0 {
                    return Err(ValidationError::new(
                        "options.every",
                        "must be whole seconds, at least 1s",
                    ));
                }
                Ok(Schedule::Every(every))
            }
        }
    }

    /// The six-field form of a cron expression (seconds first): a
    /// five-field one fires at second 0; a predefined one is spelled out.
    fn six_fields(expr: &str) -> Option<String> {
        if let Some((_, six)) = PREDEFINED.iter().find(|(name, _)| *name == expr) {
            return Some((*six).to_owned());
        }
        match expr.split_whitespace().count() {
            5 => Some(format!("0 {expr}")),
            6 => Some(expr.to_owned()),
            _ => None,
        }
    }

    fn parse_cron(expr: &str) -> Result<Cron, ValidationError> {
        let Some(six) = Self::six_fields(expr) else {
            return Err(ValidationError::new(
                "options.cron",
                format!(
                    "{expr:?}: use five fields (`*/5 * * * *`: minute, hour, day of month, month, day of week), six with seconds first (`*/5 * * * * *`) or @yearly, @monthly, @weekly, @daily, @hourly"
                ),
            ));
        };
        Cron::new(&six)
            .with_seconds_required()
            .parse()
            .map_err(|e| {
                ValidationError::new("options.cron", format!("{expr:?} does not parse: {e}"))
            })
    }

    /// The `Nats-Schedule` header value: a cron expression with six fields
    /// as nats-server reads them (a predefined one as given), or `@every`.
    pub fn header(&self) -> String {
        match self {
            Schedule::Cron(expr) if expr.starts_with('@') => expr.clone(),
            Schedule::Cron(expr) => Self::six_fields(expr).unwrap_or_else(|| expr.clone()),
            Schedule::Every(d) => format!("@every {}s", d.as_secs()),
        }
    }

    /// The schedule as the caller wrote it: the cron expression as given,
    /// or `@every <n>s`.
    pub fn text(&self) -> String {
        match self {
            Schedule::Cron(expr) => expr.clone(),
            every @ Schedule::Every(_) => every.header(),
        }
    }

    /// The next fire time after `after` (`tz` for cron; intervals have no
    /// fixed phase, so this is `after + every`). `None` past year 9999, the
    /// last one RFC 3339 writes (chrono's own end is not a time every zone holds).
    pub fn next_after(&self, after: DateTime<Utc>, tz: chrono_tz::Tz) -> Option<DateTime<Utc>> {
        if !(0..=9999).contains(&after.year()) {
            return None;
        }
        match self {
            Schedule::Every(d) => after.checked_add_signed(chrono::TimeDelta::from_std(*d).ok()?),
            Schedule::Cron(expr) => {
                let cron = Self::parse_cron(expr).ok()?;
                let next = cron
                    .find_next_occurrence(&after.with_timezone(&tz), false)
                    .ok()?;
                Some(next.with_timezone(&Utc))
            }
        }
    }
}

/// Parses an IANA time zone name (`Asia/Shanghai`); `None` means UTC.
pub fn parse_timezone(name: Option<&str>) -> Result<chrono_tz::Tz, ValidationError> {
    match name {
        None => Ok(chrono_tz::UTC),
        Some(n) => n.parse::<chrono_tz::Tz>().map_err(|_| {
            ValidationError::new(
                "options.timezone",
                format!("{n:?} is not an IANA time zone (e.g. Asia/Shanghai)"),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        assert_eq!(
            Schedule::from_options(None, Some(Duration::from_secs(2)))
                .unwrap()
                .header(),
            "@every 2s"
        );
        assert_eq!(
            Schedule::from_options(Some("*/2 * * * * *"), None)
                .unwrap()
                .header(),
            "*/2 * * * * *"
        );
        assert_eq!(
            Schedule::from_options(Some("@hourly"), None)
                .unwrap()
                .header(),
            "@hourly"
        );
        // Five fields: standard cron, at second 0.
        let five = Schedule::from_options(Some("*/5 * * * *"), None).unwrap();
        assert_eq!(five.header(), "0 */5 * * * *");
        assert_eq!(five.text(), "*/5 * * * *");
        let after = DateTime::parse_from_rfc3339("2026-11-24T12:01:30Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            five.next_after(after, chrono_tz::UTC).unwrap().to_rfc3339(),
            "2026-11-24T12:05:00+00:00"
        );
        for (cron, every, field) in [
            (Some("* * * *"), None, "options.cron"),
            (Some("0 * * * * * 2030"), None, "options.cron"),
            (Some("60 * * * *"), None, "options.cron"),
            (Some("61 * * * * *"), None, "options.cron"),
            (Some("whenever"), None, "options.cron"),
            (None, Some(Duration::from_millis(500)), "options.every"),
            (
                Some("* * * * * *"),
                Some(Duration::from_secs(1)),
                "options.every",
            ),
            (None, None, "options.cron"),
        ] {
            assert_eq!(
                Schedule::from_options(cron, every).unwrap_err().field,
                field,
                "{cron:?} {every:?}"
            );
        }
        assert_eq!(
            parse_timezone(Some("Mars/Olympus")).unwrap_err().field,
            "options.timezone"
        );
    }

    #[test]
    fn next_run_honours_the_time_zone() {
        // 09:00 every day in Shanghai (UTC+8) is 01:00 UTC.
        let s = Schedule::from_options(Some("0 0 9 * * *"), None).unwrap();
        let tz = parse_timezone(Some("Asia/Shanghai")).unwrap();
        let after = DateTime::parse_from_rfc3339("2026-11-24T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let next = s.next_after(after, tz).unwrap();
        assert_eq!(next.to_rfc3339(), "2026-11-25T01:00:00+00:00");
    }

    mod properties {
        use super::*;
        use crate::task::arbitrary;
        use proptest::prelude::*;

        /// Any instant chrono holds.
        fn instant() -> impl Strategy<Value = DateTime<Utc>> {
            prop_oneof![
                (DateTime::<Utc>::MIN_UTC.timestamp()..=DateTime::<Utc>::MAX_UTC.timestamp())
                    .prop_map(|s| DateTime::from_timestamp(s, 0).unwrap()),
                // Around now, where schedules usually are.
                (0i64..=10_000_000_000).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap()),
                Just(DateTime::<Utc>::MAX_UTC),
                Just(DateTime::<Utc>::MIN_UTC),
                Just(Utc::now()),
            ]
        }

        fn timezone() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::sample::select(chrono_tz::TZ_VARIANTS.to_vec())
                    .prop_map(|tz| tz.name().to_owned()),
                any::<String>(),
            ]
        }

        proptest! {
            #![proptest_config(arbitrary::config())]

            #[test]
            fn schedules_parse_or_are_refused_by_name_and_never_panic_ahead(
                cron in prop::option::of(arbitrary::cron_text()),
                every in prop::option::of(prop_oneof![
                    (0u64..=crate::task::options::MAX_DURATION.as_secs()).prop_map(Duration::from_secs),
                    any::<u64>().prop_map(Duration::from_millis),
                ]),
                tz in timezone(),
                after in instant(),
            ) {
                let schedule = match Schedule::from_options(cron.as_deref(), every) {
                    Ok(s) => s,
                    Err(e) => {
                        prop_assert!(e.field == "options.cron" || e.field == "options.every", "{}", e);
                        return Ok(());
                    }
                };
                prop_assert!(!schedule.header().is_empty());
                match parse_timezone(Some(&tz)) {
                    Ok(tz) => {
                        // Past the end of time there is no next run, but no panic either.
                        if let Some(next) = schedule.next_after(after, tz) {
                            prop_assert!(next > after);
                        }
                    }
                    Err(e) => prop_assert_eq!(e.field, "options.timezone"),
                }
            }

            #[test]
            fn the_generated_crons_are_often_valid(crons in prop::collection::vec(arbitrary::cron_text(), 64)) {
                // So that the property above reaches `next_after` with crons.
                let valid = crons.iter().filter(|c| Schedule::parse_cron(c).is_ok()).count();
                prop_assert!(valid > 0, "none of {:?}", crons);
            }

            #[test]
            fn stored_schedules_decode_or_fail_without_panic(v in arbitrary::json()) {
                let _ = serde_json::from_value::<Schedule>(v);
            }
        }
    }
}
