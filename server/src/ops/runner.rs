//! The one runner of operations: named stages in order, each timed and logged, and a
//! failing stage unwinds the ones before it in reverse.
//!
//! Log lines (JSON through `tracing`): `operation started`, one `operation stage` per
//! completed stage with `since_start_ms` and `since_last_stage_ms`, then `operation
//! completed` or `operation failed` with `duration_ms` (and `error`, `stage`).

use std::{fmt::Debug, path::PathBuf, time::Instant};

use opentelemetry::KeyValue;
use tracing::Instrument;

use super::Error;
use crate::{domain::OpId, telemetry::metrics::metrics};

/// Who an operation acts on, for its log lines.
#[derive(Debug, Clone, Default)]
pub struct Subject {
    /// The VM's id.
    pub vm_id: Option<String>,
    /// The VM's name.
    pub vm_name: Option<String>,
    /// The image's id.
    pub image_id: Option<String>,
    /// The VM's labels (for watchers selecting by label).
    pub labels: crate::domain::Labels,
}

impl Subject {
    /// A recorded VM.
    pub fn of(vm: &crate::domain::Vm) -> Self {
        Self {
            vm_id: Some(vm.id.to_string()),
            vm_name: Some(vm.name.clone()),
            image_id: Some(vm.image_id.to_string()),
            labels: vm.labels.clone(),
        }
    }
}

/// An operation: an ordered list of stages over some state of its own.
#[tonic::async_trait]
pub trait Operation: Send {
    /// The stage type, usually an enum.
    type Stage: Copy + Debug + Send + Sync + 'static;

    /// The operation's name (`vm.start`).
    const NAME: &'static str;

    /// The stages to run, in order.
    fn stages(&self) -> Vec<Self::Stage>;

    /// A stage's name as logged (`vmm_launch`).
    fn stage_name(stage: Self::Stage) -> &'static str;

    /// Runs a stage. It must be safe to run again after a crash (issue of idempotence).
    async fn apply(&mut self, stage: Self::Stage) -> Result<(), Error>;

    /// Undoes a stage that completed; called in reverse order when a later stage fails. It
    /// must be safe to run again. A failed undo is logged and reported in the operation's
    /// error ([`Error::Stage`]'s `undo_failed`), and the runner goes on with the stages
    /// before it; the operation leaves evidence of what is left (a handle in the VM's
    /// scratch file, a directory) for reconcile to retry.
    async fn undo(&mut self, _stage: Self::Stage) -> Result<(), Error> {
        Ok(())
    }

    /// Who the operation acts on (may change as stages learn more, e.g. a new VM's id).
    fn subject(&self) -> Subject;

    /// The log a failure of this stage should point at.
    fn evidence(&self, _stage: Self::Stage) -> Option<PathBuf> {
        None
    }
}

/// Debug builds only: with `BANGER_DEBUG_PAUSE_AT=<operation>:<stage>` (e.g.
/// `vm.create:vmm_boot`) the runner logs `operation paused` and waits forever before that
/// stage, so crash tests can kill the daemon at a known point. Release builds ignore it.
async fn debug_pause(op_id: OpId, operation: &str, stage: &str) {
    if cfg!(debug_assertions)
        && let Ok(at) = std::env::var("BANGER_DEBUG_PAUSE_AT")
        && at.split_once(':') == Some((operation, stage))
    {
        tracing::warn!(op_id = %op_id, operation, stage, "operation paused");
        std::future::pending::<()>().await;
    }
}

fn millis(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

/// A stage that completed, as observers see it.
#[derive(Debug, Clone, Copy)]
pub struct CompletedStage<'a> {
    /// The VM the operation acts on.
    pub vm_id: &'a str,
    /// Its name.
    pub vm_name: &'a str,
    /// Its labels.
    pub labels: &'a crate::domain::Labels,
    /// The operation.
    pub operation: &'static str,
    /// Its id.
    pub op_id: OpId,
    /// The stage.
    pub stage: &'static str,
    /// Milliseconds from the operation's start to the stage's end.
    pub since_start_ms: u64,
    /// Milliseconds the stage took.
    pub since_last_stage_ms: u64,
}

/// Told of every completed stage of an operation on a VM (for `WatchVms`).
#[tonic::async_trait]
pub trait StageObserver: Send + Sync + Debug {
    /// A stage completed; failures to record it are the observer's to report.
    async fn stage_completed(&self, stage: &CompletedStage<'_>);
}

#[tonic::async_trait]
impl StageObserver for crate::store::Store {
    async fn stage_completed(&self, s: &CompletedStage<'_>) {
        let op_id = s.op_id.to_string();
        let record = crate::store::StageRecord {
            vm_id: s.vm_id,
            vm_name: s.vm_name,
            labels: s.labels,
            operation: s.operation,
            op_id: &op_id,
            stage: s.stage,
            since_start_ms: s.since_start_ms,
            since_last_stage_ms: s.since_last_stage_ms,
        };
        let recorded = self.event_stage(&record).await;
        if let Err(error) = recorded {
            tracing::warn!(op_id = %s.op_id, stage = s.stage, error = %error, "cannot record the stage event");
        }
    }
}

/// How the runner runs stages; the defaults are production behaviour. Tests use the rest
/// to check every operation generically.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Told of every completed stage of an operation on a VM.
    pub observer: Option<std::sync::Arc<dyn StageObserver>>,
    /// Apply every stage twice in a row (stages must be idempotent).
    pub repeat_stages: bool,
    /// Fail the stage at this index, as if it had failed, before applying it.
    pub fail_at: Option<usize>,
    /// Undo every stage twice in a row (undos must be idempotent).
    pub repeat_undos: bool,
}

/// Runs every stage of `op` in order; on failure undoes the completed ones in reverse and
/// returns [`Error::Stage`] naming the failed stage.
pub async fn run<O: Operation>(op_id: OpId, op: &mut O) -> Result<(), Error> {
    run_with(op_id, op, &RunOptions::default()).await
}

/// [`run`] with options.
///
/// Each stage is one source for three outputs: a child span `<operation>.<stage>` of the
/// operation's span (with `since_start_ms` and `since_last_stage_ms`, and error status on
/// failure), the `operation stage` log line, and the stage-duration histogram.
pub async fn run_with<O: Operation>(op_id: OpId, op: &mut O, options: &RunOptions) -> Result<(), Error> {
    let started = Instant::now();
    let subject = op.subject();
    let op_span = tracing::info_span!(
        "operation",
        otel.name = O::NAME,
        operation = O::NAME,
        op_id = %op_id,
        vm_id = subject.vm_id,
        vm_name = subject.vm_name,
        image_id = subject.image_id,
        duration_ms = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    );
    let result = run_stages(op_id, op, options, started, &op_span).instrument(op_span.clone()).await;
    let duration_ms = millis(started);
    op_span.record("duration_ms", duration_ms as i64);
    // Stages may have learnt who the operation acts on (a create resolves its image).
    let subject = op.subject();
    for (field, value) in [("vm_id", subject.vm_id), ("vm_name", subject.vm_name), ("image_id", subject.image_id)] {
        if let Some(value) = value {
            op_span.record(field, value);
        }
    }
    let outcome = if result.is_ok() { "completed" } else { "failed" };
    metrics()
        .operation_duration
        .record(duration_ms as f64, &[KeyValue::new("operation", O::NAME), KeyValue::new("outcome", outcome)]);
    if let Err(error) = &result {
        op_span.record("otel.status_code", "ERROR");
        op_span.record("otel.status_description", error.chain());
    }
    result
}

async fn run_stages<O: Operation>(
    op_id: OpId,
    op: &mut O,
    options: &RunOptions,
    started: Instant,
    op_span: &tracing::Span,
) -> Result<(), Error> {
    let subject = op.subject();
    tracing::info!(
        op_id = %op_id,
        operation = O::NAME,
        vm_id = subject.vm_id,
        vm_name = subject.vm_name,
        image_id = subject.image_id,
        "operation started"
    );
    let mut last_stage_end = started;
    let mut done = Vec::new();
    for (index, stage) in op.stages().into_iter().enumerate() {
        debug_pause(op_id, O::NAME, O::stage_name(stage)).await;
        let stage_name = O::stage_name(stage);
        let stage_span = tracing::info_span!(
            parent: op_span,
            "stage",
            otel.name = format!("{}.{stage_name}", O::NAME),
            operation = O::NAME,
            stage = stage_name,
            op_id = %op_id,
            since_start_ms = tracing::field::Empty,
            since_last_stage_ms = tracing::field::Empty,
            error = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let result = if options.fail_at == Some(index) {
            Err(Error::Host(crate::host::HostError::Injected { call: "RunOptions::fail_at" }))
        } else {
            async {
                match op.apply(stage).await {
                    Ok(()) if options.repeat_stages => op.apply(stage).await,
                    other => other,
                }
            }
            .instrument(stage_span.clone())
            .await
        };
        let since_start_ms = millis(started);
        let since_last_stage_ms = millis(last_stage_end);
        // As i64: OpenTelemetry integer attributes are signed (a u64 would be exported as text).
        stage_span.record("since_start_ms", since_start_ms as i64);
        stage_span.record("since_last_stage_ms", since_last_stage_ms as i64);
        metrics().stage_duration.record(
            since_last_stage_ms as f64,
            &[KeyValue::new("operation", O::NAME), KeyValue::new("stage", stage_name)],
        );
        let subject = op.subject();
        match result {
            Ok(()) => {
                let _entered = stage_span.enter();
                tracing::info!(
                    op_id = %op_id,
                    operation = O::NAME,
                    stage = stage_name,
                    since_start_ms,
                    since_last_stage_ms,
                    vm_id = subject.vm_id,
                    vm_name = subject.vm_name,
                    image_id = subject.image_id,
                    "operation stage"
                );
                drop(_entered);
                // Recording the event is part of the next stage's time: nothing goes unmeasured.
                last_stage_end = Instant::now();
                if let (Some(observer), Some(vm_id)) = (&options.observer, &subject.vm_id) {
                    let completed = CompletedStage {
                        vm_id,
                        vm_name: subject.vm_name.as_deref().unwrap_or_default(),
                        labels: &subject.labels,
                        operation: O::NAME,
                        op_id,
                        stage: stage_name,
                        since_start_ms,
                        since_last_stage_ms,
                    };
                    observer.stage_completed(&completed).await;
                }
                done.push(stage);
            }
            Err(error) => {
                stage_span.record("otel.status_code", "ERROR");
                stage_span.record("error", error.chain());
                drop(stage_span);
                let log = op.evidence(stage).or_else(|| match error.root() {
                    Error::Host(host) => host.log_path().map(PathBuf::from),
                    _ => None,
                });
                let mut undo_failed = Vec::new();
                for completed in done.iter().rev() {
                    let undone_stage = O::stage_name(*completed);
                    let undone = match op.undo(*completed).await {
                        Ok(()) if options.repeat_undos => op.undo(*completed).await,
                        other => other,
                    };
                    match undone {
                        Ok(()) => {
                            tracing::debug!(op_id = %op_id, operation = O::NAME, stage = undone_stage, "operation stage undone")
                        }
                        Err(undo_error) => {
                            tracing::warn!(
                                op_id = %op_id,
                                operation = O::NAME,
                                stage = undone_stage,
                                failed_stage = stage_name,
                                error = undo_error.chain(),
                                "operation stage undo failed; what it could not release is left for reconcile"
                            );
                            undo_failed.push(undone_stage);
                        }
                    }
                }
                let error = Error::Stage {
                    op_id,
                    operation: O::NAME,
                    stage: stage_name,
                    log,
                    undo_failed,
                    source: Box::new(error),
                };
                tracing::warn!(
                    op_id = %op_id,
                    operation = O::NAME,
                    stage = stage_name,
                    duration_ms = millis(started),
                    vm_id = subject.vm_id,
                    vm_name = subject.vm_name,
                    image_id = subject.image_id,
                    error = error.chain(),
                    "operation failed"
                );
                return Err(error);
            }
        }
    }
    let subject = op.subject();
    tracing::info!(
        op_id = %op_id,
        operation = O::NAME,
        duration_ms = millis(started),
        vm_id = subject.vm_id,
        vm_name = subject.vm_name,
        image_id = subject.image_id,
        "operation completed"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy operation over a list of effects, failing at a chosen stage.
    struct Toy {
        effects: Vec<&'static str>,
        fail_at: Option<usize>,
    }

    #[tonic::async_trait]
    impl Operation for Toy {
        type Stage = usize;
        const NAME: &'static str = "toy";

        fn stages(&self) -> Vec<usize> {
            vec![0, 1, 2]
        }

        fn stage_name(stage: usize) -> &'static str {
            ["one", "two", "three"][stage]
        }

        async fn apply(&mut self, stage: usize) -> Result<(), Error> {
            if self.fail_at == Some(stage) {
                return Err(Error::NotConfigured { what: "injected" });
            }
            self.effects.push(Self::stage_name(stage));
            Ok(())
        }

        async fn undo(&mut self, stage: usize) -> Result<(), Error> {
            assert_eq!(self.effects.pop(), Some(Self::stage_name(stage)), "undo in reverse order");
            Ok(())
        }

        fn subject(&self) -> Subject {
            Subject::default()
        }
    }

    #[tokio::test]
    async fn all_stages_run_in_order() {
        let mut toy = Toy { effects: vec![], fail_at: None };
        run(OpId::generate(), &mut toy).await.expect("runs");
        assert_eq!(toy.effects, ["one", "two", "three"]);
    }

    #[tokio::test]
    async fn a_failure_at_any_stage_unwinds_everything_before_it() {
        for fail_at in 0..3 {
            let mut toy = Toy { effects: vec![], fail_at: Some(fail_at) };
            let err = run(OpId::generate(), &mut toy).await.expect_err("fails");
            assert!(toy.effects.is_empty(), "stage {fail_at}: left {:?}", toy.effects);
            match err {
                Error::Stage { stage, operation, .. } => {
                    assert_eq!(stage, Toy::stage_name(fail_at));
                    assert_eq!(operation, "toy");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}
