//! [`Link`]: whether a message fetched earlier may still be started — only
//! while the connection it came on is still the one that is up.
//!
//! A message in hand is a delivery made on one connection. Once that
//! connection is lost (nats-server crashed or restarted, the network was
//! cut), the server delivers the message again after its ack wait, or at
//! once if it lost its record of the delivery, possibly to another worker:
//! starting it here as well would run it twice. So a queue starts a message
//! only while connected, on the connection it was fetched on (the client
//! counts its connections), and drops the others: they are not `nak`ed
//! either, since after a reconnect a `nak` could race their redelivery and
//! send them to a third worker.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_nats::connection::State;

/// The connection a worker fetches on.
#[derive(Debug, Clone)]
pub(super) struct Link {
    client: async_nats::Client,
    statistics: Arc<async_nats::Statistics>,
}

/// Which connection of the client a message came on (its count of
/// connections so far).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Epoch(u64);

impl Link {
    pub(super) fn new(client: &async_nats::Client) -> Self {
        Link {
            client: client.clone(),
            statistics: client.statistics(),
        }
    }

    /// The connection that is up now; `None` while disconnected. Two loads:
    /// cheap enough to check before every start.
    pub(super) fn current(&self) -> Option<Epoch> {
        if self.client.connection_state() != State::Connected {
            return None;
        }
        Some(Epoch(self.statistics.connects.load(Ordering::Acquire)))
    }
}
