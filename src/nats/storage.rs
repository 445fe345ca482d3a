//! How full bmw's streams and buckets are: [`usage`] reads each one's bytes
//! and messages against its limits (`bmw provision` sets them from
//! `--storage-max-bytes`); a worker turns that into the
//! `bmw_storage_used_ratio{stream}` gauge and a warning before a limit is
//! reached (`crate::worker`). (`crate::queue::ScheduleRoom` keeps the limit `BMW_SCHEDULES`
//! cannot keep itself.)

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use serde::Serialize;

use super::names;
use super::provision::SOFT_MAX_BYTES;
use crate::nats::NatsError;

/// At this share of a limit the gauge's stream is reported as near full
/// (a warning in the log and the console).
pub const WARN_RATIO: f64 = 0.8;

/// How often a worker reads the streams for the gauge.
pub const WATCH_EVERY: Duration = Duration::from_secs(5);

/// Every stream bmw keeps, buckets' streams included.
pub const STREAMS: [&str; 11] = [
    names::STREAM_ASYNC,
    names::STREAM_SCHEDULES,
    names::STREAM_TASKS,
    names::STREAM_EVENTS,
    names::STREAM_DEAD,
    "KV_bmw_async_tasks",
    "KV_bmw_daemon_tasks",
    "KV_bmw_daemon_claims",
    "KV_bmw_unique",
    "KV_bmw_workers",
    "KV_bmw_periodic",
];

/// One stream's fill.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StreamUsage {
    /// The stream.
    pub stream: String,
    /// Bytes it holds.
    pub bytes: u64,
    /// Its byte limit (0: none).
    pub max_bytes: u64,
    /// Messages it holds.
    pub messages: u64,
    /// Its message limit (0: none).
    pub max_messages: u64,
    /// The larger of bytes and messages over their limits (0 with none).
    pub used_ratio: f64,
    /// Whether `used_ratio` is at [`WARN_RATIO`] or more.
    pub near_full: bool,
    /// What a full stream does: `refuses new` (a producer is told), `drops
    /// oldest` (events), `refused by bmw` (`BMW_SCHEDULES`), `no limit`.
    pub when_full: &'static str,
}

impl StreamUsage {
    fn of(info: &stream::Info) -> StreamUsage {
        let config = &info.config;
        let soft = config
            .metadata
            .get(SOFT_MAX_BYTES)
            .and_then(|v| v.parse::<u64>().ok());
        let max_bytes = soft.unwrap_or(u64::try_from(config.max_bytes).unwrap_or(0));
        let max_messages = u64::try_from(config.max_messages).unwrap_or(0);
        let ratio = |used: u64, max: u64| {
            if max == 0 {
                0.0
            } else {
                used as f64 / max as f64
            }
        };
        let used_ratio =
            ratio(info.state.bytes, max_bytes).max(ratio(info.state.messages, max_messages));
        let when_full = match (soft, max_bytes, config.discard) {
            (Some(_), ..) => "refused by bmw",
            (None, 0, _) => "no limit",
            (None, _, stream::DiscardPolicy::New) => "refuses new",
            (None, _, _) => "drops oldest",
        };
        StreamUsage {
            stream: config.name.clone(),
            bytes: info.state.bytes,
            max_bytes,
            messages: info.state.messages,
            max_messages,
            used_ratio,
            near_full: used_ratio >= WARN_RATIO,
            when_full,
        }
    }
}

/// The fill of every stream bmw keeps that exists.
pub async fn usage(js: &jetstream::Context) -> Result<Vec<StreamUsage>, NatsError> {
    let mut all = Vec::with_capacity(STREAMS.len());
    for name in STREAMS {
        match js.get_stream(name).await {
            Ok(stream) => all.push(StreamUsage::of(stream.cached_info())),
            Err(e) => {
                let e = NatsError::from(e);
                if e.kind() != crate::nats::NatsErrorKind::NotFound {
                    return Err(e);
                }
            }
        }
    }
    Ok(all)
}
