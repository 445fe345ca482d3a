//! Claims this worker won or holds but will not run: handed back at once,
//! so that a worker that can run the task takes it (a claim held under a
//! live lease is taken by nobody else).

use std::sync::Arc;

use serde_json::json;

use super::DaemonRuntime;
use super::view::Key;
use crate::daemon::claim::Claim;
use crate::daemon::maintainer::HANDOVER_WAIT;
use crate::daemon::spec::DaemonSpec;

impl DaemonRuntime {
    /// A claim won for a kind whose operator cannot be built here (its
    /// factory failed or panicked): handed back at once with an `error`
    /// event, and not claimed here again (`Operators::can_run`), so a worker
    /// that can run it takes it.
    pub(super) fn cannot_run(
        &self,
        spec: Arc<DaemonSpec>,
        key: Key,
        claim: Claim,
        revision: u64,
        error: &crate::daemon::OperatorError,
    ) {
        tracing::error!(kind = %spec.kind, uni_id = %spec.uni_id, cause = %error, "operator cannot be built; handing the task back");
        let (claims, events) = (self.claims.clone(), self.events.clone());
        let detail =
            json!({"uni_id": spec.uni_id, "error": format!("operator cannot be built: {error}")});
        let bound = self.settings.heartbeat.min(HANDOVER_WAIT);
        tokio::spawn(async move {
            events
                .emit("daemon", spec.kind.as_str(), "error", detail)
                .await;
            if !matches!(
                tokio::time::timeout(bound, claims.release(&key, &claim, revision)).await,
                Ok(Ok(_))
            ) {
                tracing::warn!(
                    key = &*key,
                    "claim not handed back; it expires after its TTL"
                );
            }
        });
    }

    /// Hands back a claim of ours for a task this worker may not run, whose
    /// earlier hand-over was not written (a claim held by a live lease is
    /// taken by nobody else).
    pub(super) fn hand_back(&self, key: Key) {
        let (claims, me) = (self.claims.clone(), self.settings.worker_id.clone());
        let bound = self.settings.heartbeat.min(HANDOVER_WAIT);
        tokio::spawn(async move {
            let release = async {
                match claims.get(&key).await? {
                    Some((claim, revision)) if claim.worker_id == me => {
                        claims.release(&key, &claim, revision).await.map(|_| ())
                    }
                    _ => Ok(()),
                }
            };
            if !matches!(tokio::time::timeout(bound, release).await, Ok(Ok(()))) {
                tracing::warn!(key = &*key, "claim not handed back; will retry");
            }
        });
    }
}
