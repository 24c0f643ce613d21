//! Virtual machine monitors. One trait, named for what the host offers; QEMU microvm is
//! the embedded default that boots real guests on any Linux host.

pub mod firecracker;
pub mod firecracker_api;
mod qemu;
pub mod qmp;

use std::fmt::Debug;

pub use qemu::{Accel, KVM_DEVICE, QemuVmm, probe_kvm};

use super::{HostError, confine::VmIdentity};
use crate::domain::{Image, ProcessHandle, VmId, VmPaths, VmSpec};

/// Everything a VMM needs to launch one VM.
#[derive(Debug, Clone, Copy)]
pub struct LaunchSpec<'a> {
    /// The VM's id.
    pub id: VmId,
    /// The VM's name, given to the guest as its hostname.
    pub name: &'a str,
    /// The VM's files.
    pub paths: &'a VmPaths,
    /// Its shape.
    pub spec: VmSpec,
    /// What it boots.
    pub image: &'a Image,
    /// Its vsock context id.
    pub vsock_cid: u32,
    /// The root disk the guest boots from: the VM's disk file, or the device made over it.
    pub disk: &'a std::path::Path,
    /// The root disk's format (`qcow2` or `raw`).
    pub disk_format: &'static str,
    /// The VM's network interface, when VMs get a network.
    pub nic: Option<&'a GuestNic>,
    /// Where guest memory lives.
    pub memory: GuestMemory<'a>,
    /// The device state to restore instead of booting (a snapshot's); the guest's memory
    /// is then the snapshot's, mapped [`GuestMemory::Private`].
    pub restore_from: Option<&'a std::path::Path>,
    /// Groups the VMM runs with besides its own: those of the snapshots its disk overlays
    /// (and its memory maps), whose files only their groups may read.
    pub extra_groups: &'a [u32],
}

/// Where a guest's memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestMemory<'a> {
    /// Anonymous shared memory the VMM makes (a memfd): nothing on the host names it.
    Anonymous,
    /// This file, mapped shared: the guest's memory can be saved in place, as a snapshot.
    Shared(&'a std::path::Path),
    /// This file (a snapshot's memory), mapped private: the guest's writes are copies of
    /// its pages, and the file is never written.
    Private(&'a std::path::Path),
}

impl LaunchSpec<'_> {
    /// The kernel arguments of banger's guest contract, the same under every VMM: the
    /// hostname, the network the guest's init configures, then the image's own arguments.
    pub fn guest_args(&self) -> String {
        let mut args = format!("banger.hostname={}", self.name);
        if let Some(nic) = self.nic {
            args.push(' ');
            args.push_str(&nic.kernel_args());
        }
        if !self.image.kernel_args.is_empty() {
            args.push(' ');
            args.push_str(&self.image.kernel_args);
        }
        args
    }
}

/// A VM's network interface and its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNic {
    /// The host tap it is backed by.
    pub tap: String,
    /// Its MAC address.
    pub mac: String,
    /// Its address with prefix (`172.30.0.2/24`), configured by the guest's init.
    pub address: String,
    /// Its default gateway (the bridge's address).
    pub gateway: String,
    /// Its nameserver (bangerd on the bridge's address), when bangerd serves DNS.
    pub nameserver: Option<String>,
}

impl GuestNic {
    /// The kernel command-line arguments the guest's init configures the network from.
    pub fn kernel_args(&self) -> String {
        let mut args = format!("banger.ip={} banger.gw={}", self.address, self.gateway);
        if let Some(nameserver) = &self.nameserver {
            args.push_str(&format!(" banger.dns={nameserver}"));
        }
        args
    }
}

/// How a VMM keeps a guest's memory for snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemorySave {
    /// The guest's memory is a file the VMM maps shared ([`GuestMemory::Shared`]): a save
    /// writes the device state only, and the snapshot takes a copy of the file (QEMU).
    InPlace,
    /// The VMM writes all of the guest's memory to a file when it saves (Firecracker): a
    /// guest runs on memory of the VMM's own, or on a snapshot's file mapped private, and a
    /// guest restored that way can be snapshotted again.
    Written,
}

/// A virtual machine monitor.
#[tonic::async_trait]
pub trait Vmm: Send + Sync + Debug {
    /// Short name, shown in `VmRuntime.vmm`.
    fn name(&self) -> &'static str;

    /// Launches the VMM detached from the daemon; returns once the process exists.
    async fn launch(&self, launch: &LaunchSpec<'_>) -> Result<ProcessHandle, HostError>;

    /// Starts the guest in a launched VMM (configuring it first where the VMM is configured
    /// over its API) and checks that it runs. Runs after the VMM was put in its cgroup.
    async fn boot(&self, launch: &LaunchSpec<'_>, vmm: &ProcessHandle) -> Result<(), HostError>;

    /// Asks the guest to power off through the VMM (ACPI power button).
    async fn power_down(&self, paths: &VmPaths) -> Result<(), HostError>;

    /// Stops the guest's vCPUs in place; memory and devices stay. Pausing a paused guest is
    /// fine.
    async fn pause(&self, paths: &VmPaths) -> Result<(), HostError>;

    /// Lets a paused guest's vCPUs run again. Resuming a running guest is fine.
    async fn resume(&self, paths: &VmPaths) -> Result<(), HostError>;

    /// Why this VMM cannot take snapshots as configured; `None` when it can. A VM that may
    /// be snapshotted has its memory in a file ([`GuestMemory::Shared`]).
    fn snapshots_unsupported(&self) -> Option<String> {
        Some(format!("the {} driver does not take snapshots", self.name()))
    }

    /// The gid of a snapshot's group number `group` (see `domain::SNAPSHOT_GROUP_OFFSET`):
    /// its files' group, and the extra group of the VMMs restored from it. `None`: the
    /// VMM runs as the daemon's user (a test's fake).
    fn snapshot_group(&self, _group: u32) -> Option<u32> {
        None
    }

    /// How the VMM keeps guest memory for snapshots.
    fn memory_save(&self) -> MemorySave {
        MemorySave::InPlace
    }

    /// Saves a paused guest: its device state to `state_file`, and, where the VMM writes
    /// memory ([`MemorySave::Written`]), its memory to `memory_file` (else it stays in its
    /// file). Both land in the VM's directory, owned by the VM's identity. The VMM may be
    /// spent then (QEMU's is): the guest runs on only from the snapshot.
    async fn save(
        &self,
        _paths: &VmPaths,
        _state_file: &std::path::Path,
        _memory_file: &std::path::Path,
    ) -> Result<(), HostError> {
        Err(HostError::VmmRefused { command: "save".into(), message: "snapshots are not supported".into() })
    }

    /// The unprivileged identity the VM's VMM (and its vsock backend) runs as; the VM's
    /// files and host devices it opens itself, its tap, must belong to it. `None`: it runs
    /// as the daemon's user (a test's fake).
    fn runs_as(&self, _vsock_cid: u32) -> Option<VmIdentity> {
        None
    }

    /// The group images' files belong to (mode 0640, their directory 0710), which every VM's
    /// VMM has besides its own; `None`: the VMM reads images as root, or from copies made for
    /// it (a jail), and images are root's alone.
    fn image_group(&self) -> Option<u32> {
        None
    }

    /// Removes what `launch` made beside the VM's own files (a jail), once the VMM is gone.
    /// Nothing left is fine; safe to run twice.
    fn release(&self, _paths: &VmPaths) -> Result<(), HostError> {
        Ok(())
    }
}
