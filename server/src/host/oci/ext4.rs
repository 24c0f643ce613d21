//! The ext4 root file system of a container image, built from the merged tar stream by
//! `mke2fs -d -` (e2fsprogs ≥ 1.47.1, with libarchive): nothing is mounted, nothing of the
//! image touches the host's file system. Byte for byte reproducible: the UUID and the
//! directory hash seed come from the manifest digest, and every time from a fixed clock.

use std::ffi::OsString;
use std::io::Write;
use std::path::Path;

use super::flatten::{Layer, Plan, Totals};
use super::{Digest, OciError, file_error};
use crate::host::command;

/// The time e2fsprogs writes into the superblock and inodes it makes (`E2FSPROGS_FAKE_TIME`).
const FIXED_TIME: &str = "1704067200";
const MIB: u64 = 1024 * 1024;

/// The size of a file system for `totals`: the content, a block per entry (directories,
/// partial last blocks), a quarter more and 128 MiB of room; at least `min_bytes`;
/// whole MiB.
pub fn size_for(totals: Totals, min_bytes: u64) -> u64 {
    let data = totals.file_bytes + totals.entries * 4096;
    let size = (data + data / 4 + 128 * MIB).max(min_bytes);
    size.div_ceil(MIB) * MIB
}

/// Inodes for `totals` in a file system of `size` bytes: twice the entries (room to
/// install more), at least mke2fs's own default of one per 16 KiB.
fn inodes_for(totals: Totals, size: u64) -> u64 {
    (totals.entries * 2 + 1024).max(size / 16384)
}

/// A UUID made of 16 bytes of the digest, starting at hex digit `offset`.
fn uuid_from(digest: &Digest, offset: usize) -> String {
    let hex = &digest.hex()[offset..offset + 32];
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// Builds `out` (created or truncated) from `plan`'s layers. Blocking: run it on a
/// blocking thread.
pub fn build(plan: &Plan, layers: &[Layer], seed: &Digest, min_bytes: u64, out: &Path) -> Result<u64, OciError> {
    let totals = plan.totals();
    let size = size_for(totals, min_bytes);
    let file = std::fs::File::create(out).map_err(file_error("create", out))?;
    file.set_len(size).map_err(file_error("size", out))?;
    drop(file);
    let args: Vec<OsString> = [
        "-q",
        "-F",
        "-t",
        "ext4",
        "-b",
        "4096",
        "-L",
        "root",
        "-N",
        &inodes_for(totals, size).to_string(),
        "-U",
        &uuid_from(seed, 0),
        "-E",
        &format!("hash_seed={},root_owner=0:0", uuid_from(seed, 32)),
        "-d",
        "-",
    ]
    .iter()
    .map(OsString::from)
    .chain([out.as_os_str().to_owned(), OsString::from(format!("{}k", size / 1024))])
    .collect();
    let (made, fed) = command::run_feeding_blocking(
        Path::new("mke2fs"),
        &args,
        &[("E2FSPROGS_FAKE_TIME", FIXED_TIME)],
        |stdin: &mut dyn Write| plan.write_tar(layers, stdin),
    );
    match (made, fed) {
        // A layer that turned out unreadable: mke2fs's complaint about the short stream is
        // a consequence.
        (_, Err(fed @ (OciError::CorruptLayer { .. } | OciError::DigestMismatch { .. } | OciError::Host(_)))) => {
            return Err(fed);
        }
        (Err(made), _) => return Err(made.into()),
        (Ok(()), Err(fed)) => return Err(fed),
        (Ok(()), Ok(())) => {}
    }
    set_other_xattrs(plan, out)?;
    Ok(size)
}

/// Quotes a path for debugfs's command parser: inside double quotes, `""` is one quote.
fn debugfs_quote(path: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(path).ok()?;
    if text.contains(['\n', '\r', '\0']) {
        return None;
    }
    Some(format!("\"/{}\"", text.replace('"', "\"\"")))
}

/// Writes the extended attributes mke2fs does not copy from a tar stream, with debugfs.
fn set_other_xattrs(plan: &Plan, out: &Path) -> Result<(), OciError> {
    let xattrs = plan.other_xattrs();
    if xattrs.is_empty() {
        return Ok(());
    }
    let values = tempfile::tempdir().map_err(file_error("create", Path::new("a temporary directory")))?;
    let mut script = String::new();
    for (index, (path, name, value)) in xattrs.iter().enumerate() {
        let Some(quoted) = debugfs_quote(path) else {
            return Err(OciError::Unsupported {
                what: format!(
                    "the extended attribute {name} of {:?}, whose name debugfs cannot take",
                    String::from_utf8_lossy(path)
                ),
            });
        };
        if !name.bytes().all(|b| b.is_ascii_graphic() && b != b'"') {
            return Err(OciError::Unsupported { what: format!("the extended attribute name {name:?}") });
        }
        let value_file = values.path().join(index.to_string());
        std::fs::write(&value_file, value).map_err(file_error("write", &value_file))?;
        script.push_str(&format!("ea_set -f {} {quoted} {name}\n", value_file.display()));
    }
    let script_file = values.path().join("script");
    std::fs::write(&script_file, script).map_err(file_error("write", &script_file))?;
    let args: Vec<OsString> = vec!["-w".into(), "-f".into(), script_file.into_os_string(), out.as_os_str().to_owned()];
    let output = command::run_blocking(Path::new("debugfs"), &args, &[("E2FSPROGS_FAKE_TIME", FIXED_TIME)])?;
    // debugfs reports a failed command on its output and still exits 0.
    let report = String::from_utf8_lossy(&output);
    if let Some(line) = report.lines().find(|line| !line.starts_with("debugfs") && !line.trim().is_empty()) {
        return Err(OciError::Write { reason: format!("debugfs: {line}") });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_leave_room_and_respect_the_minimum() {
        let small = Totals { entries: 10, file_bytes: 1000, dirs: 2 };
        assert_eq!(size_for(small, 1024 * MIB), 1024 * MIB);
        let big = Totals { entries: 10_000, file_bytes: 2048 * MIB, dirs: 500 };
        let size = size_for(big, 64 * MIB);
        assert!(size > 2048 * MIB + 512 * MIB && size.is_multiple_of(MIB), "{size}");
        assert_eq!(inodes_for(big, size), 21_024.max(size / 16384));
    }

    #[test]
    fn uuids_come_from_the_digest_and_quotes_from_debugfs_rules() {
        let digest = Digest::of(b"manifest");
        let uuid = uuid_from(&digest, 0);
        assert_eq!(uuid.len(), 36);
        assert_ne!(uuid, uuid_from(&digest, 32));
        assert_eq!(debugfs_quote(b"a b/\"c\"").as_deref(), Some("\"/a b/\"\"c\"\"\""));
        assert_eq!(debugfs_quote(b"new\nline"), None);
    }
}

#[cfg(test)]
mod build_tests {
    use super::super::flatten::tests::{rule_layers, write_layers};
    use super::*;

    fn debugfs(image: &Path, request: &str) -> String {
        let args: Vec<OsString> = vec!["-R".into(), request.into(), image.as_os_str().to_owned()];
        String::from_utf8_lossy(&command::run_blocking(Path::new("debugfs"), &args, &[]).expect("debugfs")).into_owned()
    }

    #[test]
    fn the_fixture_becomes_an_ext4_that_keeps_every_rule_and_is_reproducible() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layers = write_layers(dir.path(), &rule_layers());
        let plan = Plan::build(&layers, &mut |_| {}).expect("plan");
        let seed = Digest::of(b"the manifest");
        let first = dir.path().join("first.ext4");
        build(&plan, &layers, &seed, 64 * MIB, &first).expect("build");

        let etc = debugfs(&first, "ls -l /etc");
        for present in ["owned", "symlink", "null", "fifo", "cross-layer", "keeps-old", "user-xattr", &"n".repeat(255)]
        {
            assert!(etc.contains(present), "{present} missing from /etc:\n{etc}");
        }
        assert!(!etc.contains("doomed") && !etc.contains(".wh."), "whiteouts applied:\n{etc}");
        let owned = debugfs(&first, "stat /etc/owned");
        assert!(owned.contains("User:  1234   Group:  5678"), "{owned}");
        let null = debugfs(&first, "stat /etc/null");
        assert!(
            null.contains("Type: character special") && null.contains("Device major/minor number: 01:03"),
            "{null}"
        );
        let setuid = debugfs(&first, "stat /usr/bin/setuid");
        assert!(setuid.contains("Mode:  04755"), "{setuid}");
        let opaque = debugfs(&first, "ls /opaque");
        assert!(opaque.contains("upper") && !opaque.contains("lower"), "{opaque}");
        let link = debugfs(&first, "stat /etc/cross-layer");
        assert!(link.contains("Links: 3"), "original, alias and cross-layer share one inode:\n{link}");
        let capability = debugfs(&first, "ea_list /usr/bin/capable");
        assert!(capability.contains("security.capability"), "{capability}");
        let user = debugfs(&first, "ea_list /etc/user-xattr");
        assert!(user.contains("user.banger") && user.contains("fixture"), "{user}");
        assert_eq!(debugfs(&first, "cat /etc/keeps-old"), "old");

        let second = dir.path().join("second.ext4");
        build(&plan, &layers, &seed, 64 * MIB, &second).expect("build again");
        let bytes = |path: &Path| std::fs::read(path).expect("read");
        assert!(bytes(&first) == bytes(&second), "the same input makes the same bytes");
    }
}
