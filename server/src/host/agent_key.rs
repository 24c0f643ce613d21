//! The key each VM's agent checks on every call (the agent's `auth` module): made for every
//! boot, given to the guest out of band in an archive the VMM's initramfs starts with, kept by
//! the daemon in the VM's dir (`agent.key`, root's, 0600), copied into a snapshot taken with
//! the agent (a clone's agent holds its source's key until its identity gives it its own).
//!
//! Out of band means never on the kernel command line, which `/proc/<pid>/cmdline` shows to
//! every local user: the initramfs is a file only root and the VM's own uid can read.

use std::io::{Read, Write};
use std::path::Path;

use super::{HostError, confine::VmIdentity, file_error};

/// A key's length in bytes (the agent's `KEY_BYTES`).
pub const KEY_BYTES: usize = 32;
/// The file the initramfs archive puts the key in (`/init` hands it to the agent).
const KEY_IN_INITRAMFS: &str = "banger-agent.key";

/// One VM's agent key.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentKey([u8; KEY_BYTES]);

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentKey(..)")
    }
}

impl AgentKey {
    /// A new random key.
    pub fn generate() -> Result<Self, HostError> {
        let mut key = [0u8; KEY_BYTES];
        getrandom::fill(&mut key).map_err(|e| HostError::Io {
            what: "draw an agent key from the kernel".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(Self(key))
    }

    /// The key's bytes.
    pub fn bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }

    /// 64 lower-case hex digits.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    fn parse(text: &str) -> Option<Self> {
        let mut key = [0u8; KEY_BYTES];
        hex::decode_to_slice(text.trim(), &mut key).ok()?;
        Some(Self(key))
    }
}

/// Reads a key file the daemon wrote, opened as a file in a VM's directory is
/// ([`super::fs::open_vm_file`]: the daemon's, no link, no FIFO), with one link. `None` when
/// it is absent; an error when it is not such a file.
pub fn read(path: &Path) -> Result<Option<AgentKey>, HostError> {
    use std::os::unix::fs::MetadataExt;
    let Some(file) = super::fs::open_vm_file(path, false, super::fs::VmFileOwner::Daemon)? else {
        return Ok(None);
    };
    // Stricter than a log: a key is never linked anywhere else.
    if file.metadata().map_err(file_error("stat", path))?.nlink() != 1 {
        return Err(HostError::Untrusted { path: path.to_owned(), why: "more than one link".into() });
    }
    let mut text = String::new();
    file.take(128).read_to_string(&mut text).map_err(file_error("read", path))?;
    AgentKey::parse(&text)
        .map(Some)
        .ok_or_else(|| HostError::Untrusted { path: path.to_owned(), why: "not a key (64 hex digits)".into() })
}

/// Writes `key` to `path` (the daemon's, 0600) by a rename over it, so that a reader finds
/// the old key or the new one, never half of one.
pub fn write(path: &Path, key: &AgentKey) -> Result<(), HostError> {
    super::fs::replace_file(path, 0o600, |file, temp| {
        file.write_all(format!("{}\n", key.hex()).as_bytes()).map_err(file_error("write", temp))
    })
}

/// Copies the key at `from` to `to` (a snapshot's, or a restored VM's from its snapshot's);
/// when `from` has none, removes any at `to`. Returns whether there was one.
pub fn copy(from: &Path, to: &Path) -> Result<bool, HostError> {
    match read(from)? {
        Some(key) => write(to, &key).map(|()| true),
        None => match std::fs::remove_file(to) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(file_error("remove", to)(e)),
            _ => Ok(false),
        },
    }
}

/// Makes the initramfs a VM boots: an uncompressed archive holding the key, then `initrd`
/// (the image's, compressed or not: the kernel unpacks archives one after another). Written to
/// `out` by a rename, owned by `owner` (the VMM opens it as the VM's uid), mode 0400.
pub fn write_boot_initrd(
    key: &AgentKey,
    initrd: &Path,
    out: &Path,
    owner: Option<VmIdentity>,
) -> Result<(), HostError> {
    super::fs::replace_file(out, 0o400, |file, temp| {
        file.write_all(&key_archive(key)).map_err(file_error("write", temp))?;
        let mut image = std::fs::File::open(initrd).map_err(file_error("open", initrd))?;
        // std's copy between files uses copy_file_range.
        std::io::copy(&mut image, file).map_err(file_error("copy", initrd))?;
        if let Some(owner) = owner {
            std::os::unix::fs::fchown(&*file, Some(owner.uid), Some(owner.gid)).map_err(file_error("chown", temp))?;
        }
        Ok(())
    })
}

/// A `newc` cpio archive of one root-owned file, [`KEY_IN_INITRAMFS`] (mode 0400, the key in
/// hex and a newline), and the trailer, padded to a multiple of 512 bytes.
fn key_archive(key: &AgentKey) -> Vec<u8> {
    let content = format!("{}\n", key.hex());
    let mut archive = Vec::with_capacity(512);
    newc_entry(&mut archive, 1, 0o100400, KEY_IN_INITRAMFS, content.as_bytes());
    newc_entry(&mut archive, 0, 0, "TRAILER!!!", &[]);
    archive.resize(archive.len().div_ceil(512) * 512, 0);
    archive
}

fn newc_entry(archive: &mut Vec<u8>, ino: u32, mode: u32, name: &str, data: &[u8]) {
    let pad4 = |archive: &mut Vec<u8>| archive.resize(archive.len().div_ceil(4) * 4, 0);
    let nlink = if mode == 0 { 0 } else { 1 };
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
    // rdevminor, namesize (with its NUL), check.
    let fields = [ino, mode, 0, 0, nlink, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
    archive.extend_from_slice(b"070701");
    for field in fields {
        archive.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    archive.extend_from_slice(name.as_bytes());
    archive.push(0);
    pad4(archive);
    archive.extend_from_slice(data);
    pad4(archive);
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    #[test]
    fn a_key_file_is_the_daemons_and_read_back_only_as_such() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.key");
        assert_eq!(read(&path).expect("absent is none"), None);
        let key = AgentKey::generate().expect("key");
        write(&path, &key).expect("write");
        assert_eq!(std::fs::metadata(&path).expect("stat").mode() & 0o777, 0o600);
        assert_eq!(read(&path).expect("read"), Some(key.clone()));
        assert_ne!(AgentKey::generate().expect("another"), key, "keys are drawn anew");

        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        assert!(read(&link).is_err(), "a link is not followed");
        let hard = dir.path().join("hard.key");
        std::fs::hard_link(&path, &hard).expect("link");
        assert!(matches!(read(&hard), Err(HostError::Untrusted { .. })), "a second link");
        std::fs::remove_file(&hard).expect("unlink");
        let fifo = dir.path().join("fifo.key");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        assert!(matches!(read(&fifo), Err(HostError::Untrusted { .. })), "a FIFO, without blocking");
        let garbage = dir.path().join("garbage.key");
        std::fs::write(&garbage, "not a key").expect("write");
        assert!(matches!(read(&garbage), Err(HostError::Untrusted { .. })));

        let copied = dir.path().join("copy.key");
        assert!(copy(&path, &copied).expect("copy"));
        assert_eq!(read(&copied).expect("read"), Some(key));
        assert!(!copy(&dir.path().join("none.key"), &copied).expect("nothing to copy"));
        assert!(!copied.exists(), "a copy of no key leaves none");
    }

    #[test]
    fn the_boot_initramfs_starts_with_an_archive_of_the_key_that_cpio_reads_then_holds_the_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("image-initrd.img");
        std::fs::write(&image, b"\x1f\x8bthe image's own archive").expect("image initrd");
        let out = dir.path().join("initrd.img");
        let key = AgentKey::generate().expect("key");
        write_boot_initrd(&key, &image, &out, None).expect("write");
        let bytes = std::fs::read(&out).expect("read");
        let archive = key_archive(&key);
        assert_eq!(archive.len() % 512, 0);
        assert!(bytes.ends_with(b"\x1f\x8bthe image's own archive"));
        assert_eq!(&bytes[..archive.len()], archive.as_slice());
        assert_eq!(std::fs::metadata(&out).expect("stat").permissions().mode() & 0o777, 0o400);

        // What the kernel unpacks, as cpio itself reads it.
        let Ok(listing) = std::process::Command::new("cpio")
            .args(["-i", "--to-stdout", "--quiet", KEY_IN_INITRAMFS])
            .stdin(std::fs::File::open(&out).expect("open"))
            .output()
        else {
            banger_tests::skip("cpio is not installed: the archive's bytes were checked, not its reading");
            return;
        };
        assert!(listing.status.success(), "{}", String::from_utf8_lossy(&listing.stderr));
        assert_eq!(String::from_utf8_lossy(&listing.stdout), format!("{}\n", key.hex()));
        let verbose = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(std::fs::File::open(&out).expect("open"))
            .output()
            .expect("cpio -t");
        let listing = String::from_utf8_lossy(&verbose.stdout);
        assert!(listing.starts_with("-r--------   1 root     root"), "{listing}");
    }
}
