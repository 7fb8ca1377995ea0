//! Part 2: flood drop rate on a veth pair. The live-frames generator
//! in one namespace transmits a udp/137 flood to the device under test in
//! another, on the same core; the rate is frames over wall time, for each
//! filter in turn, on the same frames.

use std::{process::Command, time::Duration};

use super::{
    Size, median,
    programs::{BenchObject, XdpFilter},
    sh,
};
use crate::{
    daemon::Netwatch,
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

    fn gro(&self, on: bool) {
        sh(self
            .dut
            .command("ethtool")
            .args(["-K", DUT_IF, "gro", if on { "on" } else { "off" }]));
    }
}

impl Default for Rig {
    fn default() -> Self {
        Self::new()
    }
}

pub struct Row {
    pub name: &'static str,
    pub mpps: f64,
}

pub fn run(size: Size) -> Vec<Row> {
    let mut rig = Rig::new();
    let mut rows = Vec::new();
    let mut row = |name, mpps| rows.push(Row { name, mpps });

    // Bare XDP_DROP: the floor.
    let id = rig.bench.attach_drop(&rig.dut, DUT_IF);
    row("bare XDP_DROP", rig.rate(&rig.probe, size));
    rig.bench.detach_drop(id);

    // netwatch, enforce mode, per-source tracking included.
    {
        let pins = format!("/sys/fs/bpf/{}", crate::unique("fl"));
        let nw = Netwatch::start(&rig.dut, &pins, &["--iface", DUT_IF, "--mode", "enforce"]);
        row("netwatch enforce (udp/137 drop)", rig.rate(&rig.probe, size));
        row(
            "netwatch, unmatched udp/53 passed to the stack",
            rig.rate(&rig.unmatched, size),
        );
        drop(nw);
    }
    {
        let _f = XdpFilter::load(&rig.dut, DUT_IF, "all");
        row("xdp-filter (default: all features)", rig.rate(&rig.probe, size));
    }
    {
        let _f = XdpFilter::load(&rig.dut, DUT_IF, "udp");
        row("xdp-filter (udp only)", rig.rate(&rig.probe, size));
    }
    // Stack-side filters need the frames delivered without XDP: GRO on.
    rig.gro(true);
    {
        sh(rig
            .dut
            .command("nft")
            .args(["add", "table", "netdev", "netwatch_bench"]));
        let chain = format!("{{ type filter hook ingress device \"{DUT_IF}\" priority -500 ; }}");
        sh(rig
            .dut
            .command("nft")
            .args(["add", "chain", "netdev", "netwatch_bench", "ingress", chain.as_str()]));
        sh(rig.dut.command("nft").args([
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
        row("nftables netdev ingress drop", rig.rate(&rig.probe, size));
        sh(rig
            .dut
            .command("nft")
            .args(["delete", "table", "netdev", "netwatch_bench"]));
    }
    {
        sh(rig.dut.command("iptables").args([
            "-t",
            "raw",
            "-A",
            "PREROUTING",
            "-p",
            "udp",
            "--dport",
            "137",
            "-j",
            "DROP",
        ]));
        row("iptables raw PREROUTING drop", rig.rate(&rig.probe, size));
        sh(rig.dut.command("iptables").args(["-t", "raw", "-F", "PREROUTING"]));
    }
    row("no filter (the stack answers udp/137)", rig.rate(&rig.probe, size));
    row("no filter, unmatched udp/53", rig.rate(&rig.unmatched, size));
    rig.gro(false);
    std::thread::sleep(Duration::from_millis(10));
    rows
}

pub fn print(rows: &[Row]) {
    let floor = rows
        .iter()
        .find(|r| r.name == "bare XDP_DROP")
        .map(|r| r.mpps)
        .unwrap_or(f64::NAN);
    let filter = rows
        .iter()
        .find(|r| r.name.starts_with("xdp-filter (default"))
        .map(|r| r.mpps)
        .unwrap_or(f64::NAN);
    println!("| device under test | Mpps | / bare XDP_DROP | / xdp-filter (default) |");
    println!("|---|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} |",
            r.name,
            r.mpps,
            r.mpps / floor,
            r.mpps / filter
        );
    }
}
