//! [`KindDecl`]: a task kind declared in configuration (`[[kind]]` in the
//! `--config` file, or in the `*.toml` files of `--kinds-dir`) rather than
//! compiled in: the command that runs it, or the NATS service that handles
//! it. Only the files' form lives here (the config layer reads files);
//! `crate::external` checks and registers declarations.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

/// A file of `--kinds-dir`: `[[kind]]` tables and nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KindsFile {
    #[serde(default)]
    kind: Vec<KindDecl>,
}

/// The declarations of every `*.toml` file of `dir`, in file-name order,
/// each with its file's directory as `base_dir`.
pub(super) fn read_dir(dir: &Path) -> Result<Vec<KindDecl>, ConfigError> {
    let read_error = |path: &Path, source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| read_error(dir, e))? {
        let path = entry.map_err(|e| read_error(dir, e))?.path();
        if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    let mut decls = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|e| read_error(&path, e))?;
        let file: KindsFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        decls.extend(file.kind.into_iter().map(|mut d| {
            d.base_dir = Some(dir.to_owned());
            d
        }));
    }
    Ok(decls)
}

/// One `[[kind]]` table, as written (checked by `crate::external`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindDecl {
    /// The kind (`daemon:apm:pre_calculate`, `async:cleanup`...).
    pub name: String,
    /// The program and its arguments (daemon, async or periodic kinds).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// The NATS subject of a service that handles the kind (async or periodic kinds).
    #[serde(default)]
    pub service: Option<String>,
    /// Daemon kinds: the payload field that is the task's dimension (`data_id`).
    #[serde(default)]
    pub dimension: Option<String>,
    /// Extra environment of the command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The command's working directory (relative: to the declaring file's directory).
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// The directory of the file that declares the kind: relative paths in
    /// the declaration are read from there. Set by the reader, not written.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}
