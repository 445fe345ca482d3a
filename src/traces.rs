//! Traces: OpenTelemetry spans exported over OTLP/HTTP (protobuf) when
//! `--otlp-endpoint` is set, and the W3C `traceparent` that links them
//! across NATS messages.
//!
//! [`exporter_layer`] builds the `tracing` layer that turns bmw's spans into
//! OpenTelemetry spans and the [`TraceExport`] that flushes them on shutdown;
//! the binary hands the layer to [`crate::logging::init`]. Off by default:
//! without it [`enabled`] is false, the span helpers return
//! [`tracing::Span::none`] and nothing is read from or written to a header,
//! so the hot path pays one atomic load.
//!
//! Propagation: [`inject`] writes a span's context into a NATS message's
//! headers (every publish that carries a task), [`set_parent`] continues
//! the trace a message's headers (or an HTTP request's, [`set_parent_http`])
//! carry, and [`carry`] copies a message's trace headers unchanged into the
//! message that re-publishes it (a scheduled retry), tracing on or off.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use axum::http;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::Registry;
use tracing_subscriber::filter::Targets;

/// The `service.name` of every exported span; the process's role is the
/// `bmw.role` resource attribute.
pub const SERVICE_NAME: &str = "bmw";

/// The path of the OTLP/HTTP traces endpoint, appended to a base URL.
const TRACES_PATH: &str = "/v1/traces";

/// How long one export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether this process exports traces (set once by [`exporter_layer`]).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Why traces could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TracesError {
    /// The endpoint is not a plain `http://` URL.
    #[error(
        "--otlp-endpoint {given:?} is not an http:// URL (OTLP over HTTP; for https, run a \
         collector next to bmw)"
    )]
    Endpoint {
        /// What was given.
        given: String,
    },
    /// The exporter could not be built.
    #[error("the OTLP exporter could not be built: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// Whether spans are exported: the span helpers and propagation do nothing
/// when not.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The URL spans are posted to: `endpoint` if it names the traces path
/// already, else `endpoint` + `/v1/traces` (as `OTEL_EXPORTER_OTLP_ENDPOINT`
/// is read). Only `http://`: bmw's exporter carries no TLS stack.
pub fn traces_url(endpoint: &str) -> Result<String, TracesError> {
    let endpoint = endpoint.trim();
    let refused = || TracesError::Endpoint {
        given: endpoint.to_owned(),
    };
    let rest = endpoint.strip_prefix("http://").ok_or_else(refused)?;
    if rest.is_empty() || rest.starts_with('/') || endpoint.parse::<http::Uri>().is_err() {
        return Err(refused());
    }
    let base = endpoint.trim_end_matches('/');
    Ok(if base.ends_with(TRACES_PATH) {
        base.to_owned()
    } else {
        format!("{base}{TRACES_PATH}")
    })
}

/// The layer [`exporter_layer`] builds, on the subscriber's registry.
pub type ExporterLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// What exports spans: flush it with [`TraceExport::shutdown`] when the
/// process stops.
#[derive(Debug)]
pub struct TraceExport {
    provider: SdkTracerProvider,
}

impl TraceExport {
    /// Exports the spans still buffered and stops the exporter (on a
    /// blocking thread: the SDK waits for its export task).
    pub async fn shutdown(self) {
        let provider = self.provider;
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!(cause = %e, "traces not flushed on shutdown");
        }
    }
}

/// The layer exporting bmw's spans (and the events logged inside them) to
/// `endpoint` over OTLP/HTTP, tagged with `role`; from then on [`enabled`]
/// is true. Must run inside the Tokio runtime (the batch exporter is a task
/// of it).
pub fn exporter_layer(
    endpoint: &str,
    role: &str,
) -> Result<(ExporterLayer, TraceExport), TracesError> {
    let url = traces_url(endpoint)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    let exporter = ReportingExporter {
        inner: exporter,
        url,
        failing: AtomicBool::new(false),
    };
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_service_name(SERVICE_NAME)
        .with_attribute(opentelemetry::KeyValue::new("bmw.role", role.to_owned()))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer(SERVICE_NAME);
    // bmw's spans and the events logged in them; other crates' stay out.
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(Targets::new().with_target("bmw", tracing::Level::INFO));
    ENABLED.store(true, Ordering::Relaxed);
    Ok((Box::new(layer), TraceExport { provider }))
}

/// The span of one bridge request (`<method> <route>`, a server span), a
/// child of the caller's `traceparent` if it sent one; record its answer
/// with [`record_http_status`].
pub fn http_span(method: &str, route: &str, headers: &http::HeaderMap) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "http.request",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = method,
        http.route = route,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    set_parent_http(&span, headers);
    span
}

/// Records the status of a request's answer on its span (a 5xx is an
/// error: a 4xx is the caller's).
pub fn record_http_status(span: &tracing::Span, status: u16) {
    if span.is_disabled() {
        return;
    }
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "error");
    }
}

/// The span of one publish of a task or command (a producer span, a child
/// of the current span); [`inject`] it into the message's headers.
pub fn publish_span(subject: &str, message_id: &str) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    // Named by the subject without the message id (`bmw.async.<queue>`):
    // span names stay few.
    let destination = subject
        .strip_suffix(message_id)
        .and_then(|s| s.strip_suffix('.'))
        .unwrap_or(subject);
    tracing::info_span!(
        "publish",
        otel.name = format!("publish {destination}"),
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.destination.name = subject,
        messaging.message.id = message_id,
    )
}

/// The span of a command's application on a worker (a consumer span),
/// continuing the trace of the message's `traceparent`; `kind` and
/// `outcome` are recorded when known.
pub fn command_span(subject: &str, headers: Option<&HeaderMap>) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "command.apply",
        otel.name = format!("apply {subject}"),
        otel.kind = "consumer",
        messaging.destination.name = subject,
        task.kind = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    set_parent(&span, headers);
    span
}

/// The span of one async attempt (a consumer span), continuing the trace of
/// the task message's `traceparent`; `outcome` is recorded when it ends.
pub fn attempt_span(
    task_id: &str,
    kind: &str,
    queue: &str,
    attempt: u32,
    headers: Option<&HeaderMap>,
) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "async.attempt",
        otel.name = format!("attempt {kind}"),
        otel.kind = "consumer",
        task.id = task_id,
        task.kind = kind,
        task.queue = queue,
        task.attempt = attempt,
        outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    );
    set_parent(&span, headers);
    span
}

/// The span of one run of a daemon instance on this worker, from its start
/// to its stop or failure: a trace of its own (a run lasts as long as the
/// task does, not as long as the request that created it).
pub fn daemon_run_span(
    uni_id: &str,
    kind: &str,
    retry_count: u32,
    reload_count: u32,
) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        parent: None,
        "daemon.run",
        otel.name = format!("run {kind}"),
        task.uni_id = uni_id,
        task.kind = kind,
        task.retry_count = retry_count,
        task.reload_count = reload_count,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    )
}

/// The OTLP exporter, saying in the log when exports start failing (the
/// collector is down or the URL is wrong: those spans are lost) and when
/// they work again; the SDK itself says nothing.
#[derive(Debug)]
struct ReportingExporter {
    inner: opentelemetry_otlp::SpanExporter,
    url: String,
    /// Whether the last export failed.
    failing: AtomicBool,
}

impl SpanExporter for ReportingExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let exported = self.inner.export(batch).await;
        match &exported {
            Err(e) if !self.failing.swap(true, Ordering::Relaxed) => {
                tracing::warn!(url = self.url, spans, cause = %e, "traces not exported: these spans are dropped (said once until exports work again)");
            }
            Ok(()) if self.failing.swap(false, Ordering::Relaxed) => {
                tracing::info!(url = self.url, "traces are exported again");
            }
            _ => {}
        }
        exported
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The W3C Trace Context propagator (`traceparent`, `tracestate`).
fn propagator() -> TraceContextPropagator {
    TraceContextPropagator::new()
}

/// NATS headers as the propagator writes them.
struct NatsInjector<'a>(&'a mut HeaderMap);

impl Injector for NatsInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

/// NATS headers as the propagator reads them.
struct NatsExtractor<'a>(&'a HeaderMap);

impl Extractor for NatsExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

/// HTTP headers as the propagator reads them.
struct HttpExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HttpExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes `span`'s trace context into `headers` (nothing when traces are off
/// or the span is disabled).
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    if !enabled() || span.is_disabled() {
        return;
    }
    propagator().inject_context(&span.context(), &mut NatsInjector(headers));
}

/// Writes the current span's trace context into `headers`.
pub fn inject_current(headers: &mut HeaderMap) {
    inject(&tracing::Span::current(), headers);
}

/// Makes `span` continue the trace `headers` carry, if they carry one.
pub fn set_parent(span: &tracing::Span, headers: Option<&HeaderMap>) {
    if !enabled() || span.is_disabled() {
        return;
    }
    let Some(headers) = headers else { return };
    let parent = propagator().extract(&NatsExtractor(headers));
    let _ = span.set_parent(parent);
}

/// Makes `span` continue the trace an HTTP request's headers carry.
pub fn set_parent_http(span: &tracing::Span, headers: &http::HeaderMap) {
    if !enabled() || span.is_disabled() {
        return;
    }
    let parent = propagator().extract(&HttpExtractor(headers));
    let _ = span.set_parent(parent);
}

/// Copies the trace headers of `from` into `to` unchanged (traces on or
/// off): a re-published task stays in its producer's trace.
pub fn carry(from: Option<&HeaderMap>, to: &mut HeaderMap) {
    let Some(from) = from else { return };
    for field in propagator().fields() {
        if let Some(value) = from.get(field) {
            to.insert(field, value.as_str());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_http_base_urls_or_the_traces_url() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318").unwrap(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/v1/traces").unwrap(),
            "http://collector:4318/v1/traces"
        );
        for bad in [
            "",
            "collector:4318",
            "https://collector:4318",
            "http://",
            "http:///x",
        ] {
            let e = traces_url(bad).unwrap_err();
            assert!(e.to_string().contains("--otlp-endpoint"), "{e}");
        }
    }

    #[test]
    fn trace_headers_are_carried_unchanged() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut from = HeaderMap::new();
        from.insert("traceparent", parent);
        from.insert("tracestate", "a=b");
        from.insert("Bmw-Other", "x");
        let mut to = HeaderMap::new();
        carry(Some(&from), &mut to);
        assert_eq!(to.get("traceparent").map(|v| v.as_str()), Some(parent));
        assert_eq!(to.get("tracestate").map(|v| v.as_str()), Some("a=b"));
        assert!(to.get("Bmw-Other").is_none());
        let mut none = HeaderMap::new();
        carry(None, &mut none);
        assert_eq!(none.iter().count(), 0);
    }
}
