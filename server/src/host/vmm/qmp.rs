//! A minimal QMP client: QEMU's JSON control protocol on the VM's api socket.

use std::{path::Path, time::Duration};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use crate::host::HostError;

/// An open QMP session, past capability negotiation.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

/// How long one QMP exchange (connecting with the greeting, or one command) may take: a
/// wedged or stopped VMM never holds its caller, or its VM's lock, longer.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest QMP message read (a whole `query-*` answer is a few KiB).
const MAX_LINE: u64 = 1 << 20;

/// `call` within [`QMP_TIMEOUT`].
async fn bounded<T>(what: &str, call: impl Future<Output = Result<T, HostError>>) -> Result<T, HostError> {
    tokio::time::timeout(QMP_TIMEOUT, call)
        .await
        .map_err(|_| HostError::Timeout { what: format!("qmp {what}"), seconds: QMP_TIMEOUT.as_secs() })?
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> HostError + '_ {
    move |source| HostError::Io { what: format!("qmp {what}"), source }
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities, within [`QMP_TIMEOUT`].
    pub async fn connect(socket: &Path) -> Result<Self, HostError> {
        bounded("connect", Self::connect_now(socket)).await
    }

    async fn connect_now(socket: &Path) -> Result<Self, HostError> {
        let stream = UnixStream::connect(socket).await.map_err(io("connect"))?;
        let (read, writer) = stream.into_split();
        let mut qmp = Self { reader: BufReader::new(read), writer };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(HostError::VmmRefused { command: "greeting".into(), message: greeting.to_string() });
        }
        qmp.execute_now("qmp_capabilities").await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, HostError> {
        use tokio::io::AsyncReadExt;
        let mut line = String::new();
        // The VMM runs as the guest's uid: a line is read up to MAX_LINE, never without end.
        if (&mut self.reader).take(MAX_LINE).read_line(&mut line).await.map_err(io("read"))? == 0 {
            return Err(HostError::Io { what: "qmp read".into(), source: std::io::ErrorKind::UnexpectedEof.into() });
        }
        if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE {
            return Err(HostError::Io {
                what: "qmp read".into(),
                source: std::io::Error::other(format!("a QMP message over {MAX_LINE} bytes")),
            });
        }
        serde_json::from_str(&line)
            .map_err(|e| HostError::Io { what: "qmp decode".into(), source: std::io::Error::other(e) })
    }

    /// Runs a command and returns its `return` value, within [`QMP_TIMEOUT`]; asynchronous
    /// events are skipped.
    pub async fn execute(&mut self, command: &str) -> Result<Value, HostError> {
        bounded(command, self.execute_now(command)).await
    }

    /// Runs a command with arguments, as [`Qmp::execute`].
    pub async fn execute_with(&mut self, command: &str, arguments: Value) -> Result<Value, HostError> {
        bounded(command, self.send(json!({ "execute": command, "arguments": arguments }), command)).await
    }

    async fn execute_now(&mut self, command: &str) -> Result<Value, HostError> {
        self.send(json!({ "execute": command }), command).await
    }

    async fn send(&mut self, request: Value, command: &str) -> Result<Value, HostError> {
        let mut request = request.to_string();
        request.push('\n');
        self.writer.write_all(request.as_bytes()).await.map_err(io("write"))?;
        loop {
            let message = self.read_message().await?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let message = error.get("desc").and_then(Value::as_str).unwrap_or("unknown error").to_owned();
                return Err(HostError::VmmRefused { command: command.into(), message });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn a_vmm_that_sends_an_endless_line_is_refused_not_read_into_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let vmm = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            // A greeting without its end: 8 MiB and more, as a hostile VMM would send.
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..8 {
                if stream.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        match Qmp::connect(&socket).await {
            Err(HostError::Io { source, .. }) => assert!(source.to_string().contains("over 1048576 bytes"), "{source}"),
            other => panic!("an endless greeting was not refused: {other:?}"),
        }
        vmm.abort();
    }
}
