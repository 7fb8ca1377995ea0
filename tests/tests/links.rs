//! Interfaces that change under a running `netwatch run`: deleted and
//! re-created under the configured name (a PPP reconnect, a VLAN made
//! again, a USB NIC plugged back), renamed, and replaced by a new
//! interface taking the configured name. The real binary in network
//! namespaces; real sockets judge what gets through.

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use netwatch_tests::{
    daemon::{Netwatch, sample},
    lab::*,
    netns::{Netns, veth},
    patience, pin_dir, require_privileged,
};

/// A probe from the scanner to the victim's address.
const PROBE: &str = "198.18.0.2:137";
/// The name the victim's interface is renamed to.
const RENAMED: &str = "nw-ren0";

/// `netwatch_packets_total` of udp/137 dropped on the victim's
/// interface (the configured name) in `direction`.
fn dropped(nw: &Netwatch, lab: &Lab, direction: &str) -> f64 {
    sample(
        &nw.metrics(&lab.victim),
        "netwatch_packets_total",
        &[
            ("interface", VICTIM_IF),
            ("direction", direction),
            ("rule", "udp/137"),
            ("action", "dropped"),
        ],
    )
}

/// The victim's interface slot in `netwatch status --json` (by its
/// configured name).
fn slot(nw: &Netwatch) -> serde_json::Value {
    let status = nw.status();
    status["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .find(|i| i["name"] == VICTIM_IF)
        .unwrap_or_else(|| panic!("no slot {VICTIM_IF} in {status:#}"))
        .clone()
}

/// The kernel's index of `name` in `ns` (`ip -o link show`: `7: name@...`).
fn ifindex(ns: &Netns, name: &str) -> u64 {
    let out = ns.ip(&["-o", "link", "show", "dev", name]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ifindex in {text:?}"))
}

/// Polls `f` until it holds, for up to `within` (times the patience).
fn wait_until(within: Duration, what: &str, nw: &Netwatch, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + patience(within);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}\nstatus: {:#}\nlog:\n{}",
            nw.status(),
            nw.log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Sends one probe at a time from the scanner until the counter of
/// dropped inbound udp/137 passes `before`; returns how long that took
/// from `since` and how many probes were sent.
fn first_dropped_probe(nw: &Netwatch, lab: &Lab, before: f64, since: Instant) -> (Duration, usize) {
    let deadline = since + patience(Duration::from_secs(10));
    let mut sent = 0;
    loop {
        sent += send_udp(&lab.scanner, PROBE, 1);
        std::thread::sleep(Duration::from_millis(20));
        if dropped(nw, lab, "inbound") > before {
            return (since.elapsed(), sent);
        }
        assert!(
            Instant::now() < deadline,
            "no probe dropped within 10 s of the interface coming back ({sent} sent)\nstatus: {:#}\nlog:\n{}",
            nw.status(),
            nw.log()
        );
    }
}

fn listener(lab: &Lab) -> UdpSocket {
    udp_listener(&lab.victim, 137)
}

/// `netwatch run --mode enforce --iface VICTIM_IF`; the veth is deleted
/// and re-created with the same name: netwatch notices the link events,
/// re-attaches XDP to the new interface within a few seconds (the probes
/// dropped again, a real socket on the victim receiving none of them),
/// `status` shows it attached on its new ifindex, and the slot's
/// counters go on from where they were (exact counts).
#[test]
fn a_recreated_interface_is_attached_again_counters_kept() {
    require_privileged!();
    let lab = Lab::new();
    let nw = Netwatch::start(&lab.victim, &pin_dir(), &["--iface", VICTIM_IF, "--mode", "enforce"]);
    let socket = listener(&lab);
    assert_eq!(send_udp(&lab.scanner, PROBE, 5), 5);
    assert_eq!(count_received(&socket), 0, "udp/137 reached the socket under enforce");
    let before = eventually(5.0, Duration::from_secs(3), || dropped(&nw, &lab, "inbound"));
    assert_eq!(before, 5.0);
    let old = ifindex(&lab.victim, VICTIM_IF);
    assert_eq!(slot(&nw)["ifindex"], old);

    lab.victim.ip(&["link", "del", VICTIM_IF]);
    wait_until(Duration::from_secs(10), "marked detached once gone", &nw, || {
        slot(&nw)["xdp"].is_null()
    });

    let added = Instant::now();
    lab.make_link();
    let up = added.elapsed();
    let new = ifindex(&lab.victim, VICTIM_IF);
    assert_ne!(new, old, "the kernel gave the new interface the old index");
    let (first, sent) = first_dropped_probe(&nw, &lab, before, added);
    eprintln!(
        "re-attach: interface up {} ms after `ip link add`, first probe dropped {} ms after it ({sent} probes sent)",
        up.as_millis(),
        first.as_millis()
    );
    // Every probe sent while it came back either reached the socket (sent
    // before the program was attached) or was counted as dropped.
    let delivered = count_received(&socket);
    let counted = dropped(&nw, &lab, "inbound") - before;
    assert_eq!(delivered + counted as usize, sent, "probes lost or counted twice");

    let iface = slot(&nw);
    assert_eq!(iface["ifindex"], new, "{iface:#}");
    assert_eq!(iface["xdp"], "native", "{iface:#}");
    let log = nw.log();
    assert!(
        log.contains(&format!(
            "{VICTIM_IF}: re-created (ifindex {old} -> {new}), XDP native re-attached"
        )),
        "{log}"
    );
    assert_eq!(log.matches("disappeared while attached").count(), 1, "{log}");

    // Enforced on the new interface, counted in the same slot.
    assert_eq!(send_udp(&lab.scanner, PROBE, 10), 10);
    assert_eq!(
        count_received(&socket),
        0,
        "udp/137 reached the socket after the re-attach"
    );
    let want = before + counted + 10.0;
    assert_eq!(
        eventually(want, Duration::from_secs(3), || dropped(&nw, &lab, "inbound")),
        want
    );
    let attached = sample(
        &nw.metrics(&lab.victim),
        "netwatch_interface_attached",
        &[("interface", VICTIM_IF), ("hook", "xdp"), ("mode", "native")],
    );
    assert_eq!(attached, 1.0);
}

/// The attached interface is renamed: the kernel keeps its programs on
/// the ifindex, so it stays attached (not reported detached), probes are
/// still dropped and counted in its slot, and `status` shows the kernel's
/// name beside the configured one (the metric label stays the configured
/// name). Then a new interface takes the configured name: the
/// configuration names interfaces by name, so netwatch attaches to the
/// new one and detaches from the renamed one.
#[test]
fn a_renamed_interface_stays_attached_and_the_configured_name_wins() {
    require_privileged!();
    let lab = Lab::new();
    let nw = Netwatch::start(&lab.victim, &pin_dir(), &["--iface", VICTIM_IF, "--mode", "enforce"]);
    let socket = listener(&lab);
    let index = ifindex(&lab.victim, VICTIM_IF);

    lab.victim.ip(&["link", "set", VICTIM_IF, "down"]);
    lab.victim.ip(&["link", "set", VICTIM_IF, "name", RENAMED]);
    lab.victim.ip(&["link", "set", RENAMED, "up"]);
    // Past the 5-s check too: a rename is not a disappearance.
    let renamed = Instant::now();
    wait_until(Duration::from_secs(10), "the rename followed", &nw, || {
        let i = slot(&nw);
        i["kernel_name"] == RENAMED && i["xdp"] == "native"
    });
    std::thread::sleep(Duration::from_secs(6).saturating_sub(renamed.elapsed()));
    let iface = slot(&nw);
    assert_eq!(
        (&iface["xdp"], &iface["ifindex"], &iface["kernel_name"]),
        (&"native".into(), &index.into(), &RENAMED.into()),
        "{iface:#}"
    );
    let text = nw.cli(&["status"]);
    assert!(text.contains(&format!("kernel name {RENAMED}")), "{text}");
    assert!(
        nw.log()
            .contains(&format!("{VICTIM_IF}: renamed to {RENAMED} (ifindex {index})")),
        "{}",
        nw.log()
    );

    assert_eq!(send_udp(&lab.scanner, PROBE, 5), 5);
    assert_eq!(
        count_received(&socket),
        0,
        "udp/137 reached the socket after the rename"
    );
    assert_eq!(
        eventually(5.0, Duration::from_secs(3), || dropped(&nw, &lab, "inbound")),
        5.0
    );
    let attached = sample(
        &nw.metrics(&lab.victim),
        "netwatch_interface_attached",
        &[("interface", VICTIM_IF), ("hook", "xdp")],
    );
    assert_eq!(attached, 1.0, "the series keeps the configured name");

    // A new interface takes the configured name.
    veth(
        &lab.scanner,
        "nw-scan1",
        "198.18.2.1/24",
        &lab.victim,
        VICTIM_IF,
        "198.18.2.2/24",
    );
    let new = ifindex(&lab.victim, VICTIM_IF);
    wait_until(Duration::from_secs(10), "attached to the new interface", &nw, || {
        let i = slot(&nw);
        i["ifindex"] == new && i["kernel_name"].is_null() && i["xdp"] == "native"
    });
    assert!(
        nw.log().contains(&format!(
            "{VICTIM_IF}: a new interface took the configured name (ifindex {new}); detaching from ifindex {index} \
             (now {RENAMED})"
        )),
        "{}",
        nw.log()
    );
    // The new interface is enforced and counted in the slot ...
    assert_eq!(send_udp(&lab.scanner, "198.18.2.2:137", 5), 5);
    assert_eq!(
        count_received(&socket),
        0,
        "udp/137 reached the socket through the new interface"
    );
    assert_eq!(
        eventually(10.0, Duration::from_secs(3), || dropped(&nw, &lab, "inbound")),
        10.0
    );
    // ... and the renamed one no longer is.
    assert_eq!(send_udp(&lab.scanner, PROBE, 5), 5);
    assert_eq!(count_received(&socket), 5, "the renamed interface still filters");
    assert_eq!(dropped(&nw, &lab, "inbound"), 10.0);
}

/// TC egress follows a re-created interface too, on both attach paths:
/// XDP and TC egress through `auto` (TCX on 6.6+), and an egress-only
/// interface through a netlink filter. The host's own udp/137 to the peer
/// is not received after the re-attach, udp/138 is, and the outbound
/// counter goes on.
#[test]
fn tc_egress_is_attached_again_on_a_recreated_interface() {
    require_privileged!();
    for args in [
        &["--iface", VICTIM_IF, "--egress", VICTIM_IF][..],
        &["--egress", VICTIM_IF, "--tc-attach", "netlink"][..],
    ] {
        let lab = Lab::new();
        let mut all = vec!["--mode", "enforce"];
        all.extend_from_slice(args);
        let nw = Netwatch::start(&lab.victim, &pin_dir(), &all);
        let sends = |port: u16, n: usize| -> usize {
            let socket = udp_listener(&lab.scanner, port);
            assert_eq!(send_udp(&lab.victim, &format!("198.18.0.1:{port}"), n), n);
            count_received(&socket)
        };
        assert_eq!(sends(137, 5), 0, "{args:?}: the host's udp/137 left it");
        assert_eq!(sends(138, 5), 5, "{args:?}: udp/138 did not pass");
        assert_eq!(
            eventually(5.0, Duration::from_secs(3), || dropped(&nw, &lab, "outbound")),
            5.0
        );
        let mode = slot(&nw)["tc_egress_mode"]
            .as_str()
            .expect("tc_egress_mode")
            .to_string();
        let old = ifindex(&lab.victim, VICTIM_IF);

        lab.victim.ip(&["link", "del", VICTIM_IF]);
        lab.make_link();
        let new = ifindex(&lab.victim, VICTIM_IF);
        wait_until(Duration::from_secs(10), "TC egress re-attached", &nw, || {
            let i = slot(&nw);
            i["ifindex"] == new && i["tc_egress"] == true
        });
        let iface = slot(&nw);
        assert_eq!(iface["tc_egress_mode"], mode.as_str(), "{args:?}: {iface:#}");
        assert_eq!(
            iface["xdp"].is_string(),
            args.contains(&"--iface"),
            "{args:?}: {iface:#}"
        );
        assert!(
            nw.log().contains(&format!("TC egress ({mode}) re-attached")),
            "{}",
            nw.log()
        );
        assert!(
            nw.log()
                .contains(&format!("{VICTIM_IF}: re-created (ifindex {old} -> {new})")),
            "{}",
            nw.log()
        );
        assert_eq!(
            sends(137, 5),
            0,
            "{args:?}: the host's udp/137 left the re-created interface"
        );
        assert_eq!(sends(138, 5), 5, "{args:?}: udp/138 did not pass");
        assert_eq!(
            eventually(10.0, Duration::from_secs(3), || dropped(&nw, &lab, "outbound")),
            10.0
        );
        if mode == "netlink" {
            let filters = lab
                .victim
                .command("tc")
                .args(["filter", "show", "dev", VICTIM_IF, "egress"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&filters.stdout);
            let ours = text.lines().filter(|l| l.contains("netwatch_tc")).count();
            assert_eq!(ours, 1, "one netwatch filter on the new interface: {text}");
        }
    }
}

/// netwatch's netlink filters on `iface`'s egress hook in `ns`.
fn netlink_filters(ns: &Netns, iface: &str) -> usize {
    let out = ns
        .command("tc")
        .args(["filter", "show", "dev", iface, "egress"])
        .output()
        .expect("tc");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("netwatch_tc"))
        .count()
}

/// A netlink TC filter on an interface renamed while attached stays
/// where the kernel keeps it, dropping, and is removed from there: by a
/// clean stop, and by `netwatch detach` after a `kill -9`.
#[test]
fn a_netlink_filter_on_a_renamed_interface_is_removed_from_it() {
    require_privileged!();
    let lab = Lab::new();
    let args = ["--egress", VICTIM_IF, "--tc-attach", "netlink", "--mode", "enforce"];
    let lookups = |n: usize| -> usize {
        let socket = udp_listener(&lab.scanner, 137);
        assert_eq!(send_udp(&lab.victim, "198.18.0.1:137", n), n);
        count_received(&socket)
    };
    let rename = |from: &str, to: &str| {
        lab.victim.ip(&["link", "set", from, "down"]);
        lab.victim.ip(&["link", "set", from, "name", to]);
        lab.victim.ip(&["link", "set", to, "up"]);
    };
    for stop in ["clean stop", "kill -9 and detach"] {
        let pins = pin_dir();
        let mut nw = Netwatch::start(&lab.victim, &pins, &args);
        rename(VICTIM_IF, RENAMED);
        wait_until(Duration::from_secs(10), "the rename followed", &nw, || {
            slot(&nw)["kernel_name"] == RENAMED
        });
        assert_eq!(netlink_filters(&lab.victim, RENAMED), 1, "{stop}");
        assert_eq!(lookups(5), 0, "{stop}: the host's udp/137 left the renamed interface");
        if stop == "clean stop" {
            assert!(nw.stop().success(), "{}", nw.log());
        } else {
            nw.kill_and_keep_pins();
            let out = lab
                .victim
                .command(netwatch_tests::daemon::bin().to_str().unwrap())
                .args(["detach", "--pin-dir", &pins])
                .output()
                .unwrap();
            netwatch_tests::assert_success(&out);
        }
        assert_eq!(netlink_filters(&lab.victim, RENAMED), 0, "{stop}: filter left behind");
        let tc = lab
            .victim
            .command("tc")
            .args(["qdisc", "show", "dev", RENAMED])
            .output()
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&tc.stdout).contains("clsact"),
            "{stop}: the clsact qdisc netwatch added was left: {}",
            String::from_utf8_lossy(&tc.stdout)
        );
        assert_eq!(lookups(5), 5, "{stop}: udp/137 still dropped after netwatch left");
        rename(RENAMED, VICTIM_IF);
    }
}
