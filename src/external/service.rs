//! Async and periodic kinds answered by a NATS service: [`ServiceHandler`]
//! sends each attempt as one NATS request to the kind's subject and reads the
//! reply by the NATS services convention (ADR-32: `Nats-Service-Error-Code`
//! and `Nats-Service-Error` headers on a failure). The service's responders
//! share a queue group, so a team scales its handlers by starting more.
//!
//! The request: the task's payload as JSON, with the headers
//! [`TASK_ID`], [`KIND`], [`QUEUE`], [`ATTEMPT`], [`MAX_RETRY`] and, when the
//! attempt has a time limit, [`DEADLINE`] (RFC 3339). The request waits until
//! that deadline at most and is given up as soon as the attempt is cancelled
//! (delete, shutdown).
//!
//! The reply:
//! - no `Nats-Service-Error-Code` header: success (the body, if any, is the
//!   result, logged);
//! - with it: a failure, with the code and `Nats-Service-Error` in the
//!   task's error. It is retried after [`RETRY_AFTER`] when the reply has it
//!   (seconds, or a duration such as `500ms`), not retried when the code is
//!   400-499 (the request itself is wrong), and retried with the worker's
//!   back-off otherwise;
//! - a reply bmw cannot read (a code that is not a number, a bad
//!   [`RETRY_AFTER`]): a failed attempt whose error quotes the reply, cut to
//!   [`QUOTE_LIMIT`] bytes.
//!
//! No responder on the subject is a failed attempt, retried with back-off
//! like any other (never a lost task); so is a reply that does not come in
//! time.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{HeaderMap, Message, RequestErrorKind, Subject};
use futures::future::BoxFuture;
use serde_json::Value;

use crate::queue::{Handler, TaskContext, TaskError};

pub use crate::nats::names::service_headers::{
    ATTEMPT, DEADLINE, ERROR, ERROR_CODE, KIND, MAX_RETRY, QUEUE, RETRY_AFTER, TASK_ID,
};

/// How much of a reply a task error quotes, at most (bytes).
pub const QUOTE_LIMIT: usize = 512;

/// Why a service subject was refused.
#[derive(Debug, thiserror::Error)]
#[error("service subject `{subject}` is not valid: {reason}")]
pub struct ServiceSubjectError {
    /// The subject as given.
    pub subject: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// The handler of a kind answered by the NATS service on one subject.
#[derive(Clone)]
pub struct ServiceHandler {
    subject: Subject,
    /// The start of every error message: `service` and the quoted subject.
    label: Arc<str>,
}

impl fmt::Debug for ServiceHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceHandler")
            .field("subject", &self.subject.as_str())
            .finish()
    }
}

/// The handler that sends each attempt to the service on `subject`; refused
/// when `subject` cannot be published to (empty, spaces, wildcards, empty
/// tokens).
pub fn handler(subject: &str) -> Result<ServiceHandler, ServiceSubjectError> {
    let refuse = |reason| ServiceSubjectError {
        subject: subject.to_owned(),
        reason,
    };
    if subject.is_empty() {
        return Err(refuse("it is empty"));
    }
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(refuse("it has whitespace or control characters"));
    }
    if subject.split('.').any(str::is_empty) {
        return Err(refuse(
            "it has an empty token (a leading, trailing or double `.`)",
        ));
    }
    if subject.split('.').any(|t| t == "*" || t == ">") {
        return Err(refuse("a request cannot go to a wildcard (`*`, `>`)"));
    }
    if crate::nats::names::RESERVED_SUBJECT_PREFIXES
        .iter()
        .any(|p| subject.starts_with(p))
    {
        return Err(refuse(
            "it is bmw's own or the server's (`bmw.`, `$JS.`, `$KV.`, `$O.`, `$SYS.`, `_INBOX.`)",
        ));
    }
    Ok(ServiceHandler {
        subject: Subject::from(subject),
        label: format!("service `{subject}`").into(),
    })
}

impl ServiceHandler {
    /// The subject requests go to.
    pub fn subject(&self) -> &str {
        self.subject.as_str()
    }

    async fn call(&self, ctx: TaskContext, payload: &Value) -> Result<(), TaskError> {
        // A `Value` always serializes.
        let body = serde_json::to_vec(payload).unwrap_or_default();
        let mut request = async_nats::Request::new()
            .payload(body.into())
            .headers(request_headers(&ctx));
        // The attempt's time left bounds the wait; an attempt without a limit
        // waits as long as it runs (the client's own default would cut it).
        let time_left = ctx
            .deadline
            .map(|d| (d - chrono::Utc::now()).to_std().unwrap_or_default());
        request = request.timeout(time_left);
        let reply = tokio::select! {
            reply = ctx.nats.send_request(self.subject.clone(), request) => reply,
            () = ctx.token.cancelled() => {
                return Err(TaskError::new(format!("{}: attempt cancelled", self.label)));
            }
        };
        match reply {
            Ok(message) => self.read_reply(&ctx, &message),
            Err(e) => Err(match e.kind() {
                RequestErrorKind::NoResponders => TaskError::new(format!(
                    "{}: no responder (no service listens on the subject); retried",
                    self.label
                )),
                RequestErrorKind::TimedOut => TaskError::new(format!(
                    "{}: no reply within the attempt's time limit ({})",
                    self.label,
                    humantime::format_duration(time_left.unwrap_or_default())
                )),
                // The payload came through this server, so only the headers
                // could tip it over; a retry would not fit either.
                RequestErrorKind::MaxPayloadExceeded => {
                    TaskError::skip_retry(format!("{}: request too large: {e}", self.label))
                }
                _ => TaskError::new(format!("{}: request failed: {e}", self.label)),
            }),
        }
    }

    /// Success, or the failure the reply describes.
    fn read_reply(&self, ctx: &TaskContext, message: &Message) -> Result<(), TaskError> {
        let garbage = |what: String| {
            TaskError::new(format!(
                "{}: a reply bmw cannot read ({what}): {}",
                self.label,
                quote_reply(message)
            ))
        };
        if let Some(status) = message.status
            && !status.is_success()
        {
            return Err(garbage(format!("status {status}")));
        }
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().trim())
        };
        let Some(code) = header(ERROR_CODE) else {
            tracing::debug!(
                task_id = ctx.task_id,
                kind = ctx.kind,
                subject = self.subject.as_str(),
                result = %quote(&message.payload),
                "service answered: success"
            );
            return Ok(());
        };
        let Ok(number) = code.parse::<u16>() else {
            return Err(garbage(format!("{ERROR_CODE} {code:?} is not a number")));
        };
        let retry_after = match header(RETRY_AFTER).map(parse_delay) {
            None => None,
            Some(Some(d)) => Some(d),
            Some(None) => {
                return Err(garbage(format!(
                    "{RETRY_AFTER} is neither seconds nor a duration"
                )));
            }
        };
        let mut text = format!(
            "{}: error {number}: {}",
            self.label,
            header(ERROR).unwrap_or("(no description)")
        );
        if !message.payload.is_empty() {
            text.push_str(&format!(" (reply body: {})", quote(&message.payload)));
        }
        Err(match retry_after {
            Some(delay) => TaskError::retry_after(text, delay),
            None if (400..500).contains(&number) => {
                TaskError::skip_retry(format!("{text}; a 4xx code is not retried"))
            }
            None => TaskError::new(text),
        })
    }
}

impl Handler for ServiceHandler {
    fn handle<'a>(
        &'a self,
        ctx: TaskContext,
        payload: &'a Value,
    ) -> BoxFuture<'a, Result<(), TaskError>> {
        Box::pin(self.call(ctx, payload))
    }
}

/// The headers of one attempt's request.
fn request_headers(ctx: &TaskContext) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(TASK_ID, ctx.task_id.as_str());
    headers.insert(KIND, ctx.kind.as_str());
    headers.insert(QUEUE, ctx.queue.as_str());
    headers.insert(ATTEMPT, ctx.attempt.to_string().as_str());
    headers.insert(MAX_RETRY, ctx.max_retry.to_string().as_str());
    // The attempt's span (current while the handler runs) is the parent.
    crate::traces::inject_current(&mut headers);
    if let Some(deadline) = ctx.deadline {
        let text = deadline.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        headers.insert(DEADLINE, text.as_str());
    }
    headers
}

/// A retry delay: whole or decimal seconds (`30`, `1.5`), or a humantime
/// duration (`500ms`, `1m 30s`).
fn parse_delay(text: &str) -> Option<Duration> {
    if let Ok(seconds) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).ok();
    }
    humantime::parse_duration(text).ok()
}

/// `bytes` as a quoted string, cut to [`QUOTE_LIMIT`] bytes.
fn quote(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(QUOTE_LIMIT)];
    let text = String::from_utf8_lossy(cut);
    if cut.len() < bytes.len() {
        format!("{text:?}... ({} bytes in all)", bytes.len())
    } else {
        format!("{text:?}")
    }
}

/// A reply as an error quotes it: its headers and body, cut to
/// [`QUOTE_LIMIT`] bytes.
fn quote_reply(message: &Message) -> String {
    let mut raw = Vec::new();
    if let Some(headers) = &message.headers {
        for (name, values) in headers.iter() {
            for value in values {
                raw.extend_from_slice(format!("{name}: {}\n", value.as_str()).as_bytes());
            }
        }
    }
    raw.extend_from_slice(&message.payload);
    quote(&raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_that_cannot_take_a_request_are_refused() {
        for bad in ["", "a b", "a..b", ".a", "a.", "a.*", ">", "a.>", "a\tb"] {
            let e = handler(bad).unwrap_err();
            assert!(e.to_string().contains("is not valid"), "{bad:?}: {e}");
        }
        for reserved in ["bmw.async.default", "$JS.API.INFO", "_INBOX.x", "$KV.b.k"] {
            let e = handler(reserved).unwrap_err();
            assert!(e.to_string().contains("bmw's own"), "{reserved:?}: {e}");
        }
        for good in ["apm.collect_es", "svc", "$SRV.x", "a-b.c_d", "bmwx.y"] {
            assert_eq!(handler(good).unwrap().subject(), good);
        }
    }

    #[test]
    fn delays_are_seconds_or_durations() {
        assert_eq!(parse_delay("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_delay("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_delay("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_delay("1m 30s"), Some(Duration::from_secs(90)));
        for bad in ["-1", "soon", "", "NaN", "inf", "1e400"] {
            assert_eq!(parse_delay(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn quotes_are_cut() {
        assert_eq!(quote(b"abc"), "\"abc\"");
        let long = vec![b'x'; 2000];
        let q = quote(&long);
        assert!(q.len() < QUOTE_LIMIT + 40, "{}", q.len());
        assert!(q.ends_with("(2000 bytes in all)"), "{q}");
        // A cut inside a UTF-8 character still quotes.
        let text = "é".repeat(QUOTE_LIMIT);
        assert!(quote(text.as_bytes()).contains('é'));
    }
}
