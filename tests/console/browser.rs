//! A headless Chromium driven over WebDriver (`chromedriver`, both from
//! Debian's packages, installed by `scripts/browser-env` when missing):
//! started per test on a free loopback port with a fresh profile, killed
//! with its whole process group on drop, so a failed test leaves no
//! browser behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::harness::{free_port, wait_until};

/// How long the page may take to show what a test waits for.
pub(crate) const PAGE_TIMEOUT: Duration = Duration::from_secs(20);

/// Chromium's flags: headless, and none of its own network traffic (this
/// machine's closed network refuses it, which would slow every start).
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1440,900",
];

/// `/usr/bin/chromium` and `/usr/bin/chromedriver`, installed once per run
/// by `scripts/browser-env` when missing.
fn binaries() -> &'static (PathBuf, PathBuf) {
    static PATHS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    PATHS.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/browser-env");
        let out = Command::new(&script)
            .output()
            .expect("scripts/browser-env runs");
        assert!(
            out.status.success(),
            "scripts/browser-env failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines().map(PathBuf::from);
        (lines.next().unwrap(), lines.next().unwrap())
    })
}

/// Where the screenshots go: `target/console-screenshots/`.
pub(crate) fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

/// One browser session.
pub(crate) struct Browser {
    pub(crate) client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub(crate) async fn start() -> Browser {
        let (chromium, chromedriver) = tokio::task::spawn_blocking(|| binaries().clone())
            .await
            .unwrap();
        let port = free_port();
        let mut command = Command::new(&chromedriver);
        command
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let driver = command.spawn().expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        let up = wait_until(Duration::from_secs(20), async || {
            reqwest::get(format!("{url}/status")).await.is_ok()
        })
        .await;
        assert!(up, "chromedriver did not answer on {url}");
        let profile = tempfile::tempdir().expect("profile dir");
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|f| f.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let capabilities = json!({
            "goog:chromeOptions": {"binary": chromium, "args": args},
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&url)
            .await
            .expect("a chromium session");
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    pub(crate) async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigate");
    }

    /// Evaluates `script` (a function body that `return`s) in the page.
    pub(crate) async fn eval(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or(Value::Null)
    }

    /// Waits until `script` returns `true` in the page; panics with `what`
    /// and the page's text otherwise.
    pub(crate) async fn wait_for(&self, what: &str, script: &str) {
        let ok = wait_until(PAGE_TIMEOUT, async || {
            self.eval(script).await == json!(true)
        })
        .await;
        if !ok {
            let text = self.eval("return document.body.innerText").await;
            panic!(
                "the page never showed {what}; it shows:\n{}",
                text.as_str().unwrap_or("")
            );
        }
    }

    /// Clicks the element `css` (found again if the page re-rendered it).
    pub(crate) async fn click(&self, css: &str) {
        let ok = wait_until(PAGE_TIMEOUT, async || {
            match self.client.find(Locator::Css(css)).await {
                Ok(element) => element.click().await.is_ok(),
                Err(_) => false,
            }
        })
        .await;
        assert!(ok, "could not click {css}");
    }

    /// Types `text` into the field `css`.
    pub(crate) async fn type_into(&self, css: &str, text: &str) {
        let field = self.client.find(Locator::Css(css)).await.expect(css);
        field.clear().await.expect("clear");
        field.send_keys(text).await.expect("type");
    }

    /// Saves a screenshot as `target/console-screenshots/<name>.png`.
    pub(crate) async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(screenshot_dir().join(format!("{name}.png")), png).expect("save screenshot");
    }

    /// Ends the session (the browser closes with it).
    pub(crate) async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver and the browser it started share its process group.
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.driver.wait();
    }
}
