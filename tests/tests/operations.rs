//! What operators get: the Grafana dashboard, the alert rules, a real
//! Prometheus scraping a real `netwatch run`, the systemd unit's
//! capability set, and complete `--help`.

use std::{
    collections::BTreeSet,
    process::Command,
    time::{Duration, Instant},
};

use netwatch_tests::{
    TempDir,
    daemon::{METRICS_ADDR, Netwatch, netwatch},
    dashboard::{alert_rules, dashboard, dashboard_queries, metric_names, repo, substitute},
    lab::*,
    pin_dir,
    prometheus::{query, start_prometheus},
    require_privileged, unique,
};

#[test]
fn dashboard_is_importable_and_every_panel_has_a_query() {
    let d = dashboard();
    assert_eq!(d["uid"], "netwatch");
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for needed in ["datasource", "interface", "rule", "direction"] {
        assert!(vars.contains(&needed), "dashboard lacks the ${needed} variable");
    }
    let datasource = &d["templating"]["list"][0];
    assert_eq!(
        (datasource["type"].as_str(), datasource["query"].as_str()),
        (Some("datasource"), Some("prometheus"))
    );
    let panels = d["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {} not on the datasource variable",
            p["title"]
        );
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert!(
                !expr.trim().is_empty() && !metric_names(expr).is_empty(),
                "panel {}: {expr:?}",
                p["title"]
            );
        }
    }
    // The main questions have panels.
    let titles: Vec<&str> = panels.iter().map(|p| p["title"].as_str().unwrap()).collect();
    for t in [
        "Packets by rule",
        "Dropped vs passed",
        "Scanners flagged",
        "Tracked and blocked",
        "Reverse lookups",
        "Malformed",
        "Program health",
    ] {
        assert!(titles.iter().any(|x| x.starts_with(t)), "no panel {t:?}");
    }
}

#[test]
fn alert_rules_pass_promtool_unit_tests() {
    let dir = repo().join("deploy/prometheus");
    for args in [
        vec!["check", "rules", "netwatch.rules.yml"],
        vec!["test", "rules", "netwatch.rules.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("promtool (Debian package prometheus)");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let names: Vec<String> = alert_rules().into_iter().map(|(n, _)| n).collect();
    for needed in [
        "NetwatchScannerFlagged",
        "NetwatchOutboundScanning",
        "NetwatchDropRateSpike",
        "NetwatchSourceMapNearFull",
        "NetwatchEventsLost",
        "NetwatchDown",
    ] {
        assert!(names.iter().any(|n| n == needed), "no alert {needed}");
    }
}

/// A real Prometheus scrapes a live `netwatch run` carrying real traffic;
/// every query of the dashboard and every alert rule runs against it.
#[test]
fn real_prometheus_answers_every_dashboard_and_alert_query() {
    require_privileged!();
    let lab = Lab::new();
    let nw = Netwatch::start(
        &lab.victim,
        &pin_dir(),
        &[
            "--iface",
            &format!("{VICTIM_IF}:host"),
            "--egress",
            VICTIM_IF,
            "--mode",
            "enforce",
        ],
    );
    let prom = start_prometheus(&lab.victim);
    // Counters must be seen at zero first, or increase() has no baseline.
    let deadline = Instant::now() + Duration::from_secs(30);
    while query(&lab.victim, "count_over_time(netwatch_info[1m])")["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(0.0)
        < 2.0
    {
        assert!(Instant::now() < deadline, "prometheus did not scrape netwatch");
        std::thread::sleep(Duration::from_millis(250));
    }

    // Traffic for every panel: a sweep (inbound flag), an outbound sweep
    // from the host, a web visitor looked up (reverse lookup), a datagram
    // too large for one frame (fragments), and plenty of unmatched.
    let _ = lab.nbtscan(TARGET_RANGE);
    lab.scanner.local_range("198.18.2.0/24");
    lab.victim.ip(&["route", "add", "198.18.2.0/24", "via", SCANNER_IP]);
    lab.victim.run(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for i in 1..=30 {
            let _ = s.send_to(b"nb", format!("198.18.2.{i}:137"));
        }
    });
    // A real web server: only a completed handshake makes a visitor, and
    // once it is accepted the host has seen the visitor's ACK.
    let web = lab.victim.run(|| std::net::TcpListener::bind("198.18.0.2:80").unwrap());
    assert!(tcp_connect(&lab.scanner, "198.18.0.2:80", Duration::from_secs(2)));
    drop(web.accept().unwrap());
    send_udp(&lab.victim, "198.18.0.1:137", 1);
    lab.scanner.run(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let _ = s.send_to(&[0u8; 4000], "198.18.0.2:5000");
    });
    for _ in 0..5 {
        send_udp(&lab.scanner, "198.18.0.2:53", 20);
        std::thread::sleep(Duration::from_millis(1000));
    }

    // Wait until Prometheus has a few scrapes of everything.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = query(&lab.victim, "count_over_time(netwatch_info[1m])");
        if v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0)
            >= 5.0
        {
            break;
        }
        assert!(Instant::now() < deadline, "prometheus did not scrape netwatch: {v}");
        std::thread::sleep(Duration::from_millis(500));
    }

    for (title, expr) in dashboard_queries() {
        let q = substitute(&expr);
        let v = query(&lab.victim, &q);
        assert!(
            !v["data"]["result"].as_array().unwrap().is_empty(),
            "dashboard panel {title:?}: query returned no data: {q}"
        );
    }
    for (name, expr) in alert_rules() {
        // The condition must parse and run; its inputs must have data
        // (when each fires is what the promtool unit tests check).
        query(&lab.victim, &expr);
        for metric in metric_names(&expr) {
            let v = query(&lab.victim, &format!("count({metric})"));
            assert!(
                !v["data"]["result"].as_array().unwrap().is_empty(),
                "alert {name}: no data for {metric}"
            );
        }
    }
    // The two flags of this run made their alerts fire for real.
    let deadline = Instant::now() + Duration::from_secs(20);
    for alert in ["NetwatchScannerFlagged", "NetwatchOutboundScanning"] {
        loop {
            let v = query(
                &lab.victim,
                &format!("ALERTS{{alertname=\"{alert}\", alertstate=\"firing\"}}"),
            );
            if !v["data"]["result"].as_array().unwrap().is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "{alert} did not fire");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    drop(prom);
    drop(nw);
}

/// The systemd unit's capability set is enough: netwatch runs, attaches,
/// counts and serves with exactly those capabilities.
#[test]
fn runs_with_only_the_capabilities_of_the_systemd_unit() {
    require_privileged!();
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/netwatch.service")).unwrap();
    let caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap()
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let set = format!("-all,{}", caps.join(","));
    let lab = Lab::new();
    let pins = format!("/sys/fs/bpf/{}", unique("cap"));
    let state = std::env::temp_dir().join(unique("capstate"));
    let log = std::env::temp_dir().join(unique("caplog"));
    let mut child = lab
        .victim
        .command("setpriv")
        .args(["--bounding-set", &set, "--inh-caps", "-all", "--"])
        .arg(netwatch_tests::daemon::bin())
        .args([
            "run",
            "--iface",
            VICTIM_IF,
            "--egress",
            VICTIM_IF,
            "--pin-dir",
            &pins,
            "--metrics-addr",
            METRICS_ADDR,
        ])
        .arg("--state-dir")
        .arg(&state)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "netwatch exited with capabilities {set}: {status}\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        if let Ok(m) = lab
            .victim
            .run(|| netwatch_user::netns::http_get(METRICS_ADDR, "/metrics"))
        {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "not serving:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let eff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap().to_string();
    assert!(eff.ends_with("000000c000001000"), "unexpected capabilities: {eff}");
    assert!(metrics.contains("netwatch_interface_attached{hook=\"tc_egress\""));
    send_udp(&lab.scanner, "198.18.0.2:137", 4);
    let counted = eventually(4.0, Duration::from_secs(3), || {
        let m = lab
            .victim
            .run(|| netwatch_user::netns::http_get(METRICS_ADDR, "/metrics"))
            .unwrap();
        netwatch_tests::daemon::sample(
            &m,
            "netwatch_packets_total",
            &[("rule", "udp/137"), ("direction", "inbound")],
        )
    });
    assert_eq!(counted, 4.0);
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(
        child.wait().unwrap().success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let _ = netwatch(&["detach", "--pin-dir", &pins]);
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_file(&log);
}

/// A privileged test run without root: it skips (and says so in the
/// skip log `cargo xtask test --allow-skip` reads), unless
/// NETWATCH_REQUIRE_PRIVILEGED=1, where it fails. This binary runs one
/// of its own privileged tests as `nobody`.
#[test]
fn privileged_tests_skip_visibly_or_fail_without_root() {
    require_privileged!();
    let dir = TempDir::new("skip");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let log = dir.join("skipped");
    let as_nobody = |require: Option<&str>| {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", "json_output_keeps_its_documented_schema", "--nocapture"])
            .env("NETWATCH_SKIP_LOG", &log)
            .env_remove("NETWATCH_REQUIRE_PRIVILEGED");
        if let Some(v) = require {
            cmd.env("NETWATCH_REQUIRE_PRIVILEGED", v);
        }
        cmd.output().unwrap()
    };
    let out = as_nobody(Some("1"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a privileged test passed without root under NETWATCH_REQUIRE_PRIVILEGED=1"
    );
    assert!(stderr.contains("forbids skipping"), "{stderr}");
    assert!(!log.exists(), "a test that failed was logged as skipped");

    let out = as_nobody(None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipping: needs root"));
    let logged = std::fs::read_to_string(&log).expect("skip not logged");
    assert_eq!(logged, "operations::json_output_keeps_its_documented_schema\n");
}

#[test]
fn every_command_and_flag_has_help() {
    let out = netwatch(&["--help"]);
    assert!(out.status.success());
    let top = String::from_utf8_lossy(&out.stdout).to_string();
    for cmd in [
        "run", "status", "lookup", "top", "block", "unblock", "allow", "disallow", "detach", "lab",
    ] {
        assert!(top.contains(cmd), "--help does not list {cmd}");
        let out = netwatch(&[cmd, "--help"]);
        assert!(out.status.success(), "{cmd} --help");
        let help = String::from_utf8_lossy(&out.stdout);
        // Every option line carries a description.
        let is_option = |l: &str| {
            let t = l.trim_start();
            t.starts_with("--") || (t.starts_with('-') && t.as_bytes().get(1).is_some_and(|b| b.is_ascii_alphabetic()))
        };
        for line in help.lines().filter(|l| is_option(l)) {
            let described = line.trim().split("  ").filter(|s| !s.trim().is_empty()).count() >= 2;
            let next_described = help
                .lines()
                .skip_while(|l| *l != line)
                .nth(1)
                .is_some_and(|n| n.starts_with("          "));
            assert!(described || next_described, "{cmd}: option without help: {line:?}");
        }
    }
}

fn keys(v: &serde_json::Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(|k| k.as_str())
        .collect();
    k.sort();
    k
}

/// The JSON of `status`, `top` and `lookup` keeps the documented keys.
#[test]
fn json_output_keeps_its_documented_schema() {
    require_privileged!();
    let lab = Lab::new();
    let nw = Netwatch::start(&lab.victim, &pin_dir(), &["--iface", VICTIM_IF, "--egress", VICTIM_IF]);
    let _ = lab.nbtscan(TARGET_RANGE);
    let lookup = nw.wait_for_incident(SCANNER_IP);
    let run = |args: &[&str]| -> serde_json::Value {
        let out = netwatch(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let status = run(&["status", "--json", "--pin-dir", &nw.pin_dir]);
    assert_eq!(
        keys(&status),
        [
            "allowlist",
            "blocklist",
            "class_counters",
            "detection",
            "interfaces",
            "mode",
            "rule_counters",
            "rules"
        ]
    );
    assert_eq!(
        keys(&status["interfaces"][0]),
        ["ifindex", "name", "role", "tc_egress", "tc_egress_mode", "xdp"]
    );
    assert_eq!(
        keys(&status["rules"][0]),
        ["block_secs", "inbound", "outbound", "rule", "threshold", "window_secs"]
    );
    assert_eq!(
        keys(&status["rule_counters"][0]),
        ["action", "bytes", "direction", "interface", "packets", "rule"]
    );
    assert_eq!(
        keys(&status["class_counters"][0]),
        ["bytes", "class", "direction", "interface", "packets", "reason"]
    );
    assert_eq!(
        keys(&status["detection"]),
        [
            "auto_blocks",
            "auto_blocks_capped",
            "auto_blocks_in_force",
            "events_lost",
            "flagged",
            "reverse_lookups",
            "sources_created",
            "visitors_recorded",
            "web_acks_rejected",
            "web_syn_acks"
        ]
    );
    assert_eq!(
        keys(&status["detection"]["flagged"][0]),
        ["direction", "flagged", "rule"]
    );
    let source_keys = [
        "blocked_until",
        "bytes",
        "classification",
        "direction",
        "distinct_destinations",
        "first_seen",
        "flagged",
        "interface",
        "last_seen",
        "packets",
        "rule",
        "source",
    ];
    let top = run(&["top", "--json", "--limit", "3", "--pin-dir", &nw.pin_dir]);
    assert_eq!(keys(&top), ["sources"]);
    assert_eq!(keys(&top["sources"][0]), source_keys);
    assert_eq!(keys(&lookup), ["blocks", "incidents", "ip", "tracked"]);
    assert_eq!(
        keys(&lookup["incidents"][0]),
        [
            "blocked",
            "blocked_until",
            "classification",
            "direction",
            "distinct_destinations",
            "first_seen",
            "id",
            "interface",
            "last_seen",
            "packets",
            "recovered",
            "rule",
            "source",
        ]
    );
    assert_eq!(keys(&lookup["tracked"][0]), source_keys);
    // The HTTP API serves the same shapes.
    let api: serde_json::Value = serde_json::from_str(
        &lab.victim
            .run(|| netwatch_user::netns::http_get(METRICS_ADDR, &format!("/api/lookup/{SCANNER_IP}")))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(keys(&api), keys(&lookup));
}
