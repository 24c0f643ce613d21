//! As init: the root every guest process expects, as a container runtime gives a container:
//! `/proc`, `/sys`, `/dev` (devtmpfs) with `/dev/pts` (terminals) and `/dev/shm`. An image
//! without the mount points (one built `FROM scratch`) gets them made; what still cannot be
//! set up is remembered, and Ready reports it instead of the agent claiming a usable guest.

use std::io;
use std::path::Path;
use std::sync::OnceLock;

use nix::mount::{MsFlags, mount};

/// Why the root could not be set up, once [`prepare`] ran and found something.
static PROBLEM: OnceLock<String> = OnceLock::new();

/// One file system the guest needs.
struct Needed {
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NEEDED: [Needed; 5] = [
    Needed { target: "/proc", fstype: "proc", flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV), data: None },
    Needed { target: "/sys", fstype: "sysfs", flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV), data: None },
    Needed { target: "/dev", fstype: "devtmpfs", flags: MsFlags::MS_NOSUID, data: Some("mode=0755") },
    Needed {
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    },
    Needed {
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
];

/// The mount points of `/proc/self/mountinfo`.
fn mount_points(mountinfo: &str) -> Vec<&str> {
    mountinfo.lines().filter_map(|line| line.split(' ').nth(4)).collect()
}

/// Mounts what is missing; records and returns what could not be done.
pub fn prepare() -> Result<(), String> {
    let mut problems = Vec::new();
    for needed in &NEEDED {
        // Read again each time: /proc itself may have just been mounted.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        if mount_points(&mountinfo).contains(&needed.target) {
            continue;
        }
        if let Err(err) = mount_one(needed) {
            problems.push(format!("cannot mount {} on {}: {err}", needed.fstype, needed.target));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let problem = problems.join("; ");
    let _ = PROBLEM.set(problem.clone());
    Err(problem)
}

fn mount_one(needed: &Needed) -> io::Result<()> {
    let target = Path::new(needed.target);
    match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => {}
        // Something else where a mount point belongs is the image's: not replaced.
        Ok(_) => return Err(io::Error::other("the image has something there that is not a directory")),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir(target)?;
            std::fs::set_permissions(target, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        }
        Err(err) => return Err(err),
    }
    mount(Some(needed.fstype), target, Some(needed.fstype), needed.flags, needed.data).map_err(io::Error::from)
}

/// Why the guest's root is unusable, if [`prepare`] found it so.
pub fn problem() -> Option<&'static str> {
    PROBLEM.get().map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_the_fifth_field() {
        let mountinfo = "20 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                         21 20 0:5 / /dev rw - devtmpfs devtmpfs rw,size=1k\n\
                         22 21 0:6 / /dev/pts rw - devpts devpts rw\n";
        assert_eq!(mount_points(mountinfo), vec!["/", "/dev", "/dev/pts"]);
    }
}
