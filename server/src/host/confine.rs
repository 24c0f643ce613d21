//! Running a VM's processes (its VMM, its vsock backend) without root.
//!
//! Each VM has its own unprivileged identity: uid and gid `uid_base + vsock cid`, durable
//! because the cid is. A confined process is switched to it before it execs: no
//! supplementary groups, real, effective and saved ids all the VM's (so every capability is
//! gone), `no_new_privs`, and a seccomp filter that refuses what a device model never needs
//! (mounts, namespaces, ptrace, module and kexec loading, bpf, keyrings, changing ids). A
//! VMM adds its own filter on top (QEMU's `-sandbox`).

use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// The unprivileged identity a VM's processes run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmIdentity {
    /// Its uid.
    pub uid: u32,
    /// Its gid (the same number).
    pub gid: u32,
}

impl VmIdentity {
    /// The identity of the VM with vsock context id `cid`; `None` if it overflows a uid.
    pub fn of(uid_base: u32, cid: u32) -> Option<Self> {
        let id = uid_base.checked_add(cid)?;
        Some(Self { uid: id, gid: id })
    }
}

/// System calls a confined process is refused (`EPERM`): none of them has a use in a VMM
/// or a vsock backend, each is a step of an escape or of an attack on the host.
const DENIED: &[i64] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_adjtimex,
    libc::SYS_clock_adjtime,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_setgroups,
    libc::SYS_personality,
];

/// The seccomp program every confined process gets, compiled once.
pub fn filter() -> Result<&'static BpfProgram, String> {
    static FILTER: OnceLock<Result<BpfProgram, String>> = OnceLock::new();
    FILTER
        .get_or_init(|| {
            let rules = DENIED.iter().map(|&syscall| (syscall, Vec::new())).collect();
            let filter = SeccompFilter::new(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(libc::EPERM as u32),
                TargetArch::x86_64,
            )
            .map_err(|e| e.to_string())?;
            BpfProgram::try_from(filter).map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Switches the calling process to `identity` and installs [`filter`]: what a confined
/// process runs between fork and exec. Only async-signal-safe system calls.
pub fn enter(identity: VmIdentity, extra_groups: &[u32], filter: &BpfProgram) -> std::io::Result<()> {
    use nix::unistd::{Gid, Uid, setresgid, setresuid};
    let (uid, gid) = (Uid::from_raw(identity.uid), Gid::from_raw(identity.gid));
    // SAFETY: a valid array of gid_t of that length; no allocation between fork and exec.
    if unsafe { libc::setgroups(extra_groups.len(), extra_groups.as_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    setresgid(gid, gid, gid).map_err(std::io::Error::from)?;
    // All three uids leave 0: the kernel clears the permitted and effective capabilities.
    setresuid(uid, uid, uid).map_err(std::io::Error::from)?;
    // Sets no_new_privs first: no exec can gain privileges again.
    seccompiler::apply_filter(filter).map_err(|_| std::io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_per_vsock_cid_and_never_overflow() {
        assert_eq!(VmIdentity::of(900_000, 3), Some(VmIdentity { uid: 900_003, gid: 900_003 }));
        assert_ne!(VmIdentity::of(900_000, 3), VmIdentity::of(900_000, 4));
        assert_eq!(VmIdentity::of(u32::MAX, 1), None);
    }

    #[test]
    fn the_filter_compiles() {
        assert!(!filter().expect("a valid filter").is_empty());
    }
}
