//! NetBIOS-aware and reply-aware detection end to end: real datagrams
//! between namespaces, the real binary watching both ways (XDP and TC
//! egress), answers given (or not) by sockets of the probed addresses.
//! The NBNS messages are built here from RFC 1002 (4.2.12 name query,
//! 4.2.13 positive response, 4.2.17 node status), independently of
//! netwatch's parser.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use netwatch_tests::{
    daemon::{Netwatch, sample},
    netns::{Netns, veth},
    patience, pin_dir, require_privileged,
};

/// The first-level encoding of a NetBIOS name (RFC 1001 14.1): 16 bytes
/// (padded with spaces, or with NULs for `*`), each nibble + 'A'.
fn encoded_name(name: &str) -> Vec<u8> {
    let mut raw = [if name == "*" { 0 } else { b' ' }; 16];
    raw[..name.len()].copy_from_slice(name.as_bytes());
    let mut out = vec![32];
    for b in raw {
        out.push(b'A' + (b >> 4));
        out.push(b'A' + (b & 0x0f));
    }
    out.push(0);
    out
}

/// A request: name query (`NB`, 0x0020) or node status (`NBSTAT`, 0x0021).
fn nbns_request(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    // Flags: opcode 0 (query), RD for a name query, none for a status.
    let flags: u16 = if qtype == 0x0020 { 0x0100 } else { 0 };
    let mut m = Vec::new();
    for word in [id, flags, 1, 0, 0, 0] {
        m.extend_from_slice(&word.to_be_bytes());
    }
    m.extend(encoded_name(name));
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m
}

/// A positive name query response for `name` at `addr`.
fn nbns_positive_response(id: u16, name: &str, addr: Ipv4Addr) -> Vec<u8> {
    let mut m = Vec::new();
    // R, opcode 0, AA, RD, RA; one answer.
    for word in [id, 0x8580, 0, 1, 0, 0] {
        m.extend_from_slice(&word.to_be_bytes());
    }
    m.extend(encoded_name(name));
    m.extend_from_slice(&0x0020u16.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(&300u32.to_be_bytes());
    m.extend_from_slice(&6u16.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&addr.octets());
    m
}

/// Name servers on `addrs` of `ns` (one socket each, so each answer
/// comes from the address asked): each answers up to `queries` requests
/// with a positive response, then stops (or after `within`).
fn name_servers(
    ns: &Netns,
    addrs: &[Ipv4Addr],
    queries: usize,
    within: Duration,
) -> Vec<std::thread::JoinHandle<usize>> {
    let sockets: Vec<UdpSocket> = ns.run(|| {
        addrs
            .iter()
            .map(|a| {
                let s = UdpSocket::bind((*a, 137)).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                s
            })
            .collect()
    });
    sockets
        .into_iter()
        .zip(addrs.iter().copied())
        .map(|(socket, addr)| {
            std::thread::spawn(move || {
                let deadline = Instant::now() + within;
                let mut answered = 0;
                let mut buf = [0u8; 576];
                while answered < queries && Instant::now() < deadline {
                    if let Ok((n, peer)) = socket.recv_from(&mut buf)
                        && n >= 12
                        && buf[2] & 0x80 == 0
                    {
                        let id = u16::from_be_bytes([buf[0], buf[1]]);
                        socket
                            .send_to(&nbns_positive_response(id, "NETWATCH", addr), peer)
                            .unwrap();
                        answered += 1;
                    }
                }
                answered
            })
        })
        .collect()
}

/// Sends one request from `from` (port `port`, 0: ephemeral) in `ns` to
/// each of `to` on udp/137, `gap` apart; returns how many answers came
/// back within `wait` each.
fn query_each(ns: &Netns, from: SocketAddr, to: &[Ipv4Addr], qtype: u16, gap: Duration, wait: Duration) -> usize {
    ns.run(|| {
        let socket = UdpSocket::bind(from).unwrap();
        socket.set_read_timeout(Some(wait)).unwrap();
        let mut answers = 0;
        for (i, addr) in to.iter().enumerate() {
            socket
                .send_to(&nbns_request(0x4e00 + i as u16, "NETWATCH", qtype), (*addr, 137))
                .unwrap();
            let mut buf = [0u8; 576];
            if socket
                .recv_from(&mut buf)
                .is_ok_and(|(n, _)| n >= 12 && buf[2] & 0x80 != 0)
            {
                answers += 1;
            }
            std::thread::sleep(gap);
        }
        answers
    })
}

fn incidents(report: &serde_json::Value) -> &Vec<serde_json::Value> {
    report["incidents"].as_array().unwrap()
}

fn v4(a: &str, range: std::ops::RangeInclusive<u8>) -> Vec<Ipv4Addr> {
    range.map(|i| format!("{a}{i}").parse().unwrap()).collect()
}

/// A host answering name queries from 30 clients (replies from port 137
/// to port 137, as a WINS server or nmbd sends them) is never flagged:
/// the replies are counted as traffic, not as probes. The same host
/// sending 30 queries instead is.
#[test]
fn a_name_server_answering_30_clients_is_not_flagged() {
    require_privileged!();
    let server = Netns::new("wins");
    let clients = Netns::new("nbcl");
    veth(
        &server,
        "nw-wins0",
        "198.18.0.1/24",
        &clients,
        "nw-nbcl0",
        "198.18.0.100/24",
    );
    let client_addrs = v4("198.18.0.", 101..=130);
    for a in &client_addrs {
        clients.ip(&["addr", "add", &format!("{a}/24"), "dev", "nw-nbcl0"]);
    }
    let nw = Netwatch::start(
        &server,
        &pin_dir(),
        &["--iface", "nw-wins0:host", "--egress", "nw-wins0"],
    );
    let wins: Ipv4Addr = "198.18.0.1".parse().unwrap();
    let servers = name_servers(&server, &[wins], client_addrs.len(), patience(Duration::from_secs(20)));
    let mut answered = 0;
    for a in &client_addrs {
        answered += query_each(
            &clients,
            SocketAddr::new((*a).into(), 137),
            &[wins],
            0x0020,
            Duration::ZERO,
            Duration::from_secs(2),
        );
    }
    let served: usize = servers.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(
        (served, answered),
        (30, 30),
        "the name server did not answer every client"
    );
    // Past the answer time of any first contact.
    std::thread::sleep(Duration::from_secs(3));
    let m = nw.metrics(&server);
    let outbound = [("rule", "udp/137"), ("direction", "outbound"), ("action", "passed")];
    assert_eq!(
        sample(&m, "netwatch_packets_total", &outbound),
        30.0,
        "replies not counted"
    );
    assert_eq!(
        sample(&m, "netwatch_scanners_flagged_total", &[]),
        0.0,
        "a name server flagged"
    );
    let report = nw.lookup("198.18.0.1");
    assert!(incidents(&report).is_empty(), "{report:#}");

    // The control: 30 queries from the same host to the same clients.
    let asked = query_each(
        &server,
        "198.18.0.1:0".parse().unwrap(),
        &client_addrs,
        0x0021,
        Duration::ZERO,
        Duration::from_millis(10),
    );
    assert_eq!(asked, 0);
    let report = nw.wait_for_incident("198.18.0.1");
    assert_eq!(incidents(&report)[0]["reason"], "distinct-destinations", "{report:#}");
}

/// An infected host sending 5 NBSTAT probes into addresses that never
/// answer is flagged within 5 s of the 5th, for its failed first
/// contacts; a host querying 8 name servers that answer is not flagged;
/// and answers (a scanner's accomplice can forge them) do not hide a
/// sweep from the distinct-destination threshold.
#[test]
fn silent_probes_flag_fast_and_answered_queries_do_not() {
    require_privileged!();
    let host = Netns::new("inf");
    let far = Netns::new("far");
    veth(&host, "nw-inf0", "198.18.0.2/24", &far, "nw-far0", "198.18.0.200/24");
    host.ip(&["addr", "add", "198.18.0.3/24", "dev", "nw-inf0"]);
    host.ip(&["addr", "add", "198.18.0.4/24", "dev", "nw-inf0"]);
    // Silent addresses (nothing listens: the kernel's ICMP port
    // unreachable is no answer) and answering ones.
    far.local_range("198.18.3.0/24");
    far.local_range("198.18.4.0/24");
    for net in ["198.18.3.0/24", "198.18.4.0/24"] {
        host.ip(&["route", "add", net, "via", "198.18.0.200"]);
    }
    let nw = Netwatch::start(&host, &pin_dir(), &["--iface", "nw-inf0:host", "--egress", "nw-inf0"]);

    // 8 name servers that answer, queried from an ephemeral port, as
    // nmblookup does.
    let answering = v4("198.18.4.", 1..=8);
    let servers = name_servers(&far, &answering, 1, patience(Duration::from_secs(10)));
    let answers = query_each(
        &host,
        "198.18.0.3:0".parse().unwrap(),
        &answering,
        0x0020,
        Duration::from_millis(50),
        Duration::from_secs(2),
    );
    assert_eq!(answers, 8, "the name servers did not answer");
    for t in servers {
        t.join().unwrap();
    }

    // 5 NBSTAT probes into silence.
    let silent = v4("198.18.3.", 1..=5);
    query_each(
        &host,
        "198.18.0.2:0".parse().unwrap(),
        &silent,
        0x0021,
        Duration::from_millis(100),
        Duration::from_millis(1),
    );
    let fifth = Instant::now();
    let report = nw.wait_for_incident("198.18.0.2");
    let flagged_after = fifth.elapsed();
    eprintln!(
        "5 silent probes: flagged {} ms after the 5th",
        flagged_after.as_millis()
    );
    assert!(
        flagged_after <= Duration::from_secs(5),
        "flagged {flagged_after:?} after the 5th probe"
    );
    let i = &incidents(&report)[0];
    assert_eq!(
        (&i["reason"], &i["rule"], &i["direction"]),
        (&"failed-contacts".into(), &"udp/137".into(), &"outbound".into()),
        "{report:#}"
    );
    assert!(i["failed_contacts"].as_u64().unwrap() >= 4, "{report:#}");
    let m = nw.metrics(&host);
    let outbound = [("rule", "udp/137"), ("direction", "outbound")];
    assert_eq!(
        sample(&m, "netwatch_scanners_flagged_total", &outbound),
        1.0,
        "the flag is not counted"
    );

    // The host whose queries were answered: judged and not flagged.
    assert!(
        sample(&m, "netwatch_first_contacts_total", &[("outcome", "answered")]) >= 8.0,
        "answers not seen"
    );
    let report = nw.lookup("198.18.0.3");
    assert!(
        incidents(&report).is_empty(),
        "a host whose name servers answer was flagged: {report:#}"
    );

    // Forged answers to every probe: the walk stays quiet, the sweep is
    // caught by its 20th distinct destination all the same.
    let sweep = v4("198.18.4.", 101..=125);
    let servers = name_servers(&far, &sweep, 1, patience(Duration::from_secs(10)));
    let answers = query_each(
        &host,
        "198.18.0.4:0".parse().unwrap(),
        &sweep,
        0x0021,
        Duration::ZERO,
        Duration::from_secs(2),
    );
    assert_eq!(answers, sweep.len());
    for t in servers {
        t.join().unwrap();
    }
    let report = nw.wait_for_incident("198.18.0.4");
    assert_eq!(incidents(&report)[0]["reason"], "distinct-destinations", "{report:#}");
}

/// Fake failures: probes forged from an innocent address into silence
/// flag it after 4 of them (not 20) and, with auto-block on, block it on
/// that port; an allowlisted address (the gateway) is flagged, never
/// blocked.
#[test]
fn forged_silent_probes_block_only_what_the_allowlist_does_not_hold() {
    require_privileged!();
    let host = Netns::new("spf");
    let far = Netns::new("spff");
    veth(&host, "nw-spf0", "198.18.0.5/24", &far, "nw-spff0", "198.18.0.200/24");
    host.ip(&["addr", "add", "198.18.0.6/24", "dev", "nw-spf0"]);
    far.local_range("198.18.3.0/24");
    host.ip(&["route", "add", "198.18.3.0/24", "via", "198.18.0.200"]);
    let config = netwatch_tests::ConfigFile::new(
        "mode = \"enforce\"\ninterfaces = [\"nw-spf0\"]\negress = [\"nw-spf0\"]\nallowlist = [\"198.18.0.5/32\"]\n\n\
         [[rule]]\nprotocol = \"udp\"\nport = 137\ninbound = \"count\"\noutbound = \"count\"\nauto_block = true\nblock_secs = 600\n",
    );
    let nw = Netwatch::start(&host, &pin_dir(), &["--config", config.path().to_str().unwrap()]);
    let silent = v4("198.18.3.", 1..=5);
    for from in ["198.18.0.5:0", "198.18.0.6:0"] {
        query_each(
            &host,
            from.parse().unwrap(),
            &silent,
            0x0021,
            Duration::from_millis(20),
            Duration::from_millis(1),
        );
    }
    let innocent = nw.wait_for_incident("198.18.0.6");
    let gateway = nw.wait_for_incident("198.18.0.5");
    let (i, g) = (&incidents(&innocent)[0], &incidents(&gateway)[0]);
    assert_eq!(
        (&i["reason"], &i["blocked"]),
        (&"failed-contacts".into(), &true.into()),
        "{innocent:#}"
    );
    assert_eq!(
        (&g["reason"], &g["blocked"]),
        (&"failed-contacts".into(), &false.into()),
        "{gateway:#}"
    );
    // The block is the kernel's: the innocent address's next probe is dropped.
    query_each(
        &host,
        "198.18.0.6:0".parse().unwrap(),
        &silent[..1],
        0x0021,
        Duration::ZERO,
        Duration::from_millis(1),
    );
    let m = nw.metrics(&host);
    let dropped = [("rule", "udp/137"), ("direction", "outbound"), ("action", "dropped")];
    assert_eq!(
        sample(&m, "netwatch_packets_total", &dropped),
        1.0,
        "the block does not drop"
    );
}
