//! The HTTP bridge (design.md §6): REST routes under `/bmw/task/` turned into
//! commands, plus `/bmw/queue/`, `/bmw/worker/`, `/metrics`, `/health` and
//! `/ready`. Thin on purpose: a command goes through [`crate::client`], which
//! applies async and periodic ones directly and publishes daemon ones on
//! `bmw.task.*` for a worker; the envelope is in [`envelope`]. A panic while
//! handling a request answers 500 with the envelope.

pub mod envelope;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;

use crate::client::TaskClient;

/// What the routes share.
#[derive(Debug, Clone)]
pub struct BridgeState {
    /// Publishes commands, reads listings (shared: axum clones the state for
    /// every request, and the client holds several stream handles).
    pub client: Arc<TaskClient>,
    /// For readiness.
    pub nats: async_nats::Client,
    /// Largest accepted body.
    pub max_body: usize,
}

/// `/metrics`, `/health` and `/ready`: served by the bridge and by a lone
/// worker on its metrics address.
pub fn ops_router() -> Router {
    Router::new()
        .route("/metrics", get(|| async { crate::metrics::render() }))
        .route(
            "/health",
            get(|| async { envelope::Reply::ok(serde_json::Value::Null) }),
        )
}

/// The bridge's routes.
pub fn router(state: BridgeState) -> Router {
    let tasks = get(routes::list)
        .post(routes::create)
        .delete(routes::delete);
    Router::new()
        .route("/bmw/task/", tasks.clone())
        .route("/bmw/task", tasks)
        .route("/bmw/task/daemon/reload", post(routes::reload))
        .route("/bmw/task/daemon/reload/", post(routes::reload))
        .route("/bmw/task/async/requeue", post(routes::requeue))
        .route("/bmw/task/periodic/pause", post(routes::pause))
        .route("/bmw/task/periodic/resume", post(routes::resume))
        .route("/bmw/queue/", get(routes::queues))
        .route("/bmw/queue", get(routes::queues))
        .route("/bmw/worker/", get(routes::workers))
        .route("/bmw/worker", get(routes::workers))
        .route("/ready", get(routes::ready))
        .fallback(routes::not_found)
        .with_state(state)
        .merge(ops_router())
        .layer(CatchPanicLayer::custom(panicked))
        .layer(middleware::from_fn(record))
}

/// A request whose handling panicked (a bug): 500 with the envelope, instead
/// of a dropped connection.
fn panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = crate::queue::panic_message(panic.as_ref());
    tracing::error!(panic = message, "request handling panicked");
    envelope::Reply::from_outcome(crate::task::Outcome::err(
        500,
        format!("request handling panicked: {message}"),
    ))
    .into_response()
}

async fn record(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "other".into());
    let start = Instant::now();
    let response = next.run(request).await;
    crate::metrics::bridge_request(
        &route,
        response.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    response
}

/// Serves `router` on `addr` until `token` fires.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    token: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_on(listener, router, token).await
}

/// Serves on a bound listener (tests bind port 0 first).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    router: Router,
    token: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "http listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(token.cancelled_owned())
        .await
}
