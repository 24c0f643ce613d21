//! The VMs' DNS names: `<vm name>.vm` resolves to the VM's address, for its guests and the
//! host. bangerd answers on the bridge's address, port 53 (UDP); guests are told to use it
//! (`banger.dns=` on their kernel command line, with `search vm`). Questions about other
//! names are relayed to the host's first nameserver, so guests resolve the outside too.
//!
//! Only what that needs of RFC 1035: one question per query, `A` answers, no compression
//! in questions. Anything malformed is answered `FORMERR` (or dropped when not even a
//! header), never trusted.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::net::UdpSocket;

/// The zone VM names live in.
pub const ZONE: &str = "vm";
/// How long resolvers may cache an answer: VMs come and go.
const TTL_SECONDS: u32 = 5;
/// How long a relayed question may wait for the upstream nameserver.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest UDP message read or relayed (EDNS answers can exceed 512 bytes).
const MAX_MESSAGE: usize = 4096;

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;

/// Response codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Rcode {
    /// Answered (possibly with no records).
    NoError = 0,
    /// The query could not be understood.
    FormErr = 1,
    /// The server failed.
    ServFail = 2,
    /// The name does not exist.
    NxDomain = 3,
    /// The kind of query is not implemented.
    NotImp = 4,
    /// The server does not answer this.
    Refused = 5,
}

/// One parsed question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    id: u16,
    recursion_desired: bool,
    /// The name asked about, lowercase, without the trailing dot.
    pub name: String,
    /// The record type asked for.
    pub qtype: u16,
    qclass: u16,
    /// The question section as received, echoed in the response.
    question: Vec<u8>,
}

/// Why a packet is not a query this server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Shorter than a header: not worth an answer.
    Truncated,
    /// A header, but not a standard one-question query: answered with this code.
    Refuse(u16, Rcode),
}

/// Parses a query packet.
pub fn parse_query(packet: &[u8]) -> Result<Query, Malformed> {
    if packet.len() < 12 {
        return Err(Malformed::Truncated);
    }
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    let flags = u16::from_be_bytes([packet[2], packet[3]]);
    let is_response = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0xf;
    let questions = u16::from_be_bytes([packet[4], packet[5]]);
    if is_response {
        return Err(Malformed::Truncated);
    }
    if opcode != 0 {
        return Err(Malformed::Refuse(id, Rcode::NotImp));
    }
    if questions != 1 {
        return Err(Malformed::Refuse(id, Rcode::FormErr));
    }
    let formerr = Malformed::Refuse(id, Rcode::FormErr);
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*packet.get(at).ok_or(formerr)?);
        at += 1;
        if len == 0 {
            break;
        }
        // Compression pointers (and the reserved label types) have no place in a question.
        if len > 63 {
            return Err(formerr);
        }
        let label = packet.get(at..at + len).ok_or(formerr)?;
        if !label.iter().all(|b| b.is_ascii_graphic()) {
            return Err(formerr);
        }
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        at += len;
        if at - 12 > 255 {
            return Err(formerr);
        }
    }
    let fixed = packet.get(at..at + 4).ok_or(formerr)?;
    let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
    Ok(Query {
        id,
        recursion_desired: flags & 0x0100 != 0,
        name: labels.join("."),
        qtype,
        qclass,
        question: packet[12..at + 4].to_vec(),
    })
}

/// A response to `query` with `rcode` and, when given, one `A` record for the question's name.
pub fn response(query: &Query, rcode: Rcode, address: Option<Ipv4Addr>) -> Vec<u8> {
    let address = address.filter(|_| rcode == Rcode::NoError);
    // QR, authoritative, recursion desired as asked, recursion available.
    let mut flags: u16 = 0x8000 | 0x0400 | 0x0080 | rcode as u16;
    if query.recursion_desired {
        flags |= 0x0100;
    }
    let mut out = Vec::with_capacity(12 + query.question.len() + 16);
    out.extend_from_slice(&query.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&u16::from(address.is_some()).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&query.question);
    if let Some(address) = address {
        out.extend_from_slice(&[0xc0, 0x0c]); // the question's name
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL_SECONDS.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&address.octets());
    }
    out
}

/// A header-only answer to a query that could not be parsed past its header.
fn refusal(id: u16, rcode: Rcode) -> Vec<u8> {
    let flags: u16 = 0x8000 | rcode as u16;
    let mut out = id.to_be_bytes().to_vec();
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    out
}

/// What the server knows about VM names.
#[tonic::async_trait]
pub trait Directory: Send + Sync + 'static {
    /// The VM named `name`: `None` when there is none, else its address if it has one.
    async fn lookup(&self, name: &str) -> Result<Option<Option<Ipv4Addr>>, String>;
}

#[tonic::async_trait]
impl Directory for crate::ops::Ops {
    async fn lookup(&self, name: &str) -> Result<Option<Option<Ipv4Addr>>, String> {
        if crate::domain::vm_name_error(name).is_err() {
            return Ok(None);
        }
        self.vm_address(name).await.map_err(|e| e.chain())
    }
}

/// The answer to one query packet: from the directory for names in the zone, relayed to
/// `upstream` for others (refused without one). `None`: send nothing.
pub async fn answer(packet: &[u8], directory: &dyn Directory, upstream: Option<SocketAddr>) -> Option<Vec<u8>> {
    let query = match parse_query(packet) {
        Ok(query) => query,
        Err(Malformed::Truncated) => return None,
        Err(Malformed::Refuse(id, rcode)) => return Some(refusal(id, rcode)),
    };
    let in_zone = query.name == ZONE || query.name.ends_with(&format!(".{ZONE}"));
    if !in_zone {
        return Some(match upstream {
            Some(upstream) => relay(packet, upstream).await.unwrap_or_else(|| response(&query, Rcode::ServFail, None)),
            None => response(&query, Rcode::Refused, None),
        });
    }
    if query.qclass != CLASS_IN {
        return Some(response(&query, Rcode::Refused, None));
    }
    let Some(vm) = query.name.strip_suffix(&format!(".{ZONE}")) else {
        // The zone itself exists and has no address.
        return Some(response(&query, Rcode::NoError, None));
    };
    Some(match directory.lookup(vm).await {
        Ok(None) => response(&query, Rcode::NxDomain, None),
        // Other record types of an existing name: no data, not an error.
        Ok(Some(address)) => response(&query, Rcode::NoError, address.filter(|_| query.qtype == TYPE_A)),
        Err(error) => {
            tracing::warn!(name = %query.name, error, "dns lookup failed");
            response(&query, Rcode::ServFail, None)
        }
    })
}

/// Sends `packet` to `upstream` from a fresh port and returns its answer, if one comes in time.
async fn relay(packet: &[u8], upstream: SocketAddr) -> Option<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().ok()?;
    let socket = UdpSocket::bind(bind).await.ok()?;
    socket.connect(upstream).await.ok()?;
    socket.send(packet).await.ok()?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let len = tokio::time::timeout(UPSTREAM_TIMEOUT, socket.recv(&mut buf)).await.ok()?.ok()?;
    // The answer must be to this question.
    (len >= 2 && buf[..2] == packet[..2]).then(|| buf[..len].to_vec())
}

/// The first nameserver in `/etc/resolv.conf`-style text.
pub fn first_nameserver(resolv_conf: &str) -> Option<SocketAddr> {
    resolv_conf.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next()? == "nameserver").then_some(())?;
        let ip: std::net::IpAddr = words.next()?.parse().ok()?;
        Some(SocketAddr::new(ip, 53))
    })
}

/// Binds UDP `address` even before the address exists on any interface (the bridge is made
/// with the first VM that needs it).
pub fn bind(address: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.set_freebind_v4(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    UdpSocket::from_std(socket.into())
}

/// Answers queries on `socket` until the task is dropped; each query is answered on its own
/// task, so a slow upstream delays no one else.
pub async fn serve(socket: UdpSocket, directory: Arc<dyn Directory>, upstream: Option<SocketAddr>) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                tracing::warn!(error = %error, "dns receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let packet = buf[..len].to_vec();
        let (socket, directory) = (socket.clone(), directory.clone());
        tokio::spawn(async move {
            if let Some(reply) = answer(&packet, directory.as_ref(), upstream).await {
                let _ = socket.send_to(&reply, peer).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for `name` with type `qtype`, id 0x1234, recursion desired.
    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut packet = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            packet.push(label.len() as u8);
            packet.extend_from_slice(label.as_bytes());
        }
        packet.push(0);
        packet.extend_from_slice(&qtype.to_be_bytes());
        packet.extend_from_slice(&CLASS_IN.to_be_bytes());
        packet
    }

    struct Vms;

    #[tonic::async_trait]
    impl Directory for Vms {
        async fn lookup(&self, name: &str) -> Result<Option<Option<Ipv4Addr>>, String> {
            Ok(match name {
                "web" => Some(Some(Ipv4Addr::new(172, 30, 0, 7))),
                "offline" => Some(None),
                "broken" => return Err("database is locked".into()),
                _ => None,
            })
        }
    }

    fn rcode(reply: &[u8]) -> u8 {
        reply[3] & 0xf
    }

    fn answers(reply: &[u8]) -> u16 {
        u16::from_be_bytes([reply[6], reply[7]])
    }

    #[tokio::test]
    async fn names_in_the_zone_resolve_to_their_vm_and_others_do_not_exist() {
        let reply = answer(&query("WEB.vm", TYPE_A), &Vms, None).await.expect("reply");
        assert_eq!(reply[..2], [0x12, 0x34], "same id");
        assert_eq!(reply[2] & 0x80, 0x80, "a response");
        assert_eq!(reply[2] & 0x04, 0x04, "authoritative");
        assert_eq!((rcode(&reply), answers(&reply)), (0, 1));
        assert_eq!(reply[reply.len() - 4..], [172, 30, 0, 7]);
        let question = query("WEB.vm", TYPE_A)[12..].to_vec();
        assert_eq!(reply[12..12 + question.len()], question, "the question is echoed as asked");

        let reply = answer(&query("nope.vm", TYPE_A), &Vms, None).await.expect("reply");
        assert_eq!((rcode(&reply), answers(&reply)), (Rcode::NxDomain as u8, 0));
        // An existing name: other types and a VM without an address have no data, no error.
        for (name, qtype) in [("web.vm", 28), ("offline.vm", TYPE_A), ("vm", TYPE_A)] {
            let reply = answer(&query(name, qtype), &Vms, None).await.expect("reply");
            assert_eq!((rcode(&reply), answers(&reply)), (0, 0), "{name} {qtype}");
        }
        let reply = answer(&query("broken.vm", TYPE_A), &Vms, None).await.expect("reply");
        assert_eq!(rcode(&reply), Rcode::ServFail as u8);
        let reply = answer(&query("example.com", TYPE_A), &Vms, None).await.expect("reply");
        assert_eq!(rcode(&reply), Rcode::Refused as u8, "no upstream: refused");
    }

    #[tokio::test]
    async fn other_names_are_relayed_to_the_upstream_nameserver() {
        let upstream = UdpSocket::bind("127.0.0.1:0").await.expect("upstream");
        let address = upstream.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (len, peer) = upstream.recv_from(&mut buf).await.expect("recv");
            let mut reply = buf[..len].to_vec();
            reply[2] |= 0x80;
            reply.extend_from_slice(b"upstream");
            upstream.send_to(&reply, peer).await.expect("send");
        });
        let asked = query("example.com", TYPE_A);
        let reply = answer(&asked, &Vms, Some(address)).await.expect("reply");
        assert!(reply.ends_with(b"upstream") && reply[..2] == asked[..2], "{reply:?}");
        server.await.expect("upstream task");
        // A silent upstream: the client gets SERVFAIL, not silence.
        let silent = UdpSocket::bind("127.0.0.1:0").await.expect("silent");
        let reply = answer(&asked, &Vms, Some(silent.local_addr().expect("addr"))).await.expect("reply");
        assert_eq!(rcode(&reply), Rcode::ServFail as u8);
    }

    #[tokio::test]
    async fn malformed_packets_are_refused_or_dropped_never_trusted() {
        assert_eq!(answer(&[1, 2, 3], &Vms, None).await, None, "shorter than a header");
        let mut two_questions = query("web.vm", TYPE_A);
        two_questions[5] = 2;
        let reply = answer(&two_questions, &Vms, None).await.expect("reply");
        assert_eq!(rcode(&reply), Rcode::FormErr as u8);
        let mut pointer = query("web.vm", TYPE_A);
        pointer[12] = 0xc0;
        assert_eq!(rcode(&answer(&pointer, &Vms, None).await.expect("reply")), Rcode::FormErr as u8);
        let mut update = query("web.vm", TYPE_A);
        update[2] = 0x28; // opcode 5 (UPDATE)
        assert_eq!(rcode(&answer(&update, &Vms, None).await.expect("reply")), Rcode::NotImp as u8);
        let truncated = &query("web.vm", TYPE_A)[..20];
        assert_eq!(rcode(&answer(truncated, &Vms, None).await.expect("reply")), Rcode::FormErr as u8);
        // Arbitrary bytes never panic.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 64) as usize;
            let mut packet: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8 ^ i as u8).collect();
            if packet.len() > 5 {
                packet[2] &= 0x07; // mostly queries, to reach the question parser
                packet[4] = 0;
                packet[5] = 1;
            }
            let _ = parse_query(&packet);
        }
    }

    #[test]
    fn the_upstream_is_the_first_nameserver() {
        let conf = "# comment\nsearch example.org\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n";
        assert_eq!(first_nameserver(conf), Some("10.0.0.2:53".parse().expect("addr")));
        assert_eq!(first_nameserver("search x\n"), None);
    }
}
