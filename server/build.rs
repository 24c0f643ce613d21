//! Rebuilds the daemon when a migration is added (`sqlx::migrate!` does not notice new
//! files), and finds Firecracker's published API description for the contract tests
//! (`tests/firecracker_contract.rs`). It is third-party text and not in this repository:
//! `BANGER_FIRECRACKER_API=/path/to/firecracker.yaml`, else `../shared/reference/` beside the
//! checkout. Found, the tests run against it (`cfg(firecracker_api)`); absent, they are
//! ignored with a `SKIPPED` reason, never passed.

use std::path::PathBuf;

const FILE_NAME: &str = "firecracker-1.17-api.yaml";

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
    println!("cargo:rustc-check-cfg=cfg(firecracker_api)");
    println!("cargo:rerun-if-env-changed=BANGER_FIRECRACKER_API");
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let candidate = match std::env::var_os("BANGER_FIRECRACKER_API") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => manifest_dir.join("../../shared/reference").join(FILE_NAME),
    };
    if candidate.is_file() {
        println!("cargo:rerun-if-changed={}", candidate.display());
        println!("cargo:rustc-cfg=firecracker_api");
        println!("cargo:rustc-env=BANGER_FIRECRACKER_API={}", candidate.display());
    } else {
        // Nothing to watch: a missing path would make cargo run this script on every build,
        // and a directory above it is scanned whole (the checkout with its target/). Setting
        // the variable, or touching this file, has the description looked for again.
        println!(
            "cargo:warning=SKIPPED: the Firecracker contract tests: {} is absent; set BANGER_FIRECRACKER_API to \
             Firecracker 1.17's src/firecracker/swagger/firecracker.yaml to run them",
            candidate.display()
        );
    }
}
