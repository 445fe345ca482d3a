//! Connecting to nats-server: [`ConnectSettings`] (the URLs, how bmw proves
//! who it is, and TLS), turned into async-nats's `ConnectOptions`, the first
//! connection (retried while the server is unreachable, given up at once when
//! the server refuses the credentials or the TLS handshake), and
//! [`redact_url`], which every URL put in a log line or an error goes through.
//!
//! async-nats ignores a user and password written in the URL, so bmw takes them
//! out of the URL itself (`nats://user:pass@host` is a user and password,
//! `nats://token@host` a token) and hands async-nats URLs without credentials.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{ConnectErrorKind, ServerAddr};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;

/// How long the first connection is retried while no server answers (a
/// refusal of the credentials or of TLS ends it at once).
pub const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(30);

/// How bmw authenticates to nats-server: at most one way.
#[derive(Debug, Clone, Default)]
pub enum NatsAuth {
    /// No credentials.
    #[default]
    None,
    /// A `.creds` file (user JWT and nkey seed, as `nsc` writes it).
    CredsFile(PathBuf),
    /// A user nkey seed (`SU...`).
    Nkey(SecretString),
    /// A user and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: SecretString,
    },
    /// A token.
    Token(SecretString),
}

impl NatsAuth {
    /// Which way this is, for messages (never the secret itself).
    pub fn describe(&self) -> &'static str {
        match self {
            NatsAuth::None => "no credentials",
            NatsAuth::CredsFile(_) => "a credentials file",
            NatsAuth::Nkey(_) => "an nkey",
            NatsAuth::UserPassword { .. } => "a user and password",
            NatsAuth::Token(_) => "a token",
        }
    }
}

/// A client certificate and its private key (PEM files), for mutual TLS.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// The certificate (chain).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// TLS towards nats-server (rustls inside async-nats; system roots unless `ca`).
#[derive(Debug, Clone, Default)]
pub struct NatsTls {
    /// A CA certificate file (PEM) that signed the server's certificate;
    /// replaces the system roots.
    pub ca: Option<PathBuf>,
    /// A client certificate for servers that verify clients.
    pub client_cert: Option<ClientCert>,
    /// Refuse to talk to a server without TLS (`tls://` URLs require it too).
    pub require: bool,
}

/// Everything needed to connect: where, as whom, and how securely.
#[derive(Debug, Clone)]
pub struct ConnectSettings {
    /// One URL, or several comma-separated (a cluster); may carry
    /// `user:password@` or `token@`.
    pub urls: String,
    /// Credentials.
    pub auth: NatsAuth,
    /// TLS.
    pub tls: NatsTls,
    /// The prefix of this client's reply subjects (`_INBOX` unless told):
    /// `_INBOX_<user>` where each user may only subscribe to its own.
    pub inbox_prefix: Option<String>,
    /// How long the first connection is tried while no server answers
    /// ([`FIRST_CONNECT_WAIT`] for services; `bmw task` gives up sooner).
    pub first_connect_wait: Duration,
}

impl ConnectSettings {
    /// `urls` with no credentials other than what they carry, and no TLS settings.
    pub fn new(urls: impl Into<String>) -> ConnectSettings {
        ConnectSettings {
            urls: urls.into(),
            auth: NatsAuth::None,
            tls: NatsTls::default(),
            inbox_prefix: None,
            first_connect_wait: FIRST_CONNECT_WAIT,
        }
    }
}

/// Why connecting failed. Every URL in it is redacted.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A URL does not parse.
    #[error("invalid NATS URL {url:?}: {source}")]
    InvalidUrl {
        /// The URL, redacted.
        url: String,
        /// Why.
        source: std::io::Error,
    },
    /// Credentials were given twice (in the URL and by a setting, or
    /// different ones in two URLs).
    #[error("NATS credentials given twice: {message}")]
    Conflicting {
        /// Which ones.
        message: String,
    },
    /// A credentials or nkey file could not be read or used.
    #[error("cannot use {what}: {source}")]
    Credentials {
        /// Which setting and file.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The server refused the credentials: no point in trying again.
    #[error(
        "nats-server at {url} refused bmw's credentials ({auth}): authorization failed; \
         check --nats-user/--nats-password, --nats-token, --nats-nkey or --nats-creds"
    )]
    Unauthorized {
        /// The URL(s), redacted.
        url: String,
        /// Which way bmw authenticated ([`NatsAuth::describe`]).
        auth: &'static str,
        /// async-nats's error.
        source: async_nats::ConnectError,
    },
    /// TLS failed (a certificate the other side does not accept, an
    /// unreadable certificate or key file): no point in trying again.
    #[error("TLS with nats-server at {url} failed; check --nats-ca, --nats-cert and --nats-key")]
    Tls {
        /// The URL(s), redacted.
        url: String,
        /// async-nats's error.
        source: async_nats::ConnectError,
    },
    /// No server answered within [`FIRST_CONNECT_WAIT`].
    #[error("cannot connect to NATS at {url} (tried for {waited:.0?})")]
    Connect {
        /// The URL(s), redacted.
        url: String,
        /// How long it tried.
        waited: Duration,
        /// The last attempt's error.
        source: async_nats::ConnectError,
    },
}

/// `urls` (one or comma-separated) with any `user:password@` or `token@`
/// replaced by `***@`, for logs and errors. Works on text that does not
/// parse as a URL too.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            let start = url.find("://").map_or(0, |i| i + 3);
            let rest = &url[start..];
            let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
            match authority.rfind('@') {
                Some(at) => format!("{}***{}", &url[..start], &rest[at..]),
                None => url.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses the URLs, taking any credentials out of them: the clean addresses
/// and the credentials they carried (the same in every URL that has any).
fn parse_urls(urls: &str) -> Result<(Vec<ServerAddr>, NatsAuth), ConnectError> {
    let mut addrs = Vec::new();
    let mut carried: Option<(String, Option<String>)> = None;
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let invalid = |source| ConnectError::InvalidUrl {
            url: redact_url(url),
            source,
        };
        let addr = url.parse::<ServerAddr>().map_err(invalid)?;
        let mut inner = addr.into_inner();
        if !inner.username().is_empty() {
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            let found = (decode(inner.username()), inner.password().map(decode));
            if carried.as_ref().is_some_and(|c| *c != found) {
                return Err(ConnectError::Conflicting {
                    message: "the URLs carry different credentials".into(),
                });
            }
            carried = Some(found);
            let cleared = inner.set_username("").is_ok() && inner.set_password(None).is_ok();
            if !cleared {
                return Err(invalid(std::io::Error::other(
                    "cannot remove its credentials",
                )));
            }
        }
        addrs.push(inner.as_str().parse::<ServerAddr>().map_err(invalid)?);
    }
    if addrs.is_empty() {
        return Err(ConnectError::InvalidUrl {
            url: String::new(),
            source: std::io::Error::other("no URL given"),
        });
    }
    let auth = match carried {
        None => NatsAuth::None,
        Some((user, Some(password))) => NatsAuth::UserPassword {
            user,
            password: password.into(),
        },
        Some((token, None)) => NatsAuth::Token(token.into()),
    };
    Ok((addrs, auth))
}

/// async-nats's options for `settings` with credentials `auth`; every
/// connection made (the first and each reconnect) bumps `connections`.
async fn options(
    settings: &ConnectSettings,
    auth: &NatsAuth,
    name: &str,
    connections: Arc<watch::Sender<u64>>,
    refusals: Refusals,
) -> Result<async_nats::ConnectOptions, ConnectError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            if matches!(event, async_nats::Event::Connected) {
                connections.send_modify(|n| *n += 1);
            }
            refusals.note(&event);
            async move { log_event(event) }
        });
    options = match auth {
        NatsAuth::None => options,
        NatsAuth::CredsFile(path) => {
            options
                .credentials_file(path)
                .await
                .map_err(|source| ConnectError::Credentials {
                    what: format!("--nats-creds {}", path.display()),
                    source,
                })?
        }
        NatsAuth::Nkey(seed) => options.nkey(seed.expose_secret().to_owned()),
        NatsAuth::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.expose_secret().to_owned())
        }
        NatsAuth::Token(token) => options.token(token.expose_secret().to_owned()),
    };
    if let Some(prefix) = &settings.inbox_prefix {
        options = options.custom_inbox_prefix(prefix.clone());
    }
    if let Some(ca) = &settings.tls.ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let Some(client) = &settings.tls.client_cert {
        options = options.add_client_certificate(client.cert.clone(), client.key.clone());
    }
    Ok(options.require_tls(settings.tls.require))
}

/// Logs a connection event: server errors (a permission violation, a refused
/// reconnect) as warnings, the rest as information.
fn log_event(event: async_nats::Event) {
    use async_nats::{Event, ServerError};
    match &event {
        Event::ServerError(ServerError::AuthorizationViolation) => {
            tracing::error!(%event, "nats-server refused bmw's credentials")
        }
        Event::ServerError(_) | Event::ClientError(_) => {
            tracing::warn!(%event, "nats connection event")
        }
        _ => tracing::info!(%event, "nats connection event"),
    }
}

/// The last permission violation the server reported on a connection: it
/// drops a publish its user may not make and says so only in an event, so
/// a request that then times out can be told apart from a slow server.
#[derive(Debug, Clone, Default)]
pub struct Refusals(Arc<std::sync::Mutex<Option<(Instant, String)>>>);

impl Refusals {
    fn note(&self, event: &async_nats::Event) {
        if let async_nats::Event::ServerError(async_nats::ServerError::Other(message)) = event
            && message.contains("Permissions Violation")
        {
            *self.0.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((Instant::now(), message.clone()));
        }
    }

    /// The server's message of the last violation at or after `since`.
    pub fn since(&self, since: Instant) -> Option<String> {
        let last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref()
            .filter(|(at, _)| *at >= since)
            .map(|(_, message)| message.clone())
    }
}

/// Whether an attempt failed in a way that trying again cannot fix.
enum Failure {
    Unauthorized,
    Tls,
    Transient,
}

fn failure(error: &async_nats::ConnectError) -> Failure {
    match error.kind() {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
            Failure::Unauthorized
        }
        ConnectErrorKind::Tls => Failure::Tls,
        _ => {
            // A handshake refused by either side surfaces as an I/O error
            // wrapping rustls's error.
            let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
            while let Some(e) = current {
                if e.downcast_ref::<async_nats::rustls::Error>().is_some()
                    || e.downcast_ref::<std::io::Error>()
                        .and_then(|io| io.get_ref())
                        .is_some_and(|inner| inner.is::<async_nats::rustls::Error>())
                {
                    return Failure::Tls;
                }
                current = e.source();
            }
            Failure::Transient
        }
    }
}

/// Connects, retrying for [`FIRST_CONNECT_WAIT`] while no server answers and
/// failing at once when the server refuses the credentials or TLS fails.
/// Once connected, the client reconnects forever. Also returns the count of
/// connections made, which changes on every reconnect.
pub(crate) async fn connect_client(
    settings: &ConnectSettings,
    name: &str,
    refusals: Refusals,
) -> Result<(async_nats::Client, watch::Receiver<u64>), ConnectError> {
    let url = redact_url(&settings.urls);
    let (addrs, carried) = parse_urls(&settings.urls)?;
    let auth = match (carried, &settings.auth) {
        (NatsAuth::None, given) => given.clone(),
        (carried, NatsAuth::None) => carried,
        (carried, given) => {
            return Err(ConnectError::Conflicting {
                message: format!(
                    "the URL carries {} and the settings give {}",
                    carried.describe(),
                    given.describe()
                ),
            });
        }
    };
    let (connections, connected) = watch::channel(0);
    let options = options(settings, &auth, name, Arc::new(connections), refusals).await?;
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        let source = match options.clone().connect(addrs.clone()).await {
            Ok(client) => return Ok((client, connected)),
            Err(source) => source,
        };
        match failure(&source) {
            Failure::Unauthorized => {
                return Err(ConnectError::Unauthorized {
                    url,
                    auth: auth.describe(),
                    source,
                });
            }
            Failure::Tls => return Err(ConnectError::Tls { url, source }),
            Failure::Transient if started.elapsed() >= settings.first_connect_wait => {
                return Err(ConnectError::Connect {
                    url,
                    waited: started.elapsed(),
                    source,
                });
            }
            Failure::Transient => {
                tracing::warn!(%url, cause = %source, "nats-server not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_in_messages() {
        assert_eq!(
            redact_url("nats://bmw:s3cret@127.0.0.1:4222"),
            "nats://***@127.0.0.1:4222"
        );
        assert_eq!(
            redact_url("tls://tok@a:1, nats://b:2,u:p@c:3/x@y"),
            "tls://***@a:1,nats://b:2,***@c:3/x@y"
        );
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }

    #[test]
    fn credentials_are_taken_out_of_the_urls() {
        let (addrs, auth) =
            parse_urls("nats://bmw:p%40ss@127.0.0.1:4222,nats://bmw:p%40ss@h:5").unwrap();
        assert!(
            addrs
                .iter()
                .all(|a| !a.has_user_pass() && a.password().is_none())
        );
        match auth {
            NatsAuth::UserPassword { user, password } => {
                assert_eq!((user.as_str(), password.expose_secret()), ("bmw", "p@ss"));
            }
            other => panic!("{other:?}"),
        }
        let (_, auth) = parse_urls("tls://t0ken@127.0.0.1:4222").unwrap();
        assert!(matches!(auth, NatsAuth::Token(t) if t.expose_secret() == "t0ken"));
        assert!(matches!(
            parse_urls("nats://a:b@h:1,nats://a:c@h:2"),
            Err(ConnectError::Conflicting { .. })
        ));
        let invalid = parse_urls("nats://u:secret@h:notaport")
            .unwrap_err()
            .to_string();
        assert!(!invalid.contains("secret"), "{invalid}");
    }

    #[test]
    fn secrets_do_not_print() {
        let auth = NatsAuth::UserPassword {
            user: "bmw".into(),
            password: "s3cret".into(),
        };
        assert!(!format!("{auth:?}").contains("s3cret"));
    }
}
