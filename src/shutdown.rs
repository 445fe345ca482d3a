//! Shutdown: the OS signal wait used by the binary. Inside the library every
//! component takes a `CancellationToken` instead, so tests cancel directly.

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
