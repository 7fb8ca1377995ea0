//! Part 1: per-packet program cost through BPF_PROG_TEST_RUN, per traffic
//! class, for netwatch, xdp-filter (dropping the same ports) and a bare
//! `XDP_DROP`.

use std::net::Ipv6Addr;

use netwatch_common::Direction::Inbound;
use netwatch_user::policy::{Mode, Policy, Rule};

use super::{
    Size, median,
    programs::{BenchObject, DropProgram, Timed, XdpFilter},
};
use crate::{
    frames::{Ext, Frame},
    harness::{Harness, Hook},
    netns::{Netns, veth},
};

const SRC: [u8; 4] = [198, 18, 0, 1];
const DST: [u8; 4] = [198, 18, 0, 2];
const BLOCKED: [u8; 4] = [198, 18, 0, 99];

fn v6(last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last)
}

pub struct Class {
    pub name: &'static str,
    pub frame: Vec<u8>,
    /// Netwatch runs this class in monitor mode (counting, not dropping).
    pub monitor: bool,
}

pub fn classes() -> Vec<Class> {
    let c = |name, frame: Frame, monitor| Class {
        name,
        frame: frame.build(),
        monitor,
    };
    vec![
        c("unmatched IPv4 UDP (udp/53)", Frame::udp4(SRC, DST, 40000, 53), false),
        c("udp/137 counted", Frame::udp4(SRC, DST, 40000, 137), true),
        c("udp/137 dropped", Frame::udp4(SRC, DST, 40000, 137), false),
        c("tcp/5190 dropped", Frame::tcp4(SRC, DST, 40000, 5190), false),
        c(
            "IPv6 TCP, 3 ext headers, tcp/5190",
            Frame::tcp6(v6(1), v6(2), 40000, 5190).ipv6_ext(&[Ext::HopByHop, Ext::Routing, Ext::DestOpts]),
            false,
        ),
        c(
            "IPv6 UDP, 12 ext headers, udp/137",
            Frame::udp6(v6(1), v6(2), 40000, 137).ipv6_ext(&[Ext::DestOpts; 12]),
            false,
        ),
        c(
            "IPv6, 13 ext headers (fails closed)",
            Frame::udp6(v6(1), v6(2), 40000, 53).ipv6_ext(&[Ext::DestOpts; 13]),
            false,
        ),
        c(
            "TCP tiny first fragment (fails closed)",
            Frame::tcp4(SRC, DST, 40000, 80).ipv4_fragment(0, true).l4_keep(8),
            false,
        ),
        c(
            "PPPoE udp/137 dropped",
            Frame::udp4(SRC, DST, 40000, 137).pppoe(),
            false,
        ),
        c(
            "802.1Q udp/137 dropped",
            Frame::udp4(SRC, DST, 40000, 137).vlan(&[0x8100]),
            false,
        ),
        c(
            "source already blocked (udp/138)",
            Frame::udp4(BLOCKED, DST, 40000, 138),
            false,
        ),
    ]
}

pub struct Row {
    pub class: &'static str,
    pub netwatch: f64,
    pub xdp_filter: f64,
    pub bare_drop: f64,
}

/// Netwatch as the benchmark runs it: udp/137 and tcp/5190 dropped,
/// udp/138 counted with auto-block, and one source already auto-blocked.
fn netwatch(mode: Mode) -> Harness {
    let mut auto: Rule = "udp/138=count".parse().unwrap();
    auto.detection.threshold = 2;
    auto.detection.block_secs = Some(3600);
    let policy = Policy::new(
        mode,
        vec!["udp/137".parse().unwrap(), "tcp/5190".parse().unwrap(), auto],
    );
    let h = Harness::new(&policy);
    for dst in [[198, 18, 1, 1], [198, 18, 1, 2]] {
        h.run(Hook::Xdp(Inbound), &Frame::udp4(BLOCKED, dst, 1, 138).build());
    }
    h
}

pub fn run(size: Size) -> Vec<Row> {
    let enforce = netwatch(Mode::Enforce);
    let monitor = netwatch(Mode::Monitor);
    assert_eq!(
        enforce.run(Hook::Xdp(Inbound), &Frame::udp4(BLOCKED, DST, 1, 138).build()),
        1,
        "auto-block set-up"
    );
    let bench = BenchObject::load();
    let ns = Netns::new("cost");
    let peer = Netns::new("costp");
    veth(&ns, "nwb-f0", "198.18.0.2/24", &peer, "nwb-f1", "198.18.0.1/24");
    let filter = XdpFilter::load(&ns, "nwb-f0", "all");

    let mut rows = Vec::new();
    for class in classes() {
        let h = if class.monitor { &monitor } else { &enforce };
        let mut nw = Vec::new();
        let mut xf = Vec::new();
        let mut bare = Vec::new();
        // Interleave the three so drift hits them alike.
        for _ in 0..size.rounds {
            nw.push(h.time(Hook::Xdp(Inbound), &class.frame, size.repeat).as_nanos() as f64);
            xf.push(filter.ns_per_run(&class.frame, size.repeat));
            bare.push(DropProgram(&bench).ns_per_run(&class.frame, size.repeat));
        }
        rows.push(Row {
            class: class.name,
            netwatch: median(nw),
            xdp_filter: median(xf),
            bare_drop: median(bare),
        });
    }
    rows
}

pub fn print(rows: &[Row]) {
    println!(
        "| traffic class | netwatch ns | xdp-filter ns | bare XDP_DROP ns | netwatch / xdp-filter | netwatch / XDP_DROP |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
            r.class,
            r.netwatch,
            r.xdp_filter,
            r.bare_drop,
            r.netwatch / r.xdp_filter,
            r.netwatch / r.bare_drop
        );
    }
}
