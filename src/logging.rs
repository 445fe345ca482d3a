//! Logging: the `tracing` subscriber a bmw process installs ([`init`]: text
//! or JSON lines on stderr, filtered by `BMW_LOG` or [`DEFAULT_FILTER`]) and
//! its level, which `POST /bmw/log/level?log_level=debug` changes while the
//! process runs ([`set_level`], through a reloadable filter). An extra layer
//! (the trace exporter of [`crate::traces`]) may sit beside the log output,
//! with its own filter: the log level does not change what is traced.

use std::sync::OnceLock;

use tracing_subscriber::filter::{FilterExt, filter_fn};
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// The filter when `BMW_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,async_nats=warn";

/// The filter of `bmw task` without `-v` when `BMW_LOG` is not set: a
/// command-line client prints its answer, and its error once, itself.
pub const QUIET_FILTER: &str = "off";

/// The levels [`set_level`] takes: BMW's (zap's) names, and `trace`.
pub const LEVELS: &str = "trace, debug, info, warn, error";

/// A layer beside the log output (the trace exporter), with its own filter.
pub type ExtraLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// What the log output is layered on: the registry and the extra layer.
type Base = Layered<Option<ExtraLayer>, Registry>;

/// The reloadable filter of the log output [`init`] installed.
static FILTER: OnceLock<reload::Handle<EnvFilter, Base>> = OnceLock::new();

/// Why the log level was not changed.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    /// Not a level.
    #[error("log_level {given:?} is not a log level; use one of {LEVELS}")]
    Unknown {
        /// What was given.
        given: String,
    },
    /// This process's logging was not set up by [`init`] (bmw embedded in
    /// another program): its level is not bmw's to change.
    #[error("the log level of this process is not managed by bmw")]
    NotManaged,
    /// The filter could not be swapped.
    #[error("the log level could not be changed: {0}")]
    Reload(#[from] reload::Error),
}

/// Installs the subscriber: `BMW_LOG` (an `EnvFilter`) or [`DEFAULT_FILTER`],
/// human-readable text on stderr (colours on a terminal) or JSON lines. A
/// second call, or one after another subscriber was installed, does nothing.
/// `extra` (the trace exporter) sees spans and events through its own filter.
pub fn init(json: bool, extra: Option<ExtraLayer>) {
    init_with_default(json, extra, DEFAULT_FILTER)
}

/// [`init`] with another filter for when `BMW_LOG` is not set.
pub fn init_with_default(json: bool, extra: Option<ExtraLayer>, default_filter: &str) {
    let filter =
        EnvFilter::try_from_env("BMW_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    // The spans made for traces (named with `otel.name`) stay out of the
    // log lines: they read the same with traces on or off.
    let filter = filter.and(filter_fn(|meta| {
        !(meta.is_span() && meta.fields().field("otel.name").is_some())
    }));
    let registry = tracing_subscriber::registry().with(extra);
    let installed = if json {
        registry.with(fmt.json().with_filter(filter)).try_init()
    } else {
        registry.with(fmt.with_filter(filter)).try_init()
    };
    if installed.is_ok() {
        let _ = FILTER.set(handle);
    }
}

/// The filter for `level`: bmw's own events at that level, other crates' no
/// chattier than `info` (and async-nats's no chattier than `warn`).
fn filter_for(level: &str) -> String {
    let others = match level {
        "trace" | "debug" => "info",
        other => other,
    };
    let nats = if level == "error" { "error" } else { "warn" };
    format!("{others},async_nats={nats},bmw={level}")
}

/// The level `given` names (case-insensitive; `warning` is `warn`, and zap's
/// `dpanic`, `panic` and `fatal` are `error`).
pub fn parse_level(given: &str) -> Result<&'static str, LogLevelError> {
    Ok(match given.trim().to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warn" | "warning" => "warn",
        "error" | "dpanic" | "panic" | "fatal" => "error",
        _ => {
            return Err(LogLevelError::Unknown {
                given: given.to_owned(),
            });
        }
    })
}

/// Sets this process's log level now; the level set.
pub fn set_level(given: &str) -> Result<&'static str, LogLevelError> {
    let level = parse_level(given)?;
    let handle = FILTER.get().ok_or(LogLevelError::NotManaged)?;
    handle.reload(EnvFilter::new(filter_for(level)))?;
    Ok(level)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_read_as_bmw_names_them() {
        assert_eq!(parse_level("debug").unwrap(), "debug");
        assert_eq!(parse_level(" INFO ").unwrap(), "info");
        assert_eq!(parse_level("warning").unwrap(), "warn");
        assert_eq!(parse_level("fatal").unwrap(), "error");
        for bad in ["", "verbose", "debug,hyper=trace", "bmw=debug"] {
            let e = parse_level(bad).unwrap_err();
            assert!(e.to_string().contains("log_level"), "{e}");
        }
    }

    #[test]
    fn dependencies_stay_at_info_when_bmw_debugs() {
        assert_eq!(filter_for("debug"), "info,async_nats=warn,bmw=debug");
        assert_eq!(filter_for("warn"), "warn,async_nats=warn,bmw=warn");
        assert_eq!(filter_for("error"), "error,async_nats=error,bmw=error");
        for level in ["trace", "debug", "info", "warn", "error"] {
            assert!(EnvFilter::try_new(filter_for(level)).is_ok());
        }
    }
}
