//! Bearer-token authentication of the bridge: [`ApiTokens`], the tokens it
//! accepts (kept as SHA-256 digests and compared in constant time), and
//! `require_token`, the middleware that answers 401 (no or unknown token,
//! with `WWW-Authenticate: Bearer`) or 403 (a read-only token on a write) with
//! the envelope. Which routes sit behind it is decided in [`super::router`];
//! the tokens themselves are read by [`crate::config`].

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::envelope::ApiError;
use crate::config::{ApiToken, TokenAccess};

/// The tokens the bridge accepts; empty when it asks for none. `Debug` shows
/// how many, never a secret or a digest.
#[derive(Clone, Default)]
pub struct ApiTokens {
    /// Digest of each secret and what it allows. Comparing fixed-size
    /// digests keeps the time a check takes independent of the secrets'
    /// lengths and contents.
    digests: Arc<[([u8; 32], TokenAccess)]>,
}

impl std::fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTokens")
            .field("count", &self.digests.len())
            .finish()
    }
}

impl ApiTokens {
    /// The tokens of the configuration.
    pub fn new(tokens: &[ApiToken]) -> Self {
        ApiTokens {
            digests: tokens
                .iter()
                .map(|t| (Sha256::digest(t.secret().as_bytes()).into(), t.access()))
                .collect(),
        }
    }

    /// Whether no token is configured (the bridge is open).
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// What `presented` allows, or `None` for an unknown token. Every token
    /// is compared, without stopping at a match; a secret listed both
    /// read-only and read-write allows writes.
    fn access_of(&self, presented: &[u8]) -> Option<TokenAccess> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let (mut read, mut write) = (Choice::from(0), Choice::from(0));
        for (known, access) in self.digests.iter() {
            let matched = known.ct_eq(&digest);
            match access {
                TokenAccess::ReadOnly => read |= matched,
                TokenAccess::ReadWrite => write |= matched,
            }
        }
        if bool::from(write) {
            Some(TokenAccess::ReadWrite)
        } else if bool::from(read) {
            Some(TokenAccess::ReadOnly)
        } else {
            None
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is
/// case-insensitive), if there is one.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    Some(token.trim_ascii()).filter(|t| !t.is_empty())
}

/// 401 with the envelope and the Bearer challenge (RFC 6750).
fn unauthorized(presented: bool) -> Response {
    let (message, challenge) = if presented {
        (
            "unauthorized: the bearer token is not valid",
            r#"Bearer realm="bmw", error="invalid_token""#,
        )
    } else {
        (
            "unauthorized: send a token as `Authorization: Bearer <token>`",
            r#"Bearer realm="bmw""#,
        )
    };
    (
        [(WWW_AUTHENTICATE, challenge)],
        ApiError::new(StatusCode::UNAUTHORIZED, message),
    )
        .into_response()
}

/// Lets a request through when no token is configured, or when it carries a
/// token that allows its method: any token reads (`GET`, `HEAD`,
/// `OPTIONS`), only a read-write token writes.
pub(crate) async fn require_token(
    State(tokens): State<ApiTokens>,
    request: Request,
    next: Next,
) -> Response {
    match refusal(&tokens, &request) {
        Some(refused) => refused,
        None => next.run(request).await,
    }
}

/// The 401 or 403 for a request `tokens` do not let through; `None` lets it
/// through (as [`require_token`] does).
pub(crate) fn refusal(tokens: &ApiTokens, request: &Request) -> Option<Response> {
    if tokens.is_empty() {
        return None;
    }
    let presented = bearer(request.headers());
    match presented.and_then(|t| tokens.access_of(t)) {
        None => Some(unauthorized(presented.is_some())),
        Some(TokenAccess::ReadOnly) if !request.method().is_safe() => Some(
            ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "forbidden: this token is read-only; {} needs a read-write token",
                    request.method()
                ),
            )
            .into_response(),
        ),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(items: &[&str]) -> ApiTokens {
        let parsed: Vec<_> = items.iter().map(|i| ApiToken::parse(i).unwrap()).collect();
        ApiTokens::new(&parsed)
    }

    #[test]
    fn a_token_allows_what_it_was_given() {
        let t = tokens(&["ro:reader", "rw:writer", "ro:both", "rw:both"]);
        assert_eq!(t.access_of(b"reader"), Some(TokenAccess::ReadOnly));
        assert_eq!(t.access_of(b"writer"), Some(TokenAccess::ReadWrite));
        assert_eq!(t.access_of(b"both"), Some(TokenAccess::ReadWrite));
        for unknown in [&b"writer "[..], b"write", b"", b"WRITER"] {
            assert_eq!(t.access_of(unknown), None, "{unknown:?}");
        }
        assert!(tokens(&[]).is_empty());
        assert!(!format!("{t:?}").contains("reader"));
    }

    #[test]
    fn the_bearer_scheme_is_read_case_insensitively() {
        let header = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert_eq!(bearer(&header("Bearer abc")), Some(&b"abc"[..]));
        assert_eq!(bearer(&header("bearer  abc ")), Some(&b"abc"[..]));
        assert_eq!(bearer(&header("Basic abc")), None);
        assert_eq!(bearer(&header("Bearer ")), None);
        assert_eq!(bearer(&header("Bearer")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }
}
