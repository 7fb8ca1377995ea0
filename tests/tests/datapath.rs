//! The verified datapath on crafted frames (BPF_PROG_TEST_RUN): parsing,
//! rule matching, directions, modes, lists and counters.

use std::net::Ipv6Addr;

use netwatch_common::Direction::{Inbound, Outbound};
use netwatch_tests::{
    frames::{Ext, Frame, ICMP, arp},
    harness::{Harness, Hook, policy},
    require_privileged,
};
use netwatch_user::policy::{Mode, parse_cidr};

const A: [u8; 4] = [198, 18, 0, 1];
const B: [u8; 4] = [198, 18, 0, 2];

fn v6(last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last)
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// An IPv6 packet whose payload length ends 8 bytes into its 16-byte
/// hop-by-hop header.
fn ext_cut(port: u16) -> Vec<u8> {
    let mut f = Frame::udp6(v6(1), v6(2), 1, port).ipv6_ext(&[Ext::HopByHop]).build();
    f[18..20].copy_from_slice(&8u16.to_be_bytes());
    f.truncate(14 + 40 + 8);
    f
}

/// Where a frame must be counted.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Rule(&'static str),
    Class(&'static str),
}

fn cases() -> Vec<(&'static str, Vec<u8>, Expect)> {
    use Expect::*;
    let udp137 = Frame::udp4(A, B, 40000, 137);
    vec![
        ("udp/137", udp137.build(), Rule("udp/137")),
        ("tcp/5190", Frame::tcp4(A, B, 40001, 5190).build(), Rule("tcp/5190")),
        // Source port 137 to an ephemeral port: a reply, not a probe.
        (
            "udp sport 137",
            Frame::udp4(A, B, 137, 40000).build(),
            Class("unmatched"),
        ),
        (
            "tcp sport 5190",
            Frame::tcp4(A, B, 5190, 40000).build(),
            Class("unmatched"),
        ),
        (
            "udp/5190 (wrong protocol)",
            Frame::udp4(A, B, 40000, 5190).build(),
            Class("unmatched"),
        ),
        (
            "tcp/137 (wrong protocol)",
            Frame::tcp4(A, B, 40000, 137).build(),
            Class("unmatched"),
        ),
        ("udp/138", Frame::udp4(A, B, 138, 138).build(), Class("unmatched")),
        (
            "icmp",
            Frame::udp4(A, B, 0, 137).proto(ICMP).build(),
            Class("unmatched"),
        ),
        ("802.1Q", udp137.clone().vlan(&[0x8100]).build(), Rule("udp/137")),
        (
            "802.1ad + 802.1Q",
            udp137.clone().vlan(&[0x88a8, 0x8100]).build(),
            Rule("udp/137"),
        ),
        (
            "three VLAN tags",
            udp137.clone().vlan(&[0x88a8, 0x8100, 0x8100]).build(),
            Class("vlan_too_deep"),
        ),
        (
            "IPv4 options (IHL 15)",
            udp137.clone().ipv4_options(40).build(),
            Rule("udp/137"),
        ),
        (
            "IPv4 options (IHL 6)",
            Frame::tcp4(A, B, 1, 5190).ipv4_options(4).build(),
            Rule("tcp/5190"),
        ),
        (
            "IPv4 first fragment",
            udp137.clone().ipv4_fragment(0, true).build(),
            Rule("udp/137"),
        ),
        (
            "IPv4 non-first fragment",
            udp137.clone().ipv4_fragment(185, false).build(),
            Class("fragment"),
        ),
        (
            "IPv6 udp/137",
            Frame::udp6(v6(1), v6(2), 40000, 137).build(),
            Rule("udp/137"),
        ),
        (
            "IPv6 tcp/5190",
            Frame::tcp6(v6(1), v6(2), 40000, 5190).build(),
            Rule("tcp/5190"),
        ),
        (
            "IPv6 four extension headers",
            Frame::tcp6(v6(1), v6(2), 40000, 5190)
                .ipv6_ext(&[
                    Ext::HopByHop,
                    Ext::Routing,
                    Ext::DestOpts,
                    Ext::Fragment { offset: 0, more: true },
                ])
                .build(),
            Rule("tcp/5190"),
        ),
        (
            "IPv6 six extension headers",
            Frame::udp6(v6(1), v6(2), 40000, 137)
                .ipv6_ext(&[
                    Ext::HopByHop,
                    Ext::DestOpts,
                    Ext::Routing,
                    Ext::DestOpts,
                    Ext::DestOpts,
                    Ext::DestOpts,
                ])
                .build(),
            Rule("udp/137"),
        ),
        (
            "IPv6 seven extension headers",
            Frame::udp6(v6(1), v6(2), 40000, 137)
                .ipv6_ext(&[Ext::DestOpts; 7])
                .build(),
            Rule("udp/137"),
        ),
        (
            "IPv6 twelve extension headers with AH",
            Frame::tcp6(v6(1), v6(2), 40000, 5190)
                .ipv6_ext(&[
                    Ext::HopByHop,
                    Ext::Auth,
                    Ext::DestOpts,
                    Ext::DestOpts,
                    Ext::Routing,
                    Ext::DestOpts,
                    Ext::Auth,
                    Ext::DestOpts,
                    Ext::DestOpts,
                    Ext::DestOpts,
                    Ext::Fragment { offset: 0, more: false },
                    Ext::DestOpts,
                ])
                .build(),
            Rule("tcp/5190"),
        ),
        (
            "IPv6 thirteen extension headers",
            Frame::udp6(v6(1), v6(2), 40000, 137)
                .ipv6_ext(&[Ext::DestOpts; 13])
                .build(),
            Class("ipv6_ext_too_many"),
        ),
        (
            "IPv6 version 4 behind ethertype 0x86dd",
            {
                let mut f = Frame::udp6(v6(1), v6(2), 1, 137).build();
                f[14] = 0x40;
                f
            },
            Class("ipv6_bad_header"),
        ),
        (
            "IPv4 TCP first fragment with the whole TCP header",
            Frame::tcp4(A, B, 40000, 5190)
                .ipv4_fragment(0, true)
                .l4_keep(24)
                .build(),
            Rule("tcp/5190"),
        ),
        (
            "IPv4 TCP tiny first fragment (16 bytes)",
            Frame::tcp4(A, B, 40000, 5190)
                .ipv4_fragment(0, true)
                .l4_keep(16)
                .build(),
            Class("tcp_tiny_fragment"),
        ),
        (
            "IPv4 TCP tiny first fragment behind options",
            Frame::tcp4(A, B, 40000, 80)
                .ipv4_options(8)
                .ipv4_fragment(0, true)
                .l4_keep(8)
                .build(),
            Class("tcp_tiny_fragment"),
        ),
        (
            "IPv6 TCP tiny first fragment",
            Frame::tcp6(v6(1), v6(2), 40000, 5190)
                .ipv6_ext(&[Ext::Fragment { offset: 0, more: true }])
                .l4_keep(8)
                .build(),
            Class("tcp_tiny_fragment"),
        ),
        (
            "IPv4 UDP first fragment holding the ports only",
            udp137.clone().ipv4_fragment(0, true).l4_keep(4).build(),
            Rule("udp/137"),
        ),
        (
            "Ethernet padding after a short packet",
            {
                let mut f = udp137.clone().payload(2).build();
                f.resize(f.len() + 16, 0);
                f
            },
            Rule("udp/137"),
        ),
        ("PPPoE udp/137", udp137.clone().pppoe().build(), Rule("udp/137")),
        (
            "PPPoE IPv6 tcp/5190",
            Frame::tcp6(v6(1), v6(2), 40000, 5190).pppoe().build(),
            Rule("tcp/5190"),
        ),
        (
            "802.1Q + PPPoE",
            udp137.clone().vlan(&[0x8100]).pppoe().build(),
            Rule("udp/137"),
        ),
        (
            "802.1ad + 802.1Q + PPPoE IPv6",
            Frame::udp6(v6(1), v6(2), 40000, 137)
                .vlan(&[0x88a8, 0x8100])
                .pppoe()
                .build(),
            Rule("udp/137"),
        ),
        (
            "PPPoE LCP",
            {
                let mut f = udp137.clone().pppoe().build();
                f[20..22].copy_from_slice(&[0xc0, 0x21]);
                f
            },
            Class("non_ip"),
        ),
        (
            "PPPoE header cut",
            udp137.clone().pppoe().build()[..19].to_vec(),
            Class("pppoe_truncated"),
        ),
        (
            "IPv6 non-first fragment",
            Frame::udp6(v6(1), v6(2), 40000, 137)
                .ipv6_ext(&[Ext::Fragment {
                    offset: 100,
                    more: false,
                }])
                .build(),
            Class("fragment"),
        ),
        (
            "IPv6 over 802.1Q",
            Frame::udp6(v6(1), v6(2), 1, 137).vlan(&[0x8100]).build(),
            Rule("udp/137"),
        ),
        ("ARP", arp(), Class("non_ip")),
        // (A frame shorter than an Ethernet header cannot be fed in:
        // BPF_PROG_TEST_RUN rejects it, as drivers never deliver one.)
        (
            "VLAN tag cut",
            udp137.clone().vlan(&[0x8100]).build()[..16].to_vec(),
            Class("vlan_truncated"),
        ),
        (
            "IPv4 header cut",
            udp137.build()[..30].to_vec(),
            Class("ipv4_truncated"),
        ),
        (
            "IPv4 options cut",
            udp137.clone().ipv4_options(40).build()[..40].to_vec(),
            Class("ipv4_truncated"),
        ),
        (
            "IPv4 version 5",
            {
                let mut f = udp137.build();
                f[14] = 0x55;
                f
            },
            Class("ipv4_bad_header"),
        ),
        (
            "IPv4 IHL 4",
            {
                let mut f = udp137.build();
                f[14] = 0x44;
                f
            },
            Class("ipv4_bad_header"),
        ),
        (
            "frame cut in the UDP header",
            udp137.clone().payload(0).build()[..40].to_vec(),
            Class("ipv4_truncated"),
        ),
        (
            "IPv4 packet shorter than its UDP header",
            udp137.clone().l4_keep(6).build(),
            Class("l4_truncated"),
        ),
        (
            "IPv4 packet shorter than its TCP header",
            Frame::tcp4(A, B, 1, 5190).l4_keep(16).build(),
            Class("l4_truncated"),
        ),
        (
            "IPv4 first fragment without the ports",
            Frame::tcp4(A, B, 1, 5190).ipv4_fragment(0, true).l4_keep(2).build(),
            Class("l4_truncated"),
        ),
        (
            "IPv6 packet shorter than its TCP header",
            Frame::tcp6(v6(1), v6(2), 1, 5190).l4_keep(12).build(),
            Class("l4_truncated"),
        ),
        (
            "IPv6 header cut",
            Frame::udp6(v6(1), v6(2), 1, 137).build()[..40].to_vec(),
            Class("ipv6_truncated"),
        ),
        (
            "frame cut in an IPv6 extension header",
            Frame::udp6(v6(1), v6(2), 1, 137)
                .ipv6_ext(&[Ext::HopByHop])
                .payload(0)
                .build()[..60]
                .to_vec(),
            Class("ipv6_truncated"),
        ),
        (
            "IPv6 packet ending inside an extension header",
            ext_cut(137),
            Class("ipv6_ext_truncated"),
        ),
        (
            // Found by the fuzzer: the offset of a fragment header that
            // does not fit in the packet must not make it a pass.
            "IPv6 fragment header cut short, non-zero offset",
            hex(
                "02000000000202000000000186dd6000000000062c4020010db800000000000000000000e35820010db8000000000000000000009e6ba580928be63b",
            ),
            Class("ipv6_ext_truncated"),
        ),
        (
            // Found by the fuzzer: nested fragment headers, the outer with
            // more fragments to come: a first fragment, matched on ports.
            "IPv6 two fragment headers, M=1 then M=0, 5 bytes of UDP",
            hex(
                "02000000000202000000000186dd6000000000152c4020010db800090000000000000000657c20010db8000700000000000000009eb32c000001999369f611000000d8fa847a900f008900",
            ),
            Rule("udp/137"),
        ),
    ]
}

/// The kernel refuses skb test runs whose L3 header is cut short (the
/// stack never hands TC such a packet); XDP still sees these cases.
const SKB_TEST_RUN_REFUSES: [&str; 2] = ["IPv4 header cut", "IPv6 header cut"];

/// Every frame lands in exactly the expected counter, in both programs,
/// and nothing is dropped in monitor mode.
#[test]
fn frames_are_classified_and_counted_once() {
    require_privileged!();
    for hook in [Hook::Xdp(Inbound), Hook::Xdp(Outbound), Hook::TcEgress] {
        let h = Harness::new(&policy(Mode::Monitor, &["udp/137", "tcp/5190"]));
        let dir = match hook {
            Hook::Xdp(Inbound) => "inbound",
            _ => "outbound",
        };
        let mut fed = 0;
        for (name, frame, expect) in cases() {
            if hook == Hook::TcEgress && SKB_TEST_RUN_REFUSES.contains(&name) {
                assert!(
                    h.try_run(hook, &frame, 1).is_err(),
                    "{name}: the kernel now accepts it; drop it from the list"
                );
                continue;
            }
            fed += 1;
            let counted = || match expect {
                Expect::Rule(rule) => h.rule_packets(dir, rule, "passed"),
                Expect::Class(class) => h.class_packets(dir, class),
            };
            let before = counted();
            assert!(!h.dropped(hook, &frame), "{hook:?} {name}: dropped in monitor mode");
            assert_eq!(counted() - before, 1, "{hook:?} {name}: not counted as {expect:?}");
            assert_eq!(h.total_packets(dir), fed, "{hook:?} {name}: counted more than once");
        }
        let other = if dir == "inbound" { "outbound" } else { "inbound" };
        assert_eq!(h.total_packets(other), 0, "{hook:?}: counted in the wrong direction");
    }
}

#[test]
fn exact_counts_and_bytes() {
    require_privileged!();
    let h = Harness::new(&policy(Mode::Monitor, &["udp/137"]));
    let frame = Frame::udp4(A, B, 40000, 137).build();
    h.run_repeat(Hook::Xdp(Inbound), &frame, 1000);
    let s = h.snapshot();
    let c = s
        .rule_counters
        .iter()
        .find(|c| c.direction == "inbound" && c.rule == "udp/137" && c.action == "passed")
        .unwrap();
    assert_eq!((c.packets, c.bytes), (1000, 1000 * frame.len() as u64));
}

#[test]
fn enforce_drops_rule_ports_only() {
    require_privileged!();
    let h = Harness::new(&policy(Mode::Enforce, &["udp/137", "tcp/5190"]));
    for hook in [Hook::Xdp(Inbound), Hook::Xdp(Outbound), Hook::TcEgress] {
        assert!(
            h.dropped(hook, &Frame::udp4(A, B, 40000, 137).build()),
            "{hook:?} udp/137"
        );
        assert!(
            h.dropped(hook, &Frame::tcp6(v6(1), v6(2), 40000, 5190).vlan(&[0x8100]).build()),
            "{hook:?} tcp/5190"
        );
        assert!(
            !h.dropped(hook, &Frame::udp4(A, B, 137, 40000).build()),
            "{hook:?} reply from 137"
        );
        assert!(
            !h.dropped(hook, &Frame::udp4(A, B, 40000, 53).build()),
            "{hook:?} udp/53"
        );
        assert!(
            !h.dropped(hook, &Frame::udp4(A, B, 40000, 137).ipv4_fragment(10, false).build()),
            "{hook:?} fragment"
        );
    }
    assert_eq!(h.rule_packets("inbound", "udp/137", "dropped"), 1);
    assert_eq!(h.rule_packets("outbound", "udp/137", "dropped"), 2);
    assert_eq!(h.rule_packets("outbound", "tcp/5190", "dropped"), 2);
    assert_eq!(h.rule_packets("inbound", "udp/137", "passed"), 0);
}

#[test]
fn actions_apply_per_direction() {
    require_privileged!();
    // IIS host: count inbound NetBIOS, drop the outbound lookups.
    let h = Harness::new(&policy(Mode::Enforce, &["udp/137=count,drop", "tcp/445=drop,count"]));
    let nb = Frame::udp4(A, B, 137, 137).build();
    let smb = Frame::tcp4(A, B, 50000, 445).build();
    assert!(!h.dropped(Hook::Xdp(Inbound), &nb));
    assert!(h.dropped(Hook::Xdp(Outbound), &nb));
    assert!(h.dropped(Hook::TcEgress, &nb));
    assert!(h.dropped(Hook::Xdp(Inbound), &smb));
    assert!(!h.dropped(Hook::TcEgress, &smb));
    assert_eq!(h.rule_packets("inbound", "udp/137", "passed"), 1);
    assert_eq!(h.rule_packets("outbound", "udp/137", "dropped"), 2);
    assert_eq!(h.rule_packets("inbound", "tcp/445", "dropped"), 1);
    assert_eq!(h.rule_packets("outbound", "tcp/445", "passed"), 1);
}

#[test]
fn allowlist_wins_for_either_end_and_blocklist_drops_sources() {
    require_privileged!();
    let mut p = policy(Mode::Enforce, &["udp/137", "tcp/5190=count"]);
    p.allowlist = vec![
        parse_cidr("198.18.7.0/24").unwrap(),
        parse_cidr("2001:db8:7::/48").unwrap(),
    ];
    p.blocklist = vec![
        parse_cidr("198.18.9.0/24").unwrap(),
        parse_cidr("2001:db8:9::/48").unwrap(),
    ];
    let h = Harness::new(&p);
    let ingress = Hook::Xdp(Inbound);
    // Allowlisted source or destination: never dropped.
    assert!(!h.dropped(ingress, &Frame::udp4([198, 18, 7, 5], B, 1, 137).build()));
    assert!(!h.dropped(ingress, &Frame::udp4(A, [198, 18, 7, 9], 1, 137).build()));
    let allowed6 = Ipv6Addr::new(0x2001, 0xdb8, 7, 0, 0, 0, 0, 1);
    assert!(!h.dropped(ingress, &Frame::udp6(allowed6, v6(2), 1, 137).build()));
    assert!(h.dropped(ingress, &Frame::udp4(A, B, 1, 137).build()));
    // Blocklisted source: dropped on a rule port even where the rule only counts...
    assert!(h.dropped(ingress, &Frame::tcp4([198, 18, 9, 1], B, 1, 5190).build()));
    let blocked6 = Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 1);
    assert!(h.dropped(ingress, &Frame::tcp6(blocked6, v6(2), 1, 5190).build()));
    // ...but not on other ports, and not as a destination.
    assert!(!h.dropped(ingress, &Frame::tcp4([198, 18, 9, 1], B, 1, 80).build()));
    assert!(!h.dropped(ingress, &Frame::tcp4(A, [198, 18, 9, 1], 1, 5190).build()));
    // Monitor mode never drops, blocklist or not.
    let mut monitor = p.clone();
    monitor.mode = Mode::Monitor;
    h.apply(&monitor);
    assert!(!h.dropped(ingress, &Frame::tcp4([198, 18, 9, 1], B, 1, 5190).build()));
    assert!(!h.dropped(ingress, &Frame::udp4(A, B, 1, 137).build()));
}

#[test]
fn reload_keeps_counters_of_kept_rules() {
    require_privileged!();
    let h = Harness::new(&policy(Mode::Monitor, &["udp/137", "tcp/5190"]));
    let nb = Frame::udp4(A, B, 1, 137).build();
    let aol = Frame::tcp4(A, B, 1, 5190).build();
    h.run_repeat(Hook::Xdp(Inbound), &nb, 7);
    h.run_repeat(Hook::Xdp(Inbound), &aol, 3);
    // Reload: drop tcp/5190, add tcp/445, change udp/137's action, enforce.
    h.apply(&policy(Mode::Enforce, &["tcp/445", "udp/137=count,drop"]));
    assert_eq!(h.rule_packets("inbound", "udp/137", "passed"), 7);
    assert!(!h.dropped(Hook::Xdp(Inbound), &nb));
    assert_eq!(h.rule_packets("inbound", "udp/137", "passed"), 8);
    assert!(!h.dropped(Hook::Xdp(Inbound), &aol), "removed rule still matches");
    assert_eq!(h.class_packets("inbound", "unmatched"), 1);
    assert_eq!(
        h.rule_packets("inbound", "tcp/445", "passed"),
        0,
        "new rule inherited old counters"
    );
    // Re-adding tcp/5190 does not resurrect stale counts into another rule.
    h.apply(&policy(Mode::Monitor, &["tcp/445", "udp/137", "udp/138"]));
    assert_eq!(h.rule_packets("inbound", "udp/138", "passed"), 0);
}

/// A repeated packet is answered from the CPU's flood memo, but never
/// under a policy it was not judged by: every switch (two of them back to
/// the same version included) and every list change takes effect at the
/// next packet, and the memo's packets are counted exactly.
#[test]
fn a_memoised_verdict_never_outlives_the_policy() {
    require_privileged!();
    let monitor = policy(Mode::Monitor, &["udp/137"]);
    let enforce = policy(Mode::Enforce, &["udp/137=count"]);
    let h = Harness::new(&monitor);
    let nb = Frame::udp4(A, B, 1, 137).build();
    let xdp = Hook::Xdp(Inbound);
    assert_eq!(h.run_repeat(xdp, &nb, 10), 2, "monitor passes");
    // Two switches with no packet between: the version in force is the one
    // the memo was made under, the policy is not.
    let mut blocked = enforce.clone();
    blocked.blocklist = vec![parse_cidr("198.18.0.1/32").unwrap()];
    h.apply(&enforce);
    h.apply(&blocked);
    assert!(h.dropped(xdp, &nb), "blocklisted source passed from the memo");
    assert_eq!(h.run_repeat(xdp, &nb, 10), 1);
    h.apply(&enforce);
    assert!(!h.dropped(xdp, &nb), "source taken off the blocklist still dropped");
    // Another destination, then the first again: each judged afresh.
    let other = Frame::udp4(A, [198, 18, 0, 3], 1, 137).build();
    assert!(!h.dropped(xdp, &other));
    h.apply(&blocked);
    assert!(h.dropped(xdp, &other));
    assert!(h.dropped(xdp, &nb));
    assert_eq!(h.rule_packets("inbound", "udp/137", "passed"), 10 + 1 + 1);
    assert_eq!(h.rule_packets("inbound", "udp/137", "dropped"), 1 + 10 + 2);
    let tracked: u64 = h.tracked(A.into()).iter().map(|s| s.packets).sum();
    assert_eq!(
        tracked,
        10 + 11 + 1 + 1 + 2,
        "the memo's packets reached the source's record"
    );
}

/// Enforce mode drops what the parser cannot judge when it could still
/// carry a rule port (a chain longer than the walk, a header cut short, a
/// tiny TCP first fragment, a fourth VLAN tag), whatever its ports; what
/// cannot carry one (ARP, non-first fragments, bad versions) passes.
#[test]
fn enforce_fails_closed_on_what_it_cannot_judge() {
    require_privileged!();
    let h = Harness::new(&policy(Mode::Enforce, &["udp/137", "tcp/5190"]));
    let control = Frame::udp4(A, B, 40000, 53);
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "13 extension headers to udp/53",
            Frame::udp6(v6(1), v6(2), 1, 53).ipv6_ext(&[Ext::DestOpts; 13]).build(),
            true,
        ),
        (
            "tiny TCP first fragment to tcp/80",
            Frame::tcp4(A, B, 1, 80).ipv4_fragment(0, true).l4_keep(8).build(),
            true,
        ),
        ("IPv4 header cut", control.build()[..30].to_vec(), true),
        ("IPv6 packet ending inside an extension header", ext_cut(53), true),
        ("UDP header short", control.clone().l4_keep(6).build(), true),
        (
            "three VLAN tags",
            control.clone().vlan(&[0x88a8, 0x8100, 0x8100]).build(),
            true,
        ),
        ("udp/53", control.build(), false),
        (
            "12 extension headers to udp/53",
            Frame::udp6(v6(1), v6(2), 1, 53).ipv6_ext(&[Ext::DestOpts; 12]).build(),
            false,
        ),
        (
            "non-first fragment",
            control.clone().ipv4_fragment(100, false).build(),
            false,
        ),
        ("ARP", arp(), false),
        (
            "PPPoE header cut",
            control.clone().pppoe().build()[..19].to_vec(),
            false,
        ),
        (
            "IPv4 version 5",
            {
                let mut f = control.build();
                f[14] = 0x55;
                f
            },
            false,
        ),
    ];
    for (name, frame, drop) in &cases {
        for hook in [Hook::Xdp(Inbound), Hook::TcEgress] {
            if hook == Hook::TcEgress && *name == "IPv4 header cut" {
                continue; // BPF_PROG_TEST_RUN refuses it for skb programs.
            }
            assert_eq!(h.dropped(hook, frame), *drop, "{hook:?} {name}");
        }
    }
    // Monitor mode drops none of them.
    h.apply(&policy(Mode::Monitor, &["udp/137", "tcp/5190"]));
    for (name, frame, _) in &cases {
        assert!(!h.dropped(Hook::Xdp(Inbound), frame), "monitor {name}");
    }
}

/// On an L3 device (tun, ppp, wireguard) frames start at the IP header:
/// the program loaded for such a link matches them on their ports, and
/// an Ethernet frame there is not IP.
#[test]
fn l3_links_parse_from_the_ip_header() {
    require_privileged!();
    let h = Harness::with_link(
        &policy(Mode::Enforce, &["udp/137", "tcp/5190"]),
        netwatch_common::LinkKind::Ip,
    );
    let hook = Hook::Xdp(Inbound);
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        ("udp/137", Frame::udp4(A, B, 1, 137).build_ip(), Expect::Rule("udp/137")),
        (
            "IPv6 tcp/5190",
            Frame::tcp6(v6(1), v6(2), 1, 5190).build_ip(),
            Expect::Rule("tcp/5190"),
        ),
        (
            "IPv6 udp/137 behind 9 extension headers",
            Frame::udp6(v6(1), v6(2), 1, 137)
                .ipv6_ext(&[Ext::DestOpts; 9])
                .build_ip(),
            Expect::Rule("udp/137"),
        ),
        (
            "tiny TCP first fragment",
            Frame::tcp4(A, B, 1, 5190).ipv4_fragment(0, true).l4_keep(8).build_ip(),
            Expect::Class("tcp_tiny_fragment"),
        ),
        (
            "udp/53",
            Frame::udp4(A, B, 1, 53).build_ip(),
            Expect::Class("unmatched"),
        ),
        (
            "an Ethernet frame",
            Frame::udp4(A, B, 1, 137).build(),
            Expect::Class("non_ip"),
        ),
    ];
    for (name, frame, expect) in cases {
        let counted = || match expect {
            Expect::Rule(rule) => h.rule_packets("inbound", rule, "dropped"),
            Expect::Class(class) => h.class_packets("inbound", class),
        };
        let before = counted();
        let dropped = h.dropped(hook, &frame);
        assert_eq!(counted() - before, 1, "{name}: not counted as {expect:?}");
        let expect_drop = matches!(expect, Expect::Rule(_)) || name == "tiny TCP first fragment";
        assert_eq!(dropped, expect_drop, "{name}");
    }
}

/// Every program instance passes the verifier with room to spare: the
/// verifier walks the code once per parser path, so a few instructions
/// added before the tracker cost thousands here. Prints the counts.
#[test]
fn programs_fit_the_verifier_budget() {
    require_privileged!();
    const LIMIT: u32 = 1_000_000;
    for link in [netwatch_common::LinkKind::Ethernet, netwatch_common::LinkKind::Ip] {
        let h = Harness::with_link(&policy(Mode::Enforce, &["udp/137", "tcp/5190"]), link);
        for (program, insns) in h.verified_insns() {
            eprintln!("{} link, {program}: {insns} verified instructions", link.label());
            assert!(
                insns < LIMIT / 10 * 9,
                "{program} on an {} link: {insns} verified instructions, within 10 % of the kernel's {LIMIT}",
                link.label()
            );
        }
    }
}
