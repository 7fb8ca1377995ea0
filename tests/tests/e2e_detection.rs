//! Scan detection end to end: real scanners in namespaces, the real
//! binary, incidents looked up by IP address.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpListener, UdpSocket},
    time::{Duration, Instant},
};

use netwatch_tests::{
    daemon::{Netwatch, netwatch, sample},
    lab::*,
    netns::{Netns, veth},
    pin_dir, require_privileged, unique,
};

fn incidents(report: &serde_json::Value) -> &Vec<serde_json::Value> {
    report["incidents"].as_array().unwrap()
}

/// nbtscan sweeping a /24 local to the victim is flagged once and can be
/// looked up; so is nmap against tcp/5190. Incidents survive a restart
/// and a new flag updates the open incident instead of duplicating it.
#[test]
fn real_scanners_are_flagged_and_looked_up() {
    require_privileged!();
    let lab = Lab::new();
    let pins = pin_dir();
    let state = std::env::temp_dir().join(unique("state"));
    let args = ["--iface", VICTIM_IF];
    let mut nw = Netwatch::start_with_state(&lab.victim, &pins, &state, &args);

    let out = lab.nbtscan(TARGET_RANGE);
    assert!(out.status.success());
    let report = nw.wait_for_incident(SCANNER_IP);
    assert_eq!(report["ip"], SCANNER_IP);
    let i = &incidents(&report)[0];
    assert_eq!(i["rule"], "udp/137");
    assert_eq!(i["direction"], "inbound");
    assert_eq!(i["interface"], VICTIM_IF);
    assert_eq!(i["classification"], "scan");
    assert_eq!(i["blocked"], false);
    assert!(i["first_seen"].as_str().unwrap().ends_with('Z'), "not RFC 3339: {i}");
    assert!(i["distinct_destinations"].as_u64().unwrap() >= 20);
    // The refresh brings the incident up to the full sweep.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = nw.lookup(SCANNER_IP);
        if incidents(&r)[0]["packets"].as_u64().unwrap() == 256 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "incident not refreshed: {r:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let tracked = &report["tracked"].as_array().unwrap()[0];
    assert_eq!(tracked["flagged"], true);

    let out = lab
        .scanner
        .command("nmap")
        .args(["-n", "-Pn", "-sT", "-p", "5190", "198.18.1.0/27"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let report = loop {
        let r = nw.lookup(SCANNER_IP);
        if incidents(&r).len() == 2 {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nmap not flagged: {r:#}\n{}",
            nw.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(incidents(&report)[0]["rule"], "tcp/5190", "newest first");
    let m = nw.metrics(&lab.victim);
    assert_eq!(
        sample(
            &m,
            "netwatch_scanners_flagged_total",
            &[("rule", "udp/137"), ("direction", "inbound")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "netwatch_scanners_flagged_total",
            &[("rule", "tcp/5190"), ("direction", "inbound")]
        ),
        1.0
    );
    assert!(!m.contains(SCANNER_IP), "per-IP label in the exposition");

    // Restart on the same database: incidents are still there, and a new
    // sweep updates the open incident rather than adding one.
    assert!(nw.stop().success());
    drop(nw);
    let nw = Netwatch::start_with_state(&lab.victim, &pin_dir(), &state, &args);
    assert_eq!(
        incidents(&nw.lookup(SCANNER_IP)).len(),
        2,
        "incidents lost across a restart"
    );
    lab.nbtscan("198.18.1.0/26");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sample(
        &nw.metrics(&lab.victim),
        "netwatch_scanners_flagged_total",
        &[("rule", "udp/137")],
    ) < 1.0
    {
        assert!(std::time::Instant::now() < deadline, "second sweep not flagged");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        incidents(&nw.lookup(SCANNER_IP)).len(),
        2,
        "an open incident was duplicated"
    );

    // A source tracked but not flagged also answers.
    send_udp(&lab.scanner, "198.18.1.5:137", 3);
    let quiet = "198.18.0.1";
    let r = nw.lookup(quiet);
    assert!(!r["tracked"].as_array().unwrap().is_empty());
    let unknown = nw.lookup("198.18.99.99");
    assert!(incidents(&unknown).is_empty() && unknown["tracked"].as_array().unwrap().is_empty());
    drop(nw);
    let _ = std::fs::remove_dir_all(&state);
}

/// An IIS-like host (HTTP server that looks up every visitor on udp/137)
/// visited by 40 clients is not a scanner; the same host sending udp/137
/// to 40 addresses that never visited is.
#[test]
fn iis_reverse_lookups_are_not_flagged_but_a_sweep_is() {
    require_privileged!();
    let web = Netns::new("web");
    let clients = Netns::new("cli");
    veth(
        &web,
        "nw-web0",
        "198.18.0.80/24",
        &clients,
        "nw-cli0",
        "198.18.0.100/24",
    );
    for i in 101..140 {
        clients.ip(&["addr", "add", &format!("198.18.0.{i}/24"), "dev", "nw-cli0"]);
    }
    clients.local_range("198.18.2.0/24");
    web.ip(&["route", "add", "198.18.2.0/24", "via", "198.18.0.100"]);
    let nw = Netwatch::start(&web, &pin_dir(), &["--iface", "nw-web0:host", "--egress", "nw-web0"]);

    // The web server: accept, look the visitor up on udp/137, answer.
    let (listener, lookup) = web.run(|| {
        (
            TcpListener::bind("198.18.0.80:80").unwrap(),
            UdpSocket::bind("0.0.0.0:0").unwrap(),
        )
    });
    let server = std::thread::spawn(move || {
        for _ in 0..40 {
            let (mut conn, peer) = listener.accept().unwrap();
            lookup.send_to(b"NBSTAT", (peer.ip(), 137)).unwrap();
            let mut buf = [0u8; 64];
            let _ = conn.read(&mut buf);
        }
    });
    for i in 100..140 {
        clients.run(|| {
            let local = std::net::Ipv4Addr::new(198, 18, 0, i as u8);
            drop(netwatch_user::netns::tcp_connect_from(local, "198.18.0.80:80".parse().unwrap()).expect("visit"));
        });
    }
    server.join().unwrap();
    let m = eventually_metric(&nw, &web, "netwatch_reverse_lookups_total", 40.0);
    assert_eq!(m, 40.0);
    let m = nw.metrics(&web);
    assert_eq!(
        sample(&m, "netwatch_scanners_flagged_total", &[]),
        0.0,
        "reverse lookups flagged as a scan"
    );
    let report = nw.lookup("198.18.0.80");
    assert!(incidents(&report).is_empty());
    assert_eq!(report["tracked"][0]["classification"], "reverse-lookup");

    // Now a sweep of 40 addresses that never visited.
    assert_eq!(send_udp_many(&web, "198.18.2.", 1..41, 137), 40);
    let report = nw.wait_for_incident("198.18.0.80");
    let i = &incidents(&report)[0];
    assert_eq!(i["classification"], "scan");
    assert_eq!(i["direction"], "outbound");
    assert_eq!(i["rule"], "udp/137");
}

/// A web host (198.18.0.80, 2001:db8::80) with `netwatch run --iface
/// host --egress` and clients (198.18.0.100+, 2001:db8::100+) on one
/// veth; `SPOOF_V4`/`SPOOF_V6` (and the flood's 198.19.0.0/16 and
/// 2001:db8:f::/64) are routed from the web host towards the clients,
/// whose namespace owns none of them and drops what the host sends there.
struct WebLab {
    web: Netns,
    clients: Netns,
    nw: Netwatch,
}

const WEB_V4: &str = "198.18.0.80";
const WEB_V6: &str = "2001:db8::80";

fn client_v4(i: u32) -> std::net::IpAddr {
    std::net::Ipv4Addr::new(198, 18, 0, 100 + i as u8).into()
}

fn client_v6(i: u32) -> std::net::IpAddr {
    format!("2001:db8::{:x}", 0x100 + i).parse().unwrap()
}

impl WebLab {
    fn new(clients_per_family: u32) -> Self {
        let web = Netns::new("web");
        let clients = Netns::new("cli");
        veth(
            &web,
            "nw-web0",
            "198.18.0.80/24",
            &clients,
            "nw-cli0",
            "198.18.0.100/24",
        );
        web.ip(&["addr", "add", "2001:db8::80/64", "dev", "nw-web0", "nodad"]);
        for i in 0..clients_per_family {
            if i > 0 {
                clients.ip(&["addr", "add", &format!("{}/24", client_v4(i)), "dev", "nw-cli0"]);
            }
            clients.ip(&[
                "addr",
                "add",
                &format!("{}/64", client_v6(i)),
                "dev",
                "nw-cli0",
                "nodad",
            ]);
        }
        for range in ["198.18.4.0/24", "198.19.0.0/16"] {
            web.ip(&["route", "add", range, "via", "198.18.0.100"]);
        }
        for range in ["2001:db8:4::/64", "2001:db8:f::/64"] {
            web.ip(&["-6", "route", "add", range, "via", "2001:db8::100"]);
        }
        // One SYN-ACK per SYN: no retransmissions to count.
        let out = web
            .command("sysctl")
            .args(["-qw", "net.ipv4.tcp_synack_retries=0"])
            .output()
            .expect("sysctl");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let nw = Netwatch::start(&web, &pin_dir(), &["--iface", "nw-web0:host", "--egress", "nw-web0"]);
        WebLab { web, clients, nw }
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        // + 0.0: the sum of no samples is -0.
        sample(&self.nw.metrics(&self.web), name, labels) + 0.0
    }

    /// udp/137 from the web host to each address (IPv4 from the host's
    /// IPv4 address, IPv6 from its IPv6 one); returns how many were sent.
    fn lookups(&self, to: &[std::net::IpAddr]) -> usize {
        self.web.run(|| {
            let v4 = UdpSocket::bind("198.18.0.80:0").unwrap();
            let v6 = UdpSocket::bind("[2001:db8::80]:0").unwrap();
            to.iter()
                .filter(|ip| {
                    let socket = if ip.is_ipv4() { &v4 } else { &v6 };
                    socket.send_to(b"NBSTAT", (**ip, 137)).is_ok()
                })
                .count()
        })
    }
}

fn spoof_v4(i: u32) -> std::net::IpAddr {
    std::net::Ipv4Addr::new(198, 18, 4, 1 + i as u8).into()
}

fn spoof_v6(i: u32) -> std::net::IpAddr {
    format!("2001:db8:4::{:x}", 1 + i).parse().unwrap()
}

/// Issue 10, attack 1: 50 spoofed SYNs to the web port, which the host
/// answers but which never complete a handshake, used to make the host's
/// udp/137 sweep of those 50 addresses pass for reverse lookups. They
/// make no visitor: the sweep is flagged, for IPv4 and IPv6.
#[test]
fn spoofed_syns_do_not_hide_a_sweep_as_reverse_lookups() {
    require_privileged!();
    let lab = WebLab::new(1);
    // A listening web server, so every SYN is answered with a SYN-ACK.
    let (_v4, _v6) = lab.web.run(|| {
        (
            std::net::TcpListener::bind("198.18.0.80:80").unwrap(),
            std::net::TcpListener::bind("[2001:db8::80]:80").unwrap(),
        )
    });
    let within = Duration::from_secs(10);
    assert_eq!(
        spoof_syns(&lab.clients, "198.18.0.80:80".parse().unwrap(), 50, within, spoof_v4),
        50
    );
    assert_eq!(
        spoof_syns(&lab.clients, "[2001:db8::80]:80".parse().unwrap(), 50, within, spoof_v6),
        50
    );
    // The host answered all 100 (counted once the fix counts SYN-ACKs).
    let syn_acks = eventually(100.0, within, || lab.metric("netwatch_web_syn_acks_total", &[]));

    let swept: Vec<_> = (0..50).map(spoof_v4).chain((0..50).map(spoof_v6)).collect();
    assert_eq!(lab.lookups(&swept), 100);
    let flagged = eventually(2.0, within, || {
        lab.metric("netwatch_scanners_flagged_total", &[("direction", "outbound")])
    });
    let reverse = lab.metric("netwatch_reverse_lookups_total", &[]);
    let visitors = lab.metric("netwatch_visitors_recorded_total", &[]);
    eprintln!(
        "attack 1: 100 spoofed SYNs, {syn_acks} SYN-ACKs, {visitors} visitors recorded; \
         sweep of 100: {flagged} sources flagged, {reverse} reverse lookups"
    );
    assert_eq!(flagged, 2.0, "the sweep towards spoofed SYN sources was not flagged");
    assert_eq!(reverse, 0.0);
    for web in [WEB_V4, WEB_V6] {
        let report = lab.nw.wait_for_incident(web);
        let i = &incidents(&report)[0];
        assert_eq!(
            (i["classification"].as_str(), i["direction"].as_str()),
            (Some("scan"), Some("outbound"))
        );
    }
    assert_eq!((syn_acks, visitors), (100.0, 0.0));
    assert_eq!(lab.metric("netwatch_web_acks_rejected_total", &[]), 0.0);
}

/// Issue 10, attack 2: a flood of spoofed SYNs from 140 000 sources, more
/// than the 65 536 visitors the kernel keeps, used to evict the real
/// visitors so that the web host's lookups of them are flagged. Visitors
/// are recorded only on a completed handshake, apart from the pending
/// ones the flood churns: 25 IPv4 and 25 IPv6 real visitors' lookups
/// after the flood are still reverse lookups.
#[test]
fn a_syn_flood_does_not_evict_real_visitors() {
    require_privileged!();
    const VISITORS: u32 = 25;
    const FLOOD_V4: u32 = 65_000;
    const FLOOD_V6: u32 = 75_000;
    let lab = WebLab::new(VISITORS);
    let listener = lab.web.run(|| std::net::TcpListener::bind("[::]:80").unwrap());
    let visitors: Vec<_> = (0..VISITORS)
        .map(client_v4)
        .chain((0..VISITORS).map(client_v6))
        .collect();
    let server = std::thread::spawn(move || {
        let accepted = (0..2 * VISITORS)
            .map(|_| listener.accept().unwrap().0)
            .collect::<Vec<_>>();
        // Still listening through the flood: every SYN is answered.
        (listener, accepted)
    });
    // The visitors connect from the CPU the flood comes from, so that
    // they share the LRU's per-CPU lists with it (as on a host whose NIC
    // spreads a flood over every CPU).
    let connections: Vec<_> = lab.clients.run(|| {
        pin_to_first_cpu();
        visitors
            .iter()
            .map(|ip| {
                let web = if ip.is_ipv4() { WEB_V4 } else { WEB_V6 };
                tcp_connect_from(*ip, SocketAddr::new(web.parse().unwrap(), 80)).expect("visit")
            })
            .collect()
    });
    let (_listener, accepted) = server.join().unwrap();
    assert_eq!((connections.len(), accepted.len()), (50, 50));

    let started = Instant::now();
    let within = Duration::from_secs(30);
    let sent_v4 = spoof_syns(&lab.clients, "198.18.0.80:80".parse().unwrap(), FLOOD_V4, within, |i| {
        std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 19, 0, 1)) + i).into()
    });
    let sent_v6 = spoof_syns(
        &lab.clients,
        "[2001:db8::80]:80".parse().unwrap(),
        FLOOD_V6,
        within,
        |i| std::net::Ipv6Addr::from(0x2001_0db8_000f_0000_0000_0000_0000_0000u128 + u128::from(i) + 1).into(),
    );
    let flood_secs = started.elapsed().as_secs_f64();
    assert_eq!((sent_v4, sent_v6), (FLOOD_V4, FLOOD_V6), "flood cut short");

    // The IIS-style lookups of the real visitors, after the flood.
    assert_eq!(lab.lookups(&visitors), 50);
    let reverse = eventually(50.0, Duration::from_secs(5), || {
        lab.metric("netwatch_reverse_lookups_total", &[])
    });
    let flagged = lab.metric("netwatch_scanners_flagged_total", &[]);
    let syn_acks = lab.metric("netwatch_web_syn_acks_total", &[]);
    let recorded = lab.metric("netwatch_visitors_recorded_total", &[]);
    eprintln!(
        "attack 2: {} spoofed SYNs in {flood_secs:.1} s, {syn_acks} SYN-ACKs; {recorded} visitors recorded; \
         50 lookups of real visitors: {reverse} reverse lookups, {flagged} sources flagged",
        sent_v4 + sent_v6
    );
    assert_eq!(flagged, 0.0, "real visitors' lookups flagged after a SYN flood");
    assert_eq!(reverse, 50.0);
    for web in [WEB_V4, WEB_V6] {
        let report = lab.nw.lookup(web);
        assert!(incidents(&report).is_empty(), "{report:#}");
        assert_eq!(report["tracked"][0]["classification"], "reverse-lookup");
    }
    assert_eq!(recorded, 50.0, "one visitor per completed handshake");
    // The host answered (nearly) every spoofed SYN: far more pending
    // handshakes than the visitors' map holds, all churned apart.
    assert!(
        syn_acks > f64::from(netwatch_common::MAX_VISITORS) + 50.0,
        "{syn_acks} SYN-ACKs"
    );
    assert_eq!(lab.metric("netwatch_web_acks_rejected_total", &[]), 0.0);
    drop(connections);
}

/// On a router the LAN side sees an inside web server's SYN-ACKs leave
/// and the WAN side its visitors' ACKs arrive: the server's lookups of 25
/// visitors from outside are reverse lookups, its sweep of 25 strangers
/// is flagged, under the server's own (inside) address.
#[test]
fn a_router_recognises_an_inside_web_servers_reverse_lookups() {
    require_privileged!();
    const VISITORS: u8 = 25;
    let RouterLab {
        inside,
        router,
        internet,
    } = RouterLab::new();
    for i in 0..VISITORS {
        internet.ip(&["addr", "add", &format!("198.18.0.{}/24", 100 + i), "dev", "nw-up"]);
    }
    let nw = Netwatch::start(&router, &pin_dir(), &["--iface", "nw-lan:lan", "--iface", "nw-wan:wan"]);
    let (listener, lookup) = inside.run(|| {
        (
            TcpListener::bind("198.18.10.2:80").unwrap(),
            UdpSocket::bind("198.18.10.2:0").unwrap(),
        )
    });
    let server = std::thread::spawn(move || {
        for _ in 0..VISITORS {
            let (conn, peer) = listener.accept().unwrap();
            lookup.send_to(b"NBSTAT", (peer.ip(), 137)).unwrap();
            drop(conn);
        }
    });
    internet.run(|| {
        for i in 0..VISITORS {
            let local = std::net::Ipv4Addr::new(198, 18, 0, 100 + i).into();
            drop(tcp_connect_from(local, "198.18.10.2:80".parse().unwrap()).expect("visit"));
        }
    });
    server.join().unwrap();
    let reverse = eventually(f64::from(VISITORS), Duration::from_secs(3), || {
        sample(
            &nw.metrics(&router),
            "netwatch_reverse_lookups_total",
            &[("interface", LAN_IF)],
        )
    });
    let m = nw.metrics(&router);
    eprintln!(
        "router: {} SYN-ACKs seen on the LAN side, {} visitors recorded, {reverse} reverse lookups",
        sample(&m, "netwatch_web_syn_acks_total", &[]),
        sample(&m, "netwatch_visitors_recorded_total", &[])
    );
    assert_eq!(reverse, f64::from(VISITORS));
    assert_eq!(sample(&m, "netwatch_scanners_flagged_total", &[]), 0.0);
    assert_eq!(sample(&m, "netwatch_visitors_recorded_total", &[]), f64::from(VISITORS));
    let report = nw.lookup(INSIDE_IP);
    assert_eq!(report["tracked"][0]["classification"], "reverse-lookup");

    assert_eq!(send_udp_many(&inside, "198.18.1.", 1..26, 137), 25);
    let report = nw.wait_for_incident(INSIDE_IP);
    let i = &incidents(&report)[0];
    assert_eq!(
        (
            i["classification"].as_str(),
            i["direction"].as_str(),
            i["interface"].as_str()
        ),
        (Some("scan"), Some("outbound"), Some(LAN_IF))
    );
}

/// A router's LAN side names the infected machine by its internal
/// address; enforce mode with auto-block stops it within a few probes.
#[test]
fn lan_side_names_the_infected_host_behind_nat() {
    require_privileged!();
    let RouterLab {
        inside,
        router,
        internet,
    } = RouterLab::new();

    let dir = std::env::temp_dir().join(unique("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("netwatch.toml");
    std::fs::write(
        &config,
        "mode = \"enforce\"\ninterfaces = [\"nw-lan:lan\", \"nw-wan:wan\"]\n\n[[rule]]\nprotocol = \"udp\"\nport = 137\ninbound = \"count\"\noutbound = \"count\"\nthreshold = 10\nauto_block = true\nblock_secs = 600\n",
    )
    .unwrap();
    let nw = Netwatch::start(&router, &pin_dir(), &["--config", config.to_str().unwrap()]);
    let far = udp_listener(&internet, 137);
    assert_eq!(send_udp_many(&inside, "198.18.1.", 1..101, 137), 100);
    let arrived = count_received(&far);
    assert_eq!(arrived, 9, "auto-block should stop the sweep at the 10th probe");
    let report = nw.wait_for_incident("198.18.10.2");
    let i = &incidents(&report)[0];
    assert_eq!(i["interface"], "nw-lan");
    assert_eq!(i["direction"], "outbound");
    assert_eq!(i["rule"], "udp/137");
    assert_eq!(i["blocked"], true);
    let m = nw.metrics(&router);
    assert_eq!(sample(&m, "netwatch_auto_blocks_total", &[]), 1.0);

    // `netwatch unblock` lifts it at once.
    let out = netwatch(&["unblock", "198.18.10.2", "--pin-dir", &nw.pin_dir]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(send_udp(&inside, "198.18.1.200:137", 2), 2);
    assert_eq!(count_received(&far), 2, "unblock did not lift the auto-block");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 10, item 5: the probe that takes a scanner to its threshold goes
/// to an allowlisted resolver. It arrives (traffic to the allowlist always
/// passes), and the scanner is blocked all the same: only its own
/// allowlisting spares a source.
#[test]
fn a_threshold_probe_to_an_allowlisted_resolver_does_not_dodge_auto_block() {
    require_privileged!();
    let lab = Lab::new();
    let dir = std::env::temp_dir().join(unique("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("netwatch.toml");
    std::fs::write(
        &config,
        format!(
            "mode = \"enforce\"\ninterfaces = [\"{VICTIM_IF}\"]\nallowlist = [\"198.18.1.53/32\"]\n\n[[rule]]\nprotocol = \"udp\"\nport = 137\ninbound = \"count\"\nthreshold = 5\nauto_block = true\nblock_secs = 600\n"
        ),
    )
    .unwrap();
    let nw = Netwatch::start(&lab.victim, &pin_dir(), &["--config", config.to_str().unwrap()]);
    let listener = udp_listener(&lab.victim, 137);
    assert_eq!(send_udp_many(&lab.scanner, "198.18.1.", 1..5, 137), 4);
    assert_eq!(send_udp(&lab.scanner, "198.18.1.53:137", 1), 1);
    assert_eq!(
        count_received(&listener),
        5,
        "probes below the threshold or to the resolver dropped"
    );
    assert_eq!(send_udp_many(&lab.scanner, "198.18.1.", 5..21, 137), 16);
    assert_eq!(count_received(&listener), 0, "the scanner was not blocked");
    assert_eq!(send_udp(&lab.scanner, "198.18.1.53:137", 2), 2);
    assert_eq!(
        count_received(&listener),
        2,
        "traffic to the allowlisted resolver dropped"
    );
    let report = nw.wait_for_incident(SCANNER_IP);
    assert_eq!(incidents(&report)[0]["blocked"], true);
    let m = nw.metrics(&lab.victim);
    assert_eq!(sample(&m, "netwatch_scanners_flagged_total", &[]), 1.0);
    assert_eq!(sample(&m, "netwatch_auto_blocks_total", &[]), 1.0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `block`, `allow` and `unblock` change enforcement live.
#[test]
fn block_and_allow_from_the_command_line() {
    require_privileged!();
    let lab = Lab::new();
    let nw = Netwatch::start(
        &lab.victim,
        &pin_dir(),
        &["--iface", VICTIM_IF, "--mode", "enforce", "--rule", "udp/137=count"],
    );
    let nb = udp_listener(&lab.victim, 137);
    send_udp(&lab.scanner, "198.18.0.2:137", 3);
    assert_eq!(count_received(&nb), 3);
    let out = netwatch(&["block", "198.18.0.0/24", "--ttl", "1h", "--pin-dir", &nw.pin_dir]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    send_udp(&lab.scanner, "198.18.0.2:137", 3);
    assert_eq!(count_received(&nb), 0, "block did not apply");
    let out = netwatch(&["allow", "198.18.0.1", "--pin-dir", &nw.pin_dir]);
    assert!(out.status.success());
    send_udp(&lab.scanner, "198.18.0.2:137", 3);
    assert_eq!(count_received(&nb), 3, "allow did not win over block");
    let status = netwatch(&["status", "--json", "--pin-dir", &nw.pin_dir]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["blocklist"][0]["cidr"], "198.18.0.0/24");
    assert_eq!(json["blocklist"][0]["origin"], "cli");
    assert!(json["blocklist"][0]["expires"].is_string());
    let out = netwatch(&["unblock", "198.18.7.0/24", "--pin-dir", &nw.pin_dir]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("198.18.7.0/24 is not on the blocklist"), "{stderr}");
    // The JSON API serves the same data, read-only.
    let body = lab
        .victim
        .run(|| netwatch_user::netns::http_get(netwatch_tests::daemon::METRICS_ADDR, "/api/status"))
        .unwrap();
    let api: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(api["blocklist"], json["blocklist"]);
}

fn send_udp_many(ns: &Netns, prefix: &str, range: std::ops::Range<u32>, port: u16) -> usize {
    ns.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        range
            .filter(|i| socket.send_to(b"probe", format!("{prefix}{i}:{port}")).is_ok())
            .count()
    })
}

fn eventually_metric(nw: &Netwatch, ns: &Netns, name: &str, want: f64) -> f64 {
    eventually(want, Duration::from_secs(3), || sample(&nw.metrics(ns), name, &[]))
}
