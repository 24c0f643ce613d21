//! Runs a guest process through the agent, translating between domain exec types and the
//! agent protocol.

use banger_proto::agent::v1 as pb;
use tokio_stream::{Stream, StreamExt};

use super::{
    HostError,
    agent::{AgentClient, AgentError},
};
use crate::domain::{ExecCommand, ExecEvent, ExecInput, ExitStatus, TerminalSize};

// Plain functions rather than closures in the stream combinators below: closures there
// make the returned future's `Send` impossible to prove for trait objects (a known
// higher-ranked lifetime limitation of rustc).

fn input_request(item: ExecInput) -> pb::ExecRequest {
    pb::ExecRequest {
        payload: Some(match item {
            ExecInput::Data(data) => pb::exec_request::Payload::Stdin(data),
            ExecInput::Eof => pb::exec_request::Payload::StdinEof(true),
            ExecInput::Resize(size) => pb::exec_request::Payload::Resize(window_size(size)),
        }),
    }
}

fn window_size(size: TerminalSize) -> pb::WindowSize {
    pb::WindowSize { rows: size.rows.into(), columns: size.columns.into() }
}

fn output_event(item: Result<pb::ExecResponse, tonic::Status>) -> Option<Result<ExecEvent, HostError>> {
    let payload = match item {
        Err(status) => return Some(Err(HostError::Agent(AgentError::Rpc { call: "Exec", status }))),
        Ok(pb::ExecResponse { payload }) => payload?,
    };
    match payload {
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
    }
}

async fn forward_input(
    mut input: std::pin::Pin<Box<dyn Stream<Item = ExecInput> + Send>>,
    requests: tokio::sync::mpsc::Sender<pb::ExecRequest>,
) {
    while let Some(item) = input.next().await {
        if requests.send(input_request(item)).await.is_err() {
            break;
        }
    }
}

/// Starts `command` in the guest; `input` feeds its standard input. The returned stream
/// yields output as it comes and ends with [`ExecEvent::Exit`].
pub async fn exec(
    agent: AgentClient,
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
            user: command.user,
            terminal: command
                .terminal
                .map(|terminal| pb::Terminal { term: terminal.term, size: Some(window_size(terminal.size)) }),
        })),
    };
    // Standard input is forwarded by its own task through a channel, which keeps the request
    // stream's type concrete.
    let (stdin_tx, stdin_rx) = tokio::sync::mpsc::channel::<pb::ExecRequest>(16);
    tokio::spawn(forward_input(Box::pin(input), stdin_tx));
    let requests = tokio_stream::once(start).chain(tokio_stream::wrappers::ReceiverStream::new(stdin_rx));
    let responses = agent.exec(requests).await?;
    Ok(responses.filter_map(
        output_event as fn(Result<pb::ExecResponse, tonic::Status>) -> Option<Result<ExecEvent, HostError>>,
    ))
}
