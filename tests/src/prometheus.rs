//! A real Prometheus (Debian's `prometheus`) in a test namespace, scraping
//! `netwatch run`, and its HTTP query API.

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::{daemon::METRICS_ADDR, dashboard::repo, netns::Netns, unique};

pub struct Prometheus {
    child: Child,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub const PROM_ADDR: &str = "127.0.0.1:9090";

pub fn start_prometheus(ns: &Netns) -> Prometheus {
    let dir = std::env::temp_dir().join(unique("prom"));
    std::fs::create_dir_all(&dir).unwrap();
    let rules = repo().join("deploy/prometheus/netwatch.rules.yml");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: netwatch\n    static_configs:\n      - targets: ['{METRICS_ADDR}']\n",
            rules.display()
        ),
    )
    .unwrap();
    let child = ns
        .command("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={PROM_ADDR}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("log")).unwrap())
        .spawn()
        .expect("prometheus (Debian package prometheus)");
    let prom = Prometheus { child, dir };
    let deadline = Instant::now() + crate::patience(Duration::from_secs(30));
    while ns
        .run(|| netwatch_user::lab::netns::http_get(PROM_ADDR, "/-/ready"))
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "prometheus not ready:\n{}",
            std::fs::read_to_string(prom.dir.join("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    prom
}

pub fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub fn query(ns: &Netns, q: &str) -> serde_json::Value {
    let body = ns
        .run(|| netwatch_user::lab::netns::http_get(PROM_ADDR, &format!("/api/v1/query?query={}", encode(q))))
        .unwrap_or_else(|e| panic!("query {q:?} failed: {e}"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "success", "{q}: {v}");
    v
}

/// `promtool check metrics` accepts `exposition` without a complaint.
pub fn promtool_accepts(exposition: &str) {
    use std::io::Write as _;
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    promtool.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics: {report}"
    );
}
