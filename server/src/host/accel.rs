//! `accel = "auto"`: KVM where a guest kernel boots under it on this host, TCG otherwise.
//!
//! `/dev/kvm` existing is not enough: a host may offer KVM that stock kernels cannot boot
//! under (PVM, some nested setups). So the default image's kernel is booted under KVM once,
//! the way guests are (`vmm::qemu::probe_kvm`), and the outcome is kept in a host-wide cache
//! keyed by everything it depends on: the host's kernel, machine and QEMU, and the guest
//! kernel's content. A daemon starting on the same host with the same inputs reads it
//! instead of probing again.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::{confine::VmIdentity, vmm::Accel};

/// Where the probe's outcome is kept: one file per host, for every daemon on it.
pub const DEFAULT_CACHE_FILE: &str = "/var/cache/banger/accel.json";

/// The accelerator chosen, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelDecision {
    /// What guests use.
    pub accel: Accel,
    /// Why, in a sentence (for `doctor` and the startup log).
    pub reason: String,
}

/// What the probe's outcome depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ProbeKey {
    host_kernel: String,
    machine_id: String,
    qemu: String,
    guest_kernel_sha256: String,
}

/// The cache file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Cached {
    key: ProbeKey,
    kvm: bool,
    reason: String,
}

/// What deciding needs.
#[derive(Debug, Clone)]
pub struct ProbeInputs {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// The guest kernel to boot (the default image's).
    pub kernel: PathBuf,
    /// Who the probe's QEMU runs as.
    pub identity: VmIdentity,
    /// Where its output goes while it runs (removed after).
    pub log: PathBuf,
    /// The cache file.
    pub cache: PathBuf,
}

/// The accelerator for `configured` (None: auto).
pub async fn decide(configured: Option<Accel>, inputs: &ProbeInputs) -> AccelDecision {
    match configured {
        Some(Accel::Tcg) => return decision(Accel::Tcg, "accel = \"tcg\" in the config"),
        Some(Accel::Kvm) => return decision(Accel::Kvm, "accel = \"kvm\" in the config"),
        None => {}
    }
    if !Path::new(super::vmm::KVM_DEVICE).exists() {
        return decision(Accel::Tcg, "auto: no /dev/kvm on this host, so software emulation (TCG)");
    }
    let Some(key) = probe_key(inputs).await else {
        return decision(
            Accel::Tcg,
            format!("auto: no guest kernel at {} to try KVM with, so TCG for now", inputs.kernel.display()),
        );
    };
    if let Some(cached) = read_cache(&inputs.cache).filter(|cached| cached.key == key) {
        return from_outcome(cached.kvm, &cached.reason, true);
    }
    tracing::info!(kernel = %inputs.kernel.display(), "accel auto: booting the guest kernel under KVM once, to see whether guests can use it");
    let outcome = super::vmm::probe_kvm(&inputs.qemu, &inputs.kernel, inputs.identity, &inputs.log).await;
    let _ = std::fs::remove_file(&inputs.log);
    let (kvm, reason, conclusive) = match outcome {
        Ok(took) => (true, format!("a guest kernel booted under KVM in {} ms", took.as_millis()), true),
        Err(failure) => (false, failure.reason, failure.conclusive),
    };
    // A probe that could not try (the device busy, a spawn error) is tried again next start.
    if conclusive {
        write_cache(&inputs.cache, &Cached { key, kvm, reason: reason.clone() });
    }
    from_outcome(kvm, &reason, false)
}

fn decision(accel: Accel, reason: impl Into<String>) -> AccelDecision {
    AccelDecision { accel, reason: reason.into() }
}

fn from_outcome(kvm: bool, reason: &str, cached: bool) -> AccelDecision {
    let when = if cached { "probed before on this host" } else { "probed now" };
    match kvm {
        true => decision(Accel::Kvm, format!("auto: {reason} ({when})")),
        false => decision(Accel::Tcg, format!("auto: KVM cannot boot guests here, so TCG: {reason} ({when})")),
    }
}

async fn probe_key(inputs: &ProbeInputs) -> Option<ProbeKey> {
    let kernel = tokio::fs::read(&inputs.kernel).await.ok()?;
    let qemu = super::command::resolve_program(&inputs.qemu)?;
    let qemu_version = super::command::run(&qemu, &["--version".into()]).await.unwrap_or_default();
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default().trim().to_owned();
    Some(ProbeKey {
        host_kernel: read("/proc/sys/kernel/osrelease"),
        machine_id: read("/etc/machine-id"),
        qemu: format!("{} {}", qemu.display(), String::from_utf8_lossy(&qemu_version).lines().next().unwrap_or("")),
        guest_kernel_sha256: hex::encode(sha2::Sha256::digest(&kernel)),
    })
}

fn read_cache(path: &Path) -> Option<Cached> {
    // Small and root's: a file that is neither is ignored (and probed over).
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.is_file()
        || meta.len() > 64 * 1024
        || std::os::unix::fs::MetadataExt::uid(&meta) != nix::unistd::geteuid().as_raw()
    {
        return None;
    }
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn write_cache(path: &Path, cached: &Cached) {
    let written = (|| {
        if let Some(dir) = path.parent() {
            super::fs::make_dir(dir, 0o755)?;
        }
        let json = serde_json::to_vec_pretty(cached)
            .map_err(|e| super::HostError::Io { what: "the accel cache".into(), source: std::io::Error::other(e) })?;
        super::fs::replace_file(path, 0o644, |file, temp| {
            std::io::Write::write_all(file, &json).map_err(super::file_error("write", temp))
        })
    })();
    if let Err(err) = written {
        tracing::warn!(path = %path.display(), error = %banger_proto::error_chain(&err), "cannot keep the KVM probe's outcome: the next start probes again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(dir: &Path) -> ProbeInputs {
        ProbeInputs {
            qemu: "/bin/true".into(),
            kernel: dir.join("vmlinuz"),
            identity: VmIdentity { uid: 900_002, gid: 900_002 },
            log: dir.join("probe.log"),
            cache: dir.join("cache/accel.json"),
        }
    }

    #[tokio::test]
    async fn the_config_wins_and_a_cached_outcome_for_the_same_inputs_is_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inputs = inputs(dir.path());
        assert_eq!(decide(Some(Accel::Tcg), &inputs).await.accel, Accel::Tcg);
        assert_eq!(decide(Some(Accel::Kvm), &inputs).await.accel, Accel::Kvm);
        if !Path::new(super::super::vmm::KVM_DEVICE).exists() {
            let auto = decide(None, &inputs).await;
            assert_eq!(auto.accel, Accel::Tcg);
            assert!(auto.reason.contains("no /dev/kvm"), "{}", auto.reason);
            return;
        }
        // No kernel to probe with: TCG, nothing cached.
        let auto = decide(None, &inputs).await;
        assert_eq!(auto.accel, Accel::Tcg);
        assert!(auto.reason.contains("no guest kernel"), "{}", auto.reason);
        assert!(!inputs.cache.exists());
        // A cached outcome for exactly these inputs is taken as it is, without a probe.
        std::fs::write(&inputs.kernel, b"a kernel").expect("kernel");
        let key = probe_key(&inputs).await.expect("key");
        write_cache(&inputs.cache, &Cached { key: key.clone(), kvm: true, reason: "it booted in 5 ms".into() });
        let cached = decide(None, &inputs).await;
        assert_eq!(cached.accel, Accel::Kvm);
        assert!(
            cached.reason.contains("it booted in 5 ms") && cached.reason.contains("probed before"),
            "{}",
            cached.reason
        );
        // Another kernel is another key: the cached outcome does not apply to it.
        std::fs::write(&inputs.kernel, b"another kernel").expect("kernel");
        assert_ne!(probe_key(&inputs).await.expect("key"), key);
    }
}
