//! The system under test: nats-server(s), one `bmw bridge`, two `bmw worker`s
//! (the first one behind a [`FaultProxy`] on a single node), an in-process
//! client, and the logs of every worker process that ever ran (a restarted
//! worker keeps its predecessor's logs for the accounting).

use std::sync::Arc;
use std::time::Duration;

use bmw::client::TaskClient;
use bmw::nats::Nats;
use chrono::{DateTime, Utc};
use serde_json::json;

use crate::harness::proxy::FaultProxy;
use crate::harness::{BmwProcess, NatsCluster, NatsServer, wait_until};

/// Workers in every scenario.
pub(crate) const WORKERS: usize = 2;
/// `--concurrency` of each worker.
pub(crate) const CONCURRENCY: usize = 4;
/// Daemon tasks created before the load starts.
pub(crate) const DAEMONS: usize = 6;
/// The heartbeat of `harness::FAST`.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(1);

/// The workers' claim TTL and heartbeat.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Timing {
    /// `harness::FAST`: TTL 3 s, heartbeat 1 s (fail-over within seconds).
    Fast,
    /// bmw's defaults, as an operator runs it: TTL 15 s, heartbeat 5 s.
    Default,
}

/// One node or a cluster.
pub(crate) enum Servers {
    Single(Box<NatsServer>),
    Cluster(NatsCluster),
}

/// What one worker process logged, when it ended (if it did) and when it was
/// frozen (SIGSTOP to SIGCONT: it ran nothing then).
#[derive(Clone, Default)]
pub(crate) struct ProcessLog {
    pub(crate) lines: Vec<String>,
    pub(crate) ended: Option<DateTime<Utc>>,
    pub(crate) frozen: Vec<(DateTime<Utc>, DateTime<Utc>)>,
}

/// One worker slot: the process running now and the ones before it.
pub(crate) struct Worker {
    pub(crate) process: Option<BmwProcess>,
    pub(crate) frozen: Vec<(DateTime<Utc>, DateTime<Utc>)>,
    pub(crate) past: Vec<ProcessLog>,
    /// The URL this slot's workers connect to (the proxy's for slot 0 on a single node).
    pub(crate) url: String,
}

impl Worker {
    /// Moves the current process (stopped or killed by the caller) to `past`.
    pub(crate) fn retire(&mut self) {
        if let Some(process) = self.process.take() {
            self.past.push(ProcessLog {
                lines: process.logs(),
                ended: Some(Utc::now()),
                frozen: std::mem::take(&mut self.frozen),
            });
            drop(process);
        }
    }

    /// Every process of this slot, the current one last (not ended).
    pub(crate) fn logs(&self) -> Vec<ProcessLog> {
        let mut all = self.past.clone();
        if let Some(p) = &self.process {
            all.push(ProcessLog {
                lines: p.logs(),
                ended: None,
                frozen: self.frozen.clone(),
            });
        }
        all
    }
}

pub(crate) struct World {
    pub(crate) servers: Servers,
    pub(crate) proxy: Option<FaultProxy>,
    pub(crate) bridge: BmwProcess,
    /// The NATS URL the bridge connects to.
    bridge_nats: String,
    pub(crate) workers: Vec<Worker>,
    pub(crate) nats: Nats,
    pub(crate) client: Arc<TaskClient>,
    shape: Shape,
}

/// What the worlds differ in besides their servers.
#[derive(Clone, Copy)]
struct Shape {
    /// `--replicas` of the bridge and the workers.
    replicas: &'static str,
    timing: Timing,
}

/// The worker flags of every scenario (on top of `harness::FAST`).
fn worker_args(replicas: &'static str) -> Vec<String> {
    [
        "--concurrency",
        &CONCURRENCY.to_string(),
        "--async-retry-base",
        "1s",
        "--async-ack-wait",
        "5s",
        "--replicas",
        replicas,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

impl World {
    /// A single node, worker 0 behind a proxy.
    pub(crate) async fn single() -> World {
        let server = NatsServer::start().await;
        let url = server.url();
        let proxy = FaultProxy::start(&url).await;
        let nats = Nats::connect(&url, "bmw-chaos").await.expect("connect");
        bmw::nats::provision::provision(&nats.js, &bmw::nats::provision::Settings::new(1))
            .await
            .expect("provision");
        let client = TaskClient::new(
            nats.clone(),
            Arc::new(bmw::builtin::registry()),
            Duration::from_secs(5),
        )
        .await
        .expect("client");
        let urls = [proxy.url(), url.clone()];
        World::assemble(
            Servers::Single(Box::new(server)),
            Some(proxy),
            nats,
            client,
            &url,
            &urls,
            Shape {
                replicas: "1",
                timing: Timing::Fast,
            },
        )
        .await
    }

    /// A 3-node cluster, streams and buckets with 3 replicas, workers with `timing`.
    pub(crate) async fn cluster(timing: Timing) -> World {
        let cluster = NatsCluster::start(3).await;
        let url = cluster.url();
        let (nats, client) = cluster.client().await;
        let urls = [url.clone(), url.clone()];
        World::assemble(
            Servers::Cluster(cluster),
            None,
            nats,
            client,
            &url,
            &urls,
            Shape {
                replicas: "3",
                timing,
            },
        )
        .await
    }

    async fn assemble(
        servers: Servers,
        proxy: Option<FaultProxy>,
        nats: Nats,
        client: TaskClient,
        url: &str,
        worker_urls: &[String; WORKERS],
        shape: Shape,
    ) -> World {
        let bridge = BmwProcess::bridge(url, &["--replicas", shape.replicas]).await;
        let mut world = World {
            servers,
            proxy,
            bridge,
            bridge_nats: url.to_owned(),
            workers: Vec::new(),
            nats,
            client: Arc::new(client),
            shape,
        };
        for worker_url in worker_urls {
            let mut slot = Worker {
                process: None,
                frozen: Vec::new(),
                past: Vec::new(),
                url: worker_url.clone(),
            };
            world.spawn_worker(&mut slot).await;
            world.workers.push(slot);
        }
        world
    }

    /// Starts a worker process in `slot`, once it says it started.
    pub(crate) async fn spawn_worker(&self, slot: &mut Worker) {
        let args = worker_args(self.shape.replicas);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = match self.shape.timing {
            Timing::Fast => BmwProcess::worker(&slot.url, &args),
            Timing::Default => {
                let base = [
                    "worker",
                    "--demo-kinds",
                    "--grace",
                    "2s",
                    "--reply-timeout",
                    "5s",
                ];
                let all: Vec<&str> = base.iter().copied().chain(args).collect();
                BmwProcess::spawn(&slot.url, &all)
            }
        };
        process.worker_id().await;
        slot.process = Some(process);
    }

    /// `kill -9` of the bridge, and (after `outage`) a new one on the same port.
    pub(crate) async fn kill_and_restart_bridge(&mut self, outage: Duration) {
        let port = self.bridge.http_port.expect("the bridge listens");
        self.bridge.kill9();
        tokio::time::sleep(outage).await;
        let replicas = ["--replicas", self.shape.replicas];
        self.bridge = BmwProcess::bridge_on(&self.bridge_nats, port, &replicas).await;
    }

    pub(crate) fn base_url(&self) -> String {
        self.bridge.base_url()
    }

    /// The daemon tasks, a periodic task every second, and a wait until
    /// every daemon task runs.
    pub(crate) async fn seed(&self) {
        for n in 0..DAEMONS {
            // 202 (stored, no worker answered in time) is fine: a fresh
            // cluster can be slow to answer; the wait below checks it runs.
            let body = json!({"kind": "daemon:demo:demo", "payload": {"content": "ok", "n": n}});
            let (status, envelope) = crate::harness::http(
                reqwest::Method::POST,
                &format!("{}/bmw/task/", self.base_url()),
                Some(&body.to_string()),
            )
            .await;
            assert!(matches!(status, 200 | 202), "{body}: {status} {envelope}");
        }
        let periodic = json!({"kind": "periodic:demo:tick", "payload": {"chaos": true},
                              "options": {"every": "1s"}});
        crate::harness::create_ok(&self.base_url(), &periodic).await;
        let bound = wait_until(Duration::from_secs(30), async || {
            self.daemons_bound(DAEMONS).await
        })
        .await;
        assert!(bound, "every daemon task runs before the load starts");
    }

    /// Whether `count` daemon tasks exist and each is held by a live worker.
    pub(crate) async fn daemons_bound(&self, count: usize) -> bool {
        match tokio::time::timeout(Duration::from_secs(5), self.client.list_daemon()).await {
            Ok(Ok(rows)) => rows.len() >= count && rows.iter().all(|r| r.binding.worker_is_normal),
            _ => false,
        }
    }

    /// Every worker process's logs, in slot order.
    pub(crate) fn worker_logs(&self) -> Vec<ProcessLog> {
        self.workers.iter().flat_map(Worker::logs).collect()
    }
}
