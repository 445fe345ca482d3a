//! [`KindDecl`]: a task kind declared in configuration (`[[kind]]` in the
//! `--config` file) rather than compiled in: the command that runs it, or the
//! NATS service that handles it. Only the file's form lives here (the config
//! layer reads files); `crate::external` checks and registers declarations.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

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
