//! Shutdown: the OS signal wait used by the binary, and
//! `die_with_this_process` for the processes bmw starts. Inside the library
//! every component takes a `CancellationToken` instead, so tests cancel
//! directly.

use tokio::signal::unix::{SignalKind, signal};

/// Resolves on the first of `kind`; never if it cannot be listened for.
async fn one(kind: SignalKind, name: &str) {
    match signal(kind) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(e) => {
            tracing::error!(signal = name, cause = %e, "cannot listen for the signal");
            std::future::pending::<()>().await;
        }
    }
}

/// Resolves on SIGINT (Ctrl-C), SIGTERM or SIGQUIT: BMW drains on all three,
/// and so does bmw (SIGQUIT no longer dumps core).
pub async fn shutdown_signal() {
    let name = tokio::select! {
        () = one(SignalKind::interrupt(), "SIGINT") => "SIGINT",
        () = one(SignalKind::terminate(), "SIGTERM") => "SIGTERM",
        () = one(SignalKind::quit(), "SIGQUIT") => "SIGQUIT",
    };
    tracing::info!(signal = name, "received {name}, shutting down");
}

/// Has the child `command` starts get `signal` when this process dies,
/// however it dies (`PR_SET_PDEATHSIG`; the signal comes when the thread
/// that forked ends: a runtime worker thread, which lives as long as bmw).
/// A child whose parent died before the setting took exits at once with
/// `128 + signal`.
pub(crate) fn die_with_this_process(command: &mut tokio::process::Command, signal: libc::c_int) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec the closure calls only
    // async-signal-safe functions (prctl, getppid, _exit) and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before the line above: no signal will come.
            if libc::getppid() != parent {
                libc::_exit(128 + signal);
            }
            Ok(())
        });
    }
}
