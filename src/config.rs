//! [`Config`]: the validated, typed settings every bmw process runs with.
//!
//! The binary parses flags and environment variables (clap) into a
//! [`ConfigOverrides`], reads an optional TOML file into another, and
//! [`Config::resolve`] merges them over the defaults: flag/env > file > default.
//! The rest of the crate only sees `Config`. The bridge's tokens are read in
//! `api_token` ([`ApiToken`]).

mod api_token;
mod kind_decl;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::nats::{ClientCert, ConnectSettings, NatsAuth, NatsTls};
pub use api_token::{ApiToken, TokenAccess};
pub use kind_decl::KindDecl;

/// A queue a worker takes async tasks from, and its weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueWeight {
    /// Queue name.
    pub name: String,
    /// Relative share under load.
    pub weight: u32,
}

/// Default of `--nats-sync`: fsync before every acknowledgement, so that
/// nothing acknowledged is lost on power loss (design note 74).
pub const DEFAULT_NATS_SYNC: crate::nats::local::StoreSync = crate::nats::local::StoreSync::Always;

/// NATS URL of every role but `bmw run` when none is given.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// Default bridge address: BMW's port, on loopback only (as BMW binds).
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:10211";
/// Where `bmw worker` serves its metrics unless told (BMW's worker port).
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:10213";
/// The `--metrics-addr` value that serves no metrics.
pub const METRICS_ADDR_OFF: &str = "off";
/// Default claim TTL: a dead worker's daemon tasks move after this long.
pub const DEFAULT_CLAIM_TTL: Duration = Duration::from_secs(15);
/// Default heartbeat: claims and the worker entry are renewed this often.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// Default first retry delay of a failed daemon instance (BMW: 10 s).
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_secs(10);
/// Default retry count after which each delay doubles (BMW: 5).
pub const DEFAULT_RETRY_THRESHOLD: u32 = 5;
/// Default ceiling of a retry delay (BMW: 15 min).
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(15 * 60);
/// Default time running instances get to stop on shutdown.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// Default time the bridge waits for a worker's outcome before answering 202.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Default number of async tasks a worker runs at once.
pub const DEFAULT_CONCURRENCY: usize = 32;
/// Default delay after an async task's first failed attempt (doubling after).
pub const DEFAULT_ASYNC_RETRY_BASE: Duration = Duration::from_secs(5);
/// Default ceiling of an async retry delay.
pub const DEFAULT_ASYNC_RETRY_MAX: Duration = Duration::from_secs(3600);
/// Default time a fetched async task may go without an ack before another
/// worker gets it (long handlers send `in_progress` every third of it).
pub const DEFAULT_ASYNC_ACK_WAIT: Duration = Duration::from_secs(30);
/// Default time limit of an async attempt whose task gives neither `timeout`
/// nor `deadline` (asynq's, which BMW inherits).
pub const DEFAULT_ASYNC_DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Default largest request body the bridge accepts.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// Default most tasks a queue may hold (waiting or running) before creates
/// on it are refused with 429.
pub const DEFAULT_MAX_QUEUE_PENDING: u64 = 1_000_000;
/// Default number of requests the bridge serves at once (more are answered 503).
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 1024;
/// Default longest time a bridge request may take, from its first byte to its
/// answer (longer than the reply timeout, so a create can answer 202 first).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

// Bounds: what the settings may be (refused at start otherwise), and the
// defaults of the bounds on task options.

/// A humantime year (365.25 days), so that bounds print as `1year`.
const YEAR: Duration = Duration::from_secs(31_557_600);
/// A day.
const DAY: Duration = Duration::from_secs(24 * 3600);
/// Default of `--max-task-delay`: how far ahead `process_at`, `process_in`
/// and `deadline` may be.
pub const DEFAULT_MAX_TASK_DELAY: Duration = YEAR;
/// Default of `--max-task-timeout`: the longest per-attempt `timeout`.
pub const DEFAULT_MAX_TASK_TIMEOUT: Duration = DAY;
/// Default of `--max-retention`: the longest `retention`.
pub const DEFAULT_MAX_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default of `--max-unique-ttl`: the longest `unique_ttl`.
pub const DEFAULT_MAX_UNIQUE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// The most any `--max-*` bound of task options may be (the most any
/// duration option may be, `crate::task::options::MAX_DURATION`).
const MAX_TASK_BOUND: Duration = Duration::from_secs(100 * 31_557_600);
/// The most `--claim-ttl`, `--grace` and `--async-ack-wait` may be.
const MAX_WAIT_SETTING: Duration = DAY;
/// The most `--retry-max` and `--async-retry-max` may be.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);
/// The most `--reply-timeout` may be.
const MAX_REPLY_TIMEOUT: Duration = Duration::from_secs(3600);
/// The most `--concurrency` may be.
const MAX_CONCURRENCY: usize = 100_000;
/// The most a queue's weight may be.
const MAX_QUEUE_WEIGHT: u32 = 1000;

/// Upper bounds of task options, set by the operator and checked on every
/// async and periodic create (by `crate::ops`); a duration option is never
/// more than 100 years in any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLimits {
    /// How far ahead `process_at`, `process_in` and `deadline` may be.
    pub max_task_delay: Duration,
    /// The longest per-attempt `timeout`.
    pub max_task_timeout: Duration,
    /// The longest `retention`.
    pub max_retention: Duration,
    /// The longest `unique_ttl`.
    pub max_unique_ttl: Duration,
}

impl Default for TaskLimits {
    fn default() -> Self {
        TaskLimits {
            max_task_delay: DEFAULT_MAX_TASK_DELAY,
            max_task_timeout: DEFAULT_MAX_TASK_TIMEOUT,
            max_retention: DEFAULT_MAX_RETENTION,
            max_unique_ttl: DEFAULT_MAX_UNIQUE_TTL,
        }
    }
}

/// Why a configuration was refused; names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for bmw.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A setting has a value bmw cannot use.
    #[error("invalid setting `{name}`: {message}")]
    Invalid {
        /// The setting (flag name without dashes).
        name: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Settings as given by flags, environment or file; `None` means "not given".
/// Durations are humantime strings (`"15s"`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
#[allow(missing_docs)]
pub struct ConfigOverrides {
    pub nats_url: Option<String>,
    pub http_addr: Option<String>,
    pub metrics_addr: Option<String>,
    pub queues: Option<Vec<String>>,
    pub claim_ttl: Option<String>,
    pub heartbeat: Option<String>,
    pub retry_base: Option<String>,
    pub retry_threshold: Option<u32>,
    pub retry_max: Option<String>,
    pub grace: Option<String>,
    pub reply_timeout: Option<String>,
    pub replicas: Option<usize>,
    pub data_dir: Option<PathBuf>,
    pub max_body: Option<usize>,
    pub concurrency: Option<usize>,
    pub async_retry_base: Option<String>,
    pub async_retry_max: Option<String>,
    pub async_ack_wait: Option<String>,
    pub max_queue_pending: Option<u64>,
    pub async_default_timeout: Option<String>,
    // The bridge's access and limits.
    pub api_token: Option<Vec<String>>,
    pub api_token_file: Option<PathBuf>,
    pub metrics_require_token: Option<bool>,
    pub insecure_no_auth: Option<bool>,
    pub allowed_hosts: Option<Vec<String>>,
    pub max_concurrent_requests: Option<usize>,
    pub request_timeout: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    // Bounds of task options, and the demo kinds.
    pub max_task_delay: Option<String>,
    pub max_task_timeout: Option<String>,
    pub max_retention: Option<String>,
    pub max_unique_ttl: Option<String>,
    pub demo_kinds: Option<bool>,
    // NATS credentials and TLS (secrets are `SecretString`: `Debug` prints none).
    pub nats_creds: Option<PathBuf>,
    pub nats_nkey: Option<SecretString>,
    pub nats_user: Option<String>,
    pub nats_password: Option<SecretString>,
    pub nats_token: Option<SecretString>,
    pub nats_ca: Option<PathBuf>,
    pub nats_cert: Option<PathBuf>,
    pub nats_key: Option<PathBuf>,
    pub nats_require_tls: Option<bool>,
    pub nats_inbox_prefix: Option<String>,
    pub storage_max_bytes: Option<String>,
    pub nats_sync: Option<String>,
    // Kinds declared in the file (`[[kind]]`) and in a directory of kind
    // files, run by `crate::external`.
    pub kind: Option<Vec<KindDecl>>,
    pub kinds_dir: Option<PathBuf>,
    // Traces: the OTLP/HTTP collector spans go to (`crate::traces`).
    pub otlp_endpoint: Option<String>,
}

impl ConfigOverrides {
    /// Reads a TOML file whose keys are the long flag names (`nats-url`, `claim-ttl`...).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut read: ConfigOverrides = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        // Relative paths of a declared kind are read from the file's directory.
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        for decl in read.kind.iter_mut().flatten() {
            decl.base_dir = Some(dir.clone());
        }
        Ok(read)
    }

    /// `self` where given, else `other`.
    pub fn or(self, other: ConfigOverrides) -> ConfigOverrides {
        ConfigOverrides {
            nats_url: self.nats_url.or(other.nats_url),
            http_addr: self.http_addr.or(other.http_addr),
            metrics_addr: self.metrics_addr.or(other.metrics_addr),
            queues: self.queues.or(other.queues),
            claim_ttl: self.claim_ttl.or(other.claim_ttl),
            heartbeat: self.heartbeat.or(other.heartbeat),
            retry_base: self.retry_base.or(other.retry_base),
            retry_threshold: self.retry_threshold.or(other.retry_threshold),
            retry_max: self.retry_max.or(other.retry_max),
            grace: self.grace.or(other.grace),
            reply_timeout: self.reply_timeout.or(other.reply_timeout),
            replicas: self.replicas.or(other.replicas),
            data_dir: self.data_dir.or(other.data_dir),
            max_body: self.max_body.or(other.max_body),
            concurrency: self.concurrency.or(other.concurrency),
            async_retry_base: self.async_retry_base.or(other.async_retry_base),
            async_retry_max: self.async_retry_max.or(other.async_retry_max),
            async_ack_wait: self.async_ack_wait.or(other.async_ack_wait),
            max_queue_pending: self.max_queue_pending.or(other.max_queue_pending),
            async_default_timeout: self.async_default_timeout.or(other.async_default_timeout),
            api_token: self.api_token.or(other.api_token),
            api_token_file: self.api_token_file.or(other.api_token_file),
            metrics_require_token: self.metrics_require_token.or(other.metrics_require_token),
            insecure_no_auth: self.insecure_no_auth.or(other.insecure_no_auth),
            allowed_hosts: self.allowed_hosts.or(other.allowed_hosts),
            max_concurrent_requests: self
                .max_concurrent_requests
                .or(other.max_concurrent_requests),
            request_timeout: self.request_timeout.or(other.request_timeout),
            tls_cert: self.tls_cert.or(other.tls_cert),
            tls_key: self.tls_key.or(other.tls_key),
            max_task_delay: self.max_task_delay.or(other.max_task_delay),
            max_task_timeout: self.max_task_timeout.or(other.max_task_timeout),
            max_retention: self.max_retention.or(other.max_retention),
            max_unique_ttl: self.max_unique_ttl.or(other.max_unique_ttl),
            demo_kinds: self.demo_kinds.or(other.demo_kinds),
            nats_creds: self.nats_creds.or(other.nats_creds),
            nats_nkey: self.nats_nkey.or(other.nats_nkey),
            nats_user: self.nats_user.or(other.nats_user),
            nats_password: self.nats_password.or(other.nats_password),
            nats_token: self.nats_token.or(other.nats_token),
            nats_ca: self.nats_ca.or(other.nats_ca),
            nats_cert: self.nats_cert.or(other.nats_cert),
            nats_key: self.nats_key.or(other.nats_key),
            nats_require_tls: self.nats_require_tls.or(other.nats_require_tls),
            nats_inbox_prefix: self.nats_inbox_prefix.or(other.nats_inbox_prefix),
            storage_max_bytes: self.storage_max_bytes.or(other.storage_max_bytes),
            nats_sync: self.nats_sync.or(other.nats_sync),
            kind: self.kind.or(other.kind),
            kinds_dir: self.kinds_dir.or(other.kinds_dir),
            otlp_endpoint: self.otlp_endpoint.or(other.otlp_endpoint),
        }
    }
}

/// The settings of one bmw process.
#[derive(Debug, Clone)]
pub struct Config {
    /// NATS server URL; `None` lets `bmw run` start a local server.
    pub nats_url: Option<String>,
    /// Where the bridge (and, for `bmw run`, `/metrics`) listens.
    pub http_addr: SocketAddr,
    /// Where `bmw worker` serves `/bmw/metrics`, `/metrics` and `/health`
    /// ([`DEFAULT_METRICS_ADDR`] unless given); `None` (`off`) serves nothing.
    pub metrics_addr: Option<SocketAddr>,
    /// Queues this worker takes tasks from, with their weights
    /// (`critical=6,default=3,low=1`; a bare name weighs 1).
    pub queues: Vec<QueueWeight>,
    /// Claim TTL (whole seconds, at least 1 s).
    pub claim_ttl: Duration,
    /// Heartbeat interval; shorter than the claim TTL.
    pub heartbeat: Duration,
    /// First retry delay of a failed daemon instance.
    pub retry_base: Duration,
    /// Retry count after which delays double.
    pub retry_threshold: u32,
    /// Ceiling of a retry delay.
    pub retry_max: Duration,
    /// Time running instances get to stop on shutdown.
    pub grace: Duration,
    /// How long the bridge waits for a worker's outcome.
    pub reply_timeout: Duration,
    /// Replicas of streams and buckets (1 on one server, 3 on a cluster).
    pub replicas: usize,
    /// Data directory of a local nats-server started by `bmw run`.
    pub data_dir: PathBuf,
    /// Largest request body the bridge accepts, in bytes.
    pub max_body: usize,
    /// Async tasks a worker runs at once.
    pub concurrency: usize,
    /// Delay after an async task's first failed attempt.
    pub async_retry_base: Duration,
    /// Ceiling of an async retry delay.
    pub async_retry_max: Duration,
    /// How long a fetched async task may go unacknowledged before redelivery.
    pub async_ack_wait: Duration,
    /// How bmw authenticates to NATS (at most one way).
    pub nats_auth: NatsAuth,
    /// TLS towards NATS.
    pub nats_tls: NatsTls,
    /// Prefix of this process's reply subjects (`_INBOX` unless told).
    pub nats_inbox_prefix: Option<String>,
    /// What bmw's streams and buckets may hold together, in bytes.
    pub storage_max_bytes: u64,
    /// When the local nats-server of `bmw run` fsyncs its store.
    pub nats_sync: crate::nats::local::StoreSync,
    /// Upper bounds of task options.
    pub limits: TaskLimits,
    /// Whether the demo kinds are registered; `None`: the role decides (on
    /// for `bmw run` only).
    pub demo_kinds: Option<bool>,
    /// Most tasks a queue may hold before creates on it are refused (429).
    pub max_queue_pending: u64,
    /// Time limit of an async attempt whose task gives no `timeout` or
    /// `deadline`; zero: none.
    pub async_default_timeout: Duration,
    /// Bearer tokens the bridge accepts (`--api-token` and the
    /// `--api-token-file`); none: the bridge asks for no token.
    pub api_tokens: Vec<ApiToken>,
    /// Whether `/metrics` needs a token too (any; read-only is enough).
    pub metrics_require_token: bool,
    /// The operator's explicit consent to serve the bridge on a non-loopback
    /// address without tokens.
    pub insecure_no_auth: bool,
    /// Host names (lower case) a browser may reach the bridge by, beside IP
    /// addresses and `localhost`; `.example.com` allows its subdomains.
    pub allowed_hosts: Vec<String>,
    /// Requests the bridge serves at once; more are answered 503.
    pub max_concurrent_requests: usize,
    /// Longest a bridge request may take, from its first byte to its answer.
    pub request_timeout: Duration,
    /// Certificate chain and key (PEM) for HTTPS on the bridge; `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Kinds declared in the config file (`[[kind]]`), then those of the
    /// `--kinds-dir` files, as written; checked and registered by
    /// `crate::external::register`.
    pub kinds: Vec<KindDecl>,
    /// Where spans are exported (OTLP over HTTP, an `http://` URL); `None`:
    /// traces are off.
    pub otlp_endpoint: Option<String>,
}

/// The PEM files the bridge serves HTTPS with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key of the leaf certificate.
    pub key: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config::resolve(ConfigOverrides::default()).expect("defaults are valid")
    }
}

/// Parses `critical=6`, `default` (weight 1) items.
fn parse_queues(items: Vec<String>) -> Result<Vec<QueueWeight>, ConfigError> {
    items
        .iter()
        .map(|item| {
            let (name, weight) = match item.split_once('=') {
                Some((n, w)) => (
                    n.trim(),
                    w.trim().parse::<u32>().map_err(|e| ConfigError::Invalid {
                        name: "queues",
                        message: format!("{item:?}: weight {e}"),
                    })?,
                ),
                None => (item.trim(), 1),
            };
            Ok(QueueWeight {
                name: name.to_owned(),
                weight,
            })
        })
        .collect()
}

/// `--allowed-hosts`: lower-cased host names (no port, no scheme), each a
/// name or `.domain` for its subdomains.
fn allowed_hosts(items: Vec<String>) -> Result<Vec<String>, ConfigError> {
    items
        .into_iter()
        .map(|item| item.trim().to_ascii_lowercase())
        .filter(|item| !item.is_empty())
        .map(|host| {
            let name = host.strip_prefix('.').unwrap_or(&host);
            let ok = !name.is_empty()
                && name
                    .split('.')
                    .all(|label| !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
            if ok {
                Ok(host)
            } else {
                Err(ConfigError::Invalid {
                    name: "allowed-hosts",
                    message: format!(
                        "{host:?} is not a host name (`bmw.example.com`, or `.example.com` for its subdomains; no port or scheme)"
                    ),
                })
            }
        })
        .collect()
}

/// A file setting must name a readable file.
fn readable_file(
    name: &'static str,
    path: Option<PathBuf>,
) -> Result<Option<PathBuf>, ConfigError> {
    match path {
        Some(path) => match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(path)),
            Ok(_) => Err(ConfigError::Invalid {
                name,
                message: format!("{} is not a file", path.display()),
            }),
            Err(e) => Err(ConfigError::Invalid {
                name,
                message: format!("cannot read {}: {e}", path.display()),
            }),
        },
        None => Ok(None),
    }
}

/// The nkey setting: a user seed (`SU...`) or a file holding one. The
/// messages never repeat the value (it may be the seed).
fn nkey_seed(given: SecretString) -> Result<SecretString, ConfigError> {
    let invalid = |message: &str| ConfigError::Invalid {
        name: "nats-nkey",
        message: message.to_owned(),
    };
    let value = given.expose_secret().trim();
    let seed: SecretString = if value.starts_with("SU") {
        value.into()
    } else {
        let text = std::fs::read_to_string(value).map_err(|_| {
            invalid("is neither a user nkey seed (SU...) nor a readable file holding one")
        })?;
        text.trim().into()
    };
    nkeys::KeyPair::from_seed(seed.expose_secret())
        .map_err(|_| invalid("is not a valid user nkey seed (SU...)"))?;
    Ok(seed)
}

/// `--storage-max-bytes`: a number of bytes, with an optional unit (`KiB`,
/// `MiB`, `GiB`, `TiB`, or `KB`, `MB`, `GB`, `TB` in powers of 1000), at
/// least [`crate::nats::provision::MIN_STORAGE_MAX_BYTES`].
fn storage_bytes(text: &str) -> Result<u64, ConfigError> {
    let invalid = |why: &str| ConfigError::Invalid {
        name: "storage-max-bytes",
        message: format!("{text:?} {why}"),
    };
    let trimmed = text.trim();
    let digits = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| invalid("is not a size (e.g. 4GiB, 500MB, 1048576)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(invalid(
                "has an unknown unit (KiB, MiB, GiB, TiB, KB, MB, GB, TB)",
            ));
        }
    };
    let bytes = number
        .checked_mul(scale)
        .ok_or_else(|| invalid("is too large"))?;
    if bytes < crate::nats::provision::MIN_STORAGE_MAX_BYTES {
        return Err(invalid("is under the least bmw can work in (1 MiB)"));
    }
    Ok(bytes)
}

/// A reply-subject prefix: `_INBOX` or `_INBOX_<user>`, one token, so that
/// a worker's reply to it passes [`crate::nats::names::is_reply_inbox`].
fn inbox_prefix(prefix: String) -> Result<String, ConfigError> {
    let prefix = prefix.trim().to_owned();
    if crate::nats::names::is_reply_inbox(&format!("{prefix}.x")) && !prefix.contains('.') {
        return Ok(prefix);
    }
    Err(ConfigError::Invalid {
        name: "nats-inbox-prefix",
        message: format!(
            "{prefix:?} is not `_INBOX` or `_INBOX_<user>` (one token, no wildcard): \
             workers send a command's outcome only to such an inbox"
        ),
    })
}

/// The one way of authenticating the settings give, or why they do not fit.
fn nats_auth(given: &mut ConfigOverrides) -> Result<NatsAuth, ConfigError> {
    let creds = readable_file("nats-creds", given.nats_creds.take())?;
    let nkey = given.nats_nkey.take().map(nkey_seed).transpose()?;
    let user = given.nats_user.take().filter(|u| !u.is_empty());
    let password = given.nats_password.take();
    let token = given.nats_token.take();
    let user_password = match (user, password) {
        (Some(user), Some(password)) => Some(NatsAuth::UserPassword { user, password }),
        (Some(_), None) => {
            return Err(ConfigError::Invalid {
                name: "nats-password",
                message: "--nats-user needs --nats-password".into(),
            });
        }
        (None, Some(_)) => {
            return Err(ConfigError::Invalid {
                name: "nats-user",
                message: "--nats-password needs --nats-user".into(),
            });
        }
        (None, None) => None,
    };
    let mut ways = [
        ("nats-creds", creds.map(NatsAuth::CredsFile)),
        ("nats-nkey", nkey.map(NatsAuth::Nkey)),
        ("nats-user", user_password),
        ("nats-token", token.map(NatsAuth::Token)),
    ]
    .into_iter()
    .filter_map(|(name, auth)| auth.map(|a| (name, a)));
    let first = ways.next();
    if let Some((name, _)) = ways.next() {
        return Err(ConfigError::Invalid {
            name,
            message: format!(
                "give one of --nats-creds, --nats-nkey, --nats-user/--nats-password and \
                 --nats-token (--{} is given too)",
                first.map_or("", |(n, _)| n)
            ),
        });
    }
    Ok(first.map_or(NatsAuth::None, |(_, auth)| auth))
}

/// TLS settings: a certificate needs its key and the other way round.
fn nats_tls(given: &mut ConfigOverrides) -> Result<NatsTls, ConfigError> {
    let ca = readable_file("nats-ca", given.nats_ca.take())?;
    let cert = readable_file("nats-cert", given.nats_cert.take())?;
    let key = readable_file("nats-key", given.nats_key.take())?;
    let client_cert = match (cert, key) {
        (Some(cert), Some(key)) => Some(ClientCert { cert, key }),
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::Invalid {
                name: "nats-key",
                message: "--nats-cert needs --nats-key (the certificate's private key)".into(),
            });
        }
        (None, Some(_)) => {
            return Err(ConfigError::Invalid {
                name: "nats-cert",
                message: "--nats-key needs --nats-cert".into(),
            });
        }
    };
    Ok(NatsTls {
        ca,
        client_cert,
        require: given.nats_require_tls.take().unwrap_or(false),
    })
}

impl Config {
    /// The NATS URL(s) to connect to: the given ones, else [`DEFAULT_NATS_URL`].
    pub fn nats_url_or_default(&self) -> &str {
        self.nats_url.as_deref().unwrap_or(DEFAULT_NATS_URL)
    }

    /// What connecting to `urls` takes: these URLs with this config's
    /// credentials and TLS.
    pub fn connect_settings(&self, urls: &str) -> ConnectSettings {
        ConnectSettings {
            urls: urls.to_owned(),
            auth: self.nats_auth.clone(),
            tls: self.nats_tls.clone(),
            inbox_prefix: self.nats_inbox_prefix.clone(),
            first_connect_wait: crate::nats::connect::FIRST_CONNECT_WAIT,
        }
    }

    /// How `bmw provision` and a start size the streams and buckets.
    pub fn provision_settings(&self) -> crate::nats::provision::Settings {
        crate::nats::provision::Settings {
            replicas: self.replicas,
            storage_max_bytes: self.storage_max_bytes,
        }
    }

    /// The queue names, without weights.
    pub fn queue_names(&self) -> Vec<String> {
        self.queues.iter().map(|q| q.name.clone()).collect()
    }

    /// Refuses to serve the bridge on a non-loopback address without tokens,
    /// unless the operator passed `--insecure-no-auth`. Checked by the roles
    /// that serve the bridge (`run`, `bridge`) before they bind anything.
    pub fn check_bridge_exposure(&self) -> Result<(), ConfigError> {
        if self.http_addr.ip().is_loopback() || !self.api_tokens.is_empty() || self.insecure_no_auth
        {
            return Ok(());
        }
        Err(ConfigError::Invalid {
            name: "http-addr",
            message: format!(
                "{} is not a loopback address and no --api-token or --api-token-file is set: \
                 anyone who can reach it could create, delete, reload and requeue tasks. \
                 Set a token, or pass --insecure-no-auth to serve it without authentication anyway",
                self.http_addr
            ),
        })
    }

    /// Merges `given` over the defaults and validates the result.
    pub fn resolve(mut given: ConfigOverrides) -> Result<Config, ConfigError> {
        let nats_auth = nats_auth(&mut given)?;
        let nats_tls = nats_tls(&mut given)?;
        let nats_inbox_prefix = given
            .nats_inbox_prefix
            .take()
            .map(inbox_prefix)
            .transpose()?;
        let nats_sync = match given.nats_sync.take() {
            None => DEFAULT_NATS_SYNC,
            Some(text) => text.parse().map_err(|message| ConfigError::Invalid {
                name: "nats-sync",
                message,
            })?,
        };
        let storage_max_bytes = match given.storage_max_bytes.take() {
            None => crate::nats::provision::DEFAULT_STORAGE_MAX_BYTES,
            Some(text) => storage_bytes(&text)?,
        };
        let dur = |name: &'static str, v: Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(s) => humantime::parse_duration(s.trim()).map_err(|e| ConfigError::Invalid {
                name,
                message: format!("{s:?} is not a duration ({e})"),
            }),
        };
        let addr = |name: &'static str, s: &str| {
            s.parse::<SocketAddr>().map_err(|e| ConfigError::Invalid {
                name,
                message: format!("{s:?} is not a socket address ({e})"),
            })
        };
        let config = Config {
            nats_url: given.nats_url.filter(|u| !u.trim().is_empty()),
            http_addr: addr(
                "http-addr",
                given.http_addr.as_deref().unwrap_or(DEFAULT_HTTP_ADDR),
            )?,
            metrics_addr: match given.metrics_addr.as_deref().map(str::trim) {
                Some(off) if off.eq_ignore_ascii_case(METRICS_ADDR_OFF) => None,
                Some(s) => Some(s.parse::<SocketAddr>().map_err(|e| ConfigError::Invalid {
                    name: "metrics-addr",
                    message: format!(
                        "{s:?} is not a socket address ({e}); `{METRICS_ADDR_OFF}` serves none"
                    ),
                })?),
                None => Some(addr("metrics-addr", DEFAULT_METRICS_ADDR)?),
            },
            queues: parse_queues(given.queues.unwrap_or_else(|| vec!["default".to_owned()]))?,
            claim_ttl: dur("claim-ttl", given.claim_ttl, DEFAULT_CLAIM_TTL)?,
            heartbeat: dur("heartbeat", given.heartbeat, DEFAULT_HEARTBEAT)?,
            retry_base: dur("retry-base", given.retry_base, DEFAULT_RETRY_BASE)?,
            retry_threshold: given.retry_threshold.unwrap_or(DEFAULT_RETRY_THRESHOLD),
            retry_max: dur("retry-max", given.retry_max, DEFAULT_RETRY_MAX)?,
            grace: dur("grace", given.grace, DEFAULT_GRACE)?,
            reply_timeout: dur("reply-timeout", given.reply_timeout, DEFAULT_REPLY_TIMEOUT)?,
            replicas: given.replicas.unwrap_or(1),
            data_dir: given.data_dir.unwrap_or_else(|| PathBuf::from(".bmw")),
            max_body: given.max_body.unwrap_or(DEFAULT_MAX_BODY),
            concurrency: given.concurrency.unwrap_or(DEFAULT_CONCURRENCY),
            async_retry_base: dur(
                "async-retry-base",
                given.async_retry_base,
                DEFAULT_ASYNC_RETRY_BASE,
            )?,
            async_retry_max: dur(
                "async-retry-max",
                given.async_retry_max,
                DEFAULT_ASYNC_RETRY_MAX,
            )?,
            async_ack_wait: dur(
                "async-ack-wait",
                given.async_ack_wait,
                DEFAULT_ASYNC_ACK_WAIT,
            )?,
            max_queue_pending: given.max_queue_pending.unwrap_or(DEFAULT_MAX_QUEUE_PENDING),
            async_default_timeout: dur(
                "async-default-timeout",
                given.async_default_timeout,
                DEFAULT_ASYNC_DEFAULT_TIMEOUT,
            )?,
            api_tokens: {
                let mut tokens = api_token::parse_items(given.api_token.as_deref().unwrap_or(&[]))?;
                if let Some(path) = &given.api_token_file {
                    tokens.extend(api_token::read_file(path)?);
                }
                tokens
            },
            metrics_require_token: given.metrics_require_token.unwrap_or(false),
            insecure_no_auth: given.insecure_no_auth.unwrap_or(false),
            allowed_hosts: allowed_hosts(given.allowed_hosts.unwrap_or_default())?,
            max_concurrent_requests: given
                .max_concurrent_requests
                .unwrap_or(DEFAULT_MAX_CONCURRENT_REQUESTS),
            request_timeout: dur(
                "request-timeout",
                given.request_timeout,
                DEFAULT_REQUEST_TIMEOUT,
            )?,
            tls: match (given.tls_cert, given.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
                (None, None) => None,
                (cert, _) => {
                    return Err(ConfigError::Invalid {
                        name: if cert.is_some() {
                            "tls-key"
                        } else {
                            "tls-cert"
                        },
                        message: "--tls-cert and --tls-key go together".into(),
                    });
                }
            },
            limits: TaskLimits {
                max_task_delay: dur(
                    "max-task-delay",
                    given.max_task_delay,
                    DEFAULT_MAX_TASK_DELAY,
                )?,
                max_task_timeout: dur(
                    "max-task-timeout",
                    given.max_task_timeout,
                    DEFAULT_MAX_TASK_TIMEOUT,
                )?,
                max_retention: dur("max-retention", given.max_retention, DEFAULT_MAX_RETENTION)?,
                max_unique_ttl: dur(
                    "max-unique-ttl",
                    given.max_unique_ttl,
                    DEFAULT_MAX_UNIQUE_TTL,
                )?,
            },
            demo_kinds: given.demo_kinds,
            kinds: {
                let mut kinds = given.kind.unwrap_or_default();
                if let Some(dir) = &given.kinds_dir {
                    kinds.extend(kind_decl::read_dir(dir)?);
                }
                kinds
            },
            otlp_endpoint: match given.otlp_endpoint.filter(|e| !e.trim().is_empty()) {
                Some(endpoint) => {
                    crate::traces::traces_url(&endpoint).map_err(|e| ConfigError::Invalid {
                        name: "otlp-endpoint",
                        message: e.to_string(),
                    })?;
                    Some(endpoint.trim().to_owned())
                }
                None => None,
            },
            nats_auth,
            nats_tls,
            nats_inbox_prefix,
            storage_max_bytes,
            nats_sync,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |name, message: &str| {
            Err(ConfigError::Invalid {
                name,
                message: message.to_owned(),
            })
        };
        if self.claim_ttl < Duration::from_secs(1)
            || self.claim_ttl.subsec_nanos() != 0
            || self.claim_ttl > MAX_WAIT_SETTING
        {
            return invalid(
                "claim-ttl",
                "must be whole seconds, from 1s to 1day (a NATS per-key TTL)",
            );
        }
        if self.heartbeat.is_zero() || self.heartbeat >= self.claim_ttl {
            return invalid("heartbeat", "must be above zero and shorter than claim-ttl");
        }
        if self.retry_max > MAX_RETRY_DELAY {
            return invalid("retry-max", "must be at most 30days");
        }
        if self.retry_base.is_zero() || self.retry_max < self.retry_base {
            return invalid("retry-base", "must be above zero and at most retry-max");
        }
        if self.async_retry_max > MAX_RETRY_DELAY {
            return invalid("async-retry-max", "must be at most 30days");
        }
        if self.async_retry_max < self.async_retry_base {
            return invalid("async-retry-base", "must be at most async-retry-max");
        }
        if self.async_ack_wait < Duration::from_secs(1) || self.async_ack_wait > MAX_WAIT_SETTING {
            return invalid("async-ack-wait", "must be from 1s to 1day");
        }
        if self.grace > MAX_WAIT_SETTING {
            return invalid("grace", "must be at most 1day");
        }
        if self.async_default_timeout > MAX_WAIT_SETTING {
            return invalid("async-default-timeout", "must be at most 1day (0s: none)");
        }
        if self.reply_timeout > MAX_REPLY_TIMEOUT {
            return invalid("reply-timeout", "must be at most 1h");
        }
        let bounds = [
            ("max-task-delay", self.limits.max_task_delay),
            ("max-task-timeout", self.limits.max_task_timeout),
            ("max-retention", self.limits.max_retention),
            ("max-unique-ttl", self.limits.max_unique_ttl),
        ];
        for (name, bound) in bounds {
            if bound < Duration::from_secs(1) || bound > MAX_TASK_BOUND {
                return invalid(name, "must be from 1s to 100years");
            }
        }
        if !(1..=5).contains(&self.replicas) {
            return invalid("replicas", "must be between 1 and 5");
        }
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY {
            return invalid("concurrency", "must be from 1 to 100000");
        }
        if self.max_concurrent_requests == 0 {
            return invalid("max-concurrent-requests", "must be at least 1");
        }
        if self.request_timeout <= self.reply_timeout {
            return invalid(
                "request-timeout",
                "must be longer than reply-timeout (a create waits that long for a worker before answering 202)",
            );
        }
        if self.metrics_require_token && self.api_tokens.is_empty() {
            return invalid(
                "metrics-require-token",
                "needs a token: set --api-token or --api-token-file",
            );
        }
        if self.queues.is_empty()
            || self.queues.iter().any(|q| {
                q.name.is_empty()
                    || q.weight == 0
                    || q.weight > MAX_QUEUE_WEIGHT
                    || !q
                        .name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            })
        {
            return invalid(
                "queues",
                "must be a non-empty list of `name` or `name=weight` (A-Z a-z 0-9 _ -, weight 1 to 1000)",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_defaults() {
        let flags = ConfigOverrides {
            heartbeat: Some("2s".into()),
            ..Default::default()
        };
        let file: ConfigOverrides =
            toml::from_str("heartbeat = \"3s\"\nclaim-ttl = \"6s\"").unwrap();
        let c = Config::resolve(flags.or(file)).unwrap();
        assert_eq!(c.heartbeat, Duration::from_secs(2));
        assert_eq!(c.claim_ttl, Duration::from_secs(6));
        assert_eq!(c.retry_base, DEFAULT_RETRY_BASE);
        assert_eq!(c.http_addr.port(), 10211);
        assert_eq!(c.metrics_addr, Some(DEFAULT_METRICS_ADDR.parse().unwrap()));
    }

    #[test]
    fn metrics_addr_is_an_address_or_off() {
        let with = |v: &str| {
            Config::resolve(ConfigOverrides {
                metrics_addr: Some(v.into()),
                ..Default::default()
            })
        };
        assert_eq!(with("off").unwrap().metrics_addr, None);
        assert_eq!(with(" OFF ").unwrap().metrics_addr, None);
        assert_eq!(
            with("127.0.0.1:9100").unwrap().metrics_addr,
            Some("127.0.0.1:9100".parse().unwrap())
        );
        let e = with("nowhere").unwrap_err().to_string();
        assert!(e.contains("metrics-addr") && e.contains("`off`"), "{e}");
    }

    #[test]
    fn otlp_endpoint_is_off_by_default_and_an_http_url_when_given() {
        let with = |v: Option<&str>| {
            Config::resolve(ConfigOverrides {
                otlp_endpoint: v.map(Into::into),
                ..Default::default()
            })
        };
        assert_eq!(with(None).unwrap().otlp_endpoint, None);
        assert_eq!(with(Some(" ")).unwrap().otlp_endpoint, None);
        assert_eq!(
            with(Some("http://127.0.0.1:4318"))
                .unwrap()
                .otlp_endpoint
                .as_deref(),
            Some("http://127.0.0.1:4318")
        );
        let e = with(Some("https://collector:4318"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("otlp-endpoint") && e.contains("http://"), "{e}");
    }

    #[test]
    fn bad_settings_are_named() {
        let cases = [
            (
                ConfigOverrides {
                    claim_ttl: Some("1500ms".into()),
                    ..Default::default()
                },
                "claim-ttl",
            ),
            (
                ConfigOverrides {
                    heartbeat: Some("20s".into()),
                    ..Default::default()
                },
                "heartbeat",
            ),
            (
                ConfigOverrides {
                    http_addr: Some("nowhere".into()),
                    ..Default::default()
                },
                "http-addr",
            ),
            (
                ConfigOverrides {
                    grace: Some("later".into()),
                    ..Default::default()
                },
                "grace",
            ),
        ];
        for (given, name) in cases {
            match Config::resolve(given) {
                Err(ConfigError::Invalid { name: got, .. }) => assert_eq!(got, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert!(toml::from_str::<ConfigOverrides>("no-such-key = 1").is_err());
    }

    #[test]
    fn bridge_settings_are_checked_together() {
        let c = Config::default();
        assert!(c.http_addr.ip().is_loopback(), "{}", c.http_addr);
        assert_eq!(c.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        assert!(c.api_tokens.is_empty() && c.tls.is_none());
        let cases = [
            (
                ConfigOverrides {
                    reply_timeout: Some("30s".into()),
                    ..Default::default()
                },
                "request-timeout",
            ),
            (
                ConfigOverrides {
                    max_concurrent_requests: Some(0),
                    ..Default::default()
                },
                "max-concurrent-requests",
            ),
            (
                ConfigOverrides {
                    tls_cert: Some("cert.pem".into()),
                    ..Default::default()
                },
                "tls-key",
            ),
            (
                ConfigOverrides {
                    tls_key: Some("key.pem".into()),
                    ..Default::default()
                },
                "tls-cert",
            ),
            (
                ConfigOverrides {
                    metrics_require_token: Some(true),
                    ..Default::default()
                },
                "metrics-require-token",
            ),
            (
                ConfigOverrides {
                    api_token: Some(vec!["ro:".into()]),
                    ..Default::default()
                },
                "api-token",
            ),
        ];
        for (given, name) in cases {
            match Config::resolve(given) {
                Err(ConfigError::Invalid { name: got, .. }) => assert_eq!(got, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        let file: ConfigOverrides =
            toml::from_str("api-token = [\"ro:a\", \"b\"]\nrequest-timeout = \"10s\"").unwrap();
        let c = Config::resolve(file).unwrap();
        let access: Vec<_> = c.api_tokens.iter().map(ApiToken::access).collect();
        assert_eq!(access, [TokenAccess::ReadOnly, TokenAccess::ReadWrite]);
        assert_eq!(c.request_timeout, Duration::from_secs(10));
    }

    #[test]
    fn an_exposed_bridge_needs_a_token_or_the_insecure_flag() {
        let exposed = |extra: ConfigOverrides| {
            Config::resolve(ConfigOverrides {
                http_addr: Some("0.0.0.0:10211".into()),
                ..extra
            })
            .unwrap()
            .check_bridge_exposure()
        };
        let err = exposed(ConfigOverrides::default()).unwrap_err().to_string();
        for needle in [
            "http-addr",
            "--insecure-no-auth",
            "--api-token",
            "not a loopback",
        ] {
            assert!(err.contains(needle), "{err}");
        }
        assert!(
            exposed(ConfigOverrides {
                api_token: Some(vec!["rw:secret".into()]),
                ..Default::default()
            })
            .is_ok()
        );
        assert!(
            exposed(ConfigOverrides {
                insecure_no_auth: Some(true),
                ..Default::default()
            })
            .is_ok()
        );
        for loopback in ["127.0.0.1:1", "127.9.9.9:1", "[::1]:1"] {
            let c = Config::resolve(ConfigOverrides {
                http_addr: Some(loopback.into()),
                ..Default::default()
            })
            .unwrap();
            assert!(c.check_bridge_exposure().is_ok(), "{loopback}");
        }
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        let cases = [
            (
                ConfigOverrides {
                    async_ack_wait: Some("0s".into()),
                    ..Default::default()
                },
                "async-ack-wait",
            ),
            (
                ConfigOverrides {
                    retry_max: Some("100000000years".into()),
                    ..Default::default()
                },
                "retry-max",
            ),
            (
                ConfigOverrides {
                    async_retry_max: Some("31days".into()),
                    ..Default::default()
                },
                "async-retry-max",
            ),
            (
                ConfigOverrides {
                    concurrency: Some(usize::MAX),
                    ..Default::default()
                },
                "concurrency",
            ),
            (
                ConfigOverrides {
                    queues: Some(vec!["a=4294967295".into()]),
                    ..Default::default()
                },
                "queues",
            ),
            (
                ConfigOverrides {
                    max_task_delay: Some("101years".into()),
                    ..Default::default()
                },
                "max-task-delay",
            ),
        ];
        for (given, name) in cases {
            match Config::resolve(given) {
                Err(ConfigError::Invalid { name: got, .. }) => assert_eq!(got, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        let defaults = Config::default();
        assert_eq!(defaults.limits, TaskLimits::default());
        assert_eq!(defaults.demo_kinds, None);
    }

    mod properties {
        use super::*;
        use crate::task::arbitrary;
        use proptest::prelude::*;

        fn setting() -> impl Strategy<Value = Option<String>> {
            prop::option::of(prop_oneof![
                arbitrary::duration_text(),
                any::<String>(),
                Just("0s".to_owned())
            ])
        }

        prop_compose! {
            fn overrides()(
                durations in prop::array::uniform12(setting()),
                numbers in (prop::option::of(any::<u32>()), prop::option::of(any::<usize>()),
                            prop::option::of(any::<usize>()), prop::option::of(any::<usize>())),
                queues in prop::option::of(prop::collection::vec("[a-z=0-9 ]{0,12}", 0..4)),
                addr in prop::option::of(prop_oneof!["127.0.0.1:[0-9]{1,6}", any::<String>()]),
            ) -> ConfigOverrides {
                let [claim_ttl, heartbeat, retry_base, retry_max, grace, reply_timeout,
                     async_retry_base, async_retry_max, async_ack_wait, max_task_delay,
                     max_task_timeout, max_retention] = durations;
                let (retry_threshold, replicas, max_body, concurrency) = numbers;
                ConfigOverrides {
                    http_addr: addr.clone(),
                    metrics_addr: addr,
                    queues,
                    claim_ttl,
                    heartbeat,
                    retry_base,
                    retry_threshold,
                    retry_max,
                    grace,
                    reply_timeout,
                    replicas,
                    max_body,
                    concurrency,
                    async_retry_base,
                    async_retry_max,
                    async_ack_wait,
                    max_task_delay,
                    max_task_timeout,
                    max_retention,
                    ..Default::default()
                }
            }
        }

        proptest! {
            #![proptest_config(arbitrary::config())]

            #[test]
            fn any_settings_resolve_within_bounds_or_are_refused_by_name(given in overrides()) {
                match Config::resolve(given) {
                    Ok(c) => {
                        prop_assert!(c.async_ack_wait >= Duration::from_secs(1));
                        prop_assert!(c.async_ack_wait <= MAX_WAIT_SETTING);
                        prop_assert!(c.heartbeat < c.claim_ttl && c.claim_ttl <= MAX_WAIT_SETTING);
                        prop_assert!(c.retry_max <= MAX_RETRY_DELAY && c.async_retry_max <= MAX_RETRY_DELAY);
                        prop_assert!((1..=MAX_CONCURRENCY).contains(&c.concurrency));
                        prop_assert!(c.queues.iter().all(|q| (1..=MAX_QUEUE_WEIGHT).contains(&q.weight)));
                    }
                    Err(ConfigError::Invalid { name, message }) => {
                        prop_assert!(!name.is_empty() && !message.is_empty());
                    }
                    Err(other) => prop_assert!(false, "not a setting's error: {other}"),
                }
            }
        }
    }

    #[test]
    fn storage_budget_and_inbox_prefix_are_read_and_checked() {
        let resolve = |storage: &str, prefix: &str| {
            Config::resolve(ConfigOverrides {
                storage_max_bytes: Some(storage.into()),
                nats_inbox_prefix: Some(prefix.into()),
                ..Default::default()
            })
        };
        for (text, bytes) in [
            ("8GiB", 8u64 << 30),
            ("500 MB", 500_000_000),
            ("1048576", 1 << 20),
        ] {
            let c = resolve(text, "_INBOX_bmw-worker").unwrap();
            assert_eq!(c.storage_max_bytes, bytes, "{text}");
            assert_eq!(c.nats_inbox_prefix.as_deref(), Some("_INBOX_bmw-worker"));
        }
        for bad in ["", "lots", "4 XB", "1000", "99999999999999999999GiB"] {
            let e = resolve(bad, "_INBOX").unwrap_err().to_string();
            assert!(e.contains("storage-max-bytes"), "{bad}: {e}");
        }
        for bad in ["INBOX", "_INBOX.x", "_INBOX_*", "_INBOX_", "bmw.task"] {
            let e = resolve("4GiB", bad).unwrap_err().to_string();
            assert!(e.contains("nats-inbox-prefix"), "{bad}: {e}");
        }
        let sync = |text: &str| {
            Config::resolve(ConfigOverrides {
                nats_sync: Some(text.into()),
                ..Default::default()
            })
        };
        assert_eq!(sync("2m").unwrap().nats_sync.to_string(), "2m");
        let e = sync("sometimes").unwrap_err().to_string();
        assert!(e.contains("nats-sync"), "{e}");
        let default = Config::resolve(ConfigOverrides::default()).unwrap();
        assert_eq!(default.nats_sync, crate::nats::local::StoreSync::Always);
        let file: ConfigOverrides = toml::from_str("storage-max-bytes = \"2GiB\"").unwrap();
        assert_eq!(Config::resolve(file).unwrap().storage_max_bytes, 2 << 30);
    }

    #[test]
    fn nats_credentials_are_one_way_and_complete() {
        let secret = |s: &str| Some(SecretString::from(s));
        let c = Config::resolve(ConfigOverrides {
            nats_user: Some("bmw".into()),
            nats_password: secret("pw"),
            nats_require_tls: Some(true),
            ..Default::default()
        })
        .unwrap();
        assert!(matches!(c.nats_auth, NatsAuth::UserPassword { ref user, .. } if user == "bmw"));
        assert!(c.nats_tls.require);
        assert!(!format!("{c:?}").contains("pw\""), "{c:?}");
        let file: ConfigOverrides = toml::from_str("nats-token = \"t0k\"").unwrap();
        let c = Config::resolve(file).unwrap();
        assert!(matches!(c.nats_auth, NatsAuth::Token(ref t) if t.expose_secret() == "t0k"));
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let c = Config::resolve(ConfigOverrides {
            nats_nkey: secret(&seed),
            ..Default::default()
        })
        .unwrap();
        assert!(matches!(c.nats_auth, NatsAuth::Nkey(_)));
        let refused = [
            (
                ConfigOverrides {
                    nats_password: secret("pw"),
                    ..Default::default()
                },
                "nats-user",
            ),
            (
                ConfigOverrides {
                    nats_token: secret("t"),
                    nats_nkey: secret(&seed),
                    ..Default::default()
                },
                "nats-token",
            ),
            (
                ConfigOverrides {
                    nats_key: Some("Cargo.toml".into()),
                    ..Default::default()
                },
                "nats-cert",
            ),
            (
                ConfigOverrides {
                    nats_nkey: secret("SUnot-a-seed"),
                    ..Default::default()
                },
                "nats-nkey",
            ),
        ];
        for (given, name) in refused {
            match Config::resolve(given) {
                Err(e @ ConfigError::Invalid { name: got, .. }) => {
                    assert_eq!(got, name, "{e}");
                    assert!(!e.to_string().contains("not-a-seed"), "{e}");
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }
}
