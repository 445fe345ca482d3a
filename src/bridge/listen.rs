//! Where and how the bridge's routes are served: plain HTTP or HTTPS
//! (rustls, through axum-server), a bound on how long a client may take to
//! send a request head (so idle half-sent requests cannot hold connections),
//! and a graceful stop when the token fires. What is served is
//! [`super::router`]'s business.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum_server::Handle;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, TlsFiles};

/// The certificate or key could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("cannot load the TLS certificate {} and key {}", .files.cert.display(), .files.key.display())]
pub struct TlsError {
    /// The files given.
    pub files: TlsFiles,
    /// What went wrong (unreadable, not PEM, key does not match...).
    pub source: std::io::Error,
}

/// How a listener serves: TLS or not, and its timeouts.
#[derive(Debug, Clone)]
pub struct ListenOptions {
    /// The server's certificate and key; `None` serves plain HTTP.
    tls: Option<RustlsConfig>,
    /// Longest a client may take to send a request head.
    request_timeout: Duration,
    /// The grace requests in flight get when the server stops.
    drain: Duration,
}

impl ListenOptions {
    /// Plain HTTP with `request_timeout` on request heads.
    pub fn plain(request_timeout: Duration) -> Self {
        ListenOptions {
            tls: None,
            request_timeout,
            drain: request_timeout,
        }
    }

    /// The bridge's options: HTTPS when the configuration names a certificate
    /// and key, which are loaded now so a bad file stops the start.
    ///
    /// # Errors
    ///
    /// [`TlsError`] when a file cannot be read or is not a usable PEM
    /// certificate chain and private key.
    pub async fn from_config(config: &Config) -> Result<Self, TlsError> {
        let tls = match &config.tls {
            None => None,
            Some(files) => Some(
                RustlsConfig::from_pem_file(&files.cert, &files.key)
                    .await
                    .map_err(|source| TlsError {
                        files: files.clone(),
                        source,
                    })?,
            ),
        };
        Ok(ListenOptions {
            tls,
            request_timeout: config.request_timeout,
            // A stop takes `--grace` (plus a few seconds), even when requests
            // wait on an unreachable NATS.
            drain: config.request_timeout.min(config.grace),
        })
    }

    /// `https` or `http`, for logs.
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

/// Serves `router` on `addr` until `token` fires.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    options: ListenOptions,
    token: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_on(listener, router, options, token).await
}

/// Serves on a bound listener (tests bind port 0 first) until `token` fires,
/// then lets requests in flight finish for up to the request timeout.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    router: Router,
    options: ListenOptions,
    token: CancellationToken,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(addr = %addr, scheme = options.scheme(), "http listening");
    let handle: Handle<SocketAddr> = Handle::new();
    let mut server = axum_server::Server::<SocketAddr>::from_listener(listener)
        .handle(handle.clone())
        .first_request_timeout(options.request_timeout);
    server
        .http_builder()
        .http1()
        .header_read_timeout(options.request_timeout);
    let service = router.into_make_service();
    let serving = async move {
        match options.tls {
            Some(tls) => {
                server
                    .acceptor(RustlsAcceptor::new(tls))
                    .serve(service)
                    .await
            }
            None => server.serve(service).await,
        }
    };
    tokio::pin!(serving);
    tokio::select! {
        done = &mut serving => return done,
        () = token.cancelled() => handle.graceful_shutdown(Some(options.drain)),
    }
    serving.await
}
