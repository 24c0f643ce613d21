//! The host files an image import reads, which a caller names: each is opened once, without
//! following any symbolic link, checked to be a regular file on a real file system (never
//! `/proc`, `/sys`, a device or a FIFO), optionally only beneath configured roots, and then
//! read and copied from that descriptor: what was checked is what is copied.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Component, Path, PathBuf},
    sync::Arc,
};

use super::HostError;

/// A source file, open and checked.
#[derive(Debug, Clone)]
pub struct SourceFile {
    file: Arc<std::fs::File>,
    /// Its size.
    pub len: u64,
    /// Its first bytes (as many as asked for, or all of a shorter file).
    pub head: Vec<u8>,
}

/// File systems that hold the kernel's or a device's state, never an image.
const PSEUDO_FILE_SYSTEMS: &[(i64, &str)] = &[
    (0x9fa0, "proc"),
    (0x6265_6572, "sysfs"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0x7363_6673, "securityfs"),
    (0x0027_e0eb, "cgroup"),
    (0x6367_7270, "cgroup2"),
    (0x1cd1, "devpts"),
    (0xcafe_4a11, "bpf"),
    (0xde5e_81e4, "efivarfs"),
    (0x6265_6570, "configfs"),
    (0x6165_676c, "pstore"),
    (0x4249_4e4d, "binfmt_misc"),
];

/// Opens `path` for an import and reads its first `head` bytes. With `roots`, `path` must
/// lie beneath one of them (and is resolved beneath it: no `..` or link leads out). The
/// error says why in words for the caller.
pub async fn open_source(path: &Path, roots: Option<&[PathBuf]>, head: u64) -> Result<SourceFile, String> {
    let (owned, roots) = (path.to_owned(), roots.map(<[PathBuf]>::to_vec));
    tokio::task::spawn_blocking(move || open_blocking(&owned, roots.as_deref(), head))
        .await
        .map_err(|e| format!("cannot open {}: {e}", path_text(path)))?
}

fn path_text(path: &Path) -> String {
    path.display().to_string()
}

fn open_blocking(path: &Path, roots: Option<&[PathBuf]>, head: u64) -> Result<SourceFile, String> {
    use std::os::unix::fs::FileExt;
    let shown = path_text(path);
    if !path.is_absolute() {
        return Err(format!("must be an absolute path, got {shown:?}"));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{shown} contains \"..\""));
    }
    let opened = match roots {
        None => openat2(libc::AT_FDCWD, path, false),
        Some(roots) => {
            let Some((root, rest)) = roots.iter().find_map(|root| Some((root, path.strip_prefix(root).ok()?))) else {
                let roots: Vec<String> = roots.iter().map(|r| path_text(r)).collect();
                return Err(format!("{shown} is not under an import root ({})", roots.join(", ")));
            };
            let dir =
                std::fs::File::open(root).map_err(|e| format!("cannot open import root {}: {e}", path_text(root)))?;
            openat2(dir.as_raw_fd(), rest, true)
        }
    };
    let file = match opened {
        Ok(fd) => std::fs::File::from(fd),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(format!("{shown} is or passes through a symbolic link, which imports never follow"));
        }
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            return Err(format!("{shown} leads out of its import root"));
        }
        Err(e) => return Err(format!("cannot read {shown}: {e}")),
    };
    let meta = file.metadata().map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    let file_system = fstatfs_type(&file).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if let Some((_, name)) = PSEUDO_FILE_SYSTEMS.iter().find(|(magic, _)| *magic == file_system) {
        return Err(format!("{shown} is on {name}, which holds no image"));
    }
    let mut buffer = vec![0; usize::try_from(head.min(meta.len())).unwrap_or(0)];
    let mut read = 0;
    while read < buffer.len() {
        match file.read_at(&mut buffer[read..], read as u64) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("cannot read {shown}: {e}")),
        }
    }
    buffer.truncate(read);
    Ok(SourceFile { file: Arc::new(file), len: meta.len(), head: buffer })
}

/// `openat2(2)` for reading, never following a symbolic link (nor a `/proc` magic link);
/// `beneath`: never leaving `dir`. Non-blocking, so that a FIFO does not hang the open (and
/// is then refused as no regular file).
fn openat2(dir: i32, path: &Path, beneath: bool) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut resolve = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    if beneath {
        resolve |= libc::RESOLVE_BENEATH;
    }
    // SAFETY: open_how is plain data; zeroed is its documented initial state.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK) as u64;
    how.resolve = resolve;
    // SAFETY: the pointers are valid for the call; the result is a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(libc::SYS_openat2, dir, name.as_ptr(), &raw const how, std::mem::size_of::<libc::open_how>())
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn fstatfs_type(file: &std::fs::File) -> std::io::Result<i64> {
    // SAFETY: statfs is plain data, filled by the call.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a valid pointer.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &raw mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_type as i64)
}

/// Copies an opened source to a new file `to`: a reflink clone where the file systems make
/// one, else its data ranges only (holes stay holes: a sparse root file system stays sparse).
pub async fn copy_source(source: &SourceFile, to: &Path) -> Result<(), HostError> {
    let (source, to) = (source.clone(), to.to_owned());
    tokio::task::spawn_blocking(move || copy_blocking(&source, &to))
        .await
        .map_err(|e| HostError::Io { what: "copy an image file".into(), source: std::io::Error::other(e) })?
}

fn copy_blocking(source: &SourceFile, to: &Path) -> Result<(), HostError> {
    use std::os::unix::fs::OpenOptionsExt;
    let error = |what: &str| {
        let what = format!("{what} {}", to.display());
        move |source: std::io::Error| HostError::Io { what, source }
    };
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)
        .map_err(error("create"))?;
    let (from_fd, to_fd) = (source.file.as_raw_fd(), out.as_raw_fd());
    // SAFETY: two valid descriptors; FICLONE takes the source descriptor as its argument.
    if unsafe { libc::ioctl(to_fd, libc::FICLONE, from_fd) } == 0 {
        return Ok(());
    }
    let mut at: i64 = 0;
    let len = i64::try_from(source.len).unwrap_or(i64::MAX);
    let (mut in_kernel, mut buffer) = (true, Vec::new());
    while at < len {
        // SAFETY: plain lseek on a valid descriptor.
        let data = unsafe { libc::lseek(from_fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole up to the end
            }
            return Err(error("read the source of")(e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(from_fd, data, libc::SEEK_HOLE) }.min(len);
        let (mut from_at, mut to_at) = (data, data);
        while from_at < hole {
            let chunk = usize::try_from(hole - from_at).unwrap_or(usize::MAX).min(1 << 30);
            let copied = if in_kernel {
                // SAFETY: valid descriptors and offsets owned by this function.
                let copied =
                    unsafe { libc::copy_file_range(from_fd, &raw mut from_at, to_fd, &raw mut to_at, chunk, 0) };
                usize::try_from(copied).map_err(|_| std::io::Error::last_os_error())
            } else {
                copy_through_memory(&source.file, &out, (&mut from_at, &mut to_at), chunk, &mut buffer)
            };
            match copied {
                Ok(0) => break, // the source shrank under us: what was there is copied
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Another file system (or one without it): copied through memory instead.
                Err(e)
                    if in_kernel
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::EXDEV | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
                        ) =>
                {
                    in_kernel = false;
                    buffer = vec![0; 1 << 20];
                }
                Err(e) => return Err(error("copy into")(e)),
            }
        }
        at = hole.max(from_at);
    }
    out.set_len(source.len).map_err(error("size"))
}

/// One read and write of up to `chunk` bytes at both offsets, which it advances; the bytes
/// copied, 0 at the source's end.
fn copy_through_memory(
    from: &std::fs::File,
    to: &std::fs::File,
    (from_at, to_at): (&mut i64, &mut i64),
    chunk: usize,
    buffer: &mut [u8],
) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let want = chunk.min(buffer.len());
    let read = from.read_at(&mut buffer[..want], u64::try_from(*from_at).unwrap_or(0))?;
    to.write_all_at(&buffer[..read], u64::try_from(*to_at).unwrap_or(0))?;
    *from_at += read as i64;
    *to_at += read as i64;
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sources_are_regular_files_reached_without_links_and_beneath_their_roots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("rootfs.ext4");
        std::fs::write(&file, b"0123456789").expect("write");
        let opened = open_source(&file, None, 4).await.expect("a regular file opens");
        assert_eq!((opened.len, opened.head.as_slice()), (10, &b"0123"[..]));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        let refused = |result: Result<SourceFile, String>| result.expect_err("refused");
        assert!(refused(open_source(&link, None, 4).await).contains("symbolic link"));
        let through = dir.path().join("through");
        std::os::unix::fs::symlink(dir.path(), &through).expect("symlink");
        assert!(refused(open_source(&through.join("rootfs.ext4"), None, 4).await).contains("symbolic link"));
        // /proc/self is a link: this process's own directory, by number.
        let environ = PathBuf::from(format!("/proc/{}/environ", std::process::id()));
        assert!(refused(open_source(&environ, None, 4).await).contains("is on proc, which holds no image"));
        assert!(refused(open_source(Path::new("/proc/self/environ"), None, 4).await).contains("symbolic link"));
        assert!(refused(open_source(Path::new("/dev/zero"), None, 4).await).contains("not a regular file"));
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        assert!(refused(open_source(&fifo, None, 4).await).contains("not a regular file"));
        assert!(refused(open_source(Path::new("relative"), None, 4).await).contains("absolute"));
        let roots = [dir.path().join("allowed")];
        std::fs::create_dir(&roots[0]).expect("mkdir");
        assert!(refused(open_source(&file, Some(&roots), 4).await).contains("not under an import root"));
        std::fs::write(roots[0].join("kernel"), b"k").expect("write");
        assert!(open_source(&roots[0].join("kernel"), Some(&roots), 4).await.is_ok());
        std::os::unix::fs::symlink(&file, roots[0].join("escape")).expect("symlink");
        assert!(refused(open_source(&roots[0].join("escape"), Some(&roots), 4).await).contains("symbolic link"));
        assert!(refused(open_source(&roots[0].join("../rootfs.ext4"), Some(&roots), 4).await).contains(".."));
    }

    #[tokio::test]
    async fn a_copy_keeps_the_content_and_the_holes() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let dir = tempfile::tempdir().expect("tempdir");
        let from = dir.path().join("sparse");
        let file = std::fs::File::create(&from).expect("create");
        file.set_len(64 << 20).expect("size");
        file.write_all_at(b"head", 0).expect("write");
        file.write_all_at(b"tail", (64 << 20) - 4).expect("write");
        let source = open_source(&from, None, 4).await.expect("open");
        let to = dir.path().join("copy");
        copy_source(&source, &to).await.expect("copy");
        let copied = std::fs::read(&to).expect("read");
        assert_eq!(copied.len(), 64 << 20);
        assert_eq!((&copied[..4], &copied[copied.len() - 4..]), (&b"head"[..], &b"tail"[..]));
        assert!(std::fs::metadata(&to).expect("stat").blocks() < 1024, "the hole stays a hole");
        // Into another file system (copy_file_range may refuse across them: EXDEV).
        let other = tempfile::tempdir_in("/dev/shm").expect("tempdir on /dev/shm");
        let to = other.path().join("copy");
        copy_source(&source, &to).await.expect("copy across file systems");
        assert_eq!(std::fs::read(&to).expect("read"), copied);
        assert!(std::fs::metadata(&to).expect("stat").blocks() < 1024, "the hole stays a hole there too");
    }
}
