//! Pseudo-terminals for exec: a master the agent reads and writes without blocking, a peer
//! (the slave) that becomes the process's standard streams and controlling terminal.
//!
//! The peer is opened from the master (`TIOCGPTPEER`), never by a path under /dev/pts that
//! the guest could have replaced; both ends are close-on-exec, so no other process the agent
//! starts holds them (which would keep the terminal open after its process ended).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::OFlag;
use nix::libc;
use nix::pty::{posix_openpt, unlockpt};

/// Size used when the request gives none: the classic terminal.
pub const DEFAULT_ROWS: u16 = 24;
/// See [`DEFAULT_ROWS`].
pub const DEFAULT_COLUMNS: u16 = 80;
/// TERM when the request gives none.
pub const DEFAULT_TERM: &str = "xterm";

/// A new pseudo-terminal pair.
pub struct Pty {
    /// The agent's end: non-blocking.
    pub master: OwnedFd,
    /// The process's end: blocking, as programs expect of a terminal.
    pub peer: OwnedFd,
}

/// Opens a pseudo-terminal of `rows` x `columns` (each at least 1).
pub fn open(rows: u16, columns: u16) -> io::Result<Pty> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    unlockpt(&master)?;
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new fd or -1.
    let peer: RawFd = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if peer < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl just returned this fd, owned by nobody else.
    let peer = unsafe { OwnedFd::from_raw_fd(peer) };
    // SAFETY: PtyMaster owns its fd; into_raw_fd hands that ownership over.
    let master = unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(master)) };
    set_size(&master, rows, columns)?;
    Ok(Pty { master, peer })
}

/// Sets the terminal's size; the kernel sends SIGWINCH to its foreground process group.
pub fn set_size(master: &OwnedFd, rows: u16, columns: u16) -> io::Result<()> {
    let size = libc::winsize { ws_row: rows.max(1), ws_col: columns.max(1), ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize through the pointer, which outlives the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size as *const libc::winsize) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The terminal's end-of-file character (VEOF, normally Ctrl-D), as typed to end input.
pub fn eof_char(master: &OwnedFd) -> u8 {
    nix::sys::termios::tcgetattr(master)
        .map(|attrs| attrs.control_chars[nix::sys::termios::SpecialCharacterIndices::VEOF as usize])
        .unwrap_or(0x04)
}

/// In the child, before exec: a new session whose controlling terminal is stdin (the peer).
/// Only async-signal-safe calls.
pub fn become_session_leader() -> io::Result<()> {
    nix::unistd::setsid().map_err(io::Error::from)?;
    // SAFETY: TIOCSCTTY takes an int by value; stdin is the peer, dup2'd there by Command.
    if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Clamps a requested size to what a terminal holds; 0 takes the default.
pub fn dimension(requested: u32, default: u16) -> u16 {
    if requested == 0 { default } else { u16::try_from(requested).unwrap_or(u16::MAX) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_terminal_has_the_requested_size_and_a_peer() {
        let pty = open(40, 120).expect("openpty");
        let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCGWINSZ writes one winsize through the pointer.
        let got = unsafe { libc::ioctl(pty.peer.as_raw_fd(), libc::TIOCGWINSZ, &mut size as *mut libc::winsize) };
        assert_eq!(got, 0);
        assert_eq!((size.ws_row, size.ws_col), (40, 120));
        set_size(&pty.master, 10, 20).expect("resize");
        // SAFETY: as above.
        unsafe { libc::ioctl(pty.peer.as_raw_fd(), libc::TIOCGWINSZ, &mut size as *mut libc::winsize) };
        assert_eq!((size.ws_row, size.ws_col), (10, 20));
        assert_eq!(eof_char(&pty.master), 0x04);
        assert_eq!((dimension(0, 24), dimension(70_000, 24), dimension(5, 24)), (24, u16::MAX, 5));
    }
}
