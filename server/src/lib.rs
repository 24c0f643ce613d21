//! bangerd: the per-host microVM control plane. `main.rs` parses configuration and calls
//! [`run`]; tests call [`serve`] with their own listeners.

/// Writing to a connection wrapper (`$wrapper<S>`, with the connection in `inner`) writes
/// to the connection: such wrappers only look at, label or count what is read.
macro_rules! forward_async_write {
    ($wrapper:ident) => {
        impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<S> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }
        }
    };
}

pub mod api;
pub mod clock;
pub mod config;
pub mod dns;
pub mod domain;
pub mod host;
pub mod ops;
pub mod store;
pub mod telemetry;

use std::{future::Future, os::unix::fs::PermissionsExt, path::Path, sync::Arc};

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;

use crate::{
    config::{Config, VmmKind},
    domain::RootDiskStrategy,
    host::{
        agent_channel::VsockAgentChannels,
        block::LinuxBlockDevices,
        cgroup::Cgroups,
        doctor::DoctorInputs,
        network::LinuxNetwork,
        process::ProcFs,
        storage::FileDisks,
        vmm::{
            QemuVmm,
            firecracker::{FirecrackerVmm, Jailer},
        },
        vsock::{VsockBackends, VsockMode},
    },
    ops::{HostServices, Ops, OpsConfig},
    store::Store,
};

/// The sockets the API is served on, and who may call it.
#[derive(Debug)]
pub struct Listeners {
    /// The unix socket.
    pub unix: UnixListener,
    /// The optional TCP socket, served with `access`'s TLS.
    pub tcp: Option<TcpListener>,
    /// Who may do what, and the TLS of TCP.
    pub access: api::auth::AccessControl,
}

/// What [`open_ops_with`] wires that a test may replace.
#[derive(Debug, Default)]
pub struct Wiring {
    /// The host's capabilities; `None` wires the real host as the config says.
    pub host: Option<HostServices>,
    /// What "now" is.
    pub clock: clock::Clock,
}

/// Opens the database, wires the host, and reconciles records with what runs.
pub async fn open_ops(config: &Config) -> anyhow::Result<Arc<Ops>> {
    open_ops_with(config, Wiring::default()).await
}

/// [`open_ops`] with a host and a clock of the caller's (tests: `FakeHost`, a manual clock).
pub async fn open_ops_with(config: &Config, wiring: Wiring) -> anyhow::Result<Arc<Ops>> {
    host::fs::make_dir(&config.state_dir, 0o711)
        .with_context(|| format!("create state dir {}", config.state_dir.display()))?;
    if wiring.host.is_none() {
        host::fs::open_state_dir_to_vms(&config.state_dir)?;
        host::confine::check_id_range(config.vm_uid_base, std::path::Path::new("/etc")).map_err(anyhow::Error::msg)?;
    }
    let store = Store::open_with_clock(&config.state_dir.join("banger.db"), wiring.clock)
        .await
        .with_context(|| format!("open database in {}", config.state_dir.display()))?;
    let firecracker = config.vmm == VmmKind::Firecracker;
    if config.root_disk == Some(RootDiskStrategy::DmSnapshot) && !host::block::device_mapper_works() {
        anyhow::bail!(
            "root_disk = \"dm-snapshot\" needs device-mapper, which this host does not offer (no /dev/mapper/control); \
             use auto, reflink, copy or qcow2"
        );
    }
    let root_disk = match config.root_disk {
        Some(strategy) => strategy,
        None => match host::storage::choose_strategy(&config.state_dir).await {
            // Firecracker boots raw disks only; jailed, disk files only.
            RootDiskStrategy::Qcow2 if firecracker => {
                if config.jailer.is_none() && host::block::device_mapper_works() {
                    RootDiskStrategy::DmSnapshot
                } else {
                    RootDiskStrategy::Copy
                }
            }
            strategy => strategy,
        },
    };
    let processes = ProcFs::default();
    let cgroups = Cgroups::detect(Cgroups::DEFAULT_ROOT.into(), config.vmm_memory_overhead_mib);
    let vsock_mode = match (firecracker, config.agent_channel) {
        (true, _) => VsockMode::VmmHybrid,
        (false, config::AgentChannel::VirtioSerial) => VsockMode::VirtioSerial,
        (false, config::AgentChannel::Vsock) => VsockMode::detect(),
    };
    tracing::info!(
        vmm = ?config.vmm,
        vsock = ?vsock_mode,
        root_disk = root_disk.as_str(),
        "host capabilities"
    );
    // Only QEMU has a choice: Firecracker is KVM's alone.
    let accel = match firecracker {
        true => host::accel::AccelDecision { accel: host::vmm::Accel::Kvm, reason: "firecracker runs on KVM".into() },
        false => {
            let inputs = host::accel::ProbeInputs {
                qemu: config.qemu_binary.clone(),
                kernel: config.default_image_dir.join("vmlinuz"),
                // The host's vsock cid (2) is no VM's: its uid is free for the probe.
                identity: host::confine::VmIdentity::of(config.vm_uid_base, 2)
                    .unwrap_or(host::confine::VmIdentity { uid: config.vm_uid_base, gid: config.vm_uid_base }),
                log: config.state_dir.join("kvm-probe.log"),
                cache: host::accel::DEFAULT_CACHE_FILE.into(),
            };
            host::accel::decide(config.accel, &inputs).await
        }
    };
    tracing::info!(accel = ?accel.accel, reason = %accel.reason, "accelerator");
    let backends = VsockBackends::new(config.vsock_backend_binary.clone(), processes.clone());
    let uid_base = config.vm_uid_base;
    let vmm: Arc<dyn host::vmm::Vmm> = if firecracker {
        let vmm = FirecrackerVmm::new(config.firecracker_binary.clone(), processes.clone());
        Arc::new(match &config.jailer {
            Some(jailer) => vmm.jailed(Jailer {
                binary: jailer.binary.clone(),
                uid_base: jailer.uid_base,
                cgroups: cgroups.clone(),
            }),
            None => vmm,
        })
    } else {
        Arc::new(QemuVmm::new(config.qemu_binary.clone(), accel.accel, vsock_mode, processes.clone(), uid_base))
    };
    let host = wiring.host.unwrap_or_else(|| HostServices {
        vmm,
        disks: Arc::new(FileDisks),
        agents: Arc::new(VsockAgentChannels::new(vsock_mode, backends)),
        processes: Arc::new(processes),
        network: Arc::new(LinuxNetwork::new("ip".into())),
        block: Arc::new(LinuxBlockDevices::default()),
        limits: Arc::new(cgroups.clone()),
    });
    let ops_config = OpsConfig {
        vm_defaults: config.vm_defaults,
        state_dir: config.state_dir.clone(),
        default_image: config.default_image.clone(),
        default_image_dir: config.default_image_dir.clone(),
        memory_dir: config.memory_dir.clone(),
        root_disk,
        network: config.network.clone(),
        min_rootfs_bytes: config.image_min_rootfs_mib * 1024 * 1024,
        capacity: ops::Capacity {
            max_vms: config.max_vms,
            max_vcpus: config.max_vcpus,
            max_memory_mib: host::fs::host_memory_mib().map(|mib| mib * u64::from(config.max_memory_percent) / 100),
            min_free_mib: config.min_free_disk_mib,
        },
        max_log_bytes: config.max_log_mib * 1024 * 1024,
        import_roots: config.import_roots.clone(),
        registry: crate::host::oci::registry::RegistryConfig {
            insecure: config.insecure_registries.clone(),
            docker_config: config.registry_auth_file.clone(),
        },
        doctor: Some(DoctorInputs {
            state_dir: config.state_dir.clone(),
            vmm: if firecracker { "firecracker" } else { "qemu" },
            firecracker: config.firecracker_binary.clone(),
            jailer: config.jailer.as_ref().map(|j| j.binary.clone()),
            qemu: config.qemu_binary.clone(),
            vsock_backend: config.vsock_backend_binary.clone(),
            accel: accel.accel,
            accel_reason: accel.reason.clone(),
            network: config.network.as_ref().map(|network| {
                let mut parts = vec![format!("bridge {}, VMs in {}", network.bridge, network.pool)];
                if !network.note.is_empty() {
                    parts.push(format!("({})", network.note));
                }
                if network.nat {
                    parts.push("with NAT".into());
                }
                if network.dns {
                    parts.push(format!("and <vm>.vm names at {}", network.pool.gateway()));
                }
                parts.join(" ")
            }),
            vsock: vsock_mode,
            cgroup: cgroups.version(),
            root_disk,
        }),
    };
    let ops = Arc::new(Ops::new(store, ops_config, host));
    // A VM that cannot be reconciled now is logged and retried by the periodic resync; it
    // must not keep the daemon (and every other VM) from being served.
    let started = std::time::Instant::now();
    if let Err(err) = ops.recover_snapshots().await {
        tracing::warn!(error = err.chain(), "cannot recover snapshots cut short");
    }
    let recovered = ops.recover().await;
    tracing::info!(duration_ms = started.elapsed().as_secs_f64() * 1000.0, "startup reconcile");
    if let Err(err) = recovered {
        tracing::warn!(error = err.chain(), "startup reconcile incomplete; retrying every 30 s");
    }
    Ok(ops)
}

/// Serves the API on `listeners` until `shutdown` completes. VMs keep running afterwards.
pub async fn serve(ops: Arc<Ops>, listeners: Listeners, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let routes = api::routes(ops.clone()).await.context("build reflection service")?;
    let resync = tokio::spawn(resync_periodically(ops.clone()));
    let reaper = tokio::spawn(reap_periodically(ops.clone()));
    let refiller = tokio::spawn(refill_periodically(ops.clone()));
    let router = tonic::transport::Server::builder()
        .trace_fn(telemetry::propagation::request_span)
        .layer(telemetry::propagation::RpcMetricsLayer)
        .layer(api::auth::AuthLayer::new(listeners.access.clone(), ops.clock().clone()))
        .add_routes(routes);
    let vm_counts = telemetry::metrics::VmCounts::default();
    telemetry::metrics::observe_vms(vm_counts.clone());
    let counting = tokio::spawn(count_vms_periodically(ops.clone(), vm_counts));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let unix = router.clone().serve_with_incoming_shutdown(any_authority(listeners.unix), stopped(stop_rx.clone()));
    let tcp = listeners.tcp.map(|tcp| {
        let incoming = api::auth::tls_incoming(tcp, listeners.access.clone());
        router.serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()))
    });
    let servers = async {
        match tcp {
            Some(tcp) => tokio::try_join!(unix, tcp).map(drop),
            None => unix.await,
        }
    };
    tokio::pin!(servers);
    tokio::select! {
        result = &mut servers => result.context("serve api")?,
        () = shutdown => {
            // Watches and waits end first, or the servers would wait for them forever.
            ops.stop_serving();
            let _ = stop_tx.send(true);
            servers.await.context("serve api")?;
        }
    }
    resync.abort();
    reaper.abort();
    refiller.abort();
    counting.abort();
    ops.close().await;
    Ok(())
}

/// Accepted unix-socket connections, each with its peer's credentials and taking any
/// `:authority` (see [`api::authority`]).
fn any_authority(
    listener: UnixListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<api::auth::Peered<api::authority::AnyAuthority<tokio::net::UnixStream>>>>
{
    use tokio_stream::StreamExt;
    UnixListenerStream::new(listener).map(|accepted| {
        accepted.map(|stream| {
            let peer = api::auth::local_peer(&stream);
            api::auth::Peered::new(api::authority::AnyAuthority::new(stream), peer)
        })
    })
}

/// Refreshes the VM-by-state counts the `banger.vms` gauge reports.
async fn count_vms_periodically(ops: Arc<Ops>, counts: telemetry::metrics::VmCounts) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    loop {
        tick.tick().await;
        if let Ok(by_state) = ops.count_vms_by_state().await {
            *counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = by_state;
        }
    }
}

/// How often the pool refiller looks when nothing wakes it.
const REFILL_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// How long the refiller lets pass after a pool changed before it boots: a claimed VM's
/// caller runs its first command at once, and a replacement starting beside it (QEMU's
/// start and the daemon's work run at normal CPU weight until the VMM is in its group)
/// would slow that command down; a boot takes seconds, so the pool is barely later full.
const REFILL_SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// Keeps every warm pool at its size: after each pass, waits until a pool changes (a pool
/// made, a member claimed or booted) or [`REFILL_PERIOD`] passes, then [`REFILL_SETTLE`].
async fn refill_periodically(ops: Arc<Ops>) {
    loop {
        if let Err(error) = ops.refill_pools().await {
            tracing::warn!(error = %error, "pool refill failed");
        }
        ops.pools_changed(REFILL_PERIOD).await;
        tokio::time::sleep(REFILL_SETTLE).await;
    }
}

/// How often the reaper looks for VMs whose time to live is over, and VM logs are capped.
const REAP_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// Deletes expired VMs and caps VM logs every [`REAP_PERIOD`], and whenever a test moves
/// the clock.
async fn reap_periodically(ops: Arc<Ops>) {
    let mut tick = tokio::time::interval(REAP_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut moves = ops.clock().moves();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = moves.moved() => {}
        }
        if let Err(error) = ops.reap_expired().await {
            tracing::warn!(error = %error, "reaper failed");
        }
        if let Err(error) = ops.cap_logs().await {
            tracing::warn!(error = %error, "capping logs failed");
        }
    }
}

/// How often records are reconciled with the host while the daemon runs.
const RESYNC_PERIOD: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs the startup reconcile again every [`RESYNC_PERIOD`]: VMMs that died, orphans left by
/// anything outside the daemon's control.
async fn resync_periodically(ops: Arc<Ops>) {
    let mut tick = tokio::time::interval(RESYNC_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(err) = ops.recover().await {
            tracing::warn!(error = err.chain(), "periodic resync failed");
        }
    }
}

/// Binds the unix socket (mode 0660, group `group` when given; its directory, made when
/// missing, 0755 so that the group reaches it), refusing to take over one
/// another daemon serves, and removing what is at the path only when it is a socket nobody
/// answers on.
pub async fn bind_unix(path: &Path, group: Option<u32>) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = path.parent()
        && std::fs::symlink_metadata(dir).is_err()
    {
        host::fs::make_dir(dir, 0o755).with_context(|| format!("create socket dir {}", dir.display()))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            anyhow::bail!("{} exists and is not a socket: refusing to remove it", path.display());
        }
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            anyhow::bail!("another bangerd is already serving on {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("remove stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .with_context(|| format!("give {} to group {gid}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

/// Applies each configuration `reloads` yields (read again on SIGHUP): who may do what
/// (grants, tokens, health) and the TCP listener's certificate, CA and CRL. The rest needs a
/// restart, and a reload that changes it says so. A configuration whose TLS files do not
/// load changes nothing.
async fn reload_access(
    mut current: Config,
    mut reloads: tokio::sync::mpsc::Receiver<Config>,
    access: api::auth::AccessControl,
) {
    while let Some(next) = reloads.recv().await {
        let loaded = next.tls.as_ref().map(|files| {
            Ok::<_, anyhow::Error>((api::auth::server_config(files, &next.access)?, api::auth::revocations(files)?))
        });
        let (tls, revoked) = match loaded.transpose() {
            Ok(Some((tls, revoked))) => (Some(tls), revoked),
            Ok(None) => (None, Vec::new()),
            Err(error) => {
                tracing::error!(
                    error = format!("{error:#}"),
                    "reload refused: the TLS files do not load; nothing changed"
                );
                continue;
            }
        };
        if current.tls.is_some() && tls.is_none() {
            tracing::warn!("reload: [tls] is gone; TCP keeps the TLS it had until a restart");
        }
        access.replace(next.access.clone(), tls, revoked);
        let rest_changed = Config { access: next.access.clone(), tls: next.tls.clone(), ..current.clone() } != next;
        tracing::info!(
            grants = next.access.grants.len(),
            tokens = next.access.tokens.len(),
            restart_needed = rest_changed,
            "reloaded who may do what and TLS; other settings apply at the next start"
        );
        current = Config { access: next.access, tls: next.tls, ..current };
    }
}

/// Runs the daemon with `config` until `shutdown` completes, applying the access settings of
/// each configuration `reloads` yields.
pub async fn run(
    mut config: Config,
    reloads: tokio::sync::mpsc::Receiver<Config>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // Private by default: what the daemon makes is its own unless it says otherwise.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let _lock = host::lock::StateDirLock::acquire(&config.state_dir)?;
    let remembered = config.state_dir.join("network");
    if let Some(network) = config.network.as_mut().filter(|network| network.auto) {
        let (pool, why) = host::network::choose_auto_pool(Path::new("ip"), &network.bridge, &remembered)
            .await
            .context("network = \"auto\" (set bridge_cidr, or network = \"none\")")?;
        tracing::info!(bridge = %network.bridge, %pool, why = %why, "vm network");
        network.pool = pool;
        network.note = format!("auto: {why}");
    }
    // Bad TLS material stops the daemon before it touches anything.
    let tls = config.tls.as_ref().map(|files| api::auth::server_config(files, &config.access)).transpose()?;
    let ops = open_ops(&config).await?;
    let unix = bind_unix(&config.socket, config.socket_group).await?;
    let tcp = match (config.listen, &tls) {
        (Some(addr), Some(_)) => Some(TcpListener::bind(addr).await.with_context(|| format!("listen on {addr}"))?),
        (Some(addr), None) => anyhow::bail!("{addr}: TCP is served only over TLS: set [tls] in the config file"),
        (None, _) => None,
    };
    tracing::info!(
        socket = %config.socket.display(),
        listen = config.listen.map(|a| a.to_string()),
        state_dir = %config.state_dir.display(),
        version = env!("CARGO_PKG_VERSION"),
        "bangerd serving"
    );
    let dns = match config.network.as_ref().filter(|n| n.dns) {
        None => None,
        Some(network) => {
            let address = std::net::SocketAddr::from((network.pool.gateway(), 53));
            match dns::bind(address) {
                Ok(socket) => {
                    let upstream = network.dns_upstream.or_else(|| {
                        dns::first_nameserver(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())
                    });
                    let relay = match upstream {
                        Some(upstream) => match dns::Upstream::connect(upstream).await {
                            Ok(relay) => Some(relay),
                            Err(error) => {
                                tracing::warn!(%upstream, error = %error, "cannot reach the upstream nameserver; other names are refused");
                                None
                            }
                        },
                        None => None,
                    };
                    let limits = dns::Limits::for_network(network.pool.gateway(), network.pool.prefix());
                    tracing::info!(%address, upstream = upstream.map(|u| u.to_string()), "serving dns for .vm names");
                    Some(tokio::spawn(dns::serve(socket, ops.clone(), relay, limits)))
                }
                Err(error) => {
                    tracing::warn!(%address, error = %error, "cannot serve dns; guests resolve no .vm names");
                    None
                }
            }
        }
    };
    let revoked = match &config.tls {
        Some(files) => api::auth::revocations(files)?,
        None => Vec::new(),
    };
    let access = api::auth::AccessControl::new(config.access.clone(), tls, revoked);
    let reloading = tokio::spawn(reload_access(config.clone(), reloads, access.clone()));
    let result = serve(ops, Listeners { unix, tcp, access }, shutdown).await;
    reloading.abort();
    if let Some(dns) = dns {
        dns.abort();
    }
    let _ = std::fs::remove_file(&config.socket);
    tracing::info!("bangerd stopped");
    result
}
