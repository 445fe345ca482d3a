//! Where and how the bridge's routes are served: plain HTTP or HTTPS
//! (rustls, through axum-server), HTTP/1.1 and HTTP/2 (h2c or over TLS); a
//! bound on how long a client may take to send a request head (so idle
//! half-sent requests cannot hold connections), on the connections open at
//! once and the streams of one HTTP/2 connection, and on how long a
//! connection may sit idle (no byte either way) before it is closed; and a
//! graceful stop when the token fires. What is served is
//! [`super::router`]'s business.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum_server::Handle;
use axum_server::accept::Accept;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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
    /// Most connections open at once; more are closed as they come.
    max_connections: usize,
}

/// Connections per request the bridge serves at once (`--max-concurrent-requests`),
/// with at least [`MIN_CONNECTIONS`]: room for idle keep-alive connections
/// and live feeds, not for a client that opens thousands.
const CONNECTIONS_PER_REQUEST: usize = 4;
/// The least connection limit.
const MIN_CONNECTIONS: usize = 64;
/// Streams one HTTP/2 connection may have open at once (requests beyond
/// the bridge's concurrency are answered 503 anyway).
const MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// The least idle time before a connection is closed: twice the live
/// feed's keep-alive interval, so a feed with no events is not cut.
const MIN_IDLE: Duration = Duration::from_secs(30);

impl ListenOptions {
    /// Plain HTTP with `request_timeout` on request heads.
    pub fn plain(request_timeout: Duration) -> Self {
        ListenOptions {
            tls: None,
            request_timeout,
            drain: request_timeout,
            max_connections: MIN_CONNECTIONS,
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
            max_connections: (config.max_concurrent_requests * CONNECTIONS_PER_REQUEST)
                .max(MIN_CONNECTIONS),
        })
    }

    /// How long a connection may pass no byte either way: longer than a
    /// request may take (its handler may be silent that long).
    fn idle_timeout(&self) -> Duration {
        (self.request_timeout * 2).max(MIN_IDLE)
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
    server
        .http_builder()
        .http2()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
    let guard = ConnectionGuard {
        permits: Arc::new(Semaphore::new(options.max_connections)),
        idle: options.idle_timeout(),
    };
    let service = router.into_make_service();
    let serving = async move {
        match options.tls {
            Some(tls) => {
                server
                    .acceptor(RustlsAcceptor::new(tls).acceptor(guard))
                    .serve(service)
                    .await
            }
            None => server.acceptor(guard).serve(service).await,
        }
    };
    tokio::pin!(serving);
    tokio::select! {
        done = &mut serving => return done,
        () = token.cancelled() => handle.graceful_shutdown(Some(options.drain)),
    }
    serving.await
}

/// Takes a connection only while fewer than the limit are open, and closes
/// one that passes no byte either way for `idle`.
#[derive(Debug, Clone)]
struct ConnectionGuard {
    permits: Arc<Semaphore>,
    idle: Duration,
}

impl<I, S> Accept<I, S> for ConnectionGuard
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    type Stream = Guarded<I>;
    type Service = S;
    type Future = std::future::Ready<std::io::Result<(Guarded<I>, S)>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            tracing::warn!(
                limit = self.permits.available_permits(),
                "connection refused: as many connections are open as the bridge takes"
            );
            return std::future::ready(Err(std::io::Error::other("connection limit reached")));
        };
        let idle = self.idle;
        std::future::ready(Ok((
            Guarded {
                inner: stream,
                _permit: permit,
                idle,
                deadline: Box::pin(tokio::time::sleep(idle)),
            },
            service,
        )))
    }
}

/// A connection holding its place under the limit, with its idle deadline.
#[derive(Debug)]
struct Guarded<I> {
    inner: I,
    _permit: OwnedSemaphorePermit,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<I> Guarded<I> {
    fn active(&mut self) {
        let next = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Guarded<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.active();
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connection idle",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Guarded<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
