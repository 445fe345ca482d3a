//! bmw against a secured nats-server: TLS with a test CA and client
//! certificates (mutual TLS), a user and password, an nkey, a token; a clear
//! error, fast, for credentials or certificates the server refuses; no secret
//! in `--help` or in the logs; and the seed walkthrough with each role under
//! the minimal permissions of the shipped `nats/permissions.conf`.

use std::time::Duration;

use reqwest::Method;

use serde_json::{Value, json};

use crate::harness::{BmwProcess, NatsServer, api, http, list_tasks};

/// A refused start must end within this (the brief: about 10 s).
const REFUSED_WITHIN: Duration = Duration::from_secs(10);

/// PEM files of a test CA, a server certificate for 127.0.0.1 and localhost,
/// and a client certificate, all made by rcgen in a temporary directory.
struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    fn new() -> TestPki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "bmw test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        write("ca.pem", ca.self_signed(&ca_key).unwrap().pem());
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |names: Vec<String>, usage, cert: &str, key: &str| {
            let leaf_key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.extended_key_usages = vec![usage];
            write(cert, params.signed_by(&leaf_key, &issuer).unwrap().pem());
            write(key, leaf_key.serialize_pem());
        };
        leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server.pem",
            "server-key.pem",
        );
        leaf(
            vec!["bmw-client".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "client.pem",
            "client-key.pem",
        );
        TestPki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The server's `tls` block: its certificate, and client certificates
    /// signed by the test CA required.
    fn server_conf(&self) -> String {
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 5\n}}\n",
            self.path("server.pem"),
            self.path("server-key.pem"),
            self.path("ca.pem"),
        )
    }
}

/// `tls://127.0.0.1:<port>` of a server.
fn tls_url(server: &NatsServer) -> String {
    format!("tls://127.0.0.1:{}", server.server.port())
}

/// Asserts that a bmw process exits non-zero within [`REFUSED_WITHIN`] with
/// a line saying `needle`, and that no line shows any of `secrets`.
async fn assert_refused_start(mut bmw: BmwProcess, needle: &str, secrets: &[&str]) -> String {
    let status = bmw.wait_exit(REFUSED_WITHIN).await;
    let line = bmw
        .wait_log(Duration::from_secs(2), &["bmw: ", needle])
        .await;
    assert!(
        status.is_some_and(|s| !s.success()),
        "bmw did not fail within {REFUSED_WITHIN:?} ({status:?}); logs:\n{}",
        bmw.logs().join("\n")
    );
    for secret in secrets {
        assert!(
            bmw.logs().iter().all(|l| !l.contains(secret)),
            "a secret is in the logs:\n{}",
            bmw.logs().join("\n")
        );
    }
    line
}

/// Creates the seed's `ok` daemon task through a bridge and waits for it to run.
async fn create_and_see_it_run(bridge: &BmwProcess, worker: &BmwProcess) {
    let body = r#"{"kind": "daemon:demo:demo", "payload": {"content": "ok"}, "options": {"queue": "default"}}"#;
    let (status, envelope) = http(
        Method::POST,
        &format!("{}/bmw/task/", bridge.base_url()),
        Some(body),
    )
    .await;
    assert_eq!(status, 200, "{envelope}");
    worker
        .wait_log(
            Duration::from_secs(15),
            &["start task instance, payload: map[content:ok] "],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_and_bridge_connect_with_mutual_tls_and_a_missing_certificate_is_refused() {
    let pki = TestPki::new();
    let server = NatsServer::start_with_config(&pki.server_conf()).await;
    let url = tls_url(&server);
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client-key.pem"),
    );
    let tls: [&str; 7] = [
        "--nats-ca",
        &ca,
        "--nats-cert",
        &cert,
        "--nats-key",
        &key,
        "--nats-require-tls",
    ];
    let worker = BmwProcess::worker(&url, &tls);
    worker.worker_id().await;
    let bridge = BmwProcess::serve("bridge", &url, &tls, &[]).await;
    create_and_see_it_run(&bridge, &worker).await;

    // The same from the environment, as a container would set it.
    let env = [
        ("BMW_NATS_CA", ca.as_str()),
        ("BMW_NATS_CERT", cert.as_str()),
        ("BMW_NATS_KEY", key.as_str()),
    ];
    let task = BmwProcess::spawn_with_env(&["task", "list", "--nats-url", &url], &env);
    let mut task = task;
    let status = task.wait_exit(Duration::from_secs(20)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{}",
        task.logs().join("\n")
    );
    assert!(
        task.has_log("daemon:demo:demo"),
        "{}",
        task.logs().join("\n")
    );

    // No client certificate: the server ends the handshake, bmw says so and stops.
    let no_cert = BmwProcess::spawn(&url, &["worker", "--nats-ca", &ca]);
    let line = assert_refused_start(no_cert, "TLS", &[]).await;
    assert!(line.contains("--nats-cert"), "{line}");
    // No CA: the server's certificate is not trusted by the system roots.
    let no_ca = BmwProcess::spawn(&url, &["worker", "--nats-cert", &cert, "--nats-key", &key]);
    let line = assert_refused_start(no_ca, "TLS", &[]).await;
    assert!(line.contains("--nats-ca"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn user_and_password_connect_and_a_wrong_password_fails_fast_without_showing_it() {
    let server = NatsServer::start_with_config(
        "authorization {\n  users = [ { user: bmw, password: \"s3cret-pw\" } ]\n}\n",
    )
    .await;
    let url = server.url();
    // The password from the environment (the way `docs/security.md` recommends).
    let env = [("BMW_NATS_USER", "bmw"), ("BMW_NATS_PASSWORD", "s3cret-pw")];
    let bridge = BmwProcess::serve("run", &url, &[], &env).await;
    create_and_see_it_run(&bridge, &bridge).await;
    assert!(bridge.logs().iter().all(|l| !l.contains("s3cret-pw")));

    // In the URL: async-nats alone would ignore it; bmw takes it out of the URL.
    let in_url = url.replace("nats://", "nats://bmw:s3cret-pw@");
    let worker = BmwProcess::worker(&in_url, &[]);
    worker.worker_id().await;
    assert!(worker.logs().iter().all(|l| !l.contains("s3cret-pw")));

    let wrong = [("BMW_NATS_USER", "bmw"), ("BMW_NATS_PASSWORD", "wr0ng-pw")];
    let refused = BmwProcess::spawn_with_env(&["worker", "--nats-url", &url], &wrong);
    let line = assert_refused_start(refused, "authorization failed", &["wr0ng-pw"]).await;
    assert!(line.contains("a user and password"), "{line}");
    let wrong_in_url = url.replace("nats://", "nats://bmw:wr0ng-pw@");
    let refused = BmwProcess::worker(&wrong_in_url, &[]);
    let line = assert_refused_start(refused, "authorization failed", &["wr0ng-pw"]).await;
    assert!(line.contains("nats://***@127.0.0.1:"), "{line}");
    // No credentials at all: refused just as fast.
    let refused = BmwProcess::worker(&url, &[]);
    assert_refused_start(refused, "authorization failed", &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_nkey_and_a_token_connect_and_wrong_ones_are_refused() {
    let user = nkeys::KeyPair::new_user();
    let server = NatsServer::start_with_config(&format!(
        "authorization {{\n  users = [ {{ nkey: {} }} ]\n}}\n",
        user.public_key()
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let seed_file = dir.path().join("bmw.nk");
    std::fs::write(&seed_file, user.seed().unwrap()).unwrap();
    let seed_path = seed_file.display().to_string();
    // A seed file by flag.
    let worker = BmwProcess::worker(&server.url(), &["--nats-nkey", &seed_path]);
    worker.worker_id().await;
    // The seed itself from the environment.
    let seed = user.seed().unwrap();
    let bridge = BmwProcess::serve("bridge", &server.url(), &[], &[("BMW_NATS_NKEY", &seed)]).await;
    create_and_see_it_run(&bridge, &worker).await;
    // Another user's seed.
    let other = nkeys::KeyPair::new_user().seed().unwrap();
    let refused = BmwProcess::spawn_with_env(
        &["worker", "--nats-url", &server.url()],
        &[("BMW_NATS_NKEY", &other)],
    );
    let line = assert_refused_start(refused, "authorization failed", &[&other, &seed]).await;
    assert!(line.contains("an nkey"), "{line}");
    // Not a seed: a config error that does not repeat the value.
    let refused = BmwProcess::spawn_with_env(
        &["worker", "--nats-url", &server.url()],
        &[("BMW_NATS_NKEY", "SXnot-a-seed")],
    );
    assert_refused_start(refused, "nats-nkey", &["SXnot-a-seed"]).await;

    let token_server =
        NatsServer::start_with_config("authorization {\n  token: \"t0ken-value\"\n}\n").await;
    let worker = BmwProcess::spawn_with_env(
        &["worker", "--nats-url", &token_server.url()],
        &[("BMW_NATS_TOKEN", "t0ken-value")],
    );
    worker.worker_id().await;
    let refused = BmwProcess::spawn_with_env(
        &["worker", "--nats-url", &token_server.url()],
        &[("BMW_NATS_TOKEN", "wr0ng-token")],
    );
    assert_refused_start(refused, "authorization failed", &["wr0ng-token"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn conflicting_settings_are_refused_by_name() {
    let cases: [(&[&str], &str); 4] = [
        (&["--nats-user", "bmw"], "`nats-password`"),
        (&["--nats-cert", "Cargo.toml"], "`nats-key`"),
        (
            &[
                "--nats-token",
                "t",
                "--nats-user",
                "u",
                "--nats-password",
                "p",
            ],
            "`nats-token`",
        ),
        (&["--nats-ca", "/no/such/ca.pem"], "`nats-ca`"),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = ["worker"].iter().chain(args).copied().collect();
        let bmw = BmwProcess::spawn_raw(&args);
        assert_refused_start(bmw, needle, &[]).await;
    }
}

#[test]
fn help_shows_no_secret() {
    let secrets = [
        ("BMW_NATS_URL", "nats://bmw:url-s3cret@127.0.0.1:4222"),
        ("BMW_NATS_PASSWORD", "pw-s3cret"),
        ("BMW_NATS_TOKEN", "token-s3cret"),
        ("BMW_NATS_NKEY", "SUnkey-s3cret"),
    ];
    for args in [&["--help"][..], &["worker", "--help"], &["run", "--help"]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_bmw"))
            .args(args)
            .envs(secrets)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("BMW_NATS_PASSWORD"), "{text}");
        for (_, secret) in secrets {
            assert!(!text.contains("s3cret"), "{args:?} shows {secret}:\n{text}");
        }
    }
}

/// The users of the shipped config (`nats/permissions.conf` reads their
/// passwords from variables): name, password variable, password, and the
/// reply prefix each may subscribe to.
const ROLES: [(&str, &str, &str, &str); 6] = [
    (
        "bmw-admin",
        "BMW_ADMIN_PASSWORD",
        "admin-pw",
        "_INBOX_bmw-admin",
    ),
    (
        "bmw-worker",
        "BMW_WORKER_PASSWORD",
        "worker-pw",
        "_INBOX_bmw-worker",
    ),
    (
        "bmw-bridge",
        "BMW_BRIDGE_PASSWORD",
        "bridge-pw",
        "_INBOX_bmw-bridge",
    ),
    (
        "bmw-operator",
        "BMW_OPERATOR_PASSWORD",
        "operator-pw",
        "_INBOX_bmw-operator",
    ),
    (
        "bmw-console",
        "BMW_CONSOLE_PASSWORD",
        "console-pw",
        "_INBOX_bmw-console",
    ),
    (
        "bmw-producer",
        "BMW_PRODUCER_PASSWORD",
        "producer-pw",
        "_INBOX_bmw-producer",
    ),
];

fn role(user: &str) -> (&'static str, &'static str, &'static str, &'static str) {
    *ROLES
        .iter()
        .find(|(u, ..)| *u == user)
        .expect("a role of the shipped config")
}

/// The environment that makes a bmw process connect as `user`, with its
/// own reply prefix.
fn as_user(user: &str) -> [(&'static str, &'static str); 3] {
    let (user, _, password, inbox) = role(user);
    [
        ("BMW_NATS_USER", user),
        ("BMW_NATS_PASSWORD", password),
        ("BMW_NATS_INBOX_PREFIX", inbox),
    ]
}

/// A NATS client connected as `user`, with its own reply prefix.
async fn client_as(url: &str, user: &str) -> async_nats::Client {
    let (user, _, password, inbox) = role(user);
    async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .name(user)
        .custom_inbox_prefix(inbox)
        .connect(url)
        .await
        .expect("the role connects")
}

/// A server config: the role passwords as variables, then `body`.
fn with_role_passwords(body: &str) -> String {
    let mut conf: String = ROLES
        .iter()
        .map(|(_, var, password, _)| format!("{var}: \"{password}\"\n"))
        .collect();
    conf.push_str(body);
    conf
}

/// Runs `bmw provision` as the admin; asserts it succeeds.
async fn provision_as_admin(url: &str) {
    let mut admin =
        BmwProcess::spawn_with_env(&["provision", "--nats-url", url], &as_user("bmw-admin"));
    let status = admin.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "bmw provision: {status:?}\n{}",
        admin.logs().join("\n")
    );
}

async fn get_json(url: &str) -> Value {
    let (status, body) = http(Method::GET, url, None).await;
    assert_eq!(status, 200, "{url}: {body}");
    body
}

async fn post_json(method: Method, url: &str, body: Value) -> Value {
    let (status, answer) = http(method, url, Some(&body.to_string())).await;
    assert_eq!(status, 200, "{url} {body}: {answer}");
    answer
}

/// Runs `bmw task <args>` as `bmw-operator`; asserts it succeeds; its output.
async fn bmw_task(url: &str, args: &[&str]) -> String {
    let args: Vec<&str> = ["task"]
        .iter()
        .chain(args)
        .chain(&["--nats-url", url])
        .copied()
        .collect();
    let mut task = BmwProcess::spawn_with_env(&args, &as_user("bmw-operator"));
    let status = task.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "bmw task {args:?}: {status:?}\n{}",
        task.logs().join("\n")
    );
    task.logs().join("\n")
}

/// Every role at work, each as its own user: a worker, a bridge through which
/// the seed walkthrough and every other route run, `bmw task`, and a producer
/// publishing straight on the subjects.
async fn every_role_at_work(server: &NatsServer) {
    const OK: &str = "daemon:demo:demo-7b22636f6e74656e74223a226f6b227d";
    const NOT_OK: &str = "daemon:demo:demo-7b22636f6e74656e74223a226e6f745f6f6b227d";
    let url = server.url();
    let worker_args: Vec<&str> = ["worker", "--demo-kinds", "--nats-url", &url]
        .into_iter()
        .chain(crate::harness::FAST.iter().copied())
        .chain(crate::async_tasks::ASYNC_FAST.iter().copied())
        .collect();
    let worker = BmwProcess::spawn_with_env(&worker_args, &as_user("bmw-worker"));
    let worker_id = worker.worker_id().await;
    let bridge = BmwProcess::serve("bridge", &url, &[], &as_user("bmw-bridge")).await;
    let base = bridge.base_url();
    let tasks = format!("{base}/bmw/task/");

    // The seed walkthrough.
    for content in ["ok", "not_ok"] {
        let body = json!({"kind": "daemon:demo:demo", "payload": {"content": content}, "options": {"queue": "default"}});
        post_json(Method::POST, &tasks, body).await;
    }
    worker
        .wait_log(
            Duration::from_secs(10),
            &["start task instance, payload: map[content:ok] "],
        )
        .await;
    worker
        .wait_log(Duration::from_secs(10), &[&format!("[RETRY] receive ERROR: receive abnormal payload. Task: {NOT_OK}, retryCount: 1 reloadCount: 0")])
        .await;
    let rows = list_tasks(&base, "daemon").await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r["binding"]["worker_id"] == worker_id.as_str()),
        "{rows:?}"
    );
    post_json(
        Method::POST,
        &format!("{base}/bmw/task/daemon/reload"),
        json!({"task_uni_id": NOT_OK}),
    )
    .await;
    worker
        .wait_log(
            Duration::from_secs(10),
            &[&format!("Task: {NOT_OK}, retryCount: 1 reloadCount: 1 ")],
        )
        .await;
    post_json(
        Method::DELETE,
        &tasks,
        json!({"task_type": "daemon", "task_uni_id": OK}),
    )
    .await;
    worker
        .wait_log(
            Duration::from_secs(10),
            &["receive task instance done, return"],
        )
        .await;
    assert_eq!(list_tasks(&base, "daemon").await.len(), 1);
    let workers = get_json(&format!("{base}/bmw/worker/")).await;
    assert!(workers.to_string().contains(&worker_id), "{workers}");
    let metrics = api::get(format!("{base}/metrics")).send().await;
    assert_eq!(metrics.status, 200);

    // Async tasks: one runs, one fails into the dead letters and is requeued,
    // a pending and a delayed one are deleted.
    let state = async |id: &str| {
        let (_, body) = http(
            Method::GET,
            &format!("{tasks}?task_type=async&task_id={id}"),
            None,
        )
        .await;
        body["data"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let created = post_json(
        Method::POST,
        &tasks,
        json!({"kind": "async:demo:echo", "payload": {"hello": 1}, "options": {"retention": "1h"}}),
    )
    .await;
    let echo = created["data"]["task_id"].as_str().unwrap().to_owned();
    assert_eventually!(
        Duration::from_secs(10),
        state(&echo).await == "completed",
        "echo did not run"
    );
    let created = post_json(
        Method::POST,
        &tasks,
        json!({"kind": "async:demo:fail", "payload": {"fail_times": 100}, "options": {"retry": 0}}),
    )
    .await;
    let failing = created["data"]["task_id"].as_str().unwrap().to_owned();
    assert_eventually!(
        Duration::from_secs(10),
        state(&failing).await == "archived",
        "no dead letter"
    );
    post_json(
        Method::POST,
        &format!("{base}/bmw/task/async/requeue"),
        json!({"task_id": failing}),
    )
    .await;
    for options in [json!({"queue": "nobody"}), json!({"process_in": "1h"})] {
        let created = post_json(
            Method::POST,
            &tasks,
            json!({"kind": "async:demo:echo", "options": options}),
        )
        .await;
        let id = created["data"]["task_id"].as_str().unwrap().to_owned();
        post_json(
            Method::DELETE,
            &tasks,
            json!({"task_type": "async", "task_id": id}),
        )
        .await;
    }
    let unique =
        json!({"kind": "async:demo:echo", "payload": {"once": 1}, "options": {"unique_ttl": "1h"}});
    post_json(Method::POST, &tasks, unique.clone()).await;
    let (status, body) = http(Method::POST, &tasks, Some(&unique.to_string())).await;
    assert_eq!(status, 409, "a duplicate in the unique window: {body}");
    let queues = get_json(&format!("{base}/bmw/queue/")).await;
    assert!(queues.to_string().contains("default"), "{queues}");

    // A periodic task ticks, pauses, resumes and goes.
    let kind = "periodic:demo:tick";
    post_json(
        Method::POST,
        &tasks,
        json!({"kind": kind, "options": {"every": "1s"}}),
    )
    .await;
    assert_eventually!(
        Duration::from_secs(10),
        list_tasks(&base, "periodic")
            .await
            .first()
            .is_some_and(|r| r["runs"].as_u64() > Some(0)),
        "the periodic task did not run"
    );
    post_json(
        Method::POST,
        &format!("{base}/bmw/task/periodic/pause"),
        json!({"kind": kind}),
    )
    .await;
    post_json(
        Method::POST,
        &format!("{base}/bmw/task/periodic/resume"),
        json!({"kind": kind}),
    )
    .await;
    post_json(
        Method::DELETE,
        &tasks,
        json!({"task_type": "periodic", "kind": kind}),
    )
    .await;

    // `bmw task`.
    bmw_task(
        &url,
        &["create", "daemon:demo:demo", r#"{"content":"cli"}"#],
    )
    .await;
    worker
        .wait_log(
            Duration::from_secs(10),
            &["start task instance, payload: map[content:cli] "],
        )
        .await;
    assert!(bmw_task(&url, &["list"]).await.contains("cli"));
    bmw_task(&url, &["queues"]).await;
    bmw_task(&url, &["list", "--type", "async"]).await;

    // A producer publishes a command and an async task itself; an operator
    // deletes.
    let producer = async_nats::jetstream::new(client_as(&url, "bmw-producer").await);
    let operator = async_nats::jetstream::new(client_as(&url, "bmw-operator").await);
    let send =
        |js: &async_nats::jetstream::Context, subject: &'static str, id: &str, body: Value| {
            let message = async_nats::jetstream::message::PublishMessage::build()
                .payload(body.to_string().into())
                .message_id(id);
            let js = js.clone();
            async move {
                js.send_publish(subject, message)
                    .await
                    .unwrap()
                    .await
                    .unwrap()
            }
        };
    let publish = |subject, id: &str, body| send(&producer, subject, id, body);
    let as_operator = |subject, id: &str, body| send(&operator, subject, id, body);
    publish(
        "bmw.task.create",
        "producer-cmd-1",
        json!({"kind": "daemon:demo:demo", "payload": {"content": "producer"}}),
    )
    .await;
    worker
        .wait_log(
            Duration::from_secs(10),
            &["start task instance, payload: map[content:producer] "],
        )
        .await;
    publish(
        "bmw.async.default.producer-1",
        "producer-1",
        json!({"kind": "async:demo:echo", "payload": {"from": "producer"}, "options": {"retention": "1h"}}),
    )
    .await;
    assert_eventually!(
        Duration::from_secs(10),
        state("producer-1").await == "completed",
        "the producer's task did not run"
    );
    // Async and periodic commands from a producer: the worker applies them.
    let commands = [
        (
            "cmd-pending",
            json!({"queue": "nobody"}),
            "async:demo:echo",
            "pending",
        ),
        (
            "cmd-delayed",
            json!({"process_in": "1h"}),
            "async:demo:echo",
            "scheduled",
        ),
        (
            "cmd-unique",
            json!({"unique_ttl": "1h", "retention": "1h"}),
            "async:demo:echo",
            "completed",
        ),
        (
            "cmd-dead",
            json!({"retry": 0}),
            "async:demo:fail",
            "archived",
        ),
    ];
    for (id, mut options, kind, expected) in commands {
        options["task_id"] = json!(id);
        let body = json!({"kind": kind, "payload": {"fail_times": 100}, "options": options});
        publish("bmw.task.create", &format!("create-{id}"), body).await;
        assert_eventually!(
            Duration::from_secs(10),
            state(id).await == expected,
            "{id} is not {expected}"
        );
    }
    let running = json!({"kind": "async:demo:sleep", "payload": {"seconds": 30}, "options": {"task_id": "cmd-running"}});
    publish("bmw.task.create", "create-cmd-running", running).await;
    assert_eventually!(
        Duration::from_secs(10),
        state("cmd-running").await == "active",
        "cmd-running does not run"
    );
    for id in ["cmd-pending", "cmd-delayed", "cmd-dead", "cmd-running"] {
        let body = json!({"task_type": "async", "task_id": id});
        as_operator("bmw.task.delete", &format!("delete-{id}"), body).await;
        assert_eventually!(
            Duration::from_secs(10),
            state(id).await.is_empty(),
            "{id} not deleted"
        );
    }
    worker
        .wait_log(
            Duration::from_secs(5),
            &["async task deleted while running", "cmd-running"],
        )
        .await;
    let periodic = json!({"kind": kind, "options": {"every": "1s"}});
    publish("bmw.task.create", "create-periodic", periodic).await;
    assert_eventually!(
        Duration::from_secs(10),
        list_tasks(&base, "periodic")
            .await
            .first()
            .is_some_and(|r| r["runs"].as_u64() > Some(0)),
        "the producer's periodic task did not run"
    );
    let body = json!({"task_type": "periodic", "kind": kind});
    as_operator("bmw.task.delete", "delete-periodic", body).await;
    assert_eventually!(
        Duration::from_secs(10),
        list_tasks(&base, "periodic").await.is_empty(),
        "the producer's periodic task was not deleted"
    );
}

/// The shipped permissions file (`BMW_TEST_PERMISSIONS_CONF` names another,
/// to check that removing any one grant fails this test).
fn permissions_conf() -> String {
    std::env::var("BMW_TEST_PERMISSIONS_CONF")
        .unwrap_or_else(|_| format!("{}/nats/permissions.conf", env!("CARGO_MANIFEST_DIR")))
}

/// A server under the shipped permissions, logging to a file of its own.
struct SecuredServer {
    server: NatsServer,
    log: tempfile::NamedTempFile,
}

impl SecuredServer {
    async fn start() -> SecuredServer {
        let log = tempfile::NamedTempFile::new().unwrap();
        // The shipped file as it is, after the variables it reads (as an
        // `include` would put it; nats-server includes only relative paths).
        let conf = with_role_passwords(&format!(
            "log_file: {:?}\n{}",
            log.path().display().to_string(),
            std::fs::read_to_string(permissions_conf()).unwrap()
        ));
        let server = NatsServer::start_with_config(&conf).await;
        SecuredServer { server, log }
    }

    /// Asserts that the server logged no permission violation.
    fn assert_no_violation(&self) {
        let log = std::fs::read_to_string(self.log.path()).unwrap();
        let violations: Vec<&str> = log.lines().filter(|l| l.contains("Violation")).collect();
        assert!(
            violations.is_empty(),
            "permission violations:\n{}",
            violations.join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_seed_walkthrough_and_every_route_run_under_the_shipped_minimal_permissions() {
    // Only an admin may create streams: a worker on a fresh server stops
    // and says what to do.
    let fresh = SecuredServer::start().await;
    let mut refused = BmwProcess::spawn_with_env(
        &["worker", "--nats-url", &fresh.server.url()],
        &as_user("bmw-worker"),
    );
    let status = refused.wait_exit(Duration::from_secs(30)).await;
    assert!(status.is_some_and(|s| !s.success()), "{status:?}");
    refused
        .wait_log(Duration::from_secs(2), &["bmw: ", "run `bmw provision`"])
        .await;
    // The admin provisions another; then every role works on it.
    let secured = SecuredServer::start().await;
    provision_as_admin(&secured.server.url()).await;
    every_role_at_work(&secured.server).await;
    secured.assert_no_violation();
}

/// Whether a JetStream publish as this context's user is refused (the
/// server drops a publish its user may not make: no ack comes).
async fn refused(js: &async_nats::jetstream::Context, subject: &str, body: Value) -> bool {
    match js
        .publish(subject.to_owned(), body.to_string().into())
        .await
    {
        Err(_) => true,
        Ok(ack) => ack.await.is_err(),
    }
}

/// The messages and `max_msgs` of `BMW_ASYNC`, read by the admin.
async fn async_stream(admin: &async_nats::jetstream::Context) -> (u64, i64) {
    let mut stream = admin.get_stream("BMW_ASYNC").await.unwrap();
    let info = stream.info().await.unwrap();
    (info.state.messages, info.config.max_messages)
}

#[tokio::test(flavor = "multi_thread")]
async fn each_role_is_refused_what_it_may_not_do() {
    let secured = SecuredServer::start().await;
    let url = secured.server.url();
    provision_as_admin(&url).await;
    let short = |client: async_nats::Client| {
        async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(client)
    };
    let admin = short(client_as(&url, "bmw-admin").await);
    let producer_client = client_as(&url, "bmw-producer").await;
    let producer = short(producer_client.clone());
    let worker_client = client_as(&url, "bmw-worker").await;

    // Two tasks wait on a queue no worker serves.
    for id in ["waiting-1", "waiting-2"] {
        let body = json!({"kind": "async:demo:echo"});
        producer
            .publish(format!("bmw.async.default.{id}"), body.to_string().into())
            .await
            .unwrap()
            .await
            .expect("a producer submits to its own queue");
    }
    let before = async_stream(&admin).await;
    assert_eq!(before.0, 3, "two tasks and the anchor");

    // The producer may not delete, reload or requeue, nor use another queue.
    let attempts = [
        (
            "bmw.task.delete",
            json!({"task_type": "async", "all": true}),
        ),
        (
            "bmw.task.reload",
            json!({"task_uni_id": "daemon:demo:demo-x"}),
        ),
        ("bmw.task.requeue", json!({"task_id": "waiting-1"})),
        ("bmw.async.other.x", json!({"kind": "async:demo:echo"})),
        ("bmw.schedule.x", json!({})),
        ("$KV.bmw_daemon_tasks.x", json!({})),
    ];
    // (Each refusal is a timeout: all at once.)
    let refusals = attempts.map(|(subject, body)| {
        let producer = producer.clone();
        async move { (subject, refused(&producer, subject, body).await) }
    });
    for (subject, was_refused) in futures::future::join_all(refusals).await {
        assert!(was_refused, "a producer published on {subject}");
    }
    // No role but the admin may change a stream.
    let users = [
        "bmw-producer",
        "bmw-worker",
        "bmw-bridge",
        "bmw-operator",
        "bmw-console",
    ];
    let changes = users.map(|user| {
        let url = url.clone();
        async move {
            let js = short(client_as(&url, user).await);
            let update = js
                .update_stream(async_nats::jetstream::stream::Config {
                    name: "BMW_ASYNC".into(),
                    subjects: vec!["bmw.async.>".into(), "bmw.anchor.async".into()],
                    retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
                    max_messages: 1,
                    ..Default::default()
                })
                .await;
            let delete = js.delete_stream("BMW_ASYNC").await;
            (user, update.is_err(), delete.is_err())
        }
    });
    for (user, update_refused, delete_refused) in futures::future::join_all(changes).await {
        assert!(update_refused, "{user} updated BMW_ASYNC");
        assert!(delete_refused, "{user} deleted BMW_ASYNC");
    }
    assert!(
        short(client_as(&url, "bmw-producer").await)
            .get_stream("BMW_ASYNC")
            .await
            .is_err(),
        "a producer read a stream's config"
    );
    assert_eq!(async_stream(&admin).await, before, "BMW_ASYNC is as it was");

    // Nobody reads another's inbox: the producer's own prefix is delivered
    // to it, the bridge's is not.
    let mut own = producer_client
        .subscribe("_INBOX_bmw-producer.own")
        .await
        .unwrap();
    let mut others = producer_client
        .subscribe("_INBOX_bmw-bridge.>")
        .await
        .unwrap();
    producer_client.flush().await.unwrap();
    for subject in ["_INBOX_bmw-bridge.reply", "_INBOX_bmw-producer.own"] {
        worker_client
            .publish(subject, "secret".into())
            .await
            .unwrap();
    }
    worker_client.flush().await.unwrap();
    use futures::StreamExt;
    let delivered = tokio::time::timeout(Duration::from_secs(5), own.next()).await;
    assert!(matches!(delivered, Ok(Some(_))), "the producer's own inbox");
    let leaked = tokio::time::timeout(Duration::from_millis(500), others.next()).await;
    assert!(
        !matches!(leaked, Ok(Some(_))),
        "the producer read the bridge's inbox"
    );

    // A console bridge shows everything and changes nothing.
    let console = BmwProcess::serve("bridge", &url, &[], &as_user("bmw-console")).await;
    let base = console.base_url();
    let (status, body) = http(Method::GET, &format!("{base}/bmw/queue/"), None).await;
    assert_eq!(status, 200, "{body}");
    assert!(list_tasks(&base, "daemon").await.is_empty());
    let writes = [
        (Method::POST, json!({"kind": "async:demo:echo"})),
        (
            Method::POST,
            json!({"kind": "daemon:demo:demo", "payload": {"content": "ok"}}),
        ),
        (
            Method::DELETE,
            json!({"task_type": "async", "task_id": "waiting-1"}),
        ),
    ];
    let answers = writes.map(|(method, body)| {
        let url = format!("{base}/bmw/task/");
        async move {
            let (status, answer) = http(method.clone(), &url, Some(&body.to_string())).await;
            (method, body, status, answer)
        }
    });
    for (method, body, status, answer) in futures::future::join_all(answers).await {
        assert!(
            status == 403
                && answer["message"]
                    .to_string()
                    .contains("Permissions Violation"),
            "a console {method} {body} answered {status}: {answer}"
        );
        assert!(
            answer["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
    }
    assert_eq!(async_stream(&admin).await, before, "nothing changed");
    assert!(list_tasks(&base, "daemon").await.is_empty());
}
