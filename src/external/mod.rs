//! Task kinds whose code is not Rust: declared in configuration
//! ([`KindDecl`], `[[kind]]` in the `--config` file), checked here and
//! registered like compiled kinds, so a worker advertises them in
//! `bmw_workers` and runs them.
//!
//! - a daemon kind with a `command` runs as a supervised child process per
//!   instance ([`daemon`]);
//! - an async or periodic kind with a `command` runs one child process per
//!   attempt ([`command`]);
//! - both spawn through [`child`]: own process group, killed with the worker,
//!   payload on stdin and in the environment, output into the log.
//! - an async or periodic kind with a `service` is answered by a
//!   (queue-grouped) NATS service, one request per attempt ([`service`]).
//!
//! Relative paths in a declaration (the program, `workdir`) are read from
//! the directory of the file that declares it; a program without a `/` is
//! looked up on `PATH`. A declaration that does not check out stops the
//! worker from starting, with the kind and the path in the message.

pub mod child;
pub mod command;
pub mod daemon;
pub mod service;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::config::KindDecl;
use crate::registry::{Registry, RegistryError};
use crate::task::{Kind, TaskType};

/// Why a declared kind was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeclError {
    /// The declaration is not one bmw can run.
    #[error("declared kind `{kind}`: {message}")]
    Invalid {
        /// The kind, as declared.
        kind: String,
        /// What is wrong.
        message: String,
    },
    /// The program to run is missing or cannot be run.
    #[error("declared kind `{kind}`: program {path} {problem}")]
    Program {
        /// The kind.
        kind: String,
        /// The program, as resolved (or as written when not found).
        path: PathBuf,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The registry refused it (a duplicate, a kind of the wrong type).
    #[error("declared kind: {0}")]
    Registry(#[from] RegistryError),
}

/// A declared command, checked: what a child process is started from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    /// The kind it runs.
    pub kind: Kind,
    /// The program, resolved to an absolute path.
    pub program: PathBuf,
    /// The arguments after the program.
    pub args: Vec<String>,
    /// Extra environment, from the declaration.
    pub env: Vec<(String, String)>,
    /// The working directory (absolute).
    pub workdir: PathBuf,
}

/// What a declaration asks for, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Declared {
    /// A daemon kind run as a child process per instance.
    Daemon {
        /// The command.
        program: Arc<Program>,
        /// The payload field that is the task dimension.
        dimension: Option<String>,
    },
    /// An async or periodic kind run as a child process per attempt.
    Command(Arc<Program>),
    /// An async or periodic kind handled by a NATS service on this subject.
    Service {
        /// The kind.
        kind: Kind,
        /// The service's subject.
        subject: String,
    },
}

/// Checks one declaration: the kind parses, exactly one of `command` and
/// `service`, `dimension` only for a daemon, a `command` that is not empty
/// and whose program exists and is executable.
pub fn check(decl: &KindDecl) -> Result<Declared, DeclError> {
    let invalid = |message: String| DeclError::Invalid {
        kind: decl.name.clone(),
        message,
    };
    let kind = Kind::parse(&decl.name).map_err(|e| invalid(e.to_string()))?;
    let daemon = kind.task_type() == TaskType::Daemon;
    if decl.dimension.is_some() && !daemon {
        return Err(invalid("`dimension` applies to daemon kinds only".into()));
    }
    if decl.dimension.as_deref().is_some_and(str::is_empty) {
        return Err(invalid("`dimension` is empty".into()));
    }
    match (&decl.command, &decl.service) {
        (Some(_), Some(_)) => Err(invalid("give `command` or `service`, not both".into())),
        (None, None) => Err(invalid(
            "give `command` (argv) or `service` (a NATS subject)".into(),
        )),
        (None, Some(subject)) => {
            if daemon {
                return Err(invalid(
                    "a daemon kind runs a `command`; `service` is for async and periodic kinds"
                        .into(),
                ));
            }
            if !decl.env.is_empty() || decl.workdir.is_some() {
                return Err(invalid("`env` and `workdir` go with `command`".into()));
            }
            service::handler(subject).map_err(|e| invalid(e.to_string()))?;
            Ok(Declared::Service {
                kind,
                subject: subject.clone(),
            })
        }
        (Some(argv), None) => {
            let program = Arc::new(program(decl, kind, argv)?);
            Ok(if daemon {
                Declared::Daemon {
                    program,
                    dimension: decl.dimension.clone(),
                }
            } else {
                Declared::Command(program)
            })
        }
    }
}

/// The declaration's command, with its program found and checked.
fn program(decl: &KindDecl, kind: Kind, argv: &[String]) -> Result<Program, DeclError> {
    let invalid = |message: &str| DeclError::Invalid {
        kind: decl.name.clone(),
        message: message.to_owned(),
    };
    let Some((first, args)) = argv.split_first() else {
        return Err(invalid(
            "`command` is empty (it is the program and its arguments)",
        ));
    };
    if first.is_empty() {
        return Err(invalid("`command` starts with an empty program"));
    }
    let base = decl.base_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    let workdir = match &decl.workdir {
        Some(w) => base.join(w),
        None => base.clone(),
    };
    // Absolute: the child runs in `workdir`, where a relative program path
    // would be read again from there.
    let workdir = std::path::absolute(&workdir).unwrap_or(workdir);
    if !workdir.is_dir() {
        return Err(DeclError::Program {
            kind: decl.name.clone(),
            path: workdir,
            problem: "(its workdir) is not a directory",
        });
    }
    let program = if first.contains('/') {
        // `./x` is `x`: the message names the file plainly.
        let relative: PathBuf = Path::new(first)
            .components()
            .filter(|c| *c != std::path::Component::CurDir)
            .collect();
        let path = workdir.join(relative);
        executable(&path).map_err(|problem| DeclError::Program {
            kind: decl.name.clone(),
            path: path.clone(),
            problem,
        })?;
        path
    } else {
        on_path(first).ok_or_else(|| DeclError::Program {
            kind: decl.name.clone(),
            path: PathBuf::from(first),
            problem: "is not an executable file on PATH",
        })?
    };
    Ok(Program {
        kind,
        program,
        args: args.to_vec(),
        env: decl
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        workdir,
    })
}

/// Whether `path` is a file someone may execute.
fn executable(path: &Path) -> Result<(), &'static str> {
    match std::fs::metadata(path) {
        Err(_) => Err("does not exist"),
        Ok(m) if !m.is_file() => Err("is not a file"),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Err("is not executable"),
        Ok(_) => Ok(()),
    }
}

/// The first executable `name` in the directories of `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| executable(candidate).is_ok())
        .map(|found| std::path::absolute(&found).unwrap_or(found))
}

/// Checks every declaration, then registers them all; the first refusal
/// stops (a worker must not start with part of its kinds).
pub fn register(registry: &mut Registry, decls: &[KindDecl]) -> Result<(), DeclError> {
    let checked = decls.iter().map(check).collect::<Result<Vec<_>, _>>()?;
    for declared in checked {
        match declared {
            Declared::Daemon { program, dimension } => {
                let operator = Arc::new(daemon::ProcessOperator::new(program.clone(), dimension));
                registry.register_daemon(program.kind.as_str(), move || {
                    Ok(operator.clone() as Arc<dyn crate::daemon::Operator>)
                })?;
            }
            Declared::Command(program) => {
                let kind = program.kind.clone();
                let handler = command::ProcessHandler::new(program);
                if kind.task_type() == TaskType::Periodic {
                    registry.register_periodic(kind.as_str(), None, handler)?;
                } else {
                    registry.register_async(kind.as_str(), handler)?;
                }
            }
            Declared::Service { kind, subject } => {
                let handler = service::handler(&subject).map_err(|e| DeclError::Invalid {
                    kind: kind.to_string(),
                    message: e.to_string(),
                })?;
                if kind.task_type() == TaskType::Periodic {
                    registry.register_periodic(kind.as_str(), None, handler)?;
                } else {
                    registry.register_async(kind.as_str(), handler)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decl(text: &str) -> KindDecl {
        let mut d: KindDecl = toml::from_str(text).expect("parses");
        d.base_dir = Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
        d
    }

    fn refused(text: &str) -> String {
        check(&decl(text)).expect_err("refused").to_string()
    }

    #[test]
    fn declarations_are_checked() {
        assert!(matches!(
            check(&decl("name = \"daemon:apm:x\"\ncommand = [\"sh\", \"-c\", \"true\"]\ndimension = \"data_id\"")),
            Ok(Declared::Daemon { dimension: Some(d), .. }) if d == "data_id"
        ));
        assert!(matches!(
            check(&decl("name = \"async:x\"\ncommand = [\"true\"]")),
            Ok(Declared::Command(_))
        ));
        assert!(matches!(
            check(&decl("name = \"async:x\"\nservice = \"svc.x\"")),
            Ok(Declared::Service { .. })
        ));
        assert!(refused("name = \"nope\"\ncommand = [\"true\"]").contains("`nope`"));
        assert!(refused("name = \"async:x\"").contains("give `command`"));
        assert!(
            refused("name = \"async:x\"\ncommand = [\"true\"]\nservice = \"s\"")
                .contains("not both")
        );
        assert!(refused("name = \"async:x\"\ncommand = []").contains("empty"));
        assert!(
            refused("name = \"async:x\"\ncommand = [\"true\"]\ndimension = \"d\"")
                .contains("daemon kinds only")
        );
        assert!(
            refused("name = \"daemon:x\"\nservice = \"s\"")
                .contains("daemon kind runs a `command`")
        );
        let missing = refused("name = \"async:x\"\ncommand = [\"no-such-program-bmw\"]");
        assert!(
            missing.contains("`async:x`") && missing.contains("no-such-program-bmw"),
            "{missing}"
        );
        let relative = refused("name = \"async:x\"\ncommand = [\"./missing.sh\"]");
        assert!(
            relative.contains(env!("CARGO_MANIFEST_DIR")) && relative.contains("does not exist"),
            "{relative}"
        );
        let not_exec = refused("name = \"async:x\"\ncommand = [\"./Cargo.toml\"]");
        assert!(not_exec.contains("is not executable"), "{not_exec}");
        assert!(
            toml::from_str::<KindDecl>("name = \"async:x\"\ncommand = [\"true\"]\nextra = 1")
                .is_err()
        );
    }
}
