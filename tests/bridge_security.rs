//! Who may call the bridge and how much it takes (issue 10): bearer tokens
//! (none, wrong, read-only, read-write; from flags and from a file), open
//! health routes, cross-site browser writes refused while `curl -d` works, no
//! unauthenticated start on a non-loopback address, 503 with `Retry-After`
//! past the concurrency limit, 504 past the request timeout, 413 for an
//! oversized body, and HTTPS with a certificate made here.

use std::time::Duration;

use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{BmwProcess, TestEnv, api, free_port, wait_until};

const READER: &str = "reader-0123456789abcdef";
const WRITER: &str = "writer-0123456789abcdef";
const CREATE: &str = r#"{"kind": "daemon:demo:demo", "payload": {"content": "ok"}}"#;

/// One request with the given token and headers, and no content type unless
/// a header names one; returns (status, headers, envelope).
async fn call(
    method: Method,
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, HeaderMap, Value) {
    let mut request = api::request(method, url).token(token);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    if let Some(body) = body {
        request = request.body(body);
    }
    let answer = request.send().await;
    let envelope = answer.envelope();
    (answer.status, answer.headers, envelope)
}

/// Asserts a refusal with the envelope: status, `code`, `result: false` and
/// a message containing `needle`.
fn assert_refusal(what: &str, got: &(u16, HeaderMap, Value), status: u16, needle: &str) {
    let (got_status, _, envelope) = got;
    assert_eq!(*got_status, status, "{what}: {envelope}");
    assert_eq!(envelope["code"], status, "{what}: {envelope}");
    assert_eq!(envelope["result"], false, "{what}: {envelope}");
    let message = envelope["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "{what}: {message:?} should mention {needle:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_decide_who_may_read_and_who_may_write() {
    let env = TestEnv::start().await;
    let ro = format!("ro:{READER}");
    let rw = format!("rw:{WRITER}");
    let bmw = BmwProcess::run(&env.url(), &["--api-token", &ro, "--api-token", &rw]).await;
    let base = bmw.base_url();
    let task = format!("{base}/bmw/task/");

    // No token, a wrong one, another scheme: 401 with the envelope and the challenge.
    for (what, token, headers) in [
        ("no token", None, vec![]),
        ("wrong token", Some("writer-0123456789abcdeX"), vec![]),
        ("a prefix of a token", Some("writer-0123"), vec![]),
        (
            "basic auth",
            None,
            vec![("Authorization", "Basic d3JpdGVyOng=")],
        ),
    ] {
        for method in [Method::GET, Method::POST] {
            let body = (method == Method::POST).then_some(CREATE);
            let got = call(method.clone(), &task, token, &headers, body).await;
            assert_refusal(&format!("{what}, {method}"), &got, 401, "token");
            let challenge = got
                .1
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned());
            assert!(
                challenge
                    .as_deref()
                    .is_some_and(|c| c.starts_with("Bearer")),
                "{what}: {challenge:?}"
            );
        }
    }
    // Unknown routes do not answer before the token is checked.
    let got = call(Method::GET, &format!("{base}/bmw/nope"), None, &[], None).await;
    assert_refusal("unknown route, no token", &got, 401, "token");

    // A read-only token reads, and cannot write.
    let (status, _, envelope) = call(Method::GET, &task, Some(READER), &[], None).await;
    assert_eq!(status, 200, "{envelope}");
    let (status, _, _) = call(
        Method::GET,
        &format!("{base}/bmw/worker/"),
        Some(READER),
        &[],
        None,
    )
    .await;
    assert_eq!(status, 200);
    let got = call(Method::POST, &task, Some(READER), &[], Some(CREATE)).await;
    assert_refusal("read-only create", &got, 403, "read-only");
    let got = call(
        Method::DELETE,
        &task,
        Some(READER),
        &[],
        Some(r#"{"task_type": "daemon", "task_uni_id": "daemon:demo:demo-00"}"#),
    )
    .await;
    assert_refusal("read-only delete", &got, 403, "read-only");
    assert!(env.bindings().await.is_empty(), "nothing was created");

    // A read-write token writes.
    let (status, _, envelope) = call(Method::POST, &task, Some(WRITER), &[], Some(CREATE)).await;
    assert_eq!(status, 200, "{envelope}");
    assert_eq!(
        envelope["data"]["uni_id"],
        "daemon:demo:demo-7b22636f6e74656e74223a226f6b227d"
    );

    // Liveness, readiness and (by default) metrics stay open.
    for open in ["/health", "/ready", "/metrics", "/bmw/metrics"] {
        let response = reqwest::get(format!("{base}{open}")).await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "{open} without a token");
    }
    // No log line carries a secret.
    let logs = bmw.logs().join("\n");
    assert!(
        !logs.contains(READER) && !logs.contains(WRITER),
        "a token was logged:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_from_a_file_and_metrics_behind_them() {
    let env = TestEnv::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(
        &file,
        format!("# bridge tokens\n\nro {READER}\n  rw   {WRITER}  \n"),
    )
    .unwrap();
    let bmw = BmwProcess::run(
        &env.url(),
        &[
            "--api-token-file",
            file.to_str().unwrap(),
            "--metrics-require-token",
        ],
    )
    .await;
    let base = bmw.base_url();
    let metrics = format!("{base}/metrics");
    let got = call(Method::GET, &format!("{base}/bmw/task/"), None, &[], None).await;
    assert_refusal("no token", &got, 401, "token");
    let got = call(
        Method::POST,
        &format!("{base}/bmw/task/"),
        Some(READER),
        &[],
        Some(CREATE),
    )
    .await;
    assert_refusal("read-only create", &got, 403, "read-only");
    let (status, _, envelope) = call(
        Method::POST,
        &format!("{base}/bmw/task/"),
        Some(WRITER),
        &[],
        Some(CREATE),
    )
    .await;
    assert_eq!(status, 200, "{envelope}");

    let response = reqwest::get(&metrics).await.unwrap();
    assert_eq!(response.status().as_u16(), 401, "/metrics without a token");
    let response = reqwest::get(format!("{base}/bmw/metrics")).await.unwrap();
    assert_eq!(
        response.status().as_u16(),
        401,
        "/bmw/metrics without a token"
    );
    let response = reqwest::Client::new()
        .get(&metrics)
        .bearer_auth(READER)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        200,
        "/metrics with a read-only token"
    );
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("bridge_requests_total")
    );
    let response = reqwest::get(format!("{base}/health")).await.unwrap();
    assert_eq!(response.status().as_u16(), 200, "/health stays open");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cross_site_write_is_refused_while_curl_without_a_content_type_works() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    let base = bmw.base_url();
    let task = format!("{base}/bmw/task/");
    let host = base.trim_start_matches("http://").to_owned();
    let same_origin = format!("http://{host}");
    let form = ("Content-Type", "application/x-www-form-urlencoded");
    for (what, headers) in [
        (
            "foreign Origin",
            vec![("Origin", "http://evil.example"), form],
        ),
        (
            "foreign Origin, same host other port",
            vec![("Origin", "http://127.0.0.1:1")],
        ),
        ("opaque Origin", vec![("Origin", "null")]),
        (
            "Sec-Fetch-Site: cross-site",
            vec![("Sec-Fetch-Site", "cross-site"), form],
        ),
        (
            "Sec-Fetch-Site: same-site",
            vec![("Sec-Fetch-Site", "same-site")],
        ),
    ] {
        let got = call(Method::POST, &task, None, &headers, Some(CREATE)).await;
        assert_refusal(what, &got, 403, "cross-site");
    }
    let got = call(
        Method::DELETE,
        &task,
        None,
        &[("Origin", "http://evil.example")],
        Some(r#"{"task_type": "daemon", "task_uni_id": "daemon:demo:demo-00"}"#),
    )
    .await;
    assert_refusal("cross-site delete", &got, 403, "cross-site");
    assert!(env.bindings().await.is_empty(), "nothing was created");

    // Reads are not state changes.
    let (status, _, _) = call(
        Method::GET,
        &task,
        None,
        &[("Origin", "http://evil.example")],
        None,
    )
    .await;
    assert_eq!(status, 200);
    // A same-origin page may write.
    let (status, _, envelope) = call(
        Method::POST,
        &task,
        None,
        &[("Origin", &same_origin), ("Sec-Fetch-Site", "same-origin")],
        Some(CREATE),
    )
    .await;
    assert_eq!(status, 200, "same origin: {envelope}");
    // `curl -d` with no content type at all, as BMW's clients send it.
    let (status, _, envelope) = call(
        Method::POST,
        &task,
        None,
        &[],
        Some(r#"{"kind": "async:demo:echo", "payload": {"from": "curl"}}"#),
    )
    .await;
    assert_eq!(status, 200, "no content type: {envelope}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_loopback_bind_without_a_token_refuses_to_start() {
    let env = TestEnv::start().await;
    // The check comes before anything binds: no non-loopback port is opened.
    for role in ["run", "bridge"] {
        let addr = format!("0.0.0.0:{}", free_port());
        let mut bmw = BmwProcess::spawn(&env.url(), &[role, "--http-addr", &addr]);
        let status = bmw.wait_exit(Duration::from_secs(20)).await;
        assert!(
            status.is_some_and(|s| !s.success()),
            "{role}: {status:?}\n{}",
            bmw.logs().join("\n")
        );
        let logs = bmw.logs().join("\n");
        for needle in [
            "--insecure-no-auth",
            "--api-token",
            "not a loopback address",
        ] {
            assert!(logs.contains(needle), "{role}: no {needle:?} in\n{logs}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_concurrency_limit_requests_get_503_with_retry_after() {
    let env = TestEnv::start().await;
    // No worker: a daemon create holds its request for the reply timeout.
    let bridge = BmwProcess::bridge(
        &env.url(),
        &["--max-concurrent-requests", "1", "--reply-timeout", "3s"],
    )
    .await;
    let base = bridge.base_url();
    let task = format!("{base}/bmw/task/");
    let held =
        tokio::spawn(async move { call(Method::POST, &task, None, &[], Some(CREATE)).await });
    // The held request is inside its handler once its command is stored (it
    // then waits up to the reply timeout): probe only from then on.
    let mut commands = env.nats.js.get_stream("BMW_TASKS").await.unwrap();
    let in_flight = wait_until(Duration::from_secs(5), async || {
        commands.info().await.is_ok_and(|i| i.state.messages >= 1)
    })
    .await;
    assert!(in_flight, "the held create published its command");
    // A cheap route, so the probe itself holds the one slot for microseconds.
    let probe = format!("{base}/bmw/nope");
    let mut refused = None;
    wait_until(Duration::from_secs(3), async || {
        let got = call(Method::GET, &probe, None, &[], None).await;
        let shed = got.0 == 503;
        refused = shed.then_some(got);
        shed
    })
    .await;
    let refused = refused.expect("a request beyond the limit is refused while one is served");
    assert_refusal("overloaded", &refused, 503, "max-concurrent-requests");
    let retry_after = refused
        .1
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(retry_after.as_deref(), Some("1"));
    // Health stays outside the limit.
    let response = reqwest::get(format!("{base}/health")).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);

    let (status, _, envelope) = held.await.unwrap();
    assert_eq!(status, 202, "the held request was served: {envelope}");
    let (status, _, _) = call(Method::GET, &format!("{base}/bmw/worker/"), None, &[], None).await;
    assert_eq!(status, 200, "the slot is free again");
}

/// Writes `head` (and nothing more) on a fresh connection and reads whatever
/// comes back until the server closes it or `within` passes.
async fn raw_exchange(port: u16, head: &str, within: Duration) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut answer))
        .await
        .ok()
        .map(|_| String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_request_gets_504_and_a_slow_head_is_cut_off() {
    let env = TestEnv::start().await;
    let bridge = BmwProcess::bridge(
        &env.url(),
        &["--reply-timeout", "1s", "--request-timeout", "2s"],
    )
    .await;
    let port = bridge.http_port.unwrap();
    // A body that never finishes.
    let head = "POST /bmw/task/ HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{\"kind\"";
    let answer = raw_exchange(port, head, Duration::from_secs(15))
        .await
        .expect("an answer before the test's own deadline");
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("request-timeout"), "{answer}");
    // A request head that never finishes: the connection is closed.
    let answer = raw_exchange(
        port,
        "GET /bmw/worker/ HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(15),
    )
    .await;
    assert!(answer.is_some(), "the connection was closed");
    assert!(!answer.unwrap().contains("200 OK"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_body_is_413_naming_the_limit() {
    let env = TestEnv::start().await;
    let bridge = BmwProcess::bridge(&env.url(), &["--max-body", "2048"]).await;
    let task = format!("{}/bmw/task/", bridge.base_url());
    let big = format!(
        r#"{{"kind": "daemon:demo:demo", "payload": {{"content": "{}"}}}}"#,
        "x".repeat(4096)
    );
    let got = call(Method::POST, &task, None, &[], Some(&big)).await;
    assert_refusal("Content-Length over the limit", &got, 413, "2048");
    let got = call(
        Method::POST,
        &format!("{}/bmw/task/async/requeue", bridge.base_url()),
        None,
        &[],
        Some(&big),
    )
    .await;
    assert_refusal("requeue over the limit", &got, 413, "2048");
    // Chunked, so the size is only known while reading.
    let chunk = "x".repeat(3000);
    let head = format!(
        "POST /bmw/task/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    let answer = raw_exchange(bridge.http_port.unwrap(), &head, Duration::from_secs(15))
        .await
        .expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("2048"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn https_with_the_given_certificate() {
    let env = TestEnv::start().await;
    let dir = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let args = [
        "run",
        "--http-addr",
        &addr,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let bmw = BmwProcess::spawn(&env.url(), &args);
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(made.cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let base = format!("https://{addr}");
    let up = wait_until(Duration::from_secs(20), async || {
        client.get(format!("{base}/health")).send().await.is_ok()
    })
    .await;
    assert!(up, "https did not come up:\n{}", bmw.logs().join("\n"));
    let response = client
        .post(format!("{base}/bmw/task/"))
        .body(CREATE)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let envelope: Value = response.json().await.unwrap();
    assert_eq!(envelope["result"], true, "{envelope}");
    // Plain HTTP on the same port gets no answer from the bridge.
    let plain = reqwest::get(format!("http://{addr}/health")).await;
    assert!(
        plain.is_err() || plain.unwrap().status() != 200,
        "plain http served"
    );

    // A key that is not one stops the start, naming the files, the cause once.
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a key\n").unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let not_pem = not_pem.to_str().unwrap();
    let args = [
        "bridge",
        "--http-addr",
        &addr,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        not_pem,
    ];
    let mut refused = BmwProcess::spawn(&env.url(), &args);
    let status = refused.wait_exit(Duration::from_secs(20)).await;
    assert!(status.is_some_and(|s| !s.success()), "{status:?}");
    let line = refused
        .wait_log(
            Duration::from_secs(5),
            &["bmw: cannot load the TLS certificate", not_pem],
        )
        .await;
    assert_eq!(line.matches("no keys").count(), 1, "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dns_rebinding_page_is_refused_while_addresses_and_allowed_hosts_work() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(
        &env.url(),
        &["--allowed-hosts", "bmw.example.com,.corp.example"],
    )
    .await;
    let base = bmw.base_url();
    let port = base.rsplit(':').next().unwrap().to_owned();
    let task = format!("{base}/bmw/task/");
    let list = format!("{base}/bmw/task/?task_type=daemon");
    let evil = format!("evil.example:{port}");
    let evil_origin = format!("http://evil.example:{port}");
    // The rebinding page: its own name, now pointing at 127.0.0.1, so its
    // Origin and Host agree and the cross-site rule lets it through.
    let write = [("Host", evil.as_str()), ("Origin", evil_origin.as_str())];
    let got = call(Method::POST, &task, None, &write, Some(CREATE)).await;
    assert_refusal("rebinding write", &got, 403, "--allowed-hosts");
    // Reads too: same-origin for the browser, so the page could read them.
    let read = [("Host", evil.as_str()), ("Sec-Fetch-Site", "same-origin")];
    let got = call(Method::GET, &list, None, &read, None).await;
    assert_refusal("rebinding read", &got, 403, "evil.example");
    let feed = format!("{base}/bmw/events/stream");
    let response = reqwest::Client::new()
        .get(&feed)
        .header("Host", evil.as_str())
        .header("Sec-Fetch-Mode", "cors")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403, "rebinding feed");
    // Nothing was created.
    assert!(crate::harness::list_tasks(&base, "daemon").await.is_empty());

    // A browser naming the bridge by its address, or an allowed name, works;
    // so does any client that is not a browser, whatever its Host.
    let by_address = format!("127.0.0.1:{port}");
    let by_name = format!("bmw.example.com:{port}");
    let by_subdomain = format!("console.corp.example:{port}");
    for host in [by_address.as_str(), by_name.as_str(), by_subdomain.as_str()] {
        let headers = [("Host", host), ("Sec-Fetch-Site", "same-origin")];
        let (status, _, envelope) = call(Method::GET, &list, None, &headers, None).await;
        assert_eq!(status, 200, "{host}: {envelope}");
    }
    let (status, _, envelope) = call(
        Method::POST,
        &task,
        None,
        &[("Host", evil.as_str())],
        Some(CREATE),
    )
    .await;
    assert!(
        status == 200 || status == 202,
        "curl with any Host: {status} {envelope}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn live_feeds_are_limited_per_caller_and_given_back_when_closed() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    let feed = format!("{}/bmw/events/stream", bmw.base_url());
    let client = reqwest::Client::new();
    let mut open = Vec::new();
    for _ in 0..bmw::bridge::feeds::MAX_FEEDS_PER_CALLER {
        let response = client.get(&feed).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        open.push(response);
    }
    let refused = client.get(&feed).send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned()),
        Some("1".to_owned())
    );
    let envelope: Value = refused.json().await.unwrap();
    assert!(
        envelope["message"]
            .as_str()
            .unwrap()
            .contains("too many live feeds"),
        "{envelope}"
    );
    // Ordinary requests are not held back by open feeds.
    let (status, _, _) = call(
        Method::GET,
        &format!("{}/bmw/worker/", bmw.base_url()),
        None,
        &[],
        None,
    )
    .await;
    assert_eq!(status, 200);
    // A closed feed gives its slot back.
    drop(open.pop());
    assert!(
        wait_until(Duration::from_secs(10), async || {
            client
                .get(&feed)
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 200)
        })
        .await,
        "a feed opens again once one is closed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_limit_are_closed_and_an_idle_h2c_connection_is_closed() {
    let env = TestEnv::start().await;
    // One request at a time: 64 connections at most (the floor).
    let bridge = BmwProcess::bridge(
        &env.url(),
        &[
            "--max-concurrent-requests",
            "1",
            "--request-timeout",
            "2s",
            "--reply-timeout",
            "1s",
        ],
    )
    .await;
    let port = bridge.http_port.unwrap();
    let addr = format!("127.0.0.1:{port}");
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut byte = [0u8; 1];
    // Closed as soon as the server accepts it; on a loaded machine that
    // can take seconds, so the deadline is generous (a kept connection
    // would answer nothing and wait it out).
    let closed = tokio::time::timeout(Duration::from_secs(15), extra.read(&mut byte)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the 65th connection was kept: {closed:?}"
    );
    drop(held);
    assert_eventually!(
        Duration::from_secs(10),
        reqwest::get(format!("http://{addr}/health"))
            .await
            .is_ok_and(|r| r.status() == 200),
        "no connection served once the others closed"
    );

    // h2c: one request answered, then nothing: closed once idle (twice the
    // request limit, at least 30 s), not before.
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tcp).await.unwrap();
    let opened = std::time::Instant::now();
    let connection = tokio::spawn(connection);
    let request = axum::http::Request::get(format!("http://{addr}/health"))
        .body(())
        .unwrap();
    let (response, _) = h2.send_request(request, true).unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
    let ended = tokio::time::timeout(Duration::from_secs(45), connection).await;
    assert!(ended.is_ok(), "an idle h2c connection stayed open");
    let after = opened.elapsed();
    assert!(
        after >= Duration::from_secs(25),
        "closed too soon: {after:?}"
    );
}
