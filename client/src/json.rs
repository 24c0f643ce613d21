//! `--output json`: any message of the API in protobuf's JSON mapping (lowerCamelCase names,
//! enum names, RFC 3339 timestamps, 64-bit integers as strings, fields at their default left
//! out), as grpcurl prints it. prost-reflect serializes it from the API's own descriptors, so
//! every message, and every field added later, comes out right with no code here.

use std::sync::LazyLock;

use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::Value;

static API: LazyLock<DescriptorPool> =
    LazyLock::new(|| DescriptorPool::decode(banger_proto::FILE_DESCRIPTOR_SET).expect("the API's descriptors decode"));

/// `message` as JSON.
pub fn value<M: prost::Message + prost::Name>(message: &M) -> Value {
    let descriptor = API
        .get_message_by_name(&M::full_name())
        .unwrap_or_else(|| panic!("{} is not in the API's descriptors", M::full_name()));
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .expect("a message decodes from its own encoding");
    serde_json::to_value(&dynamic).expect("a message serializes as JSON")
}

/// Prints one value as a line of JSON.
pub fn print(value: &Value) {
    println!("{value}");
}

/// Prints one message as a line of JSON.
pub fn print_message<M: prost::Message + prost::Name>(message: &M) {
    print(&value(message));
}

#[cfg(test)]
mod tests {
    use banger_client::pb;

    use super::*;

    #[test]
    fn messages_use_protobuf_json_names_enum_names_and_string_64_bit_integers() {
        let vm = pb::Vm {
            id: "01J".into(),
            name: "web".into(),
            state: pb::VmState::Running as i32,
            last_error_reason: pb::VmErrorReason::VmmExited as i32,
            generation: 7,
            labels: [("team".to_owned(), "ci".to_owned())].into(),
            create_time: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 }),
            runtime: Some(pb::VmRuntime { vmm_pid: 42, ..Default::default() }),
            ..Default::default()
        };
        let value = value(&vm);
        assert_eq!(value["name"], "web");
        assert_eq!(value["state"], "VM_STATE_RUNNING");
        assert_eq!(value["lastErrorReason"], "VM_ERROR_REASON_VMM_EXITED");
        assert_eq!(value["generation"], "7");
        assert_eq!(value["labels"]["team"], "ci");
        assert_eq!(value["createTime"], "2023-11-14T22:13:20Z");
        assert_eq!(value["runtime"]["vmmPid"], 42);
        assert!(value.get("expireTime").is_none() && value.get("lastError").is_none(), "defaults left out");
    }

    #[test]
    fn events_and_the_host_report_are_messages_like_any_other() {
        use pb::vm_event::Kind;
        let event = pb::VmEvent {
            revision: 12,
            vm_name: "web".into(),
            kind: Some(Kind::StageCompleted(pb::VmStageCompleted {
                stage: "tap".into(),
                since_start_ms: 5,
                ..Default::default()
            })),
            ..Default::default()
        };
        let value = value(&event);
        assert_eq!(value["revision"], "12");
        assert_eq!(value["stageCompleted"]["stage"], "tap");
        assert_eq!(value["stageCompleted"]["sinceStartMs"], "5");
    }
}
