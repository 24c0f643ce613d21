//! Running a VM's processes (its VMM, its vsock backend) without root.
//!
//! Each VM has its own unprivileged identity: uid and gid `uid_base + vsock cid`, durable
//! because the cid is. A confined process is switched to it before it execs: no
//! supplementary groups, real, effective and saved ids all the VM's (so every capability is
//! gone), `no_new_privs`, and seccomp filters that refuse what a device model never needs
//! (mounts, namespaces however they are asked for, ptrace, module and kexec loading, bpf,
//! keyrings, changing ids, io_uring, the x32 system call numbers). A VMM adds its own filter
//! on top (QEMU's `-sandbox`).

use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch, sock_filter,
};

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

/// How many ids from `vm_uid_base` banger takes: VMs' uids and gids (`vm_uid_base` + vsock
/// cid, cids below 2^24; `vm_uid_base` itself is the images' group), then snapshots' groups
/// (`vm_uid_base` + 2^24 + their number).
pub const ID_RANGE: u64 = 2 << 24;

/// Checks that no user or group in `etc`'s `passwd` and `group`, and no subordinate id range
/// in its `subuid` and `subgid` (user namespaces' ids), falls among the ids banger takes
/// from `uid_base`: a VM's process would otherwise be that user, or share its files. Says
/// which entry, and a base past all of them.
pub fn check_id_range(uid_base: u32, etc: &std::path::Path) -> Result<(), String> {
    let ours = u64::from(uid_base)..u64::from(uid_base) + ID_RANGE;
    let mut taken: Vec<(String, std::ops::Range<u64>)> = Vec::new();
    for (file, id_field) in [("passwd", 2), ("group", 2)] {
        for line in std::fs::read_to_string(etc.join(file)).unwrap_or_default().lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if let Some(id) = fields.get(id_field).and_then(|id| id.parse::<u64>().ok()) {
                taken.push((
                    format!("{} {:?} ({file})", if file == "passwd" { "user" } else { "group" }, fields[0]),
                    id..id + 1,
                ));
            }
        }
    }
    for file in ["subuid", "subgid"] {
        for line in std::fs::read_to_string(etc.join(file)).unwrap_or_default().lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if let (Some(start), Some(count)) =
                (fields.get(1).and_then(|s| s.parse::<u64>().ok()), fields.get(2).and_then(|c| c.parse::<u64>().ok()))
            {
                taken.push((format!("{}'s subordinate ids in {file}", fields[0]), start..start + count));
            }
        }
    }
    let past_all = taken.iter().map(|(_, range)| range.end).filter(|end| *end < u64::from(u32::MAX / 2)).max();
    match taken.iter().find(|(_, range)| range.start < ours.end && ours.start < range.end) {
        None => Ok(()),
        Some((what, range)) => Err(format!(
            "vm_uid_base = {uid_base} takes ids {}..{} for VMs and snapshots, and {what} holds {}..{}: choose a \
             vm_uid_base past every user, group and subordinate range (e.g. {})",
            ours.start,
            ours.end,
            range.start,
            range.end,
            past_all.map(|end| end.div_ceil(100_000) * 100_000).unwrap_or(900_000)
        )),
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

/// The flags of `clone` that make a new namespace. Debian lets any user make a user
/// namespace, and with it capabilities inside; `unshare` and `setns` are refused whole, so a
/// `clone` asking for one is refused too (`EPERM`). Threads and plain forks pass.
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    // CLONE_NEWTIME, which the libc crate names for clone3 only.
    0x80,
];

/// System calls a confined process is told do not exist (`ENOSYS`), so that it falls back:
/// `clone3` passes its flags in memory, out of a filter's reach (glibc then uses `clone`, whose
/// flags are checked); io_uring runs operations no system call filter sees (QEMU then uses
/// its thread pool).
const UNIMPLEMENTED: &[i64] =
    &[libc::SYS_clone3, libc::SYS_io_uring_setup, libc::SYS_io_uring_enter, libc::SYS_io_uring_register];

/// The x32 ABI's system calls: numbers with this bit, on the x86-64 architecture, which a
/// filter keyed by x86-64 numbers would otherwise let through.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// The seccomp programs every confined process gets, in the order they are installed,
/// compiled once: the refusals (`EPERM`), the unimplemented (`ENOSYS`), and x32.
pub fn filter() -> Result<&'static [BpfProgram], String> {
    static FILTERS: OnceLock<Result<Vec<BpfProgram>, String>> = OnceLock::new();
    FILTERS.get_or_init(compile).as_ref().map(Vec::as_slice).map_err(Clone::clone)
}

fn compile() -> Result<Vec<BpfProgram>, String> {
    let error = |e: seccompiler::BackendError| e.to_string();
    let mut denied: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&syscall| (syscall, Vec::new())).collect();
    let namespace_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            let condition = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flag), flag)?;
            SeccompRule::new(vec![condition])
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(error)?;
    denied.insert(libc::SYS_clone, namespace_rules);
    let refused =
        SeccompFilter::new(denied, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), TargetArch::x86_64)
            .map_err(error)?;
    let unimplemented = SeccompFilter::new(
        UNIMPLEMENTED.iter().map(|&syscall| (syscall, Vec::new())).collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(error)?;
    Ok(vec![
        BpfProgram::try_from(refused).map_err(error)?,
        BpfProgram::try_from(unimplemented).map_err(error)?,
        x32_filter(),
    ])
}

/// `ENOSYS` for every system call number with [`X32_SYSCALL_BIT`] (the other filters check
/// the architecture, which x32 shares with x86-64).
fn x32_filter() -> BpfProgram {
    let statement = |code: u32, k: u32| sock_filter { code: code as u16, jt: 0, jf: 0, k };
    let nr_offset = 0; // `struct seccomp_data` starts with the number.
    vec![
        statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, nr_offset),
        sock_filter { code: (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16, jt: 0, jf: 1, k: X32_SYSCALL_BIT },
        statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Switches the calling process to `identity` and installs [`filter`]'s programs: what a
/// confined process runs between fork and exec. Only async-signal-safe system calls.
pub fn enter(identity: VmIdentity, extra_groups: &[u32], filters: &[BpfProgram]) -> std::io::Result<()> {
    use nix::unistd::{Gid, Uid, setresgid, setresuid};
    let (uid, gid) = (Uid::from_raw(identity.uid), Gid::from_raw(identity.gid));
    // SAFETY: a valid array of gid_t of that length; no allocation between fork and exec.
    if unsafe { libc::setgroups(extra_groups.len(), extra_groups.as_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    setresgid(gid, gid, gid).map_err(std::io::Error::from)?;
    // All three uids leave 0: the kernel clears the permitted and effective capabilities.
    setresuid(uid, uid, uid).map_err(std::io::Error::from)?;
    install(filters)
}

/// Installs the filters (each sets no_new_privs first: no exec can gain privileges again).
fn install(filters: &[BpfProgram]) -> std::io::Result<()> {
    for filter in filters {
        seccompiler::apply_filter(filter).map_err(|_| std::io::Error::last_os_error())?;
    }
    Ok(())
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
    fn the_vms_ids_may_not_be_a_users_a_groups_or_a_subordinate_range() {
        let etc = tempfile::tempdir().expect("tempdir");
        let write = |file: &str, text: &str| std::fs::write(etc.path().join(file), text).expect("write");
        write("passwd", "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n");
        write("group", "root:x:0:\nalice:x:1000:\n");
        assert_eq!(check_id_range(900_000, etc.path()), Ok(()), "no files for subordinate ids: none taken");
        write("subuid", "alice:100000:65536\n");
        write("subgid", "alice:100000:65536\n");
        assert_eq!(check_id_range(900_000, etc.path()), Ok(()));
        let overlap = check_id_range(150_000, etc.path()).expect_err("alice's subordinate ids");
        assert!(overlap.contains("alice's subordinate ids in subuid holds 100000..165536"), "{overlap}");
        assert!(overlap.contains("e.g. 200000"), "{overlap}");
        write("passwd", "svc:x:34000000:34000000::/:/bin/false\n");
        let user = check_id_range(900_000, etc.path()).expect_err("a user among the snapshots' groups");
        assert!(user.contains("user \"svc\" (passwd)"), "{user}");
        write("passwd", "");
        write("group", "vms:x:920000:\n");
        assert!(check_id_range(900_000, etc.path()).expect_err("a group").contains("group \"vms\""));
    }

    #[test]
    fn the_filter_compiles() {
        assert_eq!(filter().expect("valid filters").len(), 3);
    }

    /// What the system calls a confined process might escape with return under the filters,
    /// in a forked child (the filters are for good: the test process must not get them).
    #[test]
    fn a_confined_process_cannot_make_namespaces_use_clone3_io_uring_or_x32_and_still_forks() {
        let filters = filter().expect("filters");
        // Each result is one byte of the child's exit code's bits: 1 when as expected.
        // SAFETY: the child makes only system calls and `_exit`s (the test process has
        // threads: nothing that allocates or locks runs between fork and exit).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            let mut failed = 0;
            if install(filters).is_err() {
                unsafe { libc::_exit(100) };
            }
            // clone(CLONE_NEWUSER), and the same with a harmless flag beside it.
            let user = unsafe { libc::syscall(libc::SYS_clone, libc::CLONE_NEWUSER | libc::SIGCHLD, 0, 0, 0, 0) };
            if user != -1 || errno() != libc::EPERM {
                failed |= 1;
            }
            let net = unsafe {
                libc::syscall(libc::SYS_clone, libc::CLONE_NEWNET | libc::CLONE_FILES | libc::SIGCHLD, 0, 0, 0, 0)
            };
            if net != -1 || errno() != libc::EPERM {
                failed |= 2;
            }
            let args = [0u64; 11];
            let clone3 = unsafe { libc::syscall(libc::SYS_clone3, args.as_ptr(), std::mem::size_of_val(&args)) };
            if clone3 != -1 || errno() != libc::ENOSYS {
                failed |= 4;
            }
            let params = [0u8; 120];
            let ring = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, params.as_ptr()) };
            if ring != -1 || errno() != libc::ENOSYS {
                failed |= 8;
            }
            let x32 = unsafe { libc::syscall(libc::SYS_getpid | X32_SYSCALL_BIT as i64) };
            if x32 != -1 || errno() != libc::ENOSYS {
                failed |= 16;
            }
            // A plain fork still works (QEMU and the backend start threads and helpers).
            let child = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
            if child == 0 {
                unsafe { libc::_exit(0) };
            }
            if child < 0 {
                failed |= 32;
            } else {
                let mut status = 0;
                unsafe { libc::waitpid(child as i32, &mut status, 0) };
            }
            unsafe { libc::_exit(failed) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "the child was killed: {status:#x}");
        let failed = libc::WEXITSTATUS(status);
        let names = ["clone(NEWUSER)", "clone(NEWNET)", "clone3", "io_uring_setup", "x32 getpid", "plain fork"];
        let wrong: Vec<&str> =
            names.iter().enumerate().filter(|(bit, _)| failed & (1 << bit) != 0).map(|(_, n)| *n).collect();
        assert!(failed != 100, "the filters could not be installed");
        assert!(wrong.is_empty(), "not refused as expected under the filters: {wrong:?}");
    }
}
