//! The HTTP bridge (design.md §6): REST routes under `/bmw/task/` turned into
//! commands, plus `/bmw/queue/`, `/bmw/worker/`, `/bmw/log/level`, `/metrics`
//! and `/bmw/metrics`, `/health` and `/ready`, and the OpenAPI document of
//! them all at `/openapi.json` ([`openapi`]). Thin on purpose: a command goes through [`crate::client`], which
//! applies async and periodic ones directly and publishes daemon ones on
//! `bmw.task.*` for a worker; the envelope is in [`envelope`].
//!
//! [`Guards`] decide who may call it and how much it takes: bearer tokens
//! ([`auth`]), the cross-site rule (`cross_site`) and the request limits
//! ([`limits`]) wrap the API routes (`POST /bmw/log/level` among them: it
//! needs a read-write token when tokens are set); `/health` and `/ready` stay
//! open (and `/metrics`, `/bmw/metrics` unless configured). [`listen`] serves it, over TLS if asked.
//! The operator's console (`/ui/`, its live feed `/bmw/events/stream`) is in
//! `console`: its files are open, everything it reads is behind the guards.
//! A panic while handling a request answers 500 with the envelope.

pub mod auth;
mod console;
mod cross_site;
pub mod envelope;
pub mod feeds;
pub mod limits;
pub mod listen;
pub mod openapi;
mod routes;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use tower_http::catch_panic::CatchPanicLayer;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use self::auth::ApiTokens;
pub use self::feeds::FeedSlots;
pub use self::limits::RequestLimits;
pub use self::listen::{ListenOptions, TlsError, serve, serve_on};
use crate::client::TaskClient;
use crate::config::Config;

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
    /// Cancelled when the process stops: ends the responses that would
    /// otherwise last (the console's live feed), so a stop need not wait
    /// for them through its drain time.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The live feeds open, limited on their own ([`feeds`]).
    pub feeds: Arc<FeedSlots>,
}

/// Who may call the bridge and how much it takes at once, from the
/// configuration.
#[derive(Debug, Clone)]
pub struct Guards {
    /// Tokens the API routes need (none: open).
    pub tokens: ApiTokens,
    /// Whether `/metrics` needs a token too.
    pub metrics_require_token: bool,
    /// Concurrency and time limits of the API routes.
    pub limits: RequestLimits,
    /// Host names a browser may reach the bridge by (beside addresses and
    /// `localhost`).
    pub allowed_hosts: Arc<[String]>,
}

impl Guards {
    /// The guards `config` asks for.
    pub fn from_config(config: &Config) -> Self {
        Guards {
            tokens: ApiTokens::new(&config.api_tokens),
            metrics_require_token: config.metrics_require_token,
            limits: RequestLimits {
                max_concurrent: config.max_concurrent_requests,
                timeout: config.request_timeout,
            },
            allowed_hosts: config.allowed_hosts.clone().into(),
        }
    }
}

/// `/metrics`, `/bmw/metrics` (BMW's path) and `/health`: served by the
/// bridge and by a worker on its metrics address; the metrics behind the
/// tokens if the guards say so.
pub fn ops_router(guards: &Guards) -> Router {
    let render = get(|| async { crate::metrics::render() });
    let metrics = Router::new()
        .route("/metrics", render.clone())
        .route("/bmw/metrics", render);
    let metrics = if guards.metrics_require_token {
        metrics.layer(middleware::from_fn_with_state(
            guards.tokens.clone(),
            auth::require_token,
        ))
    } else {
        metrics
    };
    Router::new()
        .route("/health", get(openapi::health))
        .merge(metrics)
}

/// The bridge's routes: the API behind the guards (outermost first: token,
/// cross-site rule, limits), the health routes and the OpenAPI document
/// open. Each API route is registered with its `#[utoipa::path]` (its path
/// and method come from there), so the document lists every one; the
/// aliases without (or with) a trailing slash are not listed.
pub fn router(state: BridgeState, guards: &Guards) -> Router {
    let (api, doc) = OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(routes::list, routes::create, routes::delete))
        .routes(routes!(routes::create_batch))
        .routes(routes!(routes::delete_all))
        .routes(routes!(routes::reload))
        .routes(routes!(routes::requeue))
        .routes(routes!(routes::pause))
        .routes(routes!(routes::resume))
        .routes(routes!(routes::queues))
        .routes(routes!(routes::storage))
        .routes(routes!(routes::workers))
        .routes(routes!(routes::log_level))
        // The operator's console reads the live feed (issue 15).
        .routes(routes!(console::stream::events))
        .split_for_parts();
    let tasks = get(routes::list)
        .post(routes::create)
        .delete(routes::delete);
    let api = api
        .route("/bmw/task", tasks)
        .route("/bmw/task/batch/", post(routes::create_batch))
        .route("/bmw/task/all/", delete(routes::delete_all))
        .route("/bmw/task/daemon/reload/", post(routes::reload))
        .route("/bmw/queue", get(routes::queues))
        .route("/bmw/storage", get(routes::storage))
        .route("/bmw/worker", get(routes::workers))
        .route("/bmw/log/level/", post(routes::log_level))
        .fallback(routes::not_found)
        .with_state(state.clone())
        .layer(middleware::from_fn_with_state(
            state.client.nats().refusals.clone(),
            refused_by_nats,
        ));
    let api = api.layer(middleware::from_fn_with_state(
        Arc::new(ApiGuard {
            allowed_hosts: guards.allowed_hosts.clone(),
            tokens: guards.tokens.clone(),
            limiter: limits::Limiter::new(guards.limits),
        }),
        guard_api,
    ));
    Router::new()
        .route("/ready", get(routes::ready))
        .with_state(state)
        .merge(ops_router(guards))
        .merge(console::router())
        .merge(openapi::route(doc))
        .merge(api)
        .layer(CatchPanicLayer::custom(panicked))
        .layer(middleware::from_fn(record))
}

/// The guards of the API routes, shared by all of them.
#[derive(Debug)]
struct ApiGuard {
    allowed_hosts: Arc<[String]>,
    tokens: ApiTokens,
    limiter: limits::Limiter,
}

/// The API routes' guards, outermost first: the host a browser named (403,
/// DNS rebinding), the token (401, 403), the cross-site rule (403), then the
/// limits (503, 504). One middleware, not
/// three: axum clones a route's whole stack of layers for every request, a
/// box and a state each (about a tenth of the bridge's own instructions per
/// create, under callgrind, with tower's shed, limit and timeout layers).
async fn guard_api(State(guard): State<Arc<ApiGuard>>, request: Request, next: Next) -> Response {
    if let Some(refused) = cross_site::rebinding_refusal(&request, &guard.allowed_hosts)
        .or_else(|| auth::refusal(&guard.tokens, &request))
        .or_else(|| cross_site::refusal(&request))
    {
        return refused;
    }
    guard.limiter.serve(request, next).await
}

/// A request that timed out on NATS (503, 504) because the server refused
/// the bridge's user a publish it needed (nats-server drops it and says so
/// only in an event): 403 with the server's words, instead of a timeout. A
/// read-only console (nats/permissions.conf, CONSOLE) answers writes so.
async fn refused_by_nats(
    State(refusals): State<crate::nats::connect::Refusals>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    let timed_out = matches!(response.status().as_u16(), 503 | 504);
    match refusals.since(started).filter(|_| timed_out) {
        None => response,
        Some(violation) => envelope::Reply::from_outcome(crate::task::Outcome::err(
            403,
            format!(
                "NATS refused this bridge's user what the request needs ({violation}); \
                 its permissions (nats/permissions.conf) do not allow it"
            ),
        ))
        .into_response(),
    }
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

/// Counts and times every request by method and route (`other` for a path
/// no route matched, so unknown paths add no series), and logs it at debug;
/// with traces on, serves it in an `http.request` span that continues the
/// caller's `traceparent`.
async fn record(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "other".into());
    let method = request.method().clone();
    // Probes and scrapes come every few seconds and lead nowhere: no span.
    let span = match route.as_str() {
        "/health" | "/ready" | "/metrics" | "/bmw/metrics" => tracing::Span::none(),
        _ => crate::traces::http_span(method.as_str(), &route, request.headers()),
    };
    let start = Instant::now();
    let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    let seconds = start.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    crate::traces::record_http_status(&span, status);
    crate::metrics::bridge_request(method.as_str(), &route, status, seconds);
    tracing::debug!(method = %method, route, status, seconds, "request served");
    response
}
