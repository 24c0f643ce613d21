//! The local terminal during a guest terminal session: raw mode that is always undone (on
//! return, on errors, on a panic, on SIGTERM/SIGHUP), its size, and its input as a stream.
//!
//! In raw mode the local terminal neither echoes nor interprets keys: Ctrl-C is the byte 0x03,
//! typed into the guest's terminal, whose line discipline interrupts the guest's foreground
//! process group; the CLI itself is not interrupted.

use std::io::{IsTerminal, Read};
use std::os::fd::BorrowedFd;
use std::sync::Mutex;

use nix::libc;
use nix::sys::termios::{self, SetArg, Termios};

/// The settings to put back, while raw mode is on (for the panic hook and signal handling).
static SAVED: Mutex<Option<Termios>> = Mutex::new(None);

fn stdin() -> BorrowedFd<'static> {
    // SAFETY: fd 0 stays open for the life of the process.
    unsafe { BorrowedFd::borrow_raw(0) }
}

/// Whether standard input and standard output are both terminals.
pub fn interactive() -> bool {
    std::io::stdin().is_terminal() && std::io::stdout().is_terminal()
}

/// The size of the terminal on standard output (else standard input): (rows, columns).
pub fn size() -> Option<(u32, u32)> {
    for fd in [1, 0] {
        let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which outlives the call.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size as *mut libc::winsize) } == 0 && size.ws_row > 0 {
            return Some((size.ws_row.into(), size.ws_col.into()));
        }
    }
    None
}

/// TERM to give the guest: this terminal's own.
pub fn term() -> String {
    std::env::var("TERM").ok().filter(|term| !term.is_empty()).unwrap_or_else(|| "xterm".to_owned())
}

/// Raw mode on standard input until dropped.
pub struct RawMode(());

impl RawMode {
    /// Puts the terminal on standard input in raw mode; None when it is not a terminal.
    pub fn enter() -> Option<Self> {
        let fd = stdin();
        let saved = termios::tcgetattr(fd).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        *SAVED.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(saved);
        install_panic_hook();
        if termios::tcsetattr(fd, SetArg::TCSADRAIN, &raw).is_err() {
            restore();
            return None;
        }
        Some(Self(()))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

/// Puts back the saved settings, if raw mode is on.
pub fn restore() {
    let saved = SAVED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    if let Some(saved) = saved {
        let _ = termios::tcsetattr(stdin(), SetArg::TCSADRAIN, &saved);
    }
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}

/// Standard input as it comes, read by a thread of its own: a read blocked on a terminal
/// would otherwise keep the async runtime from shutting down at exit.
pub fn input() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let spawned = std::thread::Builder::new().name("stdin".into()).spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            match stdin.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.blocking_send(buffer[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    if let Err(err) = spawned {
        eprintln!("banger: cannot read standard input: {err}");
    }
    rx
}
