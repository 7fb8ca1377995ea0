//! Part 1: per-packet program cost through BPF_PROG_TEST_RUN, per traffic
//! class, for netwatch (empty lists, and a deployment's 1,000-entry
//! allowlist), xdp-filter in three feature sets (dropping the same ports)
//! and a bare `XDP_DROP`. Every timed run's verdict is checked against
//! the class's expected verdict; a mismatch aborts the benchmark.

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
const SCANNER: [u8; 4] = [198, 18, 0, 50];

fn v6(last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last)
}

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

fn verdict_name(v: u32) -> &'static str {
    match v {
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_ABORTED => "XDP_ABORTED",
        3 => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "?",
    }
}

/// The rule port a class's frame carries, as xdp-filter sees it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Udp137,
    Tcp5190,
    Other,
}

pub struct Class {
    pub name: &'static str,
    pub frame: Vec<u8>,
    /// Netwatch runs this class in monitor mode (counting, not dropping).
    pub monitor: bool,
    /// What netwatch must return.
    pub netwatch: u32,
    pub port: Port,
    /// What xdp-filter returns when its parser does not reach the port,
    /// if its features make it look for this L4 protocol (`None`: it
    /// reaches the port, and drops it if its features cover it). It passes
    /// PPPoE (an ethertype it does not know) and aborts (XDP_ABORTED:
    /// dropped, with a trace event) on an IPv6 extension-header chain
    /// longer than it walks and on a TCP header cut short.
    pub xdpf_unparsed: Option<(u32, &'static str)>,
}

/// One xdp-filter instance the benchmark times: its feature set, and
/// whether it runs through libxdp's dispatcher (as xdp-filter loads by
/// default) or as its program itself.
#[derive(Clone, Copy)]
pub struct Xdpf {
    pub features: &'static str,
    pub dispatcher: bool,
}

impl Xdpf {
    pub fn label(&self) -> String {
        format!(
            "xdp-filter -f {}{}",
            self.features,
            if self.dispatcher { "" } else { " (program itself)" }
        )
    }
}

/// The xdp-filter instances, leanest feature set first: `tcp,udp` is the
/// leanest that drops both of netwatch's rule ports (xdp-filter has no
/// tcp+udp program, so it loads the same `xdpfilt_dny_all` as `all`).
/// Indices: [`UDP`], [`TCP_UDP`], [`ALL`] through the dispatcher,
/// [`UDP_ITSELF`], [`ALL_ITSELF`] without it.
pub const XDPF: [Xdpf; 5] = [
    Xdpf {
        features: "udp",
        dispatcher: true,
    },
    Xdpf {
        features: "tcp,udp",
        dispatcher: true,
    },
    Xdpf {
        features: "all",
        dispatcher: true,
    },
    Xdpf {
        features: "udp",
        dispatcher: false,
    },
    Xdpf {
        features: "all",
        dispatcher: false,
    },
];
pub const UDP: usize = 0;
pub const TCP_UDP: usize = 1;
pub const ALL: usize = 2;
pub const UDP_ITSELF: usize = 3;
pub const ALL_ITSELF: usize = 4;
const N: usize = XDPF.len();

impl Class {
    /// What xdp-filter loaded with `features` must return.
    pub fn xdpf_verdict(&self, features: &str) -> u32 {
        let covered = match self.port {
            Port::Udp137 => features.contains("udp") || features == "all",
            Port::Tcp5190 => features.contains("tcp") || features == "all",
            Port::Other => false,
        };
        match self.xdpf_unparsed {
            Some((v, l4)) if features.contains(l4) || features == "all" => v,
            Some(_) => XDP_PASS,
            None if covered => XDP_DROP,
            None => XDP_PASS,
        }
    }
}

pub fn classes() -> Vec<Class> {
    const PARSES: Option<(u32, &str)> = None;
    const PASSES: Option<(u32, &str)> = Some((XDP_PASS, "udp"));
    const ABORTS_UDP: Option<(u32, &str)> = Some((XDP_ABORTED, "udp"));
    const ABORTS_TCP: Option<(u32, &str)> = Some((XDP_ABORTED, "tcp"));
    let c = |name, frame: Frame, monitor, netwatch, port, xdpf_unparsed| Class {
        name,
        frame: frame.build(),
        monitor,
        netwatch,
        port,
        xdpf_unparsed,
    };
    use Port::*;
    vec![
        c(
            "unmatched IPv4 UDP (udp/53)",
            Frame::udp4(SRC, DST, 40000, 53),
            false,
            XDP_PASS,
            Other,
            PARSES,
        ),
        c(
            "udp/137 counted",
            Frame::udp4(SRC, DST, 40000, 137),
            true,
            XDP_PASS,
            Udp137,
            PARSES,
        ),
        c(
            "udp/137 dropped",
            Frame::udp4(SRC, DST, 40000, 137),
            false,
            XDP_DROP,
            Udp137,
            PARSES,
        ),
        c(
            "tcp/5190 dropped",
            Frame::tcp4(SRC, DST, 40000, 5190),
            false,
            XDP_DROP,
            Tcp5190,
            PARSES,
        ),
        c(
            "IPv6 TCP, 3 ext headers, tcp/5190",
            Frame::tcp6(v6(1), v6(2), 40000, 5190).ipv6_ext(&[Ext::HopByHop, Ext::Routing, Ext::DestOpts]),
            false,
            XDP_DROP,
            Tcp5190,
            PARSES,
        ),
        c(
            "IPv6 UDP, 12 ext headers, udp/137",
            Frame::udp6(v6(1), v6(2), 40000, 137).ipv6_ext(&[Ext::DestOpts; 12]),
            false,
            XDP_DROP,
            Udp137,
            ABORTS_UDP,
        ),
        c(
            "IPv6, 13 ext headers (fails closed)",
            Frame::udp6(v6(1), v6(2), 40000, 53).ipv6_ext(&[Ext::DestOpts; 13]),
            false,
            XDP_DROP,
            Other,
            ABORTS_UDP,
        ),
        c(
            "TCP tiny first fragment (fails closed)",
            Frame::tcp4(SRC, DST, 40000, 80).ipv4_fragment(0, true).l4_keep(8),
            false,
            XDP_DROP,
            Other,
            ABORTS_TCP,
        ),
        c(
            "PPPoE udp/137 dropped",
            Frame::udp4(SRC, DST, 40000, 137).pppoe(),
            false,
            XDP_DROP,
            Udp137,
            PASSES,
        ),
        c(
            "802.1Q udp/137 dropped",
            Frame::udp4(SRC, DST, 40000, 137).vlan(&[0x8100]),
            false,
            XDP_DROP,
            Udp137,
            PARSES,
        ),
        c(
            "source already blocked (udp/138)",
            Frame::udp4(BLOCKED, DST, 40000, 138),
            false,
            XDP_DROP,
            Other,
            PARSES,
        ),
    ]
}

/// Aborts the benchmark when a timed run returned the wrong verdict.
fn check(program: &str, class: &str, got: u32, want: u32) {
    assert!(
        got == want,
        "benchmark aborted: {program} returned {} ({got}) for \"{class}\", expected {} ({want}); \
         the programs compared must drop what they should drop and pass the rest",
        verdict_name(got),
        verdict_name(want)
    );
}

pub struct Row {
    pub class: &'static str,
    pub netwatch_verdict: u32,
    pub netwatch: f64,
    /// Netwatch with a deployment's lists (1,000 allowlist entries, none
    /// matching the bench traffic).
    pub netwatch_lists: f64,
    /// xdp-filter per [`XDPF`], and the verdicts it returned.
    pub xdp_filter: [f64; N],
    pub xdpf_verdicts: [u32; N],
    pub bare_drop: f64,
}

/// The scanner (cold-memo) class, measured one run per call.
pub struct Scanner {
    pub destinations: u32,
    pub calls: u32,
    /// ns per call, one run each: netwatch with a new destination every
    /// call, netwatch repeating one frame (memo warm), xdp-filter per
    /// [`XDPF`] and bare XDP_DROP on the same frames.
    pub netwatch_cold: f64,
    pub netwatch_warm: f64,
    pub xdp_filter: [f64; N],
    pub bare_drop: f64,
    /// Bare XDP_DROP's ns per run with `repeat` runs per call (the
    /// "udp/137 dropped" class): the per-call overhead is
    /// `bare_drop - bare_repeat`.
    pub bare_repeat: f64,
}

impl Scanner {
    /// A one-run-per-call figure minus the per-call overhead (timer
    /// reads, cold caches) that the bare program shows.
    pub fn net(&self, per_call: f64) -> f64 {
        per_call - (self.bare_drop - self.bare_repeat)
    }
}

pub struct Report {
    pub rows: Vec<Row>,
    pub scanner: Scanner,
}

impl Report {
    pub fn row(&self, class: &str) -> &Row {
        self.rows.iter().find(|r| r.class == class).expect("class measured")
    }
}

/// A deployment's allowlist: 1,000 entries (600 IPv4 /24s, 400 IPv6
/// /48s), none covering the bench traffic (198.18.0.0/15, 2001:db8::/32).
pub fn deployment_allowlist() -> Vec<ipnet::IpNet> {
    let v4 = (0..600u32).map(|i| format!("10.{}.{}.0/24", i / 256, i % 256));
    let v6 = (0..400u32).map(|i| format!("fd00:{:x}:{:x}::/48", i / 256 + 1, i % 256));
    v4.chain(v6).map(|s| s.parse().unwrap()).collect()
}

/// Netwatch as the benchmark runs it: udp/137 and tcp/5190 dropped,
/// udp/138 counted with auto-block, and one source already auto-blocked.
fn netwatch(mode: Mode, lists: bool) -> Harness {
    let mut auto: Rule = "udp/138=count".parse().unwrap();
    auto.detection.threshold = 2;
    auto.detection.block_secs = Some(3600);
    let mut policy = Policy::new(
        mode,
        vec!["udp/137".parse().unwrap(), "tcp/5190".parse().unwrap(), auto],
    );
    if lists {
        policy.allowlist = deployment_allowlist();
    }
    let h = Harness::new(&policy);
    for dst in [[198, 18, 1, 1], [198, 18, 1, 2]] {
        h.run(Hook::Xdp(Inbound), &Frame::udp4(BLOCKED, dst, 1, 138).build());
    }
    assert_eq!(
        h.run(Hook::Xdp(Inbound), &Frame::udp4(BLOCKED, DST, 1, 138).build()),
        if mode == Mode::Enforce { XDP_DROP } else { XDP_PASS },
        "auto-block set-up"
    );
    h
}

/// Mean ns per call over `calls` calls of one run each, cycling through
/// `frames`; every verdict checked against `want`.
fn per_call(mut run: impl FnMut(&[u8]) -> (f64, u32), frames: &[Vec<u8>], calls: u32, what: &str, want: u32) -> f64 {
    let mut total = 0.0;
    for i in 0..calls as usize {
        let (ns, verdict) = run(&frames[i % frames.len()]);
        check(what, "scanner", verdict, want);
        total += ns;
    }
    total / calls as f64
}

pub fn run(size: Size) -> Report {
    super::pin_to_cpu0();
    let enforce = netwatch(Mode::Enforce, false);
    let monitor = netwatch(Mode::Monitor, false);
    let enforce_lists = netwatch(Mode::Enforce, true);
    let monitor_lists = netwatch(Mode::Monitor, true);
    let bench = BenchObject::load();
    let ns = Netns::new("cost");
    let peer = Netns::new("costp");
    // One veth per xdp-filter instance (one program per device).
    let filters: Vec<XdpFilter> = XDPF
        .iter()
        .enumerate()
        .map(|(i, xdpf)| {
            let (a, b) = (format!("nwb-f{i}"), format!("nwb-p{i}"));
            veth(
                &ns,
                &a,
                &format!("198.18.{}.2/24", 10 + i),
                &peer,
                &b,
                &format!("198.18.{}.1/24", 10 + i),
            );
            XdpFilter::load_as(&ns, &a, xdpf.features, xdpf.dispatcher)
        })
        .collect();
    let bare = DropProgram(&bench);
    let nw = |h: &Harness, frame: &[u8], repeat| {
        let (d, v) = h.time_verdict(Hook::Xdp(Inbound), frame, repeat);
        (d.as_nanos() as f64, v)
    };

    let mut rows = Vec::new();
    for class in classes() {
        let (h, hl) = if class.monitor {
            (&monitor, &monitor_lists)
        } else {
            (&enforce, &enforce_lists)
        };
        let mut t_nw = Vec::new();
        let mut t_nwl = Vec::new();
        let mut t_xf: [Vec<f64>; N] = Default::default();
        let mut t_bare = Vec::new();
        let mut xf_verdicts = [0; N];
        // Interleave the programs so drift hits them alike.
        for _ in 0..size.rounds {
            let (t, v) = nw(h, &class.frame, size.repeat);
            check("netwatch", class.name, v, class.netwatch);
            t_nw.push(t);
            let (t, v) = nw(hl, &class.frame, size.repeat);
            check("netwatch (1,000-entry allowlist)", class.name, v, class.netwatch);
            t_nwl.push(t);
            for (i, f) in filters.iter().enumerate() {
                let (t, v) = f.timed(&class.frame, size.repeat);
                check(&XDPF[i].label(), class.name, v, class.xdpf_verdict(XDPF[i].features));
                xf_verdicts[i] = v;
                t_xf[i].push(t);
            }
            let (t, v) = bare.timed(&class.frame, size.repeat);
            check("bare XDP_DROP", class.name, v, XDP_DROP);
            t_bare.push(t);
        }
        rows.push(Row {
            class: class.name,
            netwatch_verdict: class.netwatch,
            netwatch: median(t_nw),
            netwatch_lists: median(t_nwl),
            xdp_filter: t_xf.map(median),
            xdpf_verdicts: xf_verdicts,
            bare_drop: median(t_bare),
        });
    }

    // The scanner: one source, a new destination on every packet. A
    // BPF_PROG_TEST_RUN call repeats one frame, so the memo would be warm
    // after the first run; instead every call runs once, cycling through
    // `destinations` frames, interleaved with the same one-run calls for
    // the other programs (the kernel's per-run time then includes a
    // per-call overhead, which bare XDP_DROP measures).
    let destinations = 4096u32;
    let frames: Vec<Vec<u8>> = (0..destinations)
        .map(|i| Frame::udp4(SCANNER, [198, 19, (i >> 8) as u8, i as u8], 40000, 137).build())
        .collect();
    let calls = (size.repeat / 25).max(4096);
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    let mut t_xf: [Vec<f64>; N] = Default::default();
    let mut t_bare = Vec::new();
    for _ in 0..size.rounds {
        cold.push(per_call(|f| nw(&enforce, f, 1), &frames, calls, "netwatch", XDP_DROP));
        warm.push(per_call(
            |f| nw(&enforce, f, 1),
            &frames[..1],
            calls,
            "netwatch",
            XDP_DROP,
        ));
        for (i, f) in filters.iter().enumerate() {
            let what = XDPF[i].label();
            t_xf[i].push(per_call(|fr| f.timed(fr, 1), &frames, calls, &what, XDP_DROP));
        }
        t_bare.push(per_call(
            |f| bare.timed(f, 1),
            &frames,
            calls,
            "bare XDP_DROP",
            XDP_DROP,
        ));
    }
    let bare_repeat = rows.iter().find(|r| r.class == "udp/137 dropped").unwrap().bare_drop;
    Report {
        rows,
        scanner: Scanner {
            destinations,
            calls,
            netwatch_cold: median(cold),
            netwatch_warm: median(warm),
            xdp_filter: t_xf.map(median),
            bare_drop: median(t_bare),
            bare_repeat,
        },
    }
}

pub fn print(report: &Report) {
    println!(
        "xdp-filter columns: `-f udp` (drops udp/137 only), `-f tcp,udp` (the leanest that drops both rule \
         ports: xdp-filter loads xdpfilt_dny_all for it), `-f all` (its default), each through libxdp's \
         dispatcher as xdp-filter loads by default; \"itself\": the same program attached without the \
         dispatcher (LIBXDP_SKIP_DISPATCHER=1). netwatch is timed as its own program (it uses no \
         dispatcher). Verdicts (0 XDP_ABORTED, 1 XDP_DROP, 2 XDP_PASS) were checked on every timed run.\n"
    );
    println!(
        "| traffic class | verdict nw / xf udp, tcp+udp, all | netwatch ns | netwatch, 1k allowlist ns | \
         xdp-filter udp ns | xdp-filter udp itself ns | xdp-filter tcp,udp ns | xdp-filter all ns | \
         xdp-filter all itself ns | bare XDP_DROP ns | **netwatch / xdp-filter udp** | netwatch / xdp-filter \
         udp itself | netwatch / xdp-filter tcp,udp | netwatch / xdp-filter all | netwatch / XDP_DROP |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &report.rows {
        let x = r.xdp_filter;
        let v = r.xdpf_verdicts;
        println!(
            "| {} | {} / {}, {}, {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | **{:.2}** | {:.2} | {:.2} | {:.2} | {:.2} |",
            r.class,
            r.netwatch_verdict,
            v[UDP],
            v[TCP_UDP],
            v[ALL],
            r.netwatch,
            r.netwatch_lists,
            x[UDP],
            x[UDP_ITSELF],
            x[TCP_UDP],
            x[ALL],
            x[ALL_ITSELF],
            r.bare_drop,
            r.netwatch / x[UDP],
            r.netwatch / x[UDP_ITSELF],
            r.netwatch / x[TCP_UDP],
            r.netwatch / x[ALL],
            r.netwatch / r.bare_drop
        );
    }
    let s = &report.scanner;
    println!(
        "\nScanner (cold memo): one source, udp/137 to a new destination on every packet ({} destinations \
         cycled), one run per BPF_PROG_TEST_RUN call ({} calls, median of rounds), interleaved with the same \
         one-run calls for the others. ns per call includes a per-call overhead: bare XDP_DROP takes {:.1} ns \
         per call vs {:.1} ns per run repeated, so \"net\" = per call - {:.1} ns.\n",
        s.destinations,
        s.calls,
        s.bare_drop,
        s.bare_repeat,
        s.bare_drop - s.bare_repeat
    );
    println!(
        "| program | ns per call | net ns per packet | net / xdp-filter all | net / xdp-filter all itself | net / xdp-filter udp | net / XDP_DROP (repeated) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let line = |name: &str, v: f64| {
        let n = s.net(v);
        println!(
            "| {name} | {v:.1} | {n:.1} | {:.2} | {:.2} | {:.2} | {:.2} |",
            n / s.net(s.xdp_filter[ALL]),
            n / s.net(s.xdp_filter[ALL_ITSELF]),
            n / s.net(s.xdp_filter[UDP]),
            n / s.bare_repeat
        )
    };
    line("netwatch, new destination every packet (scanner)", s.netwatch_cold);
    line("netwatch, one destination (memo warm)", s.netwatch_warm);
    for (x, ns) in XDPF.iter().zip(s.xdp_filter) {
        line(&x.label(), ns);
    }
    line("bare XDP_DROP", s.bare_drop);
}
