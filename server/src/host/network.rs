//! Host networking the VMs use: the bridge, a tap per VM, NAT rules per VM. Outcomes are
//! judged by exit status and by asking again (`ip link show`), and nftables is read as JSON
//! (`nft -j`): no tool's wording is parsed.

use std::{
    ffi::OsString,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use super::{HostError, command};
use crate::domain::{Cidr, IpPool};

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

    /// Masquerades traffic from `ip` leaving through anything but `bridge`, tagged `tag`,
    /// and turns IPv4 forwarding on. Where it was off, forwarding stays the bridge's only: a
    /// guard rule drops what would be forwarded neither from nor to the bridge (the host's
    /// other interfaces keep not forwarding), and its presence records that banger turned
    /// forwarding on.
    async fn add_nat(&self, tag: &str, ip: Ipv4Addr, bridge: &str) -> Result<(), HostError>;

    /// Removes the NAT rules tagged `tag`; none is not an error. With the last NAT rule, the
    /// forwarding banger turned on is turned off again, and its guard removed.
    async fn remove_nat(&self, tag: &str) -> Result<(), HostError>;

    /// Installs one guest's rules, tagged `tag` (replacing any a crashed attempt left): its
    /// frames from its tap carry only its MAC and address (ARP and IPv4 only); of the host it
    /// reaches only DNS on the bridge address (and what its allow list names); beyond the
    /// bridge it goes where its egress policy says.
    async fn add_guest_rules(&self, tag: &str, guest: &GuestRules) -> Result<(), HostError>;

    /// Removes the guest rules tagged `tag`; none is not an error.
    async fn remove_guest_rules(&self, tag: &str) -> Result<(), HostError>;
}

/// What one guest's rules are made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestRules {
    /// Its tap.
    pub tap: String,
    /// Its MAC address.
    pub mac: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// The bridge.
    pub bridge: String,
    /// The bridge's address (bangerd's DNS).
    pub gateway: Ipv4Addr,
    /// Where its traffic may go beyond the bridge.
    pub egress: crate::domain::Egress,
}

impl GuestRules {
    /// The nft commands that add its rules, each ending with `comment "<tag>"`.
    pub fn commands(&self, tag: &str) -> Vec<String> {
        use crate::domain::Egress;
        let (tap, mac, ip, bridge, gateway) = (&self.tap, &self.mac, self.ip, &self.bridge, self.gateway);
        let comment = format!("comment \"{tag}\"");
        let from_tap = format!("add rule bridge {NFT_TABLE} {BRIDGE_CHAIN} iifname \"{tap}\"");
        let into_host = format!("add rule ip {NFT_TABLE} {INPUT_CHAIN} iifname \"{bridge}\" ip saddr {ip}");
        // Leaving the bridge: with br_netfilter, frames between guests pass the ip forward
        // hook too, from the bridge to the bridge; those stay the bridge's (and its rules').
        let through = format!(
            "add rule ip {NFT_TABLE} {FORWARD_CHAIN} iifname \"{bridge}\" oifname != \"{bridge}\" ip saddr {ip}"
        );
        let mut rules = vec![
            format!("{from_tap} ether saddr != {mac} drop"),
            format!("{from_tap} ether type != {{ ip, arp }} drop"),
            format!("{from_tap} ether type arp arp saddr ether != {mac} drop"),
            format!("{from_tap} ether type arp arp saddr ip != {ip} drop"),
            format!("{from_tap} ether type ip ip saddr != {ip} drop"),
            format!("{into_host} ip daddr {gateway} udp dport 53 accept"),
            format!("{into_host} ip daddr {gateway} tcp dport 53 accept"),
            format!("{into_host} ct state established,related accept"),
        ];
        match &self.egress {
            Egress::None => rules.extend([format!("{into_host} drop"), format!("{through} drop")]),
            Egress::Internet => rules.extend([
                format!("{into_host} drop"),
                format!("{through} ip daddr {{ {} }} drop", crate::domain::NOT_INTERNET.join(", ")),
            ]),
            Egress::Allow { cidrs } => {
                let set = cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
                rules.extend([
                    format!("{into_host} ip daddr {{ {set} }} accept"),
                    format!("{into_host} drop"),
                    format!("{through} ip daddr {{ {set} }} accept"),
                    format!("{through} drop"),
                ]);
            }
        }
        rules.into_iter().map(|rule| format!("{rule} {comment}")).collect()
    }
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
/// The chains of guests' rules: frames entering the bridge from a tap (bridge family),
/// packets from the bridge to the host and through it (ip family, in [`NFT_TABLE`]).
const BRIDGE_CHAIN: &str = "guests";
const INPUT_CHAIN: &str = "guest_input";
const FORWARD_CHAIN: &str = "guest_forward";
/// The comment of the rule that keeps forwarding the bridge's when banger turned it on.
const FORWARD_GUARD: &str = "banger-forward-guard";

/// Linux networking through iproute2, optionally inside a network namespace.
#[derive(Debug, Clone)]
pub struct LinuxNetwork {
    ip: PathBuf,
    netns: Option<String>,
    /// Held while NAT rules and forwarding change together: the last NAT rule's removal
    /// turns forwarding off, never under a NAT rule being added.
    forwarding: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl LinuxNetwork {
    /// Uses `ip` in the daemon's own network namespace.
    pub fn new(ip: PathBuf) -> Self {
        Self { ip, netns: None, forwarding: Default::default() }
    }

    /// Uses `ip -n NETNS`: every interface lives in that namespace.
    pub fn in_netns(ip: PathBuf, netns: String) -> Self {
        Self { ip, netns: Some(netns), forwarding: Default::default() }
    }

    /// `net.ipv4.ip_forward` in the namespace, read or (with `value`) written.
    async fn ip_forward(&self, value: Option<&str>) -> Result<String, HostError> {
        let (program, mut args): (PathBuf, Vec<OsString>) = match &self.netns {
            Some(netns) => (self.ip.clone(), vec!["netns".into(), "exec".into(), netns.into(), "sysctl".into()]),
            None => (PathBuf::from("sysctl"), Vec::new()),
        };
        match value {
            None => args.extend(["-n".into(), "net.ipv4.ip_forward".into()]),
            Some(value) => args.extend(["-q".into(), "-w".into(), format!("net.ipv4.ip_forward={value}").into()]),
        }
        command::run(&program, &args).await.map(|out| String::from_utf8_lossy(&out).trim().to_owned())
    }

    /// The handle of the forwarding guard (see [`Network::add_nat`]), if it is in place.
    async fn forward_guard(&self) -> Result<Option<u64>, HostError> {
        let tables = self.nft(&["-j", "list", "tables", "ip"]).await?;
        if !nft_items(&tables).iter().any(|item| item["table"]["name"] == NFT_TABLE) {
            return Ok(None);
        }
        let listing = self.nft(&["-j", "-a", "list", "table", "ip", NFT_TABLE]).await?;
        Ok(nft_items(&listing)
            .iter()
            .find(|item| item["rule"]["comment"] == FORWARD_GUARD)
            .and_then(|item| item["rule"]["handle"].as_u64()))
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
        // The owner alone: the kernel checks a tap's group too when it has one, and a VMM
        // restored from a snapshot runs with the snapshot's group, not its own.
        if let Some(uid) = &owner {
            add.extend(["user", uid]);
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
        let _forwarding = self.forwarding.lock().await;
        self.nft(&["add", "table", "ip", NFT_TABLE]).await?;
        self.nft(&["add", "chain", "ip", NFT_TABLE, NFT_CHAIN, "{ type nat hook postrouting priority 100 ; }"]).await?;
        // Adding twice would masquerade twice: remove what a crashed attempt left first.
        for handle in self.nat_rule_handles(tag).await? {
            self.nft(&["delete", "rule", "ip", NFT_TABLE, NFT_CHAIN, "handle", &handle.to_string()]).await?;
        }
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
        // Forwarding is what NAT is for; without it nothing leaves the bridge. Where it was
        // off, the guard goes in first: nothing else is forwarded for a moment.
        if self.ip_forward(None).await? != "1" {
            let guard = [
                format!("add chain ip {NFT_TABLE} {FORWARD_CHAIN} {{ type filter hook forward priority 0 ; }}"),
                format!(
                    "add rule ip {NFT_TABLE} {FORWARD_CHAIN} iifname != \"{bridge}\" oifname != \"{bridge}\" drop \
                     comment \"{FORWARD_GUARD}\""
                ),
            ];
            if self.forward_guard().await?.is_none() {
                self.nft(&[&guard.join("; ")]).await?;
            }
            self.ip_forward(Some("1")).await?;
        }
        Ok(())
    }

    async fn remove_nat(&self, tag: &str) -> Result<(), HostError> {
        let _forwarding = self.forwarding.lock().await;
        for handle in self.nat_rule_handles(tag).await? {
            self.nft(&["delete", "rule", "ip", NFT_TABLE, NFT_CHAIN, "handle", &handle.to_string()]).await?;
        }
        // The last NAT rule gone: forwarding as it was before banger, if banger turned it on.
        let chains = self.nft(&["-j", "list", "chains", "ip"]).await?;
        let nat_chain =
            |item: &serde_json::Value| item["chain"]["table"] == NFT_TABLE && item["chain"]["name"] == NFT_CHAIN;
        let nat_rules_left = if nft_items(&chains).iter().any(nat_chain) {
            let listing = self.nft(&["-j", "list", "chain", "ip", NFT_TABLE, NFT_CHAIN]).await?;
            nft_items(&listing).iter().any(|item| item.get("rule").is_some())
        } else {
            false
        };
        if !nat_rules_left && let Some(guard) = self.forward_guard().await? {
            self.ip_forward(Some("0")).await?;
            self.nft(&["delete", "rule", "ip", NFT_TABLE, FORWARD_CHAIN, "handle", &guard.to_string()]).await?;
        }
        Ok(())
    }

    async fn add_guest_rules(&self, tag: &str, guest: &GuestRules) -> Result<(), HostError> {
        // One nft run, one transaction: the chains, then the rules; all or nothing.
        self.remove_guest_rules(tag).await?;
        let mut script = vec![
            format!("add table bridge {NFT_TABLE}"),
            format!("add chain bridge {NFT_TABLE} {BRIDGE_CHAIN} {{ type filter hook prerouting priority -200 ; }}"),
            format!("add table ip {NFT_TABLE}"),
            format!("add chain ip {NFT_TABLE} {INPUT_CHAIN} {{ type filter hook input priority 0 ; }}"),
            format!("add chain ip {NFT_TABLE} {FORWARD_CHAIN} {{ type filter hook forward priority 0 ; }}"),
        ];
        script.extend(guest.commands(tag));
        self.nft(&[&script.join("; ")]).await.map(drop)
    }

    async fn remove_guest_rules(&self, tag: &str) -> Result<(), HostError> {
        let mut deletions = Vec::new();
        for family in ["bridge", "ip"] {
            let tables = self.nft(&["-j", "list", "tables", family]).await?;
            if !nft_items(&tables).iter().any(|item| item["table"]["name"] == NFT_TABLE) {
                continue;
            }
            let listing = self.nft(&["-j", "-a", "list", "table", family, NFT_TABLE]).await?;
            for item in nft_items(&listing) {
                let rule = &item["rule"];
                if rule["comment"] == tag
                    && rule["chain"] != NFT_CHAIN
                    && let (Some(chain), Some(handle)) = (rule["chain"].as_str(), rule["handle"].as_u64())
                {
                    deletions.push(format!("delete rule {family} {NFT_TABLE} {chain} handle {handle}"));
                }
            }
        }
        if deletions.is_empty() {
            return Ok(());
        }
        self.nft(&[&deletions.join("; ")]).await.map(drop)
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

/// The IPv4 networks in use on this host (in the namespace `ip` runs in): every route's
/// destination in every table (but the default route) and every interface address's
/// network, except those of `bridge` (banger's own).
pub async fn host_networks(ip: &Path, bridge: &str) -> Result<(Vec<Cidr>, Option<IpPool>), HostError> {
    let routes = command::run(ip, &["-j", "-4", "route", "show", "table", "all"].map(OsString::from)).await?;
    let addresses = command::run(ip, &["-j", "-4", "addr", "show"].map(OsString::from)).await?;
    Ok((parse_host_networks(&routes, &addresses, bridge), bridge_pool(&addresses, bridge)))
}

/// The network of `bridge`'s first IPv4 address, when it exists and has one.
fn bridge_pool(addresses: &[u8], bridge: &str) -> Option<IpPool> {
    let interfaces: Vec<serde_json::Value> = serde_json::from_slice(addresses).ok()?;
    let interface = interfaces.iter().find(|interface| interface["ifname"] == bridge)?;
    let address = interface["addr_info"].as_array()?.first()?;
    format!("{}/{}", address["local"].as_str()?, address["prefixlen"].as_u64()?).parse().ok()
}

fn parse_host_networks(routes: &[u8], addresses: &[u8], bridge: &str) -> Vec<Cidr> {
    let list = |json: &[u8]| match serde_json::from_slice::<serde_json::Value>(json) {
        Ok(serde_json::Value::Array(items)) => items,
        _ => Vec::new(),
    };
    let mut taken = Vec::new();
    for route in list(routes) {
        if route["dev"] == bridge {
            continue;
        }
        // The default route and its halves (a VPN's 0.0.0.0/1 and 128.0.0.0/1) cover every
        // range: routes shorter than /8 are where traffic goes by default, not networks here.
        if let Some(cidr) = route["dst"]
            .as_str()
            .filter(|dst| *dst != "default")
            .and_then(|dst| dst.parse::<Cidr>().ok())
            .filter(|cidr| cidr.prefix() >= 8)
        {
            taken.push(cidr);
        }
    }
    for interface in list(addresses) {
        if interface["ifname"] == bridge {
            continue;
        }
        for address in interface["addr_info"].as_array().into_iter().flatten() {
            let (Some(local), Some(prefix)) = (address["local"].as_str(), address["prefixlen"].as_u64()) else {
                continue;
            };
            if let Ok(cidr) = format!("{local}/{prefix}").parse() {
                taken.push(cidr);
            }
        }
    }
    taken
}

/// For `network = "auto"`: the VM network, chosen among private ranges free on this host
/// (the one chosen before, kept in `remembered_in`, while it still is), and why.
pub async fn choose_auto_pool(ip: &Path, bridge: &str, remembered_in: &Path) -> Result<(IpPool, String), HostError> {
    let (taken, on_bridge) = host_networks(ip, bridge).await?;
    // The bridge's own address is what running VMs use; else what was chosen last time.
    let remembered: Option<IpPool> =
        on_bridge.or_else(|| std::fs::read_to_string(remembered_in).ok().and_then(|text| text.trim().parse().ok()));
    let chosen = crate::domain::choose_pool(remembered, &taken).ok_or_else(|| HostError::Io {
        what: "a free range for VMs (network = \"auto\")".into(),
        source: std::io::Error::other(
            "every candidate (172.30.0-255.0/24, 10.250.0-255.0/24) overlaps a network of this host: set bridge_cidr",
        ),
    })?;
    let why = match remembered {
        Some(before) if before == chosen => format!("{chosen}, chosen before and still free on this host"),
        Some(before) => {
            tracing::warn!(%before, %chosen, "the VM network chosen before now overlaps a network of this host: \
                VMs made on it keep their addresses and will not reach the new one's gateway; recreate them");
            format!("{chosen}: {before}, chosen before, now overlaps a network of this host")
        }
        None => format!("{chosen}, the first of banger's candidate ranges free on this host"),
    };
    if remembered != Some(chosen) {
        super::fs::replace_file(remembered_in, 0o644, |file, temp| {
            std::io::Write::write_all(file, format!("{chosen}\n").as_bytes()).map_err(super::file_error("write", temp))
        })?;
    }
    Ok((chosen, why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_networks_are_its_routes_and_addresses_but_the_bridges() {
        let routes = br#"[{"dst":"default","gateway":"192.0.2.1","dev":"eth0"},{"dst":"192.0.2.0/24","dev":"eth0"},
            {"dst":"0.0.0.0/1","dev":"tun0"},{"dst":"128.0.0.0/1","dev":"tun0"},
            {"type":"local","dst":"127.0.0.1","dev":"lo","table":"local"},{"dst":"172.30.0.0/24","dev":"banger0"},
            {"dst":"10.8.0.0/16","dev":"tun0"}]"#;
        let addresses = br#"[{"ifname":"lo","addr_info":[{"local":"127.0.0.1","prefixlen":8}]},
            {"ifname":"banger0","addr_info":[{"local":"172.30.0.1","prefixlen":24}]},
            {"ifname":"wg0","addr_info":[{"local":"172.30.1.5","prefixlen":32}]}]"#;
        let found: Vec<String> =
            parse_host_networks(routes, addresses, "banger0").iter().map(ToString::to_string).collect();
        assert_eq!(found, ["192.0.2.0/24", "127.0.0.1/32", "10.8.0.0/16", "127.0.0.0/8", "172.30.1.5/32"]);
        assert!(parse_host_networks(b"not json", b"", "banger0").is_empty());
        assert_eq!(bridge_pool(addresses, "banger0").map(|p| p.to_string()), Some("172.30.0.0/24".into()));
        assert_eq!(bridge_pool(addresses, "missing"), None);
    }

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
        // The namespace did not forward: banger turned it on, for the bridge only, and turns
        // it off with the last NAT rule.
        assert_eq!(network.ip_forward(None).await.expect("sysctl"), "1");
        assert!(network.forward_guard().await.expect("guard").is_some());
        network.remove_nat("banger-vm-b").await.expect("remove b");
        assert_eq!(network.ip_forward(None).await.expect("sysctl"), "0");
        assert!(network.forward_guard().await.expect("guard").is_none());
    }

    #[tokio::test]
    async fn guest_rules_are_added_once_and_removed_by_tag_beside_nat_rules() {
        let netns = TestNetns::new();
        let network = LinuxNetwork::in_netns("ip".into(), netns.0.clone());
        let guest = |ip: [u8; 4], egress| GuestRules {
            tap: "bgtap3".into(),
            mac: "02:42:ac:1e:00:03".into(),
            ip: Ipv4Addr::from(ip),
            bridge: "br-test".into(),
            gateway: Ipv4Addr::new(172, 30, 0, 1),
            egress,
        };
        let allow = crate::domain::Egress::Allow { cidrs: vec!["10.1.0.0/16".parse().expect("cidr")] };
        network.remove_guest_rules("banger-vm-a").await.expect("no table yet is no rule");
        network.add_nat("banger-vm-a", Ipv4Addr::new(172, 30, 0, 3), "br-test").await.expect("nat");
        network.add_guest_rules("banger-vm-a", &guest([172, 30, 0, 3], allow)).await.expect("add a");
        network.add_guest_rules("banger-vm-a", &guest([172, 30, 0, 3], Default::default())).await.expect("again");
        network.add_guest_rules("banger-vm-b", &guest([172, 30, 0, 4], crate::domain::Egress::None)).await.expect("b");
        let count = |tag: &str| {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &netns.0, "nft", "-j", "list", "ruleset"])
                .output()
                .expect("nft");
            nft_items(&String::from_utf8_lossy(&out.stdout)).iter().filter(|i| i["rule"]["comment"] == tag).count()
        };
        let expected = |egress| guest([172, 30, 0, 3], egress).commands("t").len();
        assert_eq!(count("banger-vm-a"), expected(crate::domain::Egress::Internet) + 1, "once, and the NAT rule");
        network.remove_guest_rules("banger-vm-a").await.expect("remove a");
        network.remove_guest_rules("banger-vm-a").await.expect("twice is fine");
        assert_eq!(count("banger-vm-a"), 1, "the NAT rule is the NAT's to remove");
        assert_eq!(count("banger-vm-b"), expected(crate::domain::Egress::None), "b is kept");
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
