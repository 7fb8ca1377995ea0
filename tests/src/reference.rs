//! A reference classifier for netwatch's datapath, written from the
//! standards and from the contract the README states, not from the
//! datapath's code, and sharing no code with netwatch: its own view of a
//! policy, its own class names (the labels `/metrics` and `status` use), its
//! own parser.
//!
//! It works in two separate steps:
//!
//! 1. [`dissect`] walks a frame over byte slices, one header at a time,
//!    and says where the walk ended: a class (the walk could not or need
//!    not go on) or a transport header with its ports. With tracing on
//!    ([`explain`]) it also writes down each step and the rule that decided.
//! 2. [`decide`] turns that into the one counter the frame must land in and
//!    the verdict, under a [`Policy`] and a direction.
//!
//! Sources, header by header:
//! - Ethernet II (IEEE 802.3 clause 3): 6 + 6 address bytes, 2 bytes of
//!   EtherType. IEEE 802.1Q (TPID 0x8100) and 802.1ad (TPID 0x88a8) tags:
//!   2 bytes TPID (where the EtherType was), 2 bytes TCI, then the next
//!   EtherType. netwatch parses two tags.
//! - RFC 2516 PPPoE session stage (EtherType 0x8864): VER/TYPE, CODE,
//!   SESSION_ID (2), LENGTH (2), then the PPP protocol field (2 bytes;
//!   RFC 1661 numbers: 0x0021 IPv4, 0x0057 IPv6). netwatch checks none of
//!   the PPPoE fields.
//! - RFC 791 IPv4: version/IHL, Total Length (bytes 2-3), flags and
//!   fragment offset (bytes 6-7: MF is 0x2000, offset the low 13 bits),
//!   protocol (byte 9), addresses (12-15, 16-19). Bytes after Total Length
//!   are link padding.
//! - RFC 8200 IPv6: version, Payload Length (bytes 4-5), Next Header (6),
//!   addresses (8-23, 24-39). Extension headers: Hop-by-Hop (0), Routing
//!   (43), Destination Options (60) are (Hdr Ext Len + 1) * 8 bytes;
//!   Fragment (44) is 8 bytes, offset in the high 13 bits of bytes 2-3, M
//!   the low bit; RFC 4302 AH (51) is (Payload Len + 2) * 4 bytes. 59 is No
//!   Next Header. netwatch walks at most 12 extension headers, and reads a
//!   Payload Length of 0 as "up to the end of the frame".
//! - RFC 768 UDP (8 bytes) and RFC 9293 TCP (20 bytes at least): the
//!   destination port is bytes 2-3. RFC 1858: a first fragment too short to
//!   hold the whole TCP header is a tiny-fragment attack.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

// ---------------------------------------------------------------------
// Vocabulary
// ---------------------------------------------------------------------

/// What an interface's frames start with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Link {
    /// A 14-byte Ethernet header.
    Ethernet,
    /// The IP header itself (tun, ppp, WireGuard).
    Ip,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Inbound, Direction::Outbound];

    pub fn label(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// Why a frame is malformed: the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Malformed {
    EthTruncated,
    VlanTruncated,
    VlanTooDeep,
    PppoeTruncated,
    Ipv4Truncated,
    Ipv4BadHeader,
    Ipv6Truncated,
    Ipv6BadHeader,
    Ipv6ExtTruncated,
    Ipv6ExtTooMany,
    L4Truncated,
    TcpTinyFragment,
}

impl Malformed {
    pub const ALL: [Malformed; 12] = [
        Malformed::EthTruncated,
        Malformed::VlanTruncated,
        Malformed::VlanTooDeep,
        Malformed::PppoeTruncated,
        Malformed::Ipv4Truncated,
        Malformed::Ipv4BadHeader,
        Malformed::Ipv6Truncated,
        Malformed::Ipv6BadHeader,
        Malformed::Ipv6ExtTruncated,
        Malformed::Ipv6ExtTooMany,
        Malformed::L4Truncated,
        Malformed::TcpTinyFragment,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            Malformed::EthTruncated => "eth_truncated",
            Malformed::VlanTruncated => "vlan_truncated",
            Malformed::VlanTooDeep => "vlan_too_deep",
            Malformed::PppoeTruncated => "pppoe_truncated",
            Malformed::Ipv4Truncated => "ipv4_truncated",
            Malformed::Ipv4BadHeader => "ipv4_bad_header",
            Malformed::Ipv6Truncated => "ipv6_truncated",
            Malformed::Ipv6BadHeader => "ipv6_bad_header",
            Malformed::Ipv6ExtTruncated => "ipv6_ext_truncated",
            Malformed::Ipv6ExtTooMany => "ipv6_ext_too_many",
            Malformed::L4Truncated => "l4_truncated",
            Malformed::TcpTinyFragment => "tcp_tiny_fragment",
        }
    }

    /// Frames that may hide a rule port the datapath could not read: in
    /// enforce mode they are dropped whatever their addresses.
    pub fn fails_closed(self) -> bool {
        matches!(
            self,
            Malformed::VlanTooDeep
                | Malformed::Ipv4Truncated
                | Malformed::Ipv6Truncated
                | Malformed::Ipv6ExtTruncated
                | Malformed::Ipv6ExtTooMany
                | Malformed::L4Truncated
                | Malformed::TcpTinyFragment
        )
    }
}

/// Where a frame that matched no rule is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// IP on no rule port, or another transport than UDP/TCP.
    Unmatched,
    NonIp,
    /// A non-first fragment: no ports to read.
    Fragment,
    Malformed(Malformed),
}

impl Class {
    /// Every class, in a fixed order.
    pub fn all() -> Vec<Class> {
        let mut all = vec![Class::Unmatched, Class::NonIp, Class::Fragment];
        all.extend(Malformed::ALL.map(Class::Malformed));
        all
    }

    /// `unmatched`, `non_ip`, `fragment` or `malformed/<reason>`.
    pub fn label(self) -> String {
        match self {
            Class::Unmatched => "unmatched".into(),
            Class::NonIp => "non_ip".into(),
            Class::Fragment => "fragment".into(),
            Class::Malformed(m) => format!("malformed/{}", m.reason()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

// ---------------------------------------------------------------------
// Policy, as the oracle sees it
// ---------------------------------------------------------------------

/// An address prefix (`198.18.7.0/24`, `2001:db8::/48`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn contains(&self, addr: IpAddr) -> bool {
        let keep = |width: u32| -> u128 {
            if self.bits == 0 {
                0
            } else {
                u128::MAX << (width - u32::from(self.bits))
            }
        };
        match (self.net, addr) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = keep(32);
                u128::from(u32::from(n)) & mask == u128::from(u32::from(a)) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = keep(128);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, bits) = s.split_once('/').ok_or_else(|| format!("{s}: no prefix length"))?;
        let net: IpAddr = addr.parse().map_err(|e| format!("{s}: {e}"))?;
        let bits: u8 = bits.parse().map_err(|e| format!("{s}: {e}"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        if bits > max {
            return Err(format!("{s}: prefix longer than the address"));
        }
        Ok(Cidr { net, bits })
    }
}

/// A rule: a transport and destination port, and whether each direction's
/// action is `drop` (otherwise `count`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub transport: Transport,
    pub port: u16,
    pub drop_inbound: bool,
    pub drop_outbound: bool,
}

impl Rule {
    /// `udp/137`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.transport.label(), self.port)
    }

    fn drops(&self, direction: Direction) -> bool {
        match direction {
            Direction::Inbound => self.drop_inbound,
            Direction::Outbound => self.drop_outbound,
        }
    }
}

/// The policy as the oracle reads it. No auto-blocks: verdicts depend on
/// the frame alone.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Enforce mode (monitor mode never drops).
    pub enforce: bool,
    pub rules: Vec<Rule>,
    pub allowlist: Vec<Cidr>,
    pub blocklist: Vec<Cidr>,
}

// ---------------------------------------------------------------------
// Step 1: dissection
// ---------------------------------------------------------------------

/// Where the walk over a frame ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// The walk stopped, and the frame is counted in this class.
    Class(Class),
    /// A UDP or TCP header whose destination port could be read.
    Ports {
        transport: Transport,
        dst_port: u16,
        src: IpAddr,
        dst: IpAddr,
    },
}

/// A written record of the walk, for failure messages.
#[derive(Default)]
struct Trace {
    on: bool,
    steps: Vec<String>,
}

impl Trace {
    fn note(&mut self, step: impl FnOnce() -> String) {
        if self.on {
            self.steps.push(step());
        }
    }

    /// Ends the walk in `class`, saying why.
    fn stop(&mut self, class: Class, why: impl FnOnce() -> String) -> Class {
        if self.on {
            self.steps.push(format!("=> {}: {}", class.label(), why()));
        }
        class
    }
}

/// A big-endian 16-bit field of a slice known to be long enough.
fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

/// The IP layer the link layer handed over: which version its type field
/// announced, and the bytes from the IP header to the end of the frame.
enum Network<'f> {
    V4(&'f [u8]),
    V6(&'f [u8]),
}

/// What the IP layer hands to the transport layer.
struct Segment<'f> {
    protocol: u8,
    /// From the transport header to the end of the IP packet (not of the frame).
    bytes: &'f [u8],
    /// An IPv4 MF=1 offset-0 packet, or an IPv6 packet with a Fragment
    /// header whose M flag is set (and offset 0: others never get here).
    first_fragment: bool,
    src: IpAddr,
    dst: IpAddr,
}

const TPID_8021Q: u16 = 0x8100;
const TPID_8021AD: u16 = 0x88a8;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_PPPOE_SESSION: u16 = 0x8864;
const PPP_IPV4: u16 = 0x0021;
const PPP_IPV6: u16 = 0x0057;
/// VLAN tags the datapath parses.
const TAGS_PARSED: usize = 2;
/// IPv6 extension headers the datapath walks.
const EXT_WALKED: usize = 12;

fn is_tag(ethertype: u16) -> bool {
    ethertype == TPID_8021Q || ethertype == TPID_8021AD
}

/// The link layer of an Ethernet frame: addresses, up to two tags, maybe a
/// PPPoE session header.
fn ethernet<'f>(frame: &'f [u8], t: &mut Trace) -> Result<Network<'f>, Class> {
    let Some((header, mut rest)) = frame.split_at_checked(14) else {
        return Err(t.stop(Class::Malformed(Malformed::EthTruncated), || {
            format!("{} bytes, an Ethernet header is 14", frame.len())
        }));
    };
    let mut ethertype = u16_at(header, 12);
    t.note(|| format!("ethernet [0..14): type {ethertype:#06x}"));
    let mut tags = 0;
    while is_tag(ethertype) {
        let at = frame.len() - rest.len();
        if tags == TAGS_PARSED {
            return Err(t.stop(Class::Malformed(Malformed::VlanTooDeep), || {
                format!("a third tag ({ethertype:#06x}) at {at}: netwatch parses {TAGS_PARSED}")
            }));
        }
        let Some((tag, after)) = rest.split_at_checked(4) else {
            return Err(t.stop(Class::Malformed(Malformed::VlanTruncated), || {
                format!("tag at {at} needs 4 bytes, {} left", rest.len())
            }));
        };
        let tpid = ethertype;
        ethertype = u16_at(tag, 2);
        t.note(|| {
            format!(
                "tag {} (tpid {tpid:#06x}) [{at}..{}): vid {}, next type {ethertype:#06x}",
                tags + 1,
                at + 4,
                u16_at(tag, 0) & 0x0fff
            )
        });
        tags += 1;
        rest = after;
    }
    let at = frame.len() - rest.len();
    match ethertype {
        ETHERTYPE_IPV4 => Ok(Network::V4(rest)),
        ETHERTYPE_IPV6 => Ok(Network::V6(rest)),
        ETHERTYPE_PPPOE_SESSION => {
            // 6 bytes of PPPoE header, 2 of PPP protocol.
            let Some((pppoe, after)) = rest.split_at_checked(8) else {
                return Err(t.stop(Class::Malformed(Malformed::PppoeTruncated), || {
                    format!("PPPoE session at {at} needs 6 + 2 bytes, {} left", rest.len())
                }));
            };
            let ppp = u16_at(pppoe, 6);
            t.note(|| {
                format!(
                    "pppoe [{at}..{}): session {:#06x}, length {}, ppp protocol {ppp:#06x}",
                    at + 8,
                    u16_at(pppoe, 2),
                    u16_at(pppoe, 4)
                )
            });
            match ppp {
                PPP_IPV4 => Ok(Network::V4(after)),
                PPP_IPV6 => Ok(Network::V6(after)),
                other => Err(t.stop(Class::NonIp, || format!("ppp protocol {other:#06x}"))),
            }
        }
        other => Err(t.stop(Class::NonIp, || format!("ethertype {other:#06x}"))),
    }
}

/// The start of a frame on an IP link: the version nibble decides.
fn ip_link<'f>(frame: &'f [u8], t: &mut Trace) -> Result<Network<'f>, Class> {
    if frame.len() < 2 {
        return Err(t.stop(Class::NonIp, || format!("{} bytes on an IP link", frame.len())));
    }
    match frame[0] >> 4 {
        4 => Ok(Network::V4(frame)),
        6 => Ok(Network::V6(frame)),
        v => Err(t.stop(Class::NonIp, || format!("IP link, version nibble {v}"))),
    }
}

/// RFC 791. `bytes` runs from the IPv4 header to the end of the frame.
fn ipv4<'f>(bytes: &'f [u8], base: usize, t: &mut Trace) -> Result<Segment<'f>, Class> {
    if bytes.len() < 20 {
        return Err(t.stop(Class::Malformed(Malformed::Ipv4Truncated), || {
            format!("ipv4 at {base}: {} bytes, the fixed header is 20", bytes.len())
        }));
    }
    let version = bytes[0] >> 4;
    let header_len = usize::from(bytes[0] & 0x0f) * 4;
    let total_len = usize::from(u16_at(bytes, 2));
    t.note(|| {
        format!(
            "ipv4 at {base}: version {version}, header {header_len} bytes, total length {total_len}, {} bytes to the frame end",
            bytes.len()
        )
    });
    if version != 4 || header_len < 20 || total_len < header_len {
        return Err(t.stop(Class::Malformed(Malformed::Ipv4BadHeader), || {
            "version != 4, IHL < 5 or total length < header length".into()
        }));
    }
    let Some(packet) = bytes.get(..total_len) else {
        return Err(t.stop(Class::Malformed(Malformed::Ipv4Truncated), || {
            format!("total length {total_len} runs past the frame ({} bytes)", bytes.len())
        }));
    };
    if packet.len() < bytes.len() {
        t.note(|| {
            format!(
                "{} bytes of link padding after the packet, ignored",
                bytes.len() - packet.len()
            )
        });
    }
    let flags_offset = u16_at(packet, 6);
    let offset = flags_offset & 0x1fff;
    let more = flags_offset & 0x2000 != 0;
    if offset != 0 {
        return Err(t.stop(Class::Fragment, || format!("fragment offset {offset} (x8 bytes)")));
    }
    if more {
        t.note(|| "MF set, offset 0: a first fragment".into());
    }
    let addr = |at: usize| {
        IpAddr::V4(Ipv4Addr::new(
            packet[at],
            packet[at + 1],
            packet[at + 2],
            packet[at + 3],
        ))
    };
    Ok(Segment {
        protocol: packet[9],
        bytes: &packet[header_len..],
        first_fragment: more,
        src: addr(12),
        dst: addr(16),
    })
}

/// RFC 8200 (and RFC 4302 for AH's length). `bytes` runs from the IPv6
/// header to the end of the frame.
fn ipv6<'f>(bytes: &'f [u8], base: usize, t: &mut Trace) -> Result<Segment<'f>, Class> {
    if bytes.len() < 40 {
        return Err(t.stop(Class::Malformed(Malformed::Ipv6Truncated), || {
            format!("ipv6 at {base}: {} bytes, the fixed header is 40", bytes.len())
        }));
    }
    let version = bytes[0] >> 4;
    if version != 6 {
        return Err(t.stop(Class::Malformed(Malformed::Ipv6BadHeader), || {
            format!("ipv6 at {base}: version {version}")
        }));
    }
    let payload_len = usize::from(u16_at(bytes, 4));
    let end = if payload_len == 0 {
        bytes.len()
    } else {
        40 + payload_len
    };
    t.note(|| {
        format!(
            "ipv6 at {base}: payload length {payload_len}, so the packet ends {end} bytes in; {} bytes to the frame end",
            bytes.len()
        )
    });
    let Some(packet) = bytes.get(..end) else {
        return Err(t.stop(Class::Malformed(Malformed::Ipv6Truncated), || {
            "the payload runs past the frame".into()
        }));
    };
    let addr = |at: usize| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&packet[at..at + 16]).unwrap()));
    let (src, dst) = (addr(8), addr(24));

    let mut next = packet[6];
    let mut at = 40;
    let mut first_fragment = false;
    for walked in 0..=EXT_WALKED {
        let fixed_part = match next {
            0 | 43 | 60 | 51 => 2,
            44 => 4,
            _ => break,
        };
        if walked == EXT_WALKED {
            return Err(t.stop(Class::Malformed(Malformed::Ipv6ExtTooMany), || {
                format!("a 13th extension header ({next}) after {EXT_WALKED}")
            }));
        }
        // The fields that give the length must be in the frame...
        if at + fixed_part > bytes.len() {
            return Err(t.stop(Class::Malformed(Malformed::Ipv6ExtTruncated), || {
                format!("header {next} at +{at}: its first {fixed_part} bytes are past the frame")
            }));
        }
        let len = match next {
            44 => 8,
            51 => (usize::from(bytes[at + 1]) + 2) * 4,
            _ => (usize::from(bytes[at + 1]) + 1) * 8,
        };
        // ... and the whole header in the packet.
        if at + len > packet.len() {
            return Err(t.stop(Class::Malformed(Malformed::Ipv6ExtTruncated), || {
                format!(
                    "header {next} at +{at} is {len} bytes, past the packet end at +{}",
                    packet.len()
                )
            }));
        }
        let kind = next;
        next = packet[at];
        if kind == 44 {
            let field = u16_at(packet, at + 2);
            let offset = field >> 3;
            let more = field & 1 != 0;
            t.note(|| format!("  fragment header at +{at}: offset {offset}, M {more}, next {next}"));
            if offset != 0 {
                return Err(t.stop(Class::Fragment, || format!("fragment offset {offset} (x8 bytes)")));
            }
            first_fragment |= more;
        } else {
            t.note(|| format!("  extension {kind} at +{at}: {len} bytes, next {next}"));
        }
        at += len;
    }
    Ok(Segment {
        protocol: next,
        bytes: &packet[at..],
        first_fragment,
        src,
        dst,
    })
}

/// RFC 768, RFC 9293, RFC 1858.
fn transport(segment: &Segment, t: &mut Trace) -> Result<Found, Class> {
    let (kind, header) = match segment.protocol {
        17 => (Transport::Udp, 8),
        6 => (Transport::Tcp, 20),
        other => return Err(t.stop(Class::Unmatched, || format!("protocol {other} is neither UDP nor TCP"))),
    };
    let available = segment.bytes.len();
    t.note(|| {
        format!(
            "{}: {available} bytes to the end of the IP packet{}",
            kind.label(),
            if segment.first_fragment { ", first fragment" } else { "" }
        )
    });
    if available < 4 {
        return Err(t.stop(Class::Malformed(Malformed::L4Truncated), || {
            "fewer than 4 bytes: no destination port".into()
        }));
    }
    if segment.first_fragment {
        if kind == Transport::Tcp && available < 20 {
            return Err(t.stop(Class::Malformed(Malformed::TcpTinyFragment), || {
                "a TCP first fragment without the whole 20-byte header (RFC 1858)".into()
            }));
        }
    } else if available < header {
        return Err(t.stop(Class::Malformed(Malformed::L4Truncated), || {
            format!("an unfragmented {} header needs {header} bytes", kind.label())
        }));
    }
    let dst_port = u16_at(segment.bytes, 2);
    t.note(|| format!("destination port {dst_port}"));
    Ok(Found::Ports {
        transport: kind,
        dst_port,
        src: segment.src,
        dst: segment.dst,
    })
}

fn walk(link: Link, frame: &[u8], t: &mut Trace) -> Found {
    let result = (|| {
        let network = match link {
            Link::Ethernet => ethernet(frame, t)?,
            Link::Ip => ip_link(frame, t)?,
        };
        let segment = match network {
            Network::V4(bytes) => ipv4(bytes, frame.len() - bytes.len(), t)?,
            Network::V6(bytes) => ipv6(bytes, frame.len() - bytes.len(), t)?,
        };
        transport(&segment, t)
    })();
    result.unwrap_or_else(Found::Class)
}

/// Where the walk over `frame` ends.
pub fn dissect(link: Link, frame: &[u8]) -> Found {
    walk(link, frame, &mut Trace::default())
}

// ---------------------------------------------------------------------
// Step 2: the decision
// ---------------------------------------------------------------------

/// The counter a frame lands in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Counted {
    /// A rule's counter (index into [`Policy::rules`]) with its outcome.
    Rule {
        rule: usize,
        dropped: bool,
    },
    Class(Class),
}

/// What the datapath must do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Expected {
    pub direction: Direction,
    pub counted: Counted,
    /// The verdict.
    pub drop: bool,
}

impl Expected {
    /// The counter's labels, as `status` and `/metrics` name them:
    /// `inbound udp/137 dropped`, `outbound unmatched`,
    /// `inbound malformed/l4_truncated`.
    pub fn label(&self, policy: &Policy) -> String {
        counter_label(policy, self.direction, self.counted)
    }
}

pub fn counter_label(policy: &Policy, direction: Direction, counted: Counted) -> String {
    match counted {
        Counted::Rule { rule, dropped } => format!(
            "{} {} {}",
            direction.label(),
            policy.rules[rule].name(),
            if dropped { "dropped" } else { "passed" }
        ),
        Counted::Class(class) => format!("{} {}", direction.label(), class.label()),
    }
}

fn listed(list: &[Cidr], addr: IpAddr) -> bool {
    list.iter().any(|c| c.contains(addr))
}

/// The counter and verdict for what the walk found.
pub fn decide(policy: &Policy, direction: Direction, found: Found) -> Expected {
    let (counted, drop) = match found {
        Found::Class(class) => {
            let fail_closed = matches!(class, Class::Malformed(m) if m.fails_closed());
            (Counted::Class(class), policy.enforce && fail_closed)
        }
        Found::Ports {
            transport,
            dst_port,
            src,
            dst,
        } => match policy
            .rules
            .iter()
            .position(|r| r.transport == transport && r.port == dst_port)
        {
            None => (Counted::Class(Class::Unmatched), false),
            Some(rule) => {
                let wanted = policy.rules[rule].drops(direction) || listed(&policy.blocklist, src);
                let spared = listed(&policy.allowlist, src) || listed(&policy.allowlist, dst);
                let dropped = policy.enforce && wanted && !spared;
                (Counted::Rule { rule, dropped }, dropped)
            }
        },
    };
    Expected {
        direction,
        counted,
        drop,
    }
}

/// The counter and verdict for `frame`, seen in `direction` on a `link`.
pub fn classify(policy: &Policy, link: Link, direction: Direction, frame: &[u8]) -> Expected {
    decide(policy, direction, dissect(link, frame))
}

/// The reference's reasoning about `frame`, step by step, and its conclusion.
pub fn explain(policy: &Policy, link: Link, direction: Direction, frame: &[u8]) -> String {
    let mut t = Trace {
        on: true,
        steps: Vec::new(),
    };
    let found = walk(link, frame, &mut t);
    let expected = decide(policy, direction, found);
    let mut out = format!("reference ({link:?} link, {} bytes):\n", frame.len());
    for step in &t.steps {
        out.push_str("  ");
        out.push_str(step);
        out.push('\n');
    }
    if let Found::Ports { src, dst, .. } = found {
        out.push_str(&format!(
            "  {src} -> {dst}: allowlisted {}, source blocklisted {}\n",
            listed(&policy.allowlist, src) || listed(&policy.allowlist, dst),
            listed(&policy.blocklist, src)
        ));
    }
    out.push_str(&format!(
        "  counted as `{}`, {} ({} mode)",
        expected.label(policy),
        if expected.drop { "DROPPED" } else { "passed" },
        if policy.enforce { "enforce" } else { "monitor" }
    ));
    out
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Class(c) => write!(f, "{}", c.label()),
            Found::Ports {
                transport, dst_port, ..
            } => write!(f, "{}/{}", transport.label(), dst_port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            enforce: true,
            rules: vec![Rule {
                transport: Transport::Udp,
                port: 137,
                drop_inbound: true,
                drop_outbound: false,
            }],
            allowlist: vec!["198.18.7.0/24".parse().unwrap()],
            blocklist: vec!["198.18.9.0/24".parse().unwrap()],
        }
    }

    /// An IPv4 UDP packet from 198.18.a.1 to 198.18.0.2, port 137.
    fn udp4(a: u8) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 28, 0, 1, 0, 0, 64, 17, 0, 0, 198, 18, a, 1, 198, 18, 0, 2];
        p.extend_from_slice(&[0, 53, 0, 137, 0, 8, 0, 0]);
        p
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "2001:db8:7::/48".parse().unwrap();
        assert!(c.contains("2001:db8:7:1::5".parse().unwrap()));
        assert!(!c.contains("2001:db8:8::5".parse().unwrap()));
        assert!(!c.contains("198.18.7.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    }

    #[test]
    fn rules_lists_and_modes() {
        let p = policy();
        let rule = |dropped| Counted::Rule { rule: 0, dropped };
        let run = |p: &Policy, d, a| classify(p, Link::Ip, d, &udp4(a));
        assert_eq!(run(&p, Direction::Inbound, 0).counted, rule(true));
        assert_eq!(run(&p, Direction::Outbound, 0).counted, rule(false));
        assert_eq!(run(&p, Direction::Outbound, 9).counted, rule(true));
        assert_eq!(run(&p, Direction::Inbound, 7).counted, rule(false));
        let monitor = Policy { enforce: false, ..p };
        assert!(!run(&monitor, Direction::Inbound, 9).drop);
    }

    #[test]
    fn padding_and_truncation() {
        let p = policy();
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x81, 0, 0, 10, 0x08, 0];
        f.extend(udp4(0));
        f.extend([0xee; 12]);
        assert!(classify(&p, Link::Ethernet, Direction::Inbound, &f).drop);
        f.truncate(18 + 27);
        let e = classify(&p, Link::Ethernet, Direction::Inbound, &f);
        assert_eq!(e.counted, Counted::Class(Class::Malformed(Malformed::Ipv4Truncated)));
        assert!(e.drop);
    }

    #[test]
    fn ipv6_chains() {
        let p = policy();
        let chain = |headers: &[(u8, Vec<u8>)], last: u8, l4: &[u8]| {
            let mut body = Vec::new();
            for (i, (_, h)) in headers.iter().enumerate() {
                let mut h = h.clone();
                h[0] = headers.get(i + 1).map(|n| n.0).unwrap_or(last);
                body.extend(h);
            }
            body.extend_from_slice(l4);
            let mut pkt = vec![0x60, 0, 0, 0];
            pkt.extend((body.len() as u16).to_be_bytes());
            pkt.push(headers.first().map(|h| h.0).unwrap_or(last));
            pkt.push(64);
            pkt.extend([0u8; 32]);
            pkt.extend(body);
            classify(&p, Link::Ip, Direction::Outbound, &pkt).counted
        };
        let udp = [0, 1, 0, 137, 0, 8, 0, 0];
        let hbh = (0u8, vec![0, 0, 1, 4, 0, 0, 0, 0]);
        let ah = (51u8, vec![0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]);
        let first = (44u8, vec![0, 0, 0, 1, 0, 0, 0, 7]);
        let later = (44u8, vec![0, 0, 0, 8, 0, 0, 0, 7]);
        let rule = Counted::Rule {
            rule: 0,
            dropped: false,
        };
        assert_eq!(chain(&[hbh.clone(), ah.clone()], 17, &udp), rule);
        assert_eq!(chain(&vec![hbh.clone(); 12], 17, &udp), rule);
        assert_eq!(
            chain(&vec![hbh.clone(); 13], 17, &udp),
            Counted::Class(Class::Malformed(Malformed::Ipv6ExtTooMany))
        );
        assert_eq!(chain(&[later], 17, &udp), Counted::Class(Class::Fragment));
        assert_eq!(chain(std::slice::from_ref(&first), 17, &udp[..4]), rule);
        assert_eq!(
            chain(std::slice::from_ref(&first), 6, &udp),
            Counted::Class(Class::Malformed(Malformed::TcpTinyFragment))
        );
        // A first fragment (M set) stays one whatever Fragment header
        // follows inside it: the rest of its transport header may be in
        // the next fragment.
        let atomic = (44u8, vec![0, 0, 0, 0, 0, 0, 0, 7]);
        assert_eq!(chain(&[first.clone(), atomic.clone()], 17, &udp[..4]), rule);
        assert_eq!(
            chain(&[first, atomic], 6, &udp),
            Counted::Class(Class::Malformed(Malformed::TcpTinyFragment))
        );
        assert_eq!(chain(&[ah], 59, &[]), Counted::Class(Class::Unmatched));
        assert_eq!(
            chain(&[], 17, &udp[..6]),
            Counted::Class(Class::Malformed(Malformed::L4Truncated))
        );
        // A Fragment header cut short is cut short, whatever offset its
        // first bytes announce: only 6 of its 8 bytes are in the packet.
        let mut pkt = vec![0x60, 0, 0, 0, 0, 6, 44, 64];
        pkt.extend([0u8; 32]);
        pkt.extend([17, 0, 0, 8, 0, 0]);
        assert_eq!(
            classify(&p, Link::Ip, Direction::Inbound, &pkt),
            Expected {
                direction: Direction::Inbound,
                counted: Counted::Class(Class::Malformed(Malformed::Ipv6ExtTruncated)),
                drop: true,
            }
        );
    }
}
