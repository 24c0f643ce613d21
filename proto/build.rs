//! Compiles `banger/v1` and `banger/agent/v1` with protox (pure Rust, no system protoc).
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=banger");
    let files = [
        "banger/v1/vm.proto",
        "banger/v1/image.proto",
        "banger/v1/host.proto",
        "banger/v1/pool.proto",
        "banger/v1/snapshot.proto",
        "banger/agent/v1/agent.proto",
    ];
    let descriptors = protox::compile(files, ["."])?;
    // Reflection describes what bangerd serves: the public API, not the guest agent's protocol.
    let mut public = descriptors.clone();
    public.file.retain(|file| file.package() != "banger.agent.v1");
    std::fs::write(out.join("banger_descriptor.bin"), prost::Message::encode_to_vec(&public))?;
    // Maps as BTreeMap: encoding is deterministic (idempotent requests compare encoded bodies).
    // Type names (`prost::Name`): the CLI prints any message as JSON from its descriptor.
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure().btree_map(".").compile_fds_with_config(descriptors, config)?;
    Ok(())
}
