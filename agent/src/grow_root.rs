//! As init: the root file system grows to fill its disk (a VM created with a disk bigger
//! than its image), online, with ext4's resize ioctl: what `resize2fs` does on a mounted file
//! system, without needing it in the image.

use std::io;
use std::os::fd::AsRawFd;

/// `BLKGETSIZE64`: a block device's size in bytes.
const BLKGETSIZE64: nix::libc::c_ulong = 0x8008_1272;
/// `EXT4_IOC_RESIZE_FS`: grow a mounted ext4 to this many blocks.
const EXT4_IOC_RESIZE_FS: nix::libc::c_ulong = 0x4008_6610;

/// The device and type of the file system mounted on `/`, from `/proc/self/mountinfo`.
fn root_mount(mountinfo: &str) -> Option<(String, String)> {
    mountinfo.lines().rev().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let mount_point = before.split(' ').nth(4)?;
        let mut after = after.split(' ');
        let (fstype, source) = (after.next()?, after.next()?);
        (mount_point == "/").then(|| (source.to_owned(), fstype.to_owned()))
    })
}

/// Grows the root file system to its device's size when it is ext4 and smaller; returns
/// the new size in bytes when it grew.
pub fn grow_root() -> io::Result<Option<u64>> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let Some((device, fstype)) = root_mount(&mountinfo) else {
        return Ok(None);
    };
    if fstype != "ext4" || !device.starts_with("/dev/") {
        return Ok(None);
    }
    let disk = std::fs::File::open(&device)?;
    let mut device_bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which outlives the call.
    if unsafe { nix::libc::ioctl(disk.as_raw_fd(), BLKGETSIZE64, &mut device_bytes as *mut u64) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let stat = nix::sys::statvfs::statvfs("/").map_err(io::Error::from)?;
    let block = stat.block_size().max(1);
    let fs_bytes = stat.blocks() * stat.fragment_size();
    let blocks = device_bytes / block;
    // statvfs leaves out the file system's own overhead: only a device clearly bigger than
    // what it shows is worth a call (the kernel does nothing when the counts are equal).
    if device_bytes <= fs_bytes + 64 * 1024 * 1024 {
        return Ok(None);
    }
    let root = std::fs::File::open("/")?;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 through the pointer, which outlives the call.
    if unsafe { nix::libc::ioctl(root.as_raw_fd(), EXT4_IOC_RESIZE_FS, &blocks as *const u64) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(blocks * block))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_mount_is_the_last_one_on_slash() {
        let mountinfo = "1 0 0:2 / / rw - rootfs rootfs rw\n\
                         20 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                         21 20 0:5 / /dev rw - devtmpfs devtmpfs rw,size=1k\n";
        assert_eq!(root_mount(mountinfo), Some(("/dev/vda".into(), "ext4".into())));
        assert_eq!(root_mount("21 20 0:5 / /dev rw - devtmpfs devtmpfs rw\n"), None);
    }
}
