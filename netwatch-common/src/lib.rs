//! Types shared by the netwatch datapath (eBPF) and the controller.
//!
//! Every type that crosses the kernel/user boundary lives here, is
//! `#[repr(C)]` and has no implicit padding, so both sides agree on the
//! layout byte for byte. Every encoding those types store as an integer
//! (direction, outcome, protocol, action, role, mode, link kind,
//! classification) is one enum here, with num_enum's conversions and one
//! label per variant, used by the kernel and the controller alike. The
//! `user` feature adds `aya::Pod` impls and serde/clap derives.
#![no_std]
#[cfg(feature = "user")]
extern crate std;

use num_enum::{FromPrimitive, IntoPrimitive, TryFromPrimitive};

/// Interface slots: counters are indexed by a small stable slot number
/// rather than the kernel ifindex, which is unbounded.
pub const MAX_IFACES: u32 = 32;
/// Rule slots. Rule ids are stable across reloads (see the controller's
/// rule table), so a counter always belongs to the same (protocol, port).
pub const MAX_RULES: u32 = 64;
/// Entries of the allow and block lists (per address family).
pub const MAX_CIDRS: u32 = 16_384;
/// IPv6 extension headers walked. Linux delivers chains of any length, so
/// a chain longer than this cannot be judged: it is counted as
/// `ipv6_ext_too_many` and, being possibly TCP or UDP, dropped in enforce
/// mode (see [`Class::fails_closed`]).
pub const MAX_IPV6_EXT_HEADERS: u32 = 12;

/// Gives an encoding its variants in discriminant order (`ALL`), the
/// label the controller shows for each (metrics, JSON, configuration,
/// the incident store) and the way back from a label: one list of
/// `Variant => "label"` pairs per encoding.
macro_rules! labels {
    ($ty:ident { $($variant:ident => $label:literal),+ $(,)? }) => {
        impl $ty {
            /// Every variant, in discriminant order.
            pub const ALL: [$ty; [$($label),+].len()] = [$($ty::$variant),+];

            /// The name shown for this variant.
            pub const fn label(self) -> &'static str {
                match self {
                    $($ty::$variant => $label,)+
                }
            }

            /// The variant whose label is `label`.
            pub fn from_label(label: &str) -> Option<$ty> {
                match label {
                    $($label => Some($ty::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

// Each encoding the kernel and the controller share is one enum below.
// The `#[repr(C)]` structs further down keep plain integers (so their
// layout and the pinned maps stay byte for byte as they are) and convert
// through the derived `From`/`TryFrom` of these enums, never by hand.
// An enum whose raw value is read back from a map or a load-time
// constant converts infallibly: a value it does not know (a newer
// writer, a corrupt pin) gives its `#[default]` variant (also its
// `Default`), the answer netwatch always gave for it. The others only
// ever go enum -> integer; their `TryFrom` refuses unknown values.

/// How frames on an interface start, from the device's link type. The
/// controller sets it per attachment (the load-time constant
/// `LINK_KIND`, a u32), so the verifier keeps only the parser the
/// interface needs. Unknown values read as `Ethernet`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, IntoPrimitive, FromPrimitive)]
pub enum LinkKind {
    /// An Ethernet header (with VLAN tags or PPPoE behind it): Ethernet,
    /// veth, bridges, bonds, VLAN devices, gretap/vxlan, loopback.
    #[default]
    Ethernet = 0,
    /// The IP header itself: tun, PPP, WireGuard, ipip/sit/gre/ip6tnl.
    Ip = 1,
}
labels!(LinkKind { Ethernet => "ethernet", Ip => "ip" });

/// Direction of a packet relative to the protected side: the load-time
/// constant `DIRECTION` and [`SourceKey::direction`] (a u8 each).
/// Unknown values read as `Outbound`, as the controller always showed
/// them.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, IntoPrimitive, FromPrimitive)]
pub enum Direction {
    Inbound = 0,
    #[default]
    Outbound = 1,
}
pub const DIRECTIONS: u32 = Direction::ALL.len() as u32;
labels!(Direction { Inbound => "inbound", Outbound => "outbound" });

impl Direction {
    /// The direction's part of a counter index.
    #[inline(always)]
    pub fn index(self) -> u32 {
        u8::from(self).into()
    }
}

/// What happened to a packet that matched a rule: part of the
/// `RULE_COUNTERS` index, never stored.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, IntoPrimitive, TryFromPrimitive)]
pub enum Outcome {
    Passed = 0,
    Dropped = 1,
}
pub const OUTCOMES: u32 = Outcome::ALL.len() as u32;
labels!(Outcome { Passed => "passed", Dropped => "dropped" });

/// Layer-4 protocols a rule can name: [`RuleInfo::protocol`] (a u8), and
/// the index of the protocol's half of the [`PortRule`] table. Unknown
/// values read as `Udp`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, IntoPrimitive, FromPrimitive)]
pub enum Protocol {
    #[default]
    Udp = 0,
    Tcp = 1,
}
labels!(Protocol { Udp => "udp", Tcp => "tcp" });

/// What a rule does with a packet in one direction: [`PortRule::action`]
/// (a u8 per direction). Unknown values read as `Count`: only `Drop`
/// ever drops.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, IntoPrimitive, FromPrimitive)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "user", serde(rename_all = "lowercase"))]
pub enum Action {
    #[default]
    Count = 0,
    Drop = 1,
}
labels!(Action { Count => "count", Drop => "drop" });

/// Where an interface sits; decides the direction XDP sees on it.
/// [`IfaceInfo::role`] (a u32); unknown values read as `Wan`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, IntoPrimitive, FromPrimitive)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "user", serde(rename_all = "lowercase"))]
pub enum Role {
    /// Router uplink: XDP sees inbound traffic.
    #[default]
    Wan = 0,
    /// Router LAN side: XDP sees traffic from inside on its way out,
    /// with internal (pre-NAT) addresses.
    Lan = 1,
    /// A host's own interface: XDP sees inbound traffic.
    Host = 2,
}
labels!(Role { Wan => "wan", Lan => "lan", Host => "host" });

impl Role {
    /// Direction of the traffic XDP sees on an interface of this role.
    pub const fn xdp_direction(self) -> Direction {
        match self {
            Role::Lan => Direction::Outbound,
            Role::Wan | Role::Host => Direction::Inbound,
        }
    }
}

/// Whether a policy drops: [`PolicySettings::mode`] (a u32). Unknown
/// values read as `Monitor`: only `Enforce` ever drops.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, IntoPrimitive, FromPrimitive)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize, clap::ValueEnum))]
#[cfg_attr(feature = "user", serde(rename_all = "lowercase"))]
pub enum Mode {
    /// Count only; never drop.
    #[default]
    Monitor = 0,
    /// Apply drop actions and the blocklist.
    Enforce = 1,
}
labels!(Mode { Monitor => "monitor", Enforce => "enforce" });

/// What a tracked source's traffic is: [`SourceKey::classification`]
/// (a u8), and what its incidents say. Unknown values read as `Scan`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, IntoPrimitive, FromPrimitive)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
#[cfg_attr(feature = "user", serde(rename_all = "kebab-case"))]
pub enum Classification {
    /// One-to-many probes: a worm or a scanner. Only these are flagged
    /// and auto-blocked.
    #[default]
    Scan = 0,
    /// udp/137 towards hosts that just visited a web port (IIS), tracked
    /// apart and never flagged.
    ReverseLookup = 1,
}
labels!(Classification { Scan => "scan", ReverseLookup => "reverse-lookup" });

/// Index into the `PORT_RULES` array: one entry per (protocol, port).
#[inline(always)]
pub fn port_rule_index(protocol: Protocol, port: u16) -> u32 {
    (u32::from(u8::from(protocol)) << 16) | u32::from(port)
}
pub const PORT_RULE_ENTRIES: u32 = 2 << 16;

/// One version of the hot-path view of a (protocol, port). `id == 0`
/// means "no rule"; a rule with slot `n` is stored as `n + 1`, so the
/// zero-initialised array means "no rules" without any set-up. `flags`
/// marks web ports (whose TCP handshakes record visitors) even where no
/// rule is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRule {
    pub id: u16,
    /// The [`Action`] for inbound and outbound packets (see
    /// [`PortRule::action`]).
    pub action: [u8; 2],
    /// `PORT_*` bits.
    pub flags: u32,
    /// Distinct destinations within the window that flag a source. Up
    /// to [`SKETCH_LIST_LEN`] this is an exact count; above, it is
    /// compared with the bits set in the sketch's bitmap (`flag_bits`).
    pub threshold: u32,
    /// Bitmap bits set that correspond to `threshold` (see
    /// [`bitmap_bits_for`]).
    pub flag_bits: u32,
    pub window_secs: u32,
    /// Auto-block duration once flagged (0 = auto-block off).
    pub block_secs: u32,
}

/// A TCP handshake with this port, answered by a SYN-ACK seen leaving and
/// completed by the visitor's ACK seen arriving, records the visitor.
pub const PORT_WEB: u32 = 1;
/// The port carries NetBIOS name service (udp/137): a query towards a
/// recent web visitor is a reverse lookup, and a datagram with the NBNS
/// response bit set (RFC 1002 section 4.2.1.1) a name server answering;
/// neither is a probe.
pub const PORT_NBNS: u32 = 2;
/// First contacts of a probing source are recorded in `CONTACTS`, and
/// answers from the probed address and port noted (reply-aware flagging,
/// judged by the controller).
pub const PORT_CONTACTS: u32 = 8;

impl PortRule {
    #[inline(always)]
    pub const fn slot(&self) -> u32 {
        self.id as u32 - 1
    }

    /// Neither a rule nor a web port.
    #[inline(always)]
    pub const fn is_empty(&self) -> bool {
        self.id == 0 && self.flags == 0
    }

    /// The rule's action for packets going `dir`.
    #[inline(always)]
    pub fn action(&self, dir: Direction) -> Action {
        // A branch, not `action[dir]`: the index would be compiled to
        // pointer arithmetic on the stack that the verifier rejects.
        Action::from(if dir == Direction::Inbound {
            self.action[0]
        } else {
            self.action[1]
        })
    }
}

/// The stored form of a rule's actions (`PortRule::action`,
/// `RuleInfo::action`).
#[inline(always)]
pub fn actions(inbound: Action, outbound: Action) -> [u8; 2] {
    [inbound.into(), outbound.into()]
}

/// The value of `PORT_RULES[port_rule_index]`: the rule of the (protocol,
/// port) in each policy version. The datapath reads the version
/// `Settings::active` names, so a reload writes the other version whole
/// and switches with one write (see [`Settings`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRules {
    pub versions: [PortRule; POLICY_VERSIONS],
}

/// Policy versions: the one in force and the one a reload builds.
pub const POLICY_VERSIONS: usize = 2;

/// Describes a rule slot, for the controller and `status` (never read by
/// the datapath). `in_use` has bit `v` set when policy version `v` holds
/// the rule; 0 marks a free slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleInfo {
    pub in_use: u8,
    /// A [`Protocol`].
    pub protocol: u8,
    pub port: u16,
    /// As [`PortRule::action`].
    pub action: [u8; 2],
    pub _pad: [u8; 2],
}

impl RuleInfo {
    /// The slot's rule's protocol.
    pub fn protocol(&self) -> Protocol {
        self.protocol.into()
    }

    /// Where the slot's rule sits in `PORT_RULES`.
    pub fn port_rule_index(&self) -> u32 {
        port_rule_index(self.protocol(), self.port)
    }
}

/// Describes an interface slot, for the controller and `status`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceInfo {
    pub in_use: u8,
    /// Bit 0: XDP attached; bit 1: TC egress attached; bit 2: TC egress
    /// is a netlink (clsact) filter rather than a TCX link.
    pub attached: u8,
    pub xdp_generic: u8,
    /// The hooks the running controller's configuration asks for on this
    /// interface ([`ATTACHED_XDP`], [`ATTACHED_TC`]); 0 for an interface
    /// that is no longer configured (its counters are kept, its series
    /// are not exported).
    pub configured: u8,
    /// A [`Role`].
    pub role: u32,
    pub ifindex: u32,
    pub name: [u8; 16],
}

impl IfaceInfo {
    pub fn role(&self) -> Role {
        self.role.into()
    }
}
pub const ATTACHED_XDP: u8 = 1;
pub const ATTACHED_TC: u8 = 2;
pub const ATTACHED_TC_NETLINK: u8 = 4;

/// The settings of one policy version.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicySettings {
    /// A [`Mode`] (see [`PolicySettings::mode`]).
    pub mode: u32,
    /// Non-zero when the corresponding list may have entries in this
    /// version, so that the datapath can skip LPM lookups when it is empty.
    pub allowlist_active: u32,
    pub blocklist_active: u32,
    /// How long a web visitor is remembered for reverse-lookup matching.
    pub visitor_secs: u32,
    /// The web ports in force (0 = unused), so the controller can clear
    /// them on reload; the datapath reads `PORT_WEB` in `PORT_RULES`.
    pub web_ports: [u16; MAX_WEB_PORTS],
}

impl PolicySettings {
    #[inline(always)]
    pub fn mode(&self) -> Mode {
        self.mode.into()
    }
}

/// Runtime settings the datapath reads on matched traffic.
///
/// A policy is double-buffered: rules (`PortRules::versions`), list
/// answers (`ListEntry::until`) and these settings exist once per version,
/// and `active` says which version is in force. A reload writes the other
/// version completely, then switches `active` with one write, so the
/// datapath sees the old policy or the new one, never a mix, and a crash
/// at any point leaves one of them in force.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// The version in force (bit 0: 0 or 1) and, above it, a generation
    /// that every switch advances, so that the datapath's memo of a
    /// verdict (see [`MemoTag::policy`]) never outlives the policy it was
    /// made under, even across two switches back to the same version.
    pub active: u32,
    pub _pad: u32,
    pub versions: [PolicySettings; POLICY_VERSIONS],
    /// Secret key of the destination hash (see [`dst_hash_v6`]), drawn
    /// once when the pin directory is made and kept for its lifetime, so
    /// that sketches stay valid across restarts and nobody outside can
    /// choose destinations that collide.
    pub hash_key: [u64; HASH_KEY_WORDS],
}

impl Settings {
    /// The version in force, read once: everything one packet looks at
    /// must come from the same version, even if a reload switches meanwhile.
    #[inline(always)]
    pub fn active_version(&self) -> u32 {
        // SAFETY: a plain aligned read of a field we hold a reference to;
        // volatile so the compiler neither repeats nor elides it.
        unsafe { core::ptr::read_volatile(&self.active) & 1 }
    }

    /// `active` as it is, version and generation: what a memo is tagged with.
    #[inline(always)]
    pub fn active_word(&self) -> u32 {
        // SAFETY: as in `active_version`.
        unsafe { core::ptr::read_volatile(&self.active) }
    }

    /// Puts `version` in force, advancing the generation.
    pub fn switch_to(&mut self, version: u32) {
        self.active = ((self.active >> 1).wrapping_add(1) << 1) | (version & 1);
    }

    /// The settings of `version`.
    #[inline(always)]
    pub fn policy(&self, version: u32) -> &PolicySettings {
        // SAFETY: `version & 1` < POLICY_VERSIONS. An index rather than a
        // branch: the datapath then carries one pointer (with a variable
        // offset the verifier bounds), not two states for two versions.
        unsafe { &*self.versions.as_ptr().add((version & 1) as usize) }
    }
}

impl PortRules {
    /// The rule of `version` (see [`Settings::policy`] for the index).
    #[inline(always)]
    pub fn version(&self, version: u32) -> &PortRule {
        // SAFETY: `version & 1` < POLICY_VERSIONS.
        unsafe { &*self.versions.as_ptr().add((version & 1) as usize) }
    }
}

pub const MAX_WEB_PORTS: usize = 8;
pub const HASH_KEY_WORDS: usize = 5;

/// Hash of an IPv4 destination for the distinct-destination sketch: a
/// keyed bijection (Murmur3's finaliser of the address XOR the key), so
/// two IPv4 destinations never collide.
#[inline(always)]
pub fn dst_hash_v4(addr: u32, key: &[u64; HASH_KEY_WORDS]) -> u32 {
    let mut x = addr ^ key[0] as u32;
    x ^= x >> 16;
    x = x.wrapping_mul(0x85eb_ca6b);
    x ^= x >> 13;
    x = x.wrapping_mul(0xc2b2_ae35);
    x ^ (x >> 16)
}

/// Hash of an IPv6 destination over all 128 bits: multilinear hashing
/// (Lemire and Kaser, "Strongly universal string hashing is fast", 2014),
/// `k0 + k1 w0 + k2 w1 + k3 w2 + k4 w3 mod 2^64` with a secret key, so any
/// two addresses collide with probability about 2^-32 however they are
/// structured (`2001:db8:0:k::k`, sequential /64s, ...), then Murmur3's
/// 64-bit finaliser: a sweep is an arithmetic progression under the sum,
/// and the sketch's linear counting needs bits that look random, not
/// evenly spaced.
#[inline(always)]
pub fn dst_hash_v6(words: [u32; 4], key: &[u64; HASH_KEY_WORDS]) -> u32 {
    let mut x = key[0]
        .wrapping_add(key[1].wrapping_mul(words[0] as u64))
        .wrapping_add(key[2].wrapping_mul(words[1] as u64))
        .wrapping_add(key[3].wrapping_mul(words[2] as u64))
        .wrapping_add(key[4].wrapping_mul(words[3] as u64));
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    (x >> 32) as u32
}

/// Packet and byte counter. Per-CPU, summed by the controller.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Index into the `RULE_COUNTERS` per-CPU array.
#[inline(always)]
pub fn rule_counter_index(iface: u32, dir: Direction, rule: u32, outcome: Outcome) -> u32 {
    ((iface * DIRECTIONS + dir.index()) * MAX_RULES + rule) * OUTCOMES + u32::from(outcome)
}
pub const RULE_COUNTER_ENTRIES: u32 = MAX_IFACES * DIRECTIONS * MAX_RULES * OUTCOMES;

/// Classes of traffic that did not match a rule. Every frame the datapath
/// sees lands in exactly one class or in exactly one rule counter.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, IntoPrimitive, TryFromPrimitive)]
pub enum Class {
    /// IPv4/IPv6 traffic on no rule port (including other protocols).
    Unmatched = 0,
    /// Not IPv4/IPv6 (ARP, LLDP, ...).
    NonIp = 1,
    /// Non-first IPv4/IPv6 fragment: carries no ports.
    Fragment = 2,
    /// Frame shorter than an Ethernet header.
    EthTruncated = 3,
    /// VLAN tag cut short.
    VlanTruncated = 4,
    /// More than two VLAN tags.
    VlanTooDeep = 5,
    /// IPv4 header cut short, including options.
    Ipv4Truncated = 6,
    /// IPv4 header with version != 4 or IHL < 5.
    Ipv4BadHeader = 7,
    /// IPv6 fixed header cut short.
    Ipv6Truncated = 8,
    /// IPv6 extension header cut short.
    Ipv6ExtTruncated = 9,
    /// More IPv6 extension headers than the datapath walks.
    Ipv6ExtTooMany = 10,
    /// UDP or TCP header cut short (fewer than 4 bytes in a first
    /// fragment; less than the whole header in an unfragmented packet).
    L4Truncated = 11,
    /// A TCP first fragment too short to hold the whole TCP header
    /// (RFC 1858's tiny-fragment attack).
    TcpTinyFragment = 12,
    /// PPPoE session header or PPP protocol field cut short.
    PppoeTruncated = 13,
    /// IPv6 header with version != 6.
    Ipv6BadHeader = 14,
}
pub const CLASSES: u32 = 15;

impl Class {
    pub const ALL: [Class; CLASSES as usize] = [
        Class::Unmatched,
        Class::NonIp,
        Class::Fragment,
        Class::EthTruncated,
        Class::VlanTruncated,
        Class::VlanTooDeep,
        Class::Ipv4Truncated,
        Class::Ipv4BadHeader,
        Class::Ipv6Truncated,
        Class::Ipv6ExtTruncated,
        Class::Ipv6ExtTooMany,
        Class::L4Truncated,
        Class::TcpTinyFragment,
        Class::PppoeTruncated,
        Class::Ipv6BadHeader,
    ];

    /// Frames of this class may carry a rule port that the datapath could
    /// not read (a header chain longer than it walks, a header cut short
    /// in the frame, a tiny TCP fragment, more VLAN tags than it parses):
    /// enforce mode drops them rather than let them pass unjudged.
    /// Everything else the kernel either cannot deliver as IP or delivers
    /// without ports (non-first fragments; see the README).
    pub const fn fails_closed(self) -> bool {
        matches!(
            self,
            Class::VlanTooDeep
                | Class::Ipv4Truncated
                | Class::Ipv6Truncated
                | Class::Ipv6ExtTruncated
                | Class::Ipv6ExtTooMany
                | Class::L4Truncated
                | Class::TcpTinyFragment
        )
    }

    /// The malformed reason label, or `None` for the three non-malformed
    /// classes.
    pub const fn malformed_reason(self) -> Option<&'static str> {
        match self {
            Class::Unmatched | Class::NonIp | Class::Fragment => None,
            Class::EthTruncated => Some("eth_truncated"),
            Class::VlanTruncated => Some("vlan_truncated"),
            Class::VlanTooDeep => Some("vlan_too_deep"),
            Class::Ipv4Truncated => Some("ipv4_truncated"),
            Class::Ipv4BadHeader => Some("ipv4_bad_header"),
            Class::Ipv6Truncated => Some("ipv6_truncated"),
            Class::Ipv6ExtTruncated => Some("ipv6_ext_truncated"),
            Class::Ipv6ExtTooMany => Some("ipv6_ext_too_many"),
            Class::L4Truncated => Some("l4_truncated"),
            Class::TcpTinyFragment => Some("tcp_tiny_fragment"),
            Class::PppoeTruncated => Some("pppoe_truncated"),
            Class::Ipv6BadHeader => Some("ipv6_bad_header"),
        }
    }
}

/// Index into the `CLASS_COUNTERS` per-CPU array.
#[inline(always)]
pub fn class_counter_index(iface: u32, dir: Direction, class: Class) -> u32 {
    (iface * DIRECTIONS + dir.index()) * CLASSES + u32::from(class)
}
pub const CLASS_COUNTER_ENTRIES: u32 = MAX_IFACES * DIRECTIONS * CLASSES;

/// Per-source tracking: entries of the LRU map.
pub const MAX_SOURCES: u32 = 1 << 20;
/// Web visitors that completed a TCP handshake (LRU). Only a handshake
/// proven by the visitor's ACK inserts here, so a flood of spoofed SYNs
/// cannot evict them.
pub const MAX_VISITORS: u32 = 1 << 16;
/// Handshakes a web port has answered (SYN-ACK seen leaving) whose ACK
/// has not arrived yet (LRU). A SYN flood churns this map, never
/// `VISITORS`.
pub const MAX_HANDSHAKES: u32 = 1 << 16;

/// Key of the `VISITORS` map: a local address (the web server, as it
/// sends) and a peer that completed a TCP handshake with it on a web port.
/// Addresses are IPv4 in the first 4 bytes (rest zero), or IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VisitorKey {
    pub local: [u8; 16],
    pub visitor: [u8; 16],
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Key of the `HANDSHAKES` map: the visitor's end of a TCP connection
/// that a web port answered with a SYN-ACK. The local address is in the
/// value, not the key: on a router that forwards a public port to a LAN
/// server, the visitor's ACK arrives for the public address while the
/// SYN-ACK leaves from the server's own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HandshakeKey {
    pub peer: [u8; 16],
    /// The visitor's TCP port.
    pub peer_port: u16,
    /// 4 or 6.
    pub family: u8,
    pub _pad: u8,
}

/// A SYN-ACK seen leaving a web port: the visitor it makes once
/// acknowledged (the SYN-ACK's source as `local`, its destination as
/// `visitor`), and the acknowledgement number the visitor's ACK must
/// carry (the SYN-ACK's sequence number + 1, which an off-path spoofer
/// never sees).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handshake {
    pub visitor: VisitorKey,
    pub ack: u32,
}

/// The sketch of distinct destinations: while `distinct <=
/// SKETCH_LIST_LEN` it is an exact list of destination hashes; on the
/// next new destination it becomes a bitmap of `SKETCH_BITS` bits
/// (linear counting), and `distinct` counts bits set.
/// 30 words keep a source record at 160 bytes, so a million of them fit
/// in 248 MiB of kernel memory.
pub const SKETCH_WORDS: usize = 30;
pub const SKETCH_LIST_LEN: u32 = SKETCH_WORDS as u32;
pub const SKETCH_BITS: u32 = SKETCH_WORDS as u32 * 32;

pub const SOURCE_BITMAP: u32 = 1;
pub const SOURCE_FLAGGED: u32 = 2;

/// Key of the per-source map: who, on which rule, which way, and whether
/// these are probes (a scan) or reverse lookups.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    /// IPv4 in the first 4 bytes (rest zero), or IPv6.
    pub addr: [u8; 16],
    /// 4 or 6.
    pub family: u8,
    pub rule: u8,
    /// A [`Direction`].
    pub direction: u8,
    /// A [`Classification`].
    pub classification: u8,
}

impl SourceKey {
    /// The key of rule slot `rule`, `direction` and `classification`,
    /// with no address yet.
    #[inline(always)]
    pub fn new(rule: u8, direction: Direction, classification: Classification) -> SourceKey {
        SourceKey {
            rule,
            direction: direction.into(),
            classification: classification.into(),
            ..SourceKey::default()
        }
    }

    #[inline(always)]
    pub fn direction(&self) -> Direction {
        self.direction.into()
    }

    #[inline(always)]
    pub fn classification(&self) -> Classification {
        self.classification.into()
    }
}

/// What the kernel knows of a source. Times are seconds of
/// CLOCK_MONOTONIC.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceState {
    pub packets: u64,
    pub bytes: u64,
    /// `SOURCE_*` bits. With `distinct` and `iface` it fills one aligned
    /// 64-bit word, which the datapath fetch-ors atomically to set
    /// `SOURCE_FLAGGED` exactly once (the BPF instruction set bpf-linker
    /// targets has 64-bit atomics only).
    pub flags: u32,
    /// Exact count (list) or bits set (bitmap), within the window.
    pub distinct: u16,
    /// Interface slot the source was last seen on.
    pub iface: u16,
    pub first_seen: u32,
    pub last_seen: u32,
    pub window_start: u32,
    /// Unused (auto-blocks live in `AUTO_BLOCKS`, where an eviction of
    /// the record cannot end them); keeps the record at 160 bytes.
    pub _reserved: u32,
    pub sketch: [u32; SKETCH_WORDS],
}

impl Default for SourceState {
    fn default() -> Self {
        SourceState {
            packets: 0,
            bytes: 0,
            flags: 0,
            distinct: 0,
            iface: 0,
            first_seen: 0,
            last_seen: 0,
            window_start: 0,
            _reserved: 0,
            sketch: [0; SKETCH_WORDS],
        }
    }
}

/// Sent on the ring buffer once when a source crosses its threshold.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlagEvent {
    pub key: SourceKey,
    pub iface: u32,
    pub distinct: u32,
    pub first_seen: u32,
    pub last_seen: u32,
    pub blocked_until: u32,
    /// `SOURCE_*` bits (tells whether `distinct` is exact or bits set).
    pub flags: u32,
    pub _pad: u32,
    pub packets: u64,
    pub bytes: u64,
    /// CLOCK_MONOTONIC nanoseconds when the flag was raised, so the
    /// controller can measure how late it hears of it.
    pub flagged_ns: u64,
}

/// Per-CPU memo of the last matched packet a CPU judged in full. A flood
/// repeats one packet: while the memo is fresh, a packet whose
/// [`MemoTag`] equals the memo's is counted under `counter` and given
/// `verdict` right after parsing, with no rule, list or per-source lookup,
/// and its counts wait in `pending_*`, folded into `key`'s source record
/// when the memo is next replaced: at the first other packet, after
/// `FLOOD_CACHE_FLUSH` packets, or `FLOOD_CACHE_JIFFIES` after it was
/// made. Readers add the pending counts of a matching key (see the
/// controller's `sources::lookup`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodCache {
    /// The source record the pending counts belong to.
    pub key: SourceKey,
    /// `MEMO_DROP` and `MEMO_REVERSE`: what the memoised packet got.
    pub verdict: u32,
    /// The jiffy from which the memo is stale. Jiffies, because reading
    /// them is an inlined load while a clock read is a helper call that
    /// costs more than the rest of a memo hit.
    pub expires_jiffies: u64,
    pub pending_packets: u32,
    pub pending_bytes: u32,
    /// The `RULE_COUNTERS` (and `REVERSE_COUNTERS`) index the memoised
    /// packet was counted under.
    pub counter: u32,
    pub tag: MemoTag,
}

/// What decides a matched packet's verdict and counters, as the parser
/// found it: two packets with equal tags get the same answer (until the
/// policy changes, which changes `policy`, or the memo goes stale).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoTag {
    /// Source and destination address: IPv4 in the first word (network
    /// order, as the packet holds them), the rest zero.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Destination port, protocol << 16, address family (4 or 6) << 24,
    /// the TCP SYN, RST and ACK flags << 27; for UDP, bit 27: an NBNS
    /// response (the R bit).
    pub port: u32,
    /// Interface slot, direction << 16: the memo is shared by every
    /// program instance on the CPU.
    pub iface: u32,
    /// `Settings::active` when the packet was judged (version and
    /// generation).
    pub policy: u32,
}

/// Key of `CONTACTS`: a probing source's first contact with a destination
/// address and port, as the memo tag holds it (see [`MemoTag`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ContactKey {
    /// The probing source (IPv4 in the first word, network order).
    pub prober: [u32; 4],
    /// The probed destination.
    pub probed: [u32; 4],
    /// Destination port, protocol << 16, address family << 24: bits 0-26
    /// of [`MemoTag::port`] ([`CONTACT_PORT_MASK`]).
    pub port: u32,
}

/// The bits of [`MemoTag::port`] a [`ContactKey`] keeps.
pub const CONTACT_PORT_MASK: u32 = 0x07ff_ffff;

/// Value of `CONTACTS`: when the first contact was made (CLOCK_MONOTONIC
/// second), where, and whether the probed address and port answered.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Contact {
    pub since: u32,
    /// Interface slot the probe was seen on.
    pub iface: u16,
    /// Rule slot of the probe.
    pub rule: u8,
    /// The probe's [`Direction`].
    pub direction: u8,
    /// The first answer from the probed address and port to the prober:
    /// 0 none yet, [`CONTACT_ANSWERED`] (any UDP datagram, a TCP segment
    /// other than a RST) or [`CONTACT_REFUSED`] (a TCP RST).
    pub answered: u32,
}
pub const CONTACT_ANSWERED: u32 = 1;
pub const CONTACT_REFUSED: u32 = 2;

/// First contacts remembered at once, at most (an LRU: a flood of new
/// contacts evicts the oldest, which the distinct-destination threshold
/// judges anyway).
pub const MAX_CONTACTS: u32 = 16_384;
/// First contacts recorded per source and window, at most: the walk
/// decides within a few, and a sweep is caught by its distinct count.
pub const CONTACTS_PER_WINDOW: u16 = 16;

/// `FloodCache::verdict` bits: the packet was dropped; it was a reverse
/// lookup (counted apart as well).
pub const MEMO_DROP: u32 = 1;
pub const MEMO_REVERSE: u32 = 2;
pub const FLOOD_CACHE_FLUSH: u32 = 64;
/// 64 jiffies: 64 ms at HZ=1000, 256 ms at HZ=250, under a second for
/// any HZ of at least 64.
pub const FLOOD_CACHE_JIFFIES: u64 = 64;

/// Datapath-wide counters (per-CPU array indices).
pub const STAT_SOURCES_CREATED: u32 = 0;
/// Flag events not delivered: ring buffer full, or over the rate limit.
pub const STAT_EVENTS_LOST: u32 = 1;
pub const STAT_AUTO_BLOCKED: u32 = 2;
/// Visitors recorded: handshakes to a web port whose ACK carried the
/// acknowledgement number the SYN-ACK asked for.
pub const STAT_VISITORS_RECORDED: u32 = 3;
/// Auto-blocks not set because `MAX_AUTO_BLOCKS` were in force.
pub const STAT_AUTO_BLOCKS_CAPPED: u32 = 4;
/// SYN-ACKs seen leaving a web port (handshakes waiting for their ACK).
pub const STAT_HANDSHAKES_STARTED: u32 = 5;
/// ACKs to a web port, from a peer with a pending handshake, whose
/// acknowledgement number was wrong: forged, or not an ordinary handshake.
pub const STAT_HANDSHAKES_REJECTED: u32 = 6;
pub const STATS: u32 = 7;

/// Flag events not delivered, by cause (per-CPU array `EVENT_LOSSES`, a
/// map of its own so that pins of earlier versions, whose `STATS` has 7
/// entries, stay compatible): over the per-CPU budget, or no room in the
/// ring buffer. `STAT_EVENTS_LOST` keeps counting both.
pub const EVENT_LOSS_RATE_LIMITED: u32 = 0;
pub const EVENT_LOSS_RING_FULL: u32 = 1;
pub const EVENT_LOSS_CAUSES: u32 = 2;

/// Flag events a CPU may send per second; a flood of flags (a million
/// spoofed scanners) reaches the controller at this rate at most, the
/// rest counted as lost (the flags themselves are still counted).
pub const MAX_EVENTS_PER_CPU_SECOND: u32 = 2000;

/// Per-CPU budget for flag events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    pub second: u32,
    pub sent: u32,
}

/// Auto-blocks in force at once, at most: spoofed probes can make netwatch
/// block innocent sources, but never more than this many. The entries of
/// the `AUTO_BLOCKS` hash map (key: the flagged source's [`SourceKey`],
/// value: the CLOCK_MONOTONIC second the block ends), so the kernel's
/// refusal to insert into a full map is the cap; expired entries are
/// deleted by the datapath when it meets them and by the controller's
/// sweep.
pub const MAX_AUTO_BLOCKS: u32 = 1024;

/// Index of `FLAG_COUNTERS` (flags raised per rule and direction).
#[inline(always)]
pub fn flag_counter_index(rule: u32, dir: Direction) -> u32 {
    rule * DIRECTIONS + dir.index()
}
pub const FLAG_COUNTER_ENTRIES: u32 = MAX_RULES * DIRECTIONS;

/// Value of the allow and block LPM tries.
///
/// The trie returns only the longest stored prefix that contains an
/// address, so each stored prefix carries the answer for the addresses it
/// is the longest match of: `until[v]` is the latest end of every entry
/// of version `v` that contains the prefix (its own and wider ones). A
/// short-lived entry therefore never hides a wider permanent one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListEntry {
    /// Per policy version: 0 = not listed, [`LIST_FOREVER`], or the
    /// CLOCK_MONOTONIC second at which the listing ends.
    pub until: [u32; POLICY_VERSIONS],
    /// Bit `v` set: this prefix is in version `v`'s config list.
    pub config_versions: u32,
    /// This prefix's own command-line entry (`netwatch block/allow`),
    /// kept across reloads: 0 = none, [`LIST_FOREVER`], or when it ends.
    pub cli_until: u32,
}
pub const LIST_FOREVER: u32 = u32::MAX;

impl ListEntry {
    /// Whether the prefix is listed in `version` at second `now`.
    #[inline(always)]
    pub fn listed(&self, version: u32, now: u32) -> bool {
        // SAFETY: `version & 1` < POLICY_VERSIONS.
        let until = unsafe { *self.until.as_ptr().add((version & 1) as usize) };
        until > now
    }
}

/// Bits set in a `SKETCH_BITS` bitmap expected after `n` distinct
/// insertions, `m (1 - e^(-n/m))` rounded up: the datapath flags a
/// bitmap-mode source when its bits reach this.
#[cfg(feature = "user")]
pub fn bitmap_bits_for(n: u32) -> u32 {
    let m = SKETCH_BITS as f64;
    let bits = (m * (1.0 - (-(n as f64) / m).exp())).ceil() as u32;
    bits.min(SKETCH_BITS)
}

/// Linear-counting estimate of distinct destinations from the sketch:
/// exact in list mode, `-m ln(zeros / m)` in bitmap mode.
#[cfg(feature = "user")]
pub fn estimate_distinct(distinct: u32, flags: u32) -> u32 {
    if flags & SOURCE_BITMAP == 0 {
        return distinct;
    }
    let m = SKETCH_BITS as f64;
    let zeros = (SKETCH_BITS - distinct.min(SKETCH_BITS - 1)) as f64;
    (-m * (zeros / m).ln()).round() as u32
}

/// Names of the maps, shared so the controller and the pin directory
/// agree with the object file.
pub mod maps {
    pub const SETTINGS: &str = "SETTINGS";
    pub const PORT_RULES: &str = "PORT_RULES";
    pub const RULE_INFO: &str = "RULE_INFO";
    pub const IFACE_INFO: &str = "IFACE_INFO";
    pub const RULE_COUNTERS: &str = "RULE_COUNTERS";
    pub const CLASS_COUNTERS: &str = "CLASS_COUNTERS";
    pub const ALLOW_V4: &str = "ALLOW_V4";
    pub const ALLOW_V6: &str = "ALLOW_V6";
    pub const BLOCK_V4: &str = "BLOCK_V4";
    pub const BLOCK_V6: &str = "BLOCK_V6";
    pub const SOURCES: &str = "SOURCES";
    pub const VISITORS: &str = "VISITORS";
    pub const HANDSHAKES: &str = "HANDSHAKES";
    pub const EVENTS: &str = "EVENTS";
    pub const STATS: &str = "STATS";
    pub const FLAG_COUNTERS: &str = "FLAG_COUNTERS";
    pub const REVERSE_COUNTERS: &str = "REVERSE_COUNTERS";
    pub const FLOOD_CACHE: &str = "FLOOD_CACHE";
    pub const EVENT_BUDGET: &str = "EVENT_BUDGET";
    pub const AUTO_BLOCKS: &str = "AUTO_BLOCKS";
    pub const EVENT_LOSSES: &str = "EVENT_LOSSES";
    /// The kernel's name of each interface slot's interface, where it was
    /// renamed while attached (all zeroes: it has its configured name).
    /// A map of its own, so that `IFACE_INFO` pinned by earlier versions
    /// stays compatible; the programs never read it.
    pub const IFACE_KERNEL_NAMES: &str = "IFACE_KERNEL_NAMES";
    /// First contacts of probing sources ([`super::ContactKey`] ->
    /// [`super::Contact`]).
    pub const CONTACTS: &str = "CONTACTS";
    /// Flags the controller raised for failed first contacts, indexed as
    /// `FLAG_COUNTERS` (u64; the programs never touch it).
    pub const CONTACT_FLAGS: &str = "CONTACT_FLAGS";
    pub const ALL: [&str; 24] = [
        SETTINGS,
        PORT_RULES,
        RULE_INFO,
        IFACE_INFO,
        RULE_COUNTERS,
        CLASS_COUNTERS,
        ALLOW_V4,
        ALLOW_V6,
        BLOCK_V4,
        BLOCK_V6,
        SOURCES,
        VISITORS,
        HANDSHAKES,
        EVENTS,
        STATS,
        FLAG_COUNTERS,
        REVERSE_COUNTERS,
        FLOOD_CACHE,
        EVENT_BUDGET,
        AUTO_BLOCKS,
        EVENT_LOSSES,
        IFACE_KERNEL_NAMES,
        CONTACTS,
        CONTACT_FLAGS,
    ];
}

/// Names of the load-time globals that specialise a program instance.
pub mod globals {
    /// Interface slot (u32).
    pub const IFACE_SLOT: &str = "IFACE_SLOT";
    /// `Direction` as u8.
    pub const DIRECTION: &str = "DIRECTION";
    /// `LinkKind` as u32.
    pub const LINK_KIND: &str = "LINK_KIND";
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] plain data without padding.
    unsafe impl aya::Pod for PortRule {}
    unsafe impl aya::Pod for PortRules {}
    unsafe impl aya::Pod for RuleInfo {}
    unsafe impl aya::Pod for IfaceInfo {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for SourceKey {}
    unsafe impl aya::Pod for VisitorKey {}
    unsafe impl aya::Pod for HandshakeKey {}
    unsafe impl aya::Pod for Handshake {}
    unsafe impl aya::Pod for SourceState {}
    unsafe impl aya::Pod for FlagEvent {}
    unsafe impl aya::Pod for ListEntry {}
    unsafe impl aya::Pod for FloodCache {}
    unsafe impl aya::Pod for EventBudget {}
    unsafe impl aya::Pod for ContactKey {}
    unsafe impl aya::Pod for Contact {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{format, vec::Vec};

    use super::*;

    /// Every variant converts to its stored value and back, and its label
    /// back to it; `ALL` lists the variants in discriminant order.
    macro_rules! round_trips {
        ($ty:ty, $raw:ty) => {
            for (i, v) in <$ty>::ALL.into_iter().enumerate() {
                let raw: $raw = v.into();
                assert_eq!(raw as usize, i, "{v:?} is not at its discriminant in ALL");
                assert_eq!(<$ty>::try_from(raw).ok(), Some(v), "{v:?} from {raw}");
                assert_eq!(
                    <$ty>::from_label(v.label()),
                    Some(v),
                    "{v:?} from {:?}",
                    v.label()
                );
            }
            assert_eq!(<$ty>::from_label("no such label"), None);
        };
    }

    #[test]
    fn a_switch_puts_the_version_in_force_and_advances_the_generation() {
        let mut settings = Settings::default();
        let mut seen = Vec::new();
        for next in [1, 0, 1, 0] {
            settings.switch_to(next);
            assert_eq!(settings.active_version(), next);
            seen.push(settings.active_word());
        }
        // Two switches back to one version still tag memos apart.
        assert_eq!(seen, [3, 4, 7, 8]);
        settings.active = u32::MAX;
        settings.switch_to(1);
        assert_eq!((settings.active_version(), settings.active_word()), (1, 1));
    }

    #[test]
    fn every_variant_round_trips() {
        round_trips!(LinkKind, u32);
        round_trips!(Direction, u8);
        round_trips!(Outcome, u32);
        round_trips!(Protocol, u8);
        round_trips!(Action, u8);
        round_trips!(Role, u32);
        round_trips!(Mode, u32);
        round_trips!(Classification, u8);
        for (i, class) in Class::ALL.into_iter().enumerate() {
            assert_eq!(u32::from(class) as usize, i);
            assert_eq!(Class::try_from(u32::from(class)), Ok(class));
        }
    }

    /// The values the maps and the load-time constants hold, as pins of
    /// earlier versions wrote them.
    #[test]
    fn stored_values_are_the_pinned_ones() {
        let raw = |l: LinkKind| u32::from(l);
        assert_eq!((raw(LinkKind::Ethernet), raw(LinkKind::Ip)), (0, 1));
        assert_eq!((u8::from(Direction::Inbound), u8::from(Direction::Outbound)), (0, 1));
        assert_eq!((u32::from(Outcome::Passed), u32::from(Outcome::Dropped)), (0, 1));
        assert_eq!((u8::from(Protocol::Udp), u8::from(Protocol::Tcp)), (0, 1));
        assert_eq!(actions(Action::Count, Action::Drop), [0, 1]);
        assert_eq!(actions(Action::Drop, Action::Count), [1, 0]);
        let role = |r: Role| u32::from(r);
        assert_eq!((role(Role::Wan), role(Role::Lan), role(Role::Host)), (0, 1, 2));
        assert_eq!((u32::from(Mode::Monitor), u32::from(Mode::Enforce)), (0, 1));
        let key = SourceKey::new(7, Direction::Outbound, Classification::ReverseLookup);
        assert_eq!((key.rule, key.direction, key.classification), (7, 1, 1));
        let key = SourceKey::new(7, Direction::Inbound, Classification::Scan);
        assert_eq!((key.direction, key.classification), (0, 0));
        assert_eq!(u32::from(Class::Ipv6BadHeader), 14);

        // The indexes, against their formulas over the raw values.
        assert_eq!(port_rule_index(Protocol::Udp, 137), 137);
        assert_eq!(port_rule_index(Protocol::Tcp, 5190), (1 << 16) | 5190);
        assert_eq!(
            rule_counter_index(3, Direction::Outbound, 5, Outcome::Dropped),
            ((3 * 2 + 1) * MAX_RULES + 5) * 2 + 1
        );
        assert_eq!(rule_counter_index(0, Direction::Inbound, 0, Outcome::Passed), 0);
        assert_eq!(
            class_counter_index(2, Direction::Outbound, Class::Fragment),
            (2 * 2 + 1) * CLASSES + 2
        );
        assert_eq!(flag_counter_index(9, Direction::Outbound), 9 * 2 + 1);
        // The layouts the pins hold.
        assert_eq!(core::mem::size_of::<SourceKey>(), 20);
        assert_eq!(core::mem::size_of::<PortRule>(), 24);
        assert_eq!(core::mem::size_of::<RuleInfo>(), 8);
        assert_eq!(core::mem::size_of::<IfaceInfo>(), 28);
        assert_eq!(core::mem::size_of::<PolicySettings>(), 32);
    }

    /// A stored value no variant has reads as the documented variant for
    /// the encodings read back from maps and load-time constants, and is
    /// refused for those only ever written.
    #[test]
    fn unknown_values_give_the_documented_fallback() {
        for raw in [2u8, 0x7f, u8::MAX] {
            assert_eq!(Direction::from(raw), Direction::Outbound);
            assert_eq!(Protocol::from(raw), Protocol::Udp);
            assert_eq!(Action::from(raw), Action::Count);
            assert_eq!(Classification::from(raw), Classification::Scan);
        }
        for raw in [3u32, 0x1000, u32::MAX] {
            assert_eq!(LinkKind::from(raw), LinkKind::Ethernet);
            assert_eq!(Role::from(raw), Role::Wan);
            assert_eq!(Mode::from(raw), Mode::Monitor);
            assert!(Outcome::try_from(raw).is_err());
            assert!(Class::try_from(raw.max(CLASSES)).is_err());
        }
        assert_eq!(Mode::from(2), Mode::Monitor);
        assert_eq!(LinkKind::from(2), LinkKind::Ethernet);
        assert_eq!(
            format!("{}", Outcome::try_from(2).unwrap_err()),
            "No discriminant in enum `Outcome` matches the value `2`"
        );
        // The fallback is also each enum's `Default`.
        assert_eq!(
            (
                Direction::default(),
                Protocol::default(),
                Action::default(),
                Classification::default()
            ),
            (Direction::Outbound, Protocol::Udp, Action::Count, Classification::Scan)
        );
        assert_eq!(
            (LinkKind::default(), Role::default(), Mode::default()),
            (LinkKind::Ethernet, Role::Wan, Mode::Monitor)
        );
    }

    /// The labels metrics, JSON, the configuration and the incident store
    /// use.
    #[test]
    fn labels_are_the_documented_strings() {
        fn labels<T: Copy>(all: &[T], label: fn(T) -> &'static str) -> Vec<&'static str> {
            all.iter().map(|v| label(*v)).collect()
        }
        assert_eq!(labels(&LinkKind::ALL, LinkKind::label), ["ethernet", "ip"]);
        assert_eq!(labels(&Direction::ALL, Direction::label), ["inbound", "outbound"]);
        assert_eq!(labels(&Outcome::ALL, Outcome::label), ["passed", "dropped"]);
        assert_eq!(labels(&Protocol::ALL, Protocol::label), ["udp", "tcp"]);
        assert_eq!(labels(&Action::ALL, Action::label), ["count", "drop"]);
        assert_eq!(labels(&Role::ALL, Role::label), ["wan", "lan", "host"]);
        assert_eq!(labels(&Mode::ALL, Mode::label), ["monitor", "enforce"]);
        assert_eq!(
            labels(&Classification::ALL, Classification::label),
            ["scan", "reverse-lookup"]
        );
    }

    /// The typed accessors read what the plain fields hold.
    #[test]
    fn accessors_read_the_fields() {
        let rule = PortRule {
            action: actions(Action::Count, Action::Drop),
            ..PortRule::default()
        };
        assert_eq!(rule.action(Direction::Inbound), Action::Count);
        assert_eq!(rule.action(Direction::Outbound), Action::Drop);
        let info = RuleInfo {
            protocol: Protocol::Tcp.into(),
            port: 445,
            ..RuleInfo::default()
        };
        assert_eq!(
            (info.protocol(), info.port_rule_index()),
            (Protocol::Tcp, (1 << 16) | 445)
        );
        let iface = IfaceInfo {
            role: Role::Lan.into(),
            ..IfaceInfo::default()
        };
        assert_eq!(iface.role(), Role::Lan);
        assert_eq!(Role::Lan.xdp_direction(), Direction::Outbound);
        assert_eq!(Role::Host.xdp_direction(), Direction::Inbound);
        let policy = PolicySettings {
            mode: Mode::Enforce.into(),
            ..PolicySettings::default()
        };
        assert_eq!(policy.mode(), Mode::Enforce);
        let key = SourceKey::new(1, Direction::Inbound, Classification::ReverseLookup);
        assert_eq!(
            (key.direction(), key.classification()),
            (Direction::Inbound, Classification::ReverseLookup)
        );
    }
}
