//! Runs a guest process through the agent, translating between domain exec types and the
//! agent protocol.

use banger_proto::agent::v1 as pb;
use tokio_stream::{Stream, StreamExt};

use super::{HostError, agent::AgentClient};
use crate::domain::{ExecCommand, ExecEvent, ExecInput, ExitStatus};

/// Starts `command` in the guest; `input` feeds its standard input. The returned stream
/// yields output as it comes and ends with [`ExecEvent::Exit`].
pub async fn exec(
    agent: &AgentClient,
    command: ExecCommand,
    input: impl Stream<Item = ExecInput> + Send + 'static,
) -> Result<impl Stream<Item = Result<ExecEvent, HostError>> + Send + 'static, HostError> {
    let start = pb::ExecRequest {
        payload: Some(pb::exec_request::Payload::Start(pb::ExecStart {
            argv: command.argv,
            env: command.env,
            working_dir: command.working_dir,
            stdin: command.stdin,
            timeout_seconds: command.timeout_seconds,
        })),
    };
    let stdin = input.map(|item| pb::ExecRequest {
        payload: Some(match item {
            ExecInput::Data(data) => pb::exec_request::Payload::Stdin(data),
            ExecInput::Eof => pb::exec_request::Payload::StdinEof(true),
        }),
    });
    let requests = tokio_stream::once(start).chain(stdin);
    let responses = agent.exec(requests).await?;
    Ok(responses.filter_map(|item| match item {
        Err(status) => Some(Err(HostError::Agent(super::agent::AgentError::Rpc { call: "Exec", status }))),
        Ok(pb::ExecResponse { payload }) => match payload? {
            pb::exec_response::Payload::StartedPid(_) => None,
            pb::exec_response::Payload::Stdout(data) => Some(Ok(ExecEvent::Stdout(data))),
            pb::exec_response::Payload::Stderr(data) => Some(Ok(ExecEvent::Stderr(data))),
            pb::exec_response::Payload::Exit(exit) => {
                let status = match exit.status {
                    Some(pb::exit_status::Status::Signal(signal)) => ExitStatus::Signal(signal),
                    Some(pb::exit_status::Status::Code(code)) => ExitStatus::Code(code),
                    None => ExitStatus::Code(-1),
                };
                Some(Ok(ExecEvent::Exit { status, timed_out: exit.timed_out }))
            }
        },
    }))
}
