//! Async task listings come in pages that follow a cursor: every task is
//! listed once across the pages, filters and offsets apply within them, and
//! a page reads only what it lists (see `src/queue/listing.rs`).

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{BmwProcess, TestEnv, create_ok, http};

/// One page: its task ids and the next cursor.
async fn page(base: &str, query: &str) -> (Vec<String>, Option<String>) {
    let response = reqwest::get(format!("{base}/bmw/task/?task_type=async&{query}"))
        .await
        .expect("list");
    assert_eq!(response.status(), 200, "{query}");
    let next = response
        .headers()
        .get("bmw-next-cursor")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = response.json().await.unwrap();
    let ids = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task_id"].as_str().unwrap().to_owned())
        .collect();
    (ids, next)
}

/// Every id of a listing, following the cursor; also the number of pages.
async fn all_pages(base: &str, query: &str) -> (Vec<String>, usize) {
    let (mut ids, mut pages, mut cursor) = (Vec::new(), 0, None::<String>);
    loop {
        let q = match &cursor {
            Some(c) => format!("{query}&cursor={c}"),
            None => query.to_owned(),
        };
        let (mut more, next) = page(base, &q).await;
        ids.append(&mut more);
        pages += 1;
        assert!(pages < 50, "the cursor moves on");
        match next {
            Some(next) => cursor = Some(next),
            None => return (ids, pages),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn listings_page_with_a_cursor() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &[]).await;
    let base = bmw.base_url();
    let create = async |body: Value| create_ok(&base, &body).await;
    for n in 0..7 {
        create(json!({"kind": "async:demo:fail", "payload": {"skip_retry": true}, "options": {"task_id": format!("a-{n}")}})).await;
    }
    for n in 0..5 {
        create(json!({"kind": "async:demo:echo", "options": {"queue": "held", "task_id": format!("h-{n}")}})).await;
    }
    for n in 0..2 {
        create(json!({"kind": "async:demo:echo", "options": {"queue": "held", "process_in": "1h", "task_id": format!("s-{n}")}})).await;
    }
    assert_eventually!(
        Duration::from_secs(10),
        all_pages(&base, "state=archived").await.0.len() == 7,
        "seven tasks archived"
    );

    let (ids, pages) = all_pages(&base, "limit=3").await;
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no task twice: {ids:?}");
    assert_eq!(ids.len(), 14, "{ids:?}");
    assert!((5..=6).contains(&pages), "{pages} pages of 3 for 14 tasks");

    let (pending, _) = all_pages(&base, "queue=held&state=pending").await;
    assert_eq!(pending, ["h-0", "h-1", "h-2", "h-3", "h-4"]);
    let (scheduled, _) = all_pages(&base, "state=scheduled").await;
    assert_eq!(scheduled, ["s-0", "s-1"]);
    let (echo, _) = all_pages(&base, "kind=async:demo:echo&limit=2").await;
    assert_eq!(echo.len(), 7, "{echo:?}");
    let (window, _) = page(&base, "queue=held&state=pending&offset=2&limit=2").await;
    assert_eq!(window, ["h-2", "h-3"]);

    let (status, out) = http(
        Method::GET,
        &format!("{base}/bmw/task/?task_type=async&cursor=x-1"),
        None,
    )
    .await;
    assert_eq!(status, 400, "{out}");
}
