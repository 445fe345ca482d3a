//! The process roles the binary offers, wired from a [`Config`]: `bmw run`
//! (local nats-server if no URL, worker and bridge in one process), `bmw
//! worker` and `bmw bridge`. Each returns when its token fires and everything
//! it started has stopped.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::bridge::{self, BridgeState, Guards, ListenOptions};
use crate::client::TaskClient;
use crate::config::Config;
use crate::nats::local::{LocalServer, LocalServerOptions};
use crate::nats::{ConnectSettings, Nats, names, provision};
use crate::ops::Operations;
use crate::registry::Registry;
use crate::worker::Worker;

/// Why a role stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The local nats-server could not start.
    #[error(transparent)]
    LocalServer(#[from] crate::nats::local::LocalServerError),
    /// Connecting failed.
    #[error(transparent)]
    Connect(#[from] crate::nats::ConnectError),
    /// Provisioning failed.
    #[error(transparent)]
    Provision(#[from] provision::ProvisionError),
    /// The worker failed.
    #[error(transparent)]
    Worker(#[from] crate::worker::WorkerError),
    /// The worker's metrics address could not be bound (taken by another
    /// process, e.g. a second worker on this host).
    #[error(
        "cannot serve metrics on {addr} (--metrics-addr): {source}; each worker on a host needs \
         its own --metrics-addr (or `off`)"
    )]
    MetricsAddr {
        /// The address.
        addr: std::net::SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The HTTP listener failed.
    #[error("http server on {addr}: {source}")]
    Http {
        /// The address.
        addr: std::net::SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The settings do not allow this role to start (an exposed bridge
    /// without a token).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The bridge's certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] bridge::TlsError),
    /// The streams or buckets could not be opened.
    #[error("cannot open the streams and buckets: {0}")]
    Stores(#[from] crate::nats::NatsError),
}

/// `bmw run`: worker + bridge; starts a local nats-server when no URL is set.
pub async fn run_all(
    config: Config,
    registry: Arc<Registry>,
    token: CancellationToken,
) -> Result<(), ServiceError> {
    // Before anything starts: a refused or broken bridge stops the start.
    config.check_bridge_exposure()?;
    let listen = ListenOptions::from_config(&config).await?;
    let mut local = None;
    let url = match &config.nats_url {
        Some(url) => url.clone(),
        None => {
            // The usual port when it is free, so `bmw task` finds the server by default.
            let port = if std::net::TcpListener::bind(("127.0.0.1", 4222)).is_ok() {
                4222
            } else {
                0
            };
            let options = LocalServerOptions {
                store_dir: config.data_dir.join("nats"),
                port,
                extra_args: vec![],
                binary: None,
                sync: Some(config.nats_sync),
            };
            let server = LocalServer::start(options, &config.data_dir).await?;
            tracing::info!(
                url = server.url(),
                store = %config.data_dir.join("nats").display(),
                sync = %config.nats_sync,
                "started a local nats-server; its store is fsynced {}",
                match config.nats_sync {
                    crate::nats::local::StoreSync::Always => "before every acknowledgement: nothing acknowledged is lost on power loss".to_owned(),
                    every => format!("every {every}: a power loss or OS crash loses what was acknowledged since the last sync"),
                }
            );
            let url = server.url().to_owned();
            local = Some(server);
            url
        }
    };
    // One provisioning and one set of stores for the worker and the bridge.
    let settings = config.connect_settings(&url);
    let (nats, ops) = open(&config, &settings, names::client_name::RUN, registry).await?;
    let worker = Worker::with_operations(nats.clone(), config.clone(), ops.clone());
    let worker_token = token.child_token();
    let worker_task = tokio::spawn(worker.run(worker_token.clone()));
    let served = serve_bridge(&config, listen, nats, ops, token.clone()).await;
    token.cancel();
    let worked = worker_task.await.unwrap_or(Ok(()));
    if let Some(mut server) = local {
        server.stop().await;
    }
    served?;
    Ok(worked?)
}

/// `bmw worker`: the worker, plus `/bmw/metrics`, `/metrics` and `/health`
/// on the metrics address (`127.0.0.1:10213` unless told; none when `off`).
/// The address is bound first: a taken port stops the start before anything
/// else happens.
pub async fn run_worker(
    config: Config,
    registry: Arc<Registry>,
    token: CancellationToken,
) -> Result<(), ServiceError> {
    // Before anything is recorded (a program embedding bmw may not have).
    crate::metrics::install();
    let metrics = match config.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServiceError::MetricsAddr { addr, source })?,
        ),
        None => None,
    };
    let settings = config.connect_settings(config.nats_url_or_default());
    let (nats, ops) = open(&config, &settings, names::client_name::WORKER, registry).await?;
    if let Some(listener) = metrics {
        tracing::info!(addr = ?listener.local_addr().ok(), "serving /bmw/metrics and /metrics");
        tokio::spawn(bridge::serve_on(
            listener,
            bridge::ops_router(&Guards::from_config(&config)),
            ListenOptions::plain(config.request_timeout),
            token.clone(),
        ));
    }
    Ok(Worker::with_operations(nats, config, ops)
        .run(token)
        .await?)
}

/// `bmw bridge`: the HTTP bridge alone.
pub async fn run_bridge(
    config: Config,
    registry: Arc<Registry>,
    token: CancellationToken,
) -> Result<(), ServiceError> {
    config.check_bridge_exposure()?;
    let listen = ListenOptions::from_config(&config).await?;
    let settings = config.connect_settings(config.nats_url_or_default());
    let (nats, ops) = open(&config, &settings, names::client_name::BRIDGE, registry).await?;
    serve_bridge(&config, listen, nats, ops, token).await
}

/// `bmw provision`: creates or updates the streams and buckets (the only
/// role that changes an existing stream's settings), then returns.
pub async fn provision(config: &Config) -> Result<(), ServiceError> {
    let settings = config.connect_settings(config.nats_url_or_default());
    let nats = Nats::connect_with(&settings, names::client_name::PROVISION).await?;
    provision::provision(&nats.js, &config.provision_settings()).await?;
    tracing::info!("streams and buckets are provisioned");
    Ok(())
}

/// What every role starts from: connects to NATS as `client_name`, makes
/// sure bmw's streams and buckets are there and usable (creating what is
/// missing, refusing what bmw cannot use), and opens them.
pub async fn open(
    config: &Config,
    connect: &ConnectSettings,
    client_name: &str,
    registry: Arc<Registry>,
) -> Result<(Nats, Operations), ServiceError> {
    let nats = Nats::connect_with(connect, client_name).await?;
    provision::ensure(&nats.js, &config.provision_settings()).await?;
    let ops = Operations::open_with(&nats, registry, config).await?;
    Ok((nats, ops))
}

async fn serve_bridge(
    config: &Config,
    listen: ListenOptions,
    nats: Nats,
    ops: Operations,
    token: CancellationToken,
) -> Result<(), ServiceError> {
    let client = TaskClient::with_operations(nats.clone(), ops, config.reply_timeout);
    let state = BridgeState {
        client: Arc::new(client),
        nats: nats.client.clone(),
        max_body: config.max_body,
        shutdown: token.clone(),
        feeds: Default::default(),
    };
    let guards = Guards::from_config(config);
    let addr = config.http_addr;
    if guards.tokens.is_empty() && !addr.ip().is_loopback() {
        tracing::warn!(addr = %addr, "the bridge asks for no token on a non-loopback address (--insecure-no-auth)");
    }
    tracing::info!(
        tokens = config.api_tokens.len(),
        metrics_require_token = guards.metrics_require_token,
        max_concurrent_requests = guards.limits.max_concurrent,
        request_timeout = %humantime::format_duration(guards.limits.timeout),
        "bridge guards"
    );
    bridge::serve(addr, bridge::router(state, &guards), listen, token)
        .await
        .map_err(|source| ServiceError::Http { addr, source })
}
