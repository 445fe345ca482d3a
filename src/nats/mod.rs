//! The NATS side of bmw: connecting with credentials and TLS ([`connect`]), every name ([`names`]), idempotent
//! provisioning of streams and buckets ([`provision`]), which connection is
//! up (`link`), and a local
//! nats-server for `bmw run` ([`local`]).

pub mod connect;
pub mod error;
pub(crate) mod link;
pub mod local;
pub mod names;
pub mod provision;
pub mod storage;

pub use connect::{ClientCert, ConnectError, ConnectSettings, NatsAuth, NatsTls, redact_url};
pub use error::{NatsError, NatsErrorKind};

use std::time::Duration;

use std::collections::HashMap;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;

/// JetStream request timeout: long enough to ride out a cluster leader election
/// (about 4-5 s, design.md §10).
pub const JETSTREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected client and its JetStream context.
#[derive(Debug, Clone)]
pub struct Nats {
    /// Core NATS client (replies, inboxes).
    pub client: async_nats::Client,
    /// JetStream context with [`JETSTREAM_TIMEOUT`].
    pub js: jetstream::Context,
    /// How many connections the client has made: it changes on every
    /// reconnect, after which what was watched may have been missed.
    pub connections: tokio::sync::watch::Receiver<u64>,
    /// The permission violations the server reported.
    pub refusals: connect::Refusals,
}

impl Nats {
    /// Connects to `url` (one URL, or several comma-separated for a cluster)
    /// with no credentials but what the URL carries; see [`Nats::connect_with`].
    pub async fn connect(url: &str, name: &str) -> Result<Nats, ConnectError> {
        Nats::connect_with(&ConnectSettings::new(url), name).await
    }

    /// Connects with `settings` (credentials, TLS), retrying the first
    /// connection while no server answers (up to [`connect::FIRST_CONNECT_WAIT`])
    /// and failing at once on refused credentials or TLS, then reconnecting
    /// forever; and builds the JetStream context.
    pub async fn connect_with(
        settings: &ConnectSettings,
        name: &str,
    ) -> Result<Nats, ConnectError> {
        let refusals = connect::Refusals::default();
        let (client, connections) =
            connect::connect_client(settings, name, refusals.clone()).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(JETSTREAM_TIMEOUT)
            .build(client.clone());
        Ok(Nats {
            client,
            js,
            connections,
            refusals,
        })
    }
}

/// How long a create may keep retrying a NATS step that failed for a passing
/// reason (a stream leader election takes about 5 s, a reconnect to another
/// node of a cluster about as long).
pub const RETRY_BUDGET: Duration = Duration::from_secs(15);
/// The longest one attempt of a retried step may take: a request sent on a
/// connection that just died is never answered, so waiting the full
/// JetStream timeout for it wastes the budget.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs a NATS step that is safe to repeat until it succeeds, fails for a
/// reason that will not pass, or `budget` is spent. Each attempt is bounded by
/// [`ATTEMPT_TIMEOUT`]; timeouts, outages and "no stream" (a stream without
/// a leader yet) are retried after 100 ms, doubling to 1 s. `step` gets the
/// attempt number (from 1), so a publish can tell its own earlier success
/// (a duplicate ack) from someone else's.
pub async fn with_retries<T, F, Fut>(budget: Duration, mut step: F) -> Result<T, NatsError>
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = Result<T, NatsError>>,
{
    let deadline = tokio::time::Instant::now() + budget;
    let mut pause = Duration::from_millis(100);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = match tokio::time::timeout(ATTEMPT_TIMEOUT, step(attempt)).await {
            Ok(result) => result,
            Err(elapsed) => Err(NatsError::with_kind(NatsErrorKind::Timeout, elapsed)),
        };
        match result {
            Ok(value) => return Ok(value),
            Err(e)
                if (e.is_transient() || e.kind() == NatsErrorKind::NotFound)
                    && tokio::time::Instant::now() + pause < deadline =>
            {
                tracing::debug!(attempt, cause = %e, "nats step failed, retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Publishes durably, retrying within [`RETRY_BUDGET`] (see [`with_retries`]).
/// The message must carry a `Nats-Msg-Id` (or be otherwise idempotent, like
/// a rollup) so a retry after a lost ack is not stored twice. Returns the ack
/// and whether the message had been stored by this call's earlier attempt
/// (a duplicate ack on a retry).
pub async fn publish_with_retries(
    js: &jetstream::Context,
    subject: &str,
    message: jetstream::message::PublishMessage,
) -> Result<jetstream::publish::PublishAck, NatsError> {
    with_retries(RETRY_BUDGET, |attempt| {
        let message = message.clone();
        async move {
            let mut ack = js.send_publish(subject.to_owned(), message).await?.await?;
            // Stored by an earlier attempt whose ack was lost: ours, not a duplicate.
            if attempt > 1 {
                ack.duplicate = false;
            }
            Ok(ack)
        }
    })
    .await
}

/// The JSON bytes of a value bmw stores. Every stored type is a struct of
/// strings, numbers and `serde_json::Value`s, whose encoding cannot fail, so
/// this needs no error path.
pub fn to_json_bytes<T: serde::Serialize>(value: &T) -> bytes::Bytes {
    serde_json::to_vec(value).unwrap_or_default().into()
}

/// The current values of a bucket, decoded, by key: deleted, expired and
/// undecodable entries are left out. One watch with history, so a bucket of
/// many keys costs one round trip per batch rather than one per key.
pub async fn read_all<T: serde::de::DeserializeOwned>(
    kv: &kv::Store,
) -> Result<HashMap<String, T>, NatsError> {
    let mut watch = kv.watch_with_history(">").await?;
    let mut out = HashMap::new();
    // An empty bucket yields no entry at all, so look before waiting.
    if bucket_is_empty(kv).await? {
        return Ok(out);
    }
    while let Some(entry) = watch.next().await {
        let entry = entry?;
        let value = (entry.operation == kv::Operation::Put)
            .then(|| serde_json::from_slice::<T>(&entry.value).ok())
            .flatten();
        match value {
            Some(v) => out.insert(entry.key.clone(), v),
            None => out.remove(&entry.key),
        };
        if entry.delta == 0 {
            break;
        }
    }
    Ok(out)
}

/// Whether a bucket holds no message at all (fresh stream info: `Store::status`
/// returns the info cached when the store was opened).
pub async fn bucket_is_empty(kv: &kv::Store) -> Result<bool, NatsError> {
    let info = kv.stream.get_info().await?;
    Ok(info.state.messages == 0)
}

/// A KV TTL in whole seconds, at least 1 s (what the server accepts; async-nats
/// would truncate a sub-second one to 0, which the server refuses).
pub fn whole_seconds(ttl: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_secs(ttl.as_secs_f64().ceil().max(1.0) as u64)
}

/// Puts `body` under `key` of `bucket` with a per-key TTL (the KV API's `put`
/// sends no TTL).
pub async fn put_with_ttl(
    js: &jetstream::Context,
    bucket: &str,
    key: &str,
    body: bytes::Bytes,
    ttl: std::time::Duration,
) -> Result<(), NatsError> {
    let publish = jetstream::message::PublishMessage::build()
        .payload(body)
        .ttl(whole_seconds(ttl));
    js.send_publish(names::kv_subject(bucket, key), publish)
        .await?
        .await?;
    Ok(())
}

/// What [`create_with_ttl`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TtlCreate {
    /// The key was free and now holds our value (its revision).
    Created(u64),
    /// The key holds a live value already (that value).
    Exists(bytes::Bytes),
}

/// Create-if-absent with a per-key TTL, safe on keys that were deleted or
/// expired (design.md §10: the KV API's `create_with_ttl` is not). The
/// publish expects the revision of whatever marker it saw, so exactly one of
/// several racing writers wins.
pub async fn create_with_ttl(
    js: &jetstream::Context,
    kv: &kv::Store,
    key: &str,
    body: bytes::Bytes,
    ttl: std::time::Duration,
) -> Result<TtlCreate, NatsError> {
    use jetstream::context::PublishErrorKind;
    let ttl = whole_seconds(ttl);
    for _ in 0..3 {
        let expected = match kv.entry(key).await? {
            Some(e) if e.operation == kv::Operation::Put => return Ok(TtlCreate::Exists(e.value)),
            Some(e) => e.revision,
            None => 0,
        };
        let publish = jetstream::message::PublishMessage::build()
            .payload(body.clone())
            .expected_last_subject_sequence(expected)
            .ttl(ttl);
        let subject = names::kv_subject(&kv.name, key);
        let result = match js.send_publish(subject, publish).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match result {
            Ok(ack) => return Ok(TtlCreate::Created(ack.sequence)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(NatsError::with_kind(
        NatsErrorKind::Conflict,
        format!("too much contention on key `{key}`"),
    ))
}
