//! The mixed load: ten operations a second, each in its own task so an
//! outage's slow answers do not slow the rest. Per ten: three async echoes
//! through the bridge, two through `bmw.task.create` commands (JetStream
//! publishes with the caller's `task_id`), one echo delayed 2 s, two tasks
//! that fail once and succeed on their retry, one task that sleeps 2 s, and
//! one daemon create (every third round; an echo otherwise). What was accepted (answered 2xx, or a
//! command stored by the stream) is what must be applied.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

/// What the load was told yes to.
#[derive(Debug, Default, Clone)]
pub(crate) struct Accepted {
    /// Echo task ids (immediate, delayed, by command): each must run.
    pub(crate) echo: Vec<String>,
    /// Task ids that must complete (their record says so, kept by
    /// `retention`): the retried ones (fail once, then succeed) and the slow
    /// ones (sleep 2 s, so some are running when a fault strikes).
    pub(crate) completing: Vec<String>,
    /// Daemon uni_ids answered 2xx: each must be stored and run.
    pub(crate) daemons: Vec<String>,
    /// Operations sent.
    pub(crate) sent: usize,
    /// Refusals and failures by status (0: no HTTP answer in 20 s; 1: a
    /// command publish not acknowledged in 10 s).
    pub(crate) refused: BTreeMap<u16, usize>,
    /// The first answer's message for each HTTP status refused.
    pub(crate) messages: BTreeMap<u16, String>,
    /// Requests sent again (retrying clients only): no answer or a 5xx, then
    /// the same body, `task_id` included, until a 2xx or a 409 naming it.
    pub(crate) retries: usize,
    /// Retries answered 409 naming the client's id: the first try had been
    /// stored though its answer was lost.
    pub(crate) stored_before: usize,
}

impl Accepted {
    /// "sent N, accepted M (503×k ...)" for the report.
    pub(crate) fn summary(&self) -> String {
        let accepted = self.echo.len() + self.completing.len() + self.daemons.len();
        let refused: Vec<String> = self
            .refused
            .iter()
            .map(|(status, n)| {
                format!(
                    "{n}×{}",
                    match status {
                        0 => "no answer".to_owned(),
                        1 => "publish unacked".to_owned(),
                        s => s.to_string(),
                    }
                )
            })
            .collect();
        let retried = if self.retries > 0 {
            format!(
                ", {} requests retried ({} found stored: 409)",
                self.retries, self.stored_before
            )
        } else {
            String::new()
        };
        if refused.is_empty() {
            format!("{} ops, {accepted} accepted{retried}", self.sent)
        } else {
            format!(
                "{} ops, {accepted} accepted, refused {}",
                self.sent,
                refused.join(" ")
            )
        }
    }
}

/// A running load; [`Load::stop`] ends it and waits for the answers.
pub(crate) struct Load {
    running: Arc<AtomicBool>,
    accepted: Arc<Mutex<Accepted>>,
    driver: tokio::task::JoinHandle<Vec<tokio::task::JoinHandle<()>>>,
}

#[derive(Clone, Copy)]
enum Op {
    BridgeEcho,
    CommandEcho,
    DelayedEcho,
    Retried,
    Slow,
    Daemon,
}

const ROUND: [Op; 10] = [
    Op::BridgeEcho,
    Op::CommandEcho,
    Op::Retried,
    Op::Slow,
    Op::DelayedEcho,
    Op::BridgeEcho,
    Op::CommandEcho,
    Op::Retried,
    Op::BridgeEcho,
    Op::Daemon,
];

impl Load {
    /// Starts sending to the bridge at `base_url` and publishing on `js`. A
    /// `retrying` load is a careful client: each async create through the
    /// bridge names its own `task_id` and is sent again (for up to 30 s)
    /// when it gets no answer or a 5xx.
    pub(crate) fn start(
        base_url: String,
        js: async_nats::jetstream::Context,
        retrying: bool,
    ) -> Load {
        let running = Arc::new(AtomicBool::new(true));
        let accepted = Arc::new(Mutex::new(Accepted::default()));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let (flag, sink) = (running.clone(), accepted.clone());
        let driver = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(100));
            let mut sends = Vec::new();
            let mut n: usize = 0;
            while flag.load(Ordering::Relaxed) {
                ticker.tick().await;
                let op = match ROUND[n % ROUND.len()] {
                    Op::Daemon if n % 30 != 9 => Op::BridgeEcho,
                    op => op,
                };
                sink.lock().unwrap().sent += 1;
                let (http, js, sink, base_url) =
                    (http.clone(), js.clone(), sink.clone(), base_url.clone());
                sends.push(tokio::spawn(async move {
                    send(op, n, retrying, &http, &js, &base_url, &sink).await;
                }));
                n += 1;
            }
            sends
        });
        Load {
            running,
            accepted,
            driver,
        }
    }

    /// What has been accepted so far.
    pub(crate) fn accepted(&self) -> Accepted {
        self.accepted.lock().unwrap().clone()
    }

    /// Stops sending; waits for every answer (each bounded by its timeout).
    pub(crate) async fn stop(self) -> Accepted {
        self.running.store(false, Ordering::Relaxed);
        let sends = self.driver.await.unwrap();
        futures::future::join_all(sends).await;
        self.accepted.lock().unwrap().clone()
    }
}

async fn send(
    op: Op,
    n: usize,
    retrying: bool,
    http: &reqwest::Client,
    js: &async_nats::jetstream::Context,
    base_url: &str,
    sink: &Mutex<Accepted>,
) {
    let body = match op {
        Op::BridgeEcho => json!({"kind": "async:demo:echo", "payload": {"n": n}}),
        Op::DelayedEcho => {
            json!({"kind": "async:demo:echo", "payload": {"n": n}, "options": {"process_in": "2s"}})
        }
        Op::Retried => json!({"kind": "async:demo:fail", "payload": {"fail_times": 1, "n": n},
                              "options": {"retry": 5, "retention": "1h"}}),
        Op::Slow => json!({"kind": "async:demo:sleep", "payload": {"seconds": 2, "n": n},
                           "options": {"retention": "1h"}}),
        Op::Daemon => {
            json!({"kind": "daemon:demo:demo", "payload": {"content": "ok", "load": n}})
        }
        Op::CommandEcho => {
            let task_id = format!("cmd-{n}");
            let body = json!({"kind": "async:demo:echo", "payload": {"n": n},
                              "options": {"task_id": task_id}});
            let stored = async {
                js.publish(bmw::nats::names::SUBJECT_CREATE, body.to_string().into())
                    .await?
                    .await
                    .map(|_| ())
                    .map_err(Into::into)
            };
            let stored: Result<(), Box<dyn std::error::Error + Send + Sync>> =
                match tokio::time::timeout(Duration::from_secs(10), stored).await {
                    Ok(r) => r,
                    Err(e) => Err(e.into()),
                };
            let mut sink = sink.lock().unwrap();
            match stored {
                Ok(()) => sink.echo.push(task_id),
                Err(_) => *sink.refused.entry(1).or_default() += 1,
            }
            return;
        }
    };
    let mut body = body;
    let own_id = format!("http-{n}");
    if retrying && !matches!(op, Op::Daemon) {
        body["options"]["task_id"] = json!(own_id);
    }
    let giving_up = tokio::time::Instant::now() + Duration::from_secs(30);
    let (status, envelope) = loop {
        let (status, envelope) = post(http, base_url, &body).await;
        let again = status == 0 || status >= 500;
        if !(retrying && again && tokio::time::Instant::now() < giving_up) {
            break (status, envelope);
        }
        sink.lock().unwrap().retries += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // A retry of a create that was stored before its answer was lost: the
    // task exists once, under the client's id.
    let (status, envelope) = if retrying
        && status == 409
        && envelope["message"]
            .as_str()
            .is_some_and(|m| m.contains(&own_id))
    {
        sink.lock().unwrap().stored_before += 1;
        (200, json!({"data": {"task_id": own_id}}))
    } else {
        (status, envelope)
    };
    let mut sink = sink.lock().unwrap();
    if !(200..300).contains(&status) {
        *sink.refused.entry(status).or_default() += 1;
        let message = envelope["message"].as_str().unwrap_or_default().to_owned();
        sink.messages.entry(status).or_insert(message);
        return;
    }
    let data = &envelope["data"];
    let id = |field: &str| {
        data[field]
            .as_str()
            .unwrap_or_else(|| panic!("a 2xx answer names its {field}: {envelope}"))
            .to_owned()
    };
    match op {
        Op::Daemon => sink.daemons.push(id("uni_id")),
        Op::Retried | Op::Slow => sink.completing.push(id("task_id")),
        _ => sink.echo.push(id("task_id")),
    }
}

/// One create through the bridge: its status (0 without an answer) and envelope.
async fn post(http: &reqwest::Client, base_url: &str, body: &Value) -> (u16, Value) {
    let answer = http
        .post(format!("{base_url}/bmw/task/"))
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await;
    match answer {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap_or_default())
        }
        Err(_) => (0, Value::Null),
    }
}
