//! Part 2: flood drop rate on veth pairs. The live-frames generator (or,
//! where the kernel refuses live frames, the AF_PACKET sender) in one
//! namespace transmits a udp/137 flood to the device under test in
//! another, on the same core; the rate is frames over wall time. Every
//! filter sits on its own veth pair, all set up at once, so the rounds are
//! interleaved (A, B, C, A, B, C, ...); after each round the device under
//! test's counters must show it processed every frame, or the round is
//! reported as short and left out of the median.

use std::process::Command;

use super::{
    Size, median,
    programs::{BenchObject, XdpFilter},
    sh,
};
use crate::{
    daemon::{Netwatch, try_sample},
    frames::Frame,
    netns::{Netns, veth},
};

pub const GEN_IF: &str = "nwb-gen0";
pub const DUT_IF: &str = "nwb-dut0";

pub struct Rig {
    pub gen_ns: Netns,
    pub dut: Netns,
    pub bench: BenchObject,
    /// A udp/137 frame addressed to the device under test.
    pub probe: Vec<u8>,
    /// A udp/53 frame (matches no rule).
    pub unmatched: Vec<u8>,
    /// An IPv6 udp/137 frame, 2001:db8:1:: -> 2001:db8::2: the generator
    /// varies the low 32 bits of its source for floods of distinct sources.
    pub probe6: Vec<u8>,
}

impl Rig {
    pub fn new() -> Self {
        let gen_ns = Netns::new("gen");
        let dut = Netns::new("dut");
        veth(&gen_ns, GEN_IF, "198.18.0.1/24", &dut, DUT_IF, "198.18.0.2/24");
        let link: serde_json::Value = serde_json::from_str(&sh(
            Command::new("ip").args(["-n", &dut.name, "-j", "link", "show", DUT_IF])
        ))
        .unwrap();
        let mac: Vec<u8> = link[0]["address"]
            .as_str()
            .unwrap()
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect();
        let frame = |port| {
            let mut f = Frame::udp4([198, 18, 0, 1], [198, 18, 0, 2], 40000, port).build();
            f[..6].copy_from_slice(&mac);
            f
        };
        let mut probe6 = Frame::udp6(
            std::net::Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0),
            std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2),
            40000,
            137,
        )
        .build();
        probe6[..6].copy_from_slice(&mac);
        Rig {
            gen_ns,
            dut,
            bench: BenchObject::load(),
            probe: frame(137),
            unmatched: frame(53),
            probe6,
        }
    }

    /// Million frames per second the generator got through.
    pub fn rate(&self, frame: &[u8], size: Size) -> f64 {
        let runs: Vec<f64> = (0..size.rounds)
            .map(|_| {
                let t = self.bench.flood(&self.gen_ns, GEN_IF, frame, size.flood_frames);
                size.flood_frames as f64 / t.as_secs_f64() / 1e6
            })
            .collect();
        median(runs)
    }
}

impl Default for Rig {
    fn default() -> Self {
        Self::new()
    }
}

/// What filters a lane's device under test.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dut {
    Bare,
    Netwatch,
    XdpFilter(&'static str),
    Nft,
    Iptables,
    None,
}

impl Dut {
    /// Runs an XDP program (frames reach it without GRO).
    fn xdp(self) -> bool {
        matches!(self, Dut::Bare | Dut::Netwatch | Dut::XdpFilter(_))
    }
}

/// One measured row: a frame sent to a device under test.
struct Lane {
    name: &'static str,
    /// Index of the veth pair.
    pair: usize,
    frame: Vec<u8>,
    /// The DUT drops these frames in XDP (its veth's xdp_drops must count
    /// every one).
    xdp_drops: bool,
    /// Netwatch's own counter for this frame: its rule counter (udp/137)
    /// or its unmatched counter.
    netwatch_counter: Option<&'static str>,
}

pub struct Row {
    pub name: &'static str,
    /// Median over the rounds the DUT saw in full (over all rounds when
    /// none did).
    pub mpps: f64,
    pub rounds: usize,
    /// Rounds whose DUT counters showed every frame processed.
    pub full_rounds: usize,
    /// The smallest share of the frames the DUT's counters showed in a
    /// round, and the counter that was short.
    pub worst_seen: f64,
    pub short: Option<String>,
}

fn gen_if(pair: usize) -> String {
    format!("nwb-g{pair}")
}
fn dut_if(pair: usize) -> String {
    format!("nwb-d{pair}")
}

/// A device's `ethtool -S` counters, by name.
fn ethtool_stats(ns: &Netns, dev: &str) -> std::collections::HashMap<String, u64> {
    sh(ns.command("ethtool").args(["-S", dev]))
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Packets a device received (`ip -s link`).
fn rx_packets(ns: &Netns, dev: &str) -> u64 {
    let link: serde_json::Value = serde_json::from_str(&sh(
        Command::new("ip").args(["-n", &ns.name, "-j", "-s", "link", "show", dev])
    ))
    .unwrap();
    link[0]["stats64"]["rx"]["packets"].as_u64().unwrap_or(0)
}

fn mac_of(ns: &Netns, dev: &str) -> Vec<u8> {
    let link: serde_json::Value =
        serde_json::from_str(&sh(Command::new("ip").args(["-n", &ns.name, "-j", "link", "show", dev]))).unwrap();
    link[0]["address"]
        .as_str()
        .unwrap()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

pub fn run(size: Size) -> Vec<Row> {
    let gen_ns = Netns::new("gen");
    let dut = Netns::new("dut");
    let mut bench = BenchObject::load();
    let duts = [
        Dut::Bare,
        Dut::Netwatch,
        Dut::XdpFilter("all"),
        Dut::XdpFilter("udp"),
        Dut::Nft,
        Dut::Iptables,
        Dut::None,
    ];
    let mut frames = Vec::new();
    for (pair, _) in duts.iter().enumerate() {
        veth(
            &gen_ns,
            &gen_if(pair),
            &format!("198.18.{}.1/24", 20 + pair),
            &dut,
            &dut_if(pair),
            &format!("198.18.{}.2/24", 20 + pair),
        );
        let mac = mac_of(&dut, &dut_if(pair));
        let frame = |port| {
            let mut f = Frame::udp4(
                [198, 18, 20 + pair as u8, 1],
                [198, 18, 20 + pair as u8, 2],
                40000,
                port,
            )
            .build();
            f[..6].copy_from_slice(&mac);
            f
        };
        frames.push((frame(137), frame(53)));
    }
    let lane = |name, pair: usize, unmatched: bool, xdp_drops, netwatch_counter| Lane {
        name,
        pair,
        frame: if unmatched {
            frames[pair].1.clone()
        } else {
            frames[pair].0.clone()
        },
        xdp_drops,
        netwatch_counter,
    };
    let lanes = [
        lane("bare XDP_DROP", 0, false, true, None),
        lane(
            "netwatch enforce (udp/137 drop)",
            1,
            false,
            true,
            Some("netwatch_packets_total"),
        ),
        lane(
            "netwatch, unmatched udp/53 passed to the stack",
            1,
            true,
            false,
            Some("netwatch_unmatched_packets_total"),
        ),
        lane("xdp-filter (default: all features)", 2, false, true, None),
        lane("xdp-filter (udp only)", 3, false, true, None),
        lane("nftables netdev ingress drop", 4, false, false, None),
        lane("iptables raw PREROUTING drop", 5, false, false, None),
        lane("no filter (the stack answers udp/137)", 6, false, false, None),
        lane("no filter, unmatched udp/53", 6, true, false, None),
    ];

    // Set every device under test up at once.
    let bare_link = bench.attach_drop(&dut, &dut_if(0));
    let pins = format!("/sys/fs/bpf/{}", crate::unique("fl"));
    let nw = Netwatch::start(&dut, &pins, &["--iface", &dut_if(1), "--mode", "enforce"]);
    let _xdpf_all = XdpFilter::load(&dut, &dut_if(2), "all");
    let _xdpf_udp = XdpFilter::load(&dut, &dut_if(3), "udp");
    // Stack-side filters need the frames delivered without XDP: GRO on.
    for (pair, d) in duts.iter().enumerate() {
        if !d.xdp() {
            sh(dut.command("ethtool").args(["-K", &dut_if(pair), "gro", "on"]));
        }
    }
    let nft_if = dut_if(4);
    sh(dut.command("nft").args(["add", "table", "netdev", "netwatch_bench"]));
    let chain = format!("{{ type filter hook ingress device \"{nft_if}\" priority -500 ; }}");
    sh(dut
        .command("nft")
        .args(["add", "chain", "netdev", "netwatch_bench", "ingress", chain.as_str()]));
    sh(dut.command("nft").args([
        "add",
        "rule",
        "netdev",
        "netwatch_bench",
        "ingress",
        "udp",
        "dport",
        "137",
        "drop",
    ]));
    let ipt_rule = |op: &str| {
        let ipt_if = dut_if(5);
        sh(dut.command("iptables").args([
            "-t",
            "raw",
            op,
            "PREROUTING",
            "-i",
            &ipt_if,
            "-p",
            "udp",
            "--dport",
            "137",
            "-j",
            "DROP",
        ]));
    };
    ipt_rule("-A");

    let netwatch_count = |metric: &str, pair: usize| {
        try_sample(&nw.metrics(&dut), metric, &[("interface", dut_if(pair).as_str())]).unwrap_or(0.0) as u64
    };
    // Per lane: rates of all rounds, rates of the full rounds, share of
    // the frames seen per round, the first short round's account.
    type Tally = (Vec<f64>, Vec<f64>, Vec<f64>, Option<String>);
    let mut results: Vec<Tally> = lanes
        .iter()
        .map(|_| (Vec::new(), Vec::new(), Vec::new(), None))
        .collect();
    for _ in 0..size.rounds {
        for (l, res) in lanes.iter().zip(results.iter_mut()) {
            let dev = dut_if(l.pair);
            let before = ethtool_stats(&dut, &dev);
            let nw_before = l.netwatch_counter.map(|m| netwatch_count(m, l.pair));
            let rx_before = rx_packets(&dut, &dev);
            let t = bench.flood(&gen_ns, &gen_if(l.pair), &l.frame, size.flood_frames);
            let after = ethtool_stats(&dut, &dev);
            let delta = |k: &str| after.get(k).unwrap_or(&0) - before.get(k).unwrap_or(&0);
            // What the device took in: frames redirected into a veth by
            // the live-frames generator go through its XDP path (counted
            // there with or without a program); frames an AF_PACKET sender
            // transmits reach a veth without XDP as ordinary packets.
            let xdp_path = delta("rx_queue_0_xdp_packets");
            let mut counts = if duts[l.pair].xdp() {
                vec![("veth rx_queue_0_xdp_packets", xdp_path)]
            } else {
                let stack = rx_packets(&dut, &dev) - rx_before;
                vec![("veth rx_queue_0_xdp_packets or rx_packets", xdp_path.max(stack))]
            };
            if l.xdp_drops {
                counts.push(("veth rx_queue_0_xdp_drops", delta("rx_queue_0_xdp_drops")));
            }
            if let (Some(m), Some(b)) = (l.netwatch_counter, nw_before) {
                counts.push((m, netwatch_count(m, l.pair) - b));
            }
            let frames = size.flood_frames as u64;
            let worst = counts.iter().min_by_key(|c| c.1).unwrap();
            let mpps = size.flood_frames as f64 / t.as_secs_f64() / 1e6;
            res.0.push(mpps);
            res.2.push(worst.1 as f64 / frames as f64);
            if worst.1 >= frames {
                res.1.push(mpps);
            } else if res.3.is_none() {
                res.3 = Some(format!("{} counted {} of {frames}", worst.0, worst.1));
            }
        }
    }

    ipt_rule("-D");
    sh(dut.command("nft").args(["delete", "table", "netdev", "netwatch_bench"]));
    drop(nw);
    bench.detach_drop(bare_link);
    lanes
        .iter()
        .zip(results)
        .map(|(l, (all, full, seen, short))| Row {
            name: l.name,
            rounds: all.len(),
            full_rounds: full.len(),
            mpps: if full.is_empty() { median(all) } else { median(full) },
            worst_seen: seen.iter().cloned().fold(f64::INFINITY, f64::min),
            short,
        })
        .collect()
}

pub fn find(rows: &[Row], prefix: &str) -> f64 {
    rows.iter()
        .find(|r| r.name.starts_with(prefix))
        .map(|r| r.mpps)
        .unwrap_or(f64::NAN)
}

pub fn print(rows: &[Row]) {
    let floor = find(rows, "bare XDP_DROP");
    let filter = find(rows, "xdp-filter (default");
    let filter_udp = find(rows, "xdp-filter (udp");
    println!(
        "| device under test | Mpps | / bare XDP_DROP | / xdp-filter (default) | / xdp-filter (udp only) | rounds the DUT saw in full |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {} of {} |",
            r.name,
            r.mpps,
            r.mpps / floor,
            r.mpps / filter,
            r.mpps / filter_udp,
            r.full_rounds,
            r.rounds
        );
    }
    for r in rows.iter().filter(|r| r.full_rounds < r.rounds) {
        println!(
            "\nSHORT ROUNDS: {}: {} of {} rounds short (worst: {:.1} % of the frames; {}); {}",
            r.name,
            r.rounds - r.full_rounds,
            r.rounds,
            r.worst_seen * 100.0,
            r.short.as_deref().unwrap_or(""),
            if r.full_rounds == 0 {
                "its rate is over all rounds"
            } else {
                "its rate is over the full rounds only"
            }
        );
    }
}
