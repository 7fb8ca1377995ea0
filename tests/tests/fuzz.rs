//! Packet fuzzing through the real programs: structured frames (VLAN
//! stacks, PPPoE, IPv4 options and fragments, IPv6 extension chains of up
//! to 20 headers, UDP/TCP to rule ports and others, Ethernet padding), most
//! of them then mutated (cut short, a length or type field rewritten,
//! bytes flipped), run through the XDP and TC programs that a live
//! `netwatch run` attached to a veth, and as bare IP packets through the
//! XDP programs loaded for an IP link. Each frame's verdict and counter
//! must be what the reference classifier (`tests/src/reference.rs`, written
//! from the RFCs) says, and each frame must land in exactly that one
//! counter.
//!
//! The oracle shares nothing with what it judges: its policy is written out
//! below rather than built by netwatch's config code, and counters are
//! compared by their labels (`netwatch status`'s rows, `/metrics` at the
//! end), never located with netwatch-common's index functions. The map entry
//! behind each label is learned by watching which entry moved when the
//! labelled output said that label moved; after that, each frame reads that
//! one entry, and every 512 frames all labelled rows are compared with the
//! reference's running totals (a mismatch replays those frames one at a time
//! to name the frame).
//!
//! Seeded and reproducible: `NETWATCH_FUZZ_SEED`, `NETWATCH_FUZZ_FRAMES`
//! (`cargo xtask fuzz` runs a long one).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    process::Command,
    time::Instant,
};

use aya::{
    maps::{MapData, PerCpuArray},
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use aya_obj::programs::XdpAttachType;
use netwatch_common::{Counter, LinkKind, maps};
use netwatch_tests::{
    daemon::{METRICS_ADDR, Netwatch},
    frames::Ext,
    harness::{self, Harness, Hook},
    netns::Netns,
    reference::{self, Class, Counted, Direction, Link, Malformed, Policy, Rule, Transport},
    require_privileged, unique,
};
use netwatch_user::{
    config::{ConfigFile, Overrides, RunConfig},
    datapath::PinnedMaps,
    observe::snapshot::Snapshot,
    policy::Mode,
};
use rand::{Rng, RngCore, SeedableRng, rngs::SmallRng, seq::IndexedRandom};

const CONFIG: &str = r#"
mode = "enforce"
allowlist = ["198.18.7.0/24", "2001:db8:7::/48"]
blocklist = ["198.18.9.0/24", "2001:db8:9::/48"]
[[rule]]
protocol = "udp"
port = 137
threshold = 2000
[[rule]]
protocol = "tcp"
port = 5190
threshold = 2000
[[rule]]
protocol = "udp"
port = 138
inbound = "count"
outbound = "count"
threshold = 2000
[[rule]]
protocol = "tcp"
port = 445
inbound = "drop"
outbound = "count"
threshold = 2000
"#;

/// What CONFIG says, as the oracle reads it (README: an action not given
/// is `drop`; auto-block is off unless asked for).
fn oracle_policy() -> Policy {
    let rule = |transport, port, drop_inbound, drop_outbound| Rule {
        transport,
        port,
        drop_inbound,
        drop_outbound,
    };
    let cidrs = |list: &[&str]| list.iter().map(|c| c.parse().unwrap()).collect();
    Policy {
        enforce: true,
        rules: vec![
            rule(Transport::Udp, 137, true, true),
            rule(Transport::Tcp, 5190, true, true),
            rule(Transport::Udp, 138, false, false),
            rule(Transport::Tcp, 445, true, false),
        ],
        allowlist: cidrs(&["198.18.7.0/24", "2001:db8:7::/48"]),
        blocklist: cidrs(&["198.18.9.0/24", "2001:db8:9::/48"]),
    }
}

const IFACE: &str = "nw-fz0";
/// Frames between two comparisons of every labelled counter.
const CHECK_EVERY: usize = 512;
/// Frames between two sums over every entry of the counter maps.
const RAW_TOTAL_EVERY: u64 = 100_000;
/// Under this, frames seen by each hook, the run is too short to insist on
/// reaching every class and rule outcome.
const COVERAGE_MIN: u64 = 100_000;
/// Frames stay well under what BPF_PROG_TEST_RUN takes (a page, less
/// head- and tailroom).
const MAX_FRAME: usize = 3000;
/// BPF_PROG_TEST_RUN refuses anything shorter than an Ethernet header,
/// also for XDP programs of IP links.
const MIN_FRAME: usize = 14;

// ---------------------------------------------------------------------
// The generator: frames built header by header, then perhaps mutated.
// ---------------------------------------------------------------------

const UDP: u8 = 17;
const TCP: u8 = 6;

/// The rule ports, their neighbours and a few others.
const PORTS: [u16; 11] = [137, 138, 445, 5190, 137, 445, 136, 139, 53, 80, 0];

/// A frame under construction, with the offsets a mutation aims at.
#[derive(Default)]
struct Draft {
    bytes: Vec<u8>,
    /// Where headers start and end: where truncation bites.
    cuts: Vec<usize>,
    /// Length, type and version fields: (offset, width).
    fields: Vec<(usize, usize)>,
}

impl Draft {
    fn put(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }
    fn cut_here(&mut self) {
        self.cuts.push(self.bytes.len());
    }
    /// The next `width` bytes put are a field worth rewriting.
    fn field(&mut self, width: usize) {
        self.fields.push((self.bytes.len(), width));
    }
    fn append(&mut self, inner: Draft) {
        let at = self.bytes.len();
        self.cuts.extend(inner.cuts.iter().map(|c| c + at));
        self.fields.extend(inner.fields.iter().map(|(o, w)| (o + at, *w)));
        self.bytes.extend(inner.bytes);
    }
    fn len(&self) -> usize {
        self.bytes.len()
    }
}

fn port(rng: &mut SmallRng) -> u16 {
    if rng.random_bool(0.85) {
        *PORTS.choose(rng).unwrap()
    } else {
        rng.random()
    }
}

fn random_bytes(rng: &mut SmallRng, n: usize) -> Vec<u8> {
    let mut bytes = vec![0; n];
    rng.fill_bytes(&mut bytes);
    bytes
}

/// A UDP or TCP header and payload, or the body of another protocol.
fn transport(rng: &mut SmallRng, protocol: u8) -> Draft {
    let mut d = Draft::default();
    d.cut_here();
    let payload = if rng.random_bool(0.8) {
        rng.random_range(0..=48)
    } else {
        rng.random_range(49..=400)
    };
    match protocol {
        UDP => {
            d.put(&port(rng).to_be_bytes());
            d.field(2);
            d.put(&port(rng).to_be_bytes());
            d.field(2);
            d.put(&((8 + payload) as u16).to_be_bytes());
            d.put(&[0, 0]);
        }
        TCP => {
            let option_words = if rng.random_bool(0.8) {
                0
            } else {
                rng.random_range(1..=10)
            };
            d.put(&port(rng).to_be_bytes());
            d.field(2);
            d.put(&port(rng).to_be_bytes());
            d.put(&rng.random::<u32>().to_be_bytes());
            d.put(&rng.random::<u32>().to_be_bytes());
            d.field(1);
            d.put(&[
                ((5 + option_words) << 4) as u8,
                *[0x02u8, 0x10, 0x18, 0x11, 0x04].choose(rng).unwrap(),
            ]);
            d.put(&[0xff, 0xff, 0, 0, 0, 0]);
            // MSS, SACK permitted, window scale, then NOPs.
            let mut options = vec![2, 4, 5, 0xb4, 4, 2, 3, 3, 7];
            options.resize(option_words * 4, 1);
            d.put(&options[..option_words * 4]);
        }
        _ => {}
    }
    d.cut_here();
    d.put(&random_bytes(rng, payload));
    d
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ip {
    V4,
    V6,
    Neither,
}

fn v4_addr(rng: &mut SmallRng) -> [u8; 4] {
    // Plain, allowlisted, blocklisted, plain.
    [198, 18, *[0u8, 7, 9, 1].choose(rng).unwrap(), rng.random()]
}

fn v6_addr(rng: &mut SmallRng) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
    a[5] = *[0u8, 7, 9, 1].choose(rng).unwrap();
    a[14] = rng.random();
    a[15] = rng.random();
    a
}

/// A transport protocol number for an IP packet.
fn protocol(rng: &mut SmallRng, v6: bool) -> u8 {
    match rng.random_range(0..100) {
        0..42 => UDP,
        42..84 => TCP,
        _ if v6 => *[59u8, 59, 58, 50, 132, 1, 255].choose(rng).unwrap(),
        _ => *[1u8, 47, 50, 51, 58, 132, 0, 255].choose(rng).unwrap(),
    }
}

/// Transport bytes, cut to fewer than a full header now and then (a tiny
/// first fragment when `first_fragment`), the IP lengths to agree.
fn body(rng: &mut SmallRng, protocol: u8, first_fragment: bool) -> Draft {
    let mut body = transport(rng, protocol);
    let header = match protocol {
        UDP => 8,
        TCP => 20,
        _ => return body,
    };
    if rng.random_bool(if first_fragment { 0.4 } else { 0.06 }) {
        let keep = rng.random_range(0..=header);
        body.bytes.truncate(keep);
        body.cuts.retain(|c| *c <= keep);
        body.fields.retain(|(o, w)| o + w <= keep);
    }
    body
}

/// RFC 791 options: NOPs, a record-route, an end of list; or noise.
fn ipv4_options(rng: &mut SmallRng, len: usize) -> Vec<u8> {
    if rng.random_bool(0.2) {
        return random_bytes(rng, len);
    }
    let mut o = Vec::with_capacity(len);
    while o.len() < len {
        let room = len - o.len();
        if room >= 7 && rng.random_bool(0.3) {
            let n = 3 + 4 * rng.random_range(1..=(room - 3) / 4);
            o.extend_from_slice(&[7, n as u8, 4]);
            o.resize(o.len() + n - 3, 0);
        } else if room == 1 || rng.random_bool(0.8) {
            o.push(1);
        } else {
            o.push(0);
            o.resize(len, 0);
        }
    }
    o
}

fn ipv4_packet(rng: &mut SmallRng) -> Draft {
    let protocol = protocol(rng, false);
    // Whole (DF or not), first fragment, later fragment.
    let (flags, first) = match rng.random_range(0..100) {
        0..70 => (if rng.random_bool(0.5) { 0x4000 } else { 0 }, false),
        70..86 => (0x2000, true),
        _ => (
            rng.random_range(1u16..0x2000) | if rng.random_bool(0.5) { 0x2000 } else { 0 },
            false,
        ),
    };
    let body = body(rng, protocol, first);
    let option_words = if rng.random_bool(0.65) {
        0
    } else {
        rng.random_range(1..=10)
    };
    let ihl = 5 + option_words;
    let mut d = Draft::default();
    d.cut_here();
    d.field(1);
    d.put(&[0x40 | ihl as u8, 0]);
    d.field(2);
    d.put(&((ihl * 4 + body.len()) as u16).to_be_bytes());
    d.put(&rng.random::<u16>().to_be_bytes());
    d.field(2);
    d.put(&flags.to_be_bytes());
    d.put(&[64]);
    d.field(1);
    d.put(&[protocol, 0, 0]);
    d.put(&v4_addr(rng));
    d.put(&v4_addr(rng));
    d.cut_here();
    d.put(&ipv4_options(rng, option_words * 4));
    d.append(body);
    d
}

fn extension_chain(rng: &mut SmallRng) -> Vec<Ext> {
    let n = match rng.random_range(0..100) {
        0..35 => 0,
        35..65 => rng.random_range(1..=3),
        65..83 => rng.random_range(4..=12),
        _ => rng.random_range(13..=20),
    };
    (0..n)
        .map(|_| match rng.random_range(0..14) {
            0..3 => Ext::HopByHop,
            3..5 => Ext::Routing,
            5..8 => Ext::DestOpts,
            8..11 => Ext::Auth,
            11 => Ext::Fragment { offset: 0, more: true },
            12 => Ext::Fragment { offset: 0, more: false },
            _ => Ext::Fragment {
                offset: rng.random_range(1..0x2000),
                more: rng.random_bool(0.5),
            },
        })
        .collect()
}

/// One extension header, at most `room` bytes long where the kind allows.
fn extension(rng: &mut SmallRng, ext: Ext, next: u8, room: usize) -> Draft {
    let mut d = Draft::default();
    d.cut_here();
    d.field(1);
    d.put(&[next]);
    match ext {
        Ext::Fragment { offset, more } => {
            d.put(&[0]);
            d.field(2);
            d.put(&((offset << 3) | more as u16).to_be_bytes());
            d.put(&rng.random::<u32>().to_be_bytes());
        }
        Ext::Auth => {
            // RFC 4302: (Payload Len + 2) * 4 bytes; 3 or more in practice.
            let max = (room / 4).saturating_sub(2).clamp(1, 255);
            let p = match rng.random_range(0..100) {
                0..80 => rng.random_range(1..=8.min(max)),
                80..85 => 0,
                _ => rng.random_range(1..=max.min(64)),
            };
            d.field(1);
            d.put(&[p as u8, 0, 0]);
            d.put(&random_bytes(rng, (p + 2) * 4 - 4));
        }
        _ => {
            // (Hdr Ext Len + 1) * 8 bytes: short, longer, or the 2048 maximum.
            let max = (room / 8).saturating_sub(1).min(255);
            let l = match rng.random_range(0..100) {
                0..50 => 0,
                50..85 => rng.random_range(1..=4),
                85..96 => rng.random_range(5..=40),
                _ => 255,
            }
            .min(max);
            d.field(1);
            d.put(&[l as u8]);
            let rest = (l + 1) * 8 - 2;
            if matches!(ext, Ext::Routing) {
                d.put(&[*[0u8, 2, 3, 4].choose(rng).unwrap(), rng.random_range(0..3)]);
                d.put(&vec![0; rest - 2]);
            } else if rest >= 2 {
                // A PadN option over the rest.
                d.put(&[1, (rest - 2) as u8]);
                d.put(&vec![0; rest - 2]);
            }
        }
    }
    d.cut_here();
    d
}

fn ipv6_packet(rng: &mut SmallRng, room: usize) -> Draft {
    let chain = extension_chain(rng);
    let first = chain.iter().any(|e| matches!(e, Ext::Fragment { more: true, .. }));
    let last = protocol(rng, true);
    let body = body(rng, last, first);
    let mut room = room.saturating_sub(40 + body.len() + 8 * chain.len());
    let mut headers = Draft::default();
    for (i, ext) in chain.iter().enumerate() {
        let next = chain.get(i + 1).map(|e| e.proto()).unwrap_or(last);
        let h = extension(rng, *ext, next, room + 8);
        room = (room + 8).saturating_sub(h.len());
        headers.append(h);
    }
    let mut d = Draft::default();
    d.cut_here();
    d.field(1);
    d.put(&[0x60, 0, 0, 0]);
    d.field(2);
    d.put(&((headers.len() + body.len()) as u16).to_be_bytes());
    d.field(1);
    d.put(&[chain.first().map(|e| e.proto()).unwrap_or(last), 64]);
    d.put(&v6_addr(rng));
    d.put(&v6_addr(rng));
    d.cut_here();
    d.append(headers);
    d.append(body);
    d
}

/// An IP packet, or something that is not one.
fn packet(rng: &mut SmallRng, room: usize) -> (Draft, Ip) {
    match rng.random_range(0..100) {
        0..44 => (ipv4_packet(rng), Ip::V4),
        44..92 => (ipv6_packet(rng, room), Ip::V6),
        _ => {
            let mut d = Draft::default();
            let n = rng.random_range(0..=64);
            d.put(&random_bytes(rng, n));
            (d, Ip::Neither)
        }
    }
}

/// An Ethernet frame: up to four tags, perhaps PPPoE, then the packet,
/// padded to the 60-byte minimum most of the time.
fn ethernet_frame(rng: &mut SmallRng) -> Draft {
    let (packet, ip) = packet(rng, MAX_FRAME - 40);
    let mut d = Draft::default();
    d.put(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1]);
    let tags = match rng.random_range(0..100) {
        0..50 => 0,
        50..72 => 1,
        72..86 => 2,
        86..96 => 3,
        _ => 4,
    };
    for _ in 0..tags {
        d.cut_here();
        d.field(2);
        let tpid: u16 = *[0x8100u16, 0x88a8].choose(rng).unwrap();
        d.put(&tpid.to_be_bytes());
        d.put(&(rng.random::<u16>() & 0xefff).to_be_bytes());
    }
    d.cut_here();
    let mismatch = rng.random_bool(0.03);
    if rng.random_bool(0.15) {
        d.field(2);
        d.put(&0x8864u16.to_be_bytes());
        d.cut_here();
        d.put(&[0x11, 0x00]);
        d.put(&rng.random::<u16>().to_be_bytes());
        d.field(2);
        d.put(&((packet.len() + 2) as u16).to_be_bytes());
        let ppp: u16 = match (ip, mismatch) {
            (Ip::V4, false) | (Ip::V6, true) => 0x0021,
            (Ip::V6, false) | (Ip::V4, true) => 0x0057,
            (Ip::Neither, _) => *[0xc021u16, 0x8021, 0x8057, 0xc223, 0x0031, 0x0023].choose(rng).unwrap(),
        };
        d.field(2);
        d.put(&ppp.to_be_bytes());
    } else {
        let ethertype: u16 = match (ip, mismatch) {
            (Ip::V4, false) | (Ip::V6, true) => 0x0800,
            (Ip::V6, false) | (Ip::V4, true) => 0x86dd,
            // ARP, LLDP, PPPoE discovery, RARP, an 802.3 length, anything.
            (Ip::Neither, _) => *[0x0806u16, 0x88cc, 0x8863, 0x8035, 0x0040, rng.random()]
                .choose(rng)
                .unwrap(),
        };
        d.field(2);
        d.put(&ethertype.to_be_bytes());
    }
    d.append(packet);
    d.cut_here();
    if d.len() < 60 && rng.random_bool(0.8) {
        d.bytes.resize(60, 0);
    }
    if rng.random_bool(0.1) {
        let n = rng.random_range(1..=40);
        d.put(&random_bytes(rng, n));
    }
    d
}

/// A bare IP packet, as a tun or ppp device carries it.
fn ip_frame(rng: &mut SmallRng) -> Draft {
    let (mut d, _) = packet(rng, MAX_FRAME);
    if rng.random_bool(0.05) {
        let n = rng.random_range(1..=40);
        d.put(&random_bytes(rng, n));
    }
    d
}

/// Cut short, a field rewritten, bytes flipped or added, or noise; or
/// left alone.
fn mutate(rng: &mut SmallRng, d: &mut Draft, keep_link: usize) {
    let f = &mut d.bytes;
    match rng.random_range(0..100) {
        0..45 => {}
        45..62 => {
            if let Some(&cut) = d.cuts.choose(rng) {
                let at = (cut + rng.random_range(0..=6)).saturating_sub(3);
                f.truncate(at);
            }
        }
        62..70 => {
            let at = rng.random_range(0..=f.len());
            f.truncate(at);
        }
        70..84 => {
            if let Some(&(at, width)) = d.fields.choose(rng)
                && at + width <= f.len()
            {
                let old = if width == 2 {
                    u16::from_be_bytes([f[at], f[at + 1]])
                } else {
                    u16::from(f[at])
                };
                let new = match rng.random_range(0..6) {
                    0 => rng.random(),
                    1 => old.wrapping_add(rng.random_range(1..=8)),
                    2 => old.wrapping_sub(rng.random_range(1..=8)),
                    3 => 0,
                    4 if width == 2 => *[0x8100u16, 0x88a8, 0x0800, 0x86dd, 0x8864, 0x0021, 0x0057, 0xffff]
                        .choose(rng)
                        .unwrap(),
                    _ => u16::from(
                        *[0u8, 6, 17, 43, 44, 51, 59, 60, 0x45, 0x4f, 0x44, 0x60, 0xff]
                            .choose(rng)
                            .unwrap(),
                    ),
                };
                if width == 2 {
                    f[at..at + 2].copy_from_slice(&new.to_be_bytes());
                } else {
                    f[at] = new as u8;
                }
            }
        }
        84..92 => {
            for _ in 0..rng.random_range(1..=4) {
                if f.len() > keep_link {
                    let at = rng.random_range(keep_link..f.len());
                    f[at] = rng.random();
                }
            }
        }
        92..97 => {
            let n = rng.random_range(1..=40);
            f.extend(random_bytes(rng, n));
        }
        _ => {
            let n = rng.random_range(0..=160);
            f.truncate(keep_link.min(f.len()));
            f.extend(random_bytes(rng, n));
        }
    }
    if f.len() < MIN_FRAME {
        // Refused by BPF_PROG_TEST_RUN: make it up to the minimum.
        f.resize(MIN_FRAME, 0);
    }
}

fn frame(rng: &mut SmallRng, link: Link) -> Vec<u8> {
    let (mut d, keep_link) = match link {
        Link::Ethernet => (ethernet_frame(rng), 12),
        Link::Ip => (ip_frame(rng), 0),
    };
    mutate(rng, &mut d, keep_link);
    debug_assert!(d.len() <= MAX_FRAME + 80, "{}", d.len());
    d.bytes
}

// ---------------------------------------------------------------------
// Counters, by label
// ---------------------------------------------------------------------

/// One interface's counters as `netwatch status` shows them, keyed the
/// way [`reference::Expected::label`] names them.
fn labelled(snapshot: &Snapshot, iface: &str) -> BTreeMap<String, u64> {
    let mut rows = BTreeMap::new();
    let mut add = |key: String, packets: u64| {
        assert!(rows.insert(key.clone(), packets).is_none(), "two rows labelled {key}");
    };
    for c in snapshot.rule_counters.iter().filter(|c| c.interface == iface) {
        add(format!("{} {} {}", c.direction, c.rule, c.action), c.packets);
    }
    for c in snapshot.class_counters.iter().filter(|c| c.interface == iface) {
        let class = match (c.class, c.reason) {
            ("malformed", Some(reason)) => format!("malformed/{reason}"),
            (class, None) => class.to_string(),
            (class, Some(reason)) => panic!("class {class} with reason {reason}"),
        };
        add(format!("{} {class}", c.direction), c.packets);
    }
    rows
}

/// The same counters from a `/metrics` exposition.
fn labelled_metrics(text: &str, iface: &str) -> BTreeMap<String, u64> {
    let mut rows = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let labels: HashMap<&str, &str> = labels
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        if labels.get("interface") != Some(&iface) {
            continue;
        }
        let Some(dir) = labels.get("direction") else { continue };
        let key = match name {
            "netwatch_packets_total" => format!("{dir} {} {}", labels["rule"], labels["action"]),
            "netwatch_unmatched_packets_total" => format!("{dir} unmatched"),
            "netwatch_fragments_total" => format!("{dir} fragment"),
            "netwatch_non_ip_packets_total" => format!("{dir} non_ip"),
            "netwatch_malformed_packets_total" => format!("{dir} malformed/{}", labels["reason"]),
            _ => continue,
        };
        let value: f64 = value.trim().parse().unwrap();
        assert!(rows.insert(key.clone(), value as u64).is_none(), "two series for {key}");
    }
    rows
}

/// Every entry of the two counter maps, read without knowing which entry
/// is which: rule counters first, then class counters.
struct RawCounters {
    rule: PerCpuArray<MapData, Counter>,
    class: PerCpuArray<MapData, Counter>,
}

impl RawCounters {
    fn open(maps: &PinnedMaps) -> Self {
        RawCounters {
            rule: maps.per_cpu_array(maps::RULE_COUNTERS).unwrap(),
            class: maps.per_cpu_array(maps::CLASS_COUNTERS).unwrap(),
        }
    }

    fn read(&self, entry: usize) -> u64 {
        let rules = self.rule.len() as usize;
        let (map, index) = if entry < rules {
            (&self.rule, entry)
        } else {
            (&self.class, entry - rules)
        };
        map.get(&(index as u32), 0).unwrap().iter().map(|c| c.packets).sum()
    }

    fn dump(&self) -> Vec<u64> {
        [&self.rule, &self.class]
            .into_iter()
            .flat_map(|m| m.iter().map(|v| v.unwrap().iter().map(|c| c.packets).sum::<u64>()))
            .collect()
    }

    fn total(&self) -> u64 {
        self.dump().iter().sum()
    }
}

fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

/// BPF_PROG_TEST_RUN of an skb (TC) program refuses, with EINVAL, a frame
/// whose Ethernet type is IPv4 or IPv6 when fewer than 20 or 40 bytes
/// follow the 14-byte Ethernet header: bpf_prog_test_run_skb() checks the
/// L3 header's length after eth_type_trans() (Linux commit 12bec2bd4b76,
/// "bpf: reject short IPv4/IPv6 inputs in bpf_prog_test_run_skb", also in
/// the stable kernels). eth_type_trans() reads only the outer type,
/// so tagged and PPPoE frames are never refused. Older kernels run these
/// frames, which the test takes too.
fn skb_test_run_refuses(frame: &[u8]) -> bool {
    frame.len() >= 14
        && match u16::from_be_bytes([frame[12], frame[13]]) {
            0x0800 => frame.len() < 14 + 20,
            0x86dd => frame.len() < 14 + 40,
            _ => false,
        }
}

/// Which program a direction's frames go through.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Prog {
    Xdp,
    Tc,
}

type Runner<'a> = Box<dyn Fn(Direction, &[u8]) -> Result<u32, ProgramError> + 'a>;

/// A datapath under test: its programs, its counters, and what the
/// reference expects of them so far.
struct Target<'a> {
    name: &'static str,
    link: Link,
    iface: &'static str,
    maps: &'a PinnedMaps,
    raw: RawCounters,
    progs: [Prog; 2],
    run: Runner<'a>,
    seed: u64,
    /// The map entry behind each (direction, counter), learned.
    entries: HashMap<(Direction, Counted), usize>,
    /// Labelled rows at the start, and the reference's count per label since.
    base: BTreeMap<String, u64>,
    expected: BTreeMap<String, u64>,
    raw_base: u64,
    /// Frames run, dropped, refused (skb test runs only), and frames the
    /// skb test run may refuse.
    fed: u64,
    dropped: u64,
    refused: u64,
    refusable: u64,
    per_direction: [u64; 2],
    /// Frames since the last full comparison.
    window: Vec<(Direction, Vec<u8>)>,
}

enum Ran {
    Verdict(bool),
    Refused,
}

impl<'a> Target<'a> {
    fn new(
        name: &'static str,
        link: Link,
        iface: &'static str,
        maps: &'a PinnedMaps,
        progs: [Prog; 2],
        run: Runner<'a>,
        seed: u64,
    ) -> Self {
        let raw = RawCounters::open(maps);
        let raw_base = raw.total();
        Target {
            name,
            link,
            iface,
            maps,
            raw,
            progs,
            run,
            seed,
            entries: HashMap::new(),
            base: self_rows(maps, iface),
            expected: BTreeMap::new(),
            raw_base,
            fed: 0,
            dropped: 0,
            refused: 0,
            refusable: 0,
            per_direction: [0; 2],
            window: Vec::new(),
        }
    }

    fn rows(&self) -> BTreeMap<String, u64> {
        self_rows(self.maps, self.iface)
    }

    fn fail(&self, policy: &Policy, dir: Direction, frame: &[u8], what: &str) -> ! {
        panic!(
            "{} {} (NETWATCH_FUZZ_SEED={}): {what}\nframe ({} bytes): {}\n{}\nkernel, the frame run once more: {}",
            self.name,
            dir.label(),
            self.seed,
            frame.len(),
            hex(frame),
            reference::explain(policy, self.link, dir, frame),
            self.observe(dir, frame)
        )
    }

    /// What the kernel does with a frame, by the labelled rows.
    fn observe(&self, dir: Direction, frame: &[u8]) -> String {
        let before = self.rows();
        let rv = (self.run)(dir, frame);
        format!("returned {rv:?}, counted {:?}", diff(&before, &self.rows()))
    }

    /// Runs a frame; checks the verdict, and that a refusal is the
    /// documented one.
    fn run_one(&self, policy: &Policy, dir: Direction, frame: &[u8]) -> Ran {
        let prog = self.progs[dir as usize];
        let refusable = prog == Prog::Tc && skb_test_run_refuses(frame);
        let rv = match (self.run)(dir, frame) {
            Ok(rv) => rv,
            Err(ProgramError::SyscallError(e)) if refusable && e.io_error.raw_os_error() == Some(libc::EINVAL) => {
                return Ran::Refused;
            }
            Err(e) => self.fail(policy, dir, frame, &format!("the test run failed: {e:?}")),
        };
        let dropped = match (prog, rv) {
            (Prog::Xdp, harness::XDP_DROP) | (Prog::Tc, harness::TC_ACT_SHOT) => true,
            (Prog::Xdp, harness::XDP_PASS) | (Prog::Tc, harness::TC_ACT_UNSPEC) => false,
            _ => self.fail(policy, dir, frame, &format!("unexpected return value {rv}")),
        };
        Ran::Verdict(dropped)
    }

    fn feed(&mut self, policy: &Policy, dir: Direction, frame: Vec<u8>) {
        let want = reference::classify(policy, self.link, dir, &frame);
        let label = want.label(policy);
        let refusable = self.progs[dir as usize] == Prog::Tc && skb_test_run_refuses(&frame);
        self.refusable += refusable as u64;
        let ran = match self.entries.get(&(dir, want.counted)) {
            Some(&entry) => {
                let before = self.raw.read(entry);
                let ran = self.run_one(policy, dir, &frame);
                let moved = self.raw.read(entry) - before;
                let should = matches!(ran, Ran::Verdict(_)) as u64;
                if moved != should {
                    self.fail(
                        policy,
                        dir,
                        &frame,
                        &format!("`{label}` moved by {moved}, not {should}"),
                    );
                }
                ran
            }
            None => self.learn(policy, dir, &frame, &label, want.counted),
        };
        match ran {
            Ran::Refused => {
                if !matches!(
                    want.counted,
                    Counted::Class(Class::Malformed(Malformed::Ipv4Truncated | Malformed::Ipv6Truncated))
                ) {
                    self.fail(
                        policy,
                        dir,
                        &frame,
                        "refused by the skb test run, yet not a truncated L3 header",
                    );
                }
                self.refused += 1;
            }
            Ran::Verdict(dropped) => {
                if dropped != want.drop {
                    self.fail(
                        policy,
                        dir,
                        &frame,
                        &format!("the kernel {} it", if dropped { "DROPPED" } else { "passed" }),
                    );
                }
                self.fed += 1;
                self.dropped += dropped as u64;
                self.per_direction[dir as usize] += 1;
                *self.expected.entry(label).or_default() += 1;
            }
        }
        self.window.push((dir, frame));
        if self.window.len() == CHECK_EVERY {
            self.check(policy);
        }
    }

    /// The first frame counted under a label: the labelled rows must move
    /// by exactly that one, and so must exactly one map entry, which is
    /// then that label's.
    fn learn(&mut self, policy: &Policy, dir: Direction, frame: &[u8], label: &str, counted: Counted) -> Ran {
        let (rows, dump) = (self.rows(), self.raw.dump());
        let ran = self.run_one(policy, dir, frame);
        let (rows_after, dump_after) = (self.rows(), self.raw.dump());
        let moved_rows = diff(&rows, &rows_after);
        let moved: Vec<(usize, u64)> = dump
            .iter()
            .zip(&dump_after)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| (i, b - a))
            .collect();
        match ran {
            Ran::Refused if moved.is_empty() && moved_rows.is_empty() => {}
            Ran::Refused => self.fail(policy, dir, frame, &format!("refused, yet counted: {moved_rows:?}")),
            Ran::Verdict(_) => {
                let want = BTreeMap::from([(label.to_string(), 1i64)]);
                if moved_rows != want || moved.len() != 1 || moved[0].1 != 1 {
                    self.fail(
                        policy,
                        dir,
                        frame,
                        &format!(
                            "labelled counters moved {moved_rows:?} ({} map entries), not just `{label}` by one",
                            moved.len()
                        ),
                    );
                }
                self.entries.insert((dir, counted), moved[0].0);
            }
        }
        ran
    }

    /// Every labelled counter against the reference's totals; on a
    /// difference, the frames since the last check are replayed one at a
    /// time to find the first that is not counted as the reference says.
    fn check(&mut self, policy: &Policy) {
        let rows = self.rows();
        let mut wrong = Vec::new();
        let keys: BTreeSet<&String> = rows
            .keys()
            .chain(self.base.keys())
            .chain(self.expected.keys())
            .collect();
        for key in keys {
            let want = self.base.get(key).copied().unwrap_or(0) + self.expected.get(key).copied().unwrap_or(0);
            match rows.get(key) {
                Some(&got) if got == want => {}
                got => wrong.push(format!("{key}: counted {got:?}, reference {want}")),
            }
        }
        if !wrong.is_empty() {
            for (dir, frame) in std::mem::take(&mut self.window) {
                let want = reference::classify(policy, self.link, dir, &frame);
                let before = self.rows();
                let ran = self.run_one(policy, dir, &frame);
                let moved = diff(&before, &self.rows());
                let should = match ran {
                    Ran::Refused => BTreeMap::new(),
                    Ran::Verdict(_) => BTreeMap::from([(want.label(policy), 1)]),
                };
                if moved != should {
                    self.fail(policy, dir, &frame, &format!("replayed, it moved {moved:?}"));
                }
            }
            panic!(
                "{}: counters disagree with the reference (NETWATCH_FUZZ_SEED={}), and replaying the last {} frames did not show which frame:\n{}",
                self.name,
                self.seed,
                CHECK_EVERY,
                wrong.join("\n")
            );
        }
        self.window.clear();
    }

    /// Nothing counted outside the labelled rows: all map entries together
    /// moved by the frames run.
    fn check_raw_total(&self) {
        assert_eq!(
            self.raw.total() - self.raw_base,
            self.fed,
            "{}: the counter maps moved by more than the frames run",
            self.name
        );
    }
}

fn self_rows(maps: &PinnedMaps, iface: &str) -> BTreeMap<String, u64> {
    labelled(&Snapshot::read(maps).unwrap(), iface)
}

fn diff(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, i64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = *v as i64 - before.get(k).copied().unwrap_or(0) as i64;
            (d != 0).then(|| (k.clone(), d))
        })
        .collect()
}

// ---------------------------------------------------------------------
// The attached programs
// ---------------------------------------------------------------------

/// The id of the program netwatch attached at `hook` (`xdp` or `tc`) of
/// the lab's interface, from the link it pinned (or, for TC egress
/// attached through netlink, the program it pinned).
fn prog_id(pins: &str, hook: &str) -> u64 {
    let filter = format!("{pins}/links/tcnl_{IFACE}");
    if hook == "tc" && std::path::Path::new(&filter).exists() {
        let out = Command::new("bpftool")
            .args(["-j", "prog", "show", "pinned", &filter])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool prog show JSON");
        return v["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("no program at {filter}: {v}"));
    }
    let link = format!("{pins}/links/{hook}_{IFACE}");
    let out = Command::new("bpftool")
        .args(["-j", "link", "show", "pinned", &link])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool link show JSON");
    v["prog_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no program behind {link}: {v}"))
}

/// A program pinned for the test's own handle; unpinned when dropped,
/// also when the test fails.
struct ProgPin(std::path::PathBuf);

impl Drop for ProgPin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn pin_prog(id: u64) -> ProgPin {
    let pin = std::path::PathBuf::from("/sys/fs/bpf").join(unique("fz"));
    let out = Command::new("bpftool")
        .args(["prog", "pin", "id", &id.to_string()])
        .arg(&pin)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ProgPin(pin)
}

/// Runs a frame through a pinned program.
macro_rules! test_run {
    ($prog:expr, $frame:expr) => {{
        let mut out = vec![0u8; $frame.len() + 256];
        $prog
            .test_run(TestRunOptions {
                data_in: Some($frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .map(|r| r.return_value)
    }};
}

fn common_direction(dir: Direction) -> netwatch_common::Direction {
    match dir {
        Direction::Inbound => netwatch_common::Direction::Inbound,
        Direction::Outbound => netwatch_common::Direction::Outbound,
    }
}

/// Labels every run of this length must reach on a target.
fn must_reach(policy: &Policy, link: Link) -> Vec<String> {
    let mut labels = Vec::new();
    for dir in Direction::BOTH {
        for rule in 0..policy.rules.len() {
            for dropped in [false, true] {
                labels.push(reference::counter_label(policy, dir, Counted::Rule { rule, dropped }));
            }
        }
        for class in Class::all() {
            let unreachable = match class {
                // BPF_PROG_TEST_RUN takes nothing shorter than 14 bytes.
                Class::Malformed(Malformed::EthTruncated) => true,
                // On an IP link the version nibble picks the parser.
                Class::Malformed(
                    Malformed::VlanTruncated
                    | Malformed::VlanTooDeep
                    | Malformed::PppoeTruncated
                    | Malformed::Ipv6BadHeader,
                ) => link == Link::Ip,
                _ => false,
            };
            if !unreachable {
                labels.push(reference::counter_label(policy, dir, Counted::Class(class)));
            }
        }
    }
    labels
}

#[test]
fn fuzzed_frames_agree_with_the_reference_classifier() {
    require_privileged!();
    let frames: u64 = std::env::var("NETWATCH_FUZZ_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let seed: u64 = std::env::var("NETWATCH_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6e65_7477_6174_6368);
    eprintln!("fuzz: {frames} frames, seed {seed} (NETWATCH_FUZZ_SEED={seed} reproduces)");
    let mut rng = SmallRng::seed_from_u64(seed);
    let oracle = oracle_policy();

    // A quiet interface: its peer stays down and IPv6 is off, so nothing
    // but the fuzzer's frames is ever counted on it.
    let ns = Netns::new("fz");
    ns.ip(&["link", "add", IFACE, "type", "veth", "peer", "name", "nw-fzpeer"]);
    ns.ip(&["link", "set", IFACE, "up"]);
    let out = ns
        .command("sysctl")
        .args(["-qw", "net.ipv6.conf.all.disable_ipv6=1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let dir = std::env::temp_dir().join(unique("fz"));
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("netwatch.toml");
    std::fs::write(&config_path, CONFIG).unwrap();
    let pins = format!("/sys/fs/bpf/{}", unique("p"));
    let nw = Netwatch::start(
        &ns,
        &pins,
        &[
            "--config",
            config_path.to_str().unwrap(),
            "--iface",
            IFACE,
            "--egress",
            IFACE,
        ],
    );
    let metrics_base = labelled_metrics(&nw.metrics(&ns), IFACE);

    // The very programs the controller attached.
    let xdp_pin = pin_prog(prog_id(&pins, "xdp"));
    let tc_pin = pin_prog(prog_id(&pins, "tc"));
    let xdp = Xdp::from_pin(&xdp_pin.0, XdpAttachType::Interface).unwrap();
    let tc = SchedClassifier::from_pin(&tc_pin.0).unwrap();
    let pinned = PinnedMaps::open(std::path::Path::new(&pins)).unwrap();
    let mut veth = Target::new(
        "veth (attached XDP inbound, TC outbound)",
        Link::Ethernet,
        IFACE,
        &pinned,
        [Prog::Xdp, Prog::Tc],
        Box::new(|dir, frame| match dir {
            Direction::Inbound => test_run!(xdp, frame),
            Direction::Outbound => test_run!(tc, frame),
        }),
        seed,
    );

    // The same rules on an IP link, bare IP packets, XDP both ways (skb
    // test runs always parse an Ethernet header). The product builds its
    // policy from the same file.
    let mut ip_policy = RunConfig::build(Some(&ConfigFile::parse(CONFIG).unwrap()), &Overrides::default())
        .unwrap()
        .policy;
    let ip_harness = Harness::with_link(&ip_policy, LinkKind::Ip);
    let mut ip = Target::new(
        "IP link (XDP both ways)",
        Link::Ip,
        harness::IFACE,
        &ip_harness.maps,
        [Prog::Xdp, Prog::Xdp],
        Box::new(|dir, frame| ip_harness.try_run(Hook::Xdp(common_direction(dir)), frame, 1)),
        seed,
    );
    let mut ip_oracle = oracle.clone();

    let start = Instant::now();
    for n in 0..frames {
        if n == frames / 2 {
            // The second half of the IP link's frames in monitor mode.
            ip.check(&ip_oracle);
            ip_policy.mode = Mode::Monitor;
            ip_harness.apply(&ip_policy);
            ip_oracle.enforce = false;
        }
        let dir = *Direction::BOTH.choose(&mut rng).unwrap();
        if rng.random_bool(0.75) {
            let f = frame(&mut rng, Link::Ethernet);
            veth.feed(&oracle, dir, f);
        } else {
            let f = frame(&mut rng, Link::Ip);
            ip.feed(&ip_oracle, dir, f);
        }
        if (n + 1) % RAW_TOTAL_EVERY == 0 {
            veth.check_raw_total();
            ip.check_raw_total();
        }
    }
    veth.check(&oracle);
    ip.check(&ip_oracle);
    veth.check_raw_total();
    ip.check_raw_total();
    let elapsed = start.elapsed();

    // The controller is still there, and `/metrics` says what the
    // reference says.
    let metrics = nw.metrics(&ns);
    assert!(metrics.contains("netwatch_info"));
    assert!(
        ns.run(|| netwatch_user::lab::netns::http_get(METRICS_ADDR, "/api/status"))
            .is_ok()
    );
    let now = labelled_metrics(&metrics, IFACE);
    for (key, got) in &now {
        let want = metrics_base.get(key).copied().unwrap_or(0) + veth.expected.get(key).copied().unwrap_or(0);
        assert_eq!(*got, want, "/metrics {key}");
    }
    for key in veth.expected.keys() {
        assert!(now.contains_key(key), "/metrics has no series for {key}");
    }

    for t in [&veth, &ip] {
        eprintln!(
            "fuzz: {}: {} frames agreed with the reference ({} dropped), {} labels learned",
            t.name,
            t.fed,
            t.dropped,
            t.entries.len()
        );
        eprintln!("fuzz:   per counter: {:?}", t.expected);
    }
    eprintln!(
        "fuzz: {} of {} frames the skb test run may refuse (untagged IPv4/IPv6 with a short L3 header) were refused",
        veth.refused, veth.refusable
    );
    eprintln!("fuzz: {} frames in {:.1} s", frames, elapsed.as_secs_f64());

    // Refusals: only the documented ones (checked frame by frame), by a
    // kernel that either has the check or not, and few.
    assert!(
        veth.refused == 0 || veth.refused == veth.refusable,
        "the skb test run refused {} of {} short frames: it should refuse all or none",
        veth.refused,
        veth.refusable
    );
    assert!(
        veth.refused * 20 <= veth.per_direction[1] + veth.refused,
        "{} of {} TC frames refused: more than 5 %",
        veth.refused,
        veth.per_direction[1] + veth.refused
    );

    // The generator reaches every class and every rule outcome, in each
    // direction, on each link.
    for (t, policy) in [(&veth, &oracle), (&ip, &ip_oracle)] {
        if t.per_direction.iter().any(|n| *n < COVERAGE_MIN) {
            continue;
        }
        let missing: Vec<String> = must_reach(policy, t.link)
            .into_iter()
            .filter(|l| !t.expected.contains_key(l))
            .collect();
        assert!(
            missing.is_empty(),
            "{}: no fuzzed frame was counted as {missing:?}",
            t.name
        );
    }
    drop(nw);
    let _ = std::fs::remove_dir_all(&dir);
}
