//! The real `netwatch` binary attached in network namespaces, driven by
//! real clients (nbtscan, nmap, plain sockets).

use std::{process::Command, time::Duration};

use netwatch_tests::{
    TempDir,
    daemon::{Netwatch, absent, netwatch, sample, try_sample},
    lab::*,
    netns::Netns,
    pin_dir, require_privileged,
};

const WAIT: Duration = Duration::from_secs(3);

fn packets(nw: &Netwatch, ns: &Netns, iface: &str, direction: &str, rule: &str, action: &str) -> f64 {
    let m = nw.metrics(ns);
    sample(
        &m,
        "netwatch_packets_total",
        &[
            ("interface", iface),
            ("direction", direction),
            ("rule", rule),
            ("action", action),
        ],
    )
}

/// nbtscan sweeping a /24, nmap against tcp/5190, and plain sockets: the
/// metrics count exactly what was sent, in the right direction.
#[test]
fn counts_real_scanners_exactly() {
    require_privileged!();
    let lab = Lab::new();
    // No IPv6 from the scanner (router solicitations, MLD reports), so
    // that its unmatched traffic is only what the test sends.
    lab.scanner
        .sysctl(&format!("net.ipv6.conf.{SCANNER_IF}.disable_ipv6=1"));
    let nw = Netwatch::start(
        &lab.victim,
        &pin_dir(),
        &["--iface", &format!("{VICTIM_IF}:host"), "--egress", VICTIM_IF],
    );

    // nbtscan probes every address of the /24 once: 256 datagrams.
    let out = lab.nbtscan(TARGET_RANGE);
    assert!(
        out.status.success(),
        "nbtscan: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = eventually(256.0, WAIT, || {
        packets(&nw, &lab.victim, VICTIM_IF, "inbound", "udp/137", "passed")
    });
    assert_eq!(got, 256.0);

    // nmap connect scan of 16 addresses on tcp/5190: one SYN each (RST back).
    let out = lab
        .scanner
        .command("nmap")
        .args(["-n", "-Pn", "-sT", "-p", "5190", "198.18.1.0/28"])
        .output()
        .expect("nmap");
    assert!(out.status.success(), "nmap: {}", String::from_utf8_lossy(&out.stderr));
    let got = eventually(16.0, WAIT, || {
        packets(&nw, &lab.victim, VICTIM_IF, "inbound", "tcp/5190", "passed")
    });
    assert_eq!(got, 16.0);

    // 37 more udp/137 from a socket, and 11 to a port without a rule.
    assert_eq!(send_udp(&lab.scanner, "198.18.1.77:137", 37), 37);
    assert_eq!(send_udp(&lab.scanner, "198.18.1.77:138", 11), 11);
    let got = eventually(293.0, WAIT, || {
        packets(&nw, &lab.victim, VICTIM_IF, "inbound", "udp/137", "passed")
    });
    assert_eq!(got, 293.0);
    // The 11 to udp/138 are the only IP packets the scanner sent that
    // match no rule (nbtscan and nmap get ICMP errors and RSTs back, which
    // are outbound).
    let unmatched = eventually(11.0, WAIT, || {
        sample(
            &nw.metrics(&lab.victim),
            "netwatch_unmatched_packets_total",
            &[("interface", VICTIM_IF), ("direction", "inbound")],
        )
    });
    assert_eq!(unmatched, 11.0);

    // The victim itself sends 5 NetBIOS lookups: TC egress counts them outbound.
    assert_eq!(send_udp(&lab.victim, "198.18.0.1:137", 5), 5);
    let got = eventually(5.0, WAIT, || {
        packets(&nw, &lab.victim, VICTIM_IF, "outbound", "udp/137", "passed")
    });
    assert_eq!(got, 5.0);
    assert_eq!(
        packets(&nw, &lab.victim, VICTIM_IF, "inbound", "udp/137", "dropped"),
        0.0,
        "monitor mode dropped"
    );

    // A 3000-byte datagram to udp/137 crosses the 1500-byte link in three
    // fragments: the first carries the ports (udp/137), the other two are
    // non-first fragments.
    let big = lab.scanner.run(|| {
        std::net::UdpSocket::bind("0.0.0.0:0")
            .unwrap()
            .send_to(&[0u8; 3000], "198.18.1.77:137")
            .unwrap()
    });
    assert_eq!(big, 3000);
    let got = eventually(294.0, WAIT, || {
        packets(&nw, &lab.victim, VICTIM_IF, "inbound", "udp/137", "passed")
    });
    assert_eq!(got, 294.0);
    let fragments = eventually(2.0, WAIT, || {
        sample(
            &nw.metrics(&lab.victim),
            "netwatch_fragments_total",
            &[("interface", VICTIM_IF), ("direction", "inbound")],
        )
    });
    assert_eq!(fragments, 2.0);

    // Bytes are whole frames (Ethernet header included): nbtscan's
    // 50-byte NBSTAT query makes a 92-byte frame, a 13-byte datagram of
    // ours 55 bytes, the first fragment 1514, a Linux SYN with its options
    // 74.
    let m = nw.metrics(&lab.victim);
    let bytes = |direction: &str, rule: &str| {
        sample(
            &m,
            "netwatch_bytes_total",
            &[
                ("interface", VICTIM_IF),
                ("direction", direction),
                ("rule", rule),
                ("action", "passed"),
            ],
        )
    };
    assert_eq!(bytes("inbound", "udp/137"), (256 * 92 + 37 * 55 + 1514) as f64);
    assert_eq!(bytes("inbound", "tcp/5190"), (16 * 74) as f64);
    assert_eq!(bytes("outbound", "udp/137"), (5 * 55) as f64);

    // promtool accepts the exposition without a single complaint.
    netwatch_tests::prometheus::promtool_accepts(&nw.metrics(&lab.victim));
}

/// Enforce mode on real sockets: probes never reach the listener, other
/// ports do; the IIS-style outbound lookups are dropped on egress.
#[test]
fn enforce_drops_probes_before_the_stack() {
    require_privileged!();
    let lab = Lab::new();
    let nw = Netwatch::start(
        &lab.victim,
        &pin_dir(),
        &[
            "--iface", VICTIM_IF, "--egress", VICTIM_IF, "--mode", "enforce", "--rule", "udp/137", "--rule", "tcp/5190",
        ],
    );
    let nb = udp_listener(&lab.victim, 137);
    let dgm = udp_listener(&lab.victim, 138);
    assert_eq!(send_udp(&lab.scanner, "198.18.0.2:137", 20), 20);
    assert_eq!(send_udp(&lab.scanner, "198.18.0.2:138", 20), 20);
    assert_eq!(count_received(&nb), 0, "udp/137 reached the socket in enforce mode");
    assert_eq!(count_received(&dgm), 20, "udp/138 (no rule) was disturbed");
    assert_eq!(
        packets(&nw, &lab.victim, VICTIM_IF, "inbound", "udp/137", "dropped"),
        20.0
    );

    let _listener = lab.victim.run(|| std::net::TcpListener::bind("0.0.0.0:5190").unwrap());
    let segments_before = lab.scanner.tcp_segments_sent();
    assert!(
        !tcp_connect(&lab.scanner, "198.18.0.2:5190", Duration::from_millis(300)),
        "tcp/5190 connected in enforce mode"
    );
    // One SYN, or more if the machine was slow enough for a retransmission
    // before the attempt gave up: every one the scanner sent is dropped.
    let syns = lab.scanner.tcp_segments_sent() - segments_before;
    assert!(syns >= 1);
    assert_eq!(
        packets(&nw, &lab.victim, VICTIM_IF, "inbound", "tcp/5190", "dropped"),
        syns as f64
    );

    // Outbound lookups from the host itself are stopped at TC egress.
    let scanner_nb = udp_listener(&lab.scanner, 137);
    assert_eq!(send_udp(&lab.victim, "198.18.0.1:137", 9), 9);
    assert_eq!(count_received(&scanner_nb), 0, "outbound udp/137 left the host");
    assert_eq!(
        packets(&nw, &lab.victim, VICTIM_IF, "outbound", "udp/137", "dropped"),
        9.0
    );
}

/// Stop and start: the totals continue. `detach` removes every program,
/// link and pin.
#[test]
fn counters_survive_restart_and_detach_removes_everything() {
    require_privileged!();
    let lab = Lab::new();
    let pins = pin_dir();
    let args = ["--iface", VICTIM_IF, "--egress", VICTIM_IF];
    let mut nw = Netwatch::start(&lab.victim, &pins, &args);
    send_udp(&lab.scanner, "198.18.0.2:137", 5);
    assert_eq!(
        eventually(5.0, WAIT, || packets(
            &nw,
            &lab.victim,
            VICTIM_IF,
            "inbound",
            "udp/137",
            "passed"
        )),
        5.0
    );
    assert!(nw.stop().success(), "unclean exit:\n{}", nw.log());

    // While stopped: nothing attached, counters still readable.
    let link = lab.victim.ip(&["-d", "link", "show", VICTIM_IF]);
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("prog/xdp"),
        "XDP left attached after SIGTERM"
    );
    let status = netwatch(&["status", "--json", "--pin-dir", &pins]);
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let counted: u64 = json["rule_counters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["rule"] == "udp/137" && c["direction"] == "inbound")
        .map(|c| c["packets"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, 5);
    assert_eq!(json["interfaces"][0]["xdp"], serde_json::Value::Null);

    let nw2 = Netwatch::start(&lab.victim, &pins, &args);
    send_udp(&lab.scanner, "198.18.0.2:137", 3);
    assert_eq!(
        eventually(8.0, WAIT, || packets(
            &nw2,
            &lab.victim,
            VICTIM_IF,
            "inbound",
            "udp/137",
            "passed"
        )),
        8.0
    );
    let link = lab.victim.ip(&["-d", "link", "show", VICTIM_IF]);
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("prog/xdp"),
        "XDP not attached while running"
    );

    // A second controller on the same pins is refused and harms nothing.
    let second = lab
        .victim
        .command(netwatch_tests::daemon::bin().to_str().unwrap())
        .args([
            "run",
            "--iface",
            VICTIM_IF,
            "--pin-dir",
            &pins,
            "--metrics-addr",
            "127.0.0.1:9738",
        ])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another `netwatch run` is using"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    send_udp(&lab.scanner, "198.18.0.2:137", 1);
    assert_eq!(
        eventually(9.0, WAIT, || packets(
            &nw2,
            &lab.victim,
            VICTIM_IF,
            "inbound",
            "udp/137",
            "passed"
        )),
        9.0
    );

    drop(nw2); // kill -9 and `netwatch detach`
    assert!(!std::path::Path::new(&pins).exists(), "pin directory left behind");
    let link = lab.victim.ip(&["-d", "link", "show", VICTIM_IF]);
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("prog/xdp"),
        "XDP left attached after detach"
    );
    let status = netwatch(&["status", "--pin-dir", &pins]);
    assert!(!status.status.success());
    assert!(String::from_utf8_lossy(&status.stderr).contains("no netwatch state in"));
}

/// SIGHUP applies a new config without losing a counter; a broken one is
/// rejected and the running config stays in force.
#[test]
fn sighup_reloads_and_rejects_broken_config() {
    require_privileged!();
    let lab = Lab::new();
    let dir = TempDir::new("cfg");
    let config = dir.join("netwatch.toml");
    let write = |text: &str| std::fs::write(&config, text).unwrap();
    write(&format!(
        "mode = \"monitor\"\ninterfaces = [\"{VICTIM_IF}:wan\"]\n\n[[rule]]\nprotocol = \"udp\"\nport = 137\n"
    ));
    let nw = Netwatch::start(&lab.victim, &pin_dir(), &["--config", config.to_str().unwrap()]);
    send_udp(&lab.scanner, "198.18.0.2:137", 4);
    assert_eq!(
        eventually(4.0, WAIT, || packets(
            &nw,
            &lab.victim,
            VICTIM_IF,
            "inbound",
            "udp/137",
            "passed"
        )),
        4.0
    );

    write(&format!(
        "mode = \"enforce\"\ninterfaces = [\"{VICTIM_IF}:wan\"]\n\n[[rule]]\nprotocol = \"udp\"\nport = 137\n\n[[rule]]\nprotocol = \"udp\"\nport = 138\ninbound = \"count\"\n"
    ));
    nw.signal(libc::SIGHUP);
    let reloaded = || {
        sample(
            &nw.metrics(&lab.victim),
            "netwatch_config_reloads_total",
            &[("result", "success")],
        )
    };
    assert_eq!(eventually(1.0, WAIT, reloaded), 1.0);
    let last_ok = |m: &str| sample(m, "netwatch_config_last_reload_successful", &[]);
    let m = nw.metrics(&lab.victim);
    assert_eq!(last_ok(&m), 1.0, "a good reload not reported as successful");
    assert_eq!(
        sample(&m, "netwatch_config_reloads_total", &[("result", "failure")]),
        0.0
    );
    send_udp(&lab.scanner, "198.18.0.2:137", 2);
    send_udp(&lab.scanner, "198.18.0.2:138", 3);
    assert_eq!(
        eventually(2.0, WAIT, || packets(
            &nw,
            &lab.victim,
            VICTIM_IF,
            "inbound",
            "udp/137",
            "dropped"
        )),
        2.0
    );
    assert_eq!(
        packets(&nw, &lab.victim, VICTIM_IF, "inbound", "udp/137", "passed"),
        4.0,
        "counter lost on reload"
    );
    assert_eq!(
        eventually(3.0, WAIT, || packets(
            &nw,
            &lab.victim,
            VICTIM_IF,
            "inbound",
            "udp/138",
            "passed"
        )),
        3.0
    );

    // Broken: an out-of-range port on line 5.
    write("mode = \"monitor\"\n\n[[rule]]\nprotocol = \"udp\"\nport = 70000\n");
    nw.signal(libc::SIGHUP);
    let failed = || {
        sample(
            &nw.metrics(&lab.victim),
            "netwatch_config_reloads_total",
            &[("result", "failure")],
        )
    };
    assert_eq!(eventually(1.0, WAIT, failed), 1.0);
    send_udp(&lab.scanner, "198.18.0.2:137", 1);
    assert_eq!(
        eventually(3.0, WAIT, || packets(
            &nw,
            &lab.victim,
            VICTIM_IF,
            "inbound",
            "udp/137",
            "dropped"
        )),
        3.0,
        "old config not kept"
    );
    let m = nw.metrics(&lab.victim);
    assert_eq!(sample(&m, "netwatch_info", &[("mode", "enforce")]), 1.0);
    assert_eq!(last_ok(&m), 0.0, "a rejected reload not reported");
    assert!(nw.log().contains("port 70000 is out of range 1-65535"), "{}", nw.log());

    // The file fixed: the next reload succeeds and says so again.
    write(&format!(
        "mode = \"monitor\"\ninterfaces = [\"{VICTIM_IF}:wan\"]\n\n[[rule]]\nprotocol = \"udp\"\nport = 137\n"
    ));
    nw.signal(libc::SIGHUP);
    assert_eq!(eventually(2.0, WAIT, reloaded), 2.0);
    let m = nw.metrics(&lab.victim);
    assert_eq!(last_ok(&m), 1.0, "still reported failed after a good reload");
    assert_eq!(sample(&m, "netwatch_info", &[("mode", "monitor")]), 1.0);
}

/// A router: XDP on the LAN side sees an infected inside host's probes
/// on their way out, before NAT, and enforce mode stops them there.
#[test]
fn router_lan_side_counts_and_stops_outbound_probes() {
    require_privileged!();
    let RouterLab {
        inside,
        router,
        internet,
    } = RouterLab::new();

    let nw = Netwatch::start(
        &router,
        &pin_dir(),
        &["--iface", "nw-lan:lan", "--iface", "nw-wan:wan", "--mode", "enforce"],
    );
    let far = udp_listener(&internet, 137);
    assert_eq!(send_udp(&inside, "198.18.1.9:137", 12), 12);
    assert_eq!(count_received(&far), 0, "probes crossed the router");
    assert_eq!(packets(&nw, &router, "nw-lan", "outbound", "udp/137", "dropped"), 12.0);
    assert_eq!(packets(&nw, &router, "nw-wan", "inbound", "udp/137", "dropped"), 0.0);

    // Inbound probes from outside are stopped on the WAN side.
    let inner = udp_listener(&inside, 137);
    assert_eq!(send_udp(&internet, "198.18.10.2:137", 6), 6);
    assert_eq!(count_received(&inner), 0);
    assert_eq!(packets(&nw, &router, "nw-wan", "inbound", "udp/137", "dropped"), 6.0);
}

fn cfg(file: &dyn Fn(&str, &str) -> String, name: &str, text: &str) -> Vec<String> {
    vec!["--config".into(), file(name, text)]
}

/// Bad flags and files: a clear error naming the problem, nothing attached.
#[test]
fn bad_input_is_refused_with_a_clear_error() {
    require_privileged!();
    let ns = Netns::new("bad");
    let pins = pin_dir();
    let dir = TempDir::new("bad");
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--iface".into(), "nw-nosuch0".into()],
            "interface \"nw-nosuch0\" does not exist",
        ),
        (
            vec!["--iface".into(), "lo:dmz".into()],
            "role \"dmz\" is not one of wan, lan, host",
        ),
        (
            vec!["--iface".into(), "lo".into(), "--rule".into(), "udp/0".into()],
            "port 0 is out of range",
        ),
        (
            vec!["--iface".into(), "lo".into(), "--rule".into(), "icmp/1".into()],
            "protocol \"icmp\" is not one of udp, tcp",
        ),
        (
            vec!["--iface".into(), "lo".into(), "--rule".into(), "udp/137=reject".into()],
            "action \"reject\" is not one of count, drop",
        ),
        (
            vec!["--iface".into(), "lo".into(), "--allow".into(), "198.18.0.1/24".into()],
            "has host bits set; did you mean 198.18.0.0/24",
        ),
        (
            vec!["--iface".into(), "lo".into(), "--allow".into(), "198.18.0.0/33".into()],
            "is not a CIDR",
        ),
        (
            vec![
                "--iface".into(),
                "lo".into(),
                "--allow".into(),
                "198.18.5.0/24".into(),
                "--block".into(),
                "198.18.5.0/24".into(),
            ],
            "would never apply",
        ),
        (
            vec![
                "--iface".into(),
                "lo".into(),
                "--metrics-addr".into(),
                "localhost".into(),
            ],
            "--metrics-addr",
        ),
        (vec![], "no interface to attach to"),
        (
            vec![
                "--config".into(),
                file("unknown.toml", "mode = \"monitor\"\nportz = 1\n"),
            ],
            "unknown field `portz`",
        ),
        (vec!["--config".into(), file("type.toml", "mode = 3\n")], "line 1"),
        (
            vec!["--config".into(), file("mode.toml", "mode = \"block\"\n")],
            "unknown variant `block`",
        ),
        (
            vec!["--egress".into(), "lo".into(), "--tc-attach".into(), "tc".into()],
            "invalid value 'tc' for '--tc-attach <HOW>'",
        ),
        (
            vec![
                "--config".into(),
                file("tc.toml", "egress = [\"lo\"]\ntc_attach = \"tc\"\n"),
            ],
            "unknown variant `tc`, expected one of `auto`, `tcx`, `netlink`",
        ),
        (
            vec!["--config".into(), file("syntax.toml", "[[rule]\nprotocol = \"udp\"\n")],
            "line 1",
        ),
        (
            vec![
                "--config".into(),
                file(
                    "dup.toml",
                    "[[rule]]\nprotocol = \"udp\"\nport = 137\n[[rule]]\nprotocol = \"udp\"\nport = 137\n",
                ),
            ],
            "rule udp/137 is given twice",
        ),
        (
            vec![
                "--config".into(),
                file("port.toml", "[[rule]]\nprotocol = \"tcp\"\nport = -5\n"),
            ],
            "rule[0] (tcp/-5)",
        ),
        (
            vec![
                "--config".into(),
                dir.join("missing.toml").to_str().unwrap().to_string(),
            ],
            "reading config file",
        ),
        (
            cfg(
                &file,
                "zero.toml",
                "[[rule]]\nprotocol = \"udp\"\nport = 137\nthreshold = 0\n",
            ),
            "threshold 0 is out of range 2-2000",
        ),
        (
            cfg(
                &file,
                "absurd.toml",
                "[[rule]]\nprotocol = \"udp\"\nport = 137\nthreshold = 100000000\n",
            ),
            "threshold 100000000 is out of range",
        ),
        (
            cfg(
                &file,
                "window.toml",
                "[[rule]]\nprotocol = \"udp\"\nport = 137\nwindow_secs = 0\n",
            ),
            "window_secs 0 is out of range",
        ),
        (
            cfg(
                &file,
                "ttl.toml",
                "[[rule]]\nprotocol = \"udp\"\nport = 137\nblock_secs = 60\n",
            ),
            "block_secs is set but auto_block is not",
        ),
        (
            cfg(
                &file,
                "neg.toml",
                "[[rule]]\nprotocol = \"udp\"\nport = 137\nwindow_secs = -1\n",
            ),
            "window_secs = -1 is out of range",
        ),
        (
            cfg(
                &file,
                "overlap.toml",
                "allowlist = [\"198.18.0.0/16\", \"198.18.4.0/24\"]\n",
            ),
            "198.18.4.0/24 overlaps 198.18.0.0/16",
        ),
        (
            cfg(&file, "cidr.toml", "blocklist = [\"198.18.0.0/40\"]\n"),
            "blocklist[0]",
        ),
        (cfg(&file, "webports.toml", "web_ports = [0]\n"), "web_ports[0]"),
        (
            cfg(
                &file,
                "rules65.toml",
                &(1..=65)
                    .map(|p| format!("[[rule]]\nprotocol = \"udp\"\nport = {p}\n"))
                    .collect::<String>(),
            ),
            "65 rules given; at most 64 are supported",
        ),
        (
            cfg(
                &file,
                "block16385.toml",
                &format!(
                    "blocklist = [{}]\n",
                    (0..16_385u32)
                        .map(|i| format!("\"{}/32\"", std::net::Ipv4Addr::from(0xc613_0000 + i)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            "blocklist has more than 16384 entries per address family",
        ),
        (
            cfg(&file, "iface.toml", "interfaces = [\"eth0:core\"]\n"),
            "interfaces[0]",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<String> = args;
        let out = ns
            .command(netwatch_tests::daemon::bin().to_str().unwrap())
            .arg("run")
            .args(["--pin-dir", &pins])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            stderr.contains(needle),
            "{args:?}: error does not say {needle:?}:\n{stderr}"
        );
        let link = ns.ip(&["-d", "link", "show", "lo"]);
        assert!(
            !String::from_utf8_lossy(&link.stdout).contains("prog/xdp"),
            "{args:?} left XDP attached"
        );
    }
    let _ = netwatch(&["detach", "--pin-dir", &pins]);
}

/// Sends one datagram from each address of `ns` in `sources` to each of
/// `dsts` on `port`; returns how many the kernel accepted.
fn send_from_each(ns: &Netns, sources: &[&str], dsts: &[&str], port: u16) -> usize {
    sources
        .iter()
        .map(|src| {
            dsts.iter()
                .map(|dst| send_udp_from(ns, src, &format!("{dst}:{port}"), 1))
                .sum::<usize>()
        })
        .sum()
}

/// SIGHUP applies lists, thresholds, windows, auto-block settings and web
/// ports, and keeps the entries `netwatch block` added; `rule_info` and
/// `list_entries` follow.
#[test]
fn sighup_reloads_lists_detection_and_web_ports() {
    require_privileged!();
    let lab = Lab::new();
    // Port 8080 answers SYNs, so a visit completes a handshake.
    let _web = lab
        .victim
        .run(|| std::net::TcpListener::bind("0.0.0.0:8080"))
        .expect("listen on 8080");
    for i in 3..=9 {
        lab.scanner
            .ip(&["addr", "add", &format!("198.18.0.{i}/24"), "dev", SCANNER_IF]);
    }
    let dir = TempDir::new("cfg");
    let config = dir.join("netwatch.toml");
    let head = format!("mode = \"enforce\"\ninterfaces = [\"{VICTIM_IF}:host\"]\negress = [\"{VICTIM_IF}\"]\n");
    std::fs::write(
        &config,
        format!("{head}\n[[rule]]\nprotocol = \"udp\"\nport = 137\ninbound = \"count\"\noutbound = \"count\"\n"),
    )
    .unwrap();
    let nw = Netwatch::start(&lab.victim, &pin_dir(), &["--config", config.to_str().unwrap()]);
    let m = nw.metrics(&lab.victim);
    let rule_info = |m: &str, rule: &str, inbound: &str, outbound: &str| {
        try_sample(
            m,
            "netwatch_rule_info",
            &[("rule", rule), ("inbound", inbound), ("outbound", outbound)],
        )
    };
    assert_eq!(rule_info(&m, "udp/137", "count", "count"), Some(1.0));
    assert!(absent(&m, "netwatch_rule_info", &[("rule", "udp/138")]));
    assert_eq!(sample(&m, "netwatch_list_entries", &[("list", "allowlist")]), 0.0);
    assert_eq!(sample(&m, "netwatch_list_entries", &[("list", "blocklist")]), 0.0);

    // A command-line block, and a visitor of port 8080 (not a web port
    // yet) looked up by the host: a probe, not a reverse lookup.
    nw.cli(&["block", "198.18.0.3/32"]);
    let visit = |from: &str| {
        let local: std::net::Ipv4Addr = from.parse().unwrap();
        // A completed handshake is what makes a visitor.
        lab.scanner
            .run(|| netwatch_user::lab::netns::tcp_connect_from(local, "198.18.0.2:8080".parse().unwrap()))
            .expect("connect to 8080");
        assert_eq!(send_udp(&lab.victim, &format!("{from}:137"), 1), 1);
    };
    visit("198.18.0.6");
    let outbound = |nw: &Netwatch| packets(nw, &lab.victim, VICTIM_IF, "outbound", "udp/137", "passed");
    assert_eq!(eventually(1.0, WAIT, || outbound(&nw)), 1.0);
    assert_eq!(
        try_sample(&nw.metrics(&lab.victim), "netwatch_reverse_lookups_total", &[]),
        Some(0.0),
        "a lookup of a port-8080 visitor counted as a reverse lookup before 8080 was a web port"
    );

    std::fs::write(
        &config,
        format!(
            "{head}allowlist = [\"198.18.0.8/32\"]\nblocklist = [\"198.18.0.4/32\"]\nweb_ports = [8080]\n\n\
             [[rule]]\nprotocol = \"udp\"\nport = 137\ninbound = \"count\"\noutbound = \"count\"\n\
             threshold = 3\nwindow_secs = 60\nauto_block = true\nblock_secs = 600\n\n\
             [[rule]]\nprotocol = \"udp\"\nport = 138\ninbound = \"drop\"\noutbound = \"count\"\n"
        ),
    )
    .unwrap();
    nw.signal(libc::SIGHUP);
    let reloads = || {
        sample(
            &nw.metrics(&lab.victim),
            "netwatch_config_reloads_total",
            &[("result", "success")],
        )
    };
    assert_eq!(eventually(1.0, WAIT, reloads), 1.0, "{}", nw.log());

    // What the maps now hold.
    let status = nw.status();
    let rule = |name: &str| {
        status["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["rule"] == name)
            .unwrap_or_else(|| panic!("no rule {name}: {status:#}"))
            .clone()
    };
    let udp137 = rule("udp/137");
    assert_eq!(
        (&udp137["threshold"], &udp137["window_secs"], &udp137["block_secs"]),
        (&3.into(), &60.into(), &600.into())
    );
    assert_eq!(
        (&rule("udp/138")["inbound"], &rule("udp/138")["outbound"]),
        (&"drop".into(), &"count".into())
    );
    let listed = |list: &str| -> Vec<(String, String)> {
        status[list]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["cidr"].as_str().unwrap().to_string(),
                    e["origin"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let mut blocklist = listed("blocklist");
    blocklist.sort();
    assert_eq!(
        blocklist,
        [
            ("198.18.0.3/32".into(), "cli".into()),
            ("198.18.0.4/32".into(), "config".into())
        ],
        "the command-line block did not survive the reload"
    );
    assert_eq!(
        listed("allowlist"),
        [("198.18.0.8/32".to_string(), "config".to_string())]
    );
    let m = nw.metrics(&lab.victim);
    assert_eq!(rule_info(&m, "udp/137", "count", "count"), Some(1.0));
    assert_eq!(rule_info(&m, "udp/138", "drop", "count"), Some(1.0));
    assert_eq!(sample(&m, "netwatch_list_entries", &[("list", "allowlist")]), 1.0);
    assert_eq!(sample(&m, "netwatch_list_entries", &[("list", "blocklist")]), 2.0);

    // What the traffic now meets.
    let nb = udp_listener(&lab.victim, 137);
    let dgm = udp_listener(&lab.victim, 138);
    let targets = ["198.18.1.1", "198.18.1.2", "198.18.1.3", "198.18.1.4"];
    assert_eq!(send_from_each(&lab.scanner, &["198.18.0.3"], &targets[..2], 137), 2);
    assert_eq!(count_received(&nb), 0, "the command-line block no longer applies");
    assert_eq!(send_from_each(&lab.scanner, &["198.18.0.4"], &targets[..2], 137), 2);
    assert_eq!(count_received(&nb), 0, "the reloaded config's block does not apply");
    // threshold 3 with auto-block: the third destination is dropped, and
    // so is everything after it.
    assert_eq!(send_from_each(&lab.scanner, &["198.18.0.5"], &targets, 137), 4);
    assert_eq!(
        count_received(&nb),
        2,
        "the reloaded threshold and auto-block do not apply"
    );
    let tracked = nw.lookup("198.18.0.5")["tracked"][0].clone();
    assert_eq!(tracked["flagged"], true, "{tracked:#}");
    assert!(tracked["blocked_until"].is_string(), "{tracked:#}");
    // The allowlisted source is flagged, never blocked.
    assert_eq!(send_from_each(&lab.scanner, &["198.18.0.8"], &targets, 137), 4);
    assert_eq!(count_received(&nb), 4, "the reloaded allowlist does not apply");
    let tracked = nw.lookup("198.18.0.8")["tracked"][0].clone();
    assert_eq!(
        (&tracked["flagged"], &tracked["blocked_until"]),
        (&true.into(), &serde_json::Value::Null)
    );
    // The new rule drops.
    assert_eq!(send_from_each(&lab.scanner, &["198.18.0.7"], &targets[..1], 138), 1);
    assert_eq!(count_received(&dgm), 0, "the reloaded rule udp/138 does not drop");
    // 8080 is a web port now: its visitor's lookup is a reverse lookup.
    visit("198.18.0.6");
    let reverse = eventually(Some(1.0), WAIT, || {
        try_sample(&nw.metrics(&lab.victim), "netwatch_reverse_lookups_total", &[])
    });
    assert_eq!(reverse, Some(1.0), "the reloaded web port does not make visitors");
}

/// Where the driver has no native XDP (loopback), the program is attached
/// in generic mode: the log and `status` say so, the attached gauge
/// carries `mode="generic"`, and it enforces all the same.
#[test]
fn falls_back_to_generic_xdp_where_native_is_missing() {
    require_privileged!();
    let ns = Netns::new("gx");
    let nw = Netwatch::start(&ns, &pin_dir(), &["--iface", "lo", "--mode", "enforce"]);
    assert!(nw.log().contains("lo: native XDP not available"), "{}", nw.log());
    assert_eq!(nw.status()["interfaces"][0]["xdp"], "generic");
    let m = nw.metrics(&ns);
    let attached = |mode: &str| {
        try_sample(
            &m,
            "netwatch_interface_attached",
            &[("interface", "lo"), ("hook", "xdp"), ("mode", mode)],
        )
    };
    assert_eq!(attached("generic"), Some(1.0));
    assert_eq!(attached("native"), None);
    let link = ns.ip(&["-d", "link", "show", "lo"]);
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("xdpgeneric"),
        "{}",
        String::from_utf8_lossy(&link.stdout)
    );

    let nb = udp_listener(&ns, 137);
    let dgm = udp_listener(&ns, 138);
    assert_eq!(send_udp(&ns, "127.0.0.1:137", 4), 4);
    assert_eq!(send_udp(&ns, "127.0.0.1:138", 4), 4);
    assert_eq!(count_received(&nb), 0, "generic XDP did not enforce");
    assert_eq!(count_received(&dgm), 4);
    assert_eq!(packets(&nw, &ns, "lo", "inbound", "udp/137", "dropped"), 4.0);
}

/// The rule limit: 64 rules run, 65 are refused on reload (the running
/// config stays in force); at start, see `bad_input_is_refused_with_a_clear_error`.
/// (The 16 384-CIDR limit: `policy.rs`.)
#[test]
fn sixty_four_rules_run_and_a_65th_is_refused_on_reload() {
    require_privileged!();
    let lab = Lab::new();
    let dir = TempDir::new("cfg");
    let config = dir.join("netwatch.toml");
    let write = |rules: u32| {
        let mut text = format!("mode = \"enforce\"\ninterfaces = [\"{VICTIM_IF}\"]\n");
        for port in 20000..20000 + rules - 1 {
            text.push_str(&format!(
                "\n[[rule]]\nprotocol = \"tcp\"\nport = {port}\ninbound = \"count\"\n"
            ));
        }
        // The last rule, in the last slot.
        text.push_str("\n[[rule]]\nprotocol = \"udp\"\nport = 137\n");
        std::fs::write(&config, text).unwrap();
    };
    assert_eq!(netwatch_common::MAX_RULES, 64, "the README's limit");
    write(64);
    let nw = Netwatch::start(&lab.victim, &pin_dir(), &["--config", config.to_str().unwrap()]);
    assert_eq!(nw.status()["rules"].as_array().unwrap().len(), 64);
    assert_eq!(sample(&nw.metrics(&lab.victim), "netwatch_rule_info", &[]), 64.0);
    // The 64th rule applies.
    let nb = udp_listener(&lab.victim, 137);
    assert_eq!(send_udp(&lab.scanner, "198.18.0.2:137", 2), 2);
    assert_eq!(count_received(&nb), 0, "the 64th rule does not apply");
    assert_eq!(
        packets(&nw, &lab.victim, VICTIM_IF, "inbound", "udp/137", "dropped"),
        2.0
    );

    write(65);
    nw.signal(libc::SIGHUP);
    let failures = || {
        sample(
            &nw.metrics(&lab.victim),
            "netwatch_config_reloads_total",
            &[("result", "failure")],
        )
    };
    assert_eq!(eventually(1.0, WAIT, failures), 1.0, "{}", nw.log());
    assert!(
        nw.log().contains("65 rules given; at most 64 are supported"),
        "{}",
        nw.log()
    );
    assert_eq!(nw.status()["rules"].as_array().unwrap().len(), 64);
    assert_eq!(send_udp(&lab.scanner, "198.18.0.2:137", 1), 1);
    assert_eq!(count_received(&nb), 0, "the running config was not kept");
}

/// `netwatch lab`, the README's run command (`cargo xtask run` runs it
/// from the release build; here, the binary under test): the demo sweeps,
/// flags, blocks and looks up what the README says, and leaves nothing
/// behind. The lab uses fixed names (its namespaces, /sys/fs/bpf/netwatch-lab,
/// /tmp/netwatch-lab-state), so it runs in a mount namespace of its own,
/// with its own /run/netns, bpffs and /tmp: a lab someone else runs on the
/// machine is neither seen nor touched.
#[test]
fn the_lab_demo_runs_and_leaves_nothing_behind() {
    require_privileged!();
    // The binary is copied onto a private tmpfs first: the checkout may
    // itself live under /tmp, which the script hides.
    let script = r#"set -e
mount -t tmpfs tmpfs /mnt
cp "$NETWATCH_BIN" /mnt/netwatch
mkdir -p /run/netns
mount -t tmpfs tmpfs /run/netns
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs tmpfs /tmp
/mnt/netwatch lab
echo "== left behind"
ip netns list
ls -A /sys/fs/bpf /tmp
"#;
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .env("NETWATCH_BIN", netwatch_tests::daemon::bin())
        .output()
        .expect("unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "netwatch lab failed:\n{stdout}\n{stderr}");
    let (demo, left) = stdout.split_once("== left behind\n").expect("the lab ran to its end");
    for line in [
        // nbtscan's 256 probes, dropped; the scanner flagged once.
        "netwatch_packets_total{action=\"dropped\",direction=\"inbound\",interface=\"lab-host0\",rule=\"udp/137\"} 256",
        "netwatch_scanners_flagged_total{direction=\"inbound\",rule=\"udp/137\"} 1",
        // The ten visitors' lookups: reverse lookups, dropped on egress.
        "netwatch_reverse_lookups_total{action=\"dropped\",interface=\"lab-host0\",rule=\"udp/137\"} 10",
        "#1 scan udp/137 inbound on lab-host0",
        "udp/137 outbound reverse-lookup on lab-host0: 10 packets",
    ] {
        assert!(demo.contains(line), "the lab did not show {line:?}:\n{demo}");
    }
    let web_host = demo
        .split("==> netwatch lookup 198.18.0.2")
        .nth(1)
        .expect("lookup of the web host");
    assert!(web_host.contains("incidents: none"), "{web_host}");
    // Namespaces, pins (bpffs's own maps.debug and progs.debug aside) and
    // the state directory are gone.
    let left: Vec<&str> = left
        .lines()
        .filter(|l| !l.is_empty() && !l.ends_with(':') && !["maps.debug", "progs.debug"].contains(l))
        .collect();
    assert!(left.is_empty(), "the lab left {left:?} behind");
}
