//! `GET /bmw/events/stream`: the live feed, as Server-Sent Events. Three
//! kinds of message:
//!
//! - `ready` once the feed is subscribed (what happens after it is sent is
//!   delivered);
//! - `task`: each new message of the `BMW_EVENTS` stream (read by an ordered
//!   consumer from the moment of the request), its data the event as
//!   published, its id the stream sequence; filtered by `kind` (the kind, or
//!   a prefix of it ending before a `:`), `what` (`started`, `moved`...) and
//!   `task` (a part of the event's `uni_id` or `task_id`);
//! - `change`: what changed in the daemon specs, claims and workers buckets
//!   (their KV watches), gathered for [`CHANGE_WINDOW`] so thousands of
//!   claim renewals cost one message: `{"bucket": "daemon_tasks" |
//!   "daemon_claims" | "workers", "count": n, "workers": [...]}` (the ids of
//!   the workers whose entries were written, their heartbeats; `gone`: the
//!   keys of removed ones), so a page refreshes only what changed.
//!
//! A comment is sent every [`KEEP_ALIVE`] so proxies keep the connection.
//! The consumer and watches end when the client goes away, and the feed
//! ends when the process stops (`BridgeState::shutdown`), so a stop does
//! not wait for open consoles.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::kv::Operation;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bridge::BridgeState;
use crate::bridge::envelope::ApiError;
use crate::bridge::openapi::ApiFailures;
use crate::membership::WorkerEntry;
use crate::nats::{NatsError, names};

/// How long bucket changes are gathered into one `change` message.
pub(crate) const CHANGE_WINDOW: Duration = Duration::from_millis(500);
/// How often an idle feed sends a comment.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Messages waiting for a slow client before the feed stops reading.
const BUFFER: usize = 256;

/// Which task events a client wants.
#[derive(Debug, Default, Clone)]
struct EventFilter {
    kind: Option<String>,
    what: Option<String>,
    task: Option<String>,
}

impl EventFilter {
    fn from_query(query: &HashMap<String, String>) -> EventFilter {
        let text = |name: &str| query.get(name).filter(|v| !v.is_empty()).cloned();
        EventFilter {
            kind: text("kind"),
            what: text("what"),
            task: text("task"),
        }
    }

    fn matches(&self, event: &Value) -> bool {
        let field = |name: &str| event[name].as_str().unwrap_or_default();
        let kind_ok = self.kind.as_deref().is_none_or(|k| {
            let kind = field("kind");
            kind == k
                || kind
                    .strip_prefix(k)
                    .is_some_and(|rest| rest.starts_with(':'))
        });
        let what_ok = self.what.as_deref().is_none_or(|w| field("what") == w);
        let task_ok = self
            .task
            .as_deref()
            .is_none_or(|t| field("uni_id").contains(t) || field("task_id").contains(t));
        kind_ok && what_ok && task_ok
    }
}

/// The watched buckets, by the name the page knows them by.
const WATCHED: [(&str, &str); 3] = [
    ("daemon_tasks", names::BUCKET_DAEMON_TASKS),
    ("daemon_claims", names::BUCKET_DAEMON_CLAIMS),
    ("workers", names::BUCKET_WORKERS),
];

/// Changes seen in one bucket during a window.
#[derive(Debug, Default)]
struct Changes {
    count: u64,
    workers: BTreeSet<String>,
    gone: BTreeSet<String>,
}

/// `GET /bmw/events/stream?kind=&what=&task=`: the feed; 503 with the
/// envelope when NATS cannot open it.
#[utoipa::path(get, path = "/bmw/events/stream", tag = "console", security((), ("bearer" = [])),
    params(
        ("kind" = Option<String>, Query, description = "Only events of this kind (or of the kinds under this prefix, e.g. `daemon:apm`)"),
        ("what" = Option<String>, Query, description = "Only events of this type: started, error, retry, moved, stopped, failed, archived..."),
        ("task" = Option<String>, Query, description = "Only events whose uni_id or task_id contains this"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events, endless: `ready` once, `task` for each new BMW_EVENTS message (its JSON), `change` for changes of the daemon specs, claims and workers buckets (batched per 0.5 s)",
            content_type = "text/event-stream", body = String),
        ApiFailures,
    ))]
pub(crate) async fn events(
    State(state): State<BridgeState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // Held as long as the feed's body, given back when it ends.
    let slot = state.feeds.take(&headers)?;
    let filter = EventFilter::from_query(&query);
    let js = &state.client.nats().js;
    let unavailable = |e: NatsError| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the live feed cannot start: {e}"),
        )
    };
    let events = js
        .get_stream(names::STREAM_EVENTS)
        .await
        .map_err(|e| unavailable(NatsError::new(e)))?
        .create_consumer(OrderedConfig {
            filter_subject: names::SUBJECT_EVENTS_ALL.into(),
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(NatsError::new(e)))?
        .messages()
        .await
        .map_err(|e| unavailable(NatsError::new(e)))?;
    let mut watches = Vec::new();
    for (label, bucket) in WATCHED {
        let kv = js
            .get_key_value(bucket)
            .await
            .map_err(|e| unavailable(NatsError::new(e)))?;
        let watch = kv
            .watch_all()
            .await
            .map_err(|e| unavailable(NatsError::new(e)))?;
        watches.push(watch.map(move |entry| (label, entry)).boxed());
    }
    let changes = futures::stream::select_all(watches);

    let (tx, rx) = mpsc::channel(BUFFER);
    // The client going away (the guard dropped with the response) or the
    // process stopping ends the feed.
    let stop = state.shutdown.child_token();
    tokio::spawn(forward(events, changes, filter, tx, stop.clone()));
    let guard = (stop.drop_guard(), slot);
    let feed = futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        rx.recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), (rx, guard)))
    });
    Ok(sse(feed).into_response())
}

fn sse(
    feed: impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
) -> impl IntoResponse {
    (
        [(axum::http::header::CACHE_CONTROL, "no-cache")],
        Sse::new(feed).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)),
    )
}

/// Reads the events and the watches until the client goes (`stop`) or the
/// channel closes, sending what passes the filter and a `change` per bucket
/// per window.
async fn forward(
    mut events: impl Stream<Item = Result<async_nats::jetstream::Message, impl std::fmt::Display>>
    + Unpin,
    mut changes: impl Stream<
        Item = (
            &'static str,
            Result<async_nats::jetstream::kv::Entry, impl std::fmt::Display>,
        ),
    > + Unpin,
    filter: EventFilter,
    tx: mpsc::Sender<SseEvent>,
    stop: CancellationToken,
) {
    if tx
        .send(SseEvent::default().event("ready").data("{}"))
        .await
        .is_err()
    {
        return;
    }
    let mut pending: BTreeMap<&'static str, Changes> = BTreeMap::new();
    let mut window = tokio::time::interval(CHANGE_WINDOW);
    window.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let sent = tokio::select! {
            () = stop.cancelled() => return,
            message = events.next() => match message {
                Some(Ok(message)) => match task_event(&message, &filter) {
                    Some(sse) => tx.send(sse).await,
                    None => continue,
                },
                Some(Err(e)) => {
                    tracing::debug!(cause = %e, "live feed: events consumer error");
                    continue;
                }
                None => return,
            },
            change = changes.next() => match change {
                Some((label, Ok(entry))) => {
                    pending.entry(label).or_default().note(label, entry);
                    continue;
                }
                Some((label, Err(e))) => {
                    tracing::debug!(cause = %e, bucket = label, "live feed: watch error");
                    continue;
                }
                None => return,
            },
            _ = window.tick() => send_changes(&tx, std::mem::take(&mut pending)).await,
        };
        if sent.is_err() {
            return;
        }
    }
}

/// An event of `BMW_EVENTS` as a `task` message of the feed (its stream
/// sequence as the id), if it passes the filter.
fn task_event(message: &async_nats::jetstream::Message, filter: &EventFilter) -> Option<SseEvent> {
    let event = serde_json::from_slice::<Value>(&message.payload).ok()?;
    if !filter.matches(&event) {
        return None;
    }
    let mut sse = SseEvent::default().event("task").data(event.to_string());
    if let Ok(info) = message.info() {
        sse = sse.id(info.stream_sequence.to_string());
    }
    Some(sse)
}

impl Changes {
    /// Counts a change of bucket `label`, and which worker came or went.
    fn note(&mut self, label: &str, entry: async_nats::jetstream::kv::Entry) {
        self.count += 1;
        match entry.operation {
            Operation::Put if label == "workers" => {
                if let Ok(worker) = serde_json::from_slice::<WorkerEntry>(&entry.value) {
                    self.workers.insert(worker.worker_id);
                }
            }
            Operation::Delete | Operation::Purge if label == "workers" => {
                self.gone.insert(entry.key);
            }
            _ => {}
        }
    }
}

/// One `change` message per bucket that changed in the window.
async fn send_changes(
    tx: &mpsc::Sender<SseEvent>,
    pending: BTreeMap<&'static str, Changes>,
) -> Result<(), mpsc::error::SendError<SseEvent>> {
    for (label, seen) in pending {
        let data = json!({"bucket": label, "count": seen.count, "workers": seen.workers, "gone": seen.gone});
        tx.send(SseEvent::default().event("change").data(data.to_string()))
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_matches_kind_prefixes_what_and_task() {
        let event =
            json!({"kind": "daemon:demo:demo", "what": "moved", "uni_id": "daemon:demo:demo-7b22"});
        let filter = |pairs: &[(&str, &str)]| {
            EventFilter::from_query(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        for (pairs, expected) in [
            (vec![], true),
            (vec![("kind", "daemon:demo:demo")], true),
            (vec![("kind", "daemon:demo")], true),
            (vec![("kind", "daemon:dem")], false),
            (vec![("what", "moved")], true),
            (vec![("what", "started")], false),
            (vec![("task", "7b22")], true),
            (vec![("task", "ffff")], false),
            (vec![("kind", ""), ("task", "")], true),
        ] {
            assert_eq!(filter(&pairs).matches(&event), expected, "{pairs:?}");
        }
    }
}
