//! `POST /bmw/task/batch`: an array of create bodies answered with one result
//! per item, in order. Valid items are created even when others are refused;
//! the request as a whole is refused (400, 413) only when it is not an array,
//! is empty, has too many items or is over `--max-body`. A retried request
//! with the same task ids creates nothing twice.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{BmwProcess, TestEnv, http, list_tasks};

/// Posts `body` to the batch route; returns (status, envelope).
async fn post_batch(base_url: &str, body: &str) -> (u16, Value) {
    http(
        Method::POST,
        &format!("{base_url}/bmw/task/batch"),
        Some(body),
    )
    .await
}

/// How many async tasks wait in queue `queue` (a queue no worker listens
/// on), counted from the stream.
async fn pending(env: &TestEnv, queue: &str) -> u64 {
    use futures::TryStreamExt;
    let stream = env
        .nats
        .js
        .get_stream(bmw::nats::names::STREAM_ASYNC)
        .await
        .expect("stream");
    let filter = bmw::nats::names::async_subject(queue, ">");
    let subjects: Vec<(String, usize)> = stream
        .info_with_subjects(filter)
        .await
        .expect("subjects")
        .try_collect()
        .await
        .expect("subjects");
    subjects.iter().map(|(_, n)| *n as u64).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_answers_each_item_and_creates_the_valid_ones() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    let base = bmw.base_url();
    let items = json!([
        {"kind": "daemon:demo:demo", "payload": {"content": "ok"}},
        {"kind": "daemon:nope:nope", "payload": {}},
        {"kind": "async:demo:echo", "payload": {"n": 1}, "options": {"queue": "held", "task_id": "b-1"}},
        "not an object",
        {"kind": "async:demo:echo", "options": {"queue": "held", "retry": "often"}},
        {"payload": {"no": "kind"}},
        {"kind": "async:demo:echo", "payload": {"n": 2}, "options": {"queue": "held", "task_id": "b-2"}},
    ]);
    let (status, out) = post_batch(&base, &items.to_string()).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["result"], true, "{out}");
    assert_eq!(out["code"], 0, "{out}");
    let results = out["data"].as_array().expect("one result per item");
    assert_eq!(results.len(), 7, "{out}");
    let ok = |i: usize| {
        assert_eq!(results[i]["result"], true, "item {i}: {}", results[i]);
        results[i]["data"].clone()
    };
    let refused = |i: usize, needle: &str| {
        assert_eq!(results[i]["result"], false, "item {i}: {}", results[i]);
        assert_eq!(results[i]["code"], 400, "item {i}: {}", results[i]);
        let message = results[i]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "item {i}: {}", results[i]);
    };
    let uni_id = ok(0)["uni_id"].as_str().unwrap().to_owned();
    refused(1, "kind");
    assert_eq!(ok(2)["task_id"], "b-1");
    refused(3, "body");
    refused(4, "retry");
    refused(5, "kind");
    assert_eq!(ok(6)["task_id"], "b-2");

    let daemons = list_tasks(&base, "daemon").await;
    assert_eq!(daemons.len(), 1, "{daemons:?}");
    assert_eq!(daemons[0]["uni_id"], uni_id.as_str());
    assert_eq!(pending(&env, "held").await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_batch_creates_each_task_once() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    let base = bmw.base_url();
    let mut items: Vec<Value> = (0..50)
        .map(|n| json!({"kind": "async:demo:echo", "payload": {"n": n}, "options": {"queue": "held", "task_id": format!("retried-{n}")}}))
        .collect();
    items.push(json!({"kind": "daemon:demo:demo", "payload": {"content": "ok"}}));
    let body = Value::Array(items).to_string();
    let (status, first) = post_batch(&base, &body).await;
    assert_eq!(status, 200, "{first}");
    assert!(
        first["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["result"] == true),
        "{first}"
    );
    // The client did not see the answer and sends the same request again.
    let (status, second) = post_batch(&base, &body).await;
    assert_eq!(status, 200, "{second}");
    let second = second["data"].as_array().unwrap();
    for (n, item) in second[..50].iter().enumerate() {
        assert_eq!(item["code"], 409, "item {n}: {item}");
        assert_eq!(item["data"]["task_id"], format!("retried-{n}"), "{item}");
    }
    // The daemon task exists already with that payload: changed nothing.
    assert_eq!(second[50]["result"], true, "{}", second[50]);
    assert_eq!(second[50]["data"]["created"], false, "{}", second[50]);
    assert_eq!(second[50]["data"]["replaced"], false, "{}", second[50]);
    assert_eq!(pending(&env, "held").await, 50);
    assert_eq!(list_tasks(&base, "daemon").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_that_is_not_a_list_of_items_is_refused_whole() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &["--max-body", "2000"]).await;
    let base = bmw.base_url();
    for (body, status, needle) in [
        ("[]".to_owned(), 400, "empty"),
        (json!({"kind": "async:demo:echo"}).to_string(), 400, "array"),
        ("[{".to_owned(), 400, "body"),
        (
            Value::Array(vec![
                json!({"kind": "async:demo:echo", "options": {"queue": "held"}});
                40
            ])
            .to_string(),
            413,
            "--max-body",
        ),
    ] {
        let (got, out) = post_batch(&base, &body).await;
        assert_eq!(got, status, "{body:.80}: {out}");
        assert_eq!(out["result"], false, "{out}");
        assert_eq!(out["code"], status, "{out}");
        let message = out["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{out}");
    }
    assert_eq!(pending(&env, "held").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_ten_thousand_items_is_created() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(
        &env.url(),
        &["--max-body", "4000000", "--request-timeout", "300s"],
    )
    .await;
    let base = bmw.base_url();
    let items: Vec<Value> = (0..10_000)
        .map(|n| json!({"kind": "async:demo:echo", "payload": {"n": n}, "options": {"queue": "held"}}))
        .collect();
    let (status, out) = post_batch(&base, &Value::Array(items.clone()).to_string()).await;
    assert_eq!(status, 200, "{out:.300}");
    let results = out["data"].as_array().unwrap();
    assert_eq!(results.len(), 10_000);
    let refused: Vec<&Value> = results.iter().filter(|r| r["result"] != true).collect();
    assert!(refused.is_empty(), "{:?}", &refused[..refused.len().min(3)]);
    assert_eq!(pending(&env, "held").await, 10_000);

    // One item more than the limit is refused whole, naming it.
    let mut too_many = items;
    too_many.push(json!({"kind": "async:demo:echo", "options": {"queue": "held"}}));
    let (status, out) = post_batch(&base, &Value::Array(too_many).to_string()).await;
    assert_eq!(status, 400, "{out:.300}");
    assert!(
        out["message"]
            .as_str()
            .unwrap_or_default()
            .contains("10000"),
        "{out}"
    );
    assert_eq!(pending(&env, "held").await, 10_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn creates_of_one_daemon_task_in_a_batch_apply_in_item_order() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    let base = bmw.base_url();
    // The same task 30 times, each with another `retry`, between other tasks:
    // the last one in the array is what stays.
    let items: Vec<Value> = (0..30)
        .flat_map(|n| {
            [
                json!({"kind": "daemon:demo:demo", "payload": {"content": "ok"}, "options": {"retry": n}}),
                json!({"kind": "daemon:demo:demo", "payload": {"content": format!("other-{n}")}}),
            ]
        })
        .collect();
    let (status, out) = post_batch(&base, &Value::Array(items).to_string()).await;
    assert_eq!(status, 200, "{out:.300}");
    assert!(
        out["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["result"] == true),
        "{out}"
    );
    let daemons = list_tasks(&base, "daemon").await;
    assert_eq!(daemons.len(), 31, "{daemons:?}");
    let task = daemons
        .iter()
        .find(|t| t["payload"]["content"] == "ok")
        .expect("the repeated task");
    assert_eq!(task["options"]["retry"], 29, "{task}");
}

/// Runs `bmw task batch` against `env` with `stdin`; returns the exit code
/// and the outcome lines it printed.
async fn task_batch(env: &TestEnv, stdin: &str) -> (Option<i32>, Vec<Value>) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bmw"))
        .args(["task", "batch", "--nats-url", &env.url()])
        .env("BMW_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("bmw starts");
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_owned();
    let writer = tokio::spawn(async move {
        input
            .write_all(stdin.as_bytes())
            .await
            .expect("write stdin");
    });
    let output = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        child.wait_with_output(),
    )
    .await
    .expect("bmw task batch ends")
    .expect("bmw task batch runs");
    writer.await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not an outcome: {l}")))
        .collect();
    (output.status.code(), lines)
}

#[tokio::test(flavor = "multi_thread")]
async fn bmw_task_batch_creates_json_lines_from_stdin() {
    let env = TestEnv::start().await;
    let mut stdin = String::from("{not json\n\n");
    stdin.push_str(&json!({"kind": "async:nope"}).to_string());
    stdin.push('\n');
    for n in 0..2_500 {
        let item = json!({"kind": "async:demo:echo", "payload": {"n": n}, "options": {"queue": "held", "task_id": format!("line-{n}")}});
        stdin.push_str(&item.to_string());
        stdin.push('\n');
    }
    let (code, outcomes) = task_batch(&env, &stdin).await;
    assert_eq!(
        outcomes.len(),
        2_502,
        "one outcome per item, the blank line skipped"
    );
    assert_eq!(code, Some(1), "two lines were refused");
    assert_eq!(outcomes[0]["code"], 400, "{}", outcomes[0]);
    assert!(
        outcomes[0]["message"]
            .as_str()
            .unwrap()
            .contains("line 1 is not JSON"),
        "{}",
        outcomes[0]
    );
    assert_eq!(outcomes[1]["code"], 400, "{}", outcomes[1]);
    for (n, outcome) in outcomes[2..].iter().enumerate() {
        assert_eq!(outcome["result"], true, "line {n}: {outcome}");
        assert_eq!(outcome["data"]["task_id"], format!("line-{n}"), "{outcome}");
    }
    assert_eq!(pending(&env, "held").await, 2_500);

    // Sent again: each answered as a duplicate, nothing stored twice.
    let (code, outcomes) = task_batch(&env, &stdin).await;
    assert_eq!(code, Some(1));
    assert!(
        outcomes[2..].iter().all(|o| o["code"] == 409),
        "{:?}",
        &outcomes[2..4]
    );
    assert_eq!(pending(&env, "held").await, 2_500);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_reads_the_depth_of_its_queue_once() {
    use futures::StreamExt;
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    // Each reading of a queue's depth for `--max-queue-pending` asks for its
    // consumer's info first (and, for a queue no worker consumes, counts its
    // messages). Count the readings of `held` as the server sees them.
    let info = format!(
        "$JS.API.CONSUMER.INFO.{}.{}",
        bmw::nats::names::STREAM_ASYNC,
        bmw::nats::names::async_consumer("held")
    );
    let mut readings = env.nats.client.subscribe(info).await.expect("subscribe");
    env.nats.client.flush().await.expect("flush");
    let items: Vec<Value> = (0..300)
        .map(|n| json!({"kind": "async:demo:echo", "payload": {"n": n}, "options": {"queue": "held"}}))
        .collect();
    let (status, out) = post_batch(&bmw.base_url(), &Value::Array(items).to_string()).await;
    assert_eq!(status, 200, "{out:.300}");
    assert_eq!(pending(&env, "held").await, 300);
    let mut count = 0;
    while let Ok(Some(_)) =
        tokio::time::timeout(std::time::Duration::from_millis(200), readings.next()).await
    {
        count += 1;
    }
    // Once, or again if the batch outlived the reading's freshness (1 s);
    // not once per item in flight.
    assert!(
        (1..=4).contains(&count),
        "{count} readings of the queue's depth"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_task_id_twice_in_a_batch_is_created_once() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    // Stored together (their publishes in flight at once), the second
    // publish of the id is the server's duplicate: refused, not stored.
    let items: Vec<Value> = (0..200)
        .map(|n| json!({"kind": "async:demo:echo", "payload": {"n": n}, "options": {"queue": "held", "task_id": format!("twice-{}", n / 2)}}))
        .collect();
    let (status, out) = post_batch(&bmw.base_url(), &Value::Array(items).to_string()).await;
    assert_eq!(status, 200, "{out:.300}");
    let results = out["data"].as_array().unwrap();
    for pair in results.chunks(2) {
        let codes: Vec<&Value> = pair.iter().map(|r| &r["code"]).collect();
        assert!(
            codes == [&json!(0), &json!(409)] || codes == [&json!(409), &json!(0)],
            "{pair:?}"
        );
        assert_eq!(
            pair[0]["data"]["task_id"], pair[1]["data"]["task_id"],
            "{pair:?}"
        );
    }
    assert_eq!(pending(&env, "held").await, 100);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_no_worker_answers_in_time_is_answered_within_its_limit_unfinished_items_marked() {
    let env = TestEnv::start().await;
    // No worker: each daemon create waits for an answer up to the reply
    // timeout; 400 of them, 64 at a time, take far longer than the limit.
    let bridge = BmwProcess::bridge(
        &env.url(),
        &["--request-timeout", "4s", "--reply-timeout", "2s"],
    )
    .await;
    let base = bridge.base_url();
    let items: Vec<Value> = (0..400)
        .map(|n| json!({"kind": "daemon:demo:demo", "payload": {"content": "ok", "n": n}}))
        .collect();
    let body = serde_json::to_string(&items).unwrap();
    let started = std::time::Instant::now();
    let (status, out) = post_batch(&base, &body).await;
    assert_eq!(status, 200, "{out}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let outcomes = out["data"].as_array().unwrap();
    assert_eq!(outcomes.len(), 400);
    let stored = outcomes.iter().filter(|o| o["code"] == 202).count();
    let unfinished: Vec<usize> = (0..400)
        .filter(|&n| outcomes[n]["code"] == bmw::client::UNFINISHED_CODE)
        .collect();
    assert!(
        stored > 0 && !unfinished.is_empty(),
        "{stored} stored; {out}"
    );
    assert_eq!(stored + unfinished.len(), 400, "{out}");
    for &n in &unfinished {
        let o = &outcomes[n];
        assert!(
            o["data"]["submitted"] == false || o["data"]["submitted"] == "unknown",
            "{o}"
        );
        assert!(
            o["message"].as_str().unwrap().contains("send it again"),
            "{o}"
        );
    }
    // Sending the unfinished ones again is safe: once a worker runs, every
    // task is there once.
    let again: Vec<Value> = unfinished.iter().map(|&n| items[n].clone()).collect();
    for chunk in again.chunks(100) {
        let (status, out) = post_batch(&base, &serde_json::to_string(chunk).unwrap()).await;
        assert_eq!(status, 200, "{out}");
        assert!(
            out["data"]
                .as_array()
                .unwrap()
                .iter()
                .all(|o| o["code"] == 202),
            "{out}"
        );
    }
    let _worker = BmwProcess::worker(&env.url(), &[]);
    assert_eventually!(
        std::time::Duration::from_secs(60),
        list_tasks(&base, "daemon").await.len() == 400,
        "not every daemon task is there"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_duplicate_command_is_answered_as_a_duplicate_with_its_task() {
    let env = TestEnv::start().await;
    let bridge = BmwProcess::bridge(&env.url(), &["--reply-timeout", "1s"]).await;
    let url = format!("{}/bmw/task/", bridge.base_url());
    let body = json!({"id": "cmd-once", "kind": "daemon:demo:demo", "payload": {"content": "ok"}});
    let (status, first) = http(Method::POST, &url, Some(&body.to_string())).await;
    assert_eq!(status, 202, "{first}");
    assert!(first["data"]["duplicate"].is_null(), "{first}");
    let (status, second) = http(Method::POST, &url, Some(&body.to_string())).await;
    assert_eq!(status, 202, "{second}");
    assert_eq!(second["data"]["duplicate"], true, "{second}");
    assert_eq!(
        second["data"]["uni_id"], first["data"]["uni_id"],
        "{second}"
    );
    assert!(
        second["message"].as_str().unwrap().starts_with("duplicate"),
        "{second}"
    );
}
