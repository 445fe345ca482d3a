//! Proptest strategies for what callers send, shared by the property tests of
//! every decoder and validator: any JSON value, and strings shaped like
//! durations, times, kinds, ids and cron expressions, so that generated input
//! gets past a decoder's first check as often as it fails it. Tests only.

use proptest::prelude::*;
use serde_json::Value;

/// Cases per property: enough to find the edges, bounded for CI (the
/// `PROPTEST_CASES` environment variable overrides it).
pub(crate) const CASES: u32 = 256;

/// The config of every property test.
pub(crate) fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(CASES),
        // Failures are reported with their input; no files are written.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Any JSON value, nested a few levels, with strings and numbers near the
/// edges of what the decoders take.
pub(crate) fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        number(),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A JSON number: any integer or finite float, and the big ones that once
/// overflowed a date.
pub(crate) fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u64..=u64::MAX / 2).prop_map(|n| Value::from(n % 10_000_000_000_000_000)),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        prop::sample::select(vec![
            0u64,
            1,
            3_155_760_000,
            3_155_760_001,
            10_000_000_000_000,
            u64::MAX
        ])
        .prop_map(Value::from),
    ]
}

/// A string: any text, or one shaped like a duration, time, kind, id or cron.
pub(crate) fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        duration_text(),
        time_text(),
        kind_text(),
        id_text(),
        cron_text(),
    ]
}

/// Humantime-like durations: numbers of any size with units, sometimes two.
pub(crate) fn duration_text() -> impl Strategy<Value = String> {
    "[ ]?[0-9]{1,22}[ ]?(ns|us|ms|s|sec|m|min|h|hr|d|day|days|w|week|M|month|y|year|years)?( [0-9]{1,12}(s|m|h|d|y))?[ ]?"
}

/// RFC 3339-like times, valid or nearly so, at the edges of the years.
pub(crate) fn time_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "(0000|0001|1969|1970|2026|9999|[0-9]{4})-[0-1][0-9]-[0-3][0-9][Tt ][0-2][0-9]:[0-5][0-9]:[0-6][0-9](\\.[0-9]{1,12})?(Z|z|[+-][0-2][0-9]:[0-5][0-9])",
        // Any instant chrono holds, written as RFC 3339.
        any::<i64>().prop_filter_map("a date", |s| {
            chrono::DateTime::from_timestamp(s % 253_402_300_799, 0).map(|d| d.to_rfc3339())
        }),
    ]
}

/// Kind-like strings: three (or some other number of) parts, known prefixes
/// or not, allowed characters or not.
pub(crate) fn kind_text() -> impl Strategy<Value = String> {
    "(daemon|async|periodic|cron|)(:[A-Za-z0-9_.* >-]{0,8}){0,4}"
}

/// Id-like strings: uni_ids, task ids, with dots, dashes and what is not allowed.
pub(crate) fn id_text() -> impl Strategy<Value = String> {
    "[A-Za-z0-9:._=/* >-]{0,40}"
}

/// Cron-like strings: five to seven fields of cron syntax, or a predefined one.
pub(crate) fn cron_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "([0-9*/,?LW#-]{1,8} ){4,6}[0-9A-Za-z*/,?LW#-]{1,8}",
        // Six fields of the usual forms: often valid, sometimes out of range.
        "(\\*|\\*/[1-9][0-9]?|[0-9]{1,2}|[0-9]-[0-9]{1,2}|[0-9],[0-9]{1,2})( (\\*|\\*/[1-9][0-9]?|[0-9]{1,2}|[0-9]-[0-9]{1,2}|[0-9],[0-9]{1,2}|\\?|L|[1-5]W|[0-6]#[1-5]|[0-6]L)){5}",
        "@(yearly|annually|monthly|weekly|daily|midnight|hourly|every|reboot|[a-z]{0,6})",
    ]
}

/// Every option name, and one that is not.
pub(crate) const OPTION_NAMES: [&str; 14] = [
    "queue",
    "retry",
    "timeout",
    "deadline",
    "unique_ttl",
    "process_at",
    "process_in",
    "retention",
    "task_id",
    "cron",
    "every",
    "timezone",
    "overlap",
    "nope",
];

/// A JSON value that may be what an option takes.
pub(crate) fn option_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        json(),
        number(),
        duration_text().prop_map(Value::from),
        time_text().prop_map(Value::from),
        id_text().prop_map(Value::from),
        cron_text().prop_map(Value::from),
        prop::sample::select(vec!["skip", "allow", "Skip"]).prop_map(Value::from),
    ]
}

/// An `options` object: a few option names (known or not) with any values.
pub(crate) fn options_object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(
        prop::sample::select(OPTION_NAMES.to_vec()),
        option_value(),
        0..5,
    )
    .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
}

/// The parts of a create as a caller sends them: kind, payload, options.
pub(crate) fn create_parts() -> impl Strategy<Value = (String, Value, Value)> {
    (
        prop_oneof![
            kind_text(),
            Just("async:demo:echo".to_owned()),
            Just("periodic:demo:tick".to_owned()),
            Just("daemon:demo:demo".to_owned()),
        ],
        json(),
        prop_oneof![options_object(), json()],
    )
}
