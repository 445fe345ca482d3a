//! [`CommandConsumer`]: one worker's loop on the durable consumer all
//! workers share on `BMW_TASKS`, pulled [`PULL_BATCH`] at a time. Each
//! message is parsed once and handed to one of [`LANES`] lanes by the task
//! it names, so commands on one task keep their order while commands on
//! different tasks run side by side. A lane takes what it holds (up to
//! [`LANE_BATCH`]) at once, and the [`CommandHandler`] applies and settles
//! that batch: commands on one task in order, those on different tasks
//! together, their writes in flight at the same time.

use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::handler::{CommandHandler, Keyed, Parsed};
use super::wire;
use crate::nats::{Nats, NatsError, names};
use crate::queue::panic_message;
use crate::task::{Command, TaskType};

/// Commands a worker applies at once (on different tasks).
pub const LANES: usize = 64;
/// Commands waiting per lane.
const LANE_DEPTH: usize = 64;
/// Commands a lane applies as one batch.
pub const LANE_BATCH: usize = 64;
/// Commands asked for in one pull request.
pub const PULL_BATCH: usize = 500;
/// Commands delivered to the workers and not yet acked, all workers
/// together: a few pulls each (more only grows the lanes' queues, the
/// workers' memory and every command's wait, not the rate).
const MAX_ACK_PENDING: i64 = 4_096;

/// The consumer loop of one worker on the shared durable consumer.
#[derive(Debug)]
pub struct CommandConsumer {
    nats: Nats,
    handler: CommandHandler,
}

impl CommandConsumer {
    /// A consumer applying commands with `handler`.
    pub fn new(nats: Nats, handler: CommandHandler) -> Self {
        CommandConsumer { nats, handler }
    }

    async fn consumer(&self) -> Result<jetstream::consumer::Consumer<pull::Config>, NatsError> {
        let stream = self.nats.js.get_stream(names::STREAM_TASKS).await?;
        let consumer = stream
            .get_or_create_consumer(
                names::CONSUMER_COMMANDS,
                pull::Config {
                    durable_name: Some(names::CONSUMER_COMMANDS.into()),
                    ack_wait: Duration::from_secs(30),
                    // Unlimited: a command left to another worker may be
                    // delivered many times; failures are bounded by the
                    // handler's own count of deliveries.
                    max_deliver: -1,
                    max_ack_pending: MAX_ACK_PENDING,
                    ..Default::default()
                },
            )
            .await?;
        Ok(consumer)
    }

    /// Consumes until `token` fires. Survives errors and server restarts.
    pub async fn run(self, token: CancellationToken) {
        let this = Arc::new(self);
        let mut lanes = Vec::with_capacity(LANES);
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..LANES {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Keyed>(LANE_DEPTH);
            lanes.push(tx);
            let this = this.clone();
            workers.spawn(async move {
                let mut batch = Vec::with_capacity(LANE_BATCH);
                while rx.recv_many(&mut batch, LANE_BATCH).await > 0 {
                    this.handler.handle_batch(std::mem::take(&mut batch)).await;
                }
            });
        }
        'outer: loop {
            let opened = async {
                match this.consumer().await {
                    Ok(c) => c
                        .stream()
                        .max_messages_per_batch(PULL_BATCH)
                        // The client's default for `messages()`.
                        .heartbeat(Duration::from_secs(15))
                        .messages()
                        .await
                        .map_err(NatsError::from),
                    Err(e) => Err(e),
                }
            };
            let messages = tokio::select! {
                messages = opened => messages,
                () = token.cancelled() => break 'outer,
            };
            match messages {
                Ok(mut messages) => loop {
                    tokio::select! {
                        next = messages.next() => match next {
                            Some(Ok(message)) => {
                                // Parsed once here: the lane depends on it, and the lane uses it.
                                // The lane may run user code (a daemon kind's dimension): a
                                // panic there fails this command, not the consumer.
                                let routed = std::panic::catch_unwind(AssertUnwindSafe(|| {
                                    let parsed = wire::parse_delivered(&message);
                                    let key = this.order_key(&message, &parsed);
                                    (parsed, key)
                                }));
                                let (parsed, key) = match routed {
                                    Ok(routed) => routed,
                                    Err(panic) => {
                                        this.handler.fail_panicked(&message, &panic_message(panic.as_ref())).await;
                                        continue;
                                    }
                                };
                                let lane = (key % LANES as u64) as usize;
                                if lanes[lane].send((message, parsed, key)).await.is_err() {
                                    break 'outer;
                                }
                            }
                            Some(Err(e)) => tracing::debug!(cause = %e, "command consumer hiccup"),
                            None => break,
                        },
                        () = token.cancelled() => break 'outer,
                    }
                },
                Err(e) => tracing::warn!(cause = %e, "command consumer unavailable, retrying"),
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = token.cancelled() => break,
            }
        }
        // Let the lanes finish what they hold (each command is short).
        drop(lanes);
        while workers.join_next().await.is_some() {}
    }

    /// The hash of a message's order key, which picks its lane: the uni_id
    /// of the daemon task it names (so a create and a later delete of one
    /// task stay in order), else its body.
    fn order_key(&self, message: &jetstream::Message, parsed: &Parsed) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        let uni_id = match parsed {
            Ok(Command::Create(create)) if create.kind.task_type() == TaskType::Daemon => self
                .handler
                .ops()
                .daemon()
                .spec_for(create)
                .ok()
                .map(|spec| spec.uni_id),
            Ok(command) => command.daemon_uni_id().cloned(),
            Err(_) => None,
        };
        match uni_id {
            Some(uni_id) => uni_id.as_str().hash(&mut hasher),
            // Hashed as it came: the body of every async create is not copied.
            None => message.payload.as_ref().hash(&mut hasher),
        }
        hasher.finish()
    }
}
