//! The console's server side (issue 15): its files at `/ui/` with their
//! content types and CSP, open while the API wants a token; the live feed
//! `GET /bmw/events/stream` (Server-Sent Events: task events published after
//! connecting, filtered by kind and task; bucket change notices; behind the
//! tokens); the daemon list filtered and paged on the server.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{BmwProcess, TestEnv, api, http};

const READER: &str = "reader-0123456789abcdef";
const WRITER: &str = "writer-0123456789abcdef";

/// A Server-Sent Events response read message by message.
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    /// Opens `url` with `token`; panics unless it answers 200 with
    /// `text/event-stream`.
    async fn open(url: &str, token: Option<&str>) -> SseReader {
        let mut request = reqwest::Client::new().get(url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("stream request");
        assert_eq!(response.status().as_u16(), 200, "{url}");
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        SseReader {
            response,
            buffer: String::new(),
        }
    }

    /// The next message (its `event` and its `data` as JSON) before
    /// `deadline`, or `None`.
    async fn next(&mut self, deadline: Instant) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some((event, serde_json::from_str(&data).expect("data is JSON")));
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.response.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }

    /// Reads until a message of `event` for which `wanted` holds; panics
    /// after `timeout` naming what was seen.
    async fn expect(
        &mut self,
        event: &str,
        timeout: Duration,
        wanted: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some((name, data)) = self.next(deadline).await {
            if name == event && wanted(&data) {
                return data;
            }
            seen.push(format!("{name}: {data}"));
        }
        panic!(
            "no {event} message in {timeout:?}; saw:\n{}",
            seen.join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_files_are_served_with_their_types_and_a_strict_policy() {
    let env = TestEnv::start().await;
    let ro = format!("ro:{READER}");
    let bmw = BmwProcess::bridge(&env.url(), &["--api-token", &ro]).await;
    let base = bmw.base_url();

    let redirect = api::get(format!("{base}/ui")).send().await;
    assert_eq!(redirect.status, 308);
    assert_eq!(redirect.header("location"), Some("/ui/"));

    for (path, content_type, needle) in [
        ("/ui/", "text/html", "<script src=\"app.js\""),
        ("/ui/app.js", "text/javascript", "/bmw/events/stream"),
        ("/ui/style.css", "text/css", ":focus-visible"),
    ] {
        // Open without a token: the files hold no data.
        let response = api::get(format!("{base}{path}")).send().await;
        assert_eq!(response.status, 200, "{path}");
        let headers = &response.headers;
        let got = headers["content-type"].to_str().unwrap();
        assert!(got.starts_with(content_type), "{path}: {got}");
        let csp = headers["content-security-policy"].to_str().unwrap();
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert_eq!(headers["x-content-type-options"], "nosniff");
        let body = &response.text;
        assert!(body.contains(needle), "{path} lacks {needle:?}");
        // Nothing from another origin: the page works without internet (the
        // SVG namespace is a name, not a fetch).
        let body = body.replace("http://www.w3.org/2000/svg", "");
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "{path} names another origin"
        );
    }

    // What the page reads stays behind the token.
    let (status, _) = http(Method::GET, &format!("{base}/bmw/worker/"), None).await;
    assert_eq!(status, 401);
    let response = api::get(format!("{base}/bmw/events/stream")).send().await;
    assert_eq!(response.status, 401);
    let envelope = response.envelope();
    assert_eq!(envelope["result"], false);
    assert_eq!(envelope["code"], 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_live_feed_streams_events_after_connecting_filtered_by_kind_and_task() {
    let env = TestEnv::start().await;
    let (ro, rw) = (format!("ro:{READER}"), format!("rw:{WRITER}"));
    let bmw = BmwProcess::run(&env.url(), &["--api-token", &ro, "--api-token", &rw]).await;
    let base = bmw.base_url();
    let worker_id = bmw.worker_id().await;

    // Something published before connecting is not replayed.
    let early = env.create_demo("early").await;
    assert_eventually!(
        Duration::from_secs(10),
        env.bindings().await.get(&early) == Some(&worker_id),
        "the early task never ran on {worker_id}"
    );

    let mut all = SseReader::open(&format!("{base}/bmw/events/stream"), Some(READER)).await;
    all.expect("ready", Duration::from_secs(5), |_| true).await;
    let wanted = env.create_demo("wanted").await;
    let filtered_url = format!("{base}/bmw/events/stream?kind=daemon:demo&task={wanted}");
    let other_kind = format!("{base}/bmw/events/stream?kind=daemon:other");
    let mut filtered = SseReader::open(&filtered_url, Some(READER)).await;
    filtered
        .expect("ready", Duration::from_secs(5), |_| true)
        .await;
    let mut other = SseReader::open(&other_kind, Some(READER)).await;
    other
        .expect("ready", Duration::from_secs(5), |_| true)
        .await;

    // A reload after connecting: every feed of its kind and task sees it.
    let (status, envelope) = call_rw(
        Method::POST,
        &format!("{base}/bmw/task/daemon/reload"),
        &json!({"task_uni_id": wanted}),
    )
    .await;
    assert_eq!(status, 200, "{envelope}");
    let _ = env.create_demo("unwanted").await;

    let started =
        |uni_id: String| move |e: &Value| e["what"] == "started" && e["uni_id"] == uni_id.as_str();
    let event = all
        .expect("task", Duration::from_secs(15), started(wanted.clone()))
        .await;
    assert_eq!(event["kind"], "daemon:demo:demo");
    assert_eq!(event["worker_id"], worker_id.as_str());
    assert!(
        event["uni_id"] != early.as_str(),
        "an event from before connecting was replayed"
    );
    // The spec bucket's watch: a change notice for the created task.
    all.expect("change", Duration::from_secs(10), |c| {
        c["bucket"] == "daemon_tasks" || c["bucket"] == "daemon_claims"
    })
    .await;

    filtered
        .expect("task", Duration::from_secs(15), started(wanted.clone()))
        .await;
    // The filtered feed never shows another task: read what it has a while.
    let deadline = Instant::now() + Duration::from_secs(3);
    while let Some((name, data)) = filtered.next(deadline).await {
        if name == "task" {
            assert_eq!(data["uni_id"], wanted.as_str(), "filter let through {data}");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while let Some((name, data)) = other.next(deadline).await {
        assert_ne!(name, "task", "a feed for another kind got {data}");
    }
    // Workers' heartbeats arrive as change notices naming the worker.
    all.expect("change", Duration::from_secs(10), |c| {
        c["bucket"] == "workers"
            && c["workers"]
                .as_array()
                .is_some_and(|w| w.contains(&json!(worker_id)))
    })
    .await;
}

/// A request with the read-write token; (status, envelope).
async fn call_rw(method: Method, url: &str, body: &Value) -> (u16, Value) {
    api::request(method, url)
        .token(Some(WRITER))
        .json(body)
        .envelope()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_list_is_filtered_and_paged_on_the_server() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    let base = bmw.base_url();
    let worker_id = bmw.worker_id().await;
    let mut uni_ids = Vec::new();
    for i in 0..5 {
        let body = json!({"kind": "daemon:demo:dimension", "payload": {"data_id": 1000 + i}});
        uni_ids.push(env.create_daemon(&body).await);
    }
    let other_queue = env
        .create_daemon(&json!({"kind": "daemon:demo:dimension", "payload": {"data_id": 2000}, "options": {"queue": "nowhere"}}))
        .await;
    uni_ids.sort();
    assert_eventually!(
        Duration::from_secs(15),
        {
            let b = env.bindings().await;
            uni_ids.iter().all(|u| b.get(u) == Some(&worker_id))
        },
        "the five tasks never all ran on {worker_id}"
    );

    let page = |query: String| {
        let url = format!("{base}/bmw/task/?task_type=daemon&{query}");
        async move {
            let response = reqwest::get(&url).await.unwrap();
            let status = response.status().as_u16();
            let total = response
                .headers()
                .get("bmw-total-count")
                .map(|v| v.to_str().unwrap().parse::<usize>().unwrap());
            let envelope: Value = response.json().await.unwrap();
            (status, total, envelope)
        }
    };
    let ids = |envelope: &Value| -> Vec<String> {
        envelope["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["uni_id"].as_str().unwrap().to_owned())
            .collect()
    };

    let (status, total, first) = page("queue=default&limit=2".into()).await;
    assert_eq!((status, total), (200, Some(5)), "{first}");
    assert_eq!(ids(&first), uni_ids[..2]);
    let (_, _, last) = page("queue=default&limit=2&offset=4".into()).await;
    assert_eq!(ids(&last), uni_ids[4..]);
    assert_eq!(last["data"][0]["state"], "running");
    assert_eq!(last["data"][0]["binding"]["worker_id"], worker_id.as_str());

    // Nobody listens on `nowhere`: the task there is unbound.
    let (_, total, unbound) = page("state=unbound".into()).await;
    assert_eq!(total, Some(1));
    assert_eq!(ids(&unbound), [other_queue]);
    let (_, total, _) = page(format!("worker={worker_id}")).await;
    assert_eq!(total, Some(5));
    let (_, total, _) = page("kind=daemon:demo:demo".into()).await;
    assert_eq!(total, Some(0));
    let (_, total, by_dimension) = page("dimension=1003".into()).await;
    assert_eq!(total, Some(1));
    assert_eq!(by_dimension["data"][0]["dimension"], "1003");
    assert_eq!(ids(&by_dimension), [uni_ids_by_data_id(&uni_ids, 1003)]);
    // BMW's listing, unchanged without parameters: every task.
    let (_, total, all) = page(String::new()).await;
    assert_eq!((total, ids(&all).len()), (Some(6), 6));

    for (query, needle) in [
        ("limit=0", "`limit`"),
        ("state=asleep", "`state`"),
        ("offset=x", "`offset`"),
    ] {
        let (status, _, envelope) = page(query.into()).await;
        assert_eq!(status, 400, "{query}: {envelope}");
        assert_eq!(envelope["result"], false);
        assert!(
            envelope["message"].as_str().unwrap().contains(needle),
            "{envelope}"
        );
    }
}

/// The uni_id of the `daemon:demo:dimension` task of `data_id` among `uni_ids`
/// (its dimension, hex-encoded, ends the uni_id).
fn uni_ids_by_data_id(uni_ids: &[String], data_id: u32) -> String {
    let hex: String = data_id
        .to_string()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    uni_ids
        .iter()
        .find(|u| u.ends_with(&format!("-{hex}")))
        .cloned()
        .expect("a task of that data_id")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_live_feed_outlasts_the_request_timeout_and_ends_with_the_process() {
    let env = TestEnv::start().await;
    // Not the harness's fast settings: a long grace, so a stop that waited
    // for the open feed through its drain time (the request timeout) shows.
    let port = crate::harness::free_port();
    let addr = format!("127.0.0.1:{port}");
    let url = env.url();
    let args = [
        "run",
        "--demo-kinds",
        "--http-addr",
        &addr,
        "--nats-url",
        &url,
        "--heartbeat",
        "1s",
        "--claim-ttl",
        "3s",
        "--reply-timeout",
        "5s",
        "--request-timeout",
        "8s",
        "--grace",
        "30s",
    ];
    let mut bmw = BmwProcess::spawn_with_env(&args, &[]);
    let base = format!("http://{addr}");
    assert_eventually!(
        Duration::from_secs(20),
        reqwest::get(format!("{base}/health")).await.is_ok(),
        "bmw run never answered; logs:\n{}",
        bmw.logs().join("\n")
    );
    let worker_id = bmw.worker_id().await;
    let mut feed = SseReader::open(&format!("{base}/bmw/events/stream"), None).await;
    feed.expect("ready", Duration::from_secs(5), |_| true).await;
    let opened = Instant::now();

    // Past --request-timeout the feed still delivers (heartbeats here).
    let past_timeout = opened + Duration::from_secs(9);
    while Instant::now() < past_timeout {
        feed.next(past_timeout).await;
    }
    feed.expect("change", Duration::from_secs(5), |c| {
        c["workers"]
            .as_array()
            .is_some_and(|w| w.contains(&json!(worker_id)))
    })
    .await;

    // A stopping bridge ends the feed at once rather than waiting for it
    // through its drain time (8 s here).
    let stopping = Instant::now();
    bmw.send_sigterm();
    let exited = bmw.wait_exit(Duration::from_secs(20)).await;
    assert!(exited.is_some(), "bmw run still runs 20 s after SIGTERM");
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "bmw run took {took:?} to stop with a live feed open"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while feed.next(deadline).await.is_some() {}
}

#[tokio::test(flavor = "multi_thread")]
async fn the_workers_listing_gives_weights_capacity_quota_activity_and_heartbeat() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(
        &env.url(),
        &["--queues", "default=3,low=1", "--concurrency", "4"],
    )
    .await;
    let base = bmw.base_url();
    for data_id in [1, 2] {
        let body = json!({"kind": "daemon:demo:dimension", "payload": {"data_id": data_id}});
        env.create_daemon(&body).await;
    }
    for _ in 0..2 {
        let body = json!({"kind": "async:demo:sleep", "payload": {"seconds": 30}});
        let (status, envelope) = http(
            Method::POST,
            &format!("{base}/bmw/task/"),
            Some(&body.to_string()),
        )
        .await;
        assert_eq!(status, 200, "{envelope}");
    }
    let worker = async || {
        let (status, envelope) = http(Method::GET, &format!("{base}/bmw/worker/"), None).await;
        assert_eq!(status, 200, "{envelope}");
        envelope["data"][0].clone()
    };
    assert_eventually!(
        Duration::from_secs(15),
        {
            let w = worker().await;
            w["daemon_quota"] == 2 && w["running"] == 2 && w["async_active"] == 2
        },
        "the worker never showed its quota and load: {}",
        worker().await
    );
    let w = worker().await;
    assert_eq!(w["queue_weights"], json!({"default": 3, "low": 1}));
    assert_eq!(w["concurrency"], 4);
    let first_beat = w["heartbeat_at"].as_str().unwrap().to_owned();
    assert!(!first_beat.is_empty());
    assert_eventually!(
        Duration::from_secs(5),
        worker().await["heartbeat_at"].as_str() != Some(first_beat.as_str()),
        "the heartbeat time never moved from {first_beat}"
    );
}
