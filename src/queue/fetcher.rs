//! [`Fetcher`]: pipelined pulls from one queue's shared consumer.
//!
//! A worker keeps a small window of messages in hand or on the way for each
//! queue, in pulls of half the window: [`Fetcher::top_up`] asks for the next
//! half as soon as one has been handed out, so a pull's round trip overlaps
//! the tasks of the other (stop-and-wait fetching ran at a fifth of the raw
//! drain rate). Each pull is a long poll that ends when it is filled or after
//! [`PULL_EXPIRES`]; when nothing is on the way the next one starts at once,
//! so an idle queue costs one pull a second and a new task is seen as soon
//! as it is stored. Nothing is lost on shutdown: [`Fetcher::close`] stops
//! asking, and the caller returns what the open pulls still bring until
//! [`Fetcher::is_idle`].

use std::time::Duration;

use async_nats::jetstream::Message;
use async_nats::jetstream::consumer::PullConsumer;
use futures::stream::{BoxStream, SelectAll};
use futures::{StreamExt, stream};

/// How long one pull waits on the server for its messages.
pub(super) const PULL_EXPIRES: Duration = Duration::from_secs(1);

/// What an open pull yields: a message, then how many it did not fill.
#[allow(
    clippy::large_enum_variant,
    reason = "nearly every item is a message; boxing would allocate per message"
)]
enum Fetched {
    Message(Message),
    End { unfilled: usize },
}

/// The open pulls of one queue.
pub(super) struct Fetcher {
    consumer: PullConsumer,
    open: SelectAll<BoxStream<'static, Fetched>>,
    /// Messages asked for by open pulls and not yet received.
    outstanding: usize,
    closed: bool,
}

impl Fetcher {
    pub(super) fn new(consumer: PullConsumer) -> Self {
        Fetcher {
            consumer,
            open: SelectAll::new(),
            outstanding: 0,
            closed: false,
        }
    }

    /// Keeps `window` messages in hand (`held`) or on the way, in pulls of
    /// half the window each, so one pull is on the way while the other's
    /// messages run; always keeps at least one on the way.
    pub(super) fn top_up(&mut self, window: usize, held: usize) {
        if self.closed {
            return;
        }
        let window = window.max(1);
        let half = window.div_ceil(2);
        loop {
            let have = held + self.outstanding;
            let room = window.saturating_sub(have);
            if room == 0 || (have > 0 && room < half) {
                return;
            }
            let n = room.min(half);
            self.outstanding += n;
            self.open.push(pull(self.consumer.clone(), n));
        }
    }

    /// The next message of an open pull, or `None` when a pull ended (time
    /// to top up); pends while no pull is open.
    pub(super) async fn next(&mut self) -> Option<Message> {
        if self.open.is_empty() {
            std::future::pending::<()>().await;
        }
        match self.open.next().await {
            Some(Fetched::Message(m)) => {
                self.outstanding = self.outstanding.saturating_sub(1);
                Some(m)
            }
            Some(Fetched::End { unfilled }) => {
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
/// how many it did not fill.
fn pull(consumer: PullConsumer, n: usize) -> BoxStream<'static, Fetched> {
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
                        return Some((Fetched::End { unfilled: n }, State::Done));
                    }
                }
            }
            State::Open(batch, left) => (batch, left),
            State::Done => return None,
        };
        match batch.next().await {
            Some(Ok(m)) => Some((
                Fetched::Message(m),
                State::Open(batch, left.saturating_sub(1)),
            )),
            Some(Err(e)) => {
                // A refused pull (e.g. too many waiting): do not spin.
                tracing::debug!(cause = %e, "pull ended");
                tokio::time::sleep(Duration::from_millis(100)).await;
                Some((Fetched::End { unfilled: left }, State::Done))
            }
            None => Some((Fetched::End { unfilled: left }, State::Done)),
        }
    })
    .boxed()
}
