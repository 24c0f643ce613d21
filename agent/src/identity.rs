//! A guest's identity, set anew when the host hands the VM out under another name: a pool
//! member claimed by a create, or a VM restored from a snapshot (whose memory, and so its
//! address, machine-id, clock and random state, are every other clone's).

use std::{net::Ipv4Addr, os::fd::AsRawFd};

use banger_proto::agent::v1::{GuestNetwork, SetIdentityRequest};
use nix::libc;
use tonic::Status;

/// The most entropy one call mixes in.
const MAX_ENTROPY: usize = 512;
/// The interface banger's network contract configures.
const INTERFACE: &str = "eth0";

/// `_IOW('R', 0x03, int[2])`: add entropy to the input pool, credited.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the kernel's generator from the input pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Applies every part of `request` that is set; the hostname always is. Silent on the
/// console (the daemon records the identity it gave): this is on a restore's way to ready.
pub fn apply(request: &SetIdentityRequest) -> Result<(), Status> {
    check_hostname(&request.hostname)?;
    if request.entropy.len() > MAX_ENTROPY {
        return Err(Status::invalid_argument(format!("at most {MAX_ENTROPY} bytes of entropy")));
    }
    if !request.machine_id.is_empty() {
        check_machine_id(&request.machine_id)?;
    }
    let network = request.network.as_ref().map(parse_network).transpose()?;
    // Entropy first: nothing after it should draw from the old random state.
    if !request.entropy.is_empty() {
        reseed(&request.entropy).map_err(|err| Status::internal(format!("reseed the kernel's generator: {err}")))?;
    }
    if request.realtime_ns > 0 {
        set_clock(request.realtime_ns).map_err(|err| Status::internal(format!("clock_settime: {err}")))?;
    }
    nix::unistd::sethostname(&request.hostname).map_err(|err| Status::internal(format!("sethostname: {err}")))?;
    // Best effort: a read-only root keeps the kernel's name only.
    if let Err(err) = rewrite("/etc/hostname", &format!("{}\n", request.hostname)) {
        log!("cannot write /etc/hostname: {err}");
    }
    if !request.machine_id.is_empty()
        && let Err(err) = rewrite("/etc/machine-id", &format!("{}\n", request.machine_id))
    {
        log!("cannot write /etc/machine-id: {err}");
    }
    if let Some(network) = network {
        configure(&network).map_err(|err| Status::internal(format!("configure {INTERFACE}: {err}")))?;
    }
    Ok(())
}

/// Replaces a small file's content in place: written over from its start, then cut to
/// length, never truncated to zero first. ext4 flushes a file truncated to zero and written
/// again when it is closed (`auto_da_alloc`), so `fs::write` would allocate blocks and send
/// the guest's block layer a write at once: on a guest just restored from a snapshot, code
/// run for the first time (~4,000 translated blocks under emulation, most of a hostname's
/// cost) on the way to ready. Overwriting the cached page leaves it to the next writeback.
fn rewrite(path: &str, content: &str) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(path)?;
    file.write_all_at(content.as_bytes(), 0)?;
    file.set_len(content.len() as u64)
}

fn check_hostname(hostname: &str) -> Result<(), Status> {
    let valid = (1..=63).contains(&hostname.len())
        && hostname.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !hostname.starts_with('-')
        && !hostname.ends_with('-');
    if valid { Ok(()) } else { Err(Status::invalid_argument(format!("not a hostname: {hostname:?}"))) }
}

fn check_machine_id(id: &str) -> Result<(), Status> {
    let valid = id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if valid { Ok(()) } else { Err(Status::invalid_argument(format!("not a machine-id: {id:?}"))) }
}

/// The interface's identity, parsed.
#[derive(Debug, PartialEq, Eq)]
struct Network {
    mac: [u8; 6],
    address: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
}

fn parse_network(network: &GuestNetwork) -> Result<Network, Status> {
    let invalid = |what: &str, value: &str| Status::invalid_argument(format!("not {what}: {value:?}"));
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = network.mac.split(':').collect();
    if parts.len() != 6 {
        return Err(invalid("a MAC address", &network.mac));
    }
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16).map_err(|_| invalid("a MAC address", &network.mac))?;
    }
    let (address, prefix) = network.address.split_once('/').ok_or_else(|| invalid("an address", &network.address))?;
    let address: Ipv4Addr = address.parse().map_err(|_| invalid("an address", &network.address))?;
    let prefix: u8 = prefix.parse().ok().filter(|p| (1..=32).contains(p)).ok_or_else(|| invalid("a prefix", prefix))?;
    let gateway = match network.gateway.as_str() {
        "" => None,
        gateway => Some(gateway.parse().map_err(|_| invalid("a gateway", gateway))?),
    };
    Ok(Network { mac, address, prefix, gateway })
}

/// `struct ifreq`: the interface's name and one address.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    addr: libc::sockaddr,
    _rest: [u8; 8],
}

/// `struct rtentry` (`linux/route.h`).
#[repr(C)]
struct RtEntry {
    pad1: libc::c_ulong,
    dst: libc::sockaddr,
    gateway: libc::sockaddr,
    genmask: libc::sockaddr,
    flags: libc::c_ushort,
    pad2: libc::c_short,
    pad3: libc::c_ulong,
    pad4: *mut libc::c_void,
    metric: libc::c_short,
    dev: *mut libc::c_char,
    mtu: libc::c_ulong,
    window: libc::c_ulong,
    irtt: libc::c_ushort,
}

fn inet(address: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(address.octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes; every bit pattern is valid.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

fn ifreq(addr: libc::sockaddr) -> IfReq {
    let mut name = [0u8; libc::IFNAMSIZ];
    name[..INTERFACE.len()].copy_from_slice(INTERFACE.as_bytes());
    IfReq { name, addr, _rest: [0; 8] }
}

fn ioctl<T>(fd: libc::c_int, request: libc::c_ulong, argument: &mut T) -> std::io::Result<()> {
    // SAFETY: `argument` is the structure `request` expects, alive for the call.
    let done = unsafe { libc::ioctl(fd, request as _, std::ptr::from_mut(argument)) };
    if done < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Gives eth0 its new MAC (virtio-net passes it on to the device), replaces its address,
/// and routes through the gateway again (replacing the address dropped the route).
fn configure(network: &Network) -> std::io::Result<()> {
    // SAFETY: a plain socket call; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let fd = socket.as_raw_fd();
    let mut hardware = libc::sockaddr { sa_family: libc::ARPHRD_ETHER, sa_data: [0; 14] };
    for (slot, byte) in hardware.sa_data.iter_mut().zip(network.mac) {
        *slot = byte as libc::c_char;
    }
    ioctl(fd, libc::SIOCSIFHWADDR, &mut ifreq(hardware))?;
    ioctl(fd, libc::SIOCSIFADDR, &mut ifreq(inet(network.address)))?;
    let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(network.prefix)).unwrap_or(0));
    ioctl(fd, libc::SIOCSIFNETMASK, &mut ifreq(inet(mask)))?;
    if let Some(gateway) = network.gateway {
        let mut device = *b"eth0\0";
        let mut route = RtEntry {
            pad1: 0,
            dst: inet(Ipv4Addr::UNSPECIFIED),
            gateway: inet(gateway),
            genmask: inet(Ipv4Addr::UNSPECIFIED),
            flags: (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort,
            pad2: 0,
            pad3: 0,
            pad4: std::ptr::null_mut(),
            metric: 0,
            dev: device.as_mut_ptr().cast(),
            mtu: 0,
            window: 0,
            irtt: 0,
        };
        match ioctl(fd, libc::SIOCADDRT, &mut route) {
            Err(err) if err.raw_os_error() != Some(libc::EEXIST) => return Err(err),
            _ => {}
        }
    }
    Ok(())
}

/// Mixes `entropy` into the kernel's input pool, credited, and reseeds the generator from
/// it at once: every later read differs from the other clones'.
fn reseed(entropy: &[u8]) -> std::io::Result<()> {
    let random = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend(((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend((entropy.len() as i32).to_ne_bytes());
    info.extend(entropy);
    info.resize(info.len().next_multiple_of(4), 0);
    // SAFETY: `info` is a rand_pool_info of `buf_size` bytes, alive for the call.
    let added = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if added < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let reseeded = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) };
    if reseeded < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_clock(realtime_ns: i64) -> std::io::Result<()> {
    let now = libc::timespec { tv_sec: realtime_ns / 1_000_000_000, tv_nsec: realtime_ns % 1_000_000_000 };
    // SAFETY: a valid timespec, read during the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &now) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewritten_file_holds_exactly_its_new_content() {
        let path = std::env::temp_dir().join(format!("banger-agent-rewrite-{}", std::process::id()));
        let path_text = path.to_str().expect("utf-8 path");
        for content in ["a-long-first-hostname\n", "short\n", "", "0123456789abcdef\n"] {
            rewrite(path_text, content).expect("rewrite");
            assert_eq!(std::fs::read_to_string(&path).expect("read"), content);
        }
        std::fs::remove_file(&path).expect("remove");
    }

    #[test]
    fn networks_are_parsed_and_bad_ones_refused() {
        let network = GuestNetwork {
            mac: "52:54:00:0a:00:2b".into(),
            address: "172.30.0.5/24".into(),
            gateway: "172.30.0.1".into(),
        };
        assert_eq!(
            parse_network(&network).expect("valid"),
            Network {
                mac: [0x52, 0x54, 0, 0x0a, 0, 0x2b],
                address: Ipv4Addr::new(172, 30, 0, 5),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(172, 30, 0, 1)),
            }
        );
        for (mac, address) in [("52:54:00:0a:00", "172.30.0.5/24"), ("52:54:00:0a:00:2b", "172.30.0.5/33")] {
            let bad = GuestNetwork { mac: mac.into(), address: address.into(), gateway: String::new() };
            assert!(parse_network(&bad).is_err(), "{mac} {address}");
        }
    }

    #[test]
    fn machine_ids_and_hostnames_are_checked() {
        assert!(check_machine_id("0123456789abcdef0123456789abcdef").is_ok());
        assert!(check_machine_id("0123456789ABCDEF0123456789abcdef").is_err());
        assert!(check_machine_id("0123").is_err());
        assert!(check_hostname("job-1").is_ok());
        assert!(check_hostname("-job").is_err());
    }

    #[test]
    fn the_c_structures_have_the_kernels_sizes() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
    }
}
