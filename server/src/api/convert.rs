//! Conversions between the public protobuf types and domain types, with validation.
//! Nothing outside `api/` sees a generated type.

use std::path::PathBuf;

use banger_proto::v1 as pb;

use crate::{
    domain::{
        ExecCommand, ExecEvent, ExitStatus, Image, ImageProgress, MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB, NewImage,
        Terminal, TerminalSize, Vm, VmFault, VmHandles, VmSpec, VmState, vm_name_error,
    },
    ops::{CreateVm, Error, FieldViolation, ImageSource as Source, NewOciImage},
};

pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

/// The protobuf state of a domain state.
pub fn vm_state(state: VmState) -> pb::VmState {
    match state {
        VmState::Created => pb::VmState::Created,
        VmState::Starting => pb::VmState::Starting,
        VmState::Running => pb::VmState::Running,
        VmState::Stopping => pb::VmState::Stopping,
        VmState::Stopped => pb::VmState::Stopped,
        VmState::Error => pb::VmState::Error,
        VmState::Paused => pb::VmState::Paused,
    }
}

/// A VM as the API shows it: its record plus the live VMM pid.
pub fn vm(vm: &Vm, handles: &VmHandles, vmm: &str) -> pb::Vm {
    let paths = vm.paths();
    // Not `display()` nor `to_string_lossy()`: their chunk-by-chunk UTF-8 walk cost a page of
    // VMs more than the rest of its paths; the paths are UTF-8 (built from ids under the state
    // dir), checked at once, and a lossy copy only where one is not.
    let path = |p: &std::path::Path| match p.to_str() {
        Some(text) => text.to_owned(),
        None => p.to_string_lossy().into_owned(),
    };
    pb::Vm {
        id: vm.id.to_string(),
        name: vm.name.clone(),
        image_id: vm.image_id.to_string(),
        vcpus: vm.spec.vcpus,
        memory_mib: vm.spec.memory_mib,
        disk_size_bytes: vm.spec.disk_bytes,
        state: vm_state(vm.observed_state).into(),
        desired_state: vm_state(vm.desired_state).into(),
        last_error: vm.last_error.clone(),
        last_error_reason: match vm.last_error_reason {
            None => pb::VmErrorReason::Unspecified,
            Some(VmFault::VmmExited) => pb::VmErrorReason::VmmExited,
            Some(VmFault::Interrupted) => pb::VmErrorReason::Interrupted,
            Some(VmFault::StartFailed) => pb::VmErrorReason::StartFailed,
            Some(VmFault::CreateLeftovers) => pb::VmErrorReason::CreateLeftovers,
        }
        .into(),
        last_operation: vm.last_operation.clone(),
        create_time: Some(timestamp(vm.created_at_ms)),
        update_time: Some(timestamp(vm.updated_at_ms)),
        runtime: Some(pb::VmRuntime {
            vm_dir: path(&paths.dir),
            console_log_path: path(&paths.console_log),
            vmm_log_path: path(&paths.vmm_log),
            api_socket_path: path(&paths.api_socket),
            vsock_path: path(&paths.vsock),
            vsock_cid: vm.vsock_cid,
            vmm_pid: if vm.observed_state.may_have_vmm() { handles.vmm.map(|h| h.pid).unwrap_or(0) } else { 0 },
            vmm: vmm.to_owned(),
            root_disk: vm.root_disk.as_str().to_owned(),
            root_disk_path: path(&paths.root_disk),
            guest_ip: vm.ip.map(|ip| ip.to_string()).unwrap_or_default(),
            tap: if vm.ip.is_some() { crate::domain::tap_name(vm.vsock_cid) } else { String::new() },
        }),
        generation: vm.generation as u64,
        labels: vm.labels.clone(),
        expire_time: vm.expire_at_ms.map(timestamp),
        egress: Some(egress(&vm.egress)),
        snapshot_id: vm.snapshot_id.map(|id| id.to_string()).unwrap_or_default(),
    }
}

/// The API's form of an egress policy.
pub fn egress(egress: &crate::domain::Egress) -> pb::EgressPolicy {
    use crate::domain::Egress;
    match egress {
        Egress::None => pb::EgressPolicy { mode: pb::EgressMode::None.into(), allow: Vec::new() },
        Egress::Internet => pb::EgressPolicy { mode: pb::EgressMode::Internet.into(), allow: Vec::new() },
        Egress::Allow { cidrs } => pb::EgressPolicy {
            mode: pb::EgressMode::Allow.into(),
            allow: cidrs.iter().map(ToString::to_string).collect(),
        },
    }
}

/// The most networks an allow list may name.
pub const MAX_EGRESS_CIDRS: usize = 64;

/// An egress policy from the API; field violations name `egress.mode` or `egress.allow`.
fn egress_policy(policy: Option<pb::EgressPolicy>) -> Result<crate::domain::Egress, Vec<FieldViolation>> {
    use crate::domain::{Cidr, Egress};
    let Some(policy) = policy else { return Ok(Egress::Internet) };
    let mode = pb::EgressMode::try_from(policy.mode)
        .map_err(|_| vec![FieldViolation::new("egress.mode", format!("{} is not an egress mode", policy.mode))])?;
    if mode != pb::EgressMode::Allow && !policy.allow.is_empty() {
        return Err(vec![FieldViolation::new("egress.allow", "only with EGRESS_MODE_ALLOW")]);
    }
    match mode {
        pb::EgressMode::Unspecified | pb::EgressMode::Internet => Ok(Egress::Internet),
        pb::EgressMode::None => Ok(Egress::None),
        pb::EgressMode::Allow => {
            if policy.allow.is_empty() || policy.allow.len() > MAX_EGRESS_CIDRS {
                let why = format!("1 to {MAX_EGRESS_CIDRS} networks, got {}", policy.allow.len());
                return Err(vec![FieldViolation::new("egress.allow", why)]);
            }
            let mut cidrs = Vec::new();
            let mut violations = Vec::new();
            for text in &policy.allow {
                match text.parse::<Cidr>() {
                    Ok(cidr) if !cidrs.contains(&cidr) => cidrs.push(cidr),
                    Ok(_) => {}
                    Err(e) => violations.push(FieldViolation::new("egress.allow", e.to_string())),
                }
            }
            if violations.is_empty() { Ok(Egress::Allow { cidrs }) } else { Err(violations) }
        }
    }
}

/// An image as the API shows it.
pub fn image(image: &Image) -> pb::Image {
    let origin = image.origin.as_ref().map(|origin| pb::ImageOrigin {
        source: origin.source.clone(),
        manifest_digest: origin.manifest_digest.clone(),
        config_digest: origin.config_digest.clone(),
        platform: origin.platform.clone(),
        layers: origin
            .layers
            .iter()
            .map(|layer| pb::ImageLayer {
                digest: layer.digest.clone(),
                size_bytes: layer.size_bytes,
                media_type: layer.media_type.clone(),
            })
            .collect(),
        config: Some(pb::ImageConfig {
            env: origin.config.env.clone(),
            working_dir: origin.config.working_dir.clone(),
            user: origin.config.user.clone(),
            entrypoint: origin.config.entrypoint.clone(),
            cmd: origin.config.cmd.clone(),
        }),
    });
    pb::Image {
        origin,
        id: image.id.to_string(),
        name: image.name.clone(),
        kernel_path: image.kernel_path.display().to_string(),
        initrd_path: image.initrd_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        rootfs_path: image.rootfs_path.display().to_string(),
        kernel_args: image.kernel_args.clone(),
        rootfs_size_bytes: image.rootfs_size_bytes,
        create_time: Some(timestamp(image.created_at_ms)),
        labels: image.labels.clone(),
    }
}

/// An absolute path in a guest.
pub fn guest_path(field: &str, path: String) -> Result<String, Error> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(Error::InvalidArgument(vec![FieldViolation::new(
            field,
            format!("{path:?} is not an absolute path"),
        )]));
    }
    Ok(path)
}

/// A VM or image key (id or name): must not be empty.
pub fn key(field: &str, value: &str) -> Result<String, Error> {
    if value.trim().is_empty() {
        return Err(Error::InvalidArgument(vec![FieldViolation::new(field, "must name a vm or image by id or name")]));
    }
    Ok(value.to_owned())
}

impl TryFrom<pb::CreateVmRequest> for CreateVm {
    type Error = Error;

    fn try_from(request: pb::CreateVmRequest) -> Result<Self, Error> {
        let mut violations = Vec::new();
        if !request.name.is_empty()
            && let Err(e) = vm_name_error(&request.name)
        {
            violations.push(FieldViolation::new("name", e.to_string()));
        }
        // An unset shape is 0 here: ops fills it in (the snapshot's, or the daemon's defaults).
        let restore = !request.snapshot.is_empty();
        let vcpus = request.vcpus.unwrap_or(0);
        if request.vcpus.is_some() && !(1..=MAX_VCPUS).contains(&vcpus) {
            violations.push(FieldViolation::new("vcpus", format!("must be between 1 and {MAX_VCPUS}, got {vcpus}")));
        }
        let memory_mib = request.memory_mib.unwrap_or(0);
        if request.memory_mib.is_some() && !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
            violations.push(FieldViolation::new(
                "memory_mib",
                format!("must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {memory_mib}"),
            ));
        }
        if let Err(e) = crate::domain::labels_error(&request.labels) {
            violations.push(FieldViolation::new("labels", e.to_string()));
        }
        if let Some(key) = request.labels.keys().find(|key| key.starts_with(crate::domain::RESERVED_LABEL_PREFIX)) {
            violations.push(FieldViolation::new(
                "labels",
                format!("key {key:?}: keys under {:?} are the daemon's", crate::domain::RESERVED_LABEL_PREFIX),
            ));
        }
        let disk_bytes = request.disk_size_bytes.div_ceil(MIB) * MIB;
        if disk_bytes > MAX_DISK_BYTES {
            violations.push(FieldViolation::new(
                "disk_size_bytes",
                format!("must be at most 1 TiB, got {} bytes", request.disk_size_bytes),
            ));
        }
        let ttl_ms = ttl_ms("ttl", request.ttl).unwrap_or_else(|violation| {
            violations.push(violation);
            None
        });
        let egress = egress_policy(request.egress).unwrap_or_else(|mut bad| {
            violations.append(&mut bad);
            Default::default()
        });
        if !violations.is_empty() {
            return Err(Error::InvalidArgument(violations));
        }
        Ok(CreateVm {
            egress,
            labels: request.labels,
            ttl_ms,
            name: (!request.name.is_empty()).then_some(request.name),
            image: (!request.image.is_empty()).then_some(request.image),
            spec: VmSpec { vcpus, memory_mib, disk_bytes },
            start: !request.no_start,
            wait_agent: !request.no_wait,
            snapshot: restore.then_some(request.snapshot),
        })
    }
}

/// Validates the first message of an exec stream.
pub fn exec_start(start: pb::ExecVmStart) -> Result<(String, ExecCommand), Error> {
    let mut violations = Vec::new();
    if start.vm.trim().is_empty() {
        violations.push(FieldViolation::new("start.vm", "must name a vm by id or name"));
    }
    match start.argv.first() {
        None if start.terminal.is_some() => {} // a login shell
        None => violations.push(FieldViolation::new(
            "start.argv",
            "must hold at least the program to run (only a terminal may run the login shell without one)",
        )),
        Some(program) if program.is_empty() => {
            violations.push(FieldViolation::new("start.argv", "argv[0] must name the program to run"));
        }
        Some(_) => {}
    }
    let terminal = match start.terminal {
        None => None,
        Some(terminal) => {
            let size = terminal.size.map(|size| terminal_size("start.terminal.size", size, &mut violations));
            if terminal.term.len() > 64
                || !terminal.term.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b))
            {
                violations.push(FieldViolation::new(
                    "start.terminal.term",
                    "must be a terminal type such as xterm-256color (letters, digits, - _ . +; at most 64)",
                ));
            }
            Some(Terminal { term: terminal.term, size: size.unwrap_or_default() })
        }
    };
    if let Some(bad) = start.env.iter().find(|e| !e.contains('=') || e.starts_with('=')) {
        violations.push(FieldViolation::new("start.env", format!("{bad:?} is not NAME=value")));
    }
    if !violations.is_empty() {
        return Err(Error::InvalidArgument(violations));
    }
    let command = ExecCommand {
        argv: start.argv,
        env: start.env,
        working_dir: start.working_dir,
        stdin: start.stdin,
        timeout_seconds: start.timeout_seconds,
        user: start.user,
        terminal,
    };
    Ok((start.vm, command))
}

/// A terminal size of the API; 0 in either takes the default, more than 65535 is refused.
pub fn terminal_size(field: &str, size: pb::TerminalSize, violations: &mut Vec<FieldViolation>) -> TerminalSize {
    let mut dimension = |name: &str, value: u32| {
        u16::try_from(value).unwrap_or_else(|_| {
            violations.push(FieldViolation::new(format!("{field}.{name}"), "must be at most 65535"));
            0
        })
    };
    TerminalSize { rows: dimension("rows", size.rows), columns: dimension("columns", size.columns) }
}

/// An exec event as the API streams it.
pub fn exec_event(event: ExecEvent) -> pb::ExecVmResponse {
    use pb::exec_vm_response::Payload;
    let payload = match event {
        ExecEvent::Stdout(data) => Payload::Stdout(data),
        ExecEvent::Stderr(data) => Payload::Stderr(data),
        ExecEvent::Exit { status, timed_out } => Payload::Exit(pb::ExecExit {
            status: Some(match status {
                ExitStatus::Code(code) => pb::exec_exit::Status::Code(code),
                ExitStatus::Signal(signal) => pb::exec_exit::Status::Signal(signal),
            }),
            timed_out,
        }),
    };
    pb::ExecVmResponse { payload: Some(payload) }
}

/// An import request as the use case takes it.
pub fn new_image(request: pb::ImportImageRequest) -> NewImage {
    NewImage {
        name: request.name,
        kernel_path: PathBuf::from(request.kernel_path),
        initrd_path: (!request.initrd_path.is_empty()).then(|| PathBuf::from(request.initrd_path)),
        rootfs_path: PathBuf::from(request.rootfs_path),
        kernel_args: request.kernel_args,
        labels: request.labels,
    }
}

/// What a PullImage asks for.
pub fn new_oci_image(request: pb::PullImageRequest) -> Result<NewOciImage, Error> {
    use pb::pull_image_request::Source as PbSource;
    let tag = (!request.tag.is_empty()).then_some(request.tag);
    let source = match request.source {
        // The daemon's registry settings are the use case's to fill in.
        Some(PbSource::Reference(reference)) => Source::Registry { reference, config: Default::default() },
        Some(PbSource::OciLayout(dir)) => Source::Layout { dir: PathBuf::from(dir), tag },
        Some(PbSource::Archive(path)) => Source::Archive { path: PathBuf::from(path), tag },
        None => {
            return Err(Error::InvalidArgument(vec![FieldViolation::new(
                "source",
                "name a reference, an oci_layout or an archive",
            )]));
        }
    };
    Ok(NewOciImage { name: request.name, source, labels: request.labels })
}

/// An image's progress as the API streams it.
pub fn image_progress(stage: &str, progress: &ImageProgress) -> pb::ImageProgress {
    match progress {
        ImageProgress::Stage(name) => pb::ImageProgress { stage: (*name).into(), ..Default::default() },
        ImageProgress::Blob { digest, done, total } => pb::ImageProgress {
            stage: stage.into(),
            digest: digest.clone(),
            done_bytes: *done,
            total_bytes: total.unwrap_or(0),
        },
    }
}

const MIB: u64 = 1024 * 1024;
/// The largest root disk a VM may ask for.
pub const MAX_DISK_BYTES: u64 = 1 << 40;

/// The longest time to live a VM may have.
pub const MAX_TTL_SECONDS: i64 = 365 * 24 * 3600;

/// A time to live in milliseconds, checked: 1 second to [`MAX_TTL_SECONDS`].
pub fn ttl_ms(field: &str, ttl: Option<prost_types::Duration>) -> Result<Option<i64>, FieldViolation> {
    let Some(ttl) = ttl else { return Ok(None) };
    let ms = ttl.seconds.saturating_mul(1000).saturating_add(i64::from(ttl.nanos) / 1_000_000);
    if ttl.nanos < 0 || !(1000..=MAX_TTL_SECONDS * 1000).contains(&ms) {
        return Err(FieldViolation::new(field, format!("must be between 1 second and 365 days, got {ms} ms")));
    }
    Ok(Some(ms))
}

/// The page size asked for: 1 to 1000, 0 meaning 100.
pub fn page_size(size: u32) -> Result<u32, Error> {
    match size {
        0 => Ok(100),
        1..=1000 => Ok(size),
        _ => Err(Error::InvalidArgument(vec![FieldViolation::new(
            "page_size",
            format!("must be at most 1000, got {size}"),
        )])),
    }
}

const PAGE_TOKEN_PREFIX: &str = "after:";

/// The opaque token of the page after the one ending with `last_id`.
pub fn page_token(last_id: &str) -> String {
    format!("{PAGE_TOKEN_PREFIX}{last_id}").bytes().map(|b| format!("{b:02x}")).collect()
}

/// The id a page token continues after; `None` for the first page.
pub fn page_after(token: &str) -> Result<Option<String>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid =
        || Error::InvalidArgument(vec![FieldViolation::new("page_token", "is not a next_page_token this server made")]);
    if !token.len().is_multiple_of(2) || token.len() > 256 {
        return Err(invalid());
    }
    let bytes: Option<Vec<u8>> =
        (0..token.len()).step_by(2).map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok()).collect();
    let text = String::from_utf8(bytes.ok_or_else(invalid)?).map_err(|_| invalid())?;
    let id = text.strip_prefix(PAGE_TOKEN_PREFIX).ok_or_else(invalid)?;
    id.parse::<crate::domain::VmId>().map_err(|_| invalid())?;
    Ok(Some(id.to_owned()))
}

/// A list filter's labels, checked.
pub fn label_selector(labels: crate::domain::Labels) -> Result<crate::domain::Labels, Error> {
    crate::domain::labels_error(&labels)
        .map_err(|e| Error::InvalidArgument(vec![FieldViolation::new("labels", e.to_string())]))?;
    Ok(labels)
}

/// A domain state from the API's; `None` for unspecified or unknown values.
pub fn state_from_pb(state: i32) -> Option<VmState> {
    Some(match pb::VmState::try_from(state).ok()? {
        pb::VmState::Unspecified => return None,
        pb::VmState::Created => VmState::Created,
        pb::VmState::Starting => VmState::Starting,
        pb::VmState::Running => VmState::Running,
        pb::VmState::Stopping => VmState::Stopping,
        pb::VmState::Stopped => VmState::Stopped,
        pb::VmState::Error => VmState::Error,
        pb::VmState::Paused => VmState::Paused,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(result: Result<CreateVm, Error>) -> Vec<String> {
        match result {
            Err(Error::InvalidArgument(v)) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("expected invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn create_requests_are_validated_field_by_field() {
        let ok = CreateVm::try_from(pb::CreateVmRequest::default()).expect("defaults are valid");
        // Unset: the daemon's defaults, filled in by ops.
        assert_eq!((ok.spec.vcpus, ok.spec.memory_mib, ok.start), (0, 0, true));
        assert!(ok.name.is_none() && ok.image.is_none());
        let bad = pb::CreateVmRequest { name: "a b".into(), vcpus: Some(0), memory_mib: Some(1), ..Default::default() };
        assert_eq!(fields(CreateVm::try_from(bad)), ["name", "vcpus", "memory_mib"]);
        // Egress: a list only with ALLOW, of 1 to 64 IPv4 networks; none set is the internet.
        let with = |mode: pb::EgressMode, allow: &[&str]| pb::CreateVmRequest {
            egress: Some(pb::EgressPolicy { mode: mode.into(), allow: allow.iter().map(|a| a.to_string()).collect() }),
            ..Default::default()
        };
        assert_eq!(fields(CreateVm::try_from(with(pb::EgressMode::Allow, &["10.0.0.0/33"]))), ["egress.allow"]);
        assert_eq!(fields(CreateVm::try_from(with(pb::EgressMode::Allow, &[]))), ["egress.allow"]);
        assert_eq!(fields(CreateVm::try_from(with(pb::EgressMode::Internet, &["10.0.0.0/8"]))), ["egress.allow"]);
        let allowed = CreateVm::try_from(with(pb::EgressMode::Allow, &["10.1.2.3/16", "192.0.2.7"])).expect("valid");
        let expected: Vec<crate::domain::Cidr> =
            vec!["10.1.0.0/16".parse().expect("cidr"), "192.0.2.7/32".parse().expect("cidr")];
        assert_eq!(allowed.egress, crate::domain::Egress::Allow { cidrs: expected });
        let default = CreateVm::try_from(pb::CreateVmRequest::default()).expect("valid");
        assert_eq!(default.egress, crate::domain::Egress::Internet);
    }

    #[test]
    fn exec_needs_a_program() {
        let start = pb::ExecVmStart { vm: "x".into(), ..Default::default() };
        assert!(matches!(exec_start(start), Err(Error::InvalidArgument(v)) if v[0].field == "start.argv"));
    }

    #[test]
    fn a_terminal_may_run_the_login_shell_and_its_fields_are_checked() {
        let terminal = |term: &str, rows: u32, columns: u32| pb::ExecTerminal {
            term: term.into(),
            size: Some(pb::TerminalSize { rows, columns }),
        };
        let shell = pb::ExecVmStart {
            vm: "x".into(),
            terminal: Some(terminal("xterm-256color", 40, 120)),
            ..Default::default()
        };
        let (_, command) = exec_start(shell).expect("a login shell");
        assert!(command.argv.is_empty());
        let expected = Terminal { term: "xterm-256color".into(), size: TerminalSize { rows: 40, columns: 120 } };
        assert_eq!(command.terminal, Some(expected));
        let bad =
            pb::ExecVmStart { vm: "x".into(), terminal: Some(terminal("xterm;rm", 70_000, 1)), ..Default::default() };
        let Err(Error::InvalidArgument(violations)) = exec_start(bad) else { panic!("accepted") };
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["start.terminal.size.rows", "start.terminal.term"]);
    }

    #[test]
    fn timestamps_keep_milliseconds() {
        assert_eq!(timestamp(1_500), prost_types::Timestamp { seconds: 1, nanos: 500_000_000 });
    }
}
