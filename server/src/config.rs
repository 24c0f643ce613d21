//! The daemon's configuration: defaults, overridden by the config file, overridden by
//! `BANGER_*` environment variables and command-line flags.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    domain::{
        IpPool, Labels, MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB, RootDiskStrategy, VmDefaults,
        access::{AccessPolicy, Grant, Principal, Role, Tenant, Token},
    },
    host::vmm::Accel,
    telemetry::LogLevel,
};

/// Default unix socket of the API.
pub const DEFAULT_SOCKET: &str = "/run/banger/bangerd.sock";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/banger";
/// Default directory of the default image's artifacts, where `make setup` installs them.
pub const DEFAULT_IMAGE_DIR: &str = "/usr/local/share/banger/images/default";
/// Memory a VMM may use beyond its guest's: device emulation, and under TCG the code cache.
pub const DEFAULT_VMM_MEMORY_OVERHEAD_MIB: u64 = 512;
/// Default [`Config::image_min_rootfs_mib`]: 1 GiB, like the default image's.
pub const DEFAULT_IMAGE_MIN_ROOTFS_MIB: u64 = 1024;
/// Default [`Config::max_log_mib`].
pub const DEFAULT_MAX_LOG_MIB: u64 = 16;
/// Default [`Config::max_memory_percent`]: guests get at most 90% of the host's memory.
pub const DEFAULT_MAX_MEMORY_PERCENT: u32 = 90;
/// Default [`Config::min_free_disk_mib`].
pub const DEFAULT_MIN_FREE_DISK_MIB: u64 = 1024;
/// The VM network when a bridge is configured without one.
pub const DEFAULT_BRIDGE_CIDR: &str = "172.30.0.0/24";
/// The bridge of `network = "auto"` (the default).
pub const DEFAULT_BRIDGE: &str = "banger0";
/// Config file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/banger/config.toml";
/// First uid (and gid) of VMs' processes: the VM with vsock context id N runs as this + N.
pub const DEFAULT_VM_UID_BASE: u32 = 900_000;

/// The config file's contents; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`Config::state_dir`].
    pub state_dir: Option<PathBuf>,
    /// See [`Config::socket`].
    pub socket: Option<PathBuf>,
    /// See [`Config::listen`].
    pub listen: Option<String>,
    /// See [`Config::log_level`].
    pub log_level: Option<LogLevel>,
    /// See [`Config::default_image`].
    pub default_image: Option<String>,
    /// See [`Config::default_image_dir`].
    pub default_image_dir: Option<PathBuf>,
    /// See [`Config::qemu_binary`].
    pub qemu_binary: Option<PathBuf>,
    /// Ignored: qcow2 overlays are written by the daemon itself. Still accepted, so that
    /// config files written for earlier versions load.
    pub qemu_img_binary: Option<PathBuf>,
    /// See [`Config::vsock_backend_binary`].
    pub vsock_backend_binary: Option<PathBuf>,
    /// See [`Config::accel`]: `auto`, `tcg` or `kvm`.
    pub accel: Option<AccelChoice>,
    /// See [`Config::agent_channel`].
    pub agent_channel: Option<AgentChannel>,
    /// See [`Config::memory_dir`].
    pub memory_dir: Option<PathBuf>,
    /// See [`Config::otlp_endpoint`].
    pub otlp_endpoint: Option<String>,
    /// See [`Config::vmm_memory_overhead_mib`].
    pub vmm_memory_overhead_mib: Option<u64>,
    /// See [`Config::image_min_rootfs_mib`].
    pub image_min_rootfs_mib: Option<u64>,
    /// See [`Config::max_log_mib`].
    pub max_log_mib: Option<u64>,
    /// See [`Config::max_vms`].
    pub max_vms: Option<u64>,
    /// See [`Config::max_vcpus`].
    pub max_vcpus: Option<u64>,
    /// See [`Config::max_memory_percent`].
    pub max_memory_percent: Option<u32>,
    /// See [`Config::min_free_disk_mib`].
    pub min_free_disk_mib: Option<u64>,
    /// See [`Config::insecure_registries`].
    pub insecure_registries: Option<Vec<String>>,
    /// See [`Config::registry_auth_file`].
    pub registry_auth_file: Option<PathBuf>,
    /// See [`Config::root_disk`]: `auto`, `qcow2`, `reflink`, `copy` or `dm-snapshot`.
    pub root_disk: Option<RootDiskChoice>,
    /// See [`Config::network`]: `auto` (the default: a bridge, an address range free on this
    /// host, NAT and DNS) or `none` (no network); a `bridge` is configured by hand instead.
    pub network: Option<NetworkMode>,
    /// See [`Config::network`]: the bridge VMs attach to.
    pub bridge: Option<String>,
    /// See [`Config::network`]: the bridge's network, e.g. `172.30.0.0/24`.
    pub bridge_cidr: Option<String>,
    /// See [`Config::network`]: masquerade each VM's traffic leaving the bridge.
    pub nat: Option<bool>,
    /// See [`NetworkConfig::dns`]: serve `<vm>.vm` names on the bridge address.
    pub dns: Option<bool>,
    /// See [`NetworkConfig::dns_upstream`].
    pub dns_upstream: Option<String>,
    /// See [`Config::vmm`]: `qemu` or `firecracker`.
    pub vmm: Option<VmmKind>,
    /// See [`Config::firecracker_binary`].
    pub firecracker_binary: Option<PathBuf>,
    /// See [`Config::jailer`]: run each Firecracker under its jailer.
    pub jailer: Option<bool>,
    /// See [`JailerConfig::binary`].
    pub jailer_binary: Option<PathBuf>,
    /// See [`Config::vm_uid_base`].
    pub vm_uid_base: Option<u32>,
    /// The name `vm_uid_base` had when only jailed VMMs dropped root.
    pub jailer_uid_base: Option<u32>,
    /// See [`Config::socket_group`]: a group name or number.
    pub socket_group: Option<String>,
    /// See [`Config::tls`].
    pub tls: Option<FileTls>,
    /// See [`Config::access`] and [`Config::import_roots`].
    pub auth: Option<FileAuth>,
    /// See [`Config::vm_defaults`].
    pub vm_defaults: Option<FileVmDefaults>,
}

/// `[vm_defaults]`: the shape of a create that does not give one.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileVmDefaults {
    /// vCPUs.
    pub vcpus: Option<u32>,
    /// Guest memory in MiB.
    pub memory_mib: Option<u32>,
    /// The least root disk: `20G`, `512M` (K, M, G, T: powers of 1024).
    pub disk_size: Option<String>,
}

/// `[tls]`: what TCP is served with.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    /// See [`TlsFiles::ca`].
    pub ca: Option<PathBuf>,
    /// See [`TlsFiles::cert`].
    pub cert: Option<PathBuf>,
    /// See [`TlsFiles::key`].
    pub key: Option<PathBuf>,
    /// See [`TlsFiles::crl`].
    pub crl: Option<PathBuf>,
}

/// `[auth]`: who may do what.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAuth {
    /// See [`AccessPolicy::health_without_credentials`].
    pub health_without_credentials: Option<bool>,
    /// See [`Config::import_roots`].
    pub import_roots: Option<Vec<PathBuf>>,
    /// `[[auth.grants]]`.
    #[serde(default)]
    pub grants: Vec<FileGrant>,
    /// `[[auth.tokens]]`.
    #[serde(default)]
    pub tokens: Vec<FileToken>,
}

/// `[[auth.grants]]`: one of `uid`, `gid`, `user`, `group`, `cert`; a role; maybe a tenant.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileGrant {
    /// A local uid.
    pub uid: Option<u32>,
    /// A local gid.
    pub gid: Option<u32>,
    /// A local user, by name.
    pub user: Option<String>,
    /// A local group, by name.
    pub group: Option<String>,
    /// A client certificate's common name or subject alternative name.
    pub cert: Option<String>,
    /// `viewer`, `operator` or `admin`.
    pub role: Role,
    /// A label selector, `key=value[,key=value]`, the caller is confined to.
    pub tenant: Option<String>,
}

/// `[[auth.tokens]]`: a bearer token.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileToken {
    /// Its name.
    pub name: String,
    /// SHA-256 of its text, in hex (`banger token new` prints both).
    pub sha256: String,
    /// `viewer`, `operator` or `admin`.
    pub role: Role,
    /// A label selector the caller is confined to.
    pub tenant: Option<String>,
    /// RFC 3339 time after which it is refused, e.g. `2027-01-31T00:00:00Z`.
    pub expires: Option<String>,
}

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML of the expected shape.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A value is not acceptable.
    #[error("invalid {key}: {message}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// Why.
        message: String,
    },
}

/// The daemon's effective configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Database, images and VM directories live here.
    pub state_dir: PathBuf,
    /// The API's unix socket (mode 0660).
    pub socket: PathBuf,
    /// Optional TCP address of the API, served over TLS with client certificates (mTLS) or
    /// bearer tokens; needs [`Config::tls`].
    pub listen: Option<SocketAddr>,
    /// The unix socket's group (mode 0660): its members may connect (and have the role
    /// their grants give them); `None`: root's group.
    pub socket_group: Option<u32>,
    /// The TCP listener's certificate and the CA its clients' certificates must come from.
    pub tls: Option<TlsFiles>,
    /// Who may do what.
    pub access: AccessPolicy,
    /// `ImportImage` reads host files only under these directories; `None`: anywhere
    /// (admins only, regular files only, never through a symbolic link).
    pub import_roots: Option<Vec<PathBuf>>,
    /// Log verbosity.
    pub log_level: LogLevel,
    /// Name of the image a create without an image uses.
    pub default_image: String,
    /// Where the default image's artifacts are, imported on first use.
    pub default_image_dir: PathBuf,
    /// `qemu-system-x86_64`.
    pub qemu_binary: PathBuf,
    /// `vhost-device-vsock`.
    pub vsock_backend_binary: PathBuf,
    /// QEMU accelerator; `None` (`auto`): KVM where a guest kernel boots under it on this
    /// host (probed once, see `host::accel`), else TCG.
    pub accel: Option<Accel>,
    /// How QEMU guests' agents are reached: `vsock` (the kernel's vhost-vsock where the host
    /// has it, else `vhost-device-vsock`) or `virtio-serial` (a port QEMU serves on a unix
    /// socket: no backend process, and it survives the VMM's save and restore).
    pub agent_channel: AgentChannel,
    /// Where the guest memory of VMs that may be snapshotted lives while they run, one file
    /// per VM (`agent_channel = "virtio-serial"`): a tmpfs, so that the memory is never
    /// written back to a disk.
    pub memory_dir: PathBuf,
    /// OTLP/gRPC endpoint for spans and metrics (`http://HOST:4317`); none exports nothing.
    pub otlp_endpoint: Option<String>,
    /// Memory a VMM may use beyond its guest's, in its cgroup's limit.
    pub vmm_memory_overhead_mib: u64,
    /// The smallest root file system made for a container image, in MiB (sparse: the room
    /// costs nothing on the host until a guest writes into it).
    pub image_min_rootfs_mib: u64,
    /// Each VM log (console, VMM, vsock backend) is kept under this size: its oldest part is
    /// dropped (checked every second).
    pub max_log_mib: u64,
    /// At most this many VMs are recorded; none: no limit.
    pub max_vms: Option<u64>,
    /// The VMs that run (or are starting) have at most this many vCPUs in all; none: no limit.
    pub max_vcpus: Option<u64>,
    /// The VMs that run (or are starting) have at most this share of the host's memory, in
    /// percent, as guest memory in all.
    pub max_memory_percent: u32,
    /// Creates are refused while the state dir's file system has less free space than this.
    pub min_free_disk_mib: u64,
    /// Registries (`host:port`) pulled from over plain HTTP; every other one over HTTPS with
    /// the system's CAs.
    pub insecure_registries: Vec<String>,
    /// A docker `config.json` whose `auths` give registry credentials; by default
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, when it exists.
    pub registry_auth_file: Option<PathBuf>,
    /// How new VMs' root disks are made; `None` chooses at startup (reflink where the state
    /// dir supports it, else qcow2 under QEMU; under Firecracker, which boots raw disks,
    /// a dm-snapshot where device-mapper works and the VMM is not jailed, else a copy).
    pub root_disk: Option<RootDiskStrategy>,
    /// VM networking: `None` when no bridge is configured.
    pub network: Option<NetworkConfig>,
    /// The VMM driver.
    pub vmm: VmmKind,
    /// `firecracker`.
    pub firecracker_binary: PathBuf,
    /// Firecracker's jailer, when each Firecracker runs under it.
    pub jailer: Option<JailerConfig>,
    /// The processes of the VM with vsock context id N (its VMM, its vsock backend) run as
    /// uid and gid `vm_uid_base + N`: one unprivileged identity per VM, in a range nothing
    /// else on the host uses.
    pub vm_uid_base: u32,
    /// The shape of a create that leaves it unset (`[vm_defaults]`).
    pub vm_defaults: VmDefaults,
}

/// The PEM files TCP is served with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate(s) client certificates must be signed by.
    pub ca: PathBuf,
    /// The daemon's certificate chain.
    pub cert: PathBuf,
    /// The daemon's private key.
    pub key: PathBuf,
    /// Revoked client certificates (a CRL from the CA), if any.
    pub crl: Option<PathBuf>,
}

/// How Firecracker's jailer confines each VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerConfig {
    /// `jailer`.
    pub binary: PathBuf,
    /// The VMM of the VM with vsock context id N runs as uid and gid `uid_base + N`: one
    /// unprivileged identity per VM, in a range nothing else on the host uses.
    pub uid_base: u32,
}

/// How root disks are made, as configured: chosen at startup, or one strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RootDiskChoice {
    /// `auto`.
    Auto(Auto),
    /// `qcow2`, `reflink`, `copy` or `dm-snapshot`.
    Strategy(RootDiskStrategy),
}

/// The accelerator as configured: chosen at startup, or one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum AccelChoice {
    /// `auto`.
    Auto(Auto),
    /// `tcg` or `kvm`.
    Fixed(Accel),
}

/// The word `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Auto {
    /// Chosen at startup.
    Auto,
}

/// `network = ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// A bridge of banger's own, an address range chosen at startup, NAT and DNS.
    Auto,
    /// VMs have no network.
    None,
}

/// Which VMM drives the VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmmKind {
    /// QEMU `-M microvm`: works on any Linux host, under TCG where KVM cannot boot guests.
    Qemu,
    /// Firecracker: needs KVM; raw root disks only.
    Firecracker,
}

/// How VMs are networked: one tap each on a bridge, addresses from the bridge's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The bridge (created if missing, with the pool's gateway address).
    pub bridge: String,
    /// Where VM addresses come from.
    pub pool: IpPool,
    /// Whether each VM's traffic leaving the bridge is masqueraded (nftables).
    pub nat: bool,
    /// Whether bangerd answers DNS on the bridge address (port 53) for `<vm>.vm` names,
    /// relaying other names to the host's nameserver, and guests use it.
    pub dns: bool,
    /// Where other names are relayed (`IP` or `IP:PORT`); by default the first nameserver of
    /// the host's `/etc/resolv.conf`.
    pub dns_upstream: Option<std::net::SocketAddr>,
    /// `network = "auto"`: `pool` is chosen at startup (`host::network::choose_pool`), among
    /// private ranges the host's routes and addresses do not use.
    pub auto: bool,
    /// How `pool` was chosen, for `doctor` (empty: configured).
    pub note: String,
}

/// Values given on the command line or in the environment, which win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--state-dir` / `BANGER_STATE_DIR`.
    pub state_dir: Option<PathBuf>,
    /// `--socket` / `BANGER_SOCKET`.
    pub socket: Option<PathBuf>,
    /// `--listen` / `BANGER_LISTEN`.
    pub listen: Option<String>,
    /// `--log-level` / `BANGER_LOG_LEVEL`.
    pub log_level: Option<String>,
    /// `BANGER_DEFAULT_IMAGE_DIR`.
    pub default_image_dir: Option<PathBuf>,
    /// `--otlp-endpoint` / `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub otlp_endpoint: Option<String>,
    /// `--network` / `BANGER_NETWORK`: `auto` or `none`.
    pub network: Option<String>,
}

impl Config {
    /// Reads `file` (when given, or the default file when it exists) and applies `overrides`.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let file_config = match file {
            Some(path) => read_file(path)?,
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => read_file(Path::new(DEFAULT_CONFIG_FILE))?,
            None => FileConfig::default(),
        };
        Self::from_parts(file_config, overrides)
    }

    /// Merges file values and overrides over the defaults, validating each.
    pub fn from_parts(file: FileConfig, overrides: Overrides) -> Result<Self, ConfigError> {
        let log_level = match overrides.log_level {
            Some(level) => {
                level.parse::<LogLevel>().map_err(|message| ConfigError::Invalid { key: "log level", message })?
            }
            None => file.log_level.unwrap_or(LogLevel::Info),
        };
        let tls = match file.tls {
            None => None,
            Some(FileTls { ca: Some(ca), cert: Some(cert), key: Some(key), crl }) => {
                Some(TlsFiles { ca, cert, key, crl })
            }
            Some(_) => {
                return Err(ConfigError::Invalid {
                    key: "tls",
                    message: "[tls] needs ca (the clients' CA), cert and key (the daemon's)".into(),
                });
            }
        };
        let listen = match overrides.listen.or(file.listen).filter(|l| !l.is_empty()) {
            None => None,
            Some(listen) => Some(parse_listen(&listen, tls.is_some())?),
        };
        let auth = file.auth.unwrap_or_default();
        let access = AccessPolicy {
            grants: auth.grants.into_iter().map(grant).collect::<Result<_, _>>()?,
            tokens: auth.tokens.into_iter().map(token).collect::<Result<_, _>>()?,
            health_without_credentials: auth.health_without_credentials.unwrap_or(false),
        };
        if let Some(roots) = &auth.import_roots
            && let Some(root) = roots.iter().find(|r| !r.is_absolute())
        {
            return Err(ConfigError::Invalid {
                key: "auth.import_roots",
                message: format!("{} is not an absolute path", root.display()),
            });
        }
        let socket_group = file.socket_group.as_deref().map(group_id).transpose()?;
        let accel = match file.accel {
            None | Some(AccelChoice::Auto(_)) => None,
            Some(AccelChoice::Fixed(accel)) => Some(accel),
        };
        let root_disk = match file.root_disk {
            None | Some(RootDiskChoice::Auto(_)) => None,
            Some(RootDiskChoice::Strategy(strategy)) => Some(strategy),
        };
        // `--network`/BANGER_NETWORK wins: `none` even over a configured bridge.
        let forced = match overrides.network.as_deref() {
            None => None,
            Some("auto") => Some(NetworkMode::Auto),
            Some("none") => Some(NetworkMode::None),
            Some(other) => {
                return Err(ConfigError::Invalid { key: "network", message: format!("{other:?} is not auto or none") });
            }
        };
        if file.network == Some(NetworkMode::None) && file.bridge.as_deref().is_some_and(|b| !b.is_empty()) {
            return Err(ConfigError::Invalid {
                key: "network",
                message: "network = \"none\" with a bridge: remove one of them".into(),
            });
        }
        let mode = forced.or(file.network);
        let dns_upstream = match &file.dns_upstream {
            None => None,
            Some(text) => Some(
                text.parse::<std::net::SocketAddr>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(|ip| std::net::SocketAddr::new(ip, 53)))
                    .map_err(|_| ConfigError::Invalid {
                        key: "dns_upstream",
                        message: format!("{text:?} is not an IP address or IP:PORT"),
                    })?,
            ),
        };
        let network = match (file.bridge.filter(|b| !b.is_empty()), mode) {
            (_, Some(NetworkMode::None)) => None,
            (None, None | Some(NetworkMode::Auto)) => Some(NetworkConfig {
                bridge: DEFAULT_BRIDGE.into(),
                pool: DEFAULT_BRIDGE_CIDR.parse().map_err(|e: crate::domain::PoolError| ConfigError::Invalid {
                    key: "bridge_cidr",
                    message: e.to_string(),
                })?,
                nat: file.nat.unwrap_or(true),
                dns: file.dns.unwrap_or(true),
                dns_upstream,
                auto: file.bridge_cidr.is_none(),
                note: String::new(),
            }),
            (Some(bridge), _) => {
                if bridge.len() > 15 || bridge.contains(['/', ' ']) {
                    return Err(ConfigError::Invalid {
                        key: "bridge",
                        message: format!("{bridge:?} is not an interface name"),
                    });
                }
                Some(NetworkConfig {
                    bridge,
                    pool: DEFAULT_BRIDGE_CIDR.parse().map_err(|e: crate::domain::PoolError| ConfigError::Invalid {
                        key: "bridge_cidr",
                        message: e.to_string(),
                    })?,
                    nat: file.nat.unwrap_or(false),
                    dns: file.dns.unwrap_or(true),
                    dns_upstream,
                    auto: false,
                    note: String::new(),
                })
            }
        };
        // A bridge_cidr given is the pool, auto or not.
        let network = match (network, file.bridge_cidr) {
            (Some(mut network), Some(cidr)) => {
                network.pool = cidr.parse().map_err(|e: crate::domain::PoolError| ConfigError::Invalid {
                    key: "bridge_cidr",
                    message: e.to_string(),
                })?;
                Some(network)
            }
            (network, _) => network,
        };
        let vm_defaults = vm_defaults(file.vm_defaults.unwrap_or_default())?;
        let vmm = file.vmm.unwrap_or(VmmKind::Qemu);
        if vmm == VmmKind::Firecracker && root_disk == Some(RootDiskStrategy::Qcow2) {
            return Err(ConfigError::Invalid {
                key: "root_disk",
                message: "firecracker boots raw disks only: use reflink, copy or auto".into(),
            });
        }
        let max_log_mib = file.max_log_mib.unwrap_or(DEFAULT_MAX_LOG_MIB);
        if max_log_mib == 0 {
            return Err(ConfigError::Invalid {
                key: "max_log_mib",
                message: "0 would keep no log: give a size".into(),
            });
        }
        let max_memory_percent = file.max_memory_percent.unwrap_or(DEFAULT_MAX_MEMORY_PERCENT);
        if max_memory_percent == 0 {
            return Err(ConfigError::Invalid {
                key: "max_memory_percent",
                message: "0 would admit no VM: give a share of the host's memory (above 100 overcommits)".into(),
            });
        }
        let vm_uid_base = file.vm_uid_base.or(file.jailer_uid_base).unwrap_or(DEFAULT_VM_UID_BASE);
        if vm_uid_base == 0 || vm_uid_base > u32::MAX / 2 {
            return Err(ConfigError::Invalid {
                key: "vm_uid_base",
                message: format!("{vm_uid_base}: must be above 0 (root) and leave room for one uid per VM"),
            });
        }
        // Firecracker runs under its jailer unless told otherwise: no VMM runs as root.
        let jailer = match file.jailer.unwrap_or(vmm == VmmKind::Firecracker) {
            false => None,
            true if root_disk == Some(RootDiskStrategy::DmSnapshot) => {
                return Err(ConfigError::Invalid {
                    key: "root_disk",
                    message: "jailed VMs boot from disk files (Firecracker is jailed unless jailer = false): use \
                              reflink, copy or auto, or set jailer = false to run it unjailed, as root"
                        .into(),
                });
            }
            true if vmm != VmmKind::Firecracker => {
                return Err(ConfigError::Invalid {
                    key: "jailer",
                    message: "the jailer confines Firecracker: set vmm = \"firecracker\" too".into(),
                });
            }
            true => Some(JailerConfig {
                binary: file.jailer_binary.unwrap_or_else(|| "jailer".into()),
                uid_base: vm_uid_base,
            }),
        };
        Ok(Self {
            vm_defaults,
            vmm,
            jailer,
            vm_uid_base,
            firecracker_binary: file.firecracker_binary.unwrap_or_else(|| "firecracker".into()),
            network,
            root_disk,
            state_dir: overrides.state_dir.or(file.state_dir).unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            socket: overrides.socket.or(file.socket).unwrap_or_else(|| DEFAULT_SOCKET.into()),
            listen,
            socket_group,
            tls,
            access,
            import_roots: auth.import_roots,
            log_level,
            default_image: file.default_image.unwrap_or_else(|| "default".into()),
            default_image_dir: overrides
                .default_image_dir
                .or(file.default_image_dir)
                .unwrap_or_else(|| DEFAULT_IMAGE_DIR.into()),
            qemu_binary: file.qemu_binary.unwrap_or_else(|| "qemu-system-x86_64".into()),
            vsock_backend_binary: file.vsock_backend_binary.unwrap_or_else(|| "vhost-device-vsock".into()),
            accel,
            agent_channel: file.agent_channel.unwrap_or_default(),
            memory_dir: file.memory_dir.unwrap_or_else(|| crate::host::fs::DEFAULT_MEMORY_DIR.into()),
            otlp_endpoint: overrides.otlp_endpoint.or(file.otlp_endpoint).filter(|e| !e.is_empty()),
            vmm_memory_overhead_mib: file.vmm_memory_overhead_mib.unwrap_or(DEFAULT_VMM_MEMORY_OVERHEAD_MIB),
            image_min_rootfs_mib: file.image_min_rootfs_mib.unwrap_or(DEFAULT_IMAGE_MIN_ROOTFS_MIB),
            max_log_mib,
            max_vms: file.max_vms,
            max_vcpus: file.max_vcpus,
            max_memory_percent,
            min_free_disk_mib: file.min_free_disk_mib.unwrap_or(DEFAULT_MIN_FREE_DISK_MIB),
            insecure_registries: file.insecure_registries.unwrap_or_default(),
            registry_auth_file: file.registry_auth_file.or_else(default_registry_auth_file),
        })
    }
}

/// How QEMU guests' agents are reached (`agent_channel` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentChannel {
    /// vsock: the kernel's vhost-vsock where `/dev/vhost-vsock` opens, else a
    /// `vhost-device-vsock` per VM.
    #[default]
    Vsock,
    /// A virtio-serial port on a unix socket QEMU serves.
    VirtioSerial,
}

/// Where docker keeps registry credentials for the daemon's user.
fn default_registry_auth_file() -> Option<PathBuf> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker")))?;
    Some(dir.join("config.json"))
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })
}

/// Parses a TCP listen address, which needs TLS: no path into the API is unauthenticated,
/// loopback included (every local user and container in the host's network reaches it).
fn parse_listen(listen: &str, tls: bool) -> Result<SocketAddr, ConfigError> {
    let addr: SocketAddr = listen.parse().map_err(|_| ConfigError::Invalid {
        key: "listen address",
        message: format!("{listen:?} is not HOST:PORT with a numeric IP"),
    })?;
    if !tls {
        return Err(ConfigError::Invalid {
            key: "listen address",
            message: format!(
                "{addr}: TCP is served only over TLS with client certificates or tokens; set [tls] ca, cert and key \
                 in the config file (`banger tls init DIR` makes a CA and certificates)"
            ),
        });
    }
    Ok(addr)
}

/// A `key=value[,key=value]` tenant selector.
fn tenant(key: &'static str, text: &str) -> Result<Tenant, ConfigError> {
    let mut labels = Labels::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| ConfigError::Invalid { key, message: format!("{pair:?} is not key=value") })?;
        labels.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    crate::domain::labels_error(&labels).map_err(|e| ConfigError::Invalid { key, message: e.to_string() })?;
    Tenant::new(labels).ok_or_else(|| ConfigError::Invalid { key, message: "an empty tenant confines nothing".into() })
}

/// A grant from `[[auth.grants]]`, with user and group names resolved.
fn grant(file: FileGrant) -> Result<Grant, ConfigError> {
    const KEY: &str = "auth.grants";
    let invalid = |message: String| ConfigError::Invalid { key: KEY, message };
    let mut principals = Vec::new();
    principals.extend(file.uid.map(Principal::Uid));
    principals.extend(file.gid.map(Principal::Gid));
    principals.extend(file.cert.map(Principal::Certificate));
    if let Some(user) = &file.user {
        let found = nix::unistd::User::from_name(user).ok().flatten();
        principals.push(Principal::Uid(found.ok_or_else(|| invalid(format!("no user {user:?}")))?.uid.as_raw()));
    }
    if let Some(group) = &file.group {
        principals.push(Principal::Gid(group_id(group)?));
    }
    let [principal] = <[Principal; 1]>::try_from(principals)
        .map_err(|_| invalid("each grant names exactly one of uid, gid, user, group or cert".into()))?;
    let tenant = file.tenant.as_deref().map(|t| tenant("auth.grants.tenant", t)).transpose()?;
    Ok(Grant { principal, role: file.role, tenant })
}

/// A token from `[[auth.tokens]]`.
fn token(file: FileToken) -> Result<Token, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid { key: "auth.tokens", message };
    let mut sha256 = [0u8; 32];
    hex::decode_to_slice(file.sha256.trim(), &mut sha256)
        .map_err(|_| invalid(format!("token {:?}: sha256 must be 64 hex digits", file.name)))?;
    let expires_ms = match &file.expires {
        None => None,
        Some(text) => {
            let at = humantime::parse_rfc3339_weak(text)
                .map_err(|e| invalid(format!("token {:?}: expires {text:?}: {e}", file.name)))?;
            Some(crate::clock::epoch_ms(at))
        }
    };
    let tenant = file.tenant.as_deref().map(|t| tenant("auth.tokens.tenant", t)).transpose()?;
    Ok(Token { name: file.name, sha256, role: file.role, tenant, expires_ms })
}

/// A group's id from its name or number.
fn group_id(group: &str) -> Result<u32, ConfigError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(found)) => Ok(found.gid.as_raw()),
        _ => Err(ConfigError::Invalid { key: "group", message: format!("no group {group:?}") }),
    }
}

/// `[vm_defaults]`, validated as a create's shape is.
fn vm_defaults(file: FileVmDefaults) -> Result<VmDefaults, ConfigError> {
    let builtin = VmDefaults::default();
    let vcpus = file.vcpus.unwrap_or(builtin.vcpus);
    if !(1..=MAX_VCPUS).contains(&vcpus) {
        return Err(ConfigError::Invalid {
            key: "vm_defaults.vcpus",
            message: format!("must be between 1 and {MAX_VCPUS}, got {vcpus}"),
        });
    }
    let memory_mib = file.memory_mib.unwrap_or(builtin.memory_mib);
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
        return Err(ConfigError::Invalid {
            key: "vm_defaults.memory_mib",
            message: format!("must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {memory_mib}"),
        });
    }
    let disk_bytes = match file.disk_size.as_deref().map(str::trim) {
        None | Some("") => builtin.disk_bytes,
        Some(text) => {
            parse_size(text)
                .filter(|bytes| *bytes <= 1 << 40)
                .ok_or_else(|| ConfigError::Invalid {
                    key: "vm_defaults.disk_size",
                    message: format!("{text:?} is not a size of at most 1T, such as 20G or 512M"),
                })?
                .div_ceil(1 << 20)
                * (1 << 20)
        }
    };
    Ok(VmDefaults { vcpus, memory_mib, disk_bytes })
}

/// A size with an optional K, M, G or T suffix (powers of 1024, `B`/`iB` allowed).
fn parse_size(text: &str) -> Option<u64> {
    let at = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(at);
    let shift = match unit.trim_end_matches(['B', 'b', 'i']).to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vms_get_a_network_unless_told_not_to() {
        let load = |text: &str, forced: Option<&str>| {
            let file: FileConfig = toml::from_str(text).expect("toml");
            Config::from_parts(file, Overrides { network: forced.map(str::to_owned), ..Overrides::default() })
        };
        let auto = load("", None).expect("valid").network.expect("a network by default");
        assert_eq!((auto.bridge.as_str(), auto.nat, auto.dns, auto.auto), (DEFAULT_BRIDGE, true, true, true));
        assert!(load("network = 'none'", None).expect("valid").network.is_none());
        let fixed = load("bridge_cidr = '10.9.0.0/24'", None).expect("valid").network.expect("network");
        assert_eq!((fixed.pool.to_string(), fixed.auto), ("10.9.0.0/24".into(), false));
        let by_hand = load("bridge = 'br9'", None).expect("valid").network.expect("network");
        assert_eq!((by_hand.bridge.as_str(), by_hand.nat, by_hand.auto), ("br9", false, false));
        // The flag or environment wins, `none` even over a configured bridge.
        assert!(load("bridge = 'br9'", Some("none")).expect("valid").network.is_none());
        assert!(load("network = 'none'", Some("auto")).expect("valid").network.is_some());
        assert!(matches!(load("", Some("bridged")), Err(ConfigError::Invalid { key: "network", .. })));
        assert!(matches!(
            load("network = 'none'\nbridge = 'br9'", None),
            Err(ConfigError::Invalid { key: "network", .. })
        ));
    }

    #[test]
    fn vm_defaults_are_validated_like_a_create() {
        let parse = |text: &str| {
            let file: FileConfig = toml::from_str(text).expect("toml");
            Config::from_parts(file, Overrides::default())
        };
        let config = parse("[vm_defaults]\nvcpus = 4\nmemory_mib = 1024\ndisk_size = \"10G\"").expect("valid");
        assert_eq!(config.vm_defaults, VmDefaults { vcpus: 4, memory_mib: 1024, disk_bytes: 10 << 30 });
        assert_eq!(parse("").expect("valid").vm_defaults, VmDefaults::default());
        for (bad, key) in [
            ("[vm_defaults]\nvcpus = 0", "vm_defaults.vcpus"),
            ("[vm_defaults]\nmemory_mib = 8", "vm_defaults.memory_mib"),
            ("[vm_defaults]\ndisk_size = \"lots\"", "vm_defaults.disk_size"),
            ("[vm_defaults]\ndisk_size = \"2T\"", "vm_defaults.disk_size"),
        ] {
            match parse(bad) {
                Err(ConfigError::Invalid { key: found, .. }) => assert_eq!(found, key, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn overrides_win_over_the_file_which_wins_over_defaults() {
        let file =
            FileConfig { state_dir: Some("/file".into()), socket: Some("/file.sock".into()), ..Default::default() };
        let overrides = Overrides { state_dir: Some("/flag".into()), ..Default::default() };
        let config = Config::from_parts(file, overrides).expect("valid");
        assert_eq!(config.state_dir, PathBuf::from("/flag"));
        assert_eq!(config.socket, PathBuf::from("/file.sock"));
        assert_eq!(config.default_image, "default");
        assert_eq!(config.accel, None, "auto by default");
    }

    fn with_tls() -> FileConfig {
        let tls = FileTls { ca: Some("/ca".into()), cert: Some("/c".into()), key: Some("/k".into()), crl: None };
        FileConfig { tls: Some(tls), ..Default::default() }
    }

    #[test]
    fn tcp_needs_tls_even_on_loopback_and_unknown_levels_are_refused() {
        let listen = |l: &str| Overrides { listen: Some(l.into()), ..Default::default() };
        for address in ["127.0.0.1:7000", "[::1]:7000", "0.0.0.0:7000"] {
            let err = Config::from_parts(FileConfig::default(), listen(address)).expect_err("no tls");
            assert!(err.to_string().contains("[tls]"), "{err}");
            assert!(Config::from_parts(with_tls(), listen(address)).is_ok(), "{address}");
        }
        assert!(Config::from_parts(with_tls(), listen("localhost")).is_err());
        let half =
            FileConfig { tls: Some(FileTls { ca: Some("/ca".into()), ..Default::default() }), ..Default::default() };
        assert!(Config::from_parts(half, Overrides::default()).is_err());
        for (given, level) in [("debug", LogLevel::Debug), ("warning", LogLevel::Warn), ("WARN", LogLevel::Warn)] {
            let overrides = Overrides { log_level: Some(given.into()), ..Default::default() };
            assert_eq!(Config::from_parts(FileConfig::default(), overrides).expect(given).log_level, level);
        }
        let level = Overrides { log_level: Some("verbose".into()), ..Default::default() };
        let err = Config::from_parts(FileConfig::default(), level).expect_err("bad level");
        assert!(matches!(err, ConfigError::Invalid { key: "log level", .. }), "{err}");
    }

    #[test]
    fn the_jailer_needs_firecracker_and_an_unprivileged_uid_range() {
        let file = |vmm: VmmKind, base: Option<u32>| FileConfig {
            vmm: Some(vmm),
            jailer: Some(true),
            jailer_uid_base: base,
            ..Default::default()
        };
        let err = Config::from_parts(file(VmmKind::Qemu, None), Overrides::default()).expect_err("qemu");
        assert!(matches!(err, ConfigError::Invalid { key: "jailer", .. }), "{err}");
        for base in [0, u32::MAX] {
            let err =
                Config::from_parts(file(VmmKind::Firecracker, Some(base)), Overrides::default()).expect_err("base");
            assert!(matches!(err, ConfigError::Invalid { key: "vm_uid_base", .. }), "{err}");
        }
        let dm = FileConfig {
            root_disk: Some(RootDiskChoice::Strategy(RootDiskStrategy::DmSnapshot)),
            ..file(VmmKind::Firecracker, None)
        };
        let err = Config::from_parts(dm, Overrides::default()).expect_err("dm-snapshot");
        assert!(matches!(err, ConfigError::Invalid { key: "root_disk", .. }), "{err}");
        let config = Config::from_parts(file(VmmKind::Firecracker, None), Overrides::default()).expect("valid");
        assert_eq!(config.jailer, Some(JailerConfig { binary: "jailer".into(), uid_base: DEFAULT_VM_UID_BASE }));
        // On by default under Firecracker, off under QEMU (whose VMs are confined anyway).
        let firecracker = FileConfig { vmm: Some(VmmKind::Firecracker), ..Default::default() };
        assert!(Config::from_parts(firecracker, Overrides::default()).expect("valid").jailer.is_some());
        assert!(Config::from_parts(FileConfig::default(), Overrides::default()).expect("valid").jailer.is_none());
        let unjailed = FileConfig {
            vmm: Some(VmmKind::Firecracker),
            jailer: Some(false),
            root_disk: Some(RootDiskChoice::Strategy(RootDiskStrategy::DmSnapshot)),
            ..Default::default()
        };
        assert!(Config::from_parts(unjailed, Overrides::default()).expect("valid").jailer.is_none());
    }

    #[test]
    fn the_example_config_parses_to_the_defaults() {
        let example = include_str!("../../deploy/config.toml");
        let file: FileConfig = toml::from_str(example).expect("example parses");
        let from_example = Config::from_parts(file, Overrides::default()).expect("valid");
        let defaults = Config::from_parts(FileConfig::default(), Overrides::default()).expect("valid");
        assert_eq!(from_example, defaults);
    }

    #[test]
    fn enumerated_values_are_parsed_as_such_and_others_refused() {
        let file: FileConfig =
            toml::from_str("vmm = 'firecracker'\naccel = 'kvm'\nroot_disk = 'dm-snapshot'\nlog_level = 'WARNING'")
                .expect("parses");
        assert_eq!(file.vmm, Some(VmmKind::Firecracker));
        assert_eq!(file.accel, Some(AccelChoice::Fixed(Accel::Kvm)));
        let auto: FileConfig = toml::from_str("accel = 'auto'").expect("auto");
        assert_eq!(Config::from_parts(auto, Overrides::default()).expect("valid").accel, None);
        assert_eq!(file.root_disk, Some(RootDiskChoice::Strategy(RootDiskStrategy::DmSnapshot)));
        assert_eq!(file.log_level, Some(LogLevel::Warn));
        let auto: FileConfig = toml::from_str("root_disk = 'auto'").expect("parses");
        assert_eq!(auto.root_disk, Some(RootDiskChoice::Auto(Auto::Auto)));
        let serial: FileConfig = toml::from_str("agent_channel = 'virtio-serial'").expect("parses");
        assert_eq!(serial.agent_channel, Some(AgentChannel::VirtioSerial));
        for bad in
            ["vmm = 'xen'", "accel = 'hvf'", "root_disk = 'zfs'", "log_level = 'verbose'", "agent_channel = 'tcp'"]
        {
            assert!(toml::from_str::<FileConfig>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn grants_and_tokens_are_parsed_and_checked() {
        let file: FileConfig = toml::from_str(
            r#"
            socket_group = "0"
            [auth]
            import_roots = ["/srv/images"]
            [[auth.grants]]
            user = "root"
            role = "viewer"
            [[auth.grants]]
            cert = "ci"
            role = "operator"
            tenant = "team=a, env=prod"
            [[auth.tokens]]
            name = "deploy"
            sha256 = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
            role = "admin"
            expires = "2027-01-31T00:00:00Z"
            "#,
        )
        .expect("parses");
        let config = Config::from_parts(file, Overrides::default()).expect("valid");
        assert_eq!(config.socket_group, Some(0));
        assert_eq!(config.import_roots, Some(vec![PathBuf::from("/srv/images")]));
        assert_eq!(config.access.grants[0].principal, Principal::Uid(0));
        assert_eq!(
            config.access.grants[1].tenant.as_ref().map(ToString::to_string).as_deref(),
            Some("env=prod,team=a")
        );
        let token = &config.access.tokens[0];
        assert_eq!(token.sha256, crate::domain::access::token_sha256("secret"));
        assert_eq!(token.expires_ms, Some(1_801_353_600_000));
        for bad in [
            "[[auth.grants]]\nuid = 1\ngid = 2\nrole = 'viewer'",
            "[[auth.grants]]\nrole = 'viewer'",
            "[[auth.grants]]\nuid = 1\nrole = 'viewer'\ntenant = 'no pair'",
            "[[auth.grants]]\nuser = 'no-such-user-here'\nrole = 'viewer'",
            "[[auth.tokens]]\nname = 't'\nsha256 = 'abc'\nrole = 'viewer'",
            "[[auth.tokens]]\nname = 't'\nsha256 = '2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b'\nrole = 'viewer'\nexpires = 'soon'",
            "[auth]\nimport_roots = ['relative']",
        ] {
            let file: FileConfig = toml::from_str(bad).expect(bad);
            assert!(Config::from_parts(file, Overrides::default()).is_err(), "{bad}");
        }
        assert!(toml::from_str::<FileConfig>("[[auth.grants]]\nuid = 1\nrole = 'root'").is_err());
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        assert!(toml::from_str::<FileConfig>("statedir = '/x'").is_err());
        assert!(toml::from_str::<FileConfig>("state_dir = '/x'").is_ok());
    }
}
