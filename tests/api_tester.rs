//! The property-based API tester: schemathesis (`scripts/api-tester`,
//! pinned, from PyPI in a venv) drives `bmw run`'s bridge from its own
//! OpenAPI document, with a fixed seed and bounded examples, and must find
//! nothing: no 5xx, every status, header and body as documented, every
//! request the document calls invalid refused. A token is configured, so
//! the tester authenticates as a client would.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::harness::{BmwProcess, TestEnv};

/// Longest the tester may take (it takes about 20 s on 2 cores, plus the
/// venv's first install).
const BOUND: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_nothing_in_the_bridge() {
    let env = TestEnv::start().await;
    let bmw = BmwProcess::run(&env.url(), &["--api-token", "api-tester-token"]).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/api-tester");
    let run = tokio::process::Command::new(&script)
        .args([bmw.base_url().as_str(), "--token", "api-tester-token"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(BOUND, run)
        .await
        .expect("scripts/api-tester finishes within its bound")
        .expect("scripts/api-tester runs (python3 with venv and pip, and PyPI, are needed)");
    // Lines cut short: a failing case may hold a body of a megabyte.
    let cut = |bytes: &[u8]| -> String {
        String::from_utf8_lossy(bytes)
            .lines()
            .map(|l| l.chars().take(400).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let stdout = cut(&out.stdout);
    let stderr = cut(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found something:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("passed"), "{stdout}\n{stderr}");
}
