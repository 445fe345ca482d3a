//! The `bmw` binary: parses the command line, sets up logging and metrics,
//! and calls into the library. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use bmw::config::{Config, ConfigOverrides};
use bmw::nats::{Nats, names};
use bmw::task::{Command as TaskCommand, CreateCommand, DeleteTarget, Outcome};
use bmw::{Registry, client::Submitted, client::TaskClient};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// bmw: BlueKing monitor worker on NATS JetStream (daemon tasks, commands on
/// `bmw.task.*`, and an HTTP bridge with BMW's API).
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Role,
    #[command(flatten)]
    global: Global,
}

#[derive(Debug, Args)]
struct Global {
    /// NATS server URL(s), comma-separated. `bmw run` without it starts a local nats-server.
    #[arg(long, global = true, env = "BMW_NATS_URL", hide_env_values = true)]
    nats_url: Option<String>,
    /// Bridge listen address (`bmw run`, `bmw bridge`); also serves /bmw/metrics, /metrics, /health, /ready
    /// [default: 127.0.0.1:10211; another host needs a token or --insecure-no-auth].
    #[arg(long, global = true, env = "BMW_HTTP_ADDR")]
    http_addr: Option<String>,
    /// Where `bmw worker` serves /bmw/metrics, /metrics and /health; `off` serves none;
    /// each worker on a host needs its own [default: 127.0.0.1:10213].
    #[arg(long, global = true, env = "BMW_METRICS_ADDR")]
    metrics_addr: Option<String>,
    /// Queues this worker takes tasks from, comma-separated, with optional weights:
    /// `critical=6,default=3,low=1` [default: default].
    #[arg(long, global = true, env = "BMW_QUEUES", value_delimiter = ',')]
    queues: Option<Vec<String>>,
    /// Claim TTL: a dead worker's daemon tasks move after this long [default: 15s].
    #[arg(long, global = true, env = "BMW_CLAIM_TTL")]
    claim_ttl: Option<String>,
    /// How often claims and the worker entry are renewed [default: 5s].
    #[arg(long, global = true, env = "BMW_HEARTBEAT")]
    heartbeat: Option<String>,
    /// First retry delay of a failed daemon instance [default: 10s].
    #[arg(long, global = true, env = "BMW_RETRY_BASE")]
    retry_base: Option<String>,
    /// Retry count after which each delay doubles [default: 5].
    #[arg(long, global = true, env = "BMW_RETRY_THRESHOLD")]
    retry_threshold: Option<u32>,
    /// Ceiling of a retry delay [default: 15m].
    #[arg(long, global = true, env = "BMW_RETRY_MAX")]
    retry_max: Option<String>,
    /// Time running instances get to stop on shutdown [default: 10s].
    #[arg(long, global = true, env = "BMW_GRACE")]
    grace: Option<String>,
    /// How long the bridge waits for a worker's outcome before answering 202 [default: 5s].
    #[arg(long, global = true, env = "BMW_REPLY_TIMEOUT")]
    reply_timeout: Option<String>,
    /// Replicas of streams and buckets: 1 on one server, 3 on a cluster [default: 1].
    #[arg(long, global = true, env = "BMW_REPLICAS")]
    replicas: Option<usize>,
    /// Data directory (the local nats-server's store and binary) [default: .bmw].
    #[arg(long, global = true, env = "BMW_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Largest request body the bridge accepts, in bytes [default: 1048576].
    #[arg(long, global = true, env = "BMW_MAX_BODY")]
    max_body: Option<usize>,
    /// Async tasks a worker runs at once [default: 32].
    #[arg(long, global = true, env = "BMW_CONCURRENCY")]
    concurrency: Option<usize>,
    /// Delay after an async task's first failed attempt, doubling after, with jitter [default: 5s].
    #[arg(long, global = true, env = "BMW_ASYNC_RETRY_BASE")]
    async_retry_base: Option<String>,
    /// Ceiling of an async retry delay [default: 1h].
    #[arg(long, global = true, env = "BMW_ASYNC_RETRY_MAX")]
    async_retry_max: Option<String>,
    /// How long a fetched async task may go unacknowledged before another worker gets it [default: 30s].
    #[arg(long, global = true, env = "BMW_ASYNC_ACK_WAIT")]
    async_ack_wait: Option<String>,
    /// Most tasks a queue may hold (waiting or running) before creates on it
    /// are refused with 429 [default: 1000000].
    #[arg(long, global = true, env = "BMW_MAX_QUEUE_PENDING")]
    max_queue_pending: Option<u64>,
    /// Time limit of an async attempt whose task gives neither `timeout` nor
    /// `deadline`; 0s for none [default: 30m].
    #[arg(long, global = true, env = "BMW_ASYNC_DEFAULT_TIMEOUT")]
    async_default_timeout: Option<String>,
    /// A bearer token the bridge accepts: `rw:<secret>`, `ro:<secret>` (reads only) or a
    /// bare secret (read-write). Repeat the flag, or comma-separate in BMW_API_TOKEN.
    #[arg(
        long,
        global = true,
        env = "BMW_API_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_token: Option<Vec<String>>,
    /// A file of bridge tokens, one `rw <secret>` or `ro <secret>` per line (`#` comments).
    #[arg(long, global = true, env = "BMW_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// Put /metrics behind the tokens too (any token; read-only is enough).
    #[arg(long, global = true, env = "BMW_METRICS_REQUIRE_TOKEN")]
    metrics_require_token: bool,
    /// Serve the bridge on a non-loopback address with no token: anyone who can
    /// reach it can create, delete and reload tasks.
    #[arg(long, global = true, env = "BMW_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
    /// Host names a browser may reach the bridge by, beside IP addresses and
    /// `localhost` (comma-separated; a leading `.` allows a domain's
    /// subdomains): a browser's request for any other `Host` is refused 403,
    /// so a DNS-rebinding page cannot use it. Requests without browser
    /// headers (curl, bk-monitor) are not checked.
    #[arg(long, global = true, env = "BMW_ALLOWED_HOSTS", value_delimiter = ',')]
    allowed_hosts: Option<Vec<String>>,
    /// Requests the bridge serves at once; more are answered 503 with Retry-After [default: 1024].
    #[arg(long, global = true, env = "BMW_MAX_CONCURRENT_REQUESTS")]
    max_concurrent_requests: Option<usize>,
    /// Longest a bridge request may take, from its first byte to its answer
    /// (504 after); longer than --reply-timeout [default: 30s].
    #[arg(long, global = true, env = "BMW_REQUEST_TIMEOUT")]
    request_timeout: Option<String>,
    /// PEM certificate chain: the bridge serves HTTPS (with --tls-key).
    #[arg(long, global = true, env = "BMW_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, env = "BMW_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// How far ahead a task's `process_at`, `process_in` and `deadline` may be [default: 1year].
    #[arg(long, global = true, env = "BMW_MAX_TASK_DELAY")]
    max_task_delay: Option<String>,
    /// The longest per-attempt `timeout` of a task [default: 1day].
    #[arg(long, global = true, env = "BMW_MAX_TASK_TIMEOUT")]
    max_task_timeout: Option<String>,
    /// The longest `retention` of a task [default: 30days].
    #[arg(long, global = true, env = "BMW_MAX_RETENTION")]
    max_retention: Option<String>,
    /// The longest `unique_ttl` of a task [default: 30days].
    #[arg(long, global = true, env = "BMW_MAX_UNIQUE_TTL")]
    max_unique_ttl: Option<String>,
    /// Register the demo kinds (`daemon:demo:demo`, `async:demo:*`, `periodic:demo:tick`)
    /// [default: on for `bmw run` and `bmw task`, off for `bmw worker` and `bmw bridge`].
    #[arg(
        long,
        global = true,
        env = "BMW_DEMO_KINDS",
        num_args = 0..=1,
        default_missing_value = "true",
        require_equals = true,
        overrides_with = "demo_kinds"
    )]
    demo_kinds: Option<bool>,
    /// A directory of task kind files: every `*.toml` in it holds `[[kind]]` tables
    /// (as the --config file may), read by `bmw run` and `bmw worker`.
    #[arg(long, global = true, env = "BMW_KINDS_DIR")]
    kinds_dir: Option<PathBuf>,
    /// Optional TOML config file; keys are the long flag names (`claim-ttl = "15s"`).
    #[arg(long, global = true, env = "BMW_CONFIG")]
    config: Option<PathBuf>,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true, env = "BMW_LOG_JSON")]
    log_json: bool,
    /// `bmw task`: also log what it does, on stderr (it prints only its
    /// answer otherwise; `BMW_LOG` sets the filter either way).
    #[arg(short = 'v', long, global = true)]
    verbose: bool,
    /// `bmw task`: print the answer as a plain-text table instead of JSON.
    #[arg(long, global = true)]
    table: bool,
    // NATS credentials and TLS: secrets' values never show in --help.
    /// NATS credentials file (user JWT and nkey seed, as `nsc` writes it).
    #[arg(long, global = true, env = "BMW_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// NATS user nkey: the seed (SU...) or a file holding it.
    #[arg(long, global = true, env = "BMW_NATS_NKEY", hide_env_values = true)]
    nats_nkey: Option<String>,
    /// NATS user (with --nats-password).
    #[arg(long, global = true, env = "BMW_NATS_USER")]
    nats_user: Option<String>,
    /// NATS password (prefer the environment variable: a flag shows in `ps`).
    #[arg(long, global = true, env = "BMW_NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// NATS token (prefer the environment variable: a flag shows in `ps`).
    #[arg(long, global = true, env = "BMW_NATS_TOKEN", hide_env_values = true)]
    nats_token: Option<String>,
    /// CA certificate (PEM) that signed nats-server's certificate [default: system roots].
    #[arg(long, global = true, env = "BMW_NATS_CA")]
    nats_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a nats-server that verifies clients (with --nats-key).
    #[arg(long, global = true, env = "BMW_NATS_CERT")]
    nats_cert: Option<PathBuf>,
    /// Private key (PEM) of --nats-cert.
    #[arg(long, global = true, env = "BMW_NATS_KEY")]
    nats_key: Option<PathBuf>,
    /// Refuse to connect to NATS without TLS.
    #[arg(long, global = true, env = "BMW_NATS_REQUIRE_TLS")]
    nats_require_tls: bool,
    /// Prefix of this process's reply subjects, `_INBOX_<user>` where the
    /// server lets each user subscribe only to its own (nats/permissions.conf)
    /// [default: _INBOX].
    #[arg(long, global = true, env = "BMW_NATS_INBOX_PREFIX")]
    nats_inbox_prefix: Option<String>,
    /// What bmw's streams and buckets may hold together in NATS (e.g. 4GiB,
    /// 500MB), shared out among them; set by `bmw provision` and when a
    /// stream is created [default: 4GiB].
    #[arg(long, global = true, env = "BMW_STORAGE_MAX_BYTES")]
    storage_max_bytes: Option<String>,
    /// When the local nats-server `bmw run` starts (no --nats-url) fsyncs its
    /// store: `always` (before every acknowledgement: nothing acknowledged is
    /// lost on power loss) or an interval such as `2m` (faster; a power loss
    /// loses up to that much) [default: always].
    #[arg(long, global = true, env = "BMW_NATS_SYNC")]
    nats_sync: Option<String>,
    // Traces.
    /// Export OpenTelemetry traces (OTLP over HTTP, protobuf) to this collector
    /// (`bmw run`, `bmw worker`, `bmw bridge`): its base URL, e.g.
    /// `http://127.0.0.1:4318` [default: off].
    #[arg(long, global = true, env = "BMW_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// Bridge and worker in one process (starts a local nats-server without --nats-url).
    Run,
    /// A worker only.
    Worker,
    /// The HTTP bridge only.
    Bridge,
    /// Create, list, delete or reload tasks by talking to NATS directly.
    #[command(subcommand, after_help = TASK_HELP)]
    Task(TaskCmd),
    /// Create or update the streams and buckets, then exit.
    Provision,
}

/// What `bmw task --help` ends with.
const TASK_HELP: &str = "\
Each command prints its answer as JSON on stdout and nothing else (--table: a plain-text
table instead; -v adds logs on stderr); an error is one line on stderr.

Exit codes:
  0  done (a create, delete or reload accepted; a listing printed)
  1  refused by bmw (the answer, printed, says why) or failed after connecting
  2  bad usage (unknown subcommand, missing argument)
  3  NATS not reachable (no answer within 5 s, credentials or TLS refused)

Examples:
  bmw task create daemon:demo:demo '{\"content\":\"ok\"}'
  bmw task create async:demo:noop --options '{\"queue\":\"default\"}'
  bmw task list --type async
  bmw task list --table
  bmw task get <task_id>
  bmw task delete <uni_id>
  bmw task delete <task_id> --type async
  bmw task reload <uni_id> '{\"content\":\"new\"}'
  bmw task requeue <task_id>
  bmw task pause periodic:demo:tick
  bmw task queues
  printf '%s\\n' '{\"kind\":\"async:demo:noop\"}' | bmw task batch";

/// How long `bmw task` tries to reach NATS before it gives up (exit 3).
const TASK_CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// `bmw task`'s exit code when NATS cannot be reached.
const EXIT_NO_NATS: u8 = 3;

#[derive(Debug, Subcommand)]
enum TaskCmd {
    /// Create a task: `bmw task create daemon:demo:demo '{"content":"ok"}'`.
    Create {
        /// The task's kind.
        kind: String,
        /// The payload as JSON.
        #[arg(default_value = "{}")]
        payload: String,
        /// The options as JSON, e.g. '{"queue":"default"}'.
        #[arg(long, default_value = "{}")]
        options: String,
    },
    /// Create many tasks: one create body (`{"kind", "payload", "options"}`)
    /// per line of stdin, sent in chunks of 1,000; prints one outcome per
    /// line, in order, and exits 1 if any was refused.
    Batch,
    /// List tasks as JSON.
    List {
        /// Task type.
        #[arg(long = "type", default_value = "daemon")]
        task_type: String,
    },
    /// Delete a task: a daemon task by uni_id, an async task by task id, a periodic task by kind.
    Delete {
        /// The daemon task's uni_id, or the async task's id.
        id: String,
        /// Task type.
        #[arg(long = "type", default_value = "daemon")]
        task_type: String,
    },
    /// Show one async task by id.
    Get {
        /// The task id.
        task_id: String,
    },
    /// Re-enqueue an archived async task.
    Requeue {
        /// The task id.
        task_id: String,
    },
    /// Per-queue stats of async tasks.
    Queues,
    /// Pause a periodic task (its ticks stop; the task is kept).
    Pause {
        /// The periodic kind.
        kind: String,
    },
    /// Resume a paused periodic task.
    Resume {
        /// The periodic kind.
        kind: String,
    },
    /// Restart a daemon task by uni_id.
    Reload {
        /// The task's uni_id.
        uni_id: String,
        /// Keys to merge into its payload (a JSON object), as BMW's reload.
        payload: Option<String>,
    },
}

impl Global {
    fn overrides(&self) -> ConfigOverrides {
        ConfigOverrides {
            nats_url: self.nats_url.clone(),
            http_addr: self.http_addr.clone(),
            metrics_addr: self.metrics_addr.clone(),
            queues: self.queues.clone(),
            claim_ttl: self.claim_ttl.clone(),
            heartbeat: self.heartbeat.clone(),
            retry_base: self.retry_base.clone(),
            retry_threshold: self.retry_threshold,
            retry_max: self.retry_max.clone(),
            grace: self.grace.clone(),
            reply_timeout: self.reply_timeout.clone(),
            replicas: self.replicas,
            data_dir: self.data_dir.clone(),
            max_body: self.max_body,
            concurrency: self.concurrency,
            async_retry_base: self.async_retry_base.clone(),
            async_retry_max: self.async_retry_max.clone(),
            async_ack_wait: self.async_ack_wait.clone(),
            max_queue_pending: self.max_queue_pending,
            async_default_timeout: self.async_default_timeout.clone(),
            api_token: self.api_token.clone(),
            api_token_file: self.api_token_file.clone(),
            metrics_require_token: self.metrics_require_token.then_some(true),
            insecure_no_auth: self.insecure_no_auth.then_some(true),
            allowed_hosts: self.allowed_hosts.clone(),
            max_concurrent_requests: self.max_concurrent_requests,
            request_timeout: self.request_timeout.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            max_task_delay: self.max_task_delay.clone(),
            max_task_timeout: self.max_task_timeout.clone(),
            max_retention: self.max_retention.clone(),
            max_unique_ttl: self.max_unique_ttl.clone(),
            demo_kinds: self.demo_kinds,
            nats_creds: self.nats_creds.clone(),
            nats_nkey: self.nats_nkey.clone().map(Into::into),
            nats_user: self.nats_user.clone(),
            nats_password: self.nats_password.clone().map(Into::into),
            nats_token: self.nats_token.clone().map(Into::into),
            nats_ca: self.nats_ca.clone(),
            nats_cert: self.nats_cert.clone(),
            nats_key: self.nats_key.clone(),
            nats_require_tls: self.nats_require_tls.then_some(true),
            nats_inbox_prefix: self.nats_inbox_prefix.clone(),
            storage_max_bytes: self.storage_max_bytes.clone(),
            nats_sync: self.nats_sync.clone(),
            // `[[kind]]` tables come from the --config file only.
            kind: None,
            kinds_dir: self.kinds_dir.clone(),
            otlp_endpoint: self.otlp_endpoint.clone(),
        }
    }

    fn config(&self) -> anyhow::Result<Config> {
        let mut given = self.overrides();
        if let Some(path) = &self.config {
            given = given.or(ConfigOverrides::from_file(path)?);
        }
        Ok(Config::resolve(given)?)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let traces = match traces(&cli) {
        Ok(traces) => traces,
        Err(e) => return failed(&e),
    };
    let (layer, export) = traces.unzip();
    let is_task = matches!(cli.command, Role::Task(_));
    let default_filter = if is_task && !cli.global.verbose {
        bmw::logging::QUIET_FILTER
    } else {
        bmw::logging::DEFAULT_FILTER
    };
    bmw::logging::init_with_default(cli.global.log_json, layer, default_filter);
    let ran = run(cli).await;
    if let Some(export) = export {
        export.shutdown().await;
    }
    match ran {
        Ok(code) => code,
        Err(e) if is_task && e.chain().any(|c| c.is::<bmw::nats::ConnectError>()) => {
            failed(&e);
            ExitCode::from(EXIT_NO_NATS)
        }
        Err(e) => failed(&e),
    }
}

/// Logs and prints why bmw stops.
fn failed(error: &anyhow::Error) -> ExitCode {
    let message = error_chain(error);
    tracing::error!("{message}");
    eprintln!("bmw: {message}");
    ExitCode::FAILURE
}

/// The trace exporter of a serving role whose settings give an
/// `--otlp-endpoint` (read before logging starts: the exporter is a layer
/// of the subscriber); none for `bmw task` and `bmw provision`.
fn traces(
    cli: &Cli,
) -> anyhow::Result<Option<(bmw::logging::ExtraLayer, bmw::traces::TraceExport)>> {
    let role = match cli.command {
        Role::Run => "run",
        Role::Worker => "worker",
        Role::Bridge => "bridge",
        Role::Task(_) | Role::Provision => return Ok(None),
    };
    // A settings error is reported by `run`, with logging up.
    let Some(endpoint) = cli.global.config().ok().and_then(|c| c.otlp_endpoint) else {
        return Ok(None);
    };
    let (layer, export) = bmw::traces::exporter_layer(&endpoint, role)?;
    Ok(Some((layer, export)))
}

/// An error and its causes on one line, leaving out a cause whose text the
/// line already ends with (async-nats's errors print their source too).
fn error_chain(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = cli.global.config()?;
    // The demo kinds: on by default only where the README's walkthrough
    // needs them (`bmw run`); `bmw task` only validates kinds with them.
    let demo_kinds = config
        .demo_kinds
        .unwrap_or(matches!(cli.command, Role::Run | Role::Task(_)));
    let mut registry = if demo_kinds {
        bmw::builtin::registry()
    } else {
        Registry::new()
    };
    // Declared kinds run where tasks run; a bridge learns them from the
    // workers' entries in `bmw_workers`, as it learns compiled ones.
    if matches!(cli.command, Role::Run | Role::Worker) {
        bmw::external::register(&mut registry, &config.kinds)?;
    }
    let registry = Arc::new(registry);
    bmw::metrics::install();
    let token = CancellationToken::new();
    let on_signal = token.clone();
    tokio::spawn(async move {
        bmw::shutdown::shutdown_signal().await;
        on_signal.cancel();
    });
    match cli.command {
        Role::Run => bmw::service::run_all(config, registry, token).await?,
        Role::Worker => bmw::service::run_worker(config, registry, token).await?,
        Role::Bridge => bmw::service::run_bridge(config, registry, token).await?,
        Role::Provision => {
            let nats = connect(&config, names::client_name::PROVISION).await?;
            bmw::nats::provision::provision(&nats.js, &config.provision_settings()).await?;
            tracing::info!("streams and buckets are provisioned");
        }
        Role::Task(cmd) => return task(cmd, config, registry, cli.global.table).await,
    }
    Ok(ExitCode::SUCCESS)
}

async fn connect(config: &Config, name: &str) -> anyhow::Result<Nats> {
    let settings = config.connect_settings(config.nats_url_or_default());
    Ok(Nats::connect_with(&settings, name).await?)
}

/// Prints an answer of `bmw task`: pretty JSON, or a table with `--table`.
#[allow(clippy::print_stdout)]
fn print_answer(answer: &impl serde::Serialize, table: bool) -> anyhow::Result<()> {
    let value = serde_json::to_value(answer)?;
    if table {
        print!("{}", bmw::client::table::render(&value));
    } else {
        println!("{}", serde_json::to_string_pretty(&value)?);
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn task(
    cmd: TaskCmd,
    config: Config,
    registry: Arc<Registry>,
    table: bool,
) -> anyhow::Result<ExitCode> {
    let mut settings = config.connect_settings(config.nats_url_or_default());
    settings.first_connect_wait = TASK_CONNECT_WAIT;
    let nats = Nats::connect_with(&settings, names::client_name::TASK).await?;
    bmw::nats::provision::ensure(&nats.js, &config.provision_settings()).await?;
    let ops = bmw::ops::Operations::open_with(&nats, registry, &config).await?;
    let client = TaskClient::with_operations(nats, ops, config.reply_timeout);
    let id = uuid::Uuid::new_v4().to_string();
    let command = match cmd {
        TaskCmd::Batch => return task_batch(&client).await,
        TaskCmd::List { task_type } => {
            let rows = match task_type.as_str() {
                "daemon" => serde_json::to_value(client.list_daemon().await?)?,
                "async" => {
                    serde_json::to_value(client.list_async(&Default::default()).await?.tasks)?
                }
                "periodic" => serde_json::to_value(client.list_periodic().await?)?,
                other => anyhow::bail!("listing {other} tasks is not supported by this version"),
            };
            print_answer(&rows, table)?;
            return Ok(ExitCode::SUCCESS);
        }
        TaskCmd::Get { task_id } => {
            print_answer(&client.get_async(&task_id).await?, table)?;
            return Ok(ExitCode::SUCCESS);
        }
        TaskCmd::Requeue { task_id } => {
            print_answer(&client.requeue(&task_id).await?, table)?;
            return Ok(ExitCode::SUCCESS);
        }
        TaskCmd::Pause { kind } => {
            print_answer(&client.pause_periodic(&kind, true).await?, table)?;
            return Ok(ExitCode::SUCCESS);
        }
        TaskCmd::Resume { kind } => {
            print_answer(&client.pause_periodic(&kind, false).await?, table)?;
            return Ok(ExitCode::SUCCESS);
        }
        TaskCmd::Queues => {
            print_answer(&client.queue_stats().await?, table)?;
            return Ok(ExitCode::SUCCESS);
        }
        TaskCmd::Create {
            kind,
            payload,
            options,
        } => {
            let payload = serde_json::from_str(&payload).context("payload is not JSON")?;
            let options = serde_json::from_str(&options).context("options is not JSON")?;
            TaskCommand::Create(Box::new(CreateCommand {
                id,
                kind: bmw::task::Kind::parse(&kind)?,
                payload,
                options: bmw::task::Options::from_json(Some(&options))?,
                origin: bmw::task::Origin::Direct,
            }))
        }
        TaskCmd::Delete {
            id: target,
            task_type,
        } => TaskCommand::Delete {
            id,
            target: match task_type.as_str() {
                "daemon" => DeleteTarget::Daemon(bmw::task::UniId::from_raw(target)),
                "async" => DeleteTarget::Async(target),
                "periodic" => DeleteTarget::Periodic(target),
                other => anyhow::bail!("deleting {other} tasks is not supported by this version"),
            },
        },
        TaskCmd::Reload { uni_id, payload } => TaskCommand::Reload {
            id,
            uni_id: bmw::task::UniId::from_raw(uni_id),
            payload: match payload {
                Some(text) => {
                    Some(serde_json::from_str(&text).context("payload is not a JSON object")?)
                }
                None => None,
            },
        },
    };
    let submitted = match client.submit(command).await {
        Ok(submitted) => submitted,
        // A refusal is an answer: print it as the bridge would send it.
        Err(e) => Submitted::Done(Outcome::from(e)),
    };
    match submitted {
        Submitted::Done(outcome) => {
            print_answer(&outcome, table)?;
            Ok(if outcome.result {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Submitted::Accepted { data } => {
            print_answer(
                &serde_json::json!({"result": true, "message": "accepted: no worker answered in time; the command is stored", "data": data}),
                table,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Submitted::Duplicate { data } => {
            print_answer(
                &serde_json::json!({"result": true, "message": bmw::client::DUPLICATE_MESSAGE, "data": data}),
                table,
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Lines of stdin `bmw task batch` submits at once.
const BATCH_CHUNK_LINES: usize = 1_000;

/// `bmw task batch`: creates from JSON lines on stdin, one outcome line each.
async fn task_batch(client: &TaskClient) -> anyhow::Result<ExitCode> {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut chunk = Vec::new();
    let mut line_number = 0usize;
    let mut all_created = true;
    loop {
        let line = lines.next_line().await.context("reading stdin")?;
        let end = line.is_none();
        if let Some(line) = line {
            line_number += 1;
            if !line.trim().is_empty() {
                chunk.push(
                    serde_json::from_str::<serde_json::Value>(&line).map_err(|e| {
                        Outcome::err(
                            400,
                            format!("invalid `body`: line {line_number} is not JSON: {e}"),
                        )
                    }),
                );
            }
        }
        if chunk.len() >= BATCH_CHUNK_LINES || (end && !chunk.is_empty()) {
            all_created &= submit_chunk(client, std::mem::take(&mut chunk)).await?;
        }
        if end {
            break;
        }
    }
    Ok(if all_created {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Submits the JSON lines of one chunk as a batch and prints an outcome per
/// line (a line that was not JSON is refused on its own); whether all were
/// created.
#[allow(clippy::print_stdout)]
async fn submit_chunk(
    client: &TaskClient,
    chunk: Vec<Result<serde_json::Value, Outcome>>,
) -> anyhow::Result<bool> {
    let mut refusals = Vec::with_capacity(chunk.len());
    let mut items = Vec::with_capacity(chunk.len());
    for line in chunk {
        match line {
            Ok(item) => {
                items.push(item);
                refusals.push(None);
            }
            Err(refused) => refusals.push(Some(refused)),
        }
    }
    let mut outcomes = client.submit_batch(items).await.into_iter();
    let mut all_created = true;
    for refusal in refusals {
        let outcome = match refusal {
            Some(refused) => refused,
            None => outcomes
                .next()
                .context("the batch answered fewer outcomes than items")?,
        };
        all_created &= outcome.result;
        println!("{}", serde_json::to_string(&outcome)?);
    }
    Ok(all_created)
}
