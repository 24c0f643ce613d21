//! `WatchVms`: replays the recorded events after a revision, then follows new ones. Each
//! event is read from the database in revision order, so a watcher that resumes from the
//! last revision it saw gets every later event exactly once. Live watchers are woken by the
//! store's revision announcements and read what is new; a slow watcher holds back only its
//! own reading (a bounded channel), never the daemon's memory.

use banger_proto::v1 as pb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{
    convert,
    status::{ApiError, api_status},
};
use crate::{
    domain::Labels,
    store::{Event, EventKind, EventLog},
};

/// Events read from the database per query.
const BATCH: u32 = 256;
/// Events buffered per watcher before it waits for its client.
const BUFFER: usize = 64;

/// Which events a watcher wants.
#[derive(Debug, Clone, Default)]
pub struct WatchFilter {
    /// Only events of this VM (id or name).
    pub vm: Option<String>,
    /// Only events of VMs carrying these labels.
    pub labels: Labels,
    /// No event at all (a confined caller asked for another tenant's VMs).
    pub nothing: bool,
}

impl WatchFilter {
    fn matches(&self, event: &Event) -> bool {
        !self.nothing
            && self.vm.as_ref().is_none_or(|vm| *vm == event.vm_id || *vm == event.vm_name)
            && crate::domain::labels_match(&event.labels, &self.labels)
    }
}

fn to_pb(event: Event) -> pb::WatchVmsResponse {
    use pb::vm_event::Kind;
    let kind = match event.kind {
        EventKind::State { state, previous } => Kind::StateChange(pb::VmStateChange {
            state: convert::vm_state(state).into(),
            previous_state: previous.map(convert::vm_state).unwrap_or(pb::VmState::Unspecified).into(),
        }),
        EventKind::Stage { operation, op_id, stage, since_start_ms, since_last_stage_ms } => {
            Kind::StageCompleted(pb::VmStageCompleted { operation, op_id, stage, since_start_ms, since_last_stage_ms })
        }
        EventKind::Deleted => Kind::Deleted(pb::VmDeleted {}),
    };
    pb::WatchVmsResponse {
        event: Some(pb::VmEvent {
            revision: event.revision,
            vm_id: event.vm_id,
            vm_name: event.vm_name,
            time: Some(convert::timestamp(event.at_ms)),
            kind: Some(kind),
        }),
    }
}

/// Starts a watch after `from_revision` (0: from now).
pub async fn watch(
    events: EventLog,
    from_revision: u64,
    filter: WatchFilter,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<ReceiverStream<Result<pb::WatchVmsResponse, Status>>, Status> {
    let internal = |e: crate::store::StoreError| api_status(&ApiError::Ops(e.into()));
    // Subscribed before the first read: nothing committed after it goes unnoticed.
    let mut announced = events.subscribe();
    let latest = events.latest_revision().await.map_err(internal)?;
    let mut after = match from_revision {
        0 => latest,
        from if from > latest => {
            return Err(api_status(&ApiError::RevisionAhead { from, latest }));
        }
        from => {
            let oldest = events.oldest_resumable_revision().await.map_err(internal)?;
            if from < oldest {
                return Err(api_status(&ApiError::RevisionForgotten { from, oldest }));
            }
            from
        }
    };
    let (sender, receiver) = tokio::sync::mpsc::channel(BUFFER);
    tokio::spawn(async move {
        tokio::pin!(stopped);
        loop {
            let batch = match events.after(after, BATCH).await {
                Ok(batch) => batch,
                Err(error) => {
                    let _ = sender.send(Err(internal(error))).await;
                    return;
                }
            };
            let full = batch.len() == BATCH as usize;
            for event in batch {
                after = event.revision;
                if filter.matches(&event) && sender.send(Ok(to_pb(event))).await.is_err() {
                    return;
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                changed = announced.changed() => if changed.is_err() { return },
                () = sender.closed() => return,
                () = &mut stopped => {
                    // Watch again from the last revision, against the next daemon.
                    let _ = sender.send(Err(api_status(&ApiError::Ops(crate::ops::Error::Stopping)))).await;
                    return;
                }
            }
        }
    });
    Ok(ReceiverStream::new(receiver))
}
