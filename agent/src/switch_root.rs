//! `--switch-root DIR`: PID 1 moves the root file system mounted at DIR onto `/` and chroots
//! into it, as `switch_root` does, but keeps running: the agent started from the initramfs
//! becomes init over an image that does not carry it (a container image), and nothing is
//! written into that image.

use std::io;
use std::path::Path;

use nix::mount::{MsFlags, mount};
use nix::unistd::{chdir, chroot};

/// Makes `new_root` the root of this process (and of every process it starts).
pub fn switch_root(new_root: &Path) -> io::Result<()> {
    chdir(new_root).map_err(|err| io::Error::other(format!("chdir {}: {err}", new_root.display())))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|err| io::Error::other(format!("moving {} onto /: {err}", new_root.display())))?;
    chroot(".").map_err(|err| io::Error::other(format!("chroot: {err}")))?;
    chdir("/").map_err(|err| io::Error::other(format!("chdir /: {err}")))?;
    Ok(())
}
