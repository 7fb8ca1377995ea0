//! What operators get: the Grafana dashboard, the alert rules, a real
//! Prometheus scraping a real `netwatch run`, the systemd unit's
//! capability set, and complete `--help`.

use std::{
    collections::BTreeSet,
    process::Command,
    time::{Duration, Instant},
};

use netwatch_tests::{
    TempDir, assert_success,
    daemon::{METRICS_ADDR, Netwatch, absent, netwatch, sample},
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
        let title = &p["title"];
        assert!(
            p["description"].as_str().is_some_and(|d| d.len() > 20),
            "panel {title} has no description"
        );
        assert!(
            p["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .is_some_and(|u| !u.is_empty()),
            "panel {title} has no unit"
        );
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert!(
                !expr.trim().is_empty() && !metric_names(expr).is_empty(),
                "panel {title}: {expr:?}"
            );
            // Every selector is narrowed to the chosen job, so two
            // Prometheus jobs scraping netwatch never add up.
            for selector in expr.split('{').skip(1) {
                assert!(
                    selector.contains("job=~\"$job\""),
                    "panel {title}: a selector without $job in {expr:?}"
                );
            }
        }
    }
    // The Mode panel shows the mode by name, not the value 1.
    let mode = panels.iter().find(|p| p["title"] == "Mode").expect("a Mode panel");
    assert_eq!(mode["options"]["textMode"], "name");
    assert_eq!(mode["targets"][0]["legendFormat"], "{{mode}}");
    // grafana.com import conventions: the datasource is an input, and
    // every panel type the dashboard uses is declared.
    assert_eq!(d["__inputs"][0]["type"], "datasource");
    assert_eq!(d["__inputs"][0]["pluginId"], "prometheus");
    let required: BTreeSet<&str> = d["__requires"]
        .as_array()
        .expect("__requires")
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    for p in panels {
        let kind = p["type"].as_str().unwrap();
        assert!(required.contains(kind), "__requires lacks the {kind} panel");
    }
    assert!(required.contains("grafana") && required.contains("prometheus"));
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
        "NetwatchReloadFailed",
        "NetwatchIncidentStoreErrors",
        "NetwatchAutoBlockCapReached",
    ] {
        assert!(names.iter().any(|n| n == needed), "no alert {needed}");
    }
    // Every alert links to its runbook, a heading of the README.
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/netwatch.rules.yml")).unwrap();
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for name in &names {
        let url = format!(
            "runbook_url: \"file:///usr/share/doc/netwatch/README.md#{}\"",
            name.to_lowercase()
        );
        assert!(rules.contains(&url), "alert {name} has no runbook_url {url}");
        assert!(
            readme.contains(&format!("\n#### {name}\n")),
            "README has no runbook for {name}"
        );
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

/// Runs the shipped `NetwatchNotAttached` rule with promtool over the
/// `netwatch_interface_attached` series a real `/metrics` exported (held
/// for 15 minutes) and returns the alerts that fire at 10 minutes, as
/// `interface/hook` (promtool's test reports what fired when it was not
/// expected).
fn not_attached_alerts(exposition: &str) -> Vec<String> {
    let series: Vec<(String, String)> = exposition
        .lines()
        .filter(|l| l.starts_with("netwatch_interface_attached{"))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let series = series.replacen('{', "{job=\"netwatch\",instance=\"h:9737\",", 1);
            (series, value.to_string())
        })
        .collect();
    assert!(
        !series.is_empty(),
        "no netwatch_interface_attached series:\n{exposition}"
    );
    let dir = TempDir::new("promtool");
    let rules = repo().join("deploy/prometheus/netwatch.rules.yml");
    let mut test = format!(
        "rule_files:\n  - {}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n",
        rules.display()
    );
    for (series, value) in &series {
        test += &format!("      - series: '{series}'\n        values: '{value}+0x15'\n");
    }
    test += "    alert_rule_test:\n      - eval_time: 10m\n        alertname: NetwatchNotAttached\n        exp_alerts: []\n";
    let file = dir.join("test.yml");
    std::fs::write(&file, test).unwrap();
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(&file)
        .output()
        .expect("promtool (Debian package prometheus)");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        return Vec::new();
    }
    // "got:[...interface="eth1"...hook="tc_egress"...]"
    let got = text
        .split("got:")
        .nth(1)
        .unwrap_or_else(|| panic!("promtool failed:\n{text}"));
    let mut fired = Vec::new();
    for alert in got.split("Labels:").skip(1) {
        let label = |name: &str| {
            alert
                .split(&format!("{name}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        fired.push(format!("{}/{}", label("interface"), label("hook")));
    }
    assert!(!fired.is_empty(), "promtool failed:\n{text}");
    fired
}

/// The README's two set-ups, exported by the real binary: a router (XDP
/// on wan and lan, no egress) has no tc_egress series at all, an
/// IIS-style host (XDP + egress) has both hooks; NetwatchNotAttached is
/// silent on both while everything is attached. An interface dropped
/// from the configuration is forgotten at the next start, the counters
/// of the others continue.
#[test]
fn metrics_export_only_configured_hooks_and_interfaces() {
    require_privileged!();
    let RouterLab {
        inside,
        router,
        internet: _internet,
    } = RouterLab::new();
    let pins = pin_dir();
    let nw = Netwatch::start(&router, &pins, &["--iface", "nw-wan:wan", "--iface", "nw-lan:lan"]);
    assert_eq!(send_udp(&inside, "198.18.1.9:137", 5), 5);
    let text = nw.metrics(&router);
    for iface in ["nw-wan", "nw-lan"] {
        assert_eq!(
            sample(
                &text,
                "netwatch_interface_attached",
                &[("interface", iface), ("hook", "xdp")]
            ),
            1.0
        );
    }
    assert!(
        absent(&text, "netwatch_interface_attached", &[("hook", "tc_egress")]),
        "a tc_egress series without --egress:\n{text}"
    );
    assert_eq!(not_attached_alerts(&text), Vec::<String>::new());
    let wan_before = sample(&text, "netwatch_unmatched_packets_total", &[("interface", "nw-wan")]);
    assert!(sample(&text, "netwatch_packets_total", &[("interface", "nw-lan")]) >= 5.0);
    nw.stop_and_keep_pins();

    // nw-lan dropped from the configuration: no series of it any more,
    // nw-wan's counters continue.
    let nw = Netwatch::start(&router, &pins, &["--iface", "nw-wan:wan"]);
    let text = nw.metrics(&router);
    assert!(
        !text.contains("nw-lan"),
        "a removed interface is still exported:\n{text}"
    );
    assert!(sample(&text, "netwatch_unmatched_packets_total", &[("interface", "nw-wan")]) >= wan_before);
    assert_eq!(not_attached_alerts(&text), Vec::<String>::new());
    drop(nw);

    // IIS-shaped: XDP and TC egress on the same interface.
    let lab = Lab::new();
    let nw = Netwatch::start(
        &lab.victim,
        &pin_dir(),
        &["--iface", &format!("{VICTIM_IF}:host"), "--egress", VICTIM_IF],
    );
    let text = nw.metrics(&lab.victim);
    for hook in ["xdp", "tc_egress"] {
        assert_eq!(
            sample(
                &text,
                "netwatch_interface_attached",
                &[("interface", VICTIM_IF), ("hook", hook)]
            ),
            1.0
        );
    }
    assert_eq!(not_attached_alerts(&text), Vec::<String>::new());
    // The check does see a detached hook.
    let detached = text
        .replace(
            &format!("hook=\"tc_egress\",interface=\"{VICTIM_IF}\",mode=\"tcx\",role=\"host\"}} 1"),
            &format!("hook=\"tc_egress\",interface=\"{VICTIM_IF}\",mode=\"tcx\",role=\"host\"}} 0"),
        )
        .replace(
            &format!("hook=\"tc_egress\",interface=\"{VICTIM_IF}\",mode=\"netlink\",role=\"host\"}} 1"),
            &format!("hook=\"tc_egress\",interface=\"{VICTIM_IF}\",mode=\"netlink\",role=\"host\"}} 0"),
        );
    assert_eq!(not_attached_alerts(&detached), vec![format!("{VICTIM_IF}/tc_egress")]);
}

/// `netwatch ARGS` as the unprivileged user nobody (setpriv).
fn netwatch_as_nobody(args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(netwatch_tests::daemon::bin())
        .args(args)
        .output()
        .expect("setpriv (util-linux)")
}

/// Fails, exit status non-zero, with an error that names `path` (and
/// says `why`); never an empty answer.
fn assert_refused(out: &std::process::Output, path: &std::path::Path, why: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "exit 0 where {} is unreadable ({why}):\n{}{stderr}",
        path.display(),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains(path.to_str().unwrap()) && stderr.contains(why),
        "the error does not name {} and {why:?}:\n{stderr}",
        path.display()
    );
}

/// `lookup` and `incidents` never take an unreadable state for an empty
/// one: a database or pin directory the user may not read, a state
/// directory or database that does not exist, a file that is not an
/// incident database, each give an error naming the path, exit non-zero.
#[test]
fn unreadable_state_is_an_error_naming_the_path() {
    require_privileged!();
    use std::os::unix::fs::PermissionsExt as _;
    let dir = TempDir::new("unreadable");
    std::fs::set_permissions(&*dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let no_pins = dir.join("no-pins");
    let no_pins = no_pins.to_str().unwrap();
    // A state directory as `run` makes it (0700, root), with a database.
    let state = dir.join("state");
    std::fs::create_dir(&state).unwrap();
    let db = state.join("incidents.sqlite");
    assert!(
        Command::new("sqlite3")
            .arg(&db)
            .arg("CREATE TABLE t (x);")
            .status()
            .map(|s| s.success())
            .unwrap_or_else(|_| {
                std::fs::write(&db, b"").unwrap();
                true
            })
    );
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let s = state.to_str().unwrap();

    // Permission: as a user other than root.
    let out = netwatch_as_nobody(&["lookup", "198.18.0.1", "--pin-dir", no_pins, "--state-dir", s]);
    assert_refused(&out, &db, "permission denied");
    let out = netwatch_as_nobody(&["incidents", "--state-dir", s]);
    assert_refused(&out, &db, "permission denied");
    // A pin directory the user may not read (root-only, as netwatch makes
    // it): an error, not "tracked now: nothing".
    let pins = dir.join("pins");
    std::fs::create_dir(&pins).unwrap();
    std::fs::set_permissions(&pins, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = netwatch_as_nobody(&[
        "lookup",
        "198.18.0.1",
        "--pin-dir",
        pins.to_str().unwrap(),
        "--state-dir",
        s,
    ]);
    assert_refused(&out, &pins, "permission denied");

    // Missing: a state directory that does not exist, one without a
    // database.
    let gone = dir.join("gone");
    let out = netwatch(&[
        "lookup",
        "198.18.0.1",
        "--pin-dir",
        no_pins,
        "--state-dir",
        gone.to_str().unwrap(),
    ]);
    assert_refused(&out, &gone, "does not exist");
    let out = netwatch(&["incidents", "--state-dir", gone.to_str().unwrap()]);
    assert_refused(&out, &gone, "does not exist");
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = netwatch(&["incidents", "--state-dir", empty.to_str().unwrap()]);
    assert_refused(&out, &empty.join("incidents.sqlite"), "no incident database");

    // Foreign layout: a file that is not netwatch's database.
    let foreign = dir.join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("incidents.sqlite"), vec![0x5a; 4096]).unwrap();
    let out = netwatch(&[
        "lookup",
        "198.18.0.1",
        "--pin-dir",
        no_pins,
        "--state-dir",
        foreign.to_str().unwrap(),
    ]);
    assert_refused(&out, &foreign.join("incidents.sqlite"), "reading incidents from");
    let out = netwatch(&["incidents", "--state-dir", foreign.to_str().unwrap()]);
    assert_refused(&out, &foreign.join("incidents.sqlite"), "reading incidents from");
}

/// 1 000 idle connections to the endpoint (connected, never a request)
/// neither exhaust the controller's descriptors nor stop `/metrics`: it
/// keeps answering while they are open, the controller holds at most
/// its connection cap, and the idle ones are closed after the header
/// timeout. Prints `/metrics` latency with them open.
#[test]
fn idle_connections_do_not_starve_metrics() {
    require_privileged!();
    // Room for 1 000 sockets in this process.
    let limit = libc::rlimit {
        rlim_cur: 8192,
        rlim_max: 8192,
    };
    // SAFETY: plain setrlimit on this process.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    let lab = Lab::new();
    let nw = Netwatch::start(&lab.victim, &pin_dir(), &["--iface", &format!("{VICTIM_IF}:host")]);
    let fds = |pid: i32| std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let fds_before = fds(nw.pid());
    let started = Instant::now();
    let idle: Vec<std::net::TcpStream> = lab.victim.run(|| {
        (0..1000)
            .map(|_| std::net::TcpStream::connect(METRICS_ADDR).expect("connect"))
            .collect()
    });
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let body = lab
            .victim
            .run(|| netwatch_tests::daemon::http_get(METRICS_ADDR, "/metrics"))
            .unwrap_or_else(|e| panic!("/metrics with 1000 idle connections open: {e}\n{}", nw.log()));
        latencies.push(t.elapsed());
        assert!(body.contains("netwatch_info"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "the idle connections timed out before the scrapes were measured"
    );
    latencies.sort();
    eprintln!(
        "/metrics with 1000 idle connections open: median {:?}, max {:?} (20 scrapes)",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    let held = fds(nw.pid());
    assert!(
        held <= fds_before + 256 + 8,
        "the controller holds {held} descriptors (before: {fds_before}) with 1000 idle clients"
    );
    // After the header timeout (10 s) the idle connections it held are
    // closed: a read gets end-of-file (or a reset).
    let last = idle.last().unwrap();
    last.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 1];
    let t = Instant::now();
    let read = std::io::Read::read(&mut &*last, &mut buf);
    assert!(
        matches!(read, Ok(0) | Err(_)) && t.elapsed() < Duration::from_secs(15),
        "an idle connection stayed open: {read:?} after {:?}",
        t.elapsed()
    );
    assert!(fds(nw.pid()) <= fds_before + 8, "idle connections still held");
    drop(idle);
    drop(nw);
}

/// `run` never chmods a directory it did not create: a world-writable
/// one (`/tmp`), one of the host's (root's, 0755, like `/var/lib`) and
/// one owned by another user are refused with an error naming it, their
/// modes untouched; a directory that does not exist is created 0700.
#[test]
fn run_refuses_a_state_dir_it_does_not_own() {
    require_privileged!();
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let lab = Lab::new();
    let dir = TempDir::new("statedirs");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let cases = [
        ("tmp", 0o1777, None, "mode 1777 (world-writable)"),
        ("varlib", 0o755, None, "mode 0755"),
        ("nobody", 0o700, Some(65534), "owned by uid 65534"),
    ];
    for (name, perm, owner, why) in cases {
        let state = dir.join(name);
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(perm)).unwrap();
        if let Some(uid) = owner {
            std::os::unix::fs::chown(&state, Some(uid), Some(uid)).unwrap();
        }
        let out = lab
            .victim
            .command(netwatch_tests::daemon::bin().to_str().unwrap())
            .args(["run", "--iface", VICTIM_IF, "--pin-dir", &pin_dir(), "--state-dir"])
            .arg(&state)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "run took {name} ({perm:o}) as its state directory:\n{stderr}"
        );
        assert!(
            stderr.contains(&format!("state directory {}", state.display())) && stderr.contains(why),
            "{stderr}"
        );
        assert_eq!(mode(&state), perm, "{name}: mode changed");
        assert_eq!(std::fs::metadata(&state).unwrap().uid(), owner.unwrap_or(0));
    }
    // A directory netwatch creates (parents included) is 0700 and used.
    let fresh = dir.join("new/netwatch");
    let nw = Netwatch::start_with_state(&lab.victim, &pin_dir(), &fresh, &["--iface", VICTIM_IF]);
    assert_eq!(mode(&fresh), 0o700);
    assert_eq!(mode(&dir.join("new")), 0o755, "a parent was restricted");
    drop(nw);
}

/// One `KEY=` setting of the systemd unit (the last one wins, as in systemd).
fn unit_setting(key: &str) -> String {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/netwatch.service")).unwrap();
    unit.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the unit has no {key}="))
        .to_string()
}

/// The system calls a `SystemCallFilter=` allow-list admits, with its
/// `@groups` expanded as this machine's systemd defines them
/// (`systemd-analyze syscall-filter`).
fn syscall_allow_list(filter: &str) -> BTreeSet<String> {
    let out = Command::new("systemd-analyze")
        .arg("syscall-filter")
        .output()
        .expect("systemd-analyze (Debian package systemd; `cargo xtask setup` installs it)");
    assert_success(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    let mut groups: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut current = None;
    for line in text.lines() {
        if line.starts_with('@') {
            current = Some(line.trim().to_string());
            groups.insert(line.trim().to_string(), Vec::new());
        } else if let Some(g) = &current {
            let item = line.trim();
            if !item.is_empty() && !item.starts_with('#') {
                groups.get_mut(g).unwrap().push(item.to_string());
            }
        }
    }
    fn expand(item: &str, groups: &std::collections::BTreeMap<String, Vec<String>>, out: &mut BTreeSet<String>) {
        if item.starts_with('@') {
            for i in groups
                .get(item)
                .unwrap_or_else(|| panic!("unknown syscall group {item}"))
            {
                expand(i, groups, out);
            }
        } else {
            out.insert(item.to_string());
        }
    }
    let mut allowed = BTreeSet::new();
    assert!(!filter.starts_with('~'), "a deny-list filter: {filter}");
    for item in filter.split_whitespace() {
        expand(item, &groups, &mut allowed);
    }
    assert!(allowed.len() > 100, "{filter} expanded to {} calls", allowed.len());
    allowed
}

/// Loads a seccomp filter that admits the listed calls and fails every
/// other with EPERM (as `SystemCallErrorNumber=EPERM`), then execs the
/// rest of argv. libseccomp's Python binding (Debian python3-seccomp).
const SECCOMP_EXEC: &str = r#"
import errno, os, sys, seccomp
f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
for name in open(sys.argv[1]).read().split():
    try:
        f.add_rule(seccomp.ALLOW, name)
    except (RuntimeError, ValueError, OSError):
        pass  # not a system call on this architecture
f.load()
os.execv(sys.argv[2], sys.argv[2:])
"#;

/// The systemd unit's capability set and system call filter are enough:
/// netwatch runs, attaches, counts, serves and reloads with exactly
/// those capabilities and calls (both read from the unit file). Without
/// the unit's extra `bpf` the same filter stops it, so the filter is
/// really applied. The unit's namespace settings (ProtectSystem=, ...)
/// need systemd itself and are not applied here.
#[test]
fn runs_with_only_the_capabilities_of_the_systemd_unit() {
    require_privileged!();
    let caps: Vec<String> = unit_setting("CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert_eq!(
        unit_setting("AmbientCapabilities"),
        unit_setting("CapabilityBoundingSet")
    );
    assert_eq!(unit_setting("NoNewPrivileges"), "yes");
    assert_eq!(unit_setting("SystemCallErrorNumber"), "EPERM");
    let set = format!("-all,{}", caps.join(","));
    let allowed = syscall_allow_list(&unit_setting("SystemCallFilter"));
    assert!(allowed.contains("bpf") && !allowed.contains("mount") && !allowed.contains("perf_event_open"));
    let dir = TempDir::new("unitsec");
    let list_file = |name: &str, calls: &BTreeSet<String>| {
        let path = dir.join(name);
        std::fs::write(&path, calls.iter().cloned().collect::<Vec<_>>().join("\n")).unwrap();
        path
    };
    let unit_calls = list_file("unit-calls", &allowed);
    let mut without_bpf = allowed.clone();
    without_bpf.remove("bpf");
    let calls_without_bpf = list_file("calls-without-bpf", &without_bpf);

    let lab = Lab::new();
    let pins = format!("/sys/fs/bpf/{}", unique("cap"));
    let state = std::env::temp_dir().join(unique("capstate"));
    let log = std::env::temp_dir().join(unique("caplog"));
    let config = dir.join("netwatch.toml");
    std::fs::write(&config, "mode = \"monitor\"\n").unwrap();
    let start = |calls: &std::path::Path| Started {
        child: lab
            .victim
            .command("setpriv")
            .args(["--bounding-set", &set, "--inh-caps", "-all", "--no-new-privs", "--"])
            .args(["/usr/bin/python3", "-c", SECCOMP_EXEC])
            .arg(calls)
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
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
        pin_dirs: vec![pins.clone()],
    };

    // The control: the unit's filter without bpf(2) stops netwatch.
    let mut child = start(&calls_without_bpf);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "netwatch ran without bpf(2) in its filter:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("Operation not permitted"), "{stderr}");
    let _ = netwatch(&["detach", "--pin-dir", &pins]);

    let mut child = start(&unit_calls);
    let deadline = Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "netwatch exited with capabilities {set} and the unit's system call filter: {status}\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        if let Ok(m) = lab
            .victim
            .run(|| netwatch_user::lab::netns::http_get(METRICS_ADDR, "/metrics"))
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
    let seccomp = status.lines().find(|l| l.starts_with("Seccomp:")).unwrap().to_string();
    assert!(seccomp.ends_with('2'), "no seccomp filter in force: {seccomp}");
    let nnp = status
        .lines()
        .find(|l| l.starts_with("NoNewPrivs:"))
        .unwrap()
        .to_string();
    assert!(nnp.ends_with('1'), "{nnp}");
    assert!(metrics.contains("netwatch_interface_attached{hook=\"tc_egress\""));
    send_udp(&lab.scanner, "198.18.0.2:137", 4);
    let counted = eventually(4.0, Duration::from_secs(3), || {
        let m = lab
            .victim
            .run(|| netwatch_user::lab::netns::http_get(METRICS_ADDR, "/metrics"))
            .unwrap();
        netwatch_tests::daemon::sample(
            &m,
            "netwatch_packets_total",
            &[("rule", "udp/137"), ("direction", "inbound")],
        )
    });
    assert_eq!(counted, 4.0);
    // A reload (SIGHUP) under the filter applies the file's new mode.
    std::fs::write(&config, "mode = \"enforce\"\n").unwrap();
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let reloaded = eventually(1.0, Duration::from_secs(5), || {
        let m = lab
            .victim
            .run(|| netwatch_user::lab::netns::http_get(METRICS_ADDR, "/metrics"))
            .unwrap();
        netwatch_tests::daemon::sample(&m, "netwatch_config_reloads_total", &[("result", "success")])
    });
    assert_eq!(reloaded, 1.0, "{}", std::fs::read_to_string(&log).unwrap());
    // The link notification socket (AF_NETLINK) works under the filter.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!logged.contains("followed every"), "{logged}");
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
    assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipping: needs root"));
    let logged = std::fs::read_to_string(&log).expect("skip not logged");
    assert_eq!(logged, "operations::json_output_keeps_its_documented_schema\n");
}

#[test]
fn every_command_and_flag_has_help() {
    let out = netwatch(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("netwatch {}\n", env!("CARGO_PKG_VERSION")),
        "--version is not the crate's version"
    );
    let out = netwatch(&["--help"]);
    assert!(out.status.success());
    let top = String::from_utf8_lossy(&out.stdout).to_string();
    for cmd in [
        "run",
        "status",
        "lookup",
        "top",
        "block",
        "unblock",
        "allow",
        "disallow",
        "detach",
        "lab",
        "incidents",
        "check-config",
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
        [
            "ifindex",
            "kernel_name",
            "name",
            "role",
            "tc_egress",
            "tc_egress_mode",
            "xdp"
        ]
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
            "failed_contacts",
            "first_seen",
            "id",
            "interface",
            "last_seen",
            "packets",
            "reason",
            "recovered",
            "rule",
            "source",
        ]
    );
    assert_eq!(keys(&lookup["tracked"][0]), source_keys);
    // The HTTP API serves the same shapes.
    let api: serde_json::Value = serde_json::from_str(
        &lab.victim
            .run(|| netwatch_user::lab::netns::http_get(METRICS_ADDR, &format!("/api/lookup/{SCANNER_IP}")))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(keys(&api), keys(&lookup));
}

/// A `netwatch run` a test started: killed if still running when
/// dropped (a failed assertion), and its pin directories detached.
struct Started {
    child: std::process::Child,
    pin_dirs: Vec<String>,
}

impl std::ops::Deref for Started {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.child
    }
}

impl std::ops::DerefMut for Started {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.child
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for dir in &self.pin_dirs {
            let _ = netwatch(&["detach", "--pin-dir", dir]);
        }
    }
}

/// Reads notify datagrams until one has `want` (as a line), returning
/// every line seen on the way.
fn notified_until(sock: &std::os::unix::net::UnixDatagram, want: &str, log: &std::path::Path) -> Vec<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = sock.recv(&mut buf).unwrap_or_else(|e| {
            panic!(
                "no {want} ({e}); notified {seen:?}\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        });
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        let done = msg.lines().any(|l| l == want);
        seen.extend(msg.lines().map(String::from));
        if done {
            return seen;
        }
    }
}

/// The unit's Type=notify and WatchdogSec= as systemd sees them over
/// NOTIFY_SOCKET: READY=1 only once the programs are attached, watchdog
/// pings when WATCHDOG_USEC asks for them, RELOADING=1 (with
/// MONOTONIC_USEC) then READY=1 around a SIGHUP, STOPPING=1 on SIGTERM;
/// with `keep_attached = true` in the config the programs stay attached
/// after the stop. And a storm of SIGHUPs while it loads and attaches
/// (from the moment it makes its pin directory) does not kill it.
#[test]
fn tells_systemd_ready_reloading_stopping_and_pings_the_watchdog() {
    require_privileged!();
    use std::os::unix::{net::UnixDatagram, process::ExitStatusExt as _};

    let lab = Lab::new();
    let dir = TempDir::new("notify");
    let pins = format!("/sys/fs/bpf/{}", unique("notify"));
    // The config names another pin directory: NETWATCH_PIN_DIR wins.
    let decoy = format!("/sys/fs/bpf/{}", unique("decoy"));
    let state = dir.join("state");
    let config = dir.join("netwatch.toml");
    let write_config = |mode: &str, keep: bool| {
        std::fs::write(
            &config,
            format!(
                "mode = \"{mode}\"\ninterfaces = [\"{VICTIM_IF}:host\"]\negress = [\"{VICTIM_IF}\"]\n\
                 pin_dir = \"{decoy}\"\nstate_dir = \"{}\"\nmetrics_addr = \"{METRICS_ADDR}\"\nkeep_attached = {keep}\n",
                state.display()
            ),
        )
        .unwrap();
    };
    let log = dir.join("log");
    let start = |sock: &std::path::Path| {
        let child = lab
            .victim
            .command(netwatch_tests::daemon::bin().to_str().unwrap())
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("NOTIFY_SOCKET", sock)
            .env("NETWATCH_PIN_DIR", &pins)
            .env("WATCHDOG_USEC", "1000000")
            .env_remove("WATCHDOG_PID")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Started {
            child,
            pin_dirs: vec![pins.clone(), decoy.clone()],
        }
    };
    let link_pins = || -> Vec<String> {
        std::fs::read_dir(format!("{pins}/links"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };

    // 1. SIGHUP every millisecond from the moment netwatch makes its pin
    // directory (before it loads or attaches anything) until it is
    // ready: it must survive them all and get ready.
    write_config("monitor", false);
    let storm_sock = dir.join("storm.sock");
    let sock = UnixDatagram::bind(&storm_sock).unwrap();
    sock.set_nonblocking(true).unwrap();
    let mut child = start(&storm_sock);
    let pid = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::path::Path::new(&pins).exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{status}: {}", std::fs::read_to_string(&log).unwrap());
        }
        assert!(Instant::now() < deadline, "no pin directory");
        std::thread::sleep(Duration::from_micros(200));
    }
    let mut buf = [0u8; 4096];
    let mut sent = 0;
    loop {
        // SAFETY: kill(2) on our child (not yet reaped).
        unsafe { libc::kill(pid, libc::SIGHUP) };
        sent += 1;
        if let Some(status) = child.try_wait().unwrap() {
            assert_ne!(status.signal(), Some(libc::SIGHUP), "killed by SIGHUP number {sent}");
            panic!(
                "exited under SIGHUPs: {status}, links {:?}\n{}",
                link_pins(),
                std::fs::read_to_string(&log).unwrap()
            );
        }
        if let Ok(n) = sock.recv(&mut buf)
            && String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1")
        {
            break;
        }
        assert!(Instant::now() < deadline, "not ready under SIGHUPs");
        std::thread::sleep(Duration::from_millis(1));
    }
    eprintln!("ready after {sent} SIGHUPs");
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(
        child.wait().unwrap().success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(
        link_pins().is_empty(),
        "keep_attached = false, yet links stay: {:?}",
        link_pins()
    );
    let _ = netwatch(&["detach", "--pin-dir", &pins]);
    drop(sock);

    // 2. The protocol, step by step.
    write_config("monitor", true);
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut child = start(&sock_path);
    let pid = child.id() as i32;
    let seen = notified_until(&sock, "READY=1", &log);
    assert!(
        !seen.iter().any(|l| l == "RELOADING=1" || l == "STOPPING=1"),
        "{seen:?}"
    );
    let links = link_pins();
    assert!(
        links.iter().any(|l| l.starts_with("xdp_")) && links.iter().any(|l| l.starts_with("tc_")),
        "READY=1 before the programs were attached: links {links:?}"
    );
    let started = Instant::now();
    notified_until(&sock, "WATCHDOG=1", &log);
    notified_until(&sock, "WATCHDOG=1", &log);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "two watchdog pings took {:?} for WATCHDOG_USEC=1 s",
        started.elapsed()
    );

    write_config("enforce", true);
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let seen = notified_until(&sock, "RELOADING=1", &log);
    let reloading = seen.iter().position(|l| l == "RELOADING=1").unwrap();
    let after = notified_until(&sock, "READY=1", &log);
    let usec = seen[reloading..]
        .iter()
        .chain(&after)
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("RELOADING=1 without MONOTONIC_USEC");
    assert!(usec.parse::<u64>().unwrap() > 0);
    assert!(!after.iter().any(|l| l == "STOPPING=1"), "{after:?}");
    let status = netwatch(&["status", "--json", "--pin-dir", &pins]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["mode"], "enforce", "the reload did not apply");

    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    notified_until(&sock, "STOPPING=1", &log);
    assert!(
        child.wait().unwrap().success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("leaving programs attached"), "{log_text}");
    assert!(!link_pins().is_empty(), "keep_attached = true, yet the links are gone");
    let out = netwatch(&["detach", "--pin-dir", &pins]);
    assert_success(&out);
    assert!(link_pins().is_empty());
    assert!(
        !std::path::Path::new(&decoy).exists(),
        "run used the config's pin_dir over NETWATCH_PIN_DIR"
    );
}

/// `check-config` validates what `run` would, attaches nothing, and
/// names the setting (and for syntax the line) of what is wrong.
#[test]
fn check_config_names_the_setting_and_the_line() {
    require_privileged!();
    let lab = Lab::new();
    let dir = TempDir::new("check");
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let check = |args: &[&str]| {
        let out = lab
            .victim
            .command(netwatch_tests::daemon::bin().to_str().unwrap())
            .args(args)
            .env_remove("NETWATCH_PIN_DIR")
            .env_remove("NETWATCH_STATE_DIR")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let pins = format!("/sys/fs/bpf/{}", unique("check"));
    let good = file(
        "good.toml",
        &format!("mode = \"enforce\"\ninterfaces = [\"{VICTIM_IF}:wan\"]\npin_dir = \"{pins}\"\n"),
    );
    let (ok, out) = check(&["check-config", "--config", &good]);
    assert!(ok, "{out}");
    assert!(
        out.contains("OK") && out.contains(&format!("{VICTIM_IF}:wan")) && out.contains("enforce"),
        "{out}"
    );
    assert!(
        !std::path::Path::new(&pins).exists(),
        "check-config made the pin directory"
    );

    let cases: Vec<(String, Vec<&str>, &str)> = vec![
        (
            file("syntax.toml", "mode = \"monitor\"\ninterfaces = [\"a\"\n"),
            vec![],
            "line 2",
        ),
        (
            file(
                "port.toml",
                &format!("interfaces = [\"{VICTIM_IF}\"]\n[[rule]]\nprotocol = \"udp\"\nport = 70000\n"),
            ),
            vec![],
            "rule[0] (udp/70000)",
        ),
        (
            file("key.toml", "interface = [\"eth0\"]\n"),
            vec![],
            "unknown field `interface`",
        ),
        (
            file("none.toml", "mode = \"monitor\"\n"),
            vec![],
            "no interface to attach to",
        ),
        (
            file("absent.toml", "interfaces = [\"nw-absent0:wan\"]\n"),
            vec![],
            "interfaces: \"nw-absent0\": interface \"nw-absent0\" does not exist",
        ),
        (
            file("egress.toml", "egress = [\"nw-absent1\"]\n"),
            vec![],
            "egress: \"nw-absent1\"",
        ),
        (
            dir.join("missing.toml").to_str().unwrap().to_string(),
            vec![],
            "missing.toml",
        ),
    ];
    for (path, extra, want) in &cases {
        let mut args = vec!["check-config", "--config", path.as_str()];
        args.extend(extra);
        let (ok, out) = check(&args);
        assert!(!ok, "check-config accepted {path}: {out}");
        assert!(out.contains(want), "{path}: wanted {want:?} in: {out}");
    }
    // --offline skips only the checks against this namespace.
    let (ok, out) = check(&["check-config", "--offline", "--config", &cases[4].0]);
    assert!(ok && out.contains("--offline"), "{out}");
    let (ok, out) = check(&["check-config", "--offline", "--config", &cases[1].0]);
    assert!(!ok && out.contains("rule[0]"), "{out}");
}
