//! Copying files in and out of a guest through its agent, streamed both ways: content moves
//! one chunk at a time, so memory stays bounded whatever the file's size.

use banger_proto::agent::v1 as pb;
use tokio_stream::{Stream, StreamExt};

use super::{
    HostError,
    agent::{AgentClient, AgentError},
};
use crate::domain::FileMeta;

/// Content of a file being copied; an `Err` aborts the copy.
pub type FileData = std::pin::Pin<Box<dyn Stream<Item = Result<Vec<u8>, HostError>> + Send>>;
/// Content coming from a client; an `Err` (the client failed or went away) aborts the copy.
pub type FileInput = std::pin::Pin<Box<dyn Stream<Item = Result<Vec<u8>, String>> + Send>>;

fn read_error(status: tonic::Status) -> HostError {
    HostError::Agent(AgentError::Rpc { call: "ReadFile", status })
}

fn chunk(item: Result<pb::ReadFileResponse, tonic::Status>) -> Option<Result<Vec<u8>, HostError>> {
    match item {
        Ok(pb::ReadFileResponse { payload: Some(pb::read_file_response::Payload::Data(data)) }) => Some(Ok(data)),
        Ok(_) => None,
        Err(status) => Some(Err(read_error(status))),
    }
}

/// Opens a guest file: its mode and size, and a stream of its content.
pub async fn read(agent: AgentClient, path: String, archive: bool) -> Result<(FileMeta, FileData), HostError> {
    let mut responses = agent.read_file(path, archive).await?;
    let first = responses.message().await.map_err(read_error)?;
    let Some(pb::ReadFileResponse { payload: Some(pb::read_file_response::Payload::Info(info)) }) = first else {
        return Err(HostError::Agent(AgentError::Protocol { call: "ReadFile", what: "no file info first" }));
    };
    let data = responses.filter_map(chunk as fn(_) -> Option<Result<Vec<u8>, HostError>>);
    Ok((FileMeta { mode: info.mode, size: info.size, archive: info.archive }, Box::pin(data)))
}

/// Writes a guest file (with `archive`: the directory of a tar stream) from `input`, then
/// sends the end message with the size sent. When `input` fails, no end message is sent: the
/// agent discards what it wrote.
pub async fn write(
    agent: AgentClient,
    path: String,
    mode: u32,
    archive: bool,
    mut input: FileInput,
) -> Result<u64, HostError> {
    let start = pb::WriteFileRequest {
        payload: Some(pb::write_file_request::Payload::Start(pb::WriteFileStart { path, mode, archive })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let requests = tokio_stream::once(start).chain(tokio_stream::wrappers::ReceiverStream::new(rx));
    let call = agent.write_file(requests);
    tokio::pin!(call);
    let feed = async move {
        let mut size = 0u64;
        while let Some(item) = input.next().await {
            // Giving up drops the sender without the end message: the agent discards the file.
            let data = item?;
            size += data.len() as u64;
            let message = pb::WriteFileRequest { payload: Some(pb::write_file_request::Payload::Data(data)) };
            if tx.send(message).await.is_err() {
                return Ok(()); // the call ended; its result says why
            }
        }
        let end = pb::WriteFileRequest { payload: Some(pb::write_file_request::Payload::End(size)) };
        let _ = tx.send(end).await;
        Ok::<(), String>(())
    };
    tokio::pin!(feed);
    let mut fed = false;
    loop {
        tokio::select! {
            biased;
            outcome = &mut feed, if !fed => match outcome {
                Ok(()) => fed = true,
                Err(why) => {
                    return Err(HostError::InputAborted { why });
                }
            },
            result = &mut call => return result.map_err(HostError::from),
        }
    }
}
