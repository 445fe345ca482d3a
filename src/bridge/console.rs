//! The operator's console (issue 15): one page at `/ui/` (`/ui` redirects)
//! made of three files compiled into the binary (`console/index.html`,
//! `console/app.js`, `console/style.css`; no build step, nothing fetched
//! from elsewhere), served with a strict Content-Security-Policy, and what
//! the page reads that the REST API did not have: the live feed
//! `GET /bmw/events/stream` ([`stream`]) and the filtered, paged daemon list
//! ([`daemon_list`], behind `GET /bmw/task/?task_type=daemon`).
//!
//! The three files hold no data and are the same for everyone, so they are
//! served without a token (a browser cannot send one when it opens a URL);
//! every request the page makes goes to the guarded API with the token the
//! operator typed into it (`Authorization: Bearer`, kept in the tab's
//! `sessionStorage`), so the console can do exactly what its token can.

pub(crate) mod daemon_list;
pub(crate) mod stream;

use axum::Router;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

/// The page.
const INDEX_HTML: &str = include_str!("console/index.html");
/// Its script: plain JavaScript, no framework.
const APP_JS: &str = include_str!("console/app.js");
/// Its style sheet.
const STYLE_CSS: &str = include_str!("console/style.css");

/// Only the page's own files, and requests to this bridge: no inline script
/// or style, no other origin, no framing, no forms posted elsewhere.
pub(crate) const CONTENT_SECURITY_POLICY_VALUE: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The console's routes: `/ui` (redirect), `/ui/`, `/ui/app.js`, `/ui/style.css`.
pub(crate) fn router() -> Router {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route(
            "/ui/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/index.html",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
}

/// One of the files with its content type and the security headers.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (CONTENT_TYPE, content_type),
            (CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY_VALUE),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (X_FRAME_OPTIONS, "DENY"),
            (REFERRER_POLICY, "no-referrer"),
            (CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
