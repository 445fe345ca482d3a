//! [`Link`]: which connection of the client is up, read synchronously, so
//! that what was learnt on one connection is not acted on after another.
//!
//! The client counts its connections before anything is read on a new one,
//! so a message or watch entry handled after a reconnect always sees the new
//! count; async-nats's `Connected` event, by contrast, reaches the event
//! callback later (and is dropped when its channel is full).
//!
//! Two users. A queue's message in hand is a delivery made on one connection. Once that
//! connection is lost (nats-server crashed or restarted, the network was
//! cut), the server delivers the message again after its ack wait, or at
//! once if it lost its record of the delivery, possibly to another worker:
//! starting it here as well would run it twice. So a queue starts a message
//! only while connected, on the connection it was fetched on (the client
//! counts its connections), and drops the others: they are not `nak`ed
//! either, since after a reconnect a `nak` could race their redelivery and
//! send them to a third worker. And the daemon runtime reconciles only on a
//! view replayed on the connection that is up: after a reconnect, each
//! watch resumes on its own, so the claims watch can report expired claims
//! before the specs watch reports the deletions made meanwhile, and a
//! reconcile between the two would start a deleted task.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_nats::connection::State;

/// The connection a worker fetches on.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    client: async_nats::Client,
    statistics: Arc<async_nats::Statistics>,
}

/// Which connection of the client a message came on (its count of
/// connections so far).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Epoch(u64);

impl Link {
    pub(crate) fn new(client: &async_nats::Client) -> Self {
        Link {
            client: client.clone(),
            statistics: client.statistics(),
        }
    }

    /// The connection that is up now; `None` while disconnected. Two loads:
    /// cheap enough to check before every start.
    pub(crate) fn current(&self) -> Option<Epoch> {
        if self.client.connection_state() != State::Connected {
            return None;
        }
        Some(Epoch(self.statistics.connects.load(Ordering::Acquire)))
    }
}
