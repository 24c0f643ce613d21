//! Generated protobuf types and gRPC stubs for banger's public API (`banger.v1`)
//! and its host-to-guest agent protocol (`banger.agent.v1`).
#![allow(clippy::all, missing_docs)]

/// The public API served by `bangerd`.
pub mod v1 {
    tonic::include_proto!("banger.v1");
}

/// The protocol between `bangerd` and the guest agent.
pub mod agent {
    /// Version 1 of the agent protocol.
    pub mod v1 {
        tonic::include_proto!("banger.agent.v1");
    }
}

/// An error and its causes as `outer: inner: innermost`: the one way every crate of the
/// workspace (daemon, CLI, agent, all of which depend on this one) says an error in full.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Encoded `FileDescriptorSet` of the public API (`banger.v1` and what it imports), for
/// server reflection; the agent protocol is not in it, since bangerd does not serve it.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("banger_descriptor");
