//! TC egress on both attach paths, with the real binary in network
//! namespaces: a netlink (clsact) filter, forced with `--tc-attach
//! netlink`, and whatever `auto` picks on the running kernel (TCX from
//! Linux 6.6, netlink before). The kernel's `tc filter show` and real
//! sockets are the judges.

use std::time::Duration;

use netwatch_tests::{
    daemon::{Netwatch, bin, sample},
    lab::*,
    netns::Netns,
    pin_dir, require_privileged,
};

/// `tc ARGS` inside `ns`; its standard output.
fn tc(ns: &Netns, args: &[&str]) -> String {
    let out = ns.command("tc").args(args).output().expect("tc");
    assert!(
        out.status.success(),
        "tc {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// netwatch's filters on the victim's egress hook, as `(pref, handle,
/// program id)`.
fn netwatch_filters(ns: &Netns) -> Vec<(String, String, String)> {
    tc(ns, &["filter", "show", "dev", VICTIM_IF, "egress"])
        .lines()
        .filter(|l| l.contains("netwatch_tc"))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let after = |key: &str| {
                let at = words
                    .iter()
                    .position(|w| *w == key)
                    .unwrap_or_else(|| panic!("{key} in {l}"));
                words[at + 1].to_string()
            };
            (after("pref"), after("handle"), after("id"))
        })
        .collect()
}

fn has_clsact(ns: &Netns) -> bool {
    tc(ns, &["qdisc", "show", "dev", VICTIM_IF]).contains("clsact")
}

/// Sends `n` udp/137 datagrams from the victim (the host netwatch
/// guards) to the scanner; returns how many arrived.
fn lookups_arriving(lab: &Lab, n: usize) -> usize {
    let listener = udp_listener(&lab.scanner, 137);
    assert_eq!(send_udp(&lab.victim, "198.18.0.1:137", n), n);
    count_received(&listener)
}

fn outbound_dropped(nw: &Netwatch, lab: &Lab, want: f64) -> f64 {
    eventually(want, Duration::from_secs(3), || {
        sample(
            &nw.metrics(&lab.victim),
            "netwatch_packets_total",
            &[
                ("interface", VICTIM_IF),
                ("direction", "outbound"),
                ("rule", "udp/137"),
                ("action", "dropped"),
            ],
        )
    })
}

/// How TC egress is attached to the victim's interface, as `status` and
/// the metric say (they must agree).
fn tc_mode(nw: &Netwatch, lab: &Lab) -> String {
    let status = nw.status();
    let iface = &status["interfaces"][0];
    assert_eq!(iface["tc_egress"], true, "{status:#}");
    let mode = iface["tc_egress_mode"].as_str().expect("tc_egress_mode").to_string();
    let attached = sample(
        &nw.metrics(&lab.victim),
        "netwatch_interface_attached",
        &[("interface", VICTIM_IF), ("hook", "tc_egress"), ("mode", &mode)],
    );
    assert_eq!(attached, 1.0);
    mode
}

/// `netwatch detach` inside the victim's namespace (where its filters are).
fn detach(lab: &Lab, pins: &str) {
    let out = lab
        .victim
        .command(bin().to_str().unwrap())
        .args(["detach", "--pin-dir", pins])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Whether the running kernel has TCX, from its version (6.6+), not from
/// netwatch's own probe.
fn kernel_has_tcx() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap(), parts.next().unwrap());
    (major, minor) >= (6, 6)
}

/// Forced netlink: the host's own udp/137 is dropped by a clsact filter;
/// `kill -9` leaves it dropping; the restart replaces the filter's program
/// in place (same pref and handle, a new program, still one filter);
/// `detach` removes the filter and the clsact qdisc netwatch added.
#[test]
fn netlink_filter_drops_survives_kill_and_detach_removes_it() {
    require_privileged!();
    let lab = Lab::new();
    let pins = pin_dir();
    assert!(!has_clsact(&lab.victim));
    let args = ["--egress", VICTIM_IF, "--mode", "enforce", "--tc-attach", "netlink"];
    let nw = Netwatch::start(&lab.victim, &pins, &args);
    let filters = netwatch_filters(&lab.victim);
    assert_eq!(filters.len(), 1, "{filters:?}");
    assert!(has_clsact(&lab.victim));
    assert_eq!(tc_mode(&nw, &lab), "netlink");

    assert_eq!(lookups_arriving(&lab, 6), 0, "udp/137 left the host");
    assert_eq!(outbound_dropped(&nw, &lab, 6.0), 6.0);
    let other = udp_listener(&lab.scanner, 138);
    assert_eq!(send_udp(&lab.victim, "198.18.0.1:138", 6), 6);
    assert_eq!(count_received(&other), 6, "udp/138 (no rule) was disturbed");

    nw.kill_and_keep_pins();
    assert_eq!(
        netwatch_filters(&lab.victim),
        filters,
        "the filter changed with the controller dead"
    );
    assert_eq!(
        lookups_arriving(&lab, 4),
        0,
        "not enforced while the controller was dead"
    );

    let nw = Netwatch::start(&lab.victim, &pins, &args);
    assert!(
        nw.log().contains("re-adopted the netlink TC egress filter"),
        "{}",
        nw.log()
    );
    let after = netwatch_filters(&lab.victim);
    assert_eq!(after.len(), 1, "filters stacked on restart: {after:?}");
    assert_eq!(
        (&after[0].0, &after[0].1),
        (&filters[0].0, &filters[0].1),
        "not replaced in place"
    );
    assert_ne!(after[0].2, filters[0].2, "the old program still runs");
    assert_eq!(tc_mode(&nw, &lab), "netlink");
    assert_eq!(lookups_arriving(&lab, 5), 0);
    assert_eq!(outbound_dropped(&nw, &lab, 15.0), 15.0, "counts lost across kill -9");

    nw.kill_and_keep_pins();
    detach(&lab, &pins);
    assert_eq!(netwatch_filters(&lab.victim), vec![], "filter left after detach");
    assert!(!has_clsact(&lab.victim), "the clsact qdisc netwatch added was left");
    assert!(!std::path::Path::new(&pins).exists(), "pin directory left behind");
    assert_eq!(lookups_arriving(&lab, 3), 3, "still filtered after detach");
}

/// Another tool's clsact qdisc and filter: netwatch adds its filter
/// beside it, `--keep-attached` keeps it through a stop, the restart
/// re-adopts it, and a plain stop removes netwatch's filter only.
#[test]
fn netlink_leaves_other_filters_and_their_qdisc_alone() {
    require_privileged!();
    let lab = Lab::new();
    let pins = pin_dir();
    tc(&lab.victim, &["qdisc", "add", "dev", VICTIM_IF, "clsact"]);
    // Another tool's filter, of netwatch's own kind (cls_bpf): a classic
    // BPF program that classifies everything into 1:1 and drops nothing.
    let foreign = [
        "filter",
        "add",
        "dev",
        VICTIM_IF,
        "egress",
        "prio",
        "7",
        "bpf",
        "bytecode",
        "1,6 0 0 4294967295,",
        "classid",
        "1:1",
    ];
    tc(&lab.victim, &foreign);
    let show = || tc(&lab.victim, &["filter", "show", "dev", VICTIM_IF, "egress"]);
    let foreign_lines = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| l.contains("pref 7") && l.contains("handle"))
            .map(str::to_string)
            .collect()
    };
    let before = foreign_lines(&show());
    assert_eq!(before.len(), 1, "{}", show());

    let args = [
        "--egress",
        VICTIM_IF,
        "--mode",
        "enforce",
        "--tc-attach",
        "netlink",
        "--keep-attached",
    ];
    let nw = Netwatch::start(&lab.victim, &pins, &args);
    let ours = netwatch_filters(&lab.victim);
    assert_eq!(ours.len(), 1);
    // Ahead of the other filter, which would end classification first.
    assert_eq!(ours[0].0, "6", "{}", show());
    nw.stop_and_keep_pins();
    assert_eq!(
        netwatch_filters(&lab.victim).len(),
        1,
        "--keep-attached removed the filter"
    );
    assert_eq!(
        lookups_arriving(&lab, 4),
        0,
        "not enforced while the controller was stopped"
    );

    let mut nw = Netwatch::start(&lab.victim, &pins, &args[..6]);
    assert_eq!(netwatch_filters(&lab.victim).len(), 1, "filters stacked on restart");
    assert!(nw.stop().success(), "{}", nw.log());
    assert_eq!(netwatch_filters(&lab.victim), vec![], "a clean stop left the filter");
    assert_eq!(foreign_lines(&show()), before, "another tool's filter was touched");
    assert!(has_clsact(&lab.victim), "removed a clsact qdisc netwatch did not add");
    assert_eq!(lookups_arriving(&lab, 3), 3);
}

/// `auto` takes TCX where the kernel has it (6.6+: no clsact filter),
/// netlink where it does not, and enforces either way. Moving between
/// the paths across a `kill -9` leaves exactly one attachment; `tcx` is
/// refused where the kernel lacks it.
#[test]
fn auto_picks_the_kernels_path_and_paths_switch_cleanly() {
    require_privileged!();
    let lab = Lab::new();
    let pins = pin_dir();
    let tcx = kernel_has_tcx();
    let auto = ["--egress", VICTIM_IF, "--mode", "enforce"];
    let nw = Netwatch::start(&lab.victim, &pins, &auto);
    assert_eq!(tc_mode(&nw, &lab), if tcx { "tcx" } else { "netlink" });
    assert_eq!(netwatch_filters(&lab.victim).len(), usize::from(!tcx));
    assert_eq!(
        std::path::Path::new(&pins)
            .join("links")
            .join(format!("tc_{VICTIM_IF}"))
            .exists(),
        tcx
    );
    assert_eq!(lookups_arriving(&lab, 5), 0);
    nw.kill_and_keep_pins();

    if !tcx {
        let out = lab
            .victim
            .command(bin().to_str().unwrap())
            .args(["run", "--pin-dir", &pins, "--tc-attach", "tcx"])
            .args(auto)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("no TCX") && err.contains(VICTIM_IF), "{err}");
        assert_eq!(
            netwatch_filters(&lab.victim).len(),
            1,
            "the refused run touched the filter"
        );
        return;
    }

    // TCX -> netlink: the filter replaces the TCX link.
    let nw = Netwatch::start(&lab.victim, &pins, &[&auto[..], &["--tc-attach", "netlink"]].concat());
    assert_eq!(tc_mode(&nw, &lab), "netlink");
    assert_eq!(netwatch_filters(&lab.victim).len(), 1);
    assert!(
        !std::path::Path::new(&pins)
            .join("links")
            .join(format!("tc_{VICTIM_IF}"))
            .exists()
    );
    assert_eq!(lookups_arriving(&lab, 5), 0);
    nw.kill_and_keep_pins();

    // netlink -> TCX: the TCX link replaces the filter (and its qdisc).
    let nw = Netwatch::start(&lab.victim, &pins, &[&auto[..], &["--tc-attach", "tcx"]].concat());
    assert_eq!(tc_mode(&nw, &lab), "tcx");
    assert_eq!(netwatch_filters(&lab.victim), vec![]);
    assert!(!has_clsact(&lab.victim));
    assert_eq!(lookups_arriving(&lab, 5), 0);
    assert_eq!(outbound_dropped(&nw, &lab, 15.0), 15.0);
}
