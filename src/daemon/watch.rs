//! [`Watcher`]: a `watch_with_history` of one bucket that the daemon runtime
//! can trust to be current, or knows is not.
//!
//! async-nats's KV watch is an ordered push consumer that resumes by itself
//! from the last sequence it delivered, but not always in time, and not
//! always at all: after a long stall its recreations back off for up to
//! 10 s per attempt, and a delete or expiry marker that aged out of a TTL
//! bucket while it was stalled is never delivered. So the runtime restarts
//! every watch from the bucket's current state ([`Watcher::restart`]) when
//! the client reconnects, every resync period, and when a watch errs
//! (a missed heartbeat) or ends. A restarted watch replays the bucket; once
//! the replay is complete, [`Watcher::take_replayed`] gives the keys the
//! bucket holds, so the runtime can drop whatever it still believes in that
//! the bucket no longer has, and [`Watcher::synced`] is true again.
//!
//! Every wait is stored in the watcher (the start in progress, the moment a
//! failed start is retried, the deadline of a replay), so the runtime's
//! `select!` may drop [`Watcher::next`] whenever another event comes first
//! without delaying or restarting any of them.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::kv::{self, Entry};
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::nats::NatsError;

/// How long opening a watch (and looking whether the bucket is empty) may take.
const START_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after a failed start the next one is tried.
const START_RETRY: Duration = Duration::from_secs(1);
/// How long a replay may take before the watch is restarted (an entry that
/// expired while being replayed leaves the replay without its last entry).
const REPLAY_TIMEOUT: Duration = Duration::from_secs(20);

type Opening = BoxFuture<'static, Result<(kv::Watch, bool), NatsError>>;

/// One bucket's watch, restarted with its history whenever it may have
/// missed something.
pub(crate) struct Watcher {
    kv: kv::Store,
    watch: Option<kv::Watch>,
    /// The start in progress.
    opening: Option<Opening>,
    /// When the next start may begin (after a failed one).
    start_at: Instant,
    /// While replaying: the keys delivered so far, and the replay's deadline.
    replay: Option<(HashSet<String>, Instant)>,
    /// A completed replay's keys, not yet taken by the runtime.
    replayed: Option<HashSet<String>>,
    synced: bool,
}

impl Watcher {
    /// A watcher that starts on its first [`Watcher::next`].
    pub(crate) fn new(kv: kv::Store) -> Self {
        let mut watcher = Watcher {
            kv,
            watch: None,
            opening: None,
            start_at: Instant::now(),
            replay: None,
            replayed: None,
            synced: false,
        };
        watcher.restart();
        watcher
    }

    /// The bucket's name, for logs.
    fn bucket(&self) -> &str {
        &self.kv.name
    }

    /// Whether a replay of the bucket has completed since the last restart.
    pub(crate) fn synced(&self) -> bool {
        self.synced
    }

    /// Drops the watch; the next [`Watcher::next`] opens a new one that
    /// replays the bucket's current state.
    pub(crate) fn restart(&mut self) {
        self.watch = None;
        self.opening = None;
        self.replay = None;
        self.replayed = None;
        self.synced = false;
        self.start_at = Instant::now();
    }

    /// The keys the bucket held when the last replay completed, once.
    pub(crate) fn take_replayed(&mut self) -> Option<HashSet<String>> {
        self.replayed.take()
    }

    /// The next entry; `None` when there was none to give (a start, a
    /// retry, an error, a replay of an empty bucket). Cancel-safe.
    pub(crate) async fn next(&mut self) -> Option<Entry> {
        let Some(watch) = self.watch.as_mut() else {
            self.open().await;
            return None;
        };
        let deadline = self.replay.as_ref().map(|(_, deadline)| *deadline);
        let next = tokio::select! {
            next = watch.next() => Some(next),
            () = sleep_until(deadline) => None,
        };
        let Some(next) = next else {
            tracing::warn!(
                bucket = self.bucket(),
                "bucket replay not complete in time; restarting the watch"
            );
            self.restart();
            return None;
        };
        match next {
            Some(Ok(entry)) => {
                if let Some((seen, _)) = self.replay.as_mut() {
                    seen.insert(entry.key.clone());
                    if entry.delta == 0 {
                        self.replay_complete();
                    }
                }
                Some(entry)
            }
            Some(Err(e)) => {
                tracing::warn!(bucket = self.bucket(), cause = %e, "bucket watch stalled; restarting it from the bucket");
                self.restart();
                None
            }
            None => {
                tracing::warn!(
                    bucket = self.bucket(),
                    "bucket watch ended; restarting it from the bucket"
                );
                self.restart();
                None
            }
        }
    }

    /// Waits for the moment a start may begin, then opens the watch.
    async fn open(&mut self) {
        tokio::time::sleep_until(self.start_at).await;
        let kv = self.kv.clone();
        let opening = self.opening.get_or_insert_with(|| {
            Box::pin(async move {
                let opened = tokio::time::timeout(START_TIMEOUT, async {
                    let watch = kv.watch_with_history(">").await?;
                    // An empty bucket replays nothing: no entry says it is done.
                    let empty = crate::nats::bucket_is_empty(&kv).await?;
                    Ok::<_, NatsError>((watch, empty))
                })
                .await;
                opened.unwrap_or_else(|elapsed| {
                    Err(NatsError::with_kind(
                        crate::nats::NatsErrorKind::Timeout,
                        elapsed,
                    ))
                })
            })
        });
        let opened = opening.await;
        self.opening = None;
        match opened {
            Ok((watch, empty)) => {
                self.watch = Some(watch);
                self.replay = Some((HashSet::new(), Instant::now() + REPLAY_TIMEOUT));
                if empty {
                    self.replay_complete();
                }
            }
            Err(e) => {
                tracing::warn!(bucket = self.bucket(), cause = %e, "cannot watch bucket, will retry");
                self.start_at = Instant::now() + START_RETRY;
            }
        }
    }

    fn replay_complete(&mut self) {
        if let Some((seen, _)) = self.replay.take() {
            self.replayed = Some(seen);
            self.synced = true;
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
