//! The bridge's bearer tokens as settings: [`ApiToken`] (a secret and what it
//! allows), read from `--api-token` items (`rw:<secret>`, `ro:<secret>`, or a
//! bare secret, read-write) and from an `--api-token-file` (one `rw <secret>`
//! or `ro <secret>` per line, `#` comments). Checking a presented token is
//! the bridge's job (`bridge::auth`); this module only reads and validates.
//! No error message and no `Debug` output contains a secret.

use std::path::Path;

use super::ConfigError;

/// What a bearer token allows on the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenAccess {
    /// Reads only: `GET`, `HEAD`, `OPTIONS`.
    ReadOnly,
    /// Reads and writes: creates, deletes, reloads, requeues, pauses.
    ReadWrite,
}

/// One token the bridge accepts. `Debug` shows its access, never its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    access: TokenAccess,
    secret: String,
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiToken")
            .field("access", &self.access)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl ApiToken {
    /// A token with `access`; the secret must be non-empty visible ASCII (what
    /// an `Authorization` header can carry). The error names what is wrong,
    /// without the secret.
    pub fn new(access: TokenAccess, secret: &str) -> Result<ApiToken, String> {
        if secret.is_empty() {
            return Err("a token's secret is empty".into());
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "a token's secret must be visible ASCII, without spaces or control characters"
                    .into(),
            );
        }
        Ok(ApiToken {
            access,
            secret: secret.to_owned(),
        })
    }

    /// `rw:<secret>`, `ro:<secret>` or a bare secret (read-write), as
    /// `--api-token` and `BMW_API_TOKEN` take them.
    pub fn parse(item: &str) -> Result<ApiToken, String> {
        let item = item.trim();
        match item.split_at_checked(3) {
            Some(("ro:", secret)) => ApiToken::new(TokenAccess::ReadOnly, secret),
            Some(("rw:", secret)) => ApiToken::new(TokenAccess::ReadWrite, secret),
            _ => ApiToken::new(TokenAccess::ReadWrite, item),
        }
    }

    /// What the token allows.
    pub fn access(&self) -> TokenAccess {
        self.access
    }

    /// The secret a client sends as `Authorization: Bearer <secret>`.
    pub fn secret(&self) -> &str {
        &self.secret
    }
}

/// The tokens given as `--api-token` items.
pub(super) fn parse_items(items: &[String]) -> Result<Vec<ApiToken>, ConfigError> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            ApiToken::parse(item).map_err(|message| ConfigError::Invalid {
                name: "api-token",
                message: format!("token {} of {}: {message}", i + 1, items.len()),
            })
        })
        .collect()
}

/// The tokens of an `--api-token-file`: lines `rw <secret>`, `ro <secret>`
/// or `<secret>` (read-write); blank lines and `#` comments are skipped.
pub(super) fn read_file(path: &Path) -> Result<Vec<ApiToken>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut tokens = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let token = match fields.as_slice() {
            ["ro", secret] => ApiToken::new(TokenAccess::ReadOnly, secret),
            ["rw", secret] => ApiToken::new(TokenAccess::ReadWrite, secret),
            [secret] => ApiToken::new(TokenAccess::ReadWrite, secret),
            _ => Err("expected `ro <secret>`, `rw <secret>` or `<secret>`".into()),
        };
        tokens.push(token.map_err(|message| ConfigError::Invalid {
            name: "api-token-file",
            message: format!("{} line {}: {message}", path.display(), number + 1),
        })?);
    }
    if tokens.is_empty() {
        return Err(ConfigError::Invalid {
            name: "api-token-file",
            message: format!("{} holds no token", path.display()),
        });
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_name_their_access() {
        let ro = ApiToken::parse("ro:abc").unwrap();
        assert_eq!((ro.access(), ro.secret()), (TokenAccess::ReadOnly, "abc"));
        let rw = ApiToken::parse(" rw:a:b ").unwrap();
        assert_eq!((rw.access(), rw.secret()), (TokenAccess::ReadWrite, "a:b"));
        let bare = ApiToken::parse("xyz:1").unwrap();
        assert_eq!(
            (bare.access(), bare.secret()),
            (TokenAccess::ReadWrite, "xyz:1")
        );
        for bad in ["", "ro:", "rw:two words", "ro:tab\tin"] {
            assert!(ApiToken::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_and_debug_never_show_a_secret() {
        let token = ApiToken::parse("ro:s3cr3t-value").unwrap();
        assert!(!format!("{token:?}").contains("s3cr3t"));
        let err = parse_items(&["ok".into(), "rw:s3cr3t value".into()]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("api-token") && text.contains("token 2 of 2"),
            "{text}"
        );
        assert!(!text.contains("s3cr3t"), "{text}");
    }

    #[test]
    fn a_file_has_one_token_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# comment\n\nro  reader\n rw writer \nbare\n").unwrap();
        let tokens = read_file(&path).unwrap();
        let got: Vec<_> = tokens.iter().map(|t| (t.access(), t.secret())).collect();
        assert_eq!(
            got,
            [
                (TokenAccess::ReadOnly, "reader"),
                (TokenAccess::ReadWrite, "writer"),
                (TokenAccess::ReadWrite, "bare"),
            ]
        );
        std::fs::write(&path, "ro reader\nadmin s3cr3t\n").unwrap();
        let text = read_file(&path).unwrap_err().to_string();
        assert!(
            text.contains("line 2") && !text.contains("s3cr3t"),
            "{text}"
        );
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(
            read_file(&path)
                .unwrap_err()
                .to_string()
                .contains("no token")
        );
    }
}
