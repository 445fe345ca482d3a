//! [`ScheduleRoom`]: the limit `BMW_SCHEDULES` cannot keep itself
//! (nats-server refuses discard-new on a stream with message schedules, and
//! discarding old would drop periodic schedules): bmw refuses new delayed
//! creates once the stream holds the share `bmw provision` wrote in its
//! metadata ([`SOFT_MAX_BYTES`]).

use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::stream;
use tokio::time::Instant;

use crate::nats::provision::SOFT_MAX_BYTES;
use crate::nats::{NatsError, names};
use crate::task::OpError;

/// How long a reading of `BMW_SCHEDULES` is trusted.
const FRESH_FOR: Duration = Duration::from_secs(1);

/// The soft byte limit of `BMW_SCHEDULES`, checked before a new delayed
/// task is written there (retries of accepted tasks are not refused; each
/// periodic task has one schedule, bounded by its bucket). Read at most once
/// a second per process, counting this process's writes in between, so
/// several bridges together may pass the limit by about a second's writes.
#[derive(Debug)]
pub(crate) struct ScheduleRoom {
    stream: stream::Stream,
    read: Mutex<Option<(Instant, u64, Option<u64>)>>,
}

impl ScheduleRoom {
    /// Over the provisioned `BMW_SCHEDULES`.
    pub(crate) fn new(stream: stream::Stream) -> ScheduleRoom {
        ScheduleRoom {
            stream,
            read: Mutex::new(None),
        }
    }

    /// Counts `bytes` written since the last reading.
    pub(crate) fn added(&self, bytes: u64) {
        if let Some((_, held, _)) = self.read.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            *held += bytes;
        }
    }

    /// Refuses (507) when `BMW_SCHEDULES` holds its soft limit.
    pub(crate) async fn check(&self) -> Result<(), OpError> {
        let known = *self.read.lock().unwrap_or_else(|e| e.into_inner());
        let (bytes, limit) = match known {
            Some((at, bytes, limit)) if at.elapsed() < FRESH_FOR => (bytes, limit),
            _ => {
                let mut stream = self.stream.clone();
                let info = stream.info().await.map_err(NatsError::from)?;
                let limit = info
                    .config
                    .metadata
                    .get(SOFT_MAX_BYTES)
                    .and_then(|v| v.parse().ok());
                let bytes = info.state.bytes;
                *self.read.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((Instant::now(), bytes, limit));
                (bytes, limit)
            }
        };
        match limit {
            Some(limit) if bytes >= limit => Err(OpError::StorageFull {
                stream: names::STREAM_SCHEDULES.into(),
                detail: format!("it holds {bytes} bytes of delayed tasks, its share is {limit}"),
            }),
            _ => Ok(()),
        }
    }
}
