//! Reading one setting's text into its value, naming the setting when the
//! text is wrong: queues and weights, host names, files, the nkey seed, byte
//! sizes, the inbox prefix, and the NATS credentials and TLS taken together.

use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};

use super::{
    ConfigError, ConfigOverrides, DEFAULT_METRICS_ADDR, DEFAULT_NATS_SYNC, KindDecl,
    METRICS_ADDR_OFF, QueueWeight, TlsFiles, api_token, kind_decl,
};
use crate::nats::local::StoreSync;
use crate::nats::{ClientCert, NatsAuth, NatsTls};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Parses `critical=6`, `default` (weight 1) items.
pub(super) fn parse_queues(items: Vec<String>) -> Result<Vec<QueueWeight>, ConfigError> {
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
pub(super) fn allowed_hosts(items: Vec<String>) -> Result<Vec<String>, ConfigError> {
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
pub(super) fn storage_bytes(text: &str) -> Result<u64, ConfigError> {
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
pub(super) fn inbox_prefix(prefix: String) -> Result<String, ConfigError> {
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
pub(super) fn nats_auth(given: &mut ConfigOverrides) -> Result<NatsAuth, ConfigError> {
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
pub(super) fn nats_tls(given: &mut ConfigOverrides) -> Result<NatsTls, ConfigError> {
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

/// A humantime duration (`15s`, `1day`), or `default` when not given.
pub(super) fn duration(
    name: &'static str,
    given: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match given {
        None => Ok(default),
        Some(s) => humantime::parse_duration(s.trim()).map_err(|e| ConfigError::Invalid {
            name,
            message: format!("{s:?} is not a duration ({e})"),
        }),
    }
}

/// An `ip:port`.
pub(super) fn socket_addr(name: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse::<SocketAddr>().map_err(|e| ConfigError::Invalid {
        name,
        message: format!("{s:?} is not a socket address ({e})"),
    })
}

/// `--metrics-addr`: an address, or `off` for none.
pub(super) fn metrics_addr(given: Option<&str>) -> Result<Option<SocketAddr>, ConfigError> {
    match given.map(str::trim) {
        Some(off) if off.eq_ignore_ascii_case(METRICS_ADDR_OFF) => Ok(None),
        Some(s) => Ok(Some(s.parse::<SocketAddr>().map_err(|e| {
            ConfigError::Invalid {
                name: "metrics-addr",
                message: format!(
                    "{s:?} is not a socket address ({e}); `{METRICS_ADDR_OFF}` serves none"
                ),
            }
        })?)),
        None => socket_addr("metrics-addr", DEFAULT_METRICS_ADDR).map(Some),
    }
}

/// `--nats-sync`: `always` or an interval.
pub(super) fn nats_sync(given: Option<String>) -> Result<StoreSync, ConfigError> {
    match given {
        None => Ok(DEFAULT_NATS_SYNC),
        Some(text) => text.parse().map_err(|message| ConfigError::Invalid {
            name: "nats-sync",
            message,
        }),
    }
}

/// The bridge's tokens: `--api-token` items, then the `--api-token-file`'s.
pub(super) fn api_tokens(
    items: Option<&[String]>,
    file: Option<&Path>,
) -> Result<Vec<super::ApiToken>, ConfigError> {
    let mut tokens = api_token::parse_items(items.unwrap_or(&[]))?;
    if let Some(path) = file {
        tokens.extend(api_token::read_file(path)?);
    }
    Ok(tokens)
}

/// `--tls-cert` and `--tls-key`, both or neither.
pub(super) fn tls_files(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<TlsFiles>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key })),
        (None, None) => Ok(None),
        (cert, _) => Err(ConfigError::Invalid {
            name: if cert.is_some() {
                "tls-key"
            } else {
                "tls-cert"
            },
            message: "--tls-cert and --tls-key go together".into(),
        }),
    }
}

/// The `[[kind]]` tables of the file, then those of `--kinds-dir`.
pub(super) fn kinds(
    in_file: Option<Vec<KindDecl>>,
    dir: Option<&Path>,
) -> Result<Vec<KindDecl>, ConfigError> {
    let mut kinds = in_file.unwrap_or_default();
    if let Some(dir) = dir {
        kinds.extend(kind_decl::read_dir(dir)?);
    }
    Ok(kinds)
}

/// `--otlp-endpoint`: an OTLP/HTTP base or traces URL; empty is off.
pub(super) fn otlp_endpoint(given: Option<String>) -> Result<Option<String>, ConfigError> {
    match given.filter(|e| !e.trim().is_empty()) {
        Some(endpoint) => {
            crate::traces::traces_url(&endpoint).map_err(|e| ConfigError::Invalid {
                name: "otlp-endpoint",
                message: e.to_string(),
            })?;
            Ok(Some(endpoint.trim().to_owned()))
        }
        None => Ok(None),
    }
}
