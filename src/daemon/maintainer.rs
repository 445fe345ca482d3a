//! [`Maintainer`]: keeps one claimed daemon instance running on this worker.
//!
//! It holds the claim under the worker's [`Lease`], runs the operator in a
//! task of its own, restarts it after a failure with the [`RetryPolicy`]
//! delay, and obeys [`Control`] messages from the runtime (reload, release,
//! remove, lost). A worker may hold a hundred thousand of these, so each is
//! kept small and idle: nothing is written while the instance runs (the
//! lease, renewed once per worker, keeps every claim; design-notes, 88), the
//! rarely taken steps are boxed, the claim store and the spec are shared
//! with the runtime, one timer serves every wait, and the runtime's
//! messages come through a small mailbox (`control_channel`), not a
//! channel. The claim is written only when its counts change (a retry, a
//! reload), each time a compare-and-set on its revision: a refusal means
//! another worker owns the task now, and the run is cancelled at once
//! (fencing). When the lease is lost (not renewed in time, however slow or
//! unreachable NATS is), every instance held under it stops at once, before
//! the lease can expire. The runtime (`runtime.rs`) decides which tasks to
//! claim.
//!
//! [`Lease`]: crate::membership::Lease

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::claim::{Claim, ClaimError, ClaimStore};
use super::operator::{Operator, OperatorContext, OperatorError};
use super::retry::RetryPolicy;
use super::seed_log;
use super::spec::DaemonSpec;
use crate::events::EventPublisher;
use crate::membership::Lease;
use crate::metrics;
use crate::nats::{NatsError, NatsErrorKind};

/// The longest a release or removal at exit may take (less if the heartbeat
/// is shorter); past it the claim is left to expire with its TTL.
pub(crate) const HANDOVER_WAIT: Duration = Duration::from_secs(1);

/// The pause before trying a failed write of the claim again.
const RENEW_RETRY_GAP: Duration = Duration::from_millis(250);

/// What the runtime asks of a running maintainer.
#[derive(Debug)]
pub(crate) enum Control {
    /// The spec changed (reload or new payload): restart with it.
    Reload(Arc<DaemonSpec>),
    /// Stop and hand the task over (rebalance).
    Release,
    /// The task was deleted: stop and drop the claim.
    Remove,
    /// The claim was overwritten by another worker: stop at once.
    Lost,
}

/// A maintainer's mailbox: the runtime's [`Control`] messages, in order.
/// One small allocation per instance (a tokio channel costs about 1 KiB:
/// its state and a first block of 32 slots).
#[derive(Debug, Default)]
struct Mailbox {
    queue: Mutex<VecDeque<Control>>,
    /// The sender is gone (the runtime dropped the instance): release.
    closed: AtomicBool,
    notify: Notify,
}

/// The runtime's end of a maintainer's mailbox; dropping it tells the
/// maintainer to release its task (as a closed channel did).
#[derive(Debug)]
pub(crate) struct ControlSender(Arc<Mailbox>);

/// The maintainer's end of its mailbox.
#[derive(Debug)]
pub(crate) struct ControlReceiver(Arc<Mailbox>);

/// A mailbox's two ends.
pub(crate) fn control_channel() -> (ControlSender, ControlReceiver) {
    let mailbox = Arc::new(Mailbox::default());
    (ControlSender(mailbox.clone()), ControlReceiver(mailbox))
}

impl ControlSender {
    /// Queues `control` for the maintainer.
    pub(crate) fn send(&self, control: Control) {
        self.0
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(control);
        self.0.notify.notify_one();
    }
}

impl Drop for ControlSender {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.notify.notify_one();
    }
}

impl ControlReceiver {
    /// The next message; `None` once the sender is gone and none is left.
    /// Cancel-safe: a message is taken only in the poll that returns it.
    async fn recv(&self) -> Option<Control> {
        loop {
            let next = self
                .0
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front();
            if next.is_some() {
                return next;
            }
            if self.0.closed.load(Ordering::Acquire) {
                return None;
            }
            // `notify_one` leaves a permit when nobody waits: a message
            // queued between the look above and this wait is not missed.
            self.0.notify.notified().await;
        }
    }
}

/// Why a maintainer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// Handed over (rebalance or shutdown).
    Released,
    /// Task deleted, claim removed.
    Removed,
    /// Claim lost to another worker, or the lease it was held under.
    Lost,
}

/// Settings shared by all maintainers of a worker.
#[derive(Debug, Clone)]
pub(crate) struct MaintainerSettings {
    pub(crate) worker_id: String,
    pub(crate) heartbeat: Duration,
    pub(crate) claim_ttl: Duration,
    pub(crate) grace: Duration,
    pub(crate) policy: RetryPolicy,
}

/// One claimed instance.
pub(crate) struct Maintainer {
    /// Shared with the runtime's record of its maintainers.
    pub(crate) key: Arc<str>,
    /// Shared with the runtime's view of the specs (one copy per instance).
    pub(crate) spec: Arc<DaemonSpec>,
    pub(crate) operator: Arc<dyn Operator>,
    pub(crate) claims: Arc<ClaimStore>,
    pub(crate) claim: Claim,
    pub(crate) revision: u64,
    /// The lease the claim was taken under: when it is lost, so is the claim.
    pub(crate) lease: Lease,
    pub(crate) settings: Arc<MaintainerSettings>,
    pub(crate) events: EventPublisher,
    pub(crate) control: ControlReceiver,
}

/// The operator's run; aborted if dropped, so that a maintainer that
/// ends abnormally (a panic, an abort) never leaves its operator running
/// without a claim.
type Run = AbortOnDropHandle<Result<(), OperatorError>>;

/// How a run is stopped: `token` for every stop, `lost` first when the claim
/// is lost (the operator then stops at once).
#[derive(Debug)]
struct Stop {
    token: CancellationToken,
    lost: CancellationToken,
}

impl Maintainer {
    /// Runs until told to stop, the claim or the lease is lost, or
    /// `shutdown` fires (then the claim is released so another worker takes
    /// over at once).
    /// Boxed: an `async fn` keeps a second copy of an argument taken by
    /// value (rust-lang/rust#62958), ~400 bytes an instance for this one.
    pub(crate) async fn run(mut self: Box<Self>, shutdown: CancellationToken) -> (Arc<str>, Exit) {
        // One timer for every wait (a retry, a write tried again): it wakes
        // at the earliest, and the branch looks which is due. An idle
        // instance waits on nothing but its run, its mailbox and its lease.
        let timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(timer);
        let mut retry_at = self.pending_retry();
        // Set while a write of the claim's counts has failed.
        let mut save_again: Option<Instant> = None;
        let mut run: Option<(Run, Stop)> = None;
        loop {
            if self.lease.lost.is_cancelled() {
                return Box::pin(self.exit(Exit::Lost, run)).await;
            }
            if run.is_none() && retry_at.is_none() {
                run = Some(Box::pin(self.start_run()).await);
            }
            let wake = [retry_at, save_again].into_iter().flatten().min();
            if let Some(wake) = wake
                && (timer.is_elapsed() || timer.deadline() != wake)
            {
                timer.as_mut().reset(wake);
            }
            tokio::select! {
                outcome = async { (&mut run.as_mut().expect("guarded").0).await }, if run.is_some() => {
                    run = None;
                    self.stopped_running();
                    let error = failure_of(outcome);
                    retry_at = Some(Box::pin(self.schedule_retry(&error)).await);
                    match Box::pin(self.save()).await {
                        Ok(again) => save_again = again,
                        Err(()) => return Box::pin(self.exit(Exit::Lost, None)).await,
                    }
                }
                () = &mut timer, if wake.is_some() => {
                    let now = Instant::now();
                    if save_again.is_some_and(|at| now >= at) {
                        match Box::pin(self.save()).await {
                            Ok(again) => save_again = again,
                            Err(()) => return Box::pin(self.exit(Exit::Lost, run)).await,
                        }
                    }
                    if retry_at.is_some_and(|at| now >= at) {
                        retry_at = None;
                        self.claim.next_retry_at = None;
                    }
                }
                () = self.lease.lost.cancelled() => return Box::pin(self.exit(Exit::Lost, run)).await,
                control = self.control.recv() => match control {
                    Some(Control::Reload(spec)) => {
                        Box::pin(self.stop_run(run.take(), self.settings.grace, false)).await;
                        self.apply_reload(spec);
                        retry_at = None;
                        match Box::pin(self.save()).await {
                            Ok(again) => save_again = again,
                            Err(()) => return Box::pin(self.exit(Exit::Lost, None)).await,
                        }
                    }
                    Some(Control::Release) | None => return Box::pin(self.exit(Exit::Released, run)).await,
                    Some(Control::Remove) => return Box::pin(self.exit(Exit::Removed, run)).await,
                    Some(Control::Lost) => {
                        tracing::warn!(uni_id = %self.spec.uni_id, "claim taken by another worker, stopping the instance");
                        return Box::pin(self.exit(Exit::Lost, run)).await;
                    }
                },
                () = shutdown.cancelled() => return Box::pin(self.exit(Exit::Released, run)).await,
            }
        }
    }

    /// A retry time carried over in the claim (the task moved while waiting).
    fn pending_retry(&self) -> Option<Instant> {
        let at = self.claim.next_retry_at.as_deref()?;
        let at = chrono::DateTime::parse_from_rfc3339(at).ok()?;
        let wait = (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
            .to_std()
            .ok()?;
        // The claim is read from the bucket: a time too far ahead is ignored.
        Instant::now().checked_add(wait)
    }

    async fn start_run(&mut self) -> (Run, Stop) {
        let stop = Stop {
            token: CancellationToken::new(),
            lost: CancellationToken::new(),
        };
        let ctx = OperatorContext {
            uni_id: self.spec.uni_id.clone(),
            token: stop.token.clone(),
            worker_id: self.settings.worker_id.clone(),
            retry_count: self.claim.retry_count,
            reload_count: self.claim.reload_count,
            grace: self.settings.grace,
            lost: stop.lost.clone(),
        };
        // The run borrows the payload from the shared spec: no copy of it.
        let spec = self.spec.clone();
        seed_log::binding_discovered(
            &self.spec.uni_id,
            &self.settings.worker_id,
            &spec.payload.to_string(),
        );
        metrics::daemon_running(self.spec.kind.as_str(), &self.spec.dimension, true);
        self.publish("started", json!({})).await;
        let operator = self.operator.clone();
        let span = crate::traces::daemon_run_span(
            self.spec.uni_id.as_str(),
            self.spec.kind.as_str(),
            self.claim.retry_count,
            self.claim.reload_count,
        );
        let run = async move {
            traced_event(|| tracing::info!("daemon run started"));
            let ended = operator.start(ctx, &spec.payload).await;
            traced_event(|| match &ended {
                Ok(()) => tracing::info!("daemon run stopped"),
                Err(e) => {
                    let span = tracing::Span::current();
                    span.record("otel.status_code", "error");
                    span.record("otel.status_description", e.to_string());
                    tracing::warn!(error = %e, "daemon run failed");
                }
            });
            ended
        };
        let handle =
            AbortOnDropHandle::new(tokio::spawn(tracing::Instrument::instrument(run, span)));
        (handle, stop)
    }

    fn stopped_running(&self) {
        metrics::daemon_running(self.spec.kind.as_str(), &self.spec.dimension, false);
    }

    async fn schedule_retry(&mut self, error: &OperatorError) -> Instant {
        self.claim.retry_count = self.claim.retry_count.saturating_add(1);
        let delay = self.settings.policy.delay(self.claim.retry_count);
        // The delay is at most `--retry-max` (30 days at most), so the sum
        // is a date; now is the fallback, never reached.
        let now = chrono::Local::now();
        let at = chrono::TimeDelta::from_std(delay)
            .ok()
            .and_then(|d| now.checked_add_signed(d))
            .unwrap_or(now);
        self.claim.next_retry_at = Some(at.with_timezone(&chrono::Utc).to_rfc3339());
        seed_log::retry(
            &self.spec.uni_id,
            &error.to_string(),
            self.claim.retry_count,
            self.claim.reload_count,
            at,
            delay,
        );
        metrics::daemon_retry(self.spec.kind.as_str(), &self.spec.dimension);
        self.publish("error", json!({"error": error.to_string()}))
            .await;
        self.publish("retry", json!({"error": error.to_string(), "delay_seconds": delay.as_secs_f64(), "next_retry_at": self.claim.next_retry_at})).await;
        Instant::now() + delay
    }

    fn apply_reload(&mut self, spec: Arc<DaemonSpec>) {
        self.claim.reload_count = self.claim.reload_count.saturating_add(1);
        self.claim.retry_count = 0;
        self.claim.next_retry_at = None;
        self.claim.generation = spec.generation;
        self.spec = spec;
        metrics::daemon_reload(self.spec.kind.as_str());
        tracing::info!(uni_id = %self.spec.uni_id, reload_count = self.claim.reload_count, "daemon task reloaded");
    }

    /// The longest one NATS call of a write may take before it is given up
    /// and tried again: half a heartbeat, at least 500 ms.
    fn attempt_limit(&self) -> Duration {
        (self.settings.heartbeat / 2).max(Duration::from_millis(500))
    }

    /// Time kept between the moment a lost lease stops the instance and the
    /// lease's earliest expiry (docs/design-notes.md, 33, 88).
    fn margin(&self) -> Duration {
        self.settings.heartbeat.min(self.settings.claim_ttl / 3)
    }

    /// Writes the claim's new counts. A wrong revision means another worker
    /// has the claim: `Err`. No answer (or an error) leaves the claim ours,
    /// held by the lease: `Ok(Some(at))`, the moment to try again.
    async fn save(&mut self) -> Result<Option<Instant>, ()> {
        let limit = self.attempt_limit();
        let attempt = tokio::time::timeout(
            limit,
            self.claims.update(&self.key, &self.claim, self.revision),
        )
        .await;
        let error = match attempt {
            Ok(Ok(rev)) => {
                self.revision = rev;
                return Ok(None);
            }
            Ok(Err(e)) => e,
            Err(elapsed) => ClaimError::Nats(NatsError::with_kind(NatsErrorKind::Timeout, elapsed)),
        };
        // A write that timed out may still have been stored: re-read before deciding.
        match tokio::time::timeout(limit, self.claims.get(&self.key)).await {
            Ok(Ok(Some((current, rev))))
                if current.worker_id == self.claim.worker_id
                    && current.since == self.claim.since
                    && current.lease == self.claim.lease =>
            {
                self.revision = rev;
                if let Ok(Ok(rev)) =
                    tokio::time::timeout(limit, self.claims.update(&self.key, &self.claim, rev))
                        .await
                {
                    self.revision = rev;
                    return Ok(None);
                }
            }
            // Read, and not ours any more.
            Ok(Ok(_)) => {
                tracing::warn!(uni_id = %self.spec.uni_id, cause = %error, "claim lost, stopping the instance");
                return Err(());
            }
            _ => {}
        }
        match error {
            ClaimError::Nats(_) => {
                tracing::warn!(uni_id = %self.spec.uni_id, cause = %error, "claim not updated, will retry");
                Ok(Some(Instant::now() + RENEW_RETRY_GAP))
            }
            _ => {
                tracing::warn!(uni_id = %self.spec.uni_id, cause = %error, "claim lost, stopping the instance");
                Err(())
            }
        }
    }

    /// Cancels the run (`lost`: the claim is lost, stop at once) and waits up
    /// to `patience` for the operator to end, then aborts it.
    async fn stop_run(&self, run: Option<(Run, Stop)>, patience: Duration, lost: bool) {
        let Some((mut handle, stop)) = run else {
            return;
        };
        if lost {
            stop.lost.cancel();
        }
        stop.token.cancel();
        if tokio::time::timeout(patience, &mut handle).await.is_err() {
            tracing::warn!(uni_id = %self.spec.uni_id, waited = ?patience, "operator ignored cancellation; aborting it");
            handle.abort();
        }
        self.stopped_running();
    }

    async fn exit(self: Box<Self>, exit: Exit, run: Option<(Run, Stop)>) -> (Arc<str>, Exit) {
        let was_running = run.is_some();
        // A lost claim may be another worker's already: no grace period,
        // only the margin kept before the lease's expiry.
        let patience = match exit {
            Exit::Lost => self.margin(),
            Exit::Released | Exit::Removed => self.settings.grace,
        };
        self.stop_run(run, patience, exit == Exit::Lost).await;
        if was_running {
            let reason = format!("{exit:?}").to_lowercase();
            tracing::info!(uni_id = %self.spec.uni_id, reason, "daemon instance stopped");
        }
        self.publish(
            "stopped",
            json!({"reason": format!("{exit:?}").to_lowercase()}),
        )
        .await;
        // Bounded: with NATS gone, the claim expires with its TTL instead.
        let bound = self.settings.heartbeat.min(HANDOVER_WAIT);
        let result = match exit {
            Exit::Released => tokio::time::timeout(
                bound,
                self.claims.release(&self.key, &self.claim, self.revision),
            )
            .await
            .map(|r| r.map(|_| ())),
            Exit::Removed => {
                tokio::time::timeout(bound, self.claims.remove(&self.key, self.revision)).await
            }
            Exit::Lost => Ok(Ok(())),
        };
        let result = result.unwrap_or_else(|elapsed| {
            Err(ClaimError::Nats(NatsError::with_kind(
                NatsErrorKind::Timeout,
                elapsed,
            )))
        });
        if let Err(e) = result {
            tracing::warn!(uni_id = %self.spec.uni_id, cause = %e, "claim not handed over; it expires after its TTL");
        }
        (self.key, exit)
    }

    async fn publish(&self, what: &str, mut detail: Value) {
        detail["uni_id"] = json!(self.spec.uni_id);
        detail["retry_count"] = json!(self.claim.retry_count);
        detail["reload_count"] = json!(self.claim.reload_count);
        // Events are best effort: a stuck connection must not hold the
        // maintainer past its deadline.
        let emit = self
            .events
            .emit("daemon", self.spec.kind.as_str(), what, detail);
        if tokio::time::timeout(self.margin(), emit).await.is_err() {
            tracing::warn!(uni_id = %self.spec.uni_id, what, "daemon event not queued in time");
        }
    }
}

/// Logs an event of a daemon run on its span, when traces are on (the
/// maintainer logs the same moments itself otherwise).
fn traced_event(log: impl FnOnce()) {
    if crate::traces::enabled() {
        log();
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    let panic = e.into_panic();
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}
/// Why an operator's run ended, as the error its retry reports: it
/// returned (it may only end when cancelled), failed, or panicked.
fn failure_of(outcome: Result<Result<(), OperatorError>, tokio::task::JoinError>) -> OperatorError {
    match outcome {
        Ok(Ok(())) => OperatorError::new("operator returned without being cancelled"),
        Ok(Err(e)) => e,
        Err(e) if e.is_panic() => {
            OperatorError::new(format!("operator panicked: {}", panic_message(e)))
        }
        Err(e) => OperatorError::new(format!("operator task failed: {e}")),
    }
}
