//! [`QueueDepth`]: how many tasks a queue holds, for the per-queue limit on
//! creates (`--max-queue-pending`). A queue with workers is measured by its
//! consumer (tasks waiting plus tasks fetched and not yet acknowledged); a
//! queue no worker has listened on yet, by counting its messages in the
//! stream, stopping at the limit. Each process reads a queue at most about
//! once a second (less often while it is near the limit) and counts its own
//! creates in between, so the check costs creates almost nothing. Creates
//! that miss the cached depth together wait for one reading of it, not one
//! reading each (a batch of a thousand creates would otherwise count an
//! unconsumed queue a thousand times at once).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::stream::Stream;
use futures::TryStreamExt;
use tokio::time::Instant;

use crate::nats::{NatsError, names};
use crate::task::OpError;

/// How long a measured depth is trusted.
const FRESH_FOR: Duration = Duration::from_secs(1);

/// The measured depth of each queue.
#[derive(Debug)]
pub(crate) struct QueueDepth {
    stream: Stream,
    limit: u64,
    measured: Mutex<HashMap<String, Measured>>,
    /// Held while a queue is read: one reading of a queue at a time in this
    /// process.
    reading: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Debug, Clone, Copy)]
struct Measured {
    depth: u64,
    until: Instant,
}

impl QueueDepth {
    /// Depths of the queues of `stream` (`BMW_ASYNC`); `limit` 0 means none.
    pub(crate) fn new(stream: Stream, limit: u64) -> Self {
        QueueDepth {
            stream,
            limit,
            measured: Mutex::new(HashMap::new()),
            reading: Mutex::new(HashMap::new()),
        }
    }

    /// Refuses a create on a queue that holds `limit` tasks already (429).
    pub(crate) async fn check(&self, queue: &str) -> Result<(), OpError> {
        if self.limit == 0 {
            return Ok(());
        }
        let depth = match self.known(queue) {
            Some(depth) => depth,
            None => self.read(queue).await?,
        };
        if depth >= self.limit {
            return Err(OpError::QueueFull {
                queue: queue.to_owned(),
                limit: self.limit,
            });
        }
        Ok(())
    }

    /// The depth of `queue` measured less than its freshness ago, counting
    /// this process's creates since.
    fn known(&self, queue: &str) -> Option<u64> {
        self.measured
            .lock()
            .ok()
            .and_then(|m| m.get(queue).copied())
            .filter(|m| m.until > Instant::now())
            .map(|m| m.depth)
    }

    /// Reads the depth of `queue` (or takes the reading another create made
    /// while this one waited its turn) and caches it.
    async fn read(&self, queue: &str) -> Result<u64, OpError> {
        let turn = self
            .reading
            .lock()
            .map(|mut r| r.entry(queue.to_owned()).or_default().clone())
            .unwrap_or_default();
        let _turn = turn.lock().await;
        if let Some(depth) = self.known(queue) {
            return Ok(depth);
        }
        let depth =
            crate::nats::with_retries(crate::nats::RETRY_BUDGET, |_| self.measure(queue)).await?;
        // A queue near its limit is measured less often: counting
        // an unconsumed queue reads its messages' subjects.
        let rest = Duration::from_millis(depth.saturating_mul(1000) / self.limit.max(1));
        let until = Instant::now() + FRESH_FOR + rest.min(Duration::from_secs(10));
        if let Ok(mut m) = self.measured.lock() {
            m.insert(queue.to_owned(), Measured { depth, until });
        }
        Ok(depth)
    }

    /// Counts a task this process just added to `queue`.
    pub(crate) fn added(&self, queue: &str) {
        if let Ok(mut m) = self.measured.lock()
            && let Some(measured) = m.get_mut(queue)
        {
            measured.depth += 1;
        }
    }

    async fn measure(&self, queue: &str) -> Result<u64, NatsError> {
        let name = names::async_consumer(queue);
        match self.stream.consumer_info(&name).await {
            Ok(info) => Ok(info.num_pending + info.num_ack_pending as u64),
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
                self.count_messages(queue).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Messages of a queue nobody consumes yet, counted up to the limit.
    async fn count_messages(&self, queue: &str) -> Result<u64, NatsError> {
        let mut total = 0;
        for filter in names::async_queue_filters(queue) {
            let mut subjects = self.stream.info_with_subjects(&filter).await?;
            while total < self.limit
                && let Some((_, count)) = subjects.try_next().await?
            {
                total += count as u64;
            }
        }
        Ok(total)
    }
}
