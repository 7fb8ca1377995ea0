//! A fleet of sensors: incidents shared through a real NATS JetStream
//! server (Debian's nats-server, started by each test on 127.0.0.1 of
//! the sensor's namespace with a store of its own).

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use netwatch_tests::{
    ConfigFile, TempDir, assert_fails_saying,
    daemon::{Netwatch, bin, http, netwatch, sample, try_sample},
    lab::*,
    nats::{
        NatsServer, cluster_of_three, publish_all, sensor_permissions, stream_copies, stream_messages,
        stream_messages_as, user_nkey,
    },
    netns::Netns,
    pin_dir, require_privileged,
};

const STREAM: &str = "NETWATCH_INCIDENTS";
/// A second scanning source on the scanner's link.
const SECOND_SCANNER: &str = "198.18.0.3";

/// Waits until `f` holds, failing with `what` (and `log`) after `within`.
fn wait_until(what: &str, within: Duration, log: impl Fn() -> String, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + netwatch_tests::patience(within);
    while !f() {
        assert!(Instant::now() < deadline, "{what} did not happen in time:\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `netwatch ARGS` inside `ns` (where the fleet's server is); its stdout,
/// which must be JSON.
fn json_in(ns: &Netns, args: &[&str]) -> serde_json::Value {
    let out = ns.command(bin().to_str().unwrap()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "netwatch {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("netwatch {args:?}: {e}"))
}

/// Every incident in the sensor's own database, by id.
fn local_incidents(nw: &Netwatch) -> HashMap<i64, serde_json::Value> {
    let out = netwatch(&["incidents", "--json", "--state-dir", nw.state_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    report["incidents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["id"].as_i64().unwrap(), i.clone()))
        .collect()
}

/// A source the scanner namespace owns sends one udp/137 probe to each of
/// `n` addresses of the victim's target range.
fn sweep_from(lab: &Lab, src: &str, n: u8) {
    for host in 1..=n {
        assert_eq!(send_udp_from(&lab.scanner, src, &format!("198.18.1.{host}:137"), 1), 1);
    }
}

/// Bad fleet settings fail `run` and `check-config` before anything is
/// attached, with an error naming the setting; `--sensor` alone is an
/// error too.
#[test]
fn bad_fleet_settings_are_refused_naming_the_setting() {
    for (args, says) in [
        (
            vec!["run", "--iface", "nw-absent0", "--fleet", "http://hub:4222"],
            "fleet.url",
        ),
        (
            vec![
                "run",
                "--iface",
                "nw-absent0",
                "--fleet",
                "nats://127.0.0.1:4222",
                "--sensor",
                "a b",
            ],
            "fleet.sensor",
        ),
        (vec!["run", "--iface", "nw-absent0", "--sensor", "a"], "--fleet"),
        (vec!["lookup", "198.18.0.1", "--fleet", "tcp://hub"], "fleet.url"),
    ] {
        assert_fails_saying(&netwatch(&args), says);
    }
    let config = ConfigFile::new("interfaces = [\"lo\"]\n[fleet]\nurl = \"nats://hub:4222\"\nsensor = \"\"\n");
    assert_fails_saying(
        &netwatch(&["--config", config.arg(), "check-config", "--offline"]),
        "fleet.sensor",
    );
    let config = ConfigFile::new("interfaces = [\"lo\"]\n");
    assert_fails_saying(&netwatch(&["--config", config.arg(), "top", "--fleet"]), "[fleet]");
    let config = ConfigFile::new(
        "interfaces = [\"lo\"]\n[fleet]\nurl = \"nats://hub:4222\"\ncredentials = \"/nonexistent/a.creds\"\n",
    );
    let out = netwatch(&["--config", config.arg(), "check-config", "--offline"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(", fleet: sensor "),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Incidents reach the stream, one subject per incident, each message
/// with its sensor; while the server is down a new incident waits in the
/// outbox (the controller keeps detecting), and on reconnect every
/// incident is in the stream exactly once per state, the newest state
/// equal to the sensor's database. Without a fleet, no fleet metrics.
#[test]
fn incidents_reach_the_fleet_and_wait_in_the_outbox_while_it_is_down() {
    require_privileged!();
    let lab = Lab::new();
    lab.scanner
        .ip(&["addr", "add", &format!("{SECOND_SCANNER}/24"), "dev", SCANNER_IF]);
    let mut nats = NatsServer::start_in(&lab.victim);
    let url = nats.url();
    let nw = Netwatch::start(
        &lab.victim,
        &pin_dir(),
        &["--iface", VICTIM_IF, "--fleet", &url, "--sensor", "edge-a"],
    );
    let nats_log = nats.log_file();
    let log = || {
        format!(
            "{}\nnats:\n{}",
            nw.log(),
            std::fs::read_to_string(&nats_log).unwrap_or_default()
        )
    };
    let metric = |name: &str| try_sample(&nw.metrics(&lab.victim), name, &[]);
    wait_until("the fleet connection", Duration::from_secs(10), log, || {
        metric("netwatch_fleet_connected") == Some(1.0)
    });

    assert!(lab.nbtscan(TARGET_RANGE).status.success());
    nw.wait_for_incident(SCANNER_IP);
    wait_until("the first incident's delivery", Duration::from_secs(10), log, || {
        stream_messages(&lab.victim, &url, STREAM)
            .iter()
            .any(|m| m["source"] == SCANNER_IP)
    });
    let first = &stream_messages(&lab.victim, &url, STREAM)[0];
    assert_eq!(first["sensor"], "edge-a");
    assert_eq!(first["rule"], "udp/137");
    assert_eq!(
        first["subject"],
        format!("netwatch.incidents.edge-a.198-18-0-1.{}", first["id"])
    );

    // The server goes away while a second source is flagged.
    nats.stop();
    wait_until("the disconnection", Duration::from_secs(10), log, || {
        metric("netwatch_fleet_connected") == Some(0.0)
    });
    sweep_from(&lab, SECOND_SCANNER, 30);
    nw.wait_for_incident(SECOND_SCANNER);
    wait_until("the outbox to fill", Duration::from_secs(10), log, || {
        metric("netwatch_fleet_outbox_incidents").is_some_and(|n| n >= 1.0)
    });
    wait_until("the outage's log line", Duration::from_secs(10), log, || {
        nw.log().contains("incidents wait in the outbox")
    });

    let restarted = Instant::now();
    nats.start(&lab.victim);
    wait_until("the outbox's delivery", Duration::from_secs(20), log, || {
        metric("netwatch_fleet_outbox_incidents") == Some(0.0) && metric("netwatch_fleet_connected") == Some(1.0)
    });
    eprintln!("outbox delivered {:?} after the server restarted", restarted.elapsed());
    // Let the refresh (every 5 s) bring the incidents to their final
    // figures, and those be delivered.
    std::thread::sleep(Duration::from_secs(6));
    wait_until("the last updates' delivery", Duration::from_secs(10), log, || {
        metric("netwatch_fleet_outbox_incidents") == Some(0.0)
    });

    let messages = stream_messages(&lab.victim, &url, STREAM);
    let local = local_incidents(&nw);
    assert_eq!(local.len(), 2, "{local:?}");
    // Each state once: no (incident, revision) twice.
    let mut states = HashSet::new();
    let mut newest: HashMap<i64, &serde_json::Value> = HashMap::new();
    for m in &messages {
        assert_eq!(m["sensor"], "edge-a");
        let id = m["id"].as_i64().unwrap();
        assert!(
            states.insert((id, m["revision"].as_i64().unwrap())),
            "delivered twice: {m}\nall: {messages:#?}"
        );
        newest.insert(id, m);
    }
    assert_eq!(
        newest.keys().collect::<HashSet<_>>(),
        local.keys().collect::<HashSet<_>>()
    );
    for (id, incident) in &local {
        let m = newest[id];
        for field in [
            "source",
            "rule",
            "direction",
            "packets",
            "distinct_destinations",
            "first_seen",
            "last_seen",
        ] {
            assert_eq!(m[field], incident[field], "{field} of incident {id}: {m} vs {incident}");
        }
    }
    netwatch_tests::prometheus::promtool_accepts(&nw.metrics(&lab.victim));
    // The JSON API asks the fleet too.
    let (status, body) = http(&lab.victim, "GET", &format!("/api/fleet/lookup/{SECOND_SCANNER}"));
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    let incidents = report["incidents"].as_array().unwrap();
    assert_eq!(incidents.len(), 1, "{report:#}");
    assert_eq!(
        (incidents[0]["sensor"].as_str(), incidents[0]["source"].as_str()),
        (Some("edge-a"), Some(SECOND_SCANNER))
    );
    // Every state confirmed is there; a state sent just as the server
    // went away may be stored without its confirmation reaching the
    // sensor (then its newer state is sent under a new id).
    let published = sample(
        &nw.metrics(&lab.victim),
        "netwatch_fleet_incidents_published_total",
        &[],
    ) as usize;
    assert!(
        (local.len()..=messages.len()).contains(&published),
        "{published} published, {} messages, {} incidents",
        messages.len(),
        local.len()
    );
}

/// `lookup --fleet` lists an address's incidents from every sensor, each
/// with its `sensor`; `top --fleet` ranks sources by how many sensors saw
/// them. Two sensors here are two runs in turn on the same link, each
/// with its own name, pins and database; the URL also comes from the
/// config file's [fleet] table.
#[test]
fn lookup_and_top_see_every_sensor() {
    require_privileged!();
    let lab = Lab::new();
    lab.scanner
        .ip(&["addr", "add", &format!("{SECOND_SCANNER}/24"), "dev", SCANNER_IF]);
    let nats = NatsServer::start_in(&lab.victim);
    let url = nats.url();
    let log = || nats.log();
    for (sensor, second) in [("edge-a", true), ("edge-b", false)] {
        let state = TempDir::private("state");
        let nw = Netwatch::start_with_state(
            &lab.victim,
            &pin_dir(),
            &state,
            &["--iface", VICTIM_IF, "--fleet", &url, "--sensor", sensor],
        );
        assert!(lab.nbtscan(TARGET_RANGE).status.success());
        nw.wait_for_incident(SCANNER_IP);
        if second {
            sweep_from(&lab, SECOND_SCANNER, 30);
            nw.wait_for_incident(SECOND_SCANNER);
        }
        wait_until(
            "delivery",
            Duration::from_secs(10),
            || nw.log(),
            || {
                try_sample(&nw.metrics(&lab.victim), "netwatch_fleet_outbox_incidents", &[]) == Some(0.0)
                    && try_sample(
                        &nw.metrics(&lab.victim),
                        "netwatch_fleet_incidents_published_total",
                        &[],
                    )
                    .is_some_and(|n| n >= 1.0)
            },
        );
    }

    let report = json_in(&lab.victim, &["lookup", SCANNER_IP, "--fleet", &url, "--json"]);
    assert_eq!(report["ip"], SCANNER_IP);
    let incidents = report["incidents"].as_array().unwrap();
    let sensors: HashSet<&str> = incidents.iter().map(|i| i["sensor"].as_str().unwrap()).collect();
    assert_eq!(sensors, HashSet::from(["edge-a", "edge-b"]), "{report:#}\n{}", log());
    assert_eq!(incidents.len(), 2, "{report:#}");
    for i in incidents {
        assert_eq!(
            (i["source"].as_str(), i["rule"].as_str()),
            (Some(SCANNER_IP), Some("udp/137"))
        );
    }
    let report = json_in(&lab.victim, &["lookup", SECOND_SCANNER, "--fleet", &url, "--json"]);
    let incidents = report["incidents"].as_array().unwrap();
    assert_eq!(incidents.len(), 1, "{report:#}");
    assert_eq!(incidents[0]["sensor"], "edge-a");
    let report = json_in(&lab.victim, &["lookup", "198.18.0.99", "--fleet", &url, "--json"]);
    assert!(report["incidents"].as_array().unwrap().is_empty(), "{report:#}");

    // The URL from the config file, the text forms.
    let config = ConfigFile::new(format!("[fleet]\nurl = \"{url}\"\n"));
    let top = json_in(&lab.victim, &["--config", config.arg(), "top", "--fleet", "--json"]);
    let sources = top["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 2, "{top:#}");
    assert_eq!(sources[0]["source"], SCANNER_IP);
    assert_eq!(sources[0]["sensors"], serde_json::json!(["edge-a", "edge-b"]));
    assert_eq!(sources[1]["source"], SECOND_SCANNER);
    assert_eq!(sources[1]["sensors"], serde_json::json!(["edge-a"]));
    let out = lab
        .victim
        .command(bin().to_str().unwrap())
        .args(["--config", config.arg(), "lookup", SCANNER_IP, "--fleet"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.lines().filter(|l| l.contains("scan udp/137 inbound")).count() == 2
            && text.contains("edge-a #")
            && text.contains("edge-b #"),
        "{text}"
    );
}

/// Without a fleet no fleet code runs: no fleet metrics, nothing queued.
/// A fleet whose server is unreachable from the start does not stop the
/// sensor: it detects, and its incidents wait.
#[test]
fn without_a_fleet_nothing_is_queued_and_an_unreachable_one_does_not_stop_detection() {
    require_privileged!();
    let lab = Lab::new();
    let nw = Netwatch::start(&lab.victim, &pin_dir(), &["--iface", VICTIM_IF]);
    assert!(lab.nbtscan(TARGET_RANGE).status.success());
    nw.wait_for_incident(SCANNER_IP);
    let exposition = nw.metrics(&lab.victim);
    assert!(!exposition.contains("netwatch_fleet_"), "{exposition}");
    assert_eq!(
        http(&lab.victim, "GET", &format!("/api/fleet/lookup/{SCANNER_IP}")).0,
        404
    );
    drop(nw);

    // A port nothing listens on.
    let port = lab.victim.run(|| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    });
    let url = format!("nats://127.0.0.1:{port}");
    let nw = Netwatch::start(
        &lab.victim,
        &pin_dir(),
        &["--iface", VICTIM_IF, "--fleet", &url, "--sensor", "x"],
    );
    assert!(lab.nbtscan(TARGET_RANGE).status.success());
    nw.wait_for_incident(SCANNER_IP);
    wait_until(
        "the outbox to fill",
        Duration::from_secs(10),
        || nw.log(),
        || try_sample(&nw.metrics(&lab.victim), "netwatch_fleet_outbox_incidents", &[]) == Some(1.0),
    );
    assert_eq!(
        try_sample(&nw.metrics(&lab.victim), "netwatch_fleet_connected", &[]),
        Some(0.0)
    );
}

/// A backlog of 10,000 incidents (an outage's worth on a busy sensor) in
/// the outbox is delivered when `run` starts with a fleet: every one
/// once, the outbox empty. Prints how long the delivery took.
#[test]
fn a_backlog_of_ten_thousand_incidents_is_delivered_once() {
    use netwatch_user::detection::incidents::{Classification, Observation, Reason, Seen, Stamp, Store, SystemClock};
    require_privileged!();
    const BACKLOG: u32 = 10_000;
    let state = TempDir::private("state");
    {
        let mut store = Store::open(&state).unwrap();
        store.enable_outbox().unwrap();
        // No summaries: every source its own incident.
        store.set_summary_after(BACKLOG + 1);
        store
            .batch(|store| {
                for i in 0..BACKLOG {
                    let at = Stamp::now(&SystemClock);
                    store.record(
                        &Observation {
                            seen: Seen::Flag,
                            source: std::net::Ipv4Addr::from(0xc613_0000 + i).into(),
                            rule: "udp/137".into(),
                            direction: "inbound".into(),
                            interface: VICTIM_IF.into(),
                            classification: Classification::Scan,
                            first_seen: at.wall,
                            last_seen: at.wall,
                            packets: 20,
                            distinct_destinations: 20,
                            blocked_until: None,
                            reason: Reason::DistinctDestinations,
                            failed_contacts: 0,
                            at,
                        },
                        Duration::from_secs(3600),
                    )?;
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(store.outbox_depth().unwrap(), BACKLOG as u64);
    }
    let lab = Lab::new();
    let nats = NatsServer::start_in(&lab.victim);
    let url = nats.url();
    let started = Instant::now();
    let nw = Netwatch::start_with_state(
        &lab.victim,
        &pin_dir(),
        &state,
        &["--iface", VICTIM_IF, "--fleet", &url, "--sensor", "busy"],
    );
    let ready = started.elapsed();
    wait_until(
        "the backlog's delivery",
        Duration::from_secs(120),
        || nw.log(),
        || try_sample(&nw.metrics(&lab.victim), "netwatch_fleet_outbox_incidents", &[]) == Some(0.0),
    );
    eprintln!(
        "{BACKLOG} incidents delivered {:?} after `run` started ({ready:?} of it until /metrics answered)",
        started.elapsed()
    );
    let messages = stream_messages(&lab.victim, &url, STREAM);
    assert_eq!(messages.len(), BACKLOG as usize);
    let ids: HashSet<i64> = messages.iter().map(|m| m["id"].as_i64().unwrap()).collect();
    assert_eq!(ids.len(), BACKLOG as usize);
    assert_eq!(
        sample(
            &nw.metrics(&lab.victim),
            "netwatch_fleet_incidents_published_total",
            &[]
        ),
        BACKLOG as f64
    );
}

/// Per-sensor credentials: with the server's `authorization` listing each
/// sensor's NKey and letting it publish only under its own subjects, a
/// sensor delivers as itself, and the same key naming itself another
/// sensor delivers nothing (its incidents stay in the outbox). Lookups
/// take the sensor from the subject. A seed file that is no seed fails
/// the start, naming `fleet.credentials`.
#[test]
fn a_sensor_writes_only_as_itself() {
    require_privileged!();
    let (a_key, a_seed) = user_nkey();
    let (b_key, _) = user_nkey();
    let (ops_key, ops_seed) = user_nkey();
    let lab = Lab::new();
    let nats = NatsServer::start_with_config(
        &lab.victim,
        Some(&format!(
            "authorization {{ users = [ {}, {}, {{ nkey: \"{ops_key}\" }} ] }}\n",
            sensor_permissions(&a_key, "edge-a"),
            sensor_permissions(&b_key, "edge-b"),
        )),
    );
    let url = nats.url();
    let keys = TempDir::private("keys");
    let a_file = keys.join("edge-a.seed");
    std::fs::write(&a_file, format!("{a_seed}\n")).unwrap();
    let a_config = ConfigFile::new(format!(
        "[fleet]\nurl = \"{url}\"\ncredentials = \"{}\"\n",
        a_file.display()
    ));
    let ops_file = keys.join("ops.seed");
    std::fs::write(&ops_file, &ops_seed).unwrap();
    let ops_config = ConfigFile::new(format!(
        "[fleet]\nurl = \"{url}\"\ncredentials = \"{}\"\n",
        ops_file.display()
    ));

    let run_as = |sensor: &str| {
        Netwatch::start(
            &lab.victim,
            &pin_dir(),
            &["--config", a_config.arg(), "--iface", VICTIM_IF, "--sensor", sensor],
        )
    };
    let nw = run_as("edge-a");
    assert!(lab.nbtscan(TARGET_RANGE).status.success());
    nw.wait_for_incident(SCANNER_IP);
    wait_until(
        "edge-a's delivery",
        Duration::from_secs(10),
        || nw.log(),
        || {
            let m = nw.metrics(&lab.victim);
            try_sample(&m, "netwatch_fleet_outbox_incidents", &[]) == Some(0.0)
                && try_sample(&m, "netwatch_fleet_incidents_published_total", &[]).is_some_and(|n| n >= 1.0)
        },
    );
    drop(nw);

    // edge-a's key, calling itself edge-b.
    let nw = run_as("edge-b");
    assert!(lab.nbtscan(TARGET_RANGE).status.success());
    nw.wait_for_incident(SCANNER_IP);
    wait_until(
        "the refused delivery's log line",
        Duration::from_secs(15),
        || nw.log(),
        || nw.log().contains("incidents wait in the outbox"),
    );
    let m = nw.metrics(&lab.victim);
    assert_eq!(try_sample(&m, "netwatch_fleet_outbox_incidents", &[]), Some(1.0), "{m}");
    assert_eq!(
        try_sample(&m, "netwatch_fleet_incidents_published_total", &[]),
        Some(0.0)
    );
    assert_eq!(try_sample(&m, "netwatch_fleet_connected", &[]), Some(1.0));
    assert!(nats.log().contains("Publish Violation"), "{}", nats.log());
    drop(nw);

    let messages = stream_messages_as(&lab.victim, &url, STREAM, Some(&ops_seed));
    assert!(!messages.is_empty());
    for m in &messages {
        assert_eq!(m["sensor"], "edge-a", "{m}");
        assert!(
            m["subject"].as_str().unwrap().starts_with("netwatch.incidents.edge-a."),
            "{m}"
        );
    }
    let report = json_in(
        &lab.victim,
        &["--config", ops_config.arg(), "lookup", SCANNER_IP, "--fleet", "--json"],
    );
    let sensors: HashSet<&str> = report["incidents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["sensor"].as_str().unwrap())
        .collect();
    assert_eq!(sensors, HashSet::from(["edge-a"]), "{report:#}");
    // Without credentials the server lets nobody in.
    let out = lab
        .victim
        .command(bin().to_str().unwrap())
        .args(["lookup", SCANNER_IP, "--fleet", &url])
        .output()
        .unwrap();
    assert!(!out.status.success());

    std::fs::write(&a_file, "not a seed\n").unwrap();
    let out = lab
        .victim
        .command(bin().to_str().unwrap())
        .args([
            "--config",
            a_config.arg(),
            "run",
            "--iface",
            VICTIM_IF,
            "--pin-dir",
            &pin_dir(),
        ])
        .arg("--state-dir")
        .arg(keys.join("state"))
        .output()
        .unwrap();
    assert_fails_saying(&out, "fleet.credentials");
}

/// Sensors edge-a and edge-b, one after the other in the victim's
/// namespace with `extra` in their `[fleet]` table (monitor mode), each
/// flag the scanner (nbtscan) and `SECOND_SCANNER` and deliver both
/// incidents; edge-b, the second to confirm, creates `decisions`
/// decisions and applies none.
fn flag_at_a_and_b(lab: &Lab, url: &str, extra: &str, decisions: f64) {
    let counter = |nw: &Netwatch, name: &str| try_sample(&nw.metrics(&lab.victim), name, &[]);
    for sensor in ["edge-a", "edge-b"] {
        let config = ConfigFile::new(format!("[fleet]\nurl = \"{url}\"\nsensor = \"{sensor}\"\n{extra}"));
        let nw = Netwatch::start(
            &lab.victim,
            &pin_dir(),
            &["--config", config.arg(), "--iface", VICTIM_IF],
        );
        assert!(lab.nbtscan(TARGET_RANGE).status.success());
        nw.wait_for_incident(SCANNER_IP);
        sweep_from(lab, SECOND_SCANNER, 30);
        nw.wait_for_incident(SECOND_SCANNER);
        wait_until(
            "delivery",
            Duration::from_secs(10),
            || nw.log(),
            || {
                counter(&nw, "netwatch_fleet_outbox_incidents") == Some(0.0)
                    && counter(&nw, "netwatch_fleet_incidents_published_total").is_some_and(|n| n >= 2.0)
            },
        );
        if sensor == "edge-b" {
            wait_until(
                "the decisions",
                Duration::from_secs(10),
                || nw.log(),
                || counter(&nw, "netwatch_fleet_decisions_created_total") == Some(decisions),
            );
            // Monitor mode: decisions are not applied here.
            assert_eq!(counter(&nw, "netwatch_fleet_decisions_applied_total"), Some(0.0));
        }
    }
}

/// Confirmed blocks: the scanner flagged by sensors A and B becomes one
/// fleet decision (B creates it; C, finding the same confirmation when it
/// starts, creates none: the stream holds it once), and C, in enforce
/// mode with udp/137 only counted (auto_block on), drops the scanner's
/// first probe there. A second source in the same /24, confirmed too, is
/// not applied at C, whose cap is one decision per /24: its probe passes.
/// With the scanner on C's allowlist, the allowlist wins.
#[test]
fn a_source_confirmed_by_two_sensors_is_blocked_at_a_third() {
    require_privileged!();
    let lab = Lab::new();
    lab.scanner
        .ip(&["addr", "add", &format!("{SECOND_SCANNER}/24"), "dev", SCANNER_IF]);
    let nats = NatsServer::start_in(&lab.victim);
    let url = nats.url();
    let counter = |nw: &Netwatch, name: &str| try_sample(&nw.metrics(&lab.victim), name, &[]);
    // Every sensor may report; each report lands in a file of its own.
    let reports = TempDir::new("reports");
    let report_command = format!(
        "report_command = [\"/bin/sh\", \"-c\", \"cat > \\\"$0\\\"/report.$$\", \"{}\"]\nreport_to = \"abuse@example.net\"\n",
        reports.display()
    );
    flag_at_a_and_b(&lab, &url, &report_command, 2.0);
    let decisions = stream_messages(&lab.victim, &url, "NETWATCH_DECISIONS");
    assert_eq!(decisions.len(), 2, "{decisions:#?}");
    assert_eq!(decisions[0]["source"], SCANNER_IP);
    assert_eq!(decisions[1]["source"], SECOND_SCANNER);
    assert_eq!(decisions[0]["rule"], "udp/137");
    assert_eq!(decisions[0]["sensors"], serde_json::json!(["edge-a", "edge-b"]));

    let config = ConfigFile::new(format!(
        "mode = \"enforce\"\n[[rule]]\nprotocol = \"udp\"\nport = 137\ninbound = \"count\"\noutbound = \"count\"\nauto_block = true\n\
         [fleet]\nurl = \"{url}\"\nsensor = \"edge-c\"\ndecisions_per_prefix = 1\n{report_command}"
    ));
    let listener = udp_listener(&lab.victim, 137);
    for allowlisted in [false, true] {
        let mut args = vec!["--config", config.arg(), "--iface", VICTIM_IF];
        if allowlisted {
            args.extend(["--allow", SCANNER_IP]);
        }
        let started = Instant::now();
        let nw = Netwatch::start(&lab.victim, &pin_dir(), &args);
        wait_until(
            "the decision applied",
            Duration::from_secs(10),
            || nw.log(),
            || {
                counter(&nw, "netwatch_fleet_decisions_applied_total") == Some(1.0)
                    && nw.log().contains("decisions_per_prefix")
            },
        );
        eprintln!("decision applied at edge-c {:?} after its start", started.elapsed());
        assert!(
            nw.log()
                .contains(&format!("decision for {SECOND_SCANNER} on udp/137 not applied")),
            "{}",
            nw.log()
        );
        assert_eq!(counter(&nw, "netwatch_fleet_decisions_created_total"), Some(0.0));
        count_received(&listener);
        assert_eq!(send_udp(&lab.scanner, &format!("{VICTIM_IP}:137"), 1), 1);
        assert_eq!(
            count_received(&listener),
            usize::from(allowlisted),
            "the scanner's first probe at edge-c (allowlisted: {allowlisted})"
        );
        assert_eq!(
            send_udp_from(&lab.scanner, SECOND_SCANNER, &format!("{VICTIM_IP}:137"), 1),
            1
        );
        assert_eq!(
            count_received(&listener),
            1,
            "the capped decision's source's probe is only counted"
        );
    }
    assert_eq!(stream_messages(&lab.victim, &url, "NETWATCH_DECISIONS").len(), 2);
    // One report per confirmed source, from the sensor that created the
    // decision (edge-b), whichever sensors found the confirmation.
    let read_reports = || -> Vec<String> {
        std::fs::read_dir(&*reports)
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect()
    };
    wait_until(
        "the reports",
        Duration::from_secs(5),
        || format!("{:?}", read_reports()),
        || read_reports().len() >= 2,
    );
    let all = read_reports();
    assert_eq!(all.len(), 2, "{all:#?}");
    for source in [SCANNER_IP, SECOND_SCANNER] {
        let report = all
            .iter()
            .find(|r| r.contains(&format!("Subject: netwatch: port scan from {source} (udp/137)")))
            .unwrap_or_else(|| panic!("no report for {source}: {all:#?}"));
        assert!(report.starts_with("To: abuse@example.net\n"), "{report}");
        assert!(
            report.contains("seen by 2 sensors of a netwatch fleet (edge-a, edge-b)"),
            "{report}"
        );
        let json = report
            .split("filename=\"report.json\"\n\n")
            .nth(1)
            .and_then(|p| p.split("\n--netwatch-report").next())
            .unwrap();
        let json: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(json["Report"]["SourceIp"], source);
        assert_eq!(json["ReporterInfo"]["ReporterSensor"], "edge-b");
        assert_eq!(json["Report"]["Incidents"].as_array().unwrap().len(), 2, "{json:#}");
    }
}

/// The delay from a confirming flag at one sensor to the decision being
/// in force at another: sensor A (an earlier run) flagged 20 sources; then
/// with C (enforce) running, B, in a namespace of its own that reaches
/// the server over a veth, flags them one by one, and each decision must
/// be applied at C within 5 s. Prints the median and the worst.
#[test]
fn a_confirming_flag_is_applied_at_another_sensor_within_seconds() {
    require_privileged!();
    const SOURCES: u8 = 20;
    let lab = Lab::new();
    let b = Netns::new("b");
    netwatch_tests::netns::veth(&lab.scanner, "nw-scanb", "198.18.2.1/24", &b, "nw-b0", "198.18.2.2/24");
    b.local_range("198.18.3.0/24");
    lab.scanner.ip(&["route", "add", "198.18.3.0/24", "via", "198.18.2.2"]);
    netwatch_tests::netns::veth(&lab.victim, "nw-vhub", "198.18.4.1/30", &b, "nw-bhub", "198.18.4.2/30");
    // Each source in a /24 of its own (the per-prefix cap is not tested
    // here), on the scanner's loopback: it reaches A/C's and B's links.
    let source = |i: u8| format!("198.18.{}.1", 100 + i);
    for i in 0..SOURCES {
        lab.scanner
            .ip(&["addr", "add", &format!("{}/32", source(i)), "dev", "lo"]);
    }
    let nats = NatsServer::start_on(&lab.victim, None, "0.0.0.0");
    let sweep = |src: &str, range: &str| {
        for host in 1..=25 {
            assert_eq!(send_udp_from(&lab.scanner, src, &format!("{range}.{host}:137"), 1), 1);
        }
    };
    let counter = |nw: &Netwatch, ns: &Netns, name: &str| try_sample(&nw.metrics(ns), name, &[]);
    {
        let a = Netwatch::start(
            &lab.victim,
            &pin_dir(),
            &["--iface", VICTIM_IF, "--fleet", &nats.url(), "--sensor", "edge-a"],
        );
        for i in 0..SOURCES {
            sweep(&source(i), "198.18.1");
        }
        wait_until(
            "A's delivery",
            Duration::from_secs(20),
            || a.log(),
            || {
                counter(&a, &lab.victim, "netwatch_fleet_incidents_published_total")
                    .is_some_and(|n| n >= SOURCES as f64)
                    && counter(&a, &lab.victim, "netwatch_fleet_outbox_incidents") == Some(0.0)
            },
        );
    }
    let config = ConfigFile::new(format!(
        "mode = \"enforce\"\n[[rule]]\nprotocol = \"udp\"\nport = 137\ninbound = \"count\"\noutbound = \"count\"\nauto_block = true\n\
         [fleet]\nurl = \"{}\"\nsensor = \"edge-c\"\n",
        nats.url()
    ));
    let c = Netwatch::start(
        &lab.victim,
        &pin_dir(),
        &["--config", config.arg(), "--iface", VICTIM_IF],
    );
    let hub = format!("nats://198.18.4.1:{}", nats.port);
    let b_sensor = Netwatch::start(
        &b,
        &pin_dir(),
        &["--iface", "nw-b0", "--fleet", &hub, "--sensor", "edge-b"],
    );
    wait_until(
        "B's connection",
        Duration::from_secs(10),
        || b_sensor.log(),
        || counter(&b_sensor, &b, "netwatch_fleet_connected") == Some(1.0),
    );
    let mut delays = Vec::new();
    for i in 0..SOURCES {
        sweep(&source(i), "198.18.3");
        let flagged = Instant::now();
        let want = f64::from(i + 1);
        // Polled every 5 ms (a scrape of /metrics takes about as long).
        while counter(&c, &lab.victim, "netwatch_fleet_decisions_applied_total") != Some(want) {
            assert!(
                flagged.elapsed() < netwatch_tests::patience(Duration::from_secs(5)),
                "decision {i} not applied at C in time:\n{}\n{}",
                c.log(),
                b_sensor.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        delays.push(flagged.elapsed());
    }
    delays.sort();
    eprintln!(
        "flag at B to applied at C over {SOURCES} sources: median {:?}, worst {:?}",
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
    assert_eq!(
        stream_messages(&lab.victim, &nats.url(), "NETWATCH_DECISIONS").len(),
        SOURCES as usize
    );
}

/// A 3-node JetStream cluster with the streams kept on all three
/// (`stream_replicas = 3`): a node killed (SIGKILL) mid-test loses
/// nothing; the sensor, given every node's URL, goes on delivering
/// through the two left, and they hold every incident.
#[test]
fn a_node_of_a_three_node_cluster_killed_loses_nothing() {
    require_privileged!();
    let lab = Lab::new();
    lab.scanner
        .ip(&["addr", "add", &format!("{SECOND_SCANNER}/24"), "dev", SCANNER_IF]);
    let mut nodes = cluster_of_three(&lab.victim);
    let urls: Vec<String> = nodes.iter().map(NatsServer::url).collect();
    let config = ConfigFile::new(format!(
        "[fleet]\nurl = \"{}\"\nsensor = \"edge-a\"\nstream_replicas = 3\n",
        urls.join(",")
    ));
    let nw = Netwatch::start(
        &lab.victim,
        &pin_dir(),
        &["--config", config.arg(), "--iface", VICTIM_IF],
    );
    let delivered = |nw: &Netwatch, n: f64| {
        let m = nw.metrics(&lab.victim);
        try_sample(&m, "netwatch_fleet_outbox_incidents", &[]) == Some(0.0)
            && try_sample(&m, "netwatch_fleet_incidents_published_total", &[]).is_some_and(|p| p >= n)
    };
    assert!(lab.nbtscan(TARGET_RANGE).status.success());
    nw.wait_for_incident(SCANNER_IP);
    // The cluster elects its JetStream leader first: some seconds.
    wait_until(
        "delivery to the cluster",
        Duration::from_secs(30),
        || nw.log(),
        || delivered(&nw, 1.0),
    );
    let messages = stream_messages(&lab.victim, &urls[1], STREAM);
    assert!(messages.iter().any(|m| m["source"] == SCANNER_IP), "{messages:#?}");

    assert_eq!(stream_copies(&lab.victim, &urls[1], STREAM), (3, 3));
    nodes[0].kill();
    sweep_from(&lab, SECOND_SCANNER, 30);
    nw.wait_for_incident(SECOND_SCANNER);
    wait_until(
        "delivery with a node down",
        Duration::from_secs(30),
        || nw.log(),
        || delivered(&nw, 2.0),
    );
    let local = local_incidents(&nw);
    for url in &urls[1..] {
        let messages = stream_messages(&lab.victim, url, STREAM);
        let ids: HashSet<i64> = messages.iter().map(|m| m["id"].as_i64().unwrap()).collect();
        assert_eq!(
            ids,
            local.keys().copied().collect::<HashSet<_>>(),
            "at {url}: {messages:#?}"
        );
    }
}

/// How fast a sensor applies decisions: 1000 (the kernel's auto-block map
/// holds 1024), in 250 /24s, put into the decisions stream at once (as
/// the sensors that confirmed them would) while an enforce-mode sensor
/// runs; every one is applied, each in the kernel's map. Prints the rate.
#[test]
fn a_thousand_decisions_are_applied() {
    require_privileged!();
    const DECISIONS: u32 = 1000;
    let lab = Lab::new();
    let nats = NatsServer::start_in(&lab.victim);
    let config = ConfigFile::new(format!(
        "mode = \"enforce\"\n[[rule]]\nprotocol = \"udp\"\nport = 137\nauto_block = true\n\
         [fleet]\nurl = \"{}\"\nsensor = \"edge-c\"\ndecisions_max = 1000\n",
        nats.url()
    ));
    let nw = Netwatch::start(
        &lab.victim,
        &pin_dir(),
        &["--config", config.arg(), "--iface", VICTIM_IF],
    );
    let counter = |name: &str| try_sample(&nw.metrics(&lab.victim), name, &[]);
    // The sensor made the decisions stream.
    wait_until(
        "the fleet connection",
        Duration::from_secs(10),
        || nw.log(),
        || counter("netwatch_fleet_connected") == Some(1.0),
    );
    std::thread::sleep(Duration::from_millis(500));
    let until = "2099-01-01T00:00:00Z";
    let decisions = (0..DECISIONS)
        .map(|i| {
            // 198.18.0.0/15: 512 /24s; 4 sources in each of 250.
            let source = std::net::Ipv4Addr::from(0xc612_0000 + (i / 4) * 256 + i % 4 + 1);
            (
                format!(
                    "netwatch.decisions.{}.udp-137.inbound",
                    source.to_string().replace('.', "-")
                ),
                serde_json::json!({
                    "source": source.to_string(), "rule": "udp/137", "direction": "inbound",
                    "sensors": ["edge-a", "edge-b"], "confirmed_at": "2026-12-08T00:00:00Z", "until": until,
                }),
            )
        })
        .collect();
    let started = Instant::now();
    publish_all(&lab.victim, &nats.url(), decisions);
    let published = started.elapsed();
    wait_until(
        "every decision applied",
        Duration::from_secs(60),
        || nw.log(),
        || counter("netwatch_fleet_decisions_applied_total") == Some(DECISIONS as f64),
    );
    let elapsed = started.elapsed();
    eprintln!(
        "{DECISIONS} decisions applied in {elapsed:?} ({:.0} a second; publishing them took {published:?})",
        DECISIONS as f64 / elapsed.as_secs_f64()
    );
    let exposition = nw.metrics(&lab.victim);
    assert_eq!(
        sample(&exposition, "netwatch_sources_blocked", &[]),
        DECISIONS as f64,
        "in the kernel's map"
    );
}

/// The safeguards of a sensor's own: a source on the fleet allowlist is
/// never decided on (A and B flag it and the scanner; only the scanner's
/// decision is made, by B), a decision on a UDP rule ends after
/// `udp_decision_secs`; at C (enforce), a decision for a fleet-allowlisted
/// source is not applied and at most `decisions_max` are in force, each
/// in a /24 of its own: the scanner's probe is dropped, the allowlisted
/// source's passes.
#[test]
fn the_fleet_allowlist_udp_evidence_and_the_total_cap() {
    require_privileged!();
    let lab = Lab::new();
    lab.scanner
        .ip(&["addr", "add", &format!("{SECOND_SCANNER}/24"), "dev", SCANNER_IF]);
    let nats = NatsServer::start_in(&lab.victim);
    let url = nats.url();
    let counter = |nw: &Netwatch, name: &str| try_sample(&nw.metrics(&lab.victim), name, &[]);
    let safeguards = format!("udp_decision_secs = 120\nallowlist = [\"{SECOND_SCANNER}/32\"]\n");
    flag_at_a_and_b(&lab, &url, &safeguards, 1.0);
    let decisions = stream_messages(&lab.victim, &url, "NETWATCH_DECISIONS");
    assert_eq!(decisions.len(), 1, "{decisions:#?}");
    assert_eq!(decisions[0]["source"], SCANNER_IP);
    let until = humantime::parse_rfc3339(decisions[0]["until"].as_str().unwrap()).unwrap();
    let left = until.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(
        left <= Duration::from_secs(120) && left > Duration::from_secs(60),
        "a UDP decision ends in {left:?}"
    );

    let config = ConfigFile::new(format!(
        "mode = \"enforce\"\n[[rule]]\nprotocol = \"udp\"\nport = 137\ninbound = \"count\"\noutbound = \"count\"\nauto_block = true\n\
         [fleet]\nurl = \"{url}\"\nsensor = \"edge-c\"\ndecisions_max = 2\n{safeguards}"
    ));
    let nw = Netwatch::start(
        &lab.victim,
        &pin_dir(),
        &["--config", config.arg(), "--iface", VICTIM_IF],
    );
    wait_until(
        "the scanner's decision applied",
        Duration::from_secs(10),
        || nw.log(),
        || counter(&nw, "netwatch_fleet_decisions_applied_total") == Some(1.0),
    );
    // As the sensors that confirmed them would: one for the allowlisted
    // source, two more in /24s of their own, of which one is over the cap.
    let decision = |source: &str| {
        (
            format!("netwatch.decisions.{}.udp-137.inbound", source.replace('.', "-")),
            serde_json::json!({
                "source": source, "rule": "udp/137", "direction": "inbound",
                "sensors": ["edge-a", "edge-b"], "confirmed_at": "2026-12-08T00:00:00Z",
                "until": "2099-01-01T00:00:00Z",
            }),
        )
    };
    publish_all(
        &lab.victim,
        &url,
        vec![
            decision(SECOND_SCANNER),
            decision("198.18.10.1"),
            decision("198.18.11.1"),
        ],
    );
    wait_until(
        "the decisions handled",
        Duration::from_secs(10),
        || nw.log(),
        || nw.log().contains("decisions_max"),
    );
    let log = nw.log();
    assert!(
        log.contains(&format!(
            "decision for {SECOND_SCANNER} on udp/137 not applied: the source is on the fleet allowlist"
        )),
        "{log}"
    );
    assert!(
        log.contains(
            "decision for 198.18.11.1 on udp/137 not applied: 2 decisions in force here already (decisions_max)"
        ),
        "{log}"
    );
    let exposition = nw.metrics(&lab.victim);
    assert_eq!(sample(&exposition, "netwatch_fleet_decisions_applied_total", &[]), 2.0);
    assert_eq!(
        sample(&exposition, "netwatch_sources_blocked", &[]),
        2.0,
        "in the kernel's map"
    );
    let listener = udp_listener(&lab.victim, 137);
    assert_eq!(send_udp(&lab.scanner, &format!("{VICTIM_IP}:137"), 1), 1);
    assert_eq!(
        send_udp_from(&lab.scanner, SECOND_SCANNER, &format!("{VICTIM_IP}:137"), 1),
        1
    );
    assert_eq!(
        count_received(&listener),
        1,
        "only the allowlisted source's probe passes"
    );
}

/// `netwatch unblock` of a fleet-decided source lifts it at every sensor:
/// C and D (enforce; D in a namespace of its own reaching the server over
/// a veth) apply a decision for the scanner; `unblock` at D lifts it
/// there and, through the decisions stream (the lift replaces the
/// decision), at C, where the scanner's probe passes again; a second
/// `unblock` finds nothing left to lift; C restarted does not apply the
/// decision again.
#[test]
fn an_unblock_of_a_fleet_decision_lifts_it_at_every_sensor() {
    require_privileged!();
    let lab = Lab::new();
    let d_ns = Netns::new("d");
    netwatch_tests::netns::veth(
        &lab.victim,
        "nw-vhub",
        "198.18.4.1/30",
        &d_ns,
        "nw-dhub",
        "198.18.4.2/30",
    );
    let nats = NatsServer::start_on(&lab.victim, None, "0.0.0.0");
    let enforce = |url: &str, sensor: &str| {
        ConfigFile::new(format!(
            "mode = \"enforce\"\n[[rule]]\nprotocol = \"udp\"\nport = 137\ninbound = \"count\"\noutbound = \"count\"\nauto_block = true\n\
             [fleet]\nurl = \"{url}\"\nsensor = \"{sensor}\"\n"
        ))
    };
    let c_config = enforce(&nats.url(), "edge-c");
    let d_config = enforce(&format!("nats://198.18.4.1:{}", nats.port), "edge-d");
    let counter = |nw: &Netwatch, ns: &Netns, name: &str| try_sample(&nw.metrics(ns), name, &[]);
    let c = Netwatch::start(
        &lab.victim,
        &pin_dir(),
        &["--config", c_config.arg(), "--iface", VICTIM_IF],
    );
    let d = Netwatch::start(&d_ns, &pin_dir(), &["--config", d_config.arg(), "--iface", "nw-dhub"]);
    for (nw, ns) in [(&c, &lab.victim), (&d, &d_ns)] {
        wait_until(
            "the fleet connection",
            Duration::from_secs(10),
            || nw.log(),
            || counter(nw, ns, "netwatch_fleet_connected") == Some(1.0),
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    publish_all(
        &lab.victim,
        &nats.url(),
        vec![(
            format!("netwatch.decisions.{}.udp-137.inbound", SCANNER_IP.replace('.', "-")),
            serde_json::json!({
                "source": SCANNER_IP, "rule": "udp/137", "direction": "inbound",
                "sensors": ["edge-a", "edge-b"], "confirmed_at": "2026-12-08T00:00:00Z",
                "until": "2099-01-01T00:00:00Z",
            }),
        )],
    );
    for (nw, ns) in [(&c, &lab.victim), (&d, &d_ns)] {
        wait_until(
            "the decision applied",
            Duration::from_secs(10),
            || nw.log(),
            || counter(nw, ns, "netwatch_sources_blocked") == Some(1.0),
        );
    }
    let listener = udp_listener(&lab.victim, 137);
    let probe_passes = || {
        count_received(&listener);
        assert_eq!(send_udp(&lab.scanner, &format!("{VICTIM_IP}:137"), 1), 1);
        count_received(&listener) == 1
    };
    assert!(!probe_passes(), "the decision drops the scanner's probe at C");

    let unblock = || {
        d_ns.command(bin().to_str().unwrap())
            .args([
                "unblock",
                SCANNER_IP,
                "--config",
                d_config.arg(),
                "--pin-dir",
                &d.pin_dir,
            ])
            .output()
            .unwrap()
    };
    let out = unblock();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("lifted 1 auto-blocks inside"), "{stdout}");
    assert!(stdout.contains("lifted 1 fleet decisions inside"), "{stdout}");
    wait_until(
        "the lift at D",
        Duration::from_secs(5),
        || d.log(),
        || counter(&d, &d_ns, "netwatch_sources_blocked") == Some(0.0),
    );
    wait_until(
        "the lift at C",
        Duration::from_secs(5),
        || c.log(),
        || counter(&c, &lab.victim, "netwatch_sources_blocked") == Some(0.0),
    );
    assert!(
        c.log().contains(&format!(
            "lifted the decision blocking {SCANNER_IP} on udp/137 inbound (netwatch unblock at edge-d"
        )),
        "{}",
        c.log()
    );
    assert!(probe_passes(), "the scanner's probe at C after the lift");
    let decisions = stream_messages(&lab.victim, &nats.url(), "NETWATCH_DECISIONS");
    assert_eq!(decisions.len(), 1, "{decisions:#?}");
    assert_eq!(decisions[0]["lifted_by"], "edge-d");
    let again = unblock();
    assert_fails_saying(&again, "or decided on by the fleet");

    drop(c);
    let c = Netwatch::start(
        &lab.victim,
        &pin_dir(),
        &["--config", c_config.arg(), "--iface", VICTIM_IF],
    );
    wait_until(
        "the fleet connection",
        Duration::from_secs(10),
        || c.log(),
        || counter(&c, &lab.victim, "netwatch_fleet_connected") == Some(1.0),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        counter(&c, &lab.victim, "netwatch_fleet_decisions_applied_total"),
        Some(0.0)
    );
    assert_eq!(counter(&c, &lab.victim, "netwatch_sources_blocked"), Some(0.0));
    assert!(probe_passes(), "the scanner's probe at C restarted");
}
