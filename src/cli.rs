//! `bmw task`: the command-line client. Each subcommand opens the stores as
//! every role does ([`crate::service::open`]), builds its command as the
//! JSON a producer would publish and submits it through the wire parser the
//! bridge uses (`command::wire`), prints the
//! answer on stdout (JSON, or a table with `--table`) and nothing else, and
//! says how it ended in its exit code ([`CliError::exit_code`]).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Subcommand;
use serde_json::{Value, json};

use crate::client::{Submitted, TaskClient};
use crate::command::wire;
use crate::config::Config;
use crate::nats::names;

use crate::registry::Registry;
use crate::service::{self, ServiceError};
use crate::task::{OpError, Outcome};

/// What `bmw task --help` ends with.
pub const TASK_HELP: &str = "\
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

/// Why `bmw task` stopped without an answer to print.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// NATS could not be reached, or the stores not opened.
    #[error(transparent)]
    Open(#[from] ServiceError),
    /// bmw failed to answer (a listing or a read that could not be done).
    #[error(transparent)]
    Op(#[from] OpError),
    /// An argument that must be JSON is not.
    #[error("{what} is not JSON")]
    NotJson {
        /// Which argument.
        what: &'static str,
        /// The parser's complaint.
        source: serde_json::Error,
    },
    /// A task type this command does not take.
    #[error("listing {0} tasks is not supported by this version")]
    Unsupported(String),
    /// Standard input could not be read (`bmw task batch`).
    #[error("reading stdin")]
    Stdin(#[source] std::io::Error),
    /// The batch route answered fewer outcomes than it was sent items.
    #[error("the batch answered fewer outcomes than items")]
    ShortBatch,
}

impl CliError {
    /// 3 when NATS could not be reached (no answer, credentials or TLS
    /// refused), 1 for anything else.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Open(ServiceError::Connect(_)) => ExitCode::from(EXIT_NO_NATS),
            _ => ExitCode::FAILURE,
        }
    }
}

/// The subcommands of `bmw task`.
#[derive(Debug, Subcommand)]
pub enum TaskCmd {
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

/// Runs one `bmw task` subcommand and says how it ended: success, or 1 when
/// bmw refused (the printed answer says why).
///
/// # Errors
///
/// [`CliError`] when there is no answer to print.
pub async fn run(
    cmd: TaskCmd,
    config: Config,
    registry: Arc<Registry>,
    table: bool,
) -> Result<ExitCode, CliError> {
    let mut settings = config.connect_settings(config.nats_url_or_default());
    settings.first_connect_wait = TASK_CONNECT_WAIT;
    let (nats, ops) = service::open(&config, &settings, names::client_name::TASK, registry).await?;
    let client = TaskClient::with_operations(nats, ops, config.reply_timeout);
    let answer = match cmd {
        TaskCmd::Batch => return batch(&client).await,
        TaskCmd::List { task_type } => match task_type.as_str() {
            "daemon" => to_value(client.list_daemon().await?),
            "async" => to_value(client.list_async(&Default::default()).await?.tasks),
            "periodic" => to_value(client.list_periodic().await?),
            other => return Err(CliError::Unsupported(other.to_owned())),
        },
        TaskCmd::Get { task_id } => to_value(client.get_async(&task_id).await?),
        TaskCmd::Requeue { task_id } => client.requeue(&task_id).await?,
        TaskCmd::Pause { kind } => client.pause_periodic(&kind, true).await?,
        TaskCmd::Resume { kind } => client.pause_periodic(&kind, false).await?,
        TaskCmd::Queues => to_value(client.queue_stats().await?),
        TaskCmd::Create {
            kind,
            payload,
            options,
        } => {
            let body = json!({
                "kind": kind,
                "payload": json_arg("payload", &payload)?,
                "options": json_arg("options", &options)?,
            });
            return submit(&client, names::SUBJECT_CREATE, body, table).await;
        }
        TaskCmd::Delete { id, task_type } => {
            let field = match task_type.as_str() {
                "async" => "task_id",
                "periodic" => "kind",
                // A daemon task, or a type the parser refuses by name.
                _ => "task_uni_id",
            };
            let body = json!({"task_type": task_type, field: id});
            return submit(&client, names::SUBJECT_DELETE, body, table).await;
        }
        TaskCmd::Reload { uni_id, payload } => {
            let payload = match payload {
                Some(text) => json_arg("payload", &text)?,
                None => Value::Null,
            };
            let body = json!({"task_uni_id": uni_id, "payload": payload});
            return submit(&client, names::SUBJECT_RELOAD, body, table).await;
        }
    };
    print_answer(&answer, table);
    Ok(ExitCode::SUCCESS)
}

/// An argument that must be JSON, read.
fn json_arg(what: &'static str, text: &str) -> Result<Value, CliError> {
    serde_json::from_str(text).map_err(|source| CliError::NotJson { what, source })
}

/// Submits a create, delete or reload given as the JSON a producer
/// publishes on `subject`, through the bridge's parser, and prints its
/// outcome as the bridge would answer it.
async fn submit(
    client: &TaskClient,
    subject: &str,
    body: Value,
    table: bool,
) -> Result<ExitCode, CliError> {
    let submitted = match wire::parse_value(subject, body) {
        Ok(command) => client.submit(command).await,
        Err(invalid) => Err(invalid.into()),
    };
    let answer = match submitted {
        Ok(Submitted::Done(outcome)) => outcome,
        Ok(Submitted::Accepted { data }) => Outcome {
            message: crate::client::ACCEPTED_MESSAGE.into(),
            ..Outcome::ok(data)
        },
        Ok(Submitted::Duplicate { data }) => Outcome {
            message: crate::client::DUPLICATE_MESSAGE.into(),
            ..Outcome::ok(data)
        },
        // A refusal is an answer: print it as the bridge would send it.
        Err(e) => Outcome::from(e),
    };
    print_answer(&answer, table);
    Ok(if answer.result {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn to_value(answer: impl serde::Serialize) -> Value {
    serde_json::to_value(answer).expect("an answer serializes")
}

/// Prints an answer: pretty JSON, or a table with `--table`.
#[allow(clippy::print_stdout)]
fn print_answer(answer: &impl serde::Serialize, table: bool) {
    let value = serde_json::to_value(answer).expect("an answer serializes");
    if table {
        print!("{}", crate::client::table::render(&value));
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("a JSON value serializes")
        );
    }
}

/// Lines of stdin `bmw task batch` submits at once.
const BATCH_CHUNK_LINES: usize = 1_000;

/// `bmw task batch`: creates from JSON lines on stdin, one outcome line each.
async fn batch(client: &TaskClient) -> Result<ExitCode, CliError> {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut chunk = Vec::new();
    let mut line_number = 0usize;
    let mut all_created = true;
    loop {
        let line = lines.next_line().await.map_err(CliError::Stdin)?;
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
) -> Result<bool, CliError> {
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
            None => outcomes.next().ok_or(CliError::ShortBatch)?,
        };
        all_created &= outcome.result;
        println!(
            "{}",
            serde_json::to_string(&outcome).expect("an outcome serializes")
        );
    }
    Ok(all_created)
}
