//! `bangerd`: parses flags, environment and config file, installs logging, runs the daemon.

use std::path::PathBuf;

use banger_server::{
    config::{Config, Overrides},
    telemetry::Telemetry,
};
use clap::Parser;

/// The banger daemon: owns this host's microVMs and images and serves their lifecycle over gRPC.
///
/// Values come from defaults, then the config file, then `BANGER_*` environment variables,
/// then flags; later ones win. VMs keep running when the daemon stops, and a restarted
/// daemon adopts them.
#[derive(Debug, Parser)]
#[command(name = "bangerd", version)]
struct Args {
    /// TOML config file (default: /etc/banger/config.toml when it exists).
    #[arg(long, env = "BANGER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory: database, images, VM directories [default: /var/lib/banger].
    #[arg(long, env = "BANGER_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Unix socket of the API, created with mode 0660 [default: /run/banger/bangerd.sock].
    #[arg(long, env = "BANGER_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Also serve the API on TCP, over TLS 1.3 with client certificates or tokens; needs
    /// [tls] in the config file (refused without it, loopback included).
    #[arg(long, env = "BANGER_LISTEN", value_name = "HOST:PORT")]
    listen: Option<String>,
    /// Log level: debug, info, warn or error [default: info].
    #[arg(long, env = "BANGER_LOG_LEVEL", value_name = "LEVEL")]
    log_level: Option<String>,
    /// Directory of the default image's vmlinuz, initrd.img and rootfs.ext4.
    #[arg(long, env = "BANGER_DEFAULT_IMAGE_DIR", value_name = "DIR")]
    default_image_dir: Option<PathBuf>,
    /// Export spans and metrics over OTLP/gRPC to this endpoint, e.g. http://127.0.0.1:4317.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// VM networking: `auto` (a bridge, an address range free on this host, NAT, `<vm>.vm`
    /// DNS) or `none` [default: the config's `network`, else auto; a config `bridge` is used
    /// as configured].
    #[arg(long, env = "BANGER_NETWORK", value_name = "MODE")]
    network: Option<String>,
}

/// mimalloc, not glibc's allocator: a page of `ListVms` is a few thousand small allocations,
/// and glibc's spent a third of the daemon's time on them (`make bench`, docs/PERFORMANCE.md:
/// 531 → 228 µs of daemon CPU per page, GetVm 44 → 33 µs per call).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let overrides = Overrides {
        state_dir: args.state_dir,
        socket: args.socket,
        listen: args.listen,
        log_level: args.log_level,
        default_image_dir: args.default_image_dir,
        otlp_endpoint: args.otlp_endpoint,
        network: args.network,
    };
    let config = match Config::load(args.config.as_deref(), overrides.clone()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("bangerd: {err}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("bangerd: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        // The OTLP exporter needs the runtime's reactor: set it up inside.
        let telemetry = match Telemetry::init(config.log_level, config.otlp_endpoint.as_deref()) {
            Ok(telemetry) => telemetry,
            Err(err) => {
                eprintln!("bangerd: {err}");
                return std::process::ExitCode::from(2);
            }
        };
        let (reload_tx, reloads) = tokio::sync::mpsc::channel(1);
        tokio::spawn(reload_on_hangup(args.config.clone(), overrides, reload_tx));
        let result = banger_server::run(config, reloads, shutdown_signal()).await;
        telemetry.shutdown();
        match result {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(error = format!("{err:#}"), "bangerd failed");
                eprintln!("bangerd: {err:#}");
                std::process::ExitCode::FAILURE
            }
        }
    })
}

/// Reads the configuration again on each SIGHUP, as at the start, and hands it on; one that
/// does not load changes nothing and is logged.
async fn reload_on_hangup(file: Option<PathBuf>, overrides: Overrides, reloads: tokio::sync::mpsc::Sender<Config>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else { return };
    while hangups.recv().await.is_some() {
        match Config::load(file.as_deref(), overrides.clone()) {
            Ok(config) => {
                if reloads.send(config).await.is_err() {
                    return;
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "reload refused: the configuration does not load; nothing changed")
            }
        }
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
