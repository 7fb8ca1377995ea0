//! Bounds-checked header parsing shared by the XDP and TC programs.
//!
//! Every read goes through [`header`], which proves to the verifier that
//! the bytes lie inside `[start, end)`; nothing is read past the packet.

use core::mem::size_of;

use netwatch_common::{Class, MAX_IPV6_EXT_HEADERS, Protocol};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HLEN: usize = 4;
const MAX_VLAN_TAGS: usize = 2;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

const UDP_HLEN: usize = 8;
const TCP_HLEN: usize = 20;

/// Where the IP addresses of a parsed packet are, read only when a list
/// lookup needs them.
#[derive(Clone, Copy)]
pub enum Addrs {
    V4 { src: *const [u8; 4], dst: *const [u8; 4] },
    V6 { src: *const [u8; 16], dst: *const [u8; 16] },
}

/// A packet that carries a UDP or TCP destination port.
pub struct Packet {
    pub protocol: Protocol,
    pub dst_port: u16,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    pub addrs: Addrs,
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// Outcome of parsing: a packet with ports, or the class it counts under.
pub type Parsed = Result<Packet, Class>;

/// Returns a pointer to a `T` at `offset` if all of it lies before `end`.
#[inline(always)]
fn header<T>(start: usize, end: usize, offset: usize) -> Option<*const T> {
    let at = start + offset;
    if at + size_of::<T>() > end {
        None
    } else {
        Some(at as *const T)
    }
}

#[inline(always)]
fn read_be16(p: *const [u8; 2]) -> u16 {
    // SAFETY: the caller obtained `p` from `header`, so both bytes are in
    // the packet.
    u16::from_be_bytes(unsafe { *p })
}

#[inline(always)]
pub fn parse(start: usize, end: usize) -> Parsed {
    // Ethernet, then up to two VLAN tags (802.1Q or 802.1ad, any order).
    let mut ethertype = read_be16(header::<[u8; 2]>(start, end, 12).ok_or(Class::EthTruncated)?);
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let tag = header::<[u8; 4]>(start, end, offset).ok_or(Class::VlanTruncated)?;
        // SAFETY: `tag` is inside the packet.
        let tag = unsafe { *tag };
        ethertype = u16::from_be_bytes([tag[2], tag[3]]);
        offset += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(start, end, offset),
        ETH_P_IPV6 => parse_ipv6(start, end, offset),
        ETH_P_8021Q | ETH_P_8021AD => Err(Class::VlanTooDeep),
        _ => Err(Class::NonIp),
    }
}

#[inline(always)]
fn parse_ipv4(start: usize, end: usize, offset: usize) -> Parsed {
    let ip = header::<[u8; 20]>(start, end, offset).ok_or(Class::Ipv4Truncated)?;
    // SAFETY: the fixed header is inside the packet.
    let ip = unsafe { &*ip };
    let version = ip[0] >> 4;
    let header_len = ((ip[0] & 0x0f) as usize) * 4;
    if version != 4 || header_len < 20 {
        return Err(Class::Ipv4BadHeader);
    }
    // Options: the whole header (any IHL) must be inside the packet.
    if start + offset + header_len > end {
        return Err(Class::Ipv4Truncated);
    }
    let fragment_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    if fragment_offset != 0 {
        return Err(Class::Fragment);
    }
    let addrs = Addrs::V4 {
        src: (start + offset + 12) as *const [u8; 4],
        dst: (start + offset + 16) as *const [u8; 4],
    };
    parse_l4(start, end, offset + header_len, ip[9], addrs)
}

#[inline(always)]
fn parse_ipv6(start: usize, end: usize, offset: usize) -> Parsed {
    let ip = header::<[u8; 40]>(start, end, offset).ok_or(Class::Ipv6Truncated)?;
    // SAFETY: the fixed header is inside the packet.
    let mut next = unsafe { (*ip)[6] };
    let addrs = Addrs::V6 {
        src: (start + offset + 8) as *const [u8; 16],
        dst: (start + offset + 24) as *const [u8; 16],
    };
    let mut offset = offset + 40;
    // Bounded walk over extension headers.
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        let len = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH => {
                let ext = header::<[u8; 2]>(start, end, offset).ok_or(Class::Ipv6ExtTruncated)?;
                // SAFETY: both bytes are inside the packet.
                let ext = unsafe { *ext };
                let len = if next == IPPROTO_AH {
                    // AH counts its length in 4-octet units, minus 2.
                    (ext[1] as usize + 2) * 4
                } else {
                    (ext[1] as usize + 1) * 8
                };
                next = ext[0];
                len
            }
            IPPROTO_FRAGMENT => {
                let frag = header::<[u8; 8]>(start, end, offset).ok_or(Class::Ipv6ExtTruncated)?;
                // SAFETY: the fragment header is inside the packet.
                let frag = unsafe { *frag };
                if u16::from_be_bytes([frag[2], frag[3]]) & 0xfff8 != 0 {
                    return Err(Class::Fragment);
                }
                next = frag[0];
                8
            }
            _ => return parse_l4(start, end, offset, next, addrs),
        };
        offset += len;
        if start + offset > end {
            return Err(Class::Ipv6ExtTruncated);
        }
    }
    match next {
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT => {
            Err(Class::Ipv6ExtTooMany)
        }
        _ => parse_l4(start, end, offset, next, addrs),
    }
}

#[inline(always)]
fn parse_l4(start: usize, end: usize, offset: usize, proto: u8, addrs: Addrs) -> Parsed {
    let (protocol, min_len) = match proto {
        IPPROTO_UDP => (Protocol::Udp, UDP_HLEN),
        IPPROTO_TCP => (Protocol::Tcp, TCP_HLEN),
        _ => return Err(Class::Unmatched),
    };
    let ports = header::<[u8; 4]>(start, end, offset).ok_or(Class::L4Truncated)?;
    if start + offset + min_len > end {
        return Err(Class::L4Truncated);
    }
    // SAFETY: the ports are inside the packet.
    let ports = unsafe { *ports };
    let tcp_flags = match protocol {
        // SAFETY: the whole TCP header is inside the packet (checked above).
        Protocol::Tcp => unsafe { *((start + offset + 13) as *const u8) },
        Protocol::Udp => 0,
    };
    Ok(Packet {
        protocol,
        dst_port: u16::from_be_bytes([ports[2], ports[3]]),
        tcp_flags,
        addrs,
    })
}
