//! How the CLI prints VMs, images and errors.

use banger_client::{ClientError, Target, error_op_id, field_violations, pb};
use tonic::{Code, Status};

static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes read commands print JSON (`--output json`).
pub fn set_json(json: bool) {
    JSON.store(json, std::sync::atomic::Ordering::Relaxed);
}

fn json() -> bool {
    JSON.load(std::sync::atomic::Ordering::Relaxed)
}

fn state_name(state: i32) -> &'static str {
    match pb::VmState::try_from(state).unwrap_or(pb::VmState::Unspecified) {
        pb::VmState::Unspecified => "unknown",
        pb::VmState::Created => "created",
        pb::VmState::Starting => "starting",
        pb::VmState::Running => "running",
        pb::VmState::Stopping => "stopping",
        pb::VmState::Stopped => "stopped",
        pb::VmState::Error => "error",
        pb::VmState::Paused => "paused",
    }
}

/// A VM's error reason as `vm show` prints it; empty when there is none.
fn error_reason_name(reason: i32) -> &'static str {
    match pb::VmErrorReason::try_from(reason).unwrap_or(pb::VmErrorReason::Unspecified) {
        pb::VmErrorReason::Unspecified => "",
        pb::VmErrorReason::VmmExited => "vmm_exited",
        pb::VmErrorReason::Interrupted => "interrupted",
        pb::VmErrorReason::StartFailed => "start_failed",
        pb::VmErrorReason::CreateLeftovers => "create_leftovers",
    }
}

fn time(ts: Option<&prost_types::Timestamp>) -> String {
    let Some(ts) = ts.filter(|t| t.seconds > 0) else { return String::new() };
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(ts.seconds as u64);
    humantime::format_rfc3339_seconds(when).to_string()
}

/// One line about a VM an operation acted on.
pub fn print_vm_line(vm: &pb::Vm, op: Option<&str>) {
    if json() {
        return crate::json::print_message(vm);
    }
    let op = op.map(|op| format!(" op={op}")).unwrap_or_default();
    println!("{} {} {}{op}", vm.name, vm.id, state_name(vm.state));
}

/// VMs as a table.
pub fn print_vm_table(vms: &[pb::Vm]) {
    if json() {
        return crate::json::print(&serde_json::Value::Array(vms.iter().map(crate::json::value).collect()));
    }
    println!("{:<24} {:<26} {:<9} {:>5} {:>7} {:>8}  IP", "NAME", "ID", "STATE", "VCPUS", "MEMORY", "PID");
    for vm in vms {
        let pid = vm.runtime.as_ref().map(|r| r.vmm_pid).filter(|p| *p != 0);
        let ip = vm.runtime.as_ref().map(|r| r.guest_ip.as_str()).filter(|ip| !ip.is_empty()).unwrap_or("-");
        println!(
            "{:<24} {:<26} {:<9} {:>5} {:>6}M {:>8}  {ip}",
            vm.name,
            vm.id,
            state_name(vm.state),
            vm.vcpus,
            vm.memory_mib,
            pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
        );
    }
}

/// One VM, field by field.
/// An egress policy as `vm create --egress` takes it.
fn egress_text(policy: Option<&pb::EgressPolicy>) -> String {
    let Some(policy) = policy else { return "internet".into() };
    match pb::EgressMode::try_from(policy.mode).unwrap_or(pb::EgressMode::Unspecified) {
        pb::EgressMode::None => "none".into(),
        pb::EgressMode::Allow => policy.allow.join(","),
        pb::EgressMode::Internet | pb::EgressMode::Unspecified => "internet".into(),
    }
}

pub fn print_vm_details(vm: &pb::Vm) {
    if json() {
        return crate::json::print_message(vm);
    }
    let runtime = vm.runtime.clone().unwrap_or_default();
    let rows = [
        ("name", vm.name.clone()),
        ("id", vm.id.clone()),
        ("state", state_name(vm.state).into()),
        ("desired state", state_name(vm.desired_state).into()),
        ("image", vm.image_id.clone()),
        ("vcpus", vm.vcpus.to_string()),
        ("memory", format!("{} MiB", vm.memory_mib)),
        (
            "disk size",
            if vm.disk_size_bytes == 0 { "the image's".into() } else { format!("{} MiB", vm.disk_size_bytes >> 20) },
        ),
        ("egress", egress_text(vm.egress.as_ref())),
        ("snapshot", vm.snapshot_id.clone()),
        ("last error", vm.last_error.clone()),
        ("error reason", error_reason_name(vm.last_error_reason).into()),
        ("last operation", vm.last_operation.clone()),
        ("created", time(vm.create_time.as_ref())),
        ("updated", time(vm.update_time.as_ref())),
        ("generation", vm.generation.to_string()),
        ("labels", vm.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")),
        ("expires", if vm.expire_time.is_some() { time(vm.expire_time.as_ref()) } else { String::new() }),
        ("vmm", runtime.vmm),
        ("vmm pid", if runtime.vmm_pid == 0 { "-".into() } else { runtime.vmm_pid.to_string() }),
        ("vm dir", runtime.vm_dir),
        ("console log", runtime.console_log_path),
        ("vmm log", runtime.vmm_log_path),
        ("api socket", runtime.api_socket_path),
        ("vsock", format!("{} (cid {})", runtime.vsock_path, runtime.vsock_cid)),
        ("root disk", format!("{} ({})", runtime.root_disk_path, runtime.root_disk)),
        ("ip", runtime.guest_ip.clone()),
        ("tap", runtime.tap.clone()),
    ];
    for (key, value) in rows {
        println!("{:<15} {}", format!("{key}:"), if value.is_empty() { "-".into() } else { value });
    }
}

/// Images as a table.
pub fn print_image_table(images: &[pb::Image]) {
    if json() {
        return crate::json::print(&serde_json::Value::Array(images.iter().map(crate::json::value).collect()));
    }
    println!("{:<24} {:<26} {:>10}  {:<19} SOURCE", "NAME", "ID", "ROOTFS", "DIGEST");
    for image in images {
        let (digest, source) = match &image.origin {
            Some(origin) => (short_digest(&origin.manifest_digest), origin.source.clone()),
            None => ("-".to_owned(), "boot files".to_owned()),
        };
        println!(
            "{:<24} {:<26} {:>9}M  {digest:<19} {source}",
            image.name,
            image.id,
            image.rootfs_size_bytes / (1024 * 1024)
        );
    }
}

/// One image, field by field.
pub fn print_image_details(image: &pb::Image) {
    if json() {
        return crate::json::print_message(image);
    }
    let rows = [
        ("name", image.name.clone()),
        ("id", image.id.clone()),
        ("kernel", image.kernel_path.clone()),
        ("initrd", image.initrd_path.clone()),
        ("rootfs", format!("{} ({} bytes)", image.rootfs_path, image.rootfs_size_bytes)),
        ("kernel args", image.kernel_args.clone()),
        ("created", time(image.create_time.as_ref())),
    ];
    for (key, value) in rows {
        println!("{:<12} {}", format!("{key}:"), if value.is_empty() { "-".into() } else { value });
    }
    let Some(origin) = &image.origin else {
        return;
    };
    let config = origin.config.clone().unwrap_or_default();
    let words = |words: &[String]| if words.is_empty() { "-".to_owned() } else { format!("{words:?}") };
    let rows = [
        ("source", origin.source.clone()),
        ("manifest", origin.manifest_digest.clone()),
        ("config", origin.config_digest.clone()),
        ("platform", origin.platform.clone()),
        ("entrypoint", words(&config.entrypoint)),
        ("cmd", words(&config.cmd)),
        ("workdir", config.working_dir.clone()),
        ("user", config.user.clone()),
    ];
    for (key, value) in rows {
        println!("{:<12} {}", format!("{key}:"), if value.is_empty() { "-".into() } else { value });
    }
    for variable in &config.env {
        println!("{:<12} {variable}", "env:");
    }
    println!("layers:");
    for layer in &origin.layers {
        println!("  {} {:>10} bytes  {}", layer.digest, layer.size_bytes, layer.media_type);
    }
}

/// Pools as a table.
pub fn print_pool_table(pools: &[pb::Pool]) {
    if json() {
        return crate::json::print(&serde_json::Value::Array(pools.iter().map(crate::json::value).collect()));
    }
    println!("{:<24} {:<26} {:>5} {:>5} {:>5} {:>8}", "NAME", "IMAGE", "SIZE", "READY", "VCPUS", "MEMORY");
    for pool in pools {
        println!(
            "{:<24} {:<26} {:>5} {:>5} {:>5} {:>7}M",
            pool.name, pool.image_id, pool.size, pool.ready, pool.vcpus, pool.memory_mib
        );
    }
}

/// One pool and its members.
pub fn print_pool_details(pool: &pb::Pool) {
    if json() {
        return crate::json::print_message(pool);
    }
    let rows = [
        ("name", pool.name.clone()),
        ("id", pool.id.clone()),
        ("image", pool.image_id.clone()),
        ("snapshot", pool.snapshot_id.clone()),
        ("shape", format!("{} vcpu, {} MiB, disk {} bytes", pool.vcpus, pool.memory_mib, pool.disk_size_bytes)),
        ("size", pool.size.to_string()),
        ("ready", pool.ready.to_string()),
        ("created", time(pool.create_time.as_ref())),
    ];
    for (key, value) in rows {
        println!("{:<9} {}", format!("{key}:"), if value.is_empty() { "-".into() } else { value });
    }
    println!("members:");
    for member in &pool.members {
        let memory = match member.memory_bytes {
            0 => "-".to_owned(),
            bytes => format!("{} MiB", bytes / (1024 * 1024)),
        };
        println!("  {:<32} {:<26} {:<9} {memory}", member.vm_name, member.vm_id, state_name(member.state));
    }
}

/// Snapshots, one per line.
pub fn print_snapshot_table(snapshots: &[pb::Snapshot]) {
    if json() {
        return crate::json::print(&serde_json::Value::Array(snapshots.iter().map(crate::json::value).collect()));
    }
    println!("{:<24} {:<24} {:>5} {:>8} {:>10} {:>9}", "NAME", "SOURCE VM", "VCPUS", "MEMORY", "DEPENDENTS", "STORED");
    for snapshot in snapshots {
        println!(
            "{:<24} {:<24} {:>5} {:>7}M {:>10} {:>8}M",
            snapshot.name,
            snapshot.source_vm_name,
            snapshot.vcpus,
            snapshot.memory_mib,
            snapshot.dependents,
            snapshot.stored_bytes / (1024 * 1024)
        );
    }
}

/// One snapshot.
pub fn print_snapshot_details(snapshot: &pb::Snapshot) {
    if json() {
        return crate::json::print_message(snapshot);
    }
    let labels: Vec<String> = snapshot.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let rows = [
        ("name", snapshot.name.clone()),
        ("id", snapshot.id.clone()),
        ("source", format!("{} ({})", snapshot.source_vm_name, snapshot.source_vm_id)),
        ("image", snapshot.image_id.clone()),
        (
            "shape",
            format!("{} vcpu, {} MiB, disk {} bytes", snapshot.vcpus, snapshot.memory_mib, snapshot.disk_size_bytes),
        ),
        ("stored", format!("{} MiB", snapshot.stored_bytes / (1024 * 1024))),
        ("dependents", snapshot.dependents.to_string()),
        ("agent", if snapshot.without_agent { "none: its VMs keep the source's identity" } else { "yes" }.into()),
        ("labels", labels.join(",")),
        ("created", time(snapshot.create_time.as_ref())),
    ];
    for (key, value) in rows {
        println!("{:<11} {}", format!("{key}:"), if value.is_empty() { "-".into() } else { value });
    }
}

/// `sha256:` and the first 12 hex digits.
fn short_digest(digest: &str) -> String {
    digest.get(..19).unwrap_or(digest).to_owned()
}

/// The host report: one line per check, then the drivers in use. True when a check failed.
pub fn print_host_report(report: &pb::GetHostResponse) -> bool {
    let failed = report.checks.iter().any(|c| c.status == pb::HostCheckStatus::Fail as i32);
    if json() {
        crate::json::print_message(report);
        return failed;
    }
    for check in &report.checks {
        let status = match pb::HostCheckStatus::try_from(check.status).unwrap_or(pb::HostCheckStatus::Unspecified) {
            pb::HostCheckStatus::Pass => "PASS",
            pb::HostCheckStatus::Warn => "WARN",
            pb::HostCheckStatus::Fail => "FAIL",
            pb::HostCheckStatus::Unspecified => "????",
        };
        println!("{status}  {:<14} {}", check.name, check.detail);
    }
    if let Some(choices) = &report.choices {
        println!();
        println!(
            "bangerd uses: vmm {} (accel {}), agent channel {}, root disks {}, cgroups {}",
            choices.vmm, choices.accel, choices.agent_channel, choices.root_disk, choices.cgroup
        );
        if !choices.accel_reason.is_empty() {
            println!("accel {}: {}", choices.accel, choices.accel_reason);
        }
    }
    if let Some(defaults) = &report.vm_defaults {
        println!("new VMs get (vm_defaults): {}", describe_defaults(defaults));
    }
    failed
}

/// `2 vCPUs, 512 MiB, a 20 GiB disk (at least)`.
pub fn describe_defaults(defaults: &pb::VmDefaults) -> String {
    let disk = match defaults.disk_size_bytes {
        0 => "the image's disk size".to_owned(),
        bytes => format!("a disk of at least {} MiB", bytes >> 20),
    };
    let plural = if defaults.vcpus == 1 { "" } else { "s" };
    format!("{} vCPU{plural}, {} MiB of memory, {disk}", defaults.vcpus, defaults.memory_mib)
}

fn code_name(code: Code) -> String {
    // `Code`'s Debug is CamelCase; print the canonical SCREAMING_SNAKE name.
    let camel = format!("{code:?}");
    let mut name = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// A failed call: code, message, field violations and op id.
pub fn print_status(status: &Status) {
    // A transport failure says why only in its causes (a TLS alert, a reset connection).
    let message = with_causes(status.message().to_owned(), status);
    eprintln!("banger: {}: {message}", code_name(status.code()));
    for (field, description) in field_violations(status) {
        eprintln!("  {field}: {description}");
    }
    if let Some(op) = error_op_id(status) {
        eprintln!("  op: {op}");
    }
    // The reason and its facts, for scripts: stable where the message's words are not.
    if let Some((reason, facts)) = banger_client::error_reason(status) {
        let mut facts: Vec<_> = facts.into_iter().filter(|(key, _)| key != "op_id").collect();
        facts.sort();
        let facts: Vec<String> = facts.into_iter().map(|(key, value)| format!("{key}={value}")).collect();
        eprintln!(
            "  reason: {reason}{}",
            if facts.is_empty() { String::new() } else { format!(" ({})", facts.join(" ")) }
        );
    }
}

/// `message`, then each cause of `error` it does not already say.
fn with_causes(mut message: String, error: &dyn std::error::Error) -> String {
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(&format!(": {text}"));
        }
        source = cause.source();
    }
    message
}

/// The daemon could not be reached.
pub fn print_connect_error(target: &Target, err: &ClientError) {
    let message = with_causes(err.to_string(), err);
    if err.permission_denied() {
        eprintln!("banger: PERMISSION_DENIED: {message}");
        eprintln!(
            "  bangerd serves {target}, but this user may not connect: the socket's group (socket_group in bangerd's \
             config) lets its members in, and [[auth.grants]] gives them a role; or use a TCP endpoint with a \
             certificate or token"
        );
        return;
    }
    if let ClientError::InvalidCredentials(_) = err {
        eprintln!("banger: INVALID_ARGUMENT: {message}");
        return;
    }
    eprintln!("banger: UNAVAILABLE: {message}");
    eprintln!("  is bangerd running? start it with `bangerd`, or point --socket/--endpoint at it ({target})");
}

/// One VM event as a line: revision, time, VM, what happened.
pub fn print_event(event: &pb::VmEvent) {
    if json() {
        crate::json::print_message(event);
        let _ = std::io::Write::flush(&mut std::io::stdout());
        return;
    }
    use pb::vm_event::Kind;
    let what = match &event.kind {
        Some(Kind::StateChange(change)) => match change.previous_state() {
            pb::VmState::Unspecified => format!("state {}", state_name(change.state)),
            previous => format!("state {} -> {}", state_name(previous as i32), state_name(change.state)),
        },
        Some(Kind::StageCompleted(stage)) => format!(
            "stage {}.{} {} ms (at {} ms) op={}",
            stage.operation, stage.stage, stage.since_last_stage_ms, stage.since_start_ms, stage.op_id
        ),
        Some(Kind::Deleted(_)) => "deleted".into(),
        None => "unknown event".into(),
    };
    println!("#{} {} {} {what}", event.revision, time(event.time.as_ref()), event.vm_name);
    let _ = std::io::Write::flush(&mut std::io::stdout());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_print_in_their_canonical_names() {
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(Code::Internal), "INTERNAL");
    }
}
