//! [`Config`]: the validated, typed settings every bmw process runs with.
//!
//! Every setting is declared once, in `settings` ([`ConfigOverrides`]: its
//! flag, environment variable, file key and help). The binary parses flags
//! and environment into one, reads an optional TOML file into another, and
//! [`Config::resolve`] merges them over the defaults (flag/env > file >
//! default), reading each text in `parse`. The rest of the crate only sees
//! `Config`. The bridge's tokens are read in `api_token` ([`ApiToken`]).

mod api_token;
mod kind_decl;
mod parse;
mod settings;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::nats::{ConnectSettings, NatsAuth, NatsTls};
pub use api_token::{ApiToken, TokenAccess};
pub use kind_decl::KindDecl;
use parse::{
    allowed_hosts, api_tokens, duration, inbox_prefix, kinds, metrics_addr, nats_auth, nats_sync,
    nats_tls, otlp_endpoint, parse_queues, socket_addr, storage_bytes, tls_files,
};
pub use settings::ConfigOverrides;

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

impl TaskLimits {
    /// The bounds given, the defaults for the others (taken out of `given`).
    fn given(given: &mut ConfigOverrides) -> Result<TaskLimits, ConfigError> {
        Ok(TaskLimits {
            max_task_delay: duration(
                "max-task-delay",
                given.max_task_delay.take(),
                DEFAULT_MAX_TASK_DELAY,
            )?,
            max_task_timeout: duration(
                "max-task-timeout",
                given.max_task_timeout.take(),
                DEFAULT_MAX_TASK_TIMEOUT,
            )?,
            max_retention: duration(
                "max-retention",
                given.max_retention.take(),
                DEFAULT_MAX_RETENTION,
            )?,
            max_unique_ttl: duration(
                "max-unique-ttl",
                given.max_unique_ttl.take(),
                DEFAULT_MAX_UNIQUE_TTL,
            )?,
        })
    }
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
        let limits = TaskLimits::given(&mut given)?;
        let dur = duration;
        let config = Config {
            nats_url: given.nats_url.filter(|u| !u.trim().is_empty()),
            nats_auth,
            nats_tls,
            nats_inbox_prefix: given.nats_inbox_prefix.map(inbox_prefix).transpose()?,
            nats_sync: nats_sync(given.nats_sync)?,
            storage_max_bytes: match given.storage_max_bytes {
                None => crate::nats::provision::DEFAULT_STORAGE_MAX_BYTES,
                Some(text) => storage_bytes(&text)?,
            },
            replicas: given.replicas.unwrap_or(1),
            data_dir: given.data_dir.unwrap_or_else(|| PathBuf::from(".bmw")),
            http_addr: socket_addr(
                "http-addr",
                given.http_addr.as_deref().unwrap_or(DEFAULT_HTTP_ADDR),
            )?,
            metrics_addr: metrics_addr(given.metrics_addr.as_deref())?,
            queues: parse_queues(given.queues.unwrap_or_else(|| vec!["default".to_owned()]))?,
            claim_ttl: dur("claim-ttl", given.claim_ttl, DEFAULT_CLAIM_TTL)?,
            heartbeat: dur("heartbeat", given.heartbeat, DEFAULT_HEARTBEAT)?,
            retry_base: dur("retry-base", given.retry_base, DEFAULT_RETRY_BASE)?,
            retry_threshold: given.retry_threshold.unwrap_or(DEFAULT_RETRY_THRESHOLD),
            retry_max: dur("retry-max", given.retry_max, DEFAULT_RETRY_MAX)?,
            grace: dur("grace", given.grace, DEFAULT_GRACE)?,
            reply_timeout: dur("reply-timeout", given.reply_timeout, DEFAULT_REPLY_TIMEOUT)?,
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
            api_tokens: api_tokens(given.api_token.as_deref(), given.api_token_file.as_deref())?,
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
            tls: tls_files(given.tls_cert, given.tls_key)?,
            limits,
            demo_kinds: given.demo_kinds,
            kinds: kinds(given.kind, given.kinds_dir.as_deref())?,
            otlp_endpoint: otlp_endpoint(given.otlp_endpoint)?,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.check_durations()?;
        self.check_sizes_and_access()
    }

    /// Each duration within its range, and the ones that depend on another.
    fn check_durations(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// Counts, sizes, queues, and the bridge settings that go together.
    fn check_sizes_and_access(&self) -> Result<(), ConfigError> {
        let invalid = |name, message: &str| {
            Err(ConfigError::Invalid {
                name,
                message: message.to_owned(),
            })
        };
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
mod tests;
