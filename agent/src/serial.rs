//! The agent channel over a virtio-serial port (`virtserialport` named [`PORT_NAME`]): plain
//! device state, so it survives the VMM's save and restore, unlike vhost-user-vsock.
//!
//! The port carries one host connection at a time. The host opens its side (QEMU's
//! unix-socket chardev), writes `CONNECT <port>\n` and waits for `OK <port>\n`, as over
//! hybrid vsock; HTTP/2 follows. While no host is connected a read returns end of file, so
//! the agent looks for a `CONNECT` line every [`IDLE_POLL`]; whatever else arrives before one
//! (the rest of a connection the host dropped) is discarded. When the host goes, the port's
//! end of file ends the connection's HTTP/2 session, and the port waits for the next host.
//!
//! The port is read and written with blocking calls on two threads, bridged to the async
//! server by an in-memory pipe: the port's readiness (it reports hang-up while no host is
//! connected) does not fit an edge-triggered reactor.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

/// The name the host gives the agent's port.
pub const PORT_NAME: &str = "banger.agent";
/// How often an idle port is read again for a host's `CONNECT`.
const IDLE_POLL: Duration = Duration::from_millis(20);
/// The longest line read while waiting for `CONNECT`.
const MAX_LINE: usize = 64;
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
        loop {
            let port_number = match wait_connect(&port) {
                Ok(port_number) => port_number,
                Err(error) => {
                    log!("virtio-serial: {error}");
                    std::thread::sleep(IDLE_POLL);
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
            log!("virtio-serial: host connected");
            bridge(&port, ours, &runtime);
            log!("virtio-serial: host connection ended");
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(stream)
}

/// Reads until a host's `CONNECT <port>` line; returns the port it names.
fn wait_connect(mut port: &File) -> io::Result<u32> {
    let mut line = Vec::with_capacity(MAX_LINE);
    loop {
        let mut byte = [0u8; 1];
        if port.read(&mut byte)? == 0 {
            // No host (or it left mid-line): start over once one writes.
            line.clear();
            std::thread::sleep(IDLE_POLL);
            continue;
        }
        if byte[0] != b'\n' {
            if line.len() < MAX_LINE {
                line.push(byte[0]);
            }
            continue;
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        line.clear();
        if let Some(number) = text.strip_prefix("CONNECT ").and_then(|n| n.trim().parse().ok()) {
            return Ok(number);
        }
    }
}

/// Moves bytes between the port and the server's end of the pipe until the host goes (the
/// port's end of file) or the server ends the connection.
fn bridge(port: &File, pipe: DuplexStream, runtime: &tokio::runtime::Handle) {
    let (mut from_server, mut to_server) = tokio::io::split(pipe);
    std::thread::scope(|scope| {
        let writer = port.try_clone().map(|mut out| {
            let runtime = runtime.clone();
            scope.spawn(move || {
                let mut buf = vec![0u8; CHUNK];
                loop {
                    match runtime.block_on(from_server.read(&mut buf)) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if out.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            })
        });
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
        // which ends the writer.
        let _ = runtime.block_on(to_server.shutdown());
        drop(to_server);
        if let Ok(writer) = writer {
            let _ = writer.join();
        }
    });
}
