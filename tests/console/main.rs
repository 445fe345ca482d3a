//! The console in a real browser (issue 15): headless Chromium from Debian's
//! packages driven over WebDriver against real `bmw` processes and a real
//! nats-server. Each page loads and shows what the fleet does: a daemon task
//! created through the API appears with its worker; a worker killed with
//! `kill -9` is shown going away while its tasks move (the live feed shows
//! `moved`); a dead letter requeued from the page runs again; a schedule is
//! paused from the page with the keyboard; 10,000 daemon tasks are paged and
//! filtered from the page. A screenshot of each page goes to
//! `target/console-screenshots/`.
//!
//! Run with `cargo test --test console` (`scripts/browser-env` installs
//! `chromium` and `chromium-driver` with apt-get when they are missing).

#[macro_use]
#[path = "../harness/mod.rs"]
mod harness;

mod browser;

use std::time::Duration;

use serde_json::{Value, json};

use browser::{Browser, PAGE_TIMEOUT};
use harness::{BmwProcess, TestEnv, wait_until};

const WRITER: &str = "writer-0123456789abcdef";

/// A request to the bridge with `token`; the envelope, asserted to be a success.
async fn call(method: reqwest::Method, url: &str, token: Option<&str>, body: &Value) -> Value {
    let mut request = reqwest::Client::new().request(method, url);
    if !body.is_null() {
        request = request.json(body);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let envelope: Value = response.json().await.expect("envelope");
    assert!(
        (200..300).contains(&status) && envelope["result"] == true,
        "{url}: {status} {envelope}"
    );
    envelope
}

/// A JavaScript expression quoting `text` as a string literal.
fn js(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pages_follow_the_fleet_and_show_a_killed_workers_tasks_moving() {
    let env = TestEnv::start().await;
    let rw = format!("rw:{WRITER}");
    let bridge = BmwProcess::bridge(&env.url(), &["--api-token", &rw]).await;
    let base = bridge.base_url();
    let stayer = BmwProcess::worker(&env.url(), &[]);
    let mut leaver = BmwProcess::worker(&env.url(), &[]);
    let (stayer_id, leaver_id) = (stayer.worker_id().await, leaver.worker_id().await);

    let browser = Browser::start().await;
    browser.goto(&format!("{base}/ui")).await;
    // The page is open; what it reads needs the token.
    browser
        .wait_for(
            "that the feed needs a token",
            "return document.querySelector('#feed-state').textContent.includes('needs a token')",
        )
        .await;
    assert!(
        browser.client.current_url().await.unwrap().path() == "/ui/",
        "/ui redirects to /ui/"
    );
    browser.type_into("#token", WRITER).await;
    browser.click("#token-form button[type=submit]").await;
    browser
        .wait_for(
            "the live feed",
            "return document.querySelector('#feed-state').textContent === 'feed: live'",
        )
        .await;

    // Workers: both, with their queues.
    for id in [&stayer_id, &leaver_id] {
        browser
            .wait_for(
                &format!("worker {id}"),
                &format!(
                    "return !!document.querySelector('#workers-table tr[data-worker-id={}]')",
                    js(id)
                ),
            )
            .await;
    }

    // Daemon tasks created through the API appear with their workers.
    let mut uni_ids = Vec::new();
    for data_id in 1001..1007 {
        let body = json!({"kind": "daemon:demo:dimension", "payload": {"data_id": data_id}});
        let created = call(
            reqwest::Method::POST,
            &format!("{base}/bmw/task/"),
            Some(WRITER),
            &body,
        )
        .await;
        uni_ids.push(created["data"]["uni_id"].as_str().unwrap().to_owned());
    }
    let failing = json!({"kind": "daemon:demo:demo", "payload": {"content": "not_ok"}});
    call(
        reqwest::Method::POST,
        &format!("{base}/bmw/task/"),
        Some(WRITER),
        &failing,
    )
    .await;
    let unbound = json!({"kind": "daemon:demo:dimension", "payload": {"data_id": 9001}, "options": {"queue": "nowhere"}});
    call(
        reqwest::Method::POST,
        &format!("{base}/bmw/task/"),
        Some(WRITER),
        &unbound,
    )
    .await;
    assert_eventually!(
        Duration::from_secs(20),
        {
            let loads = env.loads().await;
            loads.get(&stayer_id).is_some_and(|n| *n > 0)
                && loads.get(&leaver_id).is_some_and(|n| *n > 0)
        },
        "the tasks never spread over both workers: {:?}",
        env.loads().await
    );
    browser.goto(&format!("{base}/ui/#daemon")).await;
    // Each task on the worker that holds it now: the balance may still be
    // handing a task over (its claim released, "" for a moment), so the
    // holder is read again on every look.
    for uni_id in &uni_ids {
        let shown = wait_until(PAGE_TIMEOUT, async || {
            let worker = env.bindings().await.remove(uni_id).unwrap_or_default();
            let on_page = format!(
                "const row = document.querySelector('#daemon-table tr[data-uni-id={}]'); \
                 return !!row && row.querySelector('td.worker').dataset.worker === {}",
                js(uni_id),
                js(&worker)
            );
            !worker.is_empty() && browser.eval(&on_page).await == json!(true)
        })
        .await;
        assert!(
            shown,
            "the page never showed {uni_id} on its holder ({:?}); it shows:\n{}",
            env.bindings().await.get(uni_id),
            browser.eval("return document.body.innerText").await
        );
    }
    browser
        .wait_for(
            "the failing task retrying and the one nobody listens for unbound",
            "return !!document.querySelector('#daemon-table td.state-retrying') \
             && !!document.querySelector('#daemon-table td.state-unbound')",
        )
        .await;
    browser.screenshot("daemon-tasks").await;

    // Kill a worker while the live feed is on screen: its tasks move.
    browser.goto(&format!("{base}/ui/#events")).await;
    browser
        .wait_for(
            "the live feed",
            "return document.querySelector('#feed-state').textContent === 'feed: live'",
        )
        .await;
    leaver.kill9();
    browser
        .wait_for(
            "a `moved` event",
            "return !!document.querySelector('#events-list li[data-what=moved]')",
        )
        .await;
    browser.screenshot("live-events").await;
    let moved = browser
        .eval("return document.querySelector('#events-list li[data-what=moved]').textContent")
        .await;
    let moved = moved.as_str().unwrap();
    assert!(
        moved.contains(&format!("from {leaver_id} to {stayer_id}")),
        "{moved}"
    );

    browser.goto(&format!("{base}/ui/#daemon")).await;
    for uni_id in &uni_ids {
        browser
            .wait_for(
                &format!("{uni_id} moved to {stayer_id}"),
                &format!(
                    "const row = document.querySelector('#daemon-table tr[data-uni-id={}]'); \
                     return !!row && row.querySelector('td.worker').dataset.worker === {}",
                    js(uni_id),
                    js(&stayer_id)
                ),
            )
            .await;
    }

    // The killed worker is shown going away.
    browser.click("#tab-workers").await;
    browser
        .wait_for(
            "the killed worker going away",
            &format!(
                "const row = document.querySelector('#workers-table tr[data-worker-id={}]'); \
                 return !!row && row.classList.contains('gone')",
                js(&leaver_id)
            ),
        )
        .await;
    browser
        .wait_for(
            "the other's heartbeat and its tasks",
            &format!(
                "const row = document.querySelector('#workers-table tr[data-worker-id={}]'); \
                 return !!row && row.querySelector('td.beat').textContent.endsWith('ago') \
                 && row.cells[5].textContent.startsWith('7 / ')",
                js(&stayer_id)
            ),
        )
        .await;
    browser.screenshot("workers").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_is_requeued_from_the_page_and_runs_again() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    let base = bmw.base_url();
    let browser = Browser::start().await;
    browser.goto(&format!("{base}/ui/#queues")).await;
    browser
        .wait_for(
            "the live feed",
            "return document.querySelector('#feed-state').textContent === 'feed: live'",
        )
        .await;

    // Some throughput for the queue's chart, and a task that fails for good.
    let create = async |body: Value| {
        call(
            reqwest::Method::POST,
            &format!("{base}/bmw/task/"),
            None,
            &body,
        )
        .await
    };
    for n in 0..20 {
        create(json!({"kind": "async:demo:echo", "payload": {"n": n}})).await;
    }
    let dead = create(
        json!({"kind": "async:demo:fail", "payload": {"fail_times": 100}, "options": {"retry": 0}}),
    )
    .await;
    let task_id = dead["data"]["task_id"].as_str().unwrap().to_owned();
    browser
        .wait_for(
            "the default queue with throughput in its chart and one dead letter",
            "const row = document.querySelector('#queues-table tr[data-queue=default]'); \
             return !!row && !!row.querySelector('svg rect.processed') && row.cells[5].textContent === '1'",
        )
        .await;
    browser.screenshot("queues").await;

    // The dead letters of the queue, and the requeue button of the one there.
    browser.click("#tab-async").await;
    let state = browser
        .client
        .find(fantoccini::Locator::Css("#async-filter select[name=state]"))
        .await
        .unwrap();
    state.select_by_value("archived").await.unwrap();
    browser
        .type_into("#async-filter input[name=queue]", "default")
        .await;
    browser.click("#async-filter button[type=submit]").await;
    let row = format!("#async-table tr[data-task-id={}]", js(&task_id));
    browser
        .wait_for(
            "the dead letter",
            &format!("const r = document.querySelector('{row}'); return !!r && r.textContent.includes('archived')"),
        )
        .await;
    browser.click(&format!("{row} button.details")).await;
    browser
        .wait_for(
            "the task's errors",
            "return document.querySelector('#async-detail').textContent.includes('failing attempt 1')",
        )
        .await;
    browser.screenshot("async-tasks").await;
    browser.click(&format!("{row} button.requeue")).await;
    browser
        .wait_for(
            "the requeue done",
            "return document.querySelector('#notice').textContent.includes(': done')",
        )
        .await;

    // It ran again: a second failed attempt in the live feed.
    browser.click("#tab-events").await;
    browser
        .wait_for(
            "two failed attempts of the task",
            &format!(
                "return document.querySelectorAll('#events-list li[data-what=failed][data-task={}]').length === 2",
                js(&task_id)
            ),
        )
        .await;

    // Archived again; "requeue every dead letter" of the queue runs it a third time.
    browser.click("#tab-async").await;
    browser
        .wait_for(
            "the dead letter again",
            &format!("const r = document.querySelector('{row}'); return !!r && r.textContent.includes('archived')"),
        )
        .await;
    browser.click("#async-requeue-all").await;
    browser
        .wait_for(
            "every dead letter requeued",
            "return document.querySelector('#notice').textContent === 'Requeued 1 dead letters'",
        )
        .await;
    browser.click("#tab-events").await;
    browser
        .wait_for(
            "three failed attempts of the task",
            &format!(
                "return document.querySelectorAll('#events-list li[data-what=failed][data-task={}]').length === 3",
                js(&task_id)
            ),
        )
        .await;
    assert_eventually!(
        Duration::from_secs(10),
        call(
            reqwest::Method::GET,
            &format!("{base}/bmw/task/?task_type=async&task_id={task_id}"),
            None,
            &Value::Null,
        )
        .await["data"]["state"]
            == "archived",
        "the task never went back to the dead letters"
    );
    let record = call(
        reqwest::Method::GET,
        &format!("{base}/bmw/task/?task_type=async&task_id={task_id}"),
        None,
        &Value::Null,
    )
    .await;
    assert_eq!(record["data"]["state"], "archived", "{record}");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schedule_is_paused_from_the_page_with_the_keyboard() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    let base = bmw.base_url();
    let body =
        json!({"kind": "periodic:demo:tick", "payload": {"n": 1}, "options": {"every": "1s"}});
    call(
        reqwest::Method::POST,
        &format!("{base}/bmw/task/"),
        None,
        &body,
    )
    .await;

    let browser = Browser::start().await;
    browser.goto(&format!("{base}/ui/#periodic")).await;
    let row = "#periodic-table tr[data-kind='periodic:demo:tick']";
    browser
        .wait_for(
            "the schedule running with its runs counted",
            &format!(
                "const r = document.querySelector(\"{row}\"); \
                 return !!r && r.textContent.includes('active') && Number(r.cells[8].textContent) > 0"
            ),
        )
        .await;
    browser.screenshot("periodic").await;

    // Focus the pause button and press Enter.
    let pause = browser
        .client
        .find(fantoccini::Locator::Css(&format!("{row} button.pause")))
        .await
        .unwrap();
    pause
        .send_keys(&fantoccini::key::Key::Enter.to_string())
        .await
        .unwrap();
    browser
        .wait_for(
            "the schedule paused",
            &format!(
                "const r = document.querySelector(\"{row}\"); \
                 return !!r && r.textContent.includes('paused') && !!r.querySelector('button.resume')"
            ),
        )
        .await;
    let listed = call(
        reqwest::Method::GET,
        &format!("{base}/bmw/task/?task_type=periodic"),
        None,
        &Value::Null,
    )
    .await;
    assert_eq!(listed["data"][0]["paused"], true, "{listed}");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_daemon_tasks_are_paged_and_filtered_on_the_page() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &["--max-body", "4194304"]).await;
    let base = bmw.base_url();
    // On a queue no worker takes: stored and listed, never run.
    let items: Vec<Value> = (0..10_000)
        .map(|data_id| {
            json!({"kind": "daemon:demo:dimension", "payload": {"data_id": data_id}, "options": {"queue": "parked"}})
        })
        .collect();
    let created = call(
        reqwest::Method::POST,
        &format!("{base}/bmw/task/batch"),
        None,
        &json!(items),
    )
    .await;
    let refused: Vec<&Value> = created["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["result"] != true)
        .collect();
    assert!(
        refused.is_empty(),
        "refused: {:?}",
        &refused[..refused.len().min(3)]
    );

    let browser = Browser::start().await;
    browser.goto(&format!("{base}/ui/#daemon")).await;
    browser
        .wait_for(
            "the first page of 10,000",
            "return document.querySelector('#daemon-range').textContent === '1–50 of 10000' \
             && document.querySelectorAll('#daemon-table tbody tr[data-uni-id]').length === 50",
        )
        .await;
    browser.click("#daemon-next").await;
    browser
        .wait_for(
            "the second page",
            "return document.querySelector('#daemon-range').textContent === '51–100 of 10000'",
        )
        .await;
    browser
        .type_into("#daemon-filter input[name=dimension]", "9999")
        .await;
    browser.click("#daemon-filter button[type=submit]").await;
    browser
        .wait_for(
            "the one task of dimension 9999",
            "const rows = document.querySelectorAll('#daemon-table tbody tr[data-uni-id]'); \
             return document.querySelector('#daemon-range').textContent === '1–1 of 1' \
             && rows.length === 1 && rows[0].cells[2].textContent === '9999' \
             && rows[0].querySelector('td.state-unbound') !== null",
        )
        .await;
    browser.close().await;
}
