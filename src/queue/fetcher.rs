//! [`Fetcher`]: pipelined pulls from one queue's shared consumer, and the
//! [`Pace`] that sizes them; beside them, one pull at a time from the
//! queue's consumer of fired messages (what its schedules fire into
//! `BMW_SCHEDULES`: retries, delayed starts, ticks).
//!
//! A worker keeps a window of messages in hand or on the way for each queue,
//! in pulls of half the window: [`Fetcher::top_up`] asks for the next half as
//! soon as one has been handed out, so a pull's round trip overlaps the
//! tasks of the other (stop-and-wait fetching ran at a fifth of the raw
//! drain rate). The window is the queue's share of the concurrency plus
//! about [`PREFETCH_WORK`] of work at the pace its tasks run: large pulls
//! for fast tasks, no more than the share for slow ones. Each pull is a long
//! poll that ends when it is filled or after [`PULL_EXPIRES`]; when nothing
//! is on the way the next one starts at once, so an idle queue costs one
//! pull a second and a new task is seen as soon as it is stored. Nothing is
//! lost on shutdown: [`Fetcher::close`] stops asking, and the caller returns
//! what the open pulls still bring until [`Fetcher::is_idle`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::Message;
use async_nats::jetstream::consumer::PullConsumer;
use futures::stream::{BoxStream, SelectAll};
use futures::{StreamExt, stream};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;

/// How long one pull waits on the server for its messages.
pub(super) const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// About how much work a queue fetches beyond its share of the concurrency.
const PREFETCH_WORK: Duration = Duration::from_millis(100);
/// Most messages a queue keeps in hand or on the way.
const MAX_WINDOW: usize = 1024;
/// The pace assumed before any task ended: slow, so nothing is fetched far ahead.
const FIRST_PACE: Duration = Duration::from_secs(1);
/// Most fired messages one pull asks for: they come at the pace of their
/// schedules, not of producers, and are taken beside the window.
const FIRED_PULL: usize = 16;

/// How long a queue's tasks hold their permits (a moving average), and the
/// wake-up of its loop when one ends.
#[derive(Debug)]
pub(super) struct Pace {
    micros: AtomicU64,
    finished: Notify,
}

impl Pace {
    pub(super) fn new() -> Self {
        Pace {
            micros: AtomicU64::new(FIRST_PACE.as_micros() as u64),
            finished: Notify::new(),
        }
    }

    /// Records that a task held its permit for `held`, and wakes the loop.
    pub(super) fn record(&self, held: Duration) {
        let sample = held.as_micros().min(u64::MAX as u128) as u64;
        let _ = self
            .micros
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(old - old / 8 + sample / 8)
            });
        self.finished.notify_one();
    }

    /// Resolves when a task has ended since the last call.
    pub(super) async fn finished(&self) {
        self.finished.notified().await
    }

    /// The window of a queue with `share` permits: its share, plus what its
    /// tasks run through in [`PREFETCH_WORK`] at this pace, so a message in
    /// hand waits about that long at most. Fast tasks get large pulls (the
    /// server drains 64-message pulls at two thirds of the rate of 500-message
    /// ones); slow ones are not fetched ahead of the workers that could run
    /// them.
    pub(super) fn window(&self, share: usize) -> usize {
        let micros = self.micros.load(Ordering::Relaxed).max(1);
        let ahead = (share as u128 * PREFETCH_WORK.as_micros() / micros as u128)
            .min(MAX_WINDOW as u128) as usize;
        (share + ahead).min(MAX_WINDOW.max(share))
    }
}

/// What an open pull yields: a message, then how many it did not fill.
#[allow(
    clippy::large_enum_variant,
    reason = "nearly every item is a message; boxing would allocate per message"
)]
enum Fetched {
    /// A message, and whether it came from the fired consumer.
    Message(Message, bool),
    End {
        unfilled: usize,
        fired: bool,
    },
}

/// The open pulls of one queue.
pub(super) struct Fetcher {
    consumer: PullConsumer,
    fired: PullConsumer,
    open: SelectAll<BoxStream<'static, Fetched>>,
    /// Messages asked for by open pulls of `consumer` and not yet received.
    outstanding: usize,
    /// Whether a pull of `fired` is open.
    fired_open: bool,
    closed: bool,
}

impl Fetcher {
    /// Pulls from a queue's `consumer` and its consumer of `fired` messages.
    pub(super) fn new(consumer: PullConsumer, fired: PullConsumer) -> Self {
        Fetcher {
            consumer,
            fired,
            open: SelectAll::new(),
            outstanding: 0,
            fired_open: false,
            closed: false,
        }
    }

    /// Keeps `window` messages in hand (`held`) or on the way, in pulls of
    /// half the window each once messages flow, so one pull is on the way
    /// while the other's messages run; always keeps at least one on the way.
    /// Fired messages are pulled [`FIRED_PULL`] at a time, one pull open,
    /// while fewer than the window and one such pull are in hand.
    pub(super) fn top_up(&mut self, window: usize, held: usize) {
        if self.closed {
            return;
        }
        let window = window.max(1);
        if !self.fired_open && held + self.outstanding < window + FIRED_PULL {
            self.fired_open = true;
            self.open.push(pull(self.fired.clone(), FIRED_PULL, true));
        }
        let half = window.div_ceil(2);
        loop {
            let have = held + self.outstanding;
            let room = window.saturating_sub(have);
            if room == 0 || (have > 0 && room < half) {
                return;
            }
            // Nothing in hand or on the way (an idle queue): one pull for the
            // whole window, so idling costs one pull a second, not two.
            let n = if have == 0 { room } else { room.min(half) };
            self.outstanding += n;
            self.open.push(pull(self.consumer.clone(), n, false));
        }
    }

    /// The next message of an open pull, or `None` when a pull ended (time
    /// to top up); pends while no pull is open.
    pub(super) async fn next(&mut self) -> Option<Message> {
        if self.open.is_empty() {
            std::future::pending::<()>().await;
        }
        match self.open.next().await {
            Some(Fetched::Message(m, fired)) => {
                if !fired {
                    self.outstanding = self.outstanding.saturating_sub(1);
                }
                Some(m)
            }
            Some(Fetched::End { fired: true, .. }) => {
                self.fired_open = false;
                None
            }
            Some(Fetched::End { unfilled, .. }) => {
                self.outstanding = self.outstanding.saturating_sub(unfilled);
                None
            }
            None => None,
        }
    }

    /// Stops asking for more.
    pub(super) fn close(&mut self) {
        self.closed = true;
    }

    /// Whether no pull is open (after [`Fetcher::close`]: nothing more will
    /// come; open pulls end within [`PULL_EXPIRES`] and the client's margin).
    pub(super) fn is_idle(&self) -> bool {
        self.open.is_empty()
    }
}

/// One long-poll pull of up to `n` messages, as a stream that ends with
/// how many it did not fill; `fired` tells which consumer it is of.
fn pull(consumer: PullConsumer, n: usize, fired: bool) -> BoxStream<'static, Fetched> {
    #[allow(
        clippy::large_enum_variant,
        reason = "the open state is the common one"
    )]
    enum State {
        Start(Box<PullConsumer>),
        Open(async_nats::jetstream::consumer::pull::Batch, usize),
        Done,
    }
    stream::unfold(State::Start(Box::new(consumer)), move |state| async move {
        let (mut batch, left) = match state {
            State::Start(consumer) => {
                match consumer
                    .batch()
                    .max_messages(n)
                    .expires(PULL_EXPIRES)
                    .messages()
                    .await
                {
                    Ok(batch) => (batch, n),
                    Err(e) => {
                        tracing::debug!(cause = %e, "pull request failed");
                        // Do not spin on a server that refuses pulls.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        return Some((Fetched::End { unfilled: n, fired }, State::Done));
                    }
                }
            }
            State::Open(batch, left) => (batch, left),
            State::Done => return None,
        };
        match batch.next().await {
            Some(Ok(m)) => Some((
                Fetched::Message(m, fired),
                State::Open(batch, left.saturating_sub(1)),
            )),
            Some(Err(e)) => {
                // A refused pull (e.g. too many waiting): do not spin.
                tracing::debug!(cause = %e, "pull ended");
                tokio::time::sleep(Duration::from_millis(100)).await;
                Some((
                    Fetched::End {
                        unfilled: left,
                        fired,
                    },
                    State::Done,
                ))
            }
            None => Some((
                Fetched::End {
                    unfilled: left,
                    fired,
                },
                State::Done,
            )),
        }
    })
    .boxed()
}

/// A running task's permit; when the task ends, the permit goes back and
/// its queue's [`Pace`] learns how long it was held.
pub(super) struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    pace: Arc<Pace>,
    since: Instant,
    /// How often the running task's message must be kept alive: a third of
    /// its consumer's ack wait.
    pub(super) keep_alive: Duration,
}

impl Slot {
    pub(super) fn new(
        permit: OwnedSemaphorePermit,
        pace: &Arc<Pace>,
        keep_alive: Duration,
    ) -> Self {
        Slot {
            permit: Some(permit),
            pace: pace.clone(),
            since: Instant::now(),
            keep_alive,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.pace.record(self.since.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_follows_the_pace() {
        let pace = Pace::new();
        // Before any task ended: the share and a tenth (1 s a task).
        assert_eq!(pace.window(64), 70);
        for _ in 0..200 {
            pace.record(Duration::from_micros(50));
        }
        assert_eq!(pace.window(64), MAX_WINDOW, "fast tasks: large pulls");
        for _ in 0..200 {
            pace.record(Duration::from_millis(20));
        }
        // 100 ms of 20 ms tasks on 16 permits: 80 more.
        let w = pace.window(16);
        assert!((90..=100).contains(&w), "{w}");
        for _ in 0..200 {
            pace.record(Duration::from_secs(30));
        }
        assert_eq!(pace.window(16), 16, "slow tasks: no more than the share");
        assert_eq!(pace.window(2000), 2000, "a share above the cap stays");
    }
}
