//! Traces: with `--otlp-endpoint`, bmw exports OpenTelemetry spans over
//! OTLP/HTTP, and one task's spans form one trace from the caller's
//! `traceparent` (an HTTP header, or a NATS header of a raw producer)
//! through the bridge's request and the publish to every attempt, scheduled
//! retries included. Without the flag nothing is exported. The collector is
//! a small OTLP/HTTP receiver in the test that decodes the protobuf bodies.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use serde_json::json;

use crate::harness::{BmwProcess, TestEnv, api, wait_until};
use reqwest::Method;

/// One span as the receiver got it: ids in hex.
#[derive(Debug, Clone)]
struct SpanSeen {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    /// String and integer attributes, as text.
    attributes: Vec<(String, String)>,
    /// The messages of its events.
    events: Vec<String>,
    /// Its status: 2 is an error.
    status_code: i32,
    /// `service.name` and `bmw.role` of the resource.
    service: String,
    role: String,
}

impl SpanSeen {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        _ => String::new(),
    }
}

/// An OTLP/HTTP receiver on a free loopback port: every export request
/// and every span it carried.
struct Receiver {
    addr: SocketAddr,
    requests: Arc<Mutex<usize>>,
    spans: Arc<Mutex<Vec<SpanSeen>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let requests = Arc::new(Mutex::new(0));
        let spans = Arc::new(Mutex::new(Vec::new()));
        let (r, s) = (requests.clone(), spans.clone());
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| {
                let (requests, spans) = (r.clone(), s.clone());
                async move {
                    *requests.lock().unwrap() += 1;
                    let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    for resource_spans in request.resource_spans {
                        let resource = resource_spans.resource.unwrap_or_default();
                        let resource_text = |key: &str| {
                            text(
                                resource
                                    .attributes
                                    .iter()
                                    .find(|a| a.key == key)
                                    .and_then(|a| a.value.as_ref()),
                            )
                        };
                        let (service, role) =
                            (resource_text("service.name"), resource_text("bmw.role"));
                        for scope in resource_spans.scope_spans {
                            for span in scope.spans {
                                spans.lock().unwrap().push(SpanSeen {
                                    name: span.name,
                                    trace_id: hex(&span.trace_id),
                                    span_id: hex(&span.span_id),
                                    parent_span_id: hex(&span.parent_span_id),
                                    attributes: span
                                        .attributes
                                        .iter()
                                        .map(|a| (a.key.clone(), text(a.value.as_ref())))
                                        .collect(),
                                    events: span.events.iter().map(|e| e.name.clone()).collect(),
                                    status_code: span.status.map_or(0, |s| s.code),
                                    service: service.clone(),
                                    role: role.clone(),
                                });
                            }
                        }
                    }
                    // An empty ExportTraceServiceResponse.
                    (
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            addr,
            requests,
            spans,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<SpanSeen> {
        self.spans.lock().unwrap().clone()
    }

    fn requests(&self) -> usize {
        *self.requests.lock().unwrap()
    }

    /// The spans of `trace_id` whose names start with `name`, once there
    /// are `count`.
    async fn wait_spans(&self, trace_id: &str, name: &str, count: usize) -> Vec<SpanSeen> {
        let find = || -> Vec<SpanSeen> {
            self.spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id && s.name.starts_with(name))
                .collect()
        };
        let arrived = wait_until(Duration::from_secs(30), async || find().len() >= count).await;
        assert!(
            arrived,
            "{count} `{name}` span(s) of trace {trace_id}; the receiver has: {:#?}",
            self.spans()
        );
        find()
    }
}

/// Exports every 100 ms, so the test waits on spans, not the 5 s default.
const FAST_EXPORT: &[(&str, &str)] = &[("OTEL_BSP_SCHEDULE_DELAY", "100")];

fn child_of<'a>(spans: &'a [SpanSeen], parent: &SpanSeen, what: &str) -> &'a SpanSeen {
    spans
        .iter()
        .find(|s| s.parent_span_id == parent.span_id)
        .unwrap_or_else(|| panic!("no {what} under {parent:#?} among {spans:#?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_s_spans_form_one_trace_from_its_producer_to_every_attempt() {
    let receiver = Receiver::start().await;
    let env = TestEnv::start().await;
    let endpoint = receiver.endpoint();
    // A kind answered by a NATS service: its requests' traceparent headers.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kinds.toml");
    std::fs::write(
        &config,
        "[[kind]]\nname = \"async:svc:traced\"\nservice = \"test.traced\"\n",
    )
    .unwrap();
    let service_saw = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut requests = env
        .nats
        .client
        .queue_subscribe("test.traced", "bmw".into())
        .await
        .unwrap();
    env.nats.client.flush().await.unwrap();
    let (saw, client) = (service_saw.clone(), env.nats.client.clone());
    tokio::spawn(async move {
        while let Some(request) = futures::StreamExt::next(&mut requests).await {
            let traceparent = request
                .headers
                .as_ref()
                .and_then(|h| h.get("traceparent"))
                .map(|v| v.as_str().to_owned());
            saw.lock().unwrap().push(traceparent.unwrap_or_default());
            let _ = client.publish(request.reply.unwrap(), "{}".into()).await;
        }
    });
    // Retries after 3 s: scheduled as one-shot schedules, not naks.
    let bmw = BmwProcess::serve(
        "run",
        &env.url(),
        &[
            "--otlp-endpoint",
            &endpoint,
            "--async-retry-base",
            "3s",
            "--config",
            config.to_str().unwrap(),
        ],
        FAST_EXPORT,
    )
    .await;
    let traced_post = |trace_id: &str, body: serde_json::Value| {
        api::request(Method::POST, format!("{}/bmw/task/", bmw.base_url()))
            .header("traceparent", &format!("00-{trace_id}-00f067aa0ba902b7-01"))
            .json(&body)
            .send()
    };
    // 0. A delayed task, due while the rest runs: its @at schedule carries
    // the trace to the message nats-server fires.
    let delayed_trace = "6e0c63257de34c926f9efcd03927272e";
    let response = traced_post(
        delayed_trace,
        json!({"kind": "async:demo:echo", "payload": {"delayed": true}, "options": {"process_in": "2s"}}),
    )
    .await;
    assert_eq!(response.status, 200);

    // 1. A caller's HTTP create with its traceparent, failing once.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = api::request(Method::POST, format!("{}/bmw/task/", bmw.base_url()))
        .header("traceparent", &format!("00-{trace_id}-{caller_span}-01"))
        .json(&json!({"kind": "async:demo:fail", "payload": {"fail_times": 1}, "options": {"retry": 2}}))
        .send()
        .await;
    assert_eq!(response.status, 200);
    let created = response.envelope();
    let task_id = created["data"]["task_id"].as_str().unwrap().to_owned();

    let attempts = receiver
        .wait_spans(trace_id, "attempt async:demo:fail", 2)
        .await;
    let spans: Vec<SpanSeen> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == trace_id)
        .collect();
    let http = spans
        .iter()
        .find(|s| s.name == "POST /bmw/task/")
        .unwrap_or_else(|| panic!("the bridge's request span among {spans:#?}"));
    assert_eq!(http.parent_span_id, caller_span, "{http:#?}");
    assert_eq!(http.attribute("http.response.status_code"), Some("200"));
    assert_eq!((http.service.as_str(), http.role.as_str()), ("bmw", "run"));
    let publish = child_of(&spans, http, "publish");
    assert_eq!(publish.name, "publish bmw.async.default", "{publish:#?}");
    assert_eq!(
        publish.attribute("messaging.message.id"),
        Some(task_id.as_str())
    );
    // Both attempts continue the publish: the first, and the retry that a
    // one-shot schedule fired later.
    for attempt in &attempts {
        assert_eq!(attempt.parent_span_id, publish.span_id, "{attempt:#?}");
        assert_eq!(attempt.attribute("task.id"), Some(task_id.as_str()));
        assert_eq!(attempt.attribute("task.kind"), Some("async:demo:fail"));
    }
    let mut outcomes: Vec<(&str, &str)> = attempts
        .iter()
        .map(|a| {
            (
                a.attribute("task.attempt").unwrap_or(""),
                a.attribute("outcome").unwrap_or(""),
            )
        })
        .collect();
    outcomes.sort();
    assert_eq!(outcomes, [("1", "failed"), ("2", "succeeded")]);
    assert!(
        receiver.spans().iter().all(|s| s.name != "GET /health"),
        "probes make no spans"
    );

    // 2. A raw producer publishing a task with a traceparent header.
    let raw_trace = "0af7651916cd43dd8448eb211c80319c";
    let raw_span = "b7ad6b7169203331";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{raw_trace}-{raw_span}-01").as_str(),
    );
    let publish = async_nats::jetstream::message::PublishMessage::build()
        .payload(
            json!({"kind": "async:demo:echo", "payload": {"raw": true}})
                .to_string()
                .into(),
        )
        .headers(headers)
        .message_id("raw-traced");
    crate::harness::publish_stored(&env, "bmw.async.default", publish).await;
    let attempt = &receiver
        .wait_spans(raw_trace, "attempt async:demo:echo", 1)
        .await[0];
    assert_eq!(attempt.parent_span_id, raw_span, "{attempt:#?}");
    assert_eq!(attempt.attribute("task.id"), Some("raw-traced"));
    assert_eq!(attempt.attribute("outcome"), Some("succeeded"));

    // 3. A daemon create: the command's application continues the request's
    // trace on the worker; the instance's run is a trace of its own.
    let daemon_trace = "5b8efff798038103d269b633813fc60c";
    let response = api::request(Method::POST, format!("{}/bmw/task/", bmw.base_url()))
        .header(
            "traceparent",
            &format!("00-{daemon_trace}-{caller_span}-01"),
        )
        .json(&json!({"kind": "daemon:demo:demo", "payload": {"content": "not_ok"}}))
        .send()
        .await;
    assert_eq!(response.status, 200);
    let created = response.envelope();
    let uni_id = created["data"]["uni_id"].as_str().unwrap().to_owned();
    let apply = &receiver
        .wait_spans(daemon_trace, "apply bmw.task.create", 1)
        .await[0];
    let spans: Vec<SpanSeen> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == daemon_trace)
        .collect();
    let http = spans.iter().find(|s| s.name == "POST /bmw/task/").unwrap();
    let publish = child_of(&spans, http, "publish");
    assert_eq!(publish.name, "publish bmw.task.create", "{publish:#?}");
    assert_eq!(apply.parent_span_id, publish.span_id, "{apply:#?}");
    assert_eq!(apply.attribute("task.kind"), Some("daemon:demo:demo"));
    assert_eq!(apply.attribute("outcome"), Some("ok"));
    let found = wait_until(Duration::from_secs(20), async || {
        receiver
            .spans()
            .iter()
            .any(|s| s.attribute("task.uni_id") == Some(uni_id.as_str()))
    })
    .await;
    assert!(found, "a daemon run span; got {:#?}", receiver.spans());
    let run = receiver
        .spans()
        .into_iter()
        .find(|s| s.attribute("task.uni_id") == Some(uni_id.as_str()))
        .unwrap();
    assert_eq!(run.name, "run daemon:demo:demo");
    assert_eq!(run.parent_span_id, "", "a run is a root span: {run:#?}");
    assert_eq!(run.status_code, 2, "the failed run is an error: {run:#?}");
    assert!(
        run.events.iter().any(|e| e == "daemon run started")
            && run.events.iter().any(|e| e == "daemon run failed"),
        "{run:#?}"
    );

    // 4. A kind answered by a NATS service gets the attempt's traceparent.
    let service_trace = "1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f";
    let response = traced_post(
        service_trace,
        json!({"kind": "async:svc:traced", "payload": {}}),
    )
    .await;
    assert_eq!(response.status, 200);
    let attempt = &receiver
        .wait_spans(service_trace, "attempt async:svc:traced", 1)
        .await[0];
    let sent = service_saw.lock().unwrap().clone();
    assert_eq!(
        sent,
        [format!("00-{service_trace}-{}-01", attempt.span_id)],
        "the service's request names the attempt as its parent"
    );

    // 0, continued: the delayed task's attempt follows its schedule's publish.
    let attempt = &receiver
        .wait_spans(delayed_trace, "attempt async:demo:echo", 1)
        .await[0];
    let spans: Vec<SpanSeen> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == delayed_trace)
        .collect();
    let http = spans.iter().find(|s| s.name == "POST /bmw/task/").unwrap();
    let publish = child_of(&spans, http, "publish");
    assert_eq!(
        publish.name, "publish bmw.schedule.at.default",
        "{publish:#?}"
    );
    assert_eq!(attempt.parent_span_id, publish.span_id, "{attempt:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_flag_nothing_is_exported() {
    let receiver = Receiver::start().await;
    let env = TestEnv::start().await;
    // The SDK's own variable names the receiver: only --otlp-endpoint turns traces on.
    let endpoint = receiver.endpoint();
    let mut vars = FAST_EXPORT.to_vec();
    vars.push(("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint));
    let bmw = BmwProcess::serve("run", &env.url(), &[], &vars).await;
    let response = api::request(Method::POST, format!("{}/bmw/task/", bmw.base_url()))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .json(&json!({"kind": "async:demo:echo", "payload": {"untraced": true}}))
        .send()
        .await;
    assert_eq!(response.status, 200);
    bmw.wait_log(Duration::from_secs(10), &["untraced"]).await;
    // Ten export intervals after the task ran: nothing was sent.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.requests(), 0, "{:#?}", receiver.spans());
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_still_buffered_are_sent_when_the_process_stops() {
    let receiver = Receiver::start().await;
    let env = TestEnv::start().await;
    let endpoint = receiver.endpoint();
    // No export on a timer during the test: only the shutdown can send.
    let mut bmw = BmwProcess::serve(
        "run",
        &env.url(),
        &["--otlp-endpoint", &endpoint],
        &[("OTEL_BSP_SCHEDULE_DELAY", "600000")],
    )
    .await;
    let trace_id = "7d1a9c3e5b2f4a6c8e0d1b3f5a7c9e1d";
    let response = api::request(Method::POST, format!("{}/bmw/task/", bmw.base_url()))
        .header("traceparent", &format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({"kind": "async:demo:echo", "payload": {"flushed": true}}))
        .send()
        .await;
    assert_eq!(response.status, 200);
    bmw.wait_log(Duration::from_secs(10), &["flushed"]).await;
    assert_eq!(receiver.requests(), 0, "nothing sent before the stop");
    bmw.send_sigterm();
    assert!(
        bmw.wait_exit(Duration::from_secs(20)).await.is_some(),
        "bmw stops on SIGTERM"
    );
    receiver
        .wait_spans(trace_id, "attempt async:demo:echo", 1)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collector_that_cannot_be_reached_is_said_once_in_the_log() {
    let env = TestEnv::start().await;
    // A port nothing listens on.
    let endpoint = format!("http://127.0.0.1:{}", crate::harness::free_port());
    let bmw = BmwProcess::serve(
        "run",
        &env.url(),
        &["--otlp-endpoint", &endpoint],
        FAST_EXPORT,
    )
    .await;
    let create = async |n: usize| {
        let response = api::request(Method::POST, format!("{}/bmw/task/", bmw.base_url()))
            .json(&json!({"kind": "async:demo:echo", "payload": {"unexported": n}}))
            .send()
            .await;
        assert_eq!(response.status, 200);
        bmw.wait_log(Duration::from_secs(10), &["unexported", &format!(":{n}")])
            .await;
    };
    create(0).await;
    let line = bmw
        .wait_log(Duration::from_secs(10), &["traces not exported", &endpoint])
        .await;
    assert!(line.contains("WARN"), "{line}");
    // Two more batches, each exported (and failing) on its own 100 ms tick.
    for n in 1..=2 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        create(n).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let said = bmw
        .logs()
        .iter()
        .filter(|l| l.contains("traces not exported"))
        .count();
    assert_eq!(said, 1, "said once: {}", bmw.logs().join("\n"));
}
