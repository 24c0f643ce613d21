//! A qcow2 overlay over a raw base, written directly: the same empty image `qemu-img create
//! -f qcow2 -b BASE -F raw` makes (format version 3, 64 KiB clusters, 16-bit refcounts), in
//! a few hundred microseconds instead of a process spawn.
//!
//! Layout, one cluster each: the header (with the backing file's format and name), the
//! refcount table, one refcount block, then the L1 table (all entries zero: every read goes
//! to the base until the guest writes).

use std::{io, os::unix::fs::FileExt, path::Path};

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// Bytes the guest addresses through one L1 entry: an L2 table of 8-byte entries, each
/// mapping one cluster.
const BYTES_PER_L1_ENTRY: u64 = CLUSTER * (CLUSTER / 8);
/// The fixed part of a version 3 header, with the compression type byte and its padding.
const HEADER_LENGTH: u32 = 112;
/// Header extension: the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// 16-bit refcounts.
const REFCOUNT_ORDER: u32 = 4;

const REFCOUNT_TABLE_AT: u64 = CLUSTER;
const REFCOUNT_BLOCK_AT: u64 = 2 * CLUSTER;
const L1_TABLE_AT: u64 = 3 * CLUSTER;

/// The image's bytes that are not zero, by offset: its header cluster, the refcount table's
/// one entry and the refcount block's entries. Everything else (the L1 table) is zero.
fn layout(base: &Path, format: &[u8], virtual_size: u64) -> io::Result<Vec<(u64, Vec<u8>)>> {
    let name = base.as_os_str().as_encoded_bytes();
    let mut extensions = Vec::new();
    extensions.extend(EXT_BACKING_FORMAT.to_be_bytes());
    extensions.extend((format.len() as u32).to_be_bytes());
    extensions.extend(format);
    extensions.resize(extensions.len().next_multiple_of(8), 0);
    extensions.extend([0u8; 8]); // end of extensions
    let name_at = u64::from(HEADER_LENGTH) + extensions.len() as u64;
    if name.is_empty() || name_at + name.len() as u64 > CLUSTER || name.len() > 1023 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the base's path is too long for a qcow2 header"));
    }
    let l1_entries = virtual_size.div_ceil(BYTES_PER_L1_ENTRY);
    let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER).max(1);
    // One refcount block of 16-bit entries covers 32,768 clusters: a 4 TiB guest's L1 table.
    let clusters = 3 + l1_clusters;
    if clusters > CLUSTER / 2 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the base is too large for a one-block refcount"));
    }

    let mut header = Vec::with_capacity(name_at as usize + name.len());
    header.extend(b"QFI\xfb");
    header.extend(3u32.to_be_bytes()); // version
    header.extend(name_at.to_be_bytes()); // backing_file_offset
    header.extend((name.len() as u32).to_be_bytes()); // backing_file_size
    header.extend(CLUSTER_BITS.to_be_bytes());
    header.extend(virtual_size.to_be_bytes());
    header.extend(0u32.to_be_bytes()); // crypt_method: none
    header.extend((l1_entries as u32).to_be_bytes()); // l1_size
    header.extend(L1_TABLE_AT.to_be_bytes());
    header.extend(REFCOUNT_TABLE_AT.to_be_bytes());
    header.extend(1u32.to_be_bytes()); // refcount_table_clusters
    header.extend(0u32.to_be_bytes()); // nb_snapshots
    header.extend(0u64.to_be_bytes()); // snapshots_offset
    header.extend(0u64.to_be_bytes()); // incompatible_features
    header.extend(0u64.to_be_bytes()); // compatible_features
    header.extend(0u64.to_be_bytes()); // autoclear_features
    header.extend(REFCOUNT_ORDER.to_be_bytes());
    header.extend(HEADER_LENGTH.to_be_bytes());
    header.resize(HEADER_LENGTH as usize, 0); // compression type zlib, padding
    header.extend(extensions);
    header.extend(name);

    let refcounts: Vec<u8> = (0..clusters).flat_map(|_| 1u16.to_be_bytes()).collect();
    Ok(vec![(0, header), (REFCOUNT_TABLE_AT, REFCOUNT_BLOCK_AT.to_be_bytes().to_vec()), (REFCOUNT_BLOCK_AT, refcounts)])
}

/// Creates `disk`, a qcow2 overlay over the raw file `base` (its size is the guest's disk
/// size). Fails if `disk` exists; removes what it wrote when it fails.
pub fn create_overlay(base: &Path, disk: &Path, size: u64) -> io::Result<()> {
    let (format, base_size): (&[u8], u64) = match qcow2_virtual_size(base)? {
        // A snapshot's frozen disk: itself an overlay.
        Some(virtual_size) => (b"qcow2", virtual_size),
        None => (b"raw", std::fs::metadata(base)?.len()),
    };
    let virtual_size = base_size.max(size);
    let pieces = layout(base, format, virtual_size)?;
    let file = std::fs::File::create_new(disk)?;
    let written = pieces
        .iter()
        .try_for_each(|(offset, bytes)| file.write_all_at(bytes, *offset))
        .and_then(|()| file.set_len(L1_TABLE_AT + virtual_size.div_ceil(BYTES_PER_L1_ENTRY) * 8));
    if written.is_err() {
        let _ = std::fs::remove_file(disk);
    }
    written
}

/// The virtual size of `path` when it is a qcow2 image; `None` when it is not one.
fn qcow2_virtual_size(path: &Path) -> io::Result<Option<u64>> {
    let mut header = [0u8; 32];
    let file = std::fs::File::open(path)?;
    match file.read_exact_at(&mut header, 0) {
        Ok(()) if &header[..4] == b"QFI\xfb" => {
            Ok(Some(u64::from_be_bytes(header[24..32].try_into().map_err(io::Error::other)?)))
        }
        Ok(()) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_names_the_base_and_its_size() {
        let pieces = layout(Path::new("/images/default/rootfs.ext4"), b"raw", 1 << 30).expect("layout");
        let header = &pieces[0].1;
        let be64 = |at: usize| u64::from_be_bytes(header[at..at + 8].try_into().expect("8 bytes"));
        let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        assert_eq!(&header[..4], b"QFI\xfb");
        assert_eq!(be32(4), 3);
        assert_eq!(be64(24), 1 << 30, "virtual size");
        assert_eq!(be32(36), 2, "two L1 entries map 1 GiB");
        let (name_at, name_len) = (be64(8) as usize, be32(16) as usize);
        assert_eq!(&header[name_at..name_at + name_len], b"/images/default/rootfs.ext4");
        assert_eq!(&header[120..123], b"raw", "the backing format extension");
        assert_eq!(pieces[2].1, [0, 1, 0, 1, 0, 1, 0, 1], "four clusters in use");
    }

    #[test]
    fn refuses_what_does_not_fit() {
        assert!(layout(Path::new(&"a".repeat(2000)), b"raw", 1 << 20).is_err());
        assert!(layout(Path::new(""), b"raw", 1 << 20).is_err());
    }

    /// Checked by QEMU's own tool where it is installed (it is, after `make setup`).
    #[test]
    fn qemu_img_reads_the_overlay_as_its_own() {
        let Ok(version) = std::process::Command::new("qemu-img").arg("--version").output() else {
            banger_tests::skip("qemu-img is not installed (make setup installs it)");
            return;
        };
        assert!(version.status.success());
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, disk) = (dir.path().join("base.raw"), dir.path().join("root.qcow2"));
        std::fs::File::create(&base).expect("base").set_len(3 << 30).expect("3 GiB");
        create_overlay(&base, &disk, 0).expect("overlay");
        assert!(create_overlay(&base, &disk, 0).is_err(), "an existing disk is never overwritten");
        // A disk asked bigger than its base: the rest reads as zeros.
        let bigger = dir.path().join("bigger.qcow2");
        create_overlay(&base, &bigger, 5 << 30).expect("bigger overlay");
        let info =
            std::process::Command::new("qemu-img").args(["info", "--output=json"]).arg(&bigger).output().expect("info");
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
        assert_eq!(info["virtual-size"], 5u64 << 30);
        let io = std::process::Command::new("qemu-io").args(["-c", "read -P 0 4G 64k"]).arg(&bigger).output();
        if let Ok(io) = io {
            let said = String::from_utf8_lossy(&io.stdout);
            assert!(io.status.success() && !said.contains("fail"), "beyond the base: {said}");
        }
        let check = std::process::Command::new("qemu-img").arg("check").arg(&disk).output().expect("check");
        assert!(check.status.success(), "qemu-img check: {}", String::from_utf8_lossy(&check.stdout));
        let info =
            std::process::Command::new("qemu-img").args(["info", "--output=json"]).arg(&disk).output().expect("info");
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 3u64 << 30);
        assert_eq!(info["backing-filename"], base.to_str().expect("utf-8"));
        assert_eq!(info["backing-filename-format"], "raw");
        // Writes through QEMU land in the overlay, never in the base.
        let io = std::process::Command::new("qemu-io")
            .args(["-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k", "-c", "read -P 0 0 64k"])
            .arg(&disk)
            .output();
        if let Ok(io) = io {
            let said = String::from_utf8_lossy(&io.stdout);
            assert!(io.status.success() && !said.contains("fail"), "qemu-io: {said}");
            let check = std::process::Command::new("qemu-img").arg("check").arg(&disk).output().expect("check");
            assert!(check.status.success(), "after a write: {}", String::from_utf8_lossy(&check.stdout));
        }
        let mut written_region = vec![1u8; 64 << 10];
        std::fs::File::open(&base).expect("base").read_exact_at(&mut written_region, 1 << 20).expect("read");
        assert!(written_region.iter().all(|b| *b == 0), "the base is never written");
    }

    #[test]
    fn an_overlay_over_an_overlay_names_it_as_qcow2_with_its_virtual_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, frozen, clone) =
            (dir.path().join("base.raw"), dir.path().join("frozen.qcow2"), dir.path().join("clone.qcow2"));
        std::fs::File::create(&base).expect("base").set_len(1 << 30).expect("1 GiB");
        create_overlay(&base, &frozen, 2 << 30).expect("frozen");
        create_overlay(&frozen, &clone, 0).expect("clone");
        let header = std::fs::read(&clone).expect("clone");
        assert_eq!(u64::from_be_bytes(header[24..32].try_into().expect("8 bytes")), 2 << 30, "the base's virtual size");
        assert_eq!(&header[120..125], b"qcow2", "the backing format extension");
        let Ok(info) = std::process::Command::new("qemu-img").args(["info", "--output=json"]).arg(&clone).output()
        else {
            banger_tests::skip("qemu-img is not installed (make setup installs it)");
            return;
        };
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
        assert_eq!(info["backing-filename-format"], "qcow2");
        assert_eq!(info["virtual-size"], 2u64 << 30);
    }
}
