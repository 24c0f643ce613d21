//! What each CLI command does.

use std::{io::Write, process::ExitCode};

use banger_client::{Client, Credentials, Target, pb, response_op_id};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::{
    Command, ImageCommand, PoolCommand, ProcessArgs, SnapshotCommand, VmCommand, VmShape, WorkspaceCommand, output,
    pull, terminal, workspace,
};

/// Exit code of `vm run`/`vm exec` when banger itself fails (not the guest command).
const EXIT_BANGER_ERROR: u8 = 125;
/// Exit code of a guest command killed by its timeout, as timeout(1) does.
const EXIT_TIMED_OUT: u8 = 124;

/// A command failed before or instead of producing its result.
#[derive(Debug)]
enum Failure {
    Connect(banger_client::ClientError),
    Autostart(String),
    Status(Status),
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Self::Status(status)
    }
}

impl From<banger_client::ClientError> for Failure {
    fn from(err: banger_client::ClientError) -> Self {
        match err {
            banger_client::ClientError::Status(status) => Self::Status(status),
            other => Self::Connect(other),
        }
    }
}

/// Connects to the daemon, starting it first when allowed and nobody serves the socket.
async fn connect(target: &Target, credentials: &Credentials, autostart: bool) -> Result<Client, Failure> {
    match Client::connect_with(target, credentials).await {
        Ok(client) => Ok(client),
        Err(err) if autostart && crate::autostart::nobody_serving(&err) => match target {
            Target::Unix(socket) => crate::autostart::start_daemon(socket).await.map_err(Failure::Autostart),
            Target::Endpoint(_) => Err(err.into()),
        },
        Err(err) => Err(err.into()),
    }
}

/// Runs one command and returns the process's exit code.
pub async fn run(target: Target, credentials: Credentials, autostart: bool, command: Command) -> ExitCode {
    let client = connect(&target, &credentials, autostart).await;
    let error_exit = match command {
        Command::Vm(VmCommand::Exec { .. } | VmCommand::Run { .. } | VmCommand::Shell { .. }) => EXIT_BANGER_ERROR,
        _ => 1,
    };
    let result = match client {
        Err(failure) => Err(failure),
        Ok(client) => match command {
            Command::Vm(VmCommand::Exec { vm, process }) => exec(client, vm, process).await,
            Command::Vm(VmCommand::Shell { vm, shell }) => exec_in(&mut { client }, vm, shell.into()).await,
            Command::Vm(VmCommand::Run { workspace, include_untracked, shape, rm, process }) => {
                vm_run(client, shape, rm, process, workspace.map(|path| (path, include_untracked))).await
            }
            Command::Vm(vm) => vm_command(client, vm).await.map(|()| ExitCode::SUCCESS),
            Command::Image(image) => image_command(client, image).await.map(|()| ExitCode::SUCCESS),
            Command::Pool(pool) => pool_command(client, pool).await.map(|()| ExitCode::SUCCESS),
            Command::Snapshot(snapshot) => snapshot_command(client, snapshot).await.map(|()| ExitCode::SUCCESS),
            Command::Doctor => doctor(client).await,
            // Local: `main` runs them before any connection.
            Command::Tls(_) | Command::Token(_) => Ok(ExitCode::SUCCESS),
        },
    };
    match result {
        Ok(code) => code,
        Err(failure) => {
            match failure {
                Failure::Connect(err) => output::print_connect_error(&target, &err),
                Failure::Autostart(message) => eprintln!("banger: UNAVAILABLE: could not start bangerd: {message}"),
                Failure::Status(status) => output::print_status(&status),
            }
            ExitCode::from(error_exit)
        }
    }
}

fn create_request(shape: VmShape, no_start: bool, no_wait: bool, request_id: Option<String>) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
        name: shape.name.unwrap_or_default(),
        image: shape.image.unwrap_or_default(),
        vcpus: shape.vcpus,
        memory_mib: shape.memory,
        disk_size_bytes: shape.disk_size.unwrap_or(0),
        no_start,
        no_wait,
        request_id: request_id.unwrap_or_default(),
        labels: shape.labels.into_iter().collect(),
        ttl: shape.ttl.map(duration),
        egress: shape.egress,
        snapshot: shape.snapshot.unwrap_or_default(),
    }
}

fn duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

async fn vm_command(mut client: Client, command: VmCommand) -> Result<(), Failure> {
    match command {
        VmCommand::Create { shape, no_start, no_wait, request_id } => {
            if let Some(image) = &shape.image {
                pull::ensure_image(&mut client, image).await?;
            }
            let name = shape.name.clone();
            let request = create_request(shape, no_start, no_wait, request_id);
            let mut creating = client.clone();
            let response =
                with_progress(&client, name.as_deref(), "vm.create", false, creating.vms.create_vm(request)).await?;
            let op = response_op_id(&response);
            let vm = response.into_inner().vm.unwrap_or_default();
            output::print_vm_line(&vm, op.as_deref());
        }
        VmCommand::Start { vm, no_wait, request_id } => {
            let name = vm.clone();
            let request = pb::StartVmRequest { vm, no_wait, request_id: request_id.unwrap_or_default() };
            let mut starting = client.clone();
            let response =
                with_progress(&client, Some(&name), "vm.start", false, starting.vms.start_vm(request)).await?;
            let op = response_op_id(&response);
            output::print_vm_line(&response.into_inner().vm.unwrap_or_default(), op.as_deref());
        }
        VmCommand::Stop { vm, force, request_id } => {
            let request = pb::StopVmRequest { vm, force, request_id: request_id.unwrap_or_default() };
            let response = client.vms.stop_vm(request).await?;
            let op = response_op_id(&response);
            output::print_vm_line(&response.into_inner().vm.unwrap_or_default(), op.as_deref());
        }
        VmCommand::Pause { vm, request_id } => {
            let request = pb::PauseVmRequest { vm, request_id: request_id.unwrap_or_default() };
            let response = client.vms.pause_vm(request).await?;
            let op = response_op_id(&response);
            output::print_vm_line(&response.into_inner().vm.unwrap_or_default(), op.as_deref());
        }
        VmCommand::Snapshot { vm, name, stop, without_agent, labels, request_id } => {
            let after = if stop { pb::SnapshotAfter::Stop } else { pb::SnapshotAfter::Resume };
            let key = vm.clone();
            let request = pb::SnapshotVmRequest {
                vm,
                name,
                labels: labels.into_iter().collect(),
                request_id: request_id.unwrap_or_default(),
                after: after.into(),
                without_agent,
            };
            let mut taking = client.clone();
            let response =
                with_progress(&client, Some(&key), "vm.snapshot", false, taking.snapshots.snapshot_vm(request)).await?;
            let op = response_op_id(&response);
            let response = response.into_inner();
            output::print_snapshot_details(&response.snapshot.unwrap_or_default());
            output::print_vm_line(&response.vm.unwrap_or_default(), op.as_deref());
        }
        VmCommand::Resume { vm, request_id } => {
            let request = pb::ResumeVmRequest { vm, request_id: request_id.unwrap_or_default() };
            let response = client.vms.resume_vm(request).await?;
            let op = response_op_id(&response);
            output::print_vm_line(&response.into_inner().vm.unwrap_or_default(), op.as_deref());
        }
        VmCommand::Delete { vms, request_id, missing_ok } => {
            if request_id.is_some() && vms.len() > 1 {
                return Err(Failure::Status(tonic::Status::invalid_argument(
                    "--request-id names one request: delete one VM per call with it",
                )));
            }
            let request_id = request_id.unwrap_or_default();
            for vm in vms {
                let request =
                    pb::DeleteVmRequest { vm: vm.clone(), request_id: request_id.clone(), allow_missing: missing_ok };
                let id = client.vms.delete_vm(request).await?.into_inner().id;
                if id.is_empty() {
                    println!("{vm} does not exist");
                } else {
                    println!("deleted {vm} ({id})");
                }
            }
        }
        VmCommand::List { labels, states } => {
            let mut request = pb::ListVmsRequest {
                labels: labels.into_iter().collect(),
                states,
                page_size: 1000,
                page_token: String::new(),
            };
            let mut vms = Vec::new();
            loop {
                let page = client.vms.list_vms(request.clone()).await?.into_inner();
                vms.extend(page.vms);
                if page.next_page_token.is_empty() {
                    break;
                }
                request.page_token = page.next_page_token;
            }
            output::print_vm_table(&vms);
        }
        VmCommand::Wait { vm, state, timeout } => {
            let mut request = tonic::Request::new(pb::WaitVmRequest { vm, state });
            request.set_timeout(timeout);
            let vm = client.vms.wait_vm(request).await?.into_inner().vm.unwrap_or_default();
            output::print_vm_line(&vm, None);
        }
        VmCommand::Watch { vm, labels, from_revision } => {
            let request =
                pb::WatchVmsRequest { from_revision, vm: vm.unwrap_or_default(), labels: labels.into_iter().collect() };
            let mut events = client.vms.watch_vms(request).await?.into_inner();
            while let Some(message) = events.message().await? {
                if let Some(event) = message.event {
                    output::print_event(&event);
                }
            }
        }
        VmCommand::Logs { vm, follow, vmm, tail } => {
            let log = if vmm { pb::VmLog::Vmm } else { pb::VmLog::Console };
            let request = pb::StreamVmLogsRequest { vm, log: log as i32, follow, tail_bytes: tail.unwrap_or(0) };
            let mut stream = client.vms.stream_vm_logs(request).await?.into_inner();
            let mut stdout = std::io::stdout();
            while let Some(chunk) = stream.message().await? {
                if stdout.write_all(&chunk.data).and_then(|()| stdout.flush()).is_err() {
                    break; // the reader went away (e.g. `| head`)
                }
            }
        }
        VmCommand::Cp { source, destination, mode, preserve_special } => {
            copy(&mut client, &source, &destination, mode, preserve_special).await?
        }
        VmCommand::Touch { vm, ttl, no_ttl: _ } => {
            let request = pb::TouchVmRequest { vm, ttl: ttl.map(duration) };
            let vm = client.vms.touch_vm(request).await?.into_inner().vm.unwrap_or_default();
            output::print_vm_line(&vm, None);
        }
        VmCommand::Show { vm } => {
            let vm = client.vms.get_vm(pb::GetVmRequest { vm }).await?.into_inner().vm.unwrap_or_default();
            output::print_vm_details(&vm);
        }
        VmCommand::Exec { .. } | VmCommand::Run { .. } | VmCommand::Shell { .. } => {
            unreachable!("handled by run()")
        }
        VmCommand::Workspace(WorkspaceCommand::Push { vm, path, workdir, include_untracked }) => {
            let count = workspace::push(&mut client, &vm, &path, &workdir, include_untracked).await?;
            println!("pushed {count} files of {} to {vm}:{workdir}", path.display());
        }
        VmCommand::Workspace(WorkspaceCommand::Export { vm, workdir, base }) => {
            workspace::export(&mut client, &vm, &workdir, base.as_deref(), &mut std::io::stdout()).await?;
        }
    }
    Ok(())
}

async fn pool_command(mut client: Client, command: PoolCommand) -> Result<(), Failure> {
    match command {
        PoolCommand::Create { name, size, image, vcpus, memory, disk_size, egress, snapshot } => {
            let request = pb::CreatePoolRequest {
                name,
                size,
                image: image.unwrap_or_default(),
                vcpus,
                memory_mib: memory,
                disk_size_bytes: disk_size.unwrap_or(0),
                egress,
                snapshot: snapshot.unwrap_or_default(),
            };
            let pool = client.pools.create_pool(request).await?.into_inner().pool.unwrap_or_default();
            output::print_pool_details(&pool);
        }
        PoolCommand::List => {
            let pools = client.pools.list_pools(pb::ListPoolsRequest {}).await?.into_inner().pools;
            output::print_pool_table(&pools);
        }
        PoolCommand::Show { pool } => {
            let pool = client.pools.get_pool(pb::GetPoolRequest { pool }).await?.into_inner().pool.unwrap_or_default();
            output::print_pool_details(&pool);
        }
        PoolCommand::Delete { pool } => {
            let id = client.pools.delete_pool(pb::DeletePoolRequest { pool: pool.clone() }).await?.into_inner().id;
            println!("deleted pool {pool} ({id})");
        }
    }
    Ok(())
}

async fn snapshot_command(mut client: Client, command: SnapshotCommand) -> Result<(), Failure> {
    match command {
        SnapshotCommand::List { labels } => {
            let request = pb::ListSnapshotsRequest { labels: labels.into_iter().collect() };
            let snapshots = client.snapshots.list_snapshots(request).await?.into_inner().snapshots;
            output::print_snapshot_table(&snapshots);
        }
        SnapshotCommand::Show { snapshot } => {
            let request = pb::GetSnapshotRequest { snapshot };
            let snapshot = client.snapshots.get_snapshot(request).await?.into_inner().snapshot.unwrap_or_default();
            output::print_snapshot_details(&snapshot);
        }
        SnapshotCommand::Delete { snapshot } => {
            client.snapshots.delete_snapshot(pb::DeleteSnapshotRequest { snapshot: snapshot.clone() }).await?;
            println!("deleted snapshot {snapshot}");
        }
    }
    Ok(())
}

async fn image_command(mut client: Client, command: ImageCommand) -> Result<(), Failure> {
    match command {
        ImageCommand::Import {
            name,
            oci,
            archive,
            upload,
            tag,
            kernel,
            rootfs,
            initrd,
            kernel_args,
            request_id,
            labels,
        } => {
            let absolute = |p: std::path::PathBuf| std::path::absolute(&p).unwrap_or(p).display().to_string();
            let labels: std::collections::BTreeMap<String, String> = labels.into_iter().collect();
            if let Some(path) = upload {
                let image = pull::upload(&mut client, name, &path, tag, labels).await?;
                println!("imported {} ({})", image.name, image.id);
                return Ok(());
            }
            let source = match (oci, archive) {
                (Some(layout), _) => {
                    let (dir, layout_tag) = pull::split_layout_tag(&layout);
                    Some((pb::pull_image_request::Source::OciLayout(absolute(dir.into())), layout_tag.or(tag)))
                }
                (None, Some(path)) => Some((pb::pull_image_request::Source::Archive(absolute(path)), tag)),
                (None, None) => None,
            };
            if let Some((source, tag)) = source {
                let request = pb::PullImageRequest {
                    name,
                    source: Some(source),
                    tag: tag.unwrap_or_default(),
                    labels,
                    request_id: request_id.unwrap_or_default(),
                };
                let image = pull::pull(&mut client, request).await?;
                println!("imported {} ({})", image.name, image.id);
                return Ok(());
            }
            let (Some(kernel), Some(rootfs)) = (kernel, rootfs) else {
                return Err(Failure::Status(Status::invalid_argument(
                    "name a source: --oci, --archive, --upload, or --kernel and --rootfs",
                )));
            };
            let request = pb::ImportImageRequest {
                name,
                kernel_path: absolute(kernel),
                initrd_path: initrd.map(absolute).unwrap_or_default(),
                rootfs_path: absolute(rootfs),
                kernel_args,
                request_id: request_id.unwrap_or_default(),
                labels: labels.into_iter().collect(),
            };
            let image = client.images.import_image(request).await?.into_inner().image.unwrap_or_default();
            println!("imported {} ({})", image.name, image.id);
        }
        ImageCommand::Pull { reference, name, labels, request_id } => {
            let request = pb::PullImageRequest {
                name: name.unwrap_or_default(),
                source: Some(pb::pull_image_request::Source::Reference(reference)),
                labels: labels.into_iter().collect(),
                request_id: request_id.unwrap_or_default(),
                ..Default::default()
            };
            let image = pull::pull(&mut client, request).await?;
            println!("pulled {} ({}) {}", image.name, image.id, image.origin.unwrap_or_default().manifest_digest);
        }
        ImageCommand::List => {
            let request = pb::ListImagesRequest { page_size: 1000, ..Default::default() };
            let images = client.images.list_images(request).await?.into_inner().images;
            output::print_image_table(&images);
        }
        ImageCommand::Show { image } => {
            let image =
                client.images.get_image(pb::GetImageRequest { image }).await?.into_inner().image.unwrap_or_default();
            output::print_image_details(&image);
        }
        ImageCommand::Delete { image } => {
            let id = client.images.delete_image(pb::DeleteImageRequest { image: image.clone() }).await?.into_inner().id;
            println!("deleted {image} ({id})");
        }
    }
    Ok(())
}

async fn doctor(mut client: Client) -> Result<ExitCode, Failure> {
    let report = client.host.get_host(pb::GetHostRequest {}).await?.into_inner();
    let failed = output::print_host_report(&report);
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Reads this process's standard input in chunks, as a stream.
fn local_stdin() -> impl Stream<Item = Vec<u8>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buffer = vec![0u8; 32 * 1024];
        while let Ok(n) = stdin.read(&mut buffer).await {
            if n == 0 || tx.send(buffer[..n].to_vec()).await.is_err() {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Streams a guest process's output to this terminal; returns the exit code to use.
async fn exec_in(client: &mut Client, vm: String, process: ProcessArgs) -> Result<ExitCode, Failure> {
    let terminal = process.tty.then(|| pb::ExecTerminal {
        term: terminal::term(),
        size: terminal::size().map(|(rows, columns)| pb::TerminalSize { rows, columns }),
    });
    let start = pb::ExecVmStart {
        vm,
        argv: process.argv,
        env: process.env,
        working_dir: process.workdir.unwrap_or_default(),
        stdin: process.interactive,
        timeout_seconds: process.timeout.unwrap_or(0),
        user: process.user.unwrap_or_default(),
        terminal,
    };
    if start.terminal.is_some() {
        return exec_on_terminal(client, start).await;
    }
    let mut output = if process.interactive {
        client.exec(start, local_stdin()).await?
    } else {
        client.exec(start, tokio_stream::empty()).await?
    };
    use pb::exec_vm_response::Payload;
    while let Some(message) = output.next().await {
        match message?.payload {
            Some(Payload::Stdout(data)) => write_out(&data),
            Some(Payload::Stderr(data)) => {
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(&data).and_then(|()| err.flush());
            }
            Some(Payload::Exit(exit)) => return Ok(exit_code(&exit)),
            None => {}
        }
    }
    Err(Failure::Status(Status::unavailable("the exec stream ended without an exit status")))
}

fn write_out(data: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(data).and_then(|()| out.flush());
}

/// The exit code for how a guest process ended (after the local terminal is restored).
fn exit_code(exit: &pb::ExecExit) -> ExitCode {
    if exit.timed_out {
        eprintln!("banger: command timed out and was killed");
        return ExitCode::from(EXIT_TIMED_OUT);
    }
    match exit.status {
        Some(pb::exec_exit::Status::Code(code)) => ExitCode::from(code.clamp(0, 255) as u8),
        Some(pb::exec_exit::Status::Signal(signal)) => ExitCode::from((128 + signal).clamp(0, 255) as u8),
        None => ExitCode::from(EXIT_BANGER_ERROR),
    }
}

/// Runs `start` on a terminal in the guest. With `start.stdin`, this terminal is in raw mode
/// meanwhile (restored however the session ends: exit, error, SIGTERM, SIGHUP, a panic) and its
/// input is typed into the guest's; SIGWINCH sends the new size.
async fn exec_on_terminal(client: &mut Client, start: pb::ExecVmStart) -> Result<ExitCode, Failure> {
    use pb::exec_vm_request::Payload as Input;
    use pb::exec_vm_response::Payload;
    use tokio::signal::unix::{SignalKind, signal};
    let forward_stdin = start.stdin;
    let (tx, rx) = tokio::sync::mpsc::channel::<Input>(16);
    // The handlers first: a SIGTERM or SIGHUP in raw mode must restore the terminal.
    let (mut resized, mut terminated, mut hung_up) =
        match (signal(SignalKind::window_change()), signal(SignalKind::terminate()), signal(SignalKind::hangup())) {
            (Ok(resized), Ok(terminated), Ok(hung_up)) => (resized, terminated, hung_up),
            _ => return Err(Failure::Status(Status::internal("cannot handle signals"))),
        };
    let raw = if forward_stdin { terminal::RawMode::enter() } else { None };
    if forward_stdin {
        let tx = tx.clone();
        let mut input = terminal::input();
        tokio::spawn(async move {
            while let Some(data) = input.recv().await {
                if tx.send(Input::Stdin(data)).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Input::StdinEof(true)).await;
        });
    }
    let mut output = tokio::select! {
        started = client.exec_with(start, tokio_stream::wrappers::ReceiverStream::new(rx)) => started?,
        Some(()) = terminated.recv() => {
            drop(raw);
            return Ok(ExitCode::from(128 + 15));
        }
        Some(()) = hung_up.recv() => {
            drop(raw);
            return Ok(ExitCode::from(128 + 1));
        }
    };
    loop {
        tokio::select! {
            message = output.next() => match message {
                Some(message) => match message?.payload {
                    Some(Payload::Stdout(data) | Payload::Stderr(data)) => write_out(&data),
                    Some(Payload::Exit(exit)) => {
                        drop(raw);
                        return Ok(exit_code(&exit));
                    }
                    None => {}
                },
                None => break,
            },
            Some(()) = resized.recv() => {
                // Never waited for: a guest that reads no input must not stop its output.
                if let Some((rows, columns)) = terminal::size() {
                    let _ = tx.try_send(Input::Resize(pb::TerminalSize { rows, columns }));
                }
            }
            Some(()) = terminated.recv() => {
                drop(raw);
                return Ok(ExitCode::from(128 + 15));
            }
            Some(()) = hung_up.recv() => {
                drop(raw);
                return Ok(ExitCode::from(128 + 1));
            }
        }
    }
    drop(raw);
    Err(Failure::Status(Status::unavailable("the exec stream ended without an exit status")))
}

async fn exec(mut client: Client, vm: String, process: ProcessArgs) -> Result<ExitCode, Failure> {
    if process.argv.is_empty() && !process.tty {
        return Err(usage("name the command to run after -- (or use -it, or `banger vm shell`, for a shell)"));
    }
    exec_in(&mut client, vm, process).await
}

async fn vm_run(
    mut client: Client,
    shape: VmShape,
    rm: bool,
    mut process: ProcessArgs,
    repository: Option<(std::path::PathBuf, bool)>,
) -> Result<ExitCode, Failure> {
    if let Some((path, include_untracked)) = &repository {
        // Before anything is made: a path that is no repository is the caller's mistake.
        workspace::git_files(path, *include_untracked).map_err(|why| usage(&why))?;
    }
    if let Some(image) = &shape.image {
        pull::ensure_image(&mut client, image).await?;
    }
    let name = shape.name.clone();
    let mut creating = client.clone();
    let request = create_request(shape, false, false, None);
    // Standard error belongs to the guest command: progress only on a terminal.
    let created = with_progress(&client, name.as_deref(), "vm.create", true, creating.vms.create_vm(request)).await;
    let vm = created?.into_inner().vm.unwrap_or_default();
    if process.argv.is_empty() {
        // The image's own command, like `docker run IMAGE`.
        let image = client.images.get_image(pb::GetImageRequest { image: vm.image_id.clone() }).await;
        let config = image.ok().and_then(|i| i.into_inner().image?.origin?.config).unwrap_or_default();
        process.argv = config.entrypoint.into_iter().chain(config.cmd).collect();
    }
    if process.argv.is_empty() && terminal::interactive() {
        // A shell (or the image's command) on a terminal, like `docker run -it`.
        process.tty = true;
        process.interactive = true;
    }
    let pushed = match &repository {
        None => Ok(()),
        Some((path, include_untracked)) => {
            let workdir = process.workdir.get_or_insert_with(|| workspace::DEFAULT_WORKDIR.to_owned()).clone();
            workspace::push(&mut client, &vm.id, path, &workdir, *include_untracked).await.map(drop)
        }
    };
    let result = if let Err(status) = pushed {
        Err(Failure::Status(status))
    } else if process.argv.is_empty() && !process.tty {
        Err(usage("the image names no Entrypoint or Cmd: give the command after --, or run on a terminal for a shell"))
    } else {
        exec_in(&mut client, vm.id.clone(), process).await
    };
    if rm
        && let Err(status) = client.vms.delete_vm(pb::DeleteVmRequest { vm: vm.id.clone(), ..Default::default() }).await
    {
        eprintln!("banger: could not delete vm {}:", vm.name);
        output::print_status(&status);
    }
    result
}

/// `VM:PATH` split in two; `None` for a local path (one without a colon before a slash).
fn guest_side(spec: &str) -> Option<(&str, &str)> {
    let (vm, path) = spec.split_once(':')?;
    (!vm.is_empty() && !vm.contains('/') && path.starts_with('/')).then_some((vm, path))
}

fn usage(message: &str) -> Failure {
    Failure::Status(Status::invalid_argument(message.to_owned()))
}

/// Copies one file into or out of a VM, streaming it in 1 MiB chunks.
async fn copy(
    client: &mut Client,
    source: &str,
    destination: &str,
    mode: Option<u32>,
    preserve_special: bool,
) -> Result<(), Failure> {
    use std::os::unix::fs::PermissionsExt;
    const CHUNK: usize = 1 << 20;
    match (guest_side(source), guest_side(destination)) {
        (None, Some((vm, path))) if std::fs::metadata(source).is_ok_and(|meta| meta.is_dir()) => {
            let dir = std::path::PathBuf::from(source);
            let size = workspace::upload(client, vm, path, workspace::Tree::Directory(dir)).await?;
            println!("copied {source} to {vm}:{path} ({size} bytes of archive)");
        }
        (None, Some((vm, path))) => {
            let file = tokio::fs::File::open(source).await.map_err(|e| usage(&format!("{source}: {e}")))?;
            let meta = file.metadata().await.map_err(|e| usage(&format!("{source}: {e}")))?;
            if !meta.is_file() {
                return Err(usage(&format!("{source} is not a regular file")));
            }
            let start = pb::CopyToVmRequest {
                payload: Some(pb::copy_to_vm_request::Payload::Start(pb::CopyToVmStart {
                    vm: vm.to_owned(),
                    path: path.to_owned(),
                    mode: mode.unwrap_or(meta.permissions().mode() & 0o7777),
                    archive: false,
                })),
            };
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let reader = tokio::spawn(async move {
                let mut file = file;
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let n = file.read(&mut buf).await?;
                    if n == 0 {
                        return Ok::<(), std::io::Error>(());
                    }
                    let data =
                        pb::CopyToVmRequest { payload: Some(pb::copy_to_vm_request::Payload::Data(buf[..n].to_vec())) };
                    if tx.send(data).await.is_err() {
                        return Ok(());
                    }
                }
            });
            let requests = tokio_stream::once(start).chain(tokio_stream::wrappers::ReceiverStream::new(rx));
            let size = client.vms.copy_to_vm(requests).await?.into_inner().size;
            if let Ok(Err(e)) = reader.await {
                return Err(usage(&format!("reading {source}: {e}")));
            }
            println!("copied {size} bytes to {vm}:{path}");
        }
        (Some((vm, path)), None) => {
            let request = pb::CopyFromVmRequest { vm: vm.to_owned(), path: path.to_owned(), archive: true };
            let mut stream = client.vms.copy_from_vm(request).await?.into_inner();
            let target = std::path::Path::new(destination);
            let target = match tokio::fs::metadata(target).await {
                Ok(meta) if meta.is_dir() => target.join(std::path::Path::new(path).file_name().unwrap_or_default()),
                _ => target.to_path_buf(),
            };
            let info = match stream.message().await?.and_then(|message| message.payload) {
                Some(pb::copy_from_vm_response::Payload::Info(info)) => info,
                _ => return Err(Failure::Status(Status::data_loss("the guest announced no file"))),
            };
            if info.archive {
                let entries = workspace::download(stream, &target, preserve_special).await?;
                println!("copied {vm}:{path} ({entries} entries) to {}", target.display());
                return Ok(());
            }
            // A new file (O_EXCL, mode 0600) with an unpredictable name in the destination's
            // directory: nothing there can be followed or raced. Dropped unpersisted, it is
            // removed: a failed copy leaves nothing.
            let dir = match target.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
                _ => std::path::PathBuf::from("."),
            };
            let name = target.file_name().unwrap_or_default().to_string_lossy().into_owned();
            let temp = tempfile::Builder::new()
                .prefix(&format!(".{name}."))
                .suffix(".banger-cp")
                .tempfile_in(&dir)
                .map_err(|e| usage(&format!("{}: {e}", dir.display())))?;
            let (file, temp) = temp.into_parts();
            let mut file = tokio::fs::File::from_std(file);
            let written = |e: std::io::Error| usage(&format!("{}: {e}", temp.display()));
            let mismatch = |announced: u64, sent: u64| {
                Failure::Status(Status::data_loss(format!(
                    "{vm}:{path} was announced as {announced} bytes and {sent} came (it changed while being \
                     copied, or its size is not its content's); nothing was written"
                )))
            };
            // The guest is untrusted: it never writes more to the host than it announced.
            let mut size = 0u64;
            while let Some(message) = stream.message().await? {
                match message.payload {
                    Some(pb::copy_from_vm_response::Payload::Info(_)) => {
                        return Err(Failure::Status(Status::data_loss("the guest announced its file twice")));
                    }
                    Some(pb::copy_from_vm_response::Payload::Data(data)) => {
                        size += data.len() as u64;
                        if size > info.size {
                            return Err(mismatch(info.size, size));
                        }
                        file.write_all(&data).await.map_err(written)?;
                    }
                    None => {}
                }
            }
            if size != info.size {
                return Err(mismatch(info.size, size));
            }
            file.sync_all().await.map_err(written)?;
            let special = if preserve_special { 0o7777 } else { 0o777 };
            file.set_permissions(std::fs::Permissions::from_mode(info.mode & special)).await.map_err(written)?;
            drop(file);
            temp.persist(&target).map_err(|e| usage(&format!("{}: {}", target.display(), e.error)))?;
            println!("copied {size} bytes to {}", target.display());
        }
        (Some(_), Some(_)) => {
            return Err(usage("copy between two VMs through the host: out of one, then into the other"));
        }
        (None, None) => return Err(usage("one side must be VM:/absolute/path")),
    }
    Ok(())
}

/// Shows the stages of `operation` on the VM named `name` (any VM when `None`) while `call`
/// runs, on standard error: one line rewritten in place on a terminal, plain lines otherwise
/// (unless `tty_only`). Progress is best effort: without a watch, the call just runs.
async fn with_progress<T>(
    client: &Client,
    name: Option<&str>,
    operation: &'static str,
    tty_only: bool,
    call: impl std::future::Future<Output = T>,
) -> T {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    if tty_only && !tty {
        return call.await;
    }
    let mut watcher = client.clone();
    let request = pb::WatchVmsRequest { vm: name.unwrap_or_default().to_owned(), ..Default::default() };
    let Ok(response) = watcher.vms.watch_vms(request).await else {
        return call.await;
    };
    let mut events = response.into_inner();
    let printer = tokio::spawn(async move {
        let mut op_id = None;
        while let Ok(Some(message)) = events.message().await {
            let Some(pb::VmEvent { vm_name, kind: Some(pb::vm_event::Kind::StageCompleted(stage)), .. }) =
                message.event
            else {
                continue;
            };
            // The first operation of this kind seen is ours; later ones are someone else's.
            if stage.operation != operation || op_id.get_or_insert_with(|| stage.op_id.clone()) != &stage.op_id {
                continue;
            }
            let line = format!(
                "{operation} {vm_name}: {} done in {} ms (at {:.1} s)",
                stage.stage,
                stage.since_last_stage_ms,
                stage.since_start_ms as f64 / 1000.0
            );
            let mut stderr = std::io::stderr();
            let _ = if tty { write!(stderr, "\r\x1b[K{line}") } else { writeln!(stderr, "{line}") };
            let _ = stderr.flush();
        }
    });
    let result = call.await;
    // The last stage's event may trail the answer by a moment.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    printer.abort();
    if tty {
        eprint!("\r\x1b[K");
    }
    result
}
