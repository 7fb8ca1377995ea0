//! Bounds-checked header parsing shared by the XDP and TC programs.
//!
//! Every read goes through [`Frame::header`], which proves to the
//! verifier that a header lies inside the frame; nothing is read past it.
//! Headers are `#[repr(C)]` structs of byte arrays (network order, no
//! alignment: a frame's headers sit at any offset), read field by field.
//!
//! The parser fails closed: where a frame could carry a rule port that it
//! cannot read (a header cut short, a longer IPv6 extension-header chain
//! than it walks, a tiny TCP first fragment), it returns a class that
//! enforce mode drops (`Class::fails_closed`), never a pass by default.

use core::mem::{offset_of, size_of};

use netwatch_common::{Class, LinkKind, MAX_IPV6_EXT_HEADERS, Protocol};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_P_PPP_SES: u16 = 0x8864;
const MAX_VLAN_TAGS: usize = 2;
const PPP_IP: u16 = 0x0021;
const PPP_IPV6: u16 = 0x0057;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

const IPV4_HLEN: usize = size_of::<Ipv4Hdr>();
const IPV6_HLEN: usize = size_of::<Ipv6Hdr>();
const UDP_HLEN: usize = 8;
/// Where an NBNS header's flags word (R bit first) starts in a UDP
/// datagram: after the UDP header and the 2-byte transaction id.
const NBNS_FLAGS_OFFSET: usize = UDP_HLEN + 2;
const TCP_HLEN: usize = 20;
/// Source and destination port: all a first fragment must hold to be
/// matched on its ports.
const PORTS_LEN: usize = size_of::<Ports>();
/// An IPv6 fragment header's length (next header, reserved, offset and
/// flags, identification).
const IPV6_FRAG_HLEN: usize = 8;

/// Ethernet II header.
#[repr(C)]
struct EthHdr {
    _dst: [u8; 6],
    _src: [u8; 6],
    ether_type: [u8; 2],
}

/// An 802.1Q or 802.1ad tag: what follows the ethertype that announced it.
#[repr(C)]
struct VlanHdr {
    _tci: [u8; 2],
    ether_type: [u8; 2],
}

/// PPPoE session header (RFC 2516: ver/type, code, session id, length)
/// followed by the PPP protocol field.
#[repr(C)]
struct PppoeHdr {
    _ver_type: u8,
    _code: u8,
    _session: [u8; 2],
    _length: [u8; 2],
    protocol: [u8; 2],
}

/// IPv4 header without options.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    version_ihl: u8,
    _tos: u8,
    total_len: [u8; 2],
    _id: [u8; 2],
    frag_off: [u8; 2],
    _ttl: u8,
    protocol: u8,
    _check: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

/// IPv6 fixed header.
#[repr(C)]
struct Ipv6Hdr {
    version_class_flow: [u8; 4],
    payload_len: [u8; 2],
    next_hdr: u8,
    _hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

/// The start of an IPv6 extension header (hop-by-hop, routing,
/// destination options, AH): next header and length.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6ExtHdr {
    next_hdr: u8,
    len: u8,
}

/// The first half of an IPv6 fragment header: up to the offset and the
/// more-fragments flag (the identification is not read).
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6FragHdr {
    next_hdr: u8,
    _reserved: u8,
    offset_and_more: [u8; 2],
}

/// UDP and TCP source and destination ports: the first 4 bytes of either
/// header.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ports {
    src: [u8; 2],
    dst: [u8; 2],
}

/// No header offset the parser computes exceeds this: a larger one lies
/// past any frame XDP or TC hands us. Keeping offsets below it lets the
/// verifier bound every pointer the extension-header walk makes.
const MAX_OFFSET: usize = 8192;

/// Where the IP addresses of a parsed packet are, read only when a list
/// lookup or the tracker needs them.
#[derive(Clone, Copy)]
pub enum Addrs {
    V4 { src: *const [u8; 4], dst: *const [u8; 4] },
    V6 { src: *const [u8; 16], dst: *const [u8; 16] },
}

/// A packet that carries a UDP or TCP destination port.
pub struct Packet {
    pub protocol: Protocol,
    pub dst_port: u16,
    pub src_port: u16,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// The first bytes of the TCP header (ports, sequence and
    /// acknowledgement numbers, offset and flags), checked to lie inside
    /// the frame; null for UDP. Read only on web handshakes.
    pub tcp: *const TcpHead,
    /// UDP whose payload starts as an NBNS response would: the R bit of
    /// the flags word set (RFC 1002 section 4.2.1.1). Whether the port
    /// carries NBNS is the rule's to say (`PORT_NBNS`).
    pub nbns_response: bool,
    pub addrs: Addrs,
}

/// The first 14 bytes of a TCP header: up to and including the flags.
#[repr(C)]
pub struct TcpHead {
    _src_port: [u8; 2],
    _dst_port: [u8; 2],
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    _data_offset: u8,
    flags: u8,
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Outcome of parsing: a packet with ports, or the class it counts under.
pub type Parsed = Result<Packet, Class>;

/// The frame: readable in `[start, end)`, `len` bytes long in all (more
/// than `end - start` where a TC skb is not linear).
#[derive(Clone, Copy)]
struct Frame {
    start: usize,
    end: usize,
    len: usize,
}

impl Frame {
    /// A pointer to a `T` at `offset` if all of it lies inside the frame.
    #[inline(always)]
    fn at<T>(self, offset: usize) -> Option<*const T> {
        let at = self.start + offset;
        if at + size_of::<T>() > self.end {
            None
        } else {
            Some(at as *const T)
        }
    }

    /// A pointer to a `T` at `offset`, unchecked: for fields of a header
    /// [`Frame::header`] has checked.
    #[inline(always)]
    fn ptr<T>(self, offset: usize) -> *const T {
        (self.start + offset) as *const T
    }

    /// The header `T` at `offset`, if all of it is inside the frame.
    /// `T` is a `#[repr(C)]` struct of bytes and byte arrays (alignment 1).
    #[inline(always)]
    fn header<T>(self, offset: usize) -> Option<&'static T> {
        // SAFETY: `at` checked that the header is inside the frame, which
        // stays in place while the program runs; `T` has alignment 1.
        self.at::<T>(offset).map(|p| unsafe { &*p })
    }

    /// The `N` bytes at `offset`, if inside the frame.
    #[inline(always)]
    fn bytes<const N: usize>(self, offset: usize) -> Option<[u8; N]> {
        self.header::<[u8; N]>(offset).copied()
    }

    #[inline(always)]
    fn len(self) -> usize {
        self.len
    }
}

/// The network layer a frame carries, and where it starts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Network {
    Ipv4,
    Ipv6,
}

/// The transport header an IP packet leads to.
struct Transport {
    proto: u8,
    /// Offset of the transport header in the frame.
    offset: usize,
    /// Where the IP packet ends (its length field), at most the frame end:
    /// bytes after it are link-layer padding, not transport header.
    ip_end: usize,
    /// A first fragment (more fragments follow; offset 0).
    first_fragment: bool,
    addrs: Addrs,
}

/// Parses the frame readable in `[start, end)`, `len` bytes long, as it
/// begins on a link of `link`.
#[inline(always)]
pub fn parse(start: usize, end: usize, len: usize, link: LinkKind) -> Parsed {
    let frame = Frame { start, end, len };
    let (network, offset) = match link {
        LinkKind::Ethernet => link_ethernet(frame)?,
        LinkKind::Ip => link_ip(frame)?,
    };
    // One call site per layer keeps a single copy of the transport code
    // (and of everything after it) for the verifier to walk.
    let transport = match network {
        Network::Ipv4 => ipv4(frame, offset)?,
        Network::Ipv6 => ipv6(frame, offset)?,
    };
    ports(frame, transport)
}

/// Ethernet, up to two VLAN tags (802.1Q or 802.1ad, any order), and a
/// PPPoE session header.
#[inline(always)]
fn link_ethernet(frame: Frame) -> Result<(Network, usize), Class> {
    let eth = frame.header::<EthHdr>(0).ok_or(Class::EthTruncated)?;
    let mut ethertype = u16::from_be_bytes(eth.ether_type);
    let mut offset = size_of::<EthHdr>();
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let tag = frame.header::<VlanHdr>(offset).ok_or(Class::VlanTruncated)?;
        ethertype = u16::from_be_bytes(tag.ether_type);
        offset += size_of::<VlanHdr>();
    }
    match ethertype {
        ETH_P_IP => Ok((Network::Ipv4, offset)),
        ETH_P_IPV6 => Ok((Network::Ipv6, offset)),
        ETH_P_PPP_SES => {
            let pppoe = frame.header::<PppoeHdr>(offset).ok_or(Class::PppoeTruncated)?;
            let offset = offset + size_of::<PppoeHdr>();
            match u16::from_be_bytes(pppoe.protocol) {
                PPP_IP => Ok((Network::Ipv4, offset)),
                PPP_IPV6 => Ok((Network::Ipv6, offset)),
                // LCP, IPCP, CHAP, ...: control, never a rule port.
                _ => Err(Class::NonIp),
            }
        }
        // A third tag: whatever it carries is beyond what we parse.
        ETH_P_8021Q | ETH_P_8021AD => Err(Class::VlanTooDeep),
        _ => Err(Class::NonIp),
    }
}

/// An L3 device: the frame is the IP packet; its version says which.
#[inline(always)]
fn link_ip(frame: Frame) -> Result<(Network, usize), Class> {
    // Two bytes: a one-byte check compiles to a comparison the verifier
    // does not turn into a packet range. No IP packet is shorter.
    let first = frame.bytes::<2>(0).ok_or(Class::NonIp)?[0];
    match first >> 4 {
        4 => Ok((Network::Ipv4, 0)),
        6 => Ok((Network::Ipv6, 0)),
        _ => Err(Class::NonIp),
    }
}

#[inline(always)]
fn ipv4(frame: Frame, offset: usize) -> Result<Transport, Class> {
    let ip = *frame.header::<Ipv4Hdr>(offset).ok_or(Class::Ipv4Truncated)?;
    let header_len = ((ip.version_ihl & 0x0f) as usize) * 4;
    let total_len = u16::from_be_bytes(ip.total_len) as usize;
    if ip.version_ihl >> 4 != 4 || header_len < IPV4_HLEN || total_len < header_len {
        // Linux drops these in ip_rcv.
        return Err(Class::Ipv4BadHeader);
    }
    // The packet, options included, must be inside the frame.
    if offset + total_len > frame.len() {
        return Err(Class::Ipv4Truncated);
    }
    let fragment = u16::from_be_bytes(ip.frag_off);
    if fragment & 0x1fff != 0 {
        return Err(Class::Fragment);
    }
    Ok(Transport {
        proto: ip.protocol,
        offset: offset + header_len,
        ip_end: offset + total_len,
        first_fragment: fragment & 0x2000 != 0,
        // From the frame start, not from `ip`: a pointer derived from the
        // checked header pointer keeps that check's range, and the
        // verifier then tells apart (and walks twice) states that differ
        // only in it.
        addrs: Addrs::V4 {
            src: frame.ptr(offset + offset_of!(Ipv4Hdr, src)),
            dst: frame.ptr(offset + offset_of!(Ipv4Hdr, dst)),
        },
    })
}

#[inline(always)]
fn ipv6(frame: Frame, offset: usize) -> Result<Transport, Class> {
    let ip = frame.header::<Ipv6Hdr>(offset).ok_or(Class::Ipv6Truncated)?;
    if ip.version_class_flow[0] >> 4 != 6 {
        return Err(Class::Ipv6BadHeader);
    }
    let payload_len = u16::from_be_bytes(ip.payload_len) as usize;
    // Payload length 0 is a jumbogram's (its length is in an option):
    // the frame end is then the best bound we have.
    let ip_end = if payload_len == 0 {
        frame.len()
    } else {
        offset + IPV6_HLEN + payload_len
    };
    if ip_end > frame.len() {
        return Err(Class::Ipv6Truncated);
    }
    // From the frame start, as for IPv4.
    let addrs = Addrs::V6 {
        src: frame.ptr(offset + offset_of!(Ipv6Hdr, src)),
        dst: frame.ptr(offset + offset_of!(Ipv6Hdr, dst)),
    };
    let mut next = ip.next_hdr;
    let mut offset = offset + IPV6_HLEN;
    let mut first_fragment = false;
    // The walk ends at the first header that is not an extension header;
    // one exit, so the transport code is verified once.
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        let len = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext = *frame.header::<Ipv6ExtHdr>(offset).ok_or(Class::Ipv6ExtTruncated)?;
                next = ext.next_hdr;
                (ext.len as usize + 1) * 8
            }
            IPPROTO_AH => {
                let ext = *frame.header::<Ipv6ExtHdr>(offset).ok_or(Class::Ipv6ExtTruncated)?;
                next = ext.next_hdr;
                // AH counts its length in 4-octet units, minus 2.
                (ext.len as usize + 2) * 4
            }
            IPPROTO_FRAGMENT => {
                // The whole header must be in the packet before its offset
                // may call the packet a non-first fragment (which passes).
                if offset + IPV6_FRAG_HLEN > ip_end {
                    return Err(Class::Ipv6ExtTruncated);
                }
                let frag = *frame.header::<Ipv6FragHdr>(offset).ok_or(Class::Ipv6ExtTruncated)?;
                let offset_and_more = u16::from_be_bytes(frag.offset_and_more);
                if offset_and_more & 0xfff8 != 0 {
                    return Err(Class::Fragment);
                }
                // Any fragment header with more to come makes this a first
                // fragment (nested fragmentation, RFC 8200 section 4.5).
                first_fragment |= offset_and_more & 1 != 0;
                next = frag.next_hdr;
                IPV6_FRAG_HLEN
            }
            _ => break,
        };
        offset += len;
        if offset > ip_end || offset > MAX_OFFSET {
            return Err(Class::Ipv6ExtTruncated);
        }
    }
    if is_extension(next) {
        return Err(Class::Ipv6ExtTooMany);
    }
    Ok(Transport {
        proto: next,
        offset,
        ip_end,
        first_fragment,
        addrs,
    })
}

#[inline(always)]
fn is_extension(next: u8) -> bool {
    matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT
    )
}

/// The transport header: ports of UDP and TCP, judged as Linux would
/// judge the packet's length.
#[inline(always)]
fn ports(frame: Frame, t: Transport) -> Parsed {
    let (protocol, header_len) = match t.proto {
        IPPROTO_UDP => (Protocol::Udp, UDP_HLEN),
        IPPROTO_TCP => (Protocol::Tcp, TCP_HLEN),
        _ => return Err(Class::Unmatched),
    };
    // Bytes of transport header the IP packet holds (not link padding).
    let available = t.ip_end.saturating_sub(t.offset);
    if available < PORTS_LEN {
        return Err(Class::L4Truncated);
    }
    if available < header_len {
        if !t.first_fragment {
            // Linux drops a UDP or TCP packet shorter than its header.
            return Err(Class::L4Truncated);
        }
        if protocol == Protocol::Tcp {
            // RFC 1858: the rest of the TCP header (flags included)
            // arrives in a later fragment. Never let it through unjudged.
            return Err(Class::TcpTinyFragment);
        }
    }
    let ports = *frame.header::<Ports>(t.offset).ok_or(Class::L4Truncated)?;
    let (tcp, tcp_flags, nbns_response) = match protocol {
        Protocol::Tcp => {
            let tcp = frame.header::<TcpHead>(t.offset).ok_or(Class::L4Truncated)?;
            (tcp as *const TcpHead, tcp.flags, false)
        }
        Protocol::Udp => (core::ptr::null(), 0, nbns_response(frame, &t, ports)),
    };
    Ok(Packet {
        protocol,
        dst_port: u16::from_be_bytes(ports.dst),
        src_port: u16::from_be_bytes(ports.src),
        tcp_flags,
        tcp,
        nbns_response,
        addrs: t.addrs,
    })
}

/// Whether the UDP datagram at `t` (with `ports`) holds an NBNS flags
/// word with the R bit set. Too short to hold one: a query, as far as
/// detection goes.
///
/// Computed without a branch the verifier would carry on: both ways
/// through the frame check end with a byte read from the packet, and
/// the datagram's length only masks it, so every path after the parser
/// holds the same kind of value (a constant `false` on one of them would
/// double the paths it walks after it).
#[inline(always)]
fn nbns_response(frame: Frame, t: &Transport, ports: Ports) -> bool {
    let at = t.offset + NBNS_FLAGS_OFFSET;
    // A header beyond the readable part (a TC skb's unpulled tail): the
    // high byte of the destination port stands in, 0 for port 137 (the
    // only port whose rule reads the bit), so such a datagram is a query.
    let flags = match frame.bytes::<2>(at) {
        Some(flags) => flags[0],
        None => ports.dst[0],
    };
    // 1 when the IP packet holds the flags word (at + 2 <= ip_end), by
    // the sign of the difference rather than a comparison.
    let long_enough = ((at + 1).wrapping_sub(t.ip_end) >> (usize::BITS - 1)) as u8;
    (flags >> 7) & long_enough != 0
}
