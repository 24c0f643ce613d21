//! `--output json`: the API's messages in protobuf's JSON mapping (lowerCamelCase fields,
//! enum names, RFC 3339 timestamps, 64-bit integers as strings), as grpcurl prints them, so
//! scripts can use the same field names with either.

use banger_client::pb;
use serde_json::{Map, Value, json};

fn timestamp(ts: Option<&prost_types::Timestamp>) -> Value {
    match ts {
        Some(ts) => {
            let when = std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(ts.seconds.max(0) as u64)
                + std::time::Duration::from_nanos(ts.nanos.max(0) as u64);
            Value::String(humantime::format_rfc3339_millis(when).to_string())
        }
        None => Value::Null,
    }
}

fn state(value: i32) -> Value {
    Value::String(pb::VmState::try_from(value).unwrap_or(pb::VmState::Unspecified).as_str_name().to_owned())
}

fn labels(labels: &std::collections::BTreeMap<String, String>) -> Value {
    Value::Object(labels.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect())
}

/// A VM.
pub fn vm(vm: &pb::Vm) -> Value {
    let runtime = vm.runtime.clone().unwrap_or_default();
    json!({
        "id": vm.id,
        "name": vm.name,
        "imageId": vm.image_id,
        "vcpus": vm.vcpus,
        "memoryMib": vm.memory_mib,
        "state": state(vm.state),
        "desiredState": state(vm.desired_state),
        "lastError": vm.last_error,
        "lastOperation": vm.last_operation,
        "createTime": timestamp(vm.create_time.as_ref()),
        "updateTime": timestamp(vm.update_time.as_ref()),
        "expireTime": timestamp(vm.expire_time.as_ref()),
        "generation": vm.generation.to_string(),
        "labels": labels(&vm.labels),
        "runtime": {
            "vmDir": runtime.vm_dir,
            "consoleLogPath": runtime.console_log_path,
            "vmmLogPath": runtime.vmm_log_path,
            "apiSocketPath": runtime.api_socket_path,
            "vsockPath": runtime.vsock_path,
            "vsockCid": runtime.vsock_cid,
            "vmmPid": runtime.vmm_pid,
            "vmm": runtime.vmm,
            "rootDisk": runtime.root_disk,
            "rootDiskPath": runtime.root_disk_path,
            "guestIp": runtime.guest_ip,
            "tap": runtime.tap,
        },
    })
}

/// An image.
pub fn image(image: &pb::Image) -> Value {
    json!({
        "id": image.id,
        "name": image.name,
        "kernelPath": image.kernel_path,
        "initrdPath": image.initrd_path,
        "rootfsPath": image.rootfs_path,
        "kernelArgs": image.kernel_args,
        "rootfsSizeBytes": image.rootfs_size_bytes.to_string(),
        "createTime": timestamp(image.create_time.as_ref()),
        "labels": labels(&image.labels),
    })
}

/// A VM event.
pub fn event(event: &pb::VmEvent) -> Value {
    use pb::vm_event::Kind;
    let mut object = Map::new();
    object.insert("revision".into(), Value::String(event.revision.to_string()));
    object.insert("vmId".into(), Value::String(event.vm_id.clone()));
    object.insert("vmName".into(), Value::String(event.vm_name.clone()));
    object.insert("time".into(), timestamp(event.time.as_ref()));
    match &event.kind {
        Some(Kind::StateChange(change)) => {
            object.insert(
                "stateChange".into(),
                json!({"state": state(change.state), "previousState": state(change.previous_state)}),
            );
        }
        Some(Kind::StageCompleted(stage)) => {
            object.insert(
                "stageCompleted".into(),
                json!({
                    "operation": stage.operation,
                    "opId": stage.op_id,
                    "stage": stage.stage,
                    "sinceStartMs": stage.since_start_ms.to_string(),
                    "sinceLastStageMs": stage.since_last_stage_ms.to_string(),
                }),
            );
        }
        Some(Kind::Deleted(_)) => {
            object.insert("deleted".into(), json!({}));
        }
        None => {}
    }
    Value::Object(object)
}

/// The host report.
pub fn host(report: &pb::GetHostResponse) -> Value {
    let checks: Vec<Value> = report
        .checks
        .iter()
        .map(|check| {
            let status = pb::HostCheckStatus::try_from(check.status).unwrap_or(pb::HostCheckStatus::Unspecified);
            json!({"name": check.name, "status": status.as_str_name(), "detail": check.detail})
        })
        .collect();
    let choices = report.choices.clone().unwrap_or_default();
    json!({
        "checks": checks,
        "choices": {
            "vmm": choices.vmm,
            "accel": choices.accel,
            "agentChannel": choices.agent_channel,
            "rootDisk": choices.root_disk,
            "cgroup": choices.cgroup,
        },
    })
}

/// Prints one value as a line of JSON.
pub fn print(value: &Value) {
    println!("{value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vms_use_protobuf_json_names_enum_names_and_string_64_bit_integers() {
        let vm = pb::Vm {
            id: "01J".into(),
            name: "web".into(),
            state: pb::VmState::Running as i32,
            generation: 7,
            labels: [("team".to_owned(), "ci".to_owned())].into(),
            create_time: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 }),
            ..Default::default()
        };
        let value = super::vm(&vm);
        assert_eq!(value["name"], "web");
        assert_eq!(value["state"], "VM_STATE_RUNNING");
        assert_eq!(value["generation"], "7");
        assert_eq!(value["labels"]["team"], "ci");
        assert_eq!(value["createTime"], "2023-11-14T22:13:20.000Z");
        assert_eq!(value["expireTime"], Value::Null);
        assert!(value["runtime"].is_object());
    }
}
