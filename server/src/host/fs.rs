//! Files and directories the daemon keeps (a VM's directory, an image's, the logs of failed
//! creates) and the source files a caller names, through tokio's file system API: `ops` never
//! blocks the runtime on a file, and never touches one but through here.

use std::path::{Path, PathBuf};

use super::{HostError, confine::VmIdentity, file_error};
use crate::domain::VmPaths;

/// Where guest memory files live by default: the host's shared-memory tmpfs.
pub const DEFAULT_MEMORY_DIR: &str = "/dev/shm/banger";

/// Renames `from` to `to` (one file system).
pub async fn rename(from: &Path, to: &Path) -> Result<(), HostError> {
    tokio::fs::rename(from, to).await.map_err(file_error("rename", from))
}

/// The bytes a file takes on its file system (its allocated blocks); 0 when it is absent.
pub async fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    tokio::fs::symlink_metadata(path).await.map(|meta| meta.blocks() * 512).unwrap_or(0)
}

/// Creates `dir` and whichever of its parents are missing, each given `mode` by a chmod
/// after its mkdir (a create mode is masked by the daemon's umask 077, and a directory made
/// by an older build must not decide what a new one gets); an existing `dir` is given `mode`
/// too. `dir` itself is never a link: one in its place is refused.
pub async fn create_dir(dir: &Path, mode: u32) -> Result<(), HostError> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || make_dir(&dir, mode))
        .await
        .map_err(|e| HostError::Io { what: "create a directory".into(), source: std::io::Error::other(e) })?
}

/// [`create_dir`] for callers that may block (startup, `host/` code off the runtime).
pub fn make_dir(dir: &Path, mode: u32) -> Result<(), HostError> {
    let missing: Vec<&Path> =
        dir.ancestors().take_while(|p| !p.as_os_str().is_empty() && std::fs::symlink_metadata(p).is_err()).collect();
    for made in missing.iter().rev() {
        match std::fs::create_dir(made) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(file_error("create", made)(e)),
            _ => {}
        }
        if *made != dir {
            chmod_dir(made, mode)?;
        }
    }
    chmod_dir(dir, mode).map(drop)
}

/// Sets `dir`'s mode through a descriptor opened without following a link; returns what it
/// was before.
fn chmod_dir(dir: &Path, mode: u32) -> Result<std::fs::Metadata, HostError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(file_error("open", dir))?;
    let before = opened.metadata().map_err(file_error("stat", dir))?;
    opened.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(file_error("chmod", dir))?;
    Ok(before)
}

/// Creates (or takes again) a directory of the daemon's in a place others share, such as
/// `/dev/shm`, and sets `mode` on it: refused, naming it, when it (or a directory above it)
/// is a link or a directory someone other than root or the daemon owns, or when it is
/// writable by others than its owner (an ancestor only when sticky, as `/dev/shm` and
/// `/tmp` are). Another user could otherwise have made it first and swap the files in it.
pub fn make_trusted_dir(dir: &Path, mode: u32) -> Result<(), HostError> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let untrusted = |path: &Path, why: String| HostError::Untrusted { path: path.to_owned(), why };
    for above in dir.ancestors().skip(1).filter(|p| !p.as_os_str().is_empty()) {
        let meta = match std::fs::symlink_metadata(above) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            other => other.map_err(file_error("stat", above))?,
        };
        if meta.uid() != 0 && meta.uid() != me {
            return Err(untrusted(above, format!("it is owned by uid {}", meta.uid())));
        }
        if meta.is_dir() && meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0 {
            return Err(untrusted(above, format!("others may write to it (mode {:04o})", meta.mode() & 0o7777)));
        }
    }
    let existed = std::fs::symlink_metadata(dir).is_ok();
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty() && std::fs::symlink_metadata(p).is_err()) {
        make_dir(parent, 0o711)?;
    }
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(file_error("create", dir)(e)),
        _ => {}
    }
    let meta = std::fs::symlink_metadata(dir).map_err(file_error("stat", dir))?;
    if !meta.is_dir() {
        return Err(untrusted(dir, "it is not a directory (a link or a file is in its place)".into()));
    }
    if meta.uid() != me {
        return Err(untrusted(dir, format!("it is owned by uid {}, not the daemon's {me}", meta.uid())));
    }
    if existed && meta.mode() & 0o022 != 0 {
        return Err(untrusted(dir, format!("others may write to it (mode {:04o})", meta.mode() & 0o7777)));
    }
    chmod_dir(dir, mode).map(drop)
}

/// Replaces `path` by a rename over it, so that a reader finds the old file or the new one,
/// never half of one: a new file beside it (exclusive, never through a link), given `mode`
/// (set, not masked by the umask), filled by `fill`, then renamed; removed if anything failed.
pub fn replace_file(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut std::fs::File, &Path) -> Result<(), HostError>,
) -> Result<(), HostError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".{}.tmp", ulid::Ulid::generate()));
    let temp = path.with_file_name(name);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp)
            .map_err(file_error("create", &temp))?;
        file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(file_error("chmod", &temp))?;
        fill(&mut file, &temp)?;
        std::fs::rename(&temp, path).map_err(file_error("rename", &temp))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

/// Who may own a file in a VM's directory that the daemon opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmFileOwner {
    /// The daemon only (`handles.json`: it names what the daemon kills and removes).
    Daemon,
    /// The daemon or the VM's own uid (the console log, which the VMM writes).
    DaemonOrVm,
}

/// Opens a file in a VM's directory, where the VM's processes may add files: through the
/// directory's descriptor, never following a link, never blocking on a FIFO (`O_NONBLOCK`),
/// and only when `fstat` shows a regular file of an owner `owner` allows (the VM's uid is
/// the directory's group) with one link. A second link is allowed on a file of the daemon's
/// (a jailed Firecracker's `vmm.log`, linked into its jail): with `fs.protected_hardlinks` a
/// VM's uid cannot link a file it does not own. `None` when the file is absent; refused
/// otherwise (`Untrusted`), and the caller logs and skips it.
pub fn open_vm_file(path: &Path, write: bool, owner: VmFileOwner) -> Result<Option<std::fs::File>, HostError> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(HostError::Untrusted { path: path.to_owned(), why: "not a file in a directory".into() });
    };
    let dir_file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        opened => opened.map_err(file_error("open", dir))?,
    };
    let dir_meta = dir_file.metadata().map_err(file_error("stat", dir))?;
    let name = std::ffi::CString::new(name.as_bytes())
        .map_err(|_| HostError::Untrusted { path: path.to_owned(), why: "a NUL in its name".into() })?;
    let access = if write { libc::O_WRONLY } else { libc::O_RDONLY };
    let flags = access | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: a valid directory descriptor and NUL-terminated name; the result is checked.
    let fd = unsafe { libc::openat(dir_file.as_raw_fd(), name.as_ptr(), flags) };
    if fd < 0 {
        let error = std::io::Error::last_os_error();
        return match error.kind() {
            std::io::ErrorKind::NotFound => Ok(None),
            _ => {
                Err(HostError::Untrusted { path: path.to_owned(), why: format!("cannot be opened as a file: {error}") })
            }
        };
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let meta = file.metadata().map_err(file_error("stat", path))?;
    let daemon = nix::unistd::geteuid().as_raw();
    let owned = meta.uid() == daemon || (owner == VmFileOwner::DaemonOrVm && meta.uid() == dir_meta.gid());
    let why = if !meta.is_file() {
        Some("not a regular file".to_owned())
    } else if !owned {
        Some(format!("owned by uid {}", meta.uid()))
    } else if meta.nlink() != 1 && meta.uid() != daemon {
        Some(format!("{} links", meta.nlink()))
    } else {
        None
    };
    match why {
        Some(why) => Err(HostError::Untrusted { path: path.to_owned(), why }),
        None => Ok(Some(file)),
    }
}

/// Reads at most `limit` bytes from `path` (a file in a VM's directory, opened by
/// [`open_vm_file`]) starting at `from`; `None` when absent, refused, or unreadable (the
/// refusal logged).
pub fn read_vm_file(path: &Path, from: u64, limit: u64) -> Option<Vec<u8>> {
    use std::io::{Read, Seek};
    let mut file = match open_vm_file(path, false, VmFileOwner::DaemonOrVm) {
        Ok(file) => file?,
        Err(error) => {
            tracing::warn!(path = %path.display(), error = %error, "a file in a VM's directory was not read");
            return None;
        }
    };
    file.seek(std::io::SeekFrom::Start(from)).ok()?;
    let mut content = Vec::new();
    file.take(limit).read_to_end(&mut content).ok()?;
    Some(content)
}

/// Hands a VM's directory to the identity its processes run as: the directory becomes
/// root's with the VM's group, writable by that group and sticky (its processes add their
/// sockets and console log; only root removes or replaces root's files), its disk and
/// console log the VM's, mode 0600; the daemon's own files in it root's, mode 0600. Nothing
/// is followed: a link a VM's process put in place of a file is changed, never its target.
pub async fn hand_over(paths: &VmPaths, identity: VmIdentity) -> Result<(), HostError> {
    let paths = paths.clone();
    tokio::task::spawn_blocking(move || {
        let (root, vm) = ((0, 0), (identity.uid, identity.gid));
        set_owner(&paths.dir, (0, identity.gid), 0o1770, true)?;
        set_owner(&paths.root_disk, vm, 0o600, true)?;
        set_owner(&paths.console_log, vm, 0o600, false)?;
        for daemons in [&paths.vmm_log, &paths.vsock_backend_log, &paths.handles] {
            set_owner(daemons, root, 0o600, false)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| HostError::Io { what: "hand over a VM's files".into(), source: std::io::Error::other(e) })?
}

/// Makes the file a VM's guest memory lives in while it runs: `bytes` long (a hole: pages
/// take room as the guest touches them), owned by the VM's identity, mode 0600. A file left
/// from an earlier run is replaced. Its directory, a tmpfs others share, is the daemon's own
/// ([`make_trusted_dir`], 0711: VMs' uids reach their own files in it, list nothing), and the
/// file is made through its descriptor.
pub async fn create_memory_file(path: &Path, bytes: u64, owner: Option<VmIdentity>) -> Result<(), HostError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let file = create_memory_file_in_trusted_dir(&path)?;
        file.set_len(bytes).map_err(file_error("size", &path))?;
        hand_memory_file_over(&file, &path, owner)
    })
    .await
    .map_err(|e| HostError::Io { what: "create a memory file".into(), source: std::io::Error::other(e) })?
}

/// Makes a VM's memory file a copy of `from` (a snapshot's memory), as
/// [`create_memory_file`] makes one: its data copied between its holes (`SEEK_DATA`,
/// `copy_file_range`), so pages the guest never touched take no room; owned by the VM's
/// identity, mode 0600.
pub async fn copy_memory_file(from: &Path, to: &Path, owner: Option<VmIdentity>) -> Result<(), HostError> {
    let (from, to) = (from.to_owned(), to.to_owned());
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::OpenOptionsExt;
        let source = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&from)
            .map_err(file_error("open", &from))?;
        let file = create_memory_file_in_trusted_dir(&to)?;
        copy_data_between_holes(&source, &file).map_err(file_error("copy into", &to))?;
        hand_memory_file_over(&file, &to, owner)
    })
    .await
    .map_err(|e| HostError::Io { what: "copy a memory file".into(), source: std::io::Error::other(e) })?
}

/// Copies a VM's memory file (the VM's uid's, in the trusted memory dir) into a snapshot as a
/// new file of the daemon's, mode 0600 (sealed afterwards), holes kept: the source is opened
/// without following a link or blocking, and used only when it is a regular file with one link.
pub async fn copy_memory_to_snapshot(from: &Path, to: &Path) -> Result<(), HostError> {
    let (from, to) = (from.to_owned(), to.to_owned());
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let source = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&from)
            .map_err(file_error("open", &from))?;
        let meta = source.metadata().map_err(file_error("stat", &from))?;
        if !meta.is_file() || meta.nlink() != 1 {
            return Err(HostError::Untrusted { path: from, why: "not a regular file with one link".into() });
        }
        let copy = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&to)
            .map_err(file_error("create", &to))?;
        copy_data_between_holes(&source, &copy).map_err(file_error("copy into", &to))
    })
    .await
    .map_err(|e| HostError::Io { what: "copy a memory file".into(), source: std::io::Error::other(e) })?
}

/// The trusted memory dir's new file `path` (one left there is removed first), created
/// through the directory's descriptor: exclusive, never through a link.
fn create_memory_file_in_trusted_dir(path: &Path) -> Result<std::fs::File, HostError> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(HostError::Untrusted { path: path.to_owned(), why: "not a file in a directory".into() });
    };
    make_trusted_dir(dir, 0o711)?;
    let dir_file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .map_err(file_error("open", dir))?;
    let name = std::ffi::CString::new(name.as_bytes())
        .map_err(|_| HostError::Untrusted { path: path.to_owned(), why: "a NUL in its name".into() })?;
    // SAFETY: a valid directory descriptor and NUL-terminated name; the results are checked.
    unsafe {
        if libc::unlinkat(dir_file.as_raw_fd(), name.as_ptr(), 0) < 0
            && std::io::Error::last_os_error().kind() != std::io::ErrorKind::NotFound
        {
            return Err(file_error("remove", path)(std::io::Error::last_os_error()));
        }
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let fd = libc::openat(dir_file.as_raw_fd(), name.as_ptr(), flags, 0o600 as libc::c_uint);
        if fd < 0 {
            return Err(file_error("create", path)(std::io::Error::last_os_error()));
        }
        Ok(std::fs::File::from_raw_fd(fd))
    }
}

/// Gives a memory file just made to the VM's identity (or keeps it the daemon's), mode 0600.
fn hand_memory_file_over(file: &std::fs::File, path: &Path, owner: Option<VmIdentity>) -> Result<(), HostError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(owner) = owner {
        std::os::unix::fs::fchown(file, Some(owner.uid), Some(owner.gid)).map_err(file_error("chown", path))?;
    }
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(file_error("chmod", path))
}

/// Copies `from` into the empty `to`: each run of data (`SEEK_DATA` to `SEEK_HOLE`) with
/// `copy_file_range` at the same offset (or, between file systems, which Linux refuses since
/// 5.19, with reads and writes), then `to` set to `from`'s length, so holes stay holes.
fn copy_data_between_holes(from: &std::fs::File, to: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = from.metadata()?.len();
    let mut in_kernel = true;
    let mut buffer = Vec::new();
    let mut at: i64 = 0;
    while (at as u64) < len {
        // SAFETY: lseek on a descriptor this function borrows.
        let data = unsafe { libc::lseek(from.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(error);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(from.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (mut in_at, mut out_at) = (data, data);
        while in_at < hole {
            let want = (hole - in_at) as usize;
            let copied = if in_kernel {
                // SAFETY: both descriptors are borrowed; the offsets are locals.
                let copied = unsafe {
                    libc::copy_file_range(from.as_raw_fd(), &mut in_at, to.as_raw_fd(), &mut out_at, want, 0)
                };
                if copied < 0 {
                    let error = std::io::Error::last_os_error();
                    if matches!(
                        error.raw_os_error(),
                        Some(libc::EXDEV | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
                    ) {
                        in_kernel = false;
                        continue;
                    }
                    return Err(error);
                }
                copied as usize
            } else {
                use std::os::unix::fs::FileExt;
                buffer.resize(want.min(1 << 20), 0);
                let read = from.read_at(&mut buffer, in_at as u64)?;
                to.write_all_at(&buffer[..read], out_at as u64)?;
                (in_at, out_at) = (in_at + read as i64, out_at + read as i64);
                read
            };
            if copied == 0 {
                return Err(std::io::Error::other("the source ended early"));
            }
        }
        at = hole;
    }
    to.set_len(len)
}

/// Gives a snapshot's files (and its directory) to root and the snapshot's group: read-only
/// to the VMs restored from it, which run with that group; nobody else may read them.
pub async fn seal_snapshot(dir: &Path, files: &[&Path], group: Option<u32>) -> Result<(), HostError> {
    let (dir, files): (PathBuf, Vec<PathBuf>) = (dir.to_owned(), files.iter().map(|f| f.to_path_buf()).collect());
    tokio::task::spawn_blocking(move || {
        let gid = group.unwrap_or(0);
        for file in &files {
            set_owner(file, (0, gid), 0o440, true)?;
        }
        set_owner(&dir, (0, gid), 0o750, true)
    })
    .await
    .map_err(|e| HostError::Io { what: "seal a snapshot".into(), source: std::io::Error::other(e) })?
}

/// Sets the owner and mode of `path` without following a link; an absent path is an error
/// only when `required`.
fn set_owner(path: &Path, (uid, gid): (u32, u32), mode: u32, required: bool) -> Result<(), HostError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(()),
        opened => opened.map_err(file_error("open", path))?,
    };
    std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(file_error("chown", path))?;
    file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(file_error("chmod", path))
}

/// Lets the VMs' identities open an image's files (a VM's VMM opens its kernel, initrd and
/// root file system as the VM's own uid) and nobody else: each file root's with `group`
/// (the images' group, which every VMM has), mode 0640, its directory 0710; with no group,
/// root's alone (0600, 0700). Never world-readable: image ids are in the VMMs' command
/// lines, which every local user can read.
pub async fn open_to_vms(files: &[&Path], group: Option<u32>) -> Result<(), HostError> {
    let files: Vec<PathBuf> = files.iter().map(|file| file.to_path_buf()).collect();
    tokio::task::spawn_blocking(move || {
        let (gid, file_mode, dir_mode) = match group {
            Some(gid) => (gid, 0o640, 0o710),
            None => (0, 0o600, 0o700),
        };
        for file in &files {
            set_owner(file, (0, gid), file_mode, true)?;
            if let Some(dir) = file.parent() {
                set_owner(dir, (0, gid), dir_mode, true)?;
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| HostError::Io { what: "hand images to the VMs".into(), source: std::io::Error::other(e) })?
}

/// Makes the state dir and its `vms`, `images` and `snapshots` dirs traversable but not listable by
/// others (0711): the VMs' identities pass through them to their own files and their
/// images'. Fails, naming it, when a directory above the state dir cannot be passed.
pub fn open_state_dir_to_vms(state_dir: &Path) -> Result<(), HostError> {
    use std::os::unix::fs::PermissionsExt;
    for dir in [state_dir.to_owned(), state_dir.join("vms"), state_dir.join("images"), state_dir.join("snapshots")] {
        make_dir(&dir, 0o711)?;
    }
    for dir in state_dir.ancestors().skip(1) {
        let meta = std::fs::metadata(dir).map_err(file_error("stat", dir))?;
        if meta.permissions().mode() & 0o001 == 0 {
            return Err(HostError::File {
                action: "let the VMs' uids pass through",
                path: dir.to_owned(),
                source: std::io::Error::other(format!(
                    "mode {:04o} has no search permission for others: VMs run as their own uids and reach \
                     their files under {}; chmod o+x it or choose another state_dir",
                    meta.permissions().mode() & 0o7777,
                    state_dir.display()
                )),
            });
        }
    }
    Ok(())
}

/// The bytes free for an unprivileged writer on the file system holding `path`.
pub async fn free_bytes(path: &Path) -> Result<u64, HostError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let stat = nix::sys::statvfs::statvfs(&path).map_err(|e| file_error("statvfs", &path)(e.into()))?;
        Ok(stat.blocks_available() * stat.fragment_size())
    })
    .await
    .map_err(|e| HostError::Io { what: "statvfs".into(), source: std::io::Error::other(e) })?
}

/// The host's memory in MiB (`MemTotal` of `/proc/meminfo`).
pub fn host_memory_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 =
        info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024)
}

/// The places every local user may write to, where a VM's processes could leave files.
pub const SHARED_WRITABLE: &[&str] = &["/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue"];

/// The most entries [`remove_files_of`] looks at under one place.
const MAX_SWEPT: usize = 200_000;

/// Removes what `uid` (a deleted VM's) owns under `roots`, so that the next VM given that
/// uid finds nothing of its: every file, link and directory of its, never following a link
/// or leaving a root's file system. It can only have made entries in directories of its own
/// (removed whole) and in those every user may write to, so only those are looked into (to
/// a bounded depth and number of entries). Best effort: what cannot be removed is logged.
/// Returns how many were removed.
pub async fn remove_files_of(uid: u32, roots: &[&str]) -> usize {
    let roots: Vec<PathBuf> = roots.iter().map(PathBuf::from).collect();
    tokio::task::spawn_blocking(move || roots.iter().map(|root| sweep(uid, root)).sum()).await.unwrap_or(0)
}

fn sweep(uid: u32, root: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let Ok(top) = std::fs::symlink_metadata(root) else { return 0 };
    let (device, mut removed, mut seen) = (top.dev(), 0, 0);
    let mut pending = vec![(root.to_owned(), 0)];
    while let Some((dir, depth)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            seen += 1;
            if seen > MAX_SWEPT {
                tracing::warn!(root = %root.display(), uid, "stopped looking for a deleted VM's files: too many entries");
                return removed;
            }
            let (path, Ok(meta)) = (entry.path(), entry.metadata()) else { continue };
            if meta.dev() != device {
                continue;
            }
            let gone = if meta.uid() == uid {
                if meta.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) }
            } else {
                if meta.is_dir() && meta.mode() & 0o002 != 0 && depth < 8 {
                    pending.push((path, depth + 1));
                }
                continue;
            };
            match gone {
                Ok(()) => removed += 1,
                Err(error) => tracing::warn!(path = %path.display(), uid, error = %error, "a deleted VM's file stays"),
            }
        }
    }
    if removed > 0 {
        tracing::info!(root = %root.display(), uid, removed, "removed what a deleted VM's uid left");
    }
    removed
}

/// Removes `dir` and everything in it; one already gone is fine.
pub async fn remove_dir(dir: &Path) -> Result<(), HostError> {
    match tokio::fs::remove_dir_all(dir).await {
        Err(source) if source.kind() != std::io::ErrorKind::NotFound => Err(file_error("remove", dir)(source)),
        _ => Ok(()),
    }
}

/// Removes a file; one already gone is fine.
pub async fn remove_file(path: &Path) -> Result<(), HostError> {
    match tokio::fs::remove_file(path).await {
        Err(source) if source.kind() != std::io::ErrorKind::NotFound => Err(file_error("remove", path)(source)),
        _ => Ok(()),
    }
}

/// Removes a file if it can (a socket left by a process that is gone).
pub async fn remove_file_quietly(path: &Path) {
    let _ = tokio::fs::remove_file(path).await;
}

/// True when something exists at `path` (false also when it cannot be looked at).
pub async fn exists(path: &Path) -> bool {
    tokio::fs::try_exists(path).await.unwrap_or(false)
}

/// True when `path` is a regular file (following links).
pub async fn is_file(path: &Path) -> bool {
    tokio::fs::metadata(path).await.is_ok_and(|meta| meta.is_file())
}

/// A small text file's content.
pub async fn read_to_string(path: &Path) -> Result<String, HostError> {
    tokio::fs::read_to_string(path).await.map_err(file_error("read", path))
}

/// The size of a file.
pub async fn file_len(path: &Path) -> Result<u64, HostError> {
    tokio::fs::metadata(path).await.map(|meta| meta.len()).map_err(file_error("stat", path))
}

/// What a source file a caller named looks like.
#[derive(Debug)]
pub enum Source {
    /// A regular file, and its first bytes (at most the number asked for).
    File {
        /// Its first bytes.
        head: Vec<u8>,
        /// Its size.
        len: u64,
    },
    /// Something else: a directory, a device, a FIFO, a socket.
    NotAFile,
}

/// Opens `path` and reads up to `bytes` of it: what a caller named is checked by reading it,
/// so that a file the daemon cannot read is refused before any work starts.
pub async fn inspect_source(path: &Path, bytes: u64) -> std::io::Result<Source> {
    use tokio::io::AsyncReadExt;
    let meta = tokio::fs::metadata(path).await?;
    if !meta.is_file() {
        return Ok(Source::NotAFile);
    }
    let mut head = Vec::with_capacity(bytes as usize);
    tokio::fs::File::open(path).await?.take(bytes).read_to_end(&mut head).await?;
    Ok(Source::File { head, len: meta.len() })
}

/// The entries of `dir` whose names parse as `T` (e.g. VM or image ids), with their paths;
/// none when `dir` does not exist.
pub async fn entries_named<T: std::str::FromStr>(dir: &Path) -> Vec<(T, PathBuf)> {
    let mut found = Vec::new();
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else { return found };
    while let Ok(Some(entry)) = entries.next_entry().await {
        if let Some(name) = entry.file_name().to_str().and_then(|name| name.parse::<T>().ok()) {
            found.push((name, entry.path()));
        }
    }
    found
}

/// Copies the logs that exist among `logs` into `into`, then prunes `into`'s siblings (the
/// logs of earlier failures) to the latest `keep`. Best effort: a failed create must not
/// fail again because its logs could not be kept.
pub async fn keep_logs(logs: &[&Path], into: &Path, keep: usize) {
    let mut any = false;
    for log in logs {
        any |= exists(log).await;
    }
    if any && create_dir(into, 0o700).await.is_ok() {
        let (logs, into) = (logs.iter().map(|log| log.to_path_buf()).collect::<Vec<_>>(), into.to_owned());
        // The VM's processes write its logs: each is opened as such a file may be.
        let _ = tokio::task::spawn_blocking(move || {
            for log in logs {
                let (Some(name), Ok(Some(mut from))) =
                    (log.file_name(), open_vm_file(&log, false, VmFileOwner::DaemonOrVm))
                else {
                    continue;
                };
                if let Ok(mut to) = std::fs::File::create(into.join(name)) {
                    let _ = std::io::copy(&mut from, &mut to);
                }
            }
        })
        .await;
    }
    let Some(all) = into.parent() else { return };
    let Ok(mut entries) = tokio::fs::read_dir(all).await else { return };
    let mut kept = Vec::new();
    while let Ok(Some(entry)) = entries.next_entry().await {
        if let Ok(modified) = entry.metadata().await.and_then(|meta| meta.modified()) {
            kept.push((modified, entry.path()));
        }
    }
    kept.sort();
    let excess = kept.len().saturating_sub(keep);
    for (_, old) in kept.into_iter().take(excess) {
        let _ = tokio::fs::remove_dir_all(old).await;
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).expect("stat").mode() & 0o7777
    }

    fn running_as_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn a_made_directory_and_the_parents_it_made_get_the_mode_asked_whatever_the_umask() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // 0770 survives no umask that strips group write (022, 077): only a chmod sets it.
        let leaf = tmp.path().join("a/b/c");
        let parent_mode = mode(tmp.path());
        make_dir(&leaf, 0o770).expect("make");
        for dir in [tmp.path().join("a"), tmp.path().join("a/b"), leaf.clone()] {
            assert_eq!(mode(&dir), 0o770, "{}", dir.display());
        }
        assert_eq!(mode(tmp.path()), parent_mode, "an existing parent is left as it was");
        // An existing directory (an older build's) is given the mode asked now.
        std::fs::set_permissions(&leaf, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        make_dir(&leaf, 0o711).expect("again");
        assert_eq!(mode(&leaf), 0o711);
        // A link in its place is refused, its target untouched.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path().join("a"), &link).expect("symlink");
        assert!(make_dir(&link, 0o755).is_err(), "a link is not made a directory");
        assert_eq!(mode(&tmp.path().join("a")), 0o770);
    }

    #[test]
    fn a_file_in_a_vms_directory_is_opened_only_as_a_regular_file_of_its_owners_and_never_waited_on() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let open = |name: &str, write: bool, owner: VmFileOwner| open_vm_file(&dir.path().join(name), write, owner);
        let refused = |name: &str, write: bool, owner: VmFileOwner| match open(name, write, owner) {
            Err(HostError::Untrusted { why, .. }) => why,
            other => panic!("{name} was not refused: {other:?}"),
        };
        assert!(open("absent.log", false, VmFileOwner::DaemonOrVm).expect("absent").is_none());
        std::fs::write(dir.path().join("console.log"), "booted\n").expect("write");
        assert!(open("console.log", false, VmFileOwner::Daemon).expect("ours").is_some());
        assert_eq!(read_vm_file(&dir.path().join("console.log"), 2, 3).as_deref(), Some(&b"ote"[..]));
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link.log")).expect("symlink");
        refused("link.log", false, VmFileOwner::DaemonOrVm);
        refused("link.log", true, VmFileOwner::DaemonOrVm);
        // A FIFO: refused at once for reading and for writing, whoever would open its other end.
        nix::unistd::mkfifo(&dir.path().join("fifo.log"), nix::sys::stat::Mode::from_bits_truncate(0o666))
            .expect("mkfifo");
        let started = std::time::Instant::now();
        assert!(refused("fifo.log", false, VmFileOwner::DaemonOrVm).contains("not a regular file"));
        refused("fifo.log", true, VmFileOwner::DaemonOrVm);
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "a FIFO was waited on");
        assert!(read_vm_file(&dir.path().join("fifo.log"), 0, 10).is_none());
        // A second link of the daemon's own file is allowed (a jail's).
        std::fs::hard_link(dir.path().join("console.log"), dir.path().join("jail.log")).expect("link");
        assert!(open("jail.log", false, VmFileOwner::Daemon).expect("the daemon's").is_some());

        if !running_as_root() {
            banger_tests::skip("the checks of files a VM's uid owns need root (chown); the rest ran");
            return;
        }
        // The VM's uid is the directory's group.
        let vm = 900_123;
        std::os::unix::fs::chown(dir.path(), None, Some(vm)).expect("chgrp the dir");
        std::fs::write(dir.path().join("vm.log"), "guest\n").expect("write");
        std::os::unix::fs::chown(dir.path().join("vm.log"), Some(vm), Some(vm)).expect("chown");
        assert!(open("vm.log", true, VmFileOwner::DaemonOrVm).expect("the VM's").is_some());
        assert!(refused("vm.log", false, VmFileOwner::Daemon).contains("owned by uid 900123"));
        std::fs::write(dir.path().join("other.log"), "x").expect("write");
        std::os::unix::fs::chown(dir.path().join("other.log"), Some(vm + 1), None).expect("chown");
        assert!(refused("other.log", false, VmFileOwner::DaemonOrVm).contains("owned by uid 900124"));
        // A file of the VM's with a second link (to something it owns elsewhere): refused.
        std::fs::hard_link(dir.path().join("vm.log"), dir.path().join("vm-link.log")).expect("link");
        assert!(refused("vm-link.log", true, VmFileOwner::DaemonOrVm).contains("2 links"));
        assert_eq!(std::fs::metadata(dir.path().join("vm.log")).expect("stat").nlink(), 2);
    }

    #[tokio::test]
    async fn a_memory_copy_keeps_the_holes_and_is_made_through_the_trusted_dir() {
        use std::io::{Seek, Write};
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let snapshot = tmp.path().join("memory");
        let mut file = std::fs::File::create(&snapshot).expect("create");
        file.set_len(64 << 20).expect("size");
        for at in [0u64, 32 << 20, (64 << 20) - 4096] {
            file.seek(std::io::SeekFrom::Start(at)).expect("seek");
            file.write_all(&[at as u8 | 1; 4096]).expect("write");
        }
        drop(file);
        let memory_dir = tmp.path().join("shm");
        let copy = memory_dir.join("vm");
        std::fs::create_dir(&memory_dir).expect("mkdir");
        std::fs::write(&copy, b"left from an earlier run").expect("an old file");
        copy_memory_file(&snapshot, &copy, None).await.expect("copy");
        assert_eq!(std::fs::read(&copy).expect("copy"), std::fs::read(&snapshot).expect("source"), "the same bytes");
        let meta = std::fs::metadata(&copy).expect("stat");
        assert_eq!((meta.len(), meta.mode() & 0o7777), (64 << 20, 0o600));
        assert!(meta.blocks() * 512 < 1 << 20, "holes kept: {} bytes allocated", meta.blocks() * 512);
        assert_eq!(mode(&memory_dir), 0o711);

        let saved = tmp.path().join("saved");
        copy_memory_to_snapshot(&copy, &saved).await.expect("into a snapshot");
        assert_eq!(std::fs::read(&saved).expect("saved"), std::fs::read(&snapshot).expect("source"));
        assert!(std::fs::metadata(&saved).expect("stat").blocks() * 512 < 1 << 20);
        assert!(copy_memory_to_snapshot(&copy, &saved).await.is_err(), "never over an existing file");
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&copy, &link).expect("symlink");
        assert!(copy_memory_to_snapshot(&link, &tmp.path().join("saved2")).await.is_err(), "never through a link");
        // Between file systems (a tmpfs memory dir, the state dir's disk), as snapshots copy.
        let shm = tempfile::tempdir_in("/dev/shm").expect("a tmpfs dir");
        let on_tmpfs = shm.path().join("vm");
        copy_memory_file(&snapshot, &on_tmpfs, None).await.expect("copy onto tmpfs");
        let across = tmp.path().join("across");
        copy_memory_to_snapshot(&on_tmpfs, &across).await.expect("copy from tmpfs onto disk");
        assert_eq!(std::fs::read(&across).expect("across"), std::fs::read(&snapshot).expect("source"));
        assert!(std::fs::metadata(&across).expect("stat").blocks() * 512 < 1 << 20, "holes kept across");
    }

    #[tokio::test]
    async fn what_a_deleted_vms_uid_left_in_shared_places_is_removed_and_nothing_else() {
        if !running_as_root() {
            banger_tests::skip("files of another uid are made with chown, which needs root");
            return;
        }
        let shared = tempfile::tempdir().expect("tempdir");
        let root = shared.path();
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        let (vm, other) = (900_321, 900_322);
        let owned = |path: &Path, uid: u32| std::os::unix::fs::lchown(path, Some(uid), Some(uid)).expect("chown");
        let write = |path: &Path, uid: u32| {
            std::fs::write(path, "x").expect("write");
            owned(path, uid);
        };
        write(&root.join("vm-file"), vm);
        std::fs::create_dir(root.join("vm-dir")).expect("mkdir");
        write(&root.join("vm-dir/inside"), vm);
        owned(&root.join("vm-dir"), vm);
        // In another's world-writable directory, and a link of the VM's to something else.
        std::fs::create_dir(root.join("open")).expect("mkdir");
        std::fs::set_permissions(root.join("open"), std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        write(&root.join("open/vm-deep"), vm);
        write(&root.join("kept"), other);
        std::os::unix::fs::symlink(root.join("kept"), root.join("vm-link")).expect("symlink");
        owned(&root.join("vm-link"), vm);
        // Another's private directory is not looked into (the VM could not write there).
        std::fs::create_dir(root.join("private")).expect("mkdir");
        write(&root.join("private/vm-old"), vm);

        let root_text = root.display().to_string();
        assert_eq!(remove_files_of(vm, &[&root_text]).await, 4, "file, dir (whole), deep file, link");
        for gone in ["vm-file", "vm-dir", "open/vm-deep", "vm-link"] {
            assert!(std::fs::symlink_metadata(root.join(gone)).is_err(), "{gone} left");
        }
        for kept in ["kept", "open", "private/vm-old"] {
            assert!(root.join(kept).exists(), "{kept} removed");
        }
        assert_eq!(remove_files_of(vm, &[&root_text]).await, 0, "twice changes nothing");
    }

    #[test]
    fn a_directory_in_a_shared_place_is_trusted_only_when_the_daemon_owns_it_and_others_cannot_write() {
        let shared = tempfile::tempdir().expect("tempdir");
        // A sticky world-writable place, as /dev/shm and /tmp are.
        std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        let ours = shared.path().join("banger");
        make_trusted_dir(&ours, 0o711).expect("made fresh");
        assert_eq!(mode(&ours), 0o711);
        make_trusted_dir(&ours, 0o711).expect("taken again");

        let refused = |dir: &Path| match make_trusted_dir(dir, 0o711) {
            Err(HostError::Untrusted { path, why }) => (path, why),
            other => panic!("{} was not refused: {other:?}", dir.display()),
        };
        let link = shared.path().join("link");
        std::os::unix::fs::symlink(&ours, &link).expect("symlink");
        assert_eq!(refused(&link).0, link, "a link in its place");

        let writable = shared.path().join("writable");
        std::fs::create_dir(&writable).expect("mkdir");
        std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(refused(&writable).1.contains("others may write"), "group/world-writable");
        assert_eq!(mode(&writable), 0o777, "left as found");

        let open_parent = shared.path().join("open");
        std::fs::create_dir(&open_parent).expect("mkdir");
        std::fs::set_permissions(&open_parent, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let below = open_parent.join("banger");
        assert_eq!(refused(&below).0, open_parent, "an ancestor others may write to and that is not sticky");
        assert!(!below.exists(), "nothing made under it");

        if !running_as_root() {
            banger_tests::skip("the checks of directories another uid owns need root (chown); the rest ran");
            return;
        }
        let theirs = shared.path().join("theirs");
        std::fs::create_dir(&theirs).expect("mkdir");
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
        assert!(refused(&theirs).1.contains("owned by uid 65534"));
        let under_theirs = theirs.join("banger");
        assert_eq!(refused(&under_theirs).0, theirs, "an ancestor another uid owns");
        assert_eq!(std::fs::metadata(&theirs).expect("stat").uid(), 65534);
    }
}
