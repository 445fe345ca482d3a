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
    /// Every setting (bmw::config::ConfigOverrides).
    #[command(flatten)]
    settings: ConfigOverrides,
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
    fn config(&self) -> anyhow::Result<Config> {
        let mut given = self.settings.clone();
        if let Some(path) = &self.config {
            given = given.or(ConfigOverrides::from_file(path)?);
        }
        Ok(Config::resolve(given)?)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Resolved once; a settings error is reported by `run`, with logging up.
    let config = cli.global.config();
    let traces = match traces(&cli.command, config.as_ref().ok()) {
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
    let ran = match config {
        Ok(config) => run(cli, config).await,
        Err(e) => Err(e),
    };
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
    command: &Role,
    config: Option<&Config>,
) -> anyhow::Result<Option<(bmw::logging::ExtraLayer, bmw::traces::TraceExport)>> {
    let role = match command {
        Role::Run => "run",
        Role::Worker => "worker",
        Role::Bridge => "bridge",
        Role::Task(_) | Role::Provision => return Ok(None),
    };
    let Some(endpoint) = config.and_then(|c| c.otlp_endpoint.clone()) else {
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

async fn run(cli: Cli, config: Config) -> anyhow::Result<ExitCode> {
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
