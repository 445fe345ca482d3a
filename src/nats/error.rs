//! [`NatsError`]: a failed NATS call, keeping async-nats's error as its source
//! and sorted into a [`NatsErrorKind`] callers can act on: a timeout or an
//! unavailable server is "try again" (HTTP 503), a refusal by the server is
//! the caller's input (400), not-found and conflict are answers of their own.
//!
//! Every store in bmw returns this type (or an error enum wrapping it), so no
//! caller has to read an error's text to tell a timeout from a refusal.

use std::error::Error as StdError;
use std::fmt;

use async_nats::jetstream;

/// What kind of failure a [`NatsError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsErrorKind {
    /// No answer in time (request, publish ack, connection).
    Timeout,
    /// The server answered with an API error about the request itself
    /// (e.g. a schedule it cannot parse, a message over its max payload).
    Refused,
    /// The stream, consumer, bucket or message does not exist.
    NotFound,
    /// An expected revision or sequence did not match (a concurrent writer).
    Conflict,
    /// A stream or bucket is at its storage limit and refused a new
    /// message (discard new): the same write may succeed once it drains.
    Full,
    /// Anything else: no connection, no responders, a broken pipe.
    Unavailable,
}

impl fmt::Display for NatsErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NatsErrorKind::Timeout => "timed out",
            NatsErrorKind::Refused => "refused by nats-server",
            NatsErrorKind::NotFound => "not found",
            NatsErrorKind::Conflict => "conflict",
            NatsErrorKind::Full => "storage full",
            NatsErrorKind::Unavailable => "unavailable",
        })
    }
}

/// A failed NATS call.
#[derive(Debug, thiserror::Error)]
#[error("nats {kind}: {source}")]
pub struct NatsError {
    kind: NatsErrorKind,
    #[source]
    source: Box<dyn StdError + Send + Sync + 'static>,
}

impl NatsError {
    /// Wraps any error, sorting it by what its source chain says.
    pub fn new(source: impl Into<Box<dyn StdError + Send + Sync + 'static>>) -> Self {
        let source = source.into();
        let kind = classify(source.as_ref());
        NatsError { kind, source }
    }

    /// An error of a known kind (for conditions bmw detects itself).
    pub fn with_kind(
        kind: NatsErrorKind,
        source: impl Into<Box<dyn StdError + Send + Sync + 'static>>,
    ) -> Self {
        NatsError {
            kind,
            source: source.into(),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> NatsErrorKind {
        self.kind
    }

    /// Whether trying again later may succeed (timeouts and outages).
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            NatsErrorKind::Timeout | NatsErrorKind::Unavailable
        )
    }
}

impl<K> From<async_nats::error::Error<K>> for NatsError
where
    K: Clone + fmt::Debug + fmt::Display + PartialEq + Send + Sync + 'static,
{
    fn from(e: async_nats::error::Error<K>) -> Self {
        NatsError::new(e)
    }
}

impl From<async_nats::Error> for NatsError {
    fn from(e: async_nats::Error) -> Self {
        NatsError::new(e)
    }
}

/// JetStream's error code for a publish whose `Nats-Msg-Id` an unfinished
/// earlier publish holds (409; seen while a cluster regains its quorum).
const DUPLICATE_MESSAGE_ID_IN_PROCESS: jetstream::ErrorCode = jetstream::ErrorCode(10158);

/// JetStream's error code for a message its stream could not store; with a
/// "maximum ... exceeded" description, a limit of a discard-new stream.
const STREAM_STORE_FAILED: jetstream::ErrorCode = jetstream::ErrorCode(10077);

/// Sorts an error by walking its source chain: a JetStream API error decides
/// by its status, a publish error by its kind, and any error whose kind says
/// it timed out is a timeout.
fn classify(error: &(dyn StdError + 'static)) -> NatsErrorKind {
    use jetstream::context::PublishErrorKind;
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(api) = e.downcast_ref::<jetstream::Error>() {
            if api.error_code() == STREAM_STORE_FAILED && api.to_string().contains("exceeded") {
                return NatsErrorKind::Full;
            }
            return match api.code() {
                404 => NatsErrorKind::NotFound,
                408 => NatsErrorKind::Timeout,
                // No leader, no quorum, a peer gone: the cluster's state, not the request.
                500..=599 => NatsErrorKind::Unavailable,
                // "duplicate message id is in process": an earlier attempt of
                // this publish is still being replicated; its outcome is not
                // known yet, so try again.
                _ if api.error_code() == DUPLICATE_MESSAGE_ID_IN_PROCESS => {
                    NatsErrorKind::Unavailable
                }
                _ if api.error_code() == jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE
                    || api.error_code() == jetstream::ErrorCode::STREAM_WRONG_LAST_MESSAGE_ID =>
                {
                    NatsErrorKind::Conflict
                }
                _ => NatsErrorKind::Refused,
            };
        }
        if let Some(p) = e.downcast_ref::<jetstream::context::PublishError>() {
            match p.kind() {
                PublishErrorKind::TimedOut => return NatsErrorKind::Timeout,
                PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId => {
                    return NatsErrorKind::Conflict;
                }
                PublishErrorKind::MaxPayloadExceeded => return NatsErrorKind::Refused,
                PublishErrorKind::StreamNotFound => return NatsErrorKind::NotFound,
                _ => {}
            }
        }
        if e.downcast_ref::<tokio::time::error::Elapsed>().is_some()
            || e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return NatsErrorKind::Timeout;
        }
        current = e.source();
    }
    // async-nats's error kinds (`RequestErrorKind::TimedOut`, `EntryErrorKind::TimedOut`...)
    // all print "timed out"; their sources are often absent.
    if error.to_string().contains("timed out") {
        NatsErrorKind::Timeout
    } else {
        NatsErrorKind::Unavailable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetstream::context::{PublishError, PublishErrorKind};

    #[test]
    fn kinds_come_from_the_source_chain() {
        let timeout = NatsError::from(PublishError::new(PublishErrorKind::TimedOut));
        assert_eq!(timeout.kind(), NatsErrorKind::Timeout);
        assert!(timeout.is_transient());
        let conflict = NatsError::from(PublishError::new(PublishErrorKind::WrongLastSequence));
        assert_eq!(conflict.kind(), NatsErrorKind::Conflict);
        let api: jetstream::Error = serde_json::from_str(
            r#"{"code":400,"err_code":10188,"description":"invalid schedule"}"#,
        )
        .unwrap();
        let refused = NatsError::from(PublishError::with_source(PublishErrorKind::Other, api));
        assert_eq!(refused.kind(), NatsErrorKind::Refused);
        assert!(!refused.is_transient());
        // A stream at its limit (discard new): full, not an outage to retry now.
        let api: jetstream::Error = serde_json::from_str(
            r#"{"code":503,"err_code":10077,"description":"maximum bytes exceeded"}"#,
        )
        .unwrap();
        let full = NatsError::from(PublishError::with_source(PublishErrorKind::Other, api));
        assert_eq!(full.kind(), NatsErrorKind::Full);
        assert!(!full.is_transient());
        let pipe = NatsError::from(PublishError::new(PublishErrorKind::BrokenPipe));
        assert_eq!(pipe.kind(), NatsErrorKind::Unavailable);
        let kv = NatsError::from(async_nats::jetstream::kv::EntryError::new(
            async_nats::jetstream::kv::EntryErrorKind::TimedOut,
        ));
        assert_eq!(kv.kind(), NatsErrorKind::Timeout);
        // A cluster without quorum answers 500: an outage, not a refusal.
        let api: jetstream::Error = serde_json::from_str(
            r#"{"code":500,"err_code":10008,"description":"jetstream system temporarily unavailable"}"#,
        )
        .unwrap();
        let outage = NatsError::from(PublishError::with_source(PublishErrorKind::Other, api));
        assert_eq!(outage.kind(), NatsErrorKind::Unavailable);
        assert!(outage.is_transient());
        let api: jetstream::Error = serde_json::from_str(
            r#"{"code":409,"err_code":10158,"description":"duplicate message id is in process"}"#,
        )
        .unwrap();
        let pending = NatsError::from(PublishError::with_source(PublishErrorKind::Other, api));
        assert!(
            pending.is_transient(),
            "an earlier attempt is still in process"
        );
    }
}
