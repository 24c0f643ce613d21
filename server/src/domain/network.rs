//! VM networking as data: the address pool of the host bridge, tap names and MACs derived
//! from a VM's identity.

use std::{collections::HashSet, fmt, net::Ipv4Addr, str::FromStr};

/// An IPv4 network in CIDR notation whose first host address is the bridge's (the VMs'
/// gateway) and whose other host addresses go to VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPool {
    network: Ipv4Addr,
    prefix: u8,
}

/// A CIDR that cannot serve as a pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IPv4 network of /16 to /29 (like 172.30.0.0/24)")]
pub struct PoolError(pub String);

impl FromStr for IpPool {
    type Err = PoolError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // A network (a bare address is a /32, which no pool is).
        let cidr: Cidr = s.parse().map_err(|_| PoolError(s.to_owned()))?;
        if !(16..=29).contains(&cidr.prefix) {
            return Err(PoolError(s.to_owned()));
        }
        Ok(Self { network: cidr.network, prefix: cidr.prefix })
    }
}

impl fmt::Display for IpPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl IpPool {
    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The bridge's address: the first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The lowest address for a VM not in `used` (neither network, gateway nor broadcast).
    pub fn first_free(&self, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let first = u32::from(self.network) + 2;
        let broadcast = u32::from(self.network) | (u32::MAX >> self.prefix);
        (first..broadcast).map(Ipv4Addr::from).find(|ip| !used.contains(ip))
    }

    /// True when `ip` is a VM address of this pool.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(ip) & mask == u32::from(self.network) && ip != self.gateway()
    }

    /// True when this pool and `other` share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let shortest = self.prefix.min(other.prefix);
        let mask = u32::MAX.checked_shl(32 - u32::from(shortest)).unwrap_or(0);
        u32::from(self.network) & mask == u32::from(other.network) & mask
    }
}

/// The ranges `network = "auto"` chooses from, in order: 172.30.0.0/24 to 172.30.255.0/24,
/// then 10.250.0.0/24 to 10.250.255.0/24 (private, and rarely a LAN's or a VPN's).
pub fn auto_pool_candidates() -> impl Iterator<Item = IpPool> {
    let block = |a: u8, b: u8| (0..=255u8).map(move |c| IpPool { network: Ipv4Addr::new(a, b, c, 0), prefix: 24 });
    block(172, 30).chain(block(10, 250))
}

/// For `network = "auto"`: the range chosen before (`remembered`) while nothing of the host's
/// (`taken`: its routes and addresses, none of banger's bridge) overlaps it, else the first
/// candidate nothing overlaps.
pub fn choose_pool(remembered: Option<IpPool>, taken: &[Cidr]) -> Option<IpPool> {
    let free = |pool: &IpPool| !taken.iter().any(|cidr| pool.overlaps(cidr));
    remembered.filter(free).or_else(|| auto_pool_candidates().find(free))
}

/// The tap of the VM with vsock CID `cid`: unique on the host (CIDs are), and within the
/// kernel's 15-byte interface names.
pub fn tap_name(cid: u32) -> String {
    format!("bgtap{cid}")
}

/// A locally administered MAC for the VM with vsock CID `cid`.
pub fn mac_address(cid: u32) -> String {
    let [a, b, c, d] = cid.to_be_bytes();
    format!("02:bg:{a:02x}:{b:02x}:{c:02x}:{d:02x}").replace("bg", "42")
}

/// An IPv4 network in CIDR notation (`10.0.0.0/8`, `192.0.2.7/32`), normalized to its
/// network address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

/// Text that is not an IPv4 CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IPv4 network like 10.0.0.0/8 or an address like 192.0.2.7")]
pub struct CidrError(pub String);

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CidrError(s.to_owned());
        let (address, prefix) = s.split_once('/').unwrap_or((s, "32"));
        let address: Ipv4Addr = address.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        Ok(Self { network: Ipv4Addr::from(u32::from(address) & mask), prefix })
    }
}

impl Cidr {
    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Destinations that are not the public internet: this network, private, shared (CGNAT),
/// loopback, link-local (cloud metadata lives there), the IETF's and benchmarking ranges,
/// multicast and reserved.
pub const NOT_INTERNET: [&str; 11] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// Where a VM's traffic may go beyond its bridge. Whatever the policy, a guest sends only
/// from its own MAC and address, reaches the other guests on its bridge and bangerd's DNS on
/// the bridge address, and nothing else of the host unless its allow list names it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Egress {
    /// Nothing leaves the bridge.
    None,
    /// Public addresses only (not [`NOT_INTERNET`], not the host's own).
    #[default]
    Internet,
    /// Only these networks, wherever they are (the host's own addresses included).
    Allow {
        /// The networks.
        cidrs: Vec<Cidr>,
    },
}

impl fmt::Display for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => write!(f, "none"),
            Self::Internet => write!(f, "internet"),
            Self::Allow { cidrs } => {
                let list: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
                write!(f, "{}", list.join(","))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_auto_range_avoids_every_network_of_the_host_and_keeps_its_earlier_choice() {
        let cidrs = |list: &[&str]| list.iter().map(|c| c.parse::<Cidr>().expect("cidr")).collect::<Vec<_>>();
        let pool = |text: &str| text.parse::<IpPool>().expect("pool");
        assert_eq!(choose_pool(None, &[]), Some(pool("172.30.0.0/24")));
        // A LAN on 172.30.0.0/23 and a VPN's 172.30.2.7: the next free /24.
        let taken = cidrs(&["172.30.0.0/23", "172.30.2.7", "192.168.1.0/24"]);
        assert_eq!(choose_pool(None, &taken), Some(pool("172.30.3.0/24")));
        // What was chosen before stays while it is free, and is given up when it is not.
        assert_eq!(choose_pool(Some(pool("172.30.9.0/24")), &taken), Some(pool("172.30.9.0/24")));
        assert_eq!(choose_pool(Some(pool("172.30.1.0/24")), &taken), Some(pool("172.30.3.0/24")));
        // All of 172.16.0.0/12 routed elsewhere: 10.250.x.
        assert_eq!(choose_pool(None, &cidrs(&["172.16.0.0/12"])), Some(pool("10.250.0.0/24")));
        assert_eq!(choose_pool(None, &cidrs(&["172.16.0.0/12", "10.0.0.0/8"])), None);
    }

    #[test]
    fn pools_hand_out_the_lowest_free_host_address_and_never_the_gateway() {
        let pool: IpPool = "172.30.0.77/29".parse().expect("pool");
        assert_eq!(pool.to_string(), "172.30.0.72/29");
        assert_eq!(pool.gateway(), Ipv4Addr::new(172, 30, 0, 73));
        let mut used = HashSet::new();
        let mut handed = Vec::new();
        while let Some(ip) = pool.first_free(&used) {
            used.insert(ip);
            handed.push(ip.octets()[3]);
        }
        assert_eq!(handed, [74, 75, 76, 77, 78], "network .72, gateway .73 and broadcast .79 are never handed out");
        assert!(pool.contains(Ipv4Addr::new(172, 30, 0, 75)) && !pool.contains(pool.gateway()));
    }

    #[test]
    fn bad_pools_are_refused() {
        for bad in ["172.30.0.0", "172.30.0.0/8", "172.30.0.0/30", "nope/24"] {
            assert!(bad.parse::<IpPool>().is_err(), "{bad}");
        }
    }

    #[test]
    fn tap_names_fit_the_kernel_limit_and_macs_are_local() {
        assert!(tap_name(u32::MAX).len() <= 15);
        assert_eq!(mac_address(3), "02:42:00:00:00:03");
    }
}
