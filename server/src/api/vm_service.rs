//! `banger.v1.VmService`: parses each request into one use case and maps the result back.

use std::{pin::Pin, sync::Arc};

use banger_proto::v1::{self as pb, vm_service_server::VmService};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{
    answer_within, call_timeout, convert,
    idempotency::Idempotency,
    idempotency_key, run_to_completion,
    status::{ApiError, api_status, invalid_field, to_status},
    with_op_id,
};
use crate::{
    domain::{
        ExecInput, Resource, TerminalSize, Vm,
        access::{Caller, Tenant},
    },
    ops::{CreateVm, Error, Ops},
    store::VmFilter,
};

/// The tenant the caller is confined to, if any (the auth layer put the caller there).
pub(super) fn tenant_of<T>(request: &Request<T>) -> Option<Tenant> {
    request.extensions().get::<Caller>().and_then(|caller| caller.tenant.clone())
}

/// The key a confined caller reaches the VM `key` by: its id when it is the tenant's (so a
/// VM of that name made later by another tenant is not reached instead), else the VM is not
/// found, exactly as if it did not exist.
async fn visible(ops: &Ops, key: String, tenant: Option<&Tenant>) -> Result<String, Error> {
    match tenant {
        None => Ok(key),
        Some(_) => Ok(visible_vm(ops, key, tenant).await?.id.to_string()),
    }
}

/// The VM `key` names, when the caller may see it (see [`visible`]).
pub(super) async fn visible_vm(ops: &Ops, key: String, tenant: Option<&Tenant>) -> Result<Vm, Error> {
    let vm = ops.get_vm(&key).await?;
    match tenant {
        Some(tenant) if !tenant.admits(&vm.labels) => Err(Error::NotFound { kind: Resource::Vm, key }),
        _ => Ok(vm),
    }
}

/// A request's idempotency key, the caller's tenant part of its body: a request id reused
/// by another tenant is another request, never the first one's answer.
pub(super) fn tenant_idempotency_key<T: prost::Message + Clone>(
    request: &T,
    tenant: Option<&Tenant>,
    id: impl Fn(&mut T) -> &mut String,
) -> (String, Vec<u8>) {
    let (request_id, mut body) = idempotency_key(request, id);
    if let Some(tenant) = tenant {
        body.extend_from_slice(format!("\0tenant:{tenant}").as_bytes());
    }
    (request_id, body)
}

/// Serves the VM API over the daemon's core.
#[derive(Debug, Clone)]
pub struct VmApi {
    ops: Arc<Ops>,
    idempotency: Idempotency,
}

impl VmApi {
    /// The service over `ops`, recording idempotent requests in `idempotency`.
    pub fn new(ops: Arc<Ops>, idempotency: Idempotency) -> Self {
        Self { ops, idempotency }
    }

    fn to_pb(&self, vm: &Vm) -> pb::Vm {
        convert::vm(vm, &self.ops.handles(vm), self.ops.vmm_name())
    }

    /// Runs a use case that changes one VM at most once per request id (on its own task:
    /// see `run_to_completion`), answering with the VM and the operation's id.
    async fn vm_mutation<R: prost::Message + Default + 'static>(
        &self,
        method: &'static str,
        (request_id, body): (String, Vec<u8>),
        use_case: impl std::future::Future<Output = Result<Vm, Error>> + Send + 'static,
        answer: fn(pb::Vm) -> R,
    ) -> Result<Response<R>, Status> {
        let api = self.clone();
        let once = async move {
            let vm = run_to_completion(use_case).await?;
            Ok(with_op_id(answer(api.to_pb(&vm)), &vm.last_operation))
        };
        self.idempotency.run(method, &request_id, body, once).await
    }
}

/// A request that changes one VM it names, retried safely with its request id.
trait VmMutation: prost::Message + Clone + Send + 'static {
    /// The VM's id or name.
    fn vm(&self) -> &str;
    /// The client's request id.
    fn request_id(&mut self) -> &mut String;
}

macro_rules! vm_mutation {
    ($($request:ty),*) => {$(
        impl VmMutation for $request {
            fn vm(&self) -> &str {
                &self.vm
            }

            fn request_id(&mut self) -> &mut String {
                &mut self.request_id
            }
        }
    )*};
}

vm_mutation!(pb::StartVmRequest, pb::StopVmRequest, pb::PauseVmRequest, pb::ResumeVmRequest);

impl VmApi {
    /// Runs `run` on the VM a request names, once per request id, as the caller's tenant sees
    /// it; answers with the VM as `answer` wraps it.
    async fn mutate_vm<T: VmMutation, R: prost::Message + Default + 'static, F>(
        &self,
        method: &'static str,
        request: Request<T>,
        run: impl FnOnce(Arc<Ops>, String) -> F + Send + 'static,
        answer: fn(pb::Vm) -> R,
    ) -> Result<Response<R>, Status>
    where
        F: std::future::Future<Output = Result<Vm, Error>> + Send,
    {
        let tenant = tenant_of(&request);
        let request = request.into_inner();
        let idempotency = tenant_idempotency_key(&request, tenant.as_ref(), T::request_id);
        let key = convert::key("vm", request.vm()).map_err(|e| to_status(&e))?;
        let ops = self.ops.clone();
        let use_case = async move {
            let key = visible(&ops, key, tenant.as_ref()).await?;
            run(ops, key).await
        };
        self.vm_mutation(method, idempotency, use_case, answer).await
    }
}

/// How often `WaitVm` looks at the VM.
const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(100);

type ExecStream = Pin<Box<dyn Stream<Item = Result<pb::ExecVmResponse, Status>> + Send>>;

#[tonic::async_trait]
impl VmService for VmApi {
    async fn create_vm(&self, request: Request<pb::CreateVmRequest>) -> Result<Response<pb::CreateVmResponse>, Status> {
        let tenant = tenant_of(&request);
        let mut request = request.into_inner();
        // A confined caller's VMs carry its tenant's labels, whatever the request says.
        if let Some(tenant) = &tenant {
            request.labels.extend(tenant.labels().clone());
        }
        let idempotency = tenant_idempotency_key(&request, tenant.as_ref(), |r| &mut r.request_id);
        let mut create = CreateVm::try_from(request).map_err(|e| to_status(&e))?;
        // A confined caller restores only its tenant's snapshots (their memory is its VMs'),
        // by id: one of that name made later by another tenant is not restored instead.
        if let (Some(tenant), Some(key)) = (&tenant, create.snapshot.clone()) {
            let info = self.ops.get_snapshot(&key).await.map_err(|e| to_status(&e))?;
            if !tenant.admits(&info.snapshot.labels) {
                return Err(to_status(&Error::NotFound { kind: Resource::Snapshot, key }));
            }
            create.snapshot = Some(info.snapshot.id.to_string());
        }
        let ops = self.ops.clone();
        let use_case = async move { ops.create_vm(create).await };
        self.vm_mutation("CreateVm", idempotency, use_case, |vm| pb::CreateVmResponse { vm: Some(vm) }).await
    }

    async fn get_vm(&self, request: Request<pb::GetVmRequest>) -> Result<Response<pb::GetVmResponse>, Status> {
        let tenant = tenant_of(&request);
        let key = convert::key("vm", &request.into_inner().vm).map_err(|e| to_status(&e))?;
        let vm = visible_vm(&self.ops, key, tenant.as_ref()).await.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::GetVmResponse { vm: Some(self.to_pb(&vm)) }))
    }

    async fn list_vms(&self, request: Request<pb::ListVmsRequest>) -> Result<Response<pb::ListVmsResponse>, Status> {
        let tenant = tenant_of(&request);
        let request = request.into_inner();
        let page_size = convert::page_size(request.page_size).map_err(|e| to_status(&e))?;
        let after = convert::page_after(&request.page_token).map_err(|e| to_status(&e))?;
        let labels = convert::label_selector(request.labels).map_err(|e| to_status(&e))?;
        let mut states = Vec::new();
        for state in &request.states {
            states.push(convert::state_from_pb(*state).ok_or_else(|| {
                invalid_field("states", &format!("{state} is not a VM state (VM_STATE_CREATED .. VM_STATE_PAUSED)"))
            })?);
        }
        // Read before the list: a watch from it misses no change made after the list was read.
        let revision = self.ops.latest_revision();
        let labels = match tenant.map(|tenant| tenant.confine(labels.clone())) {
            None => labels,
            Some(Some(confined)) => confined,
            // The filter asks for another tenant's VMs: there are none for this caller.
            Some(None) => {
                return Ok(Response::new(pb::ListVmsResponse {
                    vms: Vec::new(),
                    next_page_token: String::new(),
                    revision,
                }));
            }
        };
        let filter = VmFilter { labels, states };
        let (vms, last) =
            self.ops.list_vms_page(&filter, after.as_deref(), page_size).await.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::ListVmsResponse {
            vms: vms.iter().map(|vm| self.to_pb(vm)).collect(),
            next_page_token: last.map(|id| convert::page_token(&id)).unwrap_or_default(),
            revision,
        }))
    }

    async fn wait_vm(&self, request: Request<pb::WaitVmRequest>) -> Result<Response<pb::WaitVmResponse>, Status> {
        let timeout = call_timeout(request.metadata());
        let tenant = tenant_of(&request);
        let request = request.into_inner();
        let key = convert::key("vm", &request.vm).map_err(|e| to_status(&e))?;
        let key = visible(&self.ops, key, tenant.as_ref()).await.map_err(|e| to_status(&e))?;
        let state = convert::state_from_pb(request.state)
            .ok_or_else(|| invalid_field("state", "must be a VM state (VM_STATE_CREATED .. VM_STATE_PAUSED)"))?;
        let (ops, stopped, waited_for) = (self.ops.clone(), self.ops.stopped_serving(), key.clone());
        let waited = async move {
            tokio::select! {
                result = ops.wait_vm(&waited_for, state, WAIT_POLL) => result,
                () = stopped => Err(crate::ops::Error::Stopping),
            }
        };
        let vm = match timeout {
            None => waited.await,
            Some(timeout) => match tokio::time::timeout(answer_within(timeout), waited).await {
                Ok(result) => result,
                Err(_) => {
                    let now = self.ops.get_vm(&key).await.map_err(|e| to_status(&e))?;
                    return Err(api_status(&ApiError::WaitTimedOut {
                        vm: now.name,
                        state: now.observed_state,
                        wanted: state,
                        seconds: timeout.as_secs_f64(),
                    }));
                }
            },
        }
        .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::WaitVmResponse { vm: Some(self.to_pb(&vm)) }))
    }

    async fn touch_vm(&self, request: Request<pb::TouchVmRequest>) -> Result<Response<pb::TouchVmResponse>, Status> {
        let tenant = tenant_of(&request);
        let request = request.into_inner();
        let key = convert::key("vm", &request.vm).map_err(|e| to_status(&e))?;
        let key = visible(&self.ops, key, tenant.as_ref()).await.map_err(|e| to_status(&e))?;
        let ttl = convert::ttl_ms("ttl", request.ttl)
            .map_err(|violation| to_status(&crate::ops::Error::InvalidArgument(vec![violation])))?;
        let vm = self.ops.touch_vm(&key, ttl).await.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::TouchVmResponse { vm: Some(self.to_pb(&vm)) }))
    }

    async fn start_vm(&self, request: Request<pb::StartVmRequest>) -> Result<Response<pb::StartVmResponse>, Status> {
        let wait_agent = !request.get_ref().no_wait;
        let run = move |ops: Arc<Ops>, key: String| async move { ops.start_vm(&key, wait_agent).await };
        self.mutate_vm("StartVm", request, run, |vm| pb::StartVmResponse { vm: Some(vm) }).await
    }

    async fn stop_vm(&self, request: Request<pb::StopVmRequest>) -> Result<Response<pb::StopVmResponse>, Status> {
        let force = request.get_ref().force;
        let run = move |ops: Arc<Ops>, key: String| async move { ops.stop_vm(&key, force).await };
        self.mutate_vm("StopVm", request, run, |vm| pb::StopVmResponse { vm: Some(vm) }).await
    }

    async fn pause_vm(&self, request: Request<pb::PauseVmRequest>) -> Result<Response<pb::PauseVmResponse>, Status> {
        let run = |ops: Arc<Ops>, key: String| async move { ops.pause_vm(&key).await };
        self.mutate_vm("PauseVm", request, run, |vm| pb::PauseVmResponse { vm: Some(vm) }).await
    }

    async fn resume_vm(&self, request: Request<pb::ResumeVmRequest>) -> Result<Response<pb::ResumeVmResponse>, Status> {
        let run = |ops: Arc<Ops>, key: String| async move { ops.resume_vm(&key).await };
        self.mutate_vm("ResumeVm", request, run, |vm| pb::ResumeVmResponse { vm: Some(vm) }).await
    }

    async fn delete_vm(&self, request: Request<pb::DeleteVmRequest>) -> Result<Response<pb::DeleteVmResponse>, Status> {
        let tenant = tenant_of(&request);
        let request = request.into_inner();
        let (request_id, body) = tenant_idempotency_key(&request, tenant.as_ref(), |r| &mut r.request_id);
        let key = convert::key("vm", &request.vm).map_err(|e| to_status(&e))?;
        let (ops, allow_missing) = (self.ops.clone(), request.allow_missing);
        self.idempotency
            .run("DeleteVm", &request_id, body, async move {
                let deleted = run_to_completion(async move {
                    let found = match visible(&ops, key, tenant.as_ref()).await {
                        Ok(key) => ops.delete_vm(&key).await,
                        Err(error) => Err(error),
                    };
                    match found {
                        Ok(deleted) => Ok(Some(deleted)),
                        Err(Error::NotFound { kind: Resource::Vm, .. }) if allow_missing => Ok(None),
                        Err(error) => Err(error),
                    }
                })
                .await?;
                Ok(match deleted {
                    Some((id, op_id)) => with_op_id(pb::DeleteVmResponse { id: id.to_string() }, &op_id.to_string()),
                    None => Response::new(pb::DeleteVmResponse { id: String::new() }),
                })
            })
            .await
    }

    type WatchVmsStream = tokio_stream::wrappers::ReceiverStream<Result<pb::WatchVmsResponse, Status>>;

    async fn watch_vms(&self, request: Request<pb::WatchVmsRequest>) -> Result<Response<Self::WatchVmsStream>, Status> {
        let tenant = tenant_of(&request);
        let request = request.into_inner();
        let labels = convert::label_selector(request.labels).map_err(|e| to_status(&e))?;
        let mut filter =
            super::watch::WatchFilter { vm: (!request.vm.is_empty()).then_some(request.vm), labels, nothing: false };
        if let Some(tenant) = tenant {
            match tenant.confine(std::mem::take(&mut filter.labels)) {
                Some(confined) => filter.labels = confined,
                // Another tenant's VMs: events that never come, as for a VM that does not exist.
                None => filter.nothing = true,
            }
        }
        let stopped = self.ops.stopped_serving();
        let stream = super::watch::watch(self.ops.event_log(), request.from_revision, filter, stopped).await?;
        Ok(Response::new(stream))
    }

    async fn copy_to_vm(
        &self,
        request: Request<Streaming<pb::CopyToVmRequest>>,
    ) -> Result<Response<pb::CopyToVmResponse>, Status> {
        use pb::copy_to_vm_request::Payload;
        let tenant = tenant_of(&request);
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| invalid_field("start", "the stream ended before its first message"))?;
        let Some(Payload::Start(start)) = first.payload else {
            return Err(invalid_field("start", "the first message must be start"));
        };
        let key = convert::key("start.vm", &start.vm).map_err(|e| to_status(&e))?;
        let key = visible(&self.ops, key, tenant.as_ref()).await.map_err(|e| to_status(&e))?;
        let path = convert::guest_path("start.path", start.path).map_err(|e| to_status(&e))?;
        // A client that fails or goes away mid-copy aborts it: the guest keeps no partial file.
        let input = inbound.map(|message| match message {
            Ok(pb::CopyToVmRequest { payload: Some(Payload::Data(data)) }) => Ok(data),
            Ok(_) => Err("only data may follow the first message".to_owned()),
            Err(status) => Err(format!("the client stream failed: {}", status.message())),
        });
        let size = self
            .ops
            .copy_to_vm(&key, path, start.mode, start.archive, Box::pin(input))
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::CopyToVmResponse { size }))
    }

    type CopyFromVmStream = Pin<Box<dyn Stream<Item = Result<pb::CopyFromVmResponse, Status>> + Send>>;

    async fn copy_from_vm(
        &self,
        request: Request<pb::CopyFromVmRequest>,
    ) -> Result<Response<Self::CopyFromVmStream>, Status> {
        use pb::copy_from_vm_response::Payload;
        let tenant = tenant_of(&request);
        let request = request.into_inner();
        let key = convert::key("vm", &request.vm).map_err(|e| to_status(&e))?;
        let key = visible(&self.ops, key, tenant.as_ref()).await.map_err(|e| to_status(&e))?;
        let path = convert::guest_path("path", request.path).map_err(|e| to_status(&e))?;
        let (meta, data) = self.ops.copy_from_vm(&key, path, request.archive).await.map_err(|e| to_status(&e))?;
        let info = pb::CopyFromVmResponse {
            payload: Some(Payload::Info(pb::CopiedFileInfo {
                mode: meta.mode,
                size: meta.size,
                archive: meta.archive,
            })),
        };
        let data = data.map(|chunk| match chunk {
            Ok(data) => Ok(pb::CopyFromVmResponse { payload: Some(Payload::Data(data)) }),
            Err(e) => Err(to_status(&e)),
        });
        Ok(Response::new(Box::pin(tokio_stream::once(Ok(info)).chain(data))))
    }

    type StreamVmLogsStream = Pin<Box<dyn Stream<Item = Result<pb::StreamVmLogsResponse, Status>> + Send>>;

    async fn stream_vm_logs(
        &self,
        request: Request<pb::StreamVmLogsRequest>,
    ) -> Result<Response<Self::StreamVmLogsStream>, Status> {
        let tenant = tenant_of(&request);
        let request = request.into_inner();
        let key = convert::key("vm", &request.vm).map_err(|e| to_status(&e))?;
        let key = visible(&self.ops, key, tenant.as_ref()).await.map_err(|e| to_status(&e))?;
        let which = match pb::VmLog::try_from(request.log) {
            Ok(pb::VmLog::Unspecified | pb::VmLog::Console) => crate::ops::VmLog::Console,
            Ok(pb::VmLog::Vmm) => crate::ops::VmLog::Vmm,
            Err(_) => return Err(invalid_field("log", "must be VM_LOG_CONSOLE or VM_LOG_VMM")),
        };
        let log =
            self.ops.stream_vm_log(&key, which, request.tail_bytes, request.follow).await.map_err(|e| to_status(&e))?;
        let log = log.map(|chunk| match chunk {
            Ok(data) => Ok(pb::StreamVmLogsResponse { data }),
            Err(e) => Err(to_status(&e)),
        });
        Ok(Response::new(Box::pin(log)))
    }

    type ExecVmStream = ExecStream;

    async fn exec_vm(&self, request: Request<Streaming<pb::ExecVmRequest>>) -> Result<Response<ExecStream>, Status> {
        use pb::exec_vm_request::Payload;
        let tenant = tenant_of(&request);
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| invalid_field("start", "the stream ended before its first message"))?;
        let Some(Payload::Start(start)) = first.payload else {
            return Err(invalid_field("start", "the first message must be start"));
        };
        let (vm, command) = convert::exec_start(start).map_err(|e| to_status(&e))?;
        let vm = visible(&self.ops, vm, tenant.as_ref()).await.map_err(|e| to_status(&e))?;
        // Standard input until the client says EOF or goes away; a stray start is ignored.
        let input = inbound
            .map_while(|message| match message {
                Ok(pb::ExecVmRequest { payload: Some(Payload::Stdin(data)) }) => Some(Some(ExecInput::Data(data))),
                Ok(pb::ExecVmRequest { payload: Some(Payload::StdinEof(_)) }) => Some(Some(ExecInput::Eof)),
                // Out of range is clamped: a resize is not worth ending a session over.
                Ok(pb::ExecVmRequest { payload: Some(Payload::Resize(size)) }) => {
                    let clamp = |value: u32| u16::try_from(value).unwrap_or(u16::MAX);
                    Some(Some(ExecInput::Resize(TerminalSize { rows: clamp(size.rows), columns: clamp(size.columns) })))
                }
                Ok(_) => Some(None),
                Err(_) => None,
            })
            .filter_map(|input| input);
        let output = self.ops.exec_vm(&vm, command, input).await.map_err(|e| to_status(&e))?;
        let output = output.map(|event| event.map(convert::exec_event).map_err(|e| to_status(&e)));
        Ok(Response::new(Box::pin(output)))
    }
}
