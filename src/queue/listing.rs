//! Paged listings of async tasks that never read a whole bucket or stream to
//! serve a page. A page walks the sources in order — the task records
//! (`bmw_async_tasks`: running, retrying, finished, archived tasks, in the
//! order they were last written), then the pending tasks still in
//! `BMW_ASYNC`, those their schedules fired into `BMW_SCHEDULES`, and the
//! scheduled ones (each in the order it was stored) — one message at a
//! time from a stream sequence, keeping those that match the filters, and
//! stops at the page's size, or after [`MAX_SCAN`] messages, with a
//! [`Cursor`] to go on from. The cost of a page is its size (plus what its
//! filters skip), not the number of tasks.

use std::fmt;
use std::str::FromStr;

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};

use super::inspect::{Inspector, message_record};
use super::record::{TaskRecord, TaskState};
use crate::nats::{NatsError, names};
use crate::task::ValidationError;

/// Most messages one page reads, matching or not.
pub const MAX_SCAN: usize = 10_000;
/// Rows of a page when the query gives no limit.
pub const DEFAULT_LIMIT: usize = 100;
/// Most rows of a page.
pub const MAX_LIMIT: usize = 1_000;

/// Where a listing goes on: a source and the last stream sequence read in it.
/// Written as `r-<seq>`, `p-<seq>`, `f-<seq>` or `s-<seq>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    source: Source,
    after: u64,
}

/// The sources of a listing, in the order a listing reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Records,
    Pending,
    /// Pending too: the task messages schedules fired (retries, delayed
    /// starts, ticks), in `BMW_SCHEDULES`.
    Fired,
    Scheduled,
}

const SOURCES: [Source; 4] = [
    Source::Records,
    Source::Pending,
    Source::Fired,
    Source::Scheduled,
];

impl Source {
    fn tag(self) -> &'static str {
        match self {
            Source::Records => "r",
            Source::Pending => "p",
            Source::Fired => "f",
            Source::Scheduled => "s",
        }
    }

    /// Whether tasks in `state` can be found in this source.
    fn may_hold(self, state: Option<TaskState>) -> bool {
        match (self, state) {
            (_, None) => true,
            (Source::Pending | Source::Fired, Some(s)) => s == TaskState::Pending,
            (Source::Scheduled, Some(s)) => s == TaskState::Scheduled,
            (Source::Records, Some(s)) => !matches!(s, TaskState::Pending | TaskState::Scheduled),
        }
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.source.tag(), self.after)
    }
}

impl FromStr for Cursor {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Cursor, ValidationError> {
        let bad = || {
            ValidationError::new(
                "cursor",
                format!("{s:?} is not a cursor from a previous page"),
            )
        };
        let (tag, after) = s.split_once('-').ok_or_else(bad)?;
        let source = SOURCES
            .into_iter()
            .find(|source| source.tag() == tag)
            .ok_or_else(bad)?;
        let after = after.parse().map_err(|_| bad())?;
        Ok(Cursor { source, after })
    }
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// The tasks.
    pub tasks: Vec<TaskRecord>,
    /// Where the next page starts; `None` when this is the last one.
    pub next: Option<Cursor>,
}

/// Filters and paging of a list.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this state.
    pub state: Option<TaskState>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Skip this many matches (after the cursor).
    pub offset: usize,
    /// At most this many (default 100, at most 1,000).
    pub limit: usize,
    /// Where the previous page ended.
    pub cursor: Option<Cursor>,
}

/// Reads one page of the tasks matching `query`.
pub(super) async fn page(inspector: &Inspector, query: &ListQuery) -> Result<Page, NatsError> {
    let limit = match query.limit {
        0 => DEFAULT_LIMIT,
        n => n.min(MAX_LIMIT),
    };
    let wanted = |r: &TaskRecord| {
        query.queue.as_ref().is_none_or(|q| &r.queue == q)
            && query.state.is_none_or(|s| r.state == s)
            && query.kind.as_ref().is_none_or(|k| &r.kind == k)
    };
    let start = query.cursor.unwrap_or(Cursor {
        source: Source::Records,
        after: 0,
    });
    let queue = query.queue.as_deref().unwrap_or(names::ANY);
    let (mut skip, mut scanned, mut tasks) = (query.offset, 0, Vec::new());
    for source in SOURCES.into_iter().filter(|s| *s >= start.source) {
        if !source.may_hold(query.state) {
            continue;
        }
        let (stream, filter) = match source {
            Source::Records => (
                inspector.records.stream(),
                names::kv_subject(names::BUCKET_ASYNC_TASKS, ">"),
            ),
            Source::Pending => (&inspector.stream, names::async_subject(queue, names::ANY)),
            Source::Fired => (
                &inspector.schedules,
                names::fired_subject(queue, names::ANY),
            ),
            Source::Scheduled => (
                &inspector.schedules,
                names::delayed_subject(queue, names::ANY),
            ),
        };
        let mut after = if source == start.source {
            start.after
        } else {
            0
        };
        loop {
            if tasks.len() >= limit || scanned >= MAX_SCAN {
                return Ok(Page {
                    tasks,
                    next: Some(Cursor { source, after }),
                });
            }
            let Some(message) = next_message(stream, &filter, after).await? else {
                break;
            };
            after = message.sequence;
            scanned += 1;
            let record = match source {
                Source::Records => super::record::from_message(&message),
                Source::Pending | Source::Fired | Source::Scheduled => {
                    let state = if source == Source::Scheduled {
                        TaskState::Scheduled
                    } else {
                        TaskState::Pending
                    };
                    // A task that has a record (running, retrying) is listed there.
                    match message_record(&message, state) {
                        Some(r) if inspector.records.get(&r.task_id).await?.is_none() => Some(r),
                        _ => None,
                    }
                }
            };
            if let Some(r) = record.filter(|r| wanted(r)) {
                if skip > 0 {
                    skip -= 1;
                } else {
                    tasks.push(r);
                }
            }
        }
    }
    Ok(Page { tasks, next: None })
}

/// The first message of `stream` on `filter` after sequence `after`.
async fn next_message(
    stream: &Stream,
    filter: &str,
    after: u64,
) -> Result<Option<StreamMessage>, NatsError> {
    let found = stream
        .raw_message_builder()
        .sequence(after + 1)
        .next_by_subject(filter.to_owned())
        .send()
        .await;
    match found {
        Ok(message) => Ok(Some(message)),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_junk() {
        for text in ["r-0", "p-42", "s-18446744073709551615"] {
            assert_eq!(text.parse::<Cursor>().unwrap().to_string(), text);
        }
        for junk in ["", "x-1", "r-", "r-1.5", "p--1", "*"] {
            assert_eq!(
                junk.parse::<Cursor>().unwrap_err().field,
                "cursor",
                "{junk}"
            );
        }
    }
}
