//! Host networking the VMs use: the bridge, a tap per VM, NAT rules per VM. Outcomes are
//! judged by exit status and by asking again (`ip link show`), and nftables is read as JSON
//! (`nft -j`): no tool's wording is parsed.

use std::{ffi::OsString, net::Ipv4Addr, path::PathBuf};

use super::{HostError, command};

/// What the host offers for VM networking.
#[tonic::async_trait]
pub trait Network: Send + Sync + std::fmt::Debug {
    /// Makes sure the bridge exists, is up and has `gateway/prefix`.
    async fn ensure_bridge(&self, bridge: &str, gateway: Ipv4Addr, prefix: u8) -> Result<(), HostError>;

    /// Creates a tap interface attached to `bridge`, up; a leftover one of the same name is
    /// replaced. With an `owner`, that uid (and the gid of the same number) may attach to it
    /// without privileges: a jailed VMM.
    async fn create_tap(&self, name: &str, bridge: &str, owner: Option<u32>) -> Result<(), HostError>;

    /// Deletes a tap interface; one already gone is not an error.
    async fn delete_tap(&self, name: &str) -> Result<(), HostError>;

    /// Masquerades traffic from `ip` leaving through anything but `bridge`, tagged `tag`.
    async fn add_nat(&self, tag: &str, ip: Ipv4Addr, bridge: &str) -> Result<(), HostError>;

    /// Removes the NAT rules tagged `tag`; none is not an error.
    async fn remove_nat(&self, tag: &str) -> Result<(), HostError>;
}

/// Opens the existing tap `name` for a VMM that may not open `/dev/net/tun` itself (it
/// runs unprivileged): the descriptor is handed to it. With a virtio-net header, as QEMU
/// expects of a tap it is given.
pub fn open_tap(name: &str) -> Result<std::os::fd::OwnedFd, HostError> {
    use std::os::fd::AsRawFd;
    let tun = std::path::Path::new("/dev/net/tun");
    let file = std::fs::OpenOptions::new().read(true).write(true).open(tun).map_err(super::file_error("open", tun))?;
    // SAFETY: ifreq is plain data; all zeros is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= request.ifr_name.len() {
        return Err(HostError::Io { what: format!("tap name {name}"), source: std::io::Error::other("too long") });
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads an ifreq, which `request` is, for the whole call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &request) } < 0 {
        return Err(HostError::Io { what: format!("attach to tap {name}"), source: std::io::Error::last_os_error() });
    }
    Ok(file.into())
}

/// The nftables table and chain holding banger's NAT rules.
const NFT_TABLE: &str = "banger";
const NFT_CHAIN: &str = "postrouting";

/// Linux networking through iproute2, optionally inside a network namespace.
#[derive(Debug, Clone)]
pub struct LinuxNetwork {
    ip: PathBuf,
    netns: Option<String>,
}

impl LinuxNetwork {
    /// Uses `ip` in the daemon's own network namespace.
    pub fn new(ip: PathBuf) -> Self {
        Self { ip, netns: None }
    }

    /// Uses `ip -n NETNS`: every interface lives in that namespace.
    pub fn in_netns(ip: PathBuf, netns: String) -> Self {
        Self { ip, netns: Some(netns) }
    }

    async fn ip(&self, rest: &[&str]) -> Result<(), HostError> {
        command::run(&self.ip, &self.args(rest)).await.map(drop)
    }

    /// True when an interface of this name exists.
    async fn link_exists(&self, name: &str) -> bool {
        self.ip(&["link", "show", "dev", name]).await.is_ok()
    }

    /// The handles of the rules of banger's NAT chain tagged `tag` (their comment); none
    /// when the chain does not exist.
    async fn nat_rule_handles(&self, tag: &str) -> Result<Vec<u64>, HostError> {
        let chains = self.nft(&["-j", "list", "chains", "ip"]).await?;
        let ours = |item: &serde_json::Value| item["chain"]["table"] == NFT_TABLE && item["chain"]["name"] == NFT_CHAIN;
        if !nft_items(&chains).iter().any(ours) {
            return Ok(Vec::new());
        }
        let listing = self.nft(&["-j", "-a", "list", "chain", "ip", NFT_TABLE, NFT_CHAIN]).await?;
        Ok(nft_items(&listing)
            .iter()
            .filter(|item| item["rule"]["comment"] == tag)
            .filter_map(|item| item["rule"]["handle"].as_u64())
            .collect())
    }

    /// `nft` in the same namespace as `ip` (through `ip netns exec` when there is one).
    async fn nft(&self, rest: &[&str]) -> Result<String, HostError> {
        let (program, mut args): (PathBuf, Vec<OsString>) = match &self.netns {
            Some(netns) => (self.ip.clone(), vec!["netns".into(), "exec".into(), netns.into(), "nft".into()]),
            None => (PathBuf::from("nft"), Vec::new()),
        };
        args.extend(rest.iter().map(OsString::from));
        command::run(&program, &args).await.map(|out| String::from_utf8_lossy(&out).into_owned())
    }

    fn args(&self, rest: &[&str]) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        if let Some(netns) = &self.netns {
            args.extend(["-n".into(), netns.into()]);
        }
        args.extend(rest.iter().map(OsString::from));
        args
    }
}

#[tonic::async_trait]
impl Network for LinuxNetwork {
    async fn ensure_bridge(&self, bridge: &str, gateway: Ipv4Addr, prefix: u8) -> Result<(), HostError> {
        if !self.link_exists(bridge).await {
            let added = self.ip(&["link", "add", "name", bridge, "type", "bridge"]).await;
            // Another create may have added it meanwhile.
            if added.is_err() && !self.link_exists(bridge).await {
                return added;
            }
        }
        self.ip(&["addr", "replace", &format!("{gateway}/{prefix}"), "dev", bridge]).await?;
        self.ip(&["link", "set", bridge, "up"]).await
    }

    async fn create_tap(&self, name: &str, bridge: &str, owner: Option<u32>) -> Result<(), HostError> {
        self.delete_tap(name).await?;
        let owner = owner.map(|uid| uid.to_string());
        let mut add = vec!["tuntap", "add", "dev", name, "mode", "tap"];
        if let Some(uid) = &owner {
            add.extend(["user", uid, "group", uid]);
        }
        self.ip(&add).await?;
        let attached = async {
            self.ip(&["link", "set", name, "master", bridge]).await?;
            self.ip(&["link", "set", name, "up"]).await
        }
        .await;
        if attached.is_err() {
            let _ = self.delete_tap(name).await;
        }
        attached
    }

    async fn add_nat(&self, tag: &str, ip: Ipv4Addr, bridge: &str) -> Result<(), HostError> {
        self.nft(&["add", "table", "ip", NFT_TABLE]).await?;
        self.nft(&["add", "chain", "ip", NFT_TABLE, NFT_CHAIN, "{ type nat hook postrouting priority 100 ; }"]).await?;
        // Adding twice would masquerade twice: remove what a crashed attempt left first.
        self.remove_nat(tag).await?;
        let ip = ip.to_string();
        let rule = [
            "add",
            "rule",
            "ip",
            NFT_TABLE,
            NFT_CHAIN,
            "ip",
            "saddr",
            &ip,
            "oifname",
            "!=",
            bridge,
            "masquerade",
            "comment",
        ];
        let quoted = format!("\"{tag}\"");
        let mut args: Vec<&str> = rule.to_vec();
        args.push(&quoted);
        self.nft(&args).await?;
        // Forwarding is what NAT is for; without it nothing leaves the bridge.
        match &self.netns {
            None => std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .map_err(|source| HostError::Io { what: "enable ip_forward".into(), source }),
            Some(netns) => {
                let args: Vec<OsString> = ["netns", "exec", netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]
                    .iter()
                    .map(OsString::from)
                    .collect();
                command::run(&self.ip, &args).await.map(drop)
            }
        }
    }

    async fn remove_nat(&self, tag: &str) -> Result<(), HostError> {
        for handle in self.nat_rule_handles(tag).await? {
            self.nft(&["delete", "rule", "ip", NFT_TABLE, NFT_CHAIN, "handle", &handle.to_string()]).await?;
        }
        Ok(())
    }

    async fn delete_tap(&self, name: &str) -> Result<(), HostError> {
        if !self.link_exists(name).await {
            return Ok(());
        }
        let deleted = self.ip(&["link", "del", "dev", name]).await;
        // Gone meanwhile (another teardown) is fine too.
        if deleted.is_err() && !self.link_exists(name).await {
            return Ok(());
        }
        deleted
    }
}

/// The objects of `nft -j` output (`{"nftables": [{"metainfo": ...}, {"rule": ...}]}`).
fn nft_items(json: &str) -> Vec<serde_json::Value> {
    match serde_json::from_str::<serde_json::Value>(json) {
        Ok(serde_json::Value::Object(mut top)) => match top.remove("nftables") {
            Some(serde_json::Value::Array(items)) => items,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A network namespace for one test, deleted when dropped.
    struct TestNetns(String);

    impl TestNetns {
        fn new() -> Self {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = format!("banger-test-{}-{n}", std::process::id());
            let status = std::process::Command::new("ip").args(["netns", "add", &name]).status().expect("ip netns add");
            assert!(status.success(), "ip netns add {name}");
            Self(name)
        }

        fn link_exists(&self, name: &str) -> bool {
            std::process::Command::new("ip")
                .args(["-n", &self.0, "link", "show", "dev", name])
                .output()
                .expect("ip link show")
                .status
                .success()
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    #[tokio::test]
    async fn nat_rules_are_added_and_removed_by_tag_in_a_test_namespace() {
        let netns = TestNetns::new();
        let network = LinuxNetwork::in_netns("ip".into(), netns.0.clone());
        network.remove_nat("banger-vm-a").await.expect("no table yet is no rule");
        network.add_nat("banger-vm-a", Ipv4Addr::new(172, 30, 0, 2), "br-test").await.expect("add a");
        network.add_nat("banger-vm-b", Ipv4Addr::new(172, 30, 0, 3), "br-test").await.expect("add b");
        network.add_nat("banger-vm-a", Ipv4Addr::new(172, 30, 0, 2), "br-test").await.expect("add a again");
        assert_eq!(network.nat_rule_handles("banger-vm-a").await.expect("list").len(), 1, "never twice");
        network.remove_nat("banger-vm-a").await.expect("remove a");
        network.remove_nat("banger-vm-a").await.expect("twice is fine");
        assert!(network.nat_rule_handles("banger-vm-a").await.expect("list").is_empty());
        assert_eq!(network.nat_rule_handles("banger-vm-b").await.expect("list").len(), 1, "b is kept");
    }

    #[tokio::test]
    async fn deletes_a_real_tap_inside_a_test_namespace_and_tolerates_a_missing_one() {
        let netns = TestNetns::new();
        let created = std::process::Command::new("ip")
            .args(["-n", &netns.0, "tuntap", "add", "dev", "bgtap0", "mode", "tap"])
            .status()
            .expect("ip tuntap");
        assert!(created.success());
        assert!(netns.link_exists("bgtap0"));
        let network = LinuxNetwork::in_netns("ip".into(), netns.0.clone());
        network.delete_tap("bgtap0").await.expect("delete");
        assert!(!netns.link_exists("bgtap0"));
        network.delete_tap("bgtap0").await.expect("a missing tap is fine");
    }
}
