//! The daemon list as the console (and any client) asks for it:
//! `GET /bmw/task/?task_type=daemon` filtered on the server by `kind`,
//! `queue`, `worker`, `state` (`running`, `retrying`, `unbound`) and
//! `dimension` (a part of it), sorted by uni_id, and paged with `limit` and
//! `offset`, so 10,000 tasks cost the page one screenful. Each row gains its
//! `state`; the number of matching rows is in the `Bmw-Total-Count` header.
//! Without those parameters the answer is BMW's: every task.

use std::collections::HashMap;

use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::bridge::envelope::{ApiError, Reply};
use crate::client::{Binding, DaemonRow};

/// The response header that carries how many rows match the filters
/// (before `limit` and `offset`).
pub(crate) const TOTAL_COUNT_HEADER: &str = "bmw-total-count";

/// The most rows one page may ask for.
pub(crate) const MAX_LIMIT: usize = 10_000;

/// Where a daemon task stands, from its binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunState {
    /// Held by a live worker and not waiting.
    Running,
    /// Held by a live worker, waiting for its next attempt (`next_retry_at`).
    Retrying,
    /// Held by no live worker: waiting for one to claim it.
    Unbound,
}

impl RunState {
    /// The state of a task with `binding`.
    pub(crate) fn of(binding: &Binding) -> RunState {
        if binding.worker_id.is_empty() || !binding.worker_is_normal {
            RunState::Unbound
        } else if binding.next_retry_at.is_some() {
            RunState::Retrying
        } else {
            RunState::Running
        }
    }

    /// Its name in the listing and in `?state=`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Retrying => "retrying",
            RunState::Unbound => "unbound",
        }
    }

    fn parse(text: &str) -> Option<RunState> {
        [RunState::Running, RunState::Retrying, RunState::Unbound]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// What `GET /bmw/task/?task_type=daemon` asked for.
#[derive(Debug, Default)]
pub(crate) struct DaemonQuery {
    kind: Option<String>,
    queue: Option<String>,
    worker: Option<String>,
    dimension: Option<String>,
    state: Option<RunState>,
    offset: usize,
    limit: Option<usize>,
}

impl DaemonQuery {
    /// The query's parameters, or 400 naming the bad one. Empty values
    /// filter nothing (a form's empty field).
    pub(crate) fn parse(query: &HashMap<String, String>) -> Result<DaemonQuery, ApiError> {
        let text = |name: &str| query.get(name).filter(|v| !v.is_empty()).cloned();
        let number = |name: &str| -> Result<Option<usize>, ApiError> {
            text(name)
                .map(|v| {
                    v.parse::<usize>().map_err(|_| {
                        ApiError::bad_request(format!("invalid `{name}`: {v:?} is not a number"))
                    })
                })
                .transpose()
        };
        let state = text("state")
            .map(|s| {
                RunState::parse(&s).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "invalid `state`: {s:?}, expected running, retrying or unbound"
                    ))
                })
            })
            .transpose()?;
        let limit = number("limit")?;
        if let Some(limit) = limit
            && !(1..=MAX_LIMIT).contains(&limit)
        {
            return Err(ApiError::bad_request(format!(
                "invalid `limit`: {limit}, expected 1 to {MAX_LIMIT}"
            )));
        }
        Ok(DaemonQuery {
            kind: text("kind"),
            queue: text("queue"),
            worker: text("worker"),
            dimension: text("dimension"),
            state,
            offset: number("offset")?.unwrap_or(0),
            limit,
        })
    }

    fn matches(&self, row: &DaemonRow) -> bool {
        let queue = row.options["queue"].as_str().unwrap_or_default();
        self.kind.as_ref().is_none_or(|k| *k == row.kind)
            && self.queue.as_ref().is_none_or(|q| q == queue)
            && self
                .worker
                .as_ref()
                .is_none_or(|w| *w == row.binding.worker_id)
            && self
                .dimension
                .as_ref()
                .is_none_or(|d| row.dimension.contains(d.as_str()))
            && self.state.is_none_or(|s| s == RunState::of(&row.binding))
    }

    /// The rows that match, sorted by uni_id, the page asked for, with the
    /// total count in its header.
    pub(crate) fn answer(&self, mut rows: Vec<DaemonRow>) -> Response {
        rows.retain(|row| self.matches(row));
        rows.sort_by(|a, b| a.uni_id.cmp(&b.uni_id));
        let total = rows.len();
        let page: Vec<Value> = rows
            .into_iter()
            .skip(self.offset)
            .take(self.limit.unwrap_or(usize::MAX))
            .map(|row| {
                let state = RunState::of(&row.binding).as_str();
                let mut value = json!(row);
                value["state"] = json!(state);
                value
            })
            .collect();
        let mut response = Reply::ok(json!(page)).into_response();
        response
            .headers_mut()
            .insert(TOTAL_COUNT_HEADER, HeaderValue::from(total));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(uni_id: &str, kind: &str, queue: &str, worker: &str, dimension: &str) -> DaemonRow {
        DaemonRow {
            uni_id: uni_id.into(),
            kind: kind.into(),
            dimension: dimension.into(),
            payload: json!({}),
            options: json!({"queue": queue}),
            binding: Binding {
                worker_id: worker.into(),
                worker_is_normal: !worker.is_empty(),
                retry_count: 0,
                reload_count: 0,
                next_retry_at: None,
            },
        }
    }

    fn query(pairs: &[(&str, &str)]) -> Result<DaemonQuery, ApiError> {
        DaemonQuery::parse(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn filters_combine_and_empty_values_filter_nothing() {
        let rows = [
            row("a", "daemon:x", "q1", "w1", "1001"),
            row("b", "daemon:x", "q2", "w1", "1002"),
            row("c", "daemon:y", "q1", "", "2001"),
        ];
        let names = |q: DaemonQuery| -> Vec<&str> {
            rows.iter()
                .filter(|r| q.matches(r))
                .map(|r| r.uni_id.as_str())
                .collect()
        };
        assert_eq!(names(query(&[("kind", "daemon:x")]).unwrap()), ["a", "b"]);
        assert_eq!(names(query(&[("queue", "q1")]).unwrap()), ["a", "c"]);
        assert_eq!(
            names(query(&[("worker", "w1"), ("queue", "q2")]).unwrap()),
            ["b"]
        );
        assert_eq!(names(query(&[("dimension", "100")]).unwrap()), ["a", "b"]);
        assert_eq!(names(query(&[("state", "unbound")]).unwrap()), ["c"]);
        assert_eq!(
            names(query(&[("kind", ""), ("queue", "")]).unwrap()),
            ["a", "b", "c"]
        );
    }

    #[test]
    fn bad_parameters_are_named() {
        for (pairs, needle) in [
            (vec![("limit", "0")], "`limit`"),
            (vec![("limit", "10001")], "`limit`"),
            (vec![("offset", "-1")], "`offset`"),
            (vec![("state", "asleep")], "`state`"),
        ] {
            let error = query(&pairs).unwrap_err();
            assert!(
                format!("{error:?}").contains(needle),
                "{pairs:?}: {error:?}"
            );
        }
    }
}
