//! [`ConfigOverrides`]: every setting declared once, as a flag, an
//! environment variable and a `--config` file key, with its help; and
//! reading the file. What a setting's text means is [`super::Config::resolve`]'s.

use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

use super::{ConfigError, KindDecl};

/// Declares [`ConfigOverrides`] and its `or`, so that a setting is one
/// field: adding one is a field here, one in [`Config`](super::Config) and its line in
/// [`Config::resolve`](super::Config::resolve).
macro_rules! settings {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$field_meta:meta])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[$field_meta])* pub $field: $ty, )*
        }

        impl $name {
            /// `self` where given, else `other` (flags and environment over
            /// the file).
            pub fn or(self, other: $name) -> $name {
                $name {
                    $( $field: self.$field.or(other.$field), )*
                }
            }
        }
    };
}

/// A secret given on the command line or in the environment.
fn secret(text: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(text))
}

settings! {
    /// Every setting, declared once: its flag and environment variable (clap),
    /// its key in the `--config` file (serde, the flag's long name), its help
    /// with the default it names; `None` means "not given" (the default is
    /// [`Config::resolve`](super::Config::resolve)'s). Durations are humantime strings (`"15s"`).
    #[derive(Debug, Clone, Default, Deserialize, clap::Args)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    pub struct ConfigOverrides {
        /// NATS server URL(s), comma-separated. `bmw run` without it starts a local nats-server.
        #[arg(long, global = true, env = "BMW_NATS_URL", hide_env_values = true)]
        pub nats_url: Option<String>,
        /// Bridge listen address (`bmw run`, `bmw bridge`); also serves /bmw/metrics, /metrics, /health, /ready
        /// [default: 127.0.0.1:10211; another host needs a token or --insecure-no-auth].
        #[arg(long, global = true, env = "BMW_HTTP_ADDR")]
        pub http_addr: Option<String>,
        /// Where `bmw worker` serves /bmw/metrics, /metrics and /health; `off` serves none;
        /// each worker on a host needs its own [default: 127.0.0.1:10213].
        #[arg(long, global = true, env = "BMW_METRICS_ADDR")]
        pub metrics_addr: Option<String>,
        /// Queues this worker takes tasks from, comma-separated, with optional weights:
        /// `critical=6,default=3,low=1` [default: default].
        #[arg(long, global = true, env = "BMW_QUEUES", value_delimiter = ',')]
        pub queues: Option<Vec<String>>,
        /// Lease TTL: a dead worker's daemon tasks move after this long [default: 15s].
        #[arg(long, global = true, env = "BMW_CLAIM_TTL")]
        pub claim_ttl: Option<String>,
        /// How often the worker entry (its lease) is renewed [default: 5s].
        #[arg(long, global = true, env = "BMW_HEARTBEAT")]
        pub heartbeat: Option<String>,
        /// First retry delay of a failed daemon instance [default: 10s].
        #[arg(long, global = true, env = "BMW_RETRY_BASE")]
        pub retry_base: Option<String>,
        /// Retry count after which each delay doubles [default: 5].
        #[arg(long, global = true, env = "BMW_RETRY_THRESHOLD")]
        pub retry_threshold: Option<u32>,
        /// Ceiling of a retry delay [default: 15m].
        #[arg(long, global = true, env = "BMW_RETRY_MAX")]
        pub retry_max: Option<String>,
        /// Time running instances get to stop on shutdown [default: 10s].
        #[arg(long, global = true, env = "BMW_GRACE")]
        pub grace: Option<String>,
        /// How long the bridge waits for a worker's outcome before answering 202 [default: 5s].
        #[arg(long, global = true, env = "BMW_REPLY_TIMEOUT")]
        pub reply_timeout: Option<String>,
        /// Replicas of streams and buckets: 1 on one server, 3 on a cluster [default: 1].
        #[arg(long, global = true, env = "BMW_REPLICAS")]
        pub replicas: Option<usize>,
        /// Data directory (the local nats-server's store and binary) [default: .bmw].
        #[arg(long, global = true, env = "BMW_DATA_DIR")]
        pub data_dir: Option<PathBuf>,
        /// Largest request body the bridge accepts, in bytes [default: 1048576].
        #[arg(long, global = true, env = "BMW_MAX_BODY")]
        pub max_body: Option<usize>,
        /// Async tasks a worker runs at once [default: 32].
        #[arg(long, global = true, env = "BMW_CONCURRENCY")]
        pub concurrency: Option<usize>,
        /// Delay after an async task's first failed attempt, doubling after, with jitter [default: 5s].
        #[arg(long, global = true, env = "BMW_ASYNC_RETRY_BASE")]
        pub async_retry_base: Option<String>,
        /// Ceiling of an async retry delay [default: 1h].
        #[arg(long, global = true, env = "BMW_ASYNC_RETRY_MAX")]
        pub async_retry_max: Option<String>,
        /// How long a fetched async task may go unacknowledged before another worker gets it [default: 30s].
        #[arg(long, global = true, env = "BMW_ASYNC_ACK_WAIT")]
        pub async_ack_wait: Option<String>,
        /// Most tasks a queue may hold (waiting or running) before creates on it
        /// are refused with 429 [default: 1000000].
        #[arg(long, global = true, env = "BMW_MAX_QUEUE_PENDING")]
        pub max_queue_pending: Option<u64>,
        /// Time limit of an async attempt whose task gives neither `timeout` nor
        /// `deadline`; 0s for none [default: 30m].
        #[arg(long, global = true, env = "BMW_ASYNC_DEFAULT_TIMEOUT")]
        pub async_default_timeout: Option<String>,
        /// A bearer token the bridge accepts: `rw:<secret>`, `ro:<secret>` (reads only) or a
        /// bare secret (read-write). Repeat the flag, or comma-separate in BMW_API_TOKEN.
        #[arg(
            long,
            global = true,
            env = "BMW_API_TOKEN",
            value_delimiter = ',',
            hide_env_values = true
        )]
        pub api_token: Option<Vec<String>>,
        /// A file of bridge tokens, one `rw <secret>` or `ro <secret>` per line (`#` comments).
        #[arg(long, global = true, env = "BMW_API_TOKEN_FILE")]
        pub api_token_file: Option<PathBuf>,
        /// Put /metrics behind the tokens too (any token; read-only is enough).
        #[arg(
            long,
            global = true,
            env = "BMW_METRICS_REQUIRE_TOKEN",
            num_args = 0..=1,
            default_missing_value = "true",
            require_equals = true,
            value_parser = clap::builder::BoolishValueParser::new()
        )]
        pub metrics_require_token: Option<bool>,
        /// Serve the bridge on a non-loopback address with no token: anyone who can
        /// reach it can create, delete and reload tasks.
        #[arg(
            long,
            global = true,
            env = "BMW_INSECURE_NO_AUTH",
            num_args = 0..=1,
            default_missing_value = "true",
            require_equals = true,
            value_parser = clap::builder::BoolishValueParser::new()
        )]
        pub insecure_no_auth: Option<bool>,
        /// Host names a browser may reach the bridge by, beside IP addresses and
        /// `localhost` (comma-separated; a leading `.` allows a domain's
        /// subdomains): a browser's request for any other `Host` is refused 403,
        /// so a DNS-rebinding page cannot use it. Requests without browser
        /// headers (curl, bk-monitor) are not checked.
        #[arg(long, global = true, env = "BMW_ALLOWED_HOSTS", value_delimiter = ',')]
        pub allowed_hosts: Option<Vec<String>>,
        /// Requests the bridge serves at once; more are answered 503 with Retry-After [default: 1024].
        #[arg(long, global = true, env = "BMW_MAX_CONCURRENT_REQUESTS")]
        pub max_concurrent_requests: Option<usize>,
        /// Longest a bridge request may take, from its first byte to its answer
        /// (504 after); longer than --reply-timeout [default: 30s].
        #[arg(long, global = true, env = "BMW_REQUEST_TIMEOUT")]
        pub request_timeout: Option<String>,
        /// PEM certificate chain: the bridge serves HTTPS (with --tls-key).
        #[arg(long, global = true, env = "BMW_TLS_CERT")]
        pub tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long, global = true, env = "BMW_TLS_KEY")]
        pub tls_key: Option<PathBuf>,
        /// How far ahead a task's `process_at`, `process_in` and `deadline` may be [default: 1year].
        #[arg(long, global = true, env = "BMW_MAX_TASK_DELAY")]
        pub max_task_delay: Option<String>,
        /// The longest per-attempt `timeout` of a task [default: 1day].
        #[arg(long, global = true, env = "BMW_MAX_TASK_TIMEOUT")]
        pub max_task_timeout: Option<String>,
        /// The longest `retention` of a task [default: 30days].
        #[arg(long, global = true, env = "BMW_MAX_RETENTION")]
        pub max_retention: Option<String>,
        /// The longest `unique_ttl` of a task [default: 30days].
        #[arg(long, global = true, env = "BMW_MAX_UNIQUE_TTL")]
        pub max_unique_ttl: Option<String>,
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
        pub demo_kinds: Option<bool>,
        /// A directory of task kind files: every `*.toml` in it holds `[[kind]]` tables
        /// (as the --config file may), read by `bmw run` and `bmw worker`.
        #[arg(long, global = true, env = "BMW_KINDS_DIR")]
        pub kinds_dir: Option<PathBuf>,
        /// NATS credentials file (user JWT and nkey seed, as `nsc` writes it).
        #[arg(long, global = true, env = "BMW_NATS_CREDS")]
        pub nats_creds: Option<PathBuf>,
        /// NATS user nkey: the seed (SU...) or a file holding it.
        #[arg(long, global = true, env = "BMW_NATS_NKEY", hide_env_values = true, value_parser = secret)]
        pub nats_nkey: Option<SecretString>,
        /// NATS user (with --nats-password).
        #[arg(long, global = true, env = "BMW_NATS_USER")]
        pub nats_user: Option<String>,
        /// NATS password (prefer the environment variable: a flag shows in `ps`).
        #[arg(long, global = true, env = "BMW_NATS_PASSWORD", hide_env_values = true, value_parser = secret)]
        pub nats_password: Option<SecretString>,
        /// NATS token (prefer the environment variable: a flag shows in `ps`).
        #[arg(long, global = true, env = "BMW_NATS_TOKEN", hide_env_values = true, value_parser = secret)]
        pub nats_token: Option<SecretString>,
        /// CA certificate (PEM) that signed nats-server's certificate [default: system roots].
        #[arg(long, global = true, env = "BMW_NATS_CA")]
        pub nats_ca: Option<PathBuf>,
        /// Client certificate (PEM) for a nats-server that verifies clients (with --nats-key).
        #[arg(long, global = true, env = "BMW_NATS_CERT")]
        pub nats_cert: Option<PathBuf>,
        /// Private key (PEM) of --nats-cert.
        #[arg(long, global = true, env = "BMW_NATS_KEY")]
        pub nats_key: Option<PathBuf>,
        /// Refuse to connect to NATS without TLS.
        #[arg(
            long,
            global = true,
            env = "BMW_NATS_REQUIRE_TLS",
            num_args = 0..=1,
            default_missing_value = "true",
            require_equals = true,
            value_parser = clap::builder::BoolishValueParser::new()
        )]
        pub nats_require_tls: Option<bool>,
        /// Prefix of this process's reply subjects, `_INBOX_<user>` where the
        /// server lets each user subscribe only to its own (nats/permissions.conf)
        /// [default: _INBOX].
        #[arg(long, global = true, env = "BMW_NATS_INBOX_PREFIX")]
        pub nats_inbox_prefix: Option<String>,
        /// What bmw's streams and buckets may hold together in NATS (e.g. 4GiB,
        /// 500MB), shared out among them; set by `bmw provision` and when a
        /// stream is created [default: 4GiB].
        #[arg(long, global = true, env = "BMW_STORAGE_MAX_BYTES")]
        pub storage_max_bytes: Option<String>,
        /// When the local nats-server `bmw run` starts (no --nats-url) fsyncs its
        /// store: `always` (before every acknowledgement: nothing acknowledged is
        /// lost on power loss) or an interval such as `2m` (faster; a power loss
        /// loses up to that much) [default: always].
        #[arg(long, global = true, env = "BMW_NATS_SYNC")]
        pub nats_sync: Option<String>,
        /// Export OpenTelemetry traces (OTLP over HTTP, protobuf) to this collector
        /// (`bmw run`, `bmw worker`, `bmw bridge`): its base URL, e.g.
        /// `http://127.0.0.1:4318` [default: off].
        #[arg(long, global = true, env = "BMW_OTLP_ENDPOINT")]
        pub otlp_endpoint: Option<String>,
        /// Kinds declared in the file (`[[kind]]`), run by `crate::external`; a
        /// file's only.
        #[arg(skip)]
        pub kind: Option<Vec<KindDecl>>,
    }
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
}
