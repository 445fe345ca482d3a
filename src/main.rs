//! The `bmw` binary: parses the command line, sets up logging and metrics,
//! and calls into the library. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bmw::Registry;
use bmw::cli::{TASK_HELP, TaskCmd};
use bmw::config::{Config, ConfigOverrides};
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
        Role::Provision => bmw::service::provision(&config).await?,
        Role::Task(cmd) => {
            return Ok(
                match bmw::cli::run(cmd, config, registry, cli.global.table).await {
                    Ok(code) => code,
                    Err(e) => {
                        let code = e.exit_code();
                        failed(&e.into());
                        code
                    }
                },
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
