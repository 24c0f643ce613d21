//! The agent channel over a virtio-serial port (`virtserialport` named [`PORT_NAME`]): plain
//! device state, so it survives the VMM's save and restore, unlike vhost-user-vsock.
//!
//! The port carries one host connection at a time. The host opens its side (QEMU's
//! unix-socket chardev), writes `CONNECT <port>\n` and waits for `OK <port>\n`, as over
//! hybrid vsock; HTTP/2 follows. While no host is connected a read returns end of file at
//! once, so the port's thread sleeps until the kernel signals it (`SIGIO`: the host opened
//! its side, or data came), at most [`IDLE_WAIT`]; whatever arrives before a `CONNECT` line
//! (the rest of a connection the host dropped) is discarded; a `PING` line is answered
//! `PONG` (the port is idle) without starting a connection (`PING <key>`: the host uses a key
//! it rotated to, which retires the old one; see `auth`). An `IDENTITY <key> <hex>` line
//! carries the host's key (refused, `IDENTITY ERROR 16`, unless it is the agent's) and a
//! `SetIdentityRequest` (protobuf, hex-encoded): it is applied in place and answered
//! `IDENTITY OK` or `IDENTITY ERROR <grpc code> <message>`, also without a connection. This is
//! how a VM restored from a snapshot learns who it is with the least code the guest has not
//! run in this VMM before (each block of it is translated first under emulation): a first
//! HTTP/2 call would run more such code than the whole identity. When the host goes, the
//! port's end of file ends the connection's HTTP/2 session, and the port waits for the next
//! host.
//! Sleeping on the signal rather than polling keeps an idle guest idle (a guest under
//! emulation pays for every wake-up) and answers a host at once.
//!
//! The port is read and written with blocking calls on two threads that live as long as it,
//! bridged to the async server by an in-memory pipe: the port's readiness (it reports hang-up
//! while no host is connected) does not fit an edge-triggered reactor.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_proto::agent::v1::SetIdentityRequest;
use nix::libc;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf};
use tokio::sync::mpsc;

/// The name the host gives the agent's port.
pub const PORT_NAME: &str = "banger.agent";
/// The longest an idle port waits for the kernel's signal before it is read again (the
/// signal makes this a backstop only).
const IDLE_WAIT: Duration = Duration::from_millis(500);
/// How often an idle port is read again where the kernel cannot signal it.
const POLL_WITHOUT_SIGNAL: Duration = Duration::from_millis(20);
/// The pause after a failed read of the port.
const ERROR_PAUSE: Duration = Duration::from_millis(20);
/// `fcntl` commands and owner kind from Linux's `<fcntl.h>` (the same on x86-64 and arm64).
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;

/// `struct f_owner_ex`.
#[repr(C)]
struct OwnerEx {
    kind: libc::c_int,
    pid: libc::pid_t,
}
/// The longest line read while waiting for `CONNECT` (an `IDENTITY` line with the most
/// entropy the agent takes is ~1.3 KiB).
const MAX_LINE: usize = 4096;
/// Bytes moved per read or write, and buffered in the pipe each way.
const CHUNK: usize = 64 * 1024;

/// The device of the port named [`PORT_NAME`] (`/dev/vportNpM`), if the VM has one.
pub fn find_port() -> Option<PathBuf> {
    let ports = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    ports.filter_map(Result::ok).find_map(|entry| {
        let name = std::fs::read_to_string(entry.path().join("name")).ok()?;
        (name.trim() == PORT_NAME).then(|| Path::new("/dev").join(entry.file_name()))
    })
}

/// One host connection over the port, as the server sees it.
pub struct SerialConnection(DuplexStream);

impl tonic::transport::server::Connected for SerialConnection {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl tokio::io::AsyncRead for SerialConnection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SerialConnection {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Host connections on the port at `path`, one after another, each past its `CONNECT`
/// handshake. Ends only if the port cannot be opened.
pub fn incoming(path: PathBuf) -> tokio_stream::wrappers::ReceiverStream<io::Result<SerialConnection>> {
    let (connections, stream) = mpsc::channel(1);
    let runtime = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        let port = match std::fs::OpenOptions::new().read(true).write(true).open(&path) {
            Ok(port) => port,
            Err(error) => {
                log!("cannot open {}: {error}", path.display());
                let _ = connections.blocking_send(Err(error));
                return;
            }
        };
        let writer = match PortWriter::start(&port, &runtime) {
            Ok(writer) => writer,
            Err(error) => {
                log!("virtio-serial: cannot start the port's writer: {error}");
                let _ = connections.blocking_send(Err(error));
                return;
            }
        };
        let wake_ups = signal_on_events(&port);
        if let Err(error) = &wake_ups {
            log!("virtio-serial: no SIGIO for the port ({error}): reading it every {POLL_WITHOUT_SIGNAL:?}");
        }
        loop {
            let port_number = match wait_connect(&port, wake_ups.is_ok(), crate::service::apply_identity) {
                Ok(port_number) => port_number,
                Err(error) => {
                    log!("virtio-serial: {error}");
                    std::thread::sleep(ERROR_PAUSE);
                    continue;
                }
            };
            if let Err(error) = (&port).write_all(format!("OK {port_number}\n").as_bytes()) {
                log!("virtio-serial: cannot answer CONNECT: {error}");
                continue;
            }
            let (ours, theirs) = tokio::io::duplex(CHUNK);
            if connections.blocking_send(Ok(SerialConnection(theirs))).is_err() {
                return;
            }
            // Connections are not logged: a console line is a serial device's work for every
            // byte, paid again (as new code) by each clone of a snapshot on its way to ready.
            bridge(&port, ours, &runtime, &writer);
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(stream)
}

/// Has the kernel signal the calling thread (`SIGIO`) when the port's host connects or
/// sends data. The signal is blocked in this thread, which takes it with [`wait_signal`], and
/// goes to no other thread.
fn signal_on_events(port: &File) -> io::Result<()> {
    let fd = port.as_raw_fd();
    // SAFETY: plain system calls on a descriptor this thread owns and on its own signal mask.
    unsafe {
        let set = sigio_set();
        let failed = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if failed != 0 {
            return Err(io::Error::from_raw_os_error(failed));
        }
        let owner = OwnerEx { kind: F_OWNER_TID, pid: libc::gettid() };
        if libc::fcntl(fd, F_SETOWN_EX, &owner as *const OwnerEx) < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_ASYNC) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn sigio_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set it is given.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGIO);
        set
    }
}

/// Sleeps until `SIGIO` (one that came while the thread was busy counts) or `limit`.
fn wait_signal(limit: Duration) {
    let set = sigio_set();
    let timeout = libc::timespec { tv_sec: limit.as_secs() as libc::time_t, tv_nsec: limit.subsec_nanos().into() };
    // SAFETY: both pointers are to live locals; the info pointer may be null.
    unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
}

/// Reads until a host's `CONNECT <port>` line; returns the port it names. With `signalled`,
/// the port's `SIGIO` ends each wait for a host early. `PING` and `IDENTITY` lines are
/// answered on the way, an identity applied with `apply`.
fn wait_connect(
    mut port: &File,
    signalled: bool,
    apply: impl Fn(&SetIdentityRequest, crate::auth::Key) -> Result<(), tonic::Status>,
) -> io::Result<u32> {
    let mut line = Vec::with_capacity(MAX_LINE);
    let mut overlong = false;
    loop {
        let mut byte = [0u8; 1];
        if port.read(&mut byte)? == 0 {
            // No host (or it left mid-line): start over once one writes.
            line.clear();
            overlong = false;
            match signalled {
                true => wait_signal(IDLE_WAIT),
                false => std::thread::sleep(POLL_WITHOUT_SIGNAL),
            }
            continue;
        }
        if byte[0] != b'\n' {
            match line.len() < MAX_LINE {
                true => line.push(byte[0]),
                false => overlong = true,
            }
            continue;
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        let cut = std::mem::replace(&mut overlong, false);
        line.clear();
        if let Some(number) = text.strip_prefix("CONNECT ").and_then(|n| n.trim().parse().ok()) {
            return Ok(number);
        }
        if let Some(words) = text.strip_prefix("IDENTITY ") {
            // The key first: nothing of an unauthenticated line is decoded.
            let (key, encoded) = words.trim().split_once(' ').unwrap_or(("", words));
            let outcome = match cut {
                true => Err(tonic::Status::invalid_argument(format!("identity line over {MAX_LINE} bytes"))),
                false => crate::auth::parse_hex(key)
                    .ok_or_else(|| tonic::Status::unauthenticated("the host's key is missing or wrong"))
                    .and_then(|key| crate::auth::check(&key))
                    .and_then(|key| decode_identity(encoded.trim()).and_then(|request| apply(&request, key))),
            };
            let answer = match outcome {
                Ok(()) => "IDENTITY OK\n".to_owned(),
                Err(status) => {
                    let message = status.message().replace(['\n', '\r'], " ");
                    format!("IDENTITY ERROR {} {message}\n", status.code() as i32)
                }
            };
            port.write_all(answer.as_bytes())?;
            continue;
        }
        if let Some(key) = text.trim().strip_prefix("PING").map(str::trim) {
            // The host checks that the port is idle (the last connection is over, here
            // too) before it stops the vCPUs for a snapshot, so that no clone starts by
            // ending a connection of its source's. With a key, it has written that key down
            // (after an identity that rotated it): its use retires the old one. The answer
            // is the same either way, and says nothing of the key.
            if let Some(key) = crate::auth::parse_hex(key) {
                let _ = crate::auth::check(&key);
            }
            port.write_all(b"PONG\n")?;
        }
    }
}

/// A hex-encoded `SetIdentityRequest`.
fn decode_identity(encoded: &str) -> Result<SetIdentityRequest, tonic::Status> {
    let invalid = |what: &str| tonic::Status::invalid_argument(format!("identity line: {what}"));
    let bytes = hex::decode(encoded).map_err(|err| match err {
        hex::FromHexError::OddLength => invalid("odd number of hex digits"),
        _ => invalid("not hex"),
    })?;
    SetIdentityRequest::decode(bytes.as_slice()).map_err(|_| invalid("not a SetIdentityRequest"))
}

/// The thread that writes what the server sends to the port, one connection after another.
/// It lives as long as the port's reader: starting a thread per connection would run the
/// kernel's thread creation and exit (new code for a guest restored from a snapshot) on the
/// way to its first call's answer.
struct PortWriter {
    connections: std::sync::mpsc::Sender<ReadHalf<DuplexStream>>,
    finished: std::sync::mpsc::Receiver<()>,
}

impl PortWriter {
    fn start(port: &File, runtime: &tokio::runtime::Handle) -> io::Result<Self> {
        let mut out = port.try_clone()?;
        let runtime = runtime.clone();
        let (connections, pipes) = std::sync::mpsc::channel::<ReadHalf<DuplexStream>>();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            for mut from_server in pipes {
                loop {
                    match runtime.block_on(from_server.read(&mut buf)) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if out.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                // Dropping the read half before saying so: the connection is over here.
                drop(from_server);
                if done.send(()).is_err() {
                    return;
                }
            }
        });
        Ok(Self { connections, finished })
    }
}

/// Moves bytes between the port and the server's end of the pipe until the host goes (the
/// port's end of file) or the server ends the connection; `writer` carries the server's
/// bytes out.
fn bridge(port: &File, pipe: DuplexStream, runtime: &tokio::runtime::Handle, writer: &PortWriter) {
    let (from_server, mut to_server) = tokio::io::split(pipe);
    let writing = writer.connections.send(from_server).is_ok();
    let mut buf = vec![0u8; CHUNK];
    let mut port = port;
    loop {
        match port.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if runtime.block_on(to_server.write_all(&buf[..n])).is_err() {
                    break;
                }
            }
        }
    }
    // The host went: the server sees end of file, ends the session and closes its end,
    // which ends the writer's part.
    let _ = runtime.block_on(to_server.shutdown());
    drop(to_server);
    if writing {
        let _ = writer.finished.recv();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// The port as the agent sees it, and the host's end.
    fn port() -> (File, UnixStream) {
        let (guest, host) = UnixStream::pair().expect("socket pair");
        (File::from(std::os::fd::OwnedFd::from(guest)), host)
    }

    #[test]
    fn a_ping_is_answered_and_stale_bytes_are_skipped_before_a_connect() {
        let (guest, mut host) = port();
        host.write_all(b"\x00\x01stale h2 bytes\nPING\nCONNECT 1024\n").expect("write");
        assert_eq!(wait_connect(&guest, false, |_, _| panic!("no identity was sent")).expect("a connect"), 1024);
        let mut answer = [0u8; 5];
        host.read_exact(&mut answer).expect("the answer");
        assert_eq!(&answer, b"PONG\n");
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// What the host reads back, up to and including the `PONG` that ends it.
    fn replies_until_pong(host: &mut UnixStream) -> String {
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !seen.ends_with(b"PONG\n") {
            host.read_exact(&mut byte).expect("a reply byte");
            seen.push(byte[0]);
        }
        String::from_utf8(seen).expect("text")
    }

    #[test]
    fn identity_lines_are_applied_and_answered_before_a_connect() {
        let (guest, mut host) = port();
        let request = SetIdentityRequest {
            hostname: "clone-1".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            entropy: vec![7; 512],
            realtime_ns: 42,
            ..SetIdentityRequest::default()
        };
        let refused = SetIdentityRequest { hostname: "Not A Name".into(), ..SetIdentityRequest::default() };
        let _store = crate::auth::TEST_LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = [9u8; crate::auth::KEY_BYTES];
        crate::auth::init(Some(key));
        let key = hex(&key);
        let mut lines = format!("IDENTITY {key} {}\n", hex(&request.encode_to_vec()));
        lines += &format!("IDENTITY {key} {}\n", hex(&refused.encode_to_vec()));
        lines += &format!("IDENTITY {key} 0g\nIDENTITY {key} abc\n");
        lines += &format!("IDENTITY {key} {}\n", "ab".repeat(MAX_LINE));
        // Without the key, or with another: refused before anything is decoded.
        lines += &format!("IDENTITY {}\n", hex(&request.encode_to_vec()));
        lines += &format!("IDENTITY {} {}\n", "07".repeat(32), hex(&request.encode_to_vec()));
        lines += "PING\nCONNECT 1024\n";
        host.write_all(lines.as_bytes()).expect("write");
        let applied = std::sync::Mutex::new(Vec::new());
        let apply = |request: &SetIdentityRequest, _: crate::auth::Key| {
            applied.lock().expect("lock").push(request.clone());
            match request.hostname.as_str() {
                "clone-1" => Ok(()),
                other => Err(tonic::Status::invalid_argument(format!("not a hostname:\n{other:?}"))),
            }
        };
        assert_eq!(wait_connect(&guest, false, apply).expect("a connect"), 1024);
        assert_eq!(applied.lock().expect("lock").as_slice(), [request, refused]);
        let replies = replies_until_pong(&mut host);
        let replies: Vec<&str> = replies.lines().collect();
        assert_eq!(replies[0], "IDENTITY OK");
        assert_eq!(replies[1], "IDENTITY ERROR 3 not a hostname: \"Not A Name\"");
        assert_eq!(replies[2], "IDENTITY ERROR 3 identity line: not hex");
        assert_eq!(replies[3], "IDENTITY ERROR 3 identity line: odd number of hex digits");
        assert!(replies[4].starts_with("IDENTITY ERROR 3 identity line over"), "{replies:?}");
        assert_eq!(replies[5], "IDENTITY ERROR 16 the host's key is missing or wrong");
        assert_eq!(replies[6], "IDENTITY ERROR 16 the host's key is missing or wrong");
        assert_eq!(replies[7..], ["PONG"]);
    }

    #[test]
    fn the_port_signal_wakes_the_waiting_thread() {
        let (guest, mut host) = port();
        let waiting = std::thread::spawn(move || {
            signal_on_events(&guest).expect("SIGIO for the port");
            let started = std::time::Instant::now();
            // Nothing to read yet: the data's SIGIO must end this wait long before its limit.
            wait_signal(Duration::from_secs(30));
            started.elapsed()
        });
        std::thread::sleep(Duration::from_millis(100));
        host.write_all(b"CONNECT 1024\n").expect("write");
        let waited = waiting.join().expect("the waiting thread");
        assert!(waited < Duration::from_secs(20), "woke after {waited:?}");
    }
}
