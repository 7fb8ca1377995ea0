//! The real `netwatch` binary, run inside a test namespace.

pub use netwatch_user::lab::netns::http_get;
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::netns::Netns;

pub const METRICS_ADDR: &str = "127.0.0.1:9737";

/// Path of the binary under test: `NETWATCH_BIN` (set by `cargo xtask
/// test`), else the debug build next to the test executable.
pub fn bin() -> PathBuf {
    if let Ok(path) = std::env::var("NETWATCH_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join("netwatch");
    assert!(
        path.exists(),
        "{} missing: build it with `cargo build --bin netwatch` or run `cargo xtask test`",
        path.display()
    );
    path
}

/// Runs `netwatch ARGS` to completion (outside any namespace).
pub fn netwatch(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("run netwatch")
}

/// A `netwatch run` in a namespace; stopped and detached when dropped.
pub struct Netwatch {
    child: Option<Child>,
    ns_name: String,
    pub pin_dir: String,
    /// The incident database's directory.
    pub state_dir: PathBuf,
    /// Whether `start` made the state directory (and removes it).
    owns_state: bool,
    /// Whether dropping removes the pins (`netwatch detach`).
    detach_on_drop: bool,
    log: PathBuf,
}

impl Netwatch {
    /// Starts `netwatch run ARGS` in `ns` with its own pin directory and
    /// waits until `/metrics` answers.
    pub fn start(ns: &Netns, pin_dir: &str, args: &[&str]) -> Self {
        let state_dir = std::env::temp_dir().join(crate::unique("state"));
        let mut nw = Self::start_with_state(ns, pin_dir, &state_dir, args);
        nw.owns_state = true;
        nw
    }

    /// Like [`Netwatch::start`], with a given state directory (to restart
    /// on the same incident database).
    pub fn start_with_state(ns: &Netns, pin_dir: &str, state_dir: &Path, args: &[&str]) -> Self {
        let log = std::env::temp_dir().join(format!("{}.log", crate::unique("log")));
        let file = std::fs::File::create(&log).expect("log file");
        let child = ns
            .command(bin().to_str().unwrap())
            .args(["run", "--pin-dir", pin_dir, "--metrics-addr", METRICS_ADDR])
            .arg("--state-dir")
            .arg(state_dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn netwatch run");
        let mut nw = Netwatch {
            child: Some(child),
            ns_name: ns.name.clone(),
            pin_dir: pin_dir.to_string(),
            state_dir: state_dir.to_path_buf(),
            owns_state: false,
            detach_on_drop: true,
            log,
        };
        nw.wait_ready(ns);
        nw
    }

    fn wait_ready(&mut self, ns: &Netns) {
        let deadline = Instant::now() + crate::patience(Duration::from_secs(20));
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("netwatch run exited early ({status}):\n{}", self.log());
            }
            if ns.run(|| http_get(METRICS_ADDR, "/metrics")).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "netwatch run did not serve /metrics in time:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + crate::patience(Duration::from_secs(10));
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("netwatch run ignored SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `netwatch lookup IP --json` against this run's pins and database.
    pub fn lookup(&self, ip: &str) -> serde_json::Value {
        let out = netwatch(&[
            "lookup",
            ip,
            "--json",
            "--pin-dir",
            &self.pin_dir,
            "--state-dir",
            self.state_dir.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "lookup {ip}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("lookup JSON")
    }

    /// `netwatch ARGS --pin-dir PINS`, which must succeed; its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(bin())
            .args(args)
            .args(["--pin-dir", &self.pin_dir])
            .output()
            .expect("run netwatch");
        assert!(
            out.status.success(),
            "netwatch {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `netwatch status --json` of this run's pins.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.cli(&["status", "--json"])).expect("status JSON")
    }

    /// Waits until `ip` has at least one incident; returns the lookup.
    pub fn wait_for_incident(&self, ip: &str) -> serde_json::Value {
        let deadline = Instant::now() + crate::patience(Duration::from_secs(5));
        loop {
            let report = self.lookup(ip);
            if !report["incidents"].as_array().unwrap().is_empty() {
                return report;
            }
            assert!(
                Instant::now() < deadline,
                "no incident for {ip}:\n{report:#}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, and leave the pins (links included) for a restart.
    pub fn kill_and_keep_pins(mut self) {
        self.signal(libc::SIGKILL);
        let mut child = self.child.take().expect("running");
        let _ = child.wait();
        self.detach_on_drop = false;
    }

    /// SIGTERM, a clean exit, and leave the pins for a restart.
    pub fn stop_and_keep_pins(mut self) {
        assert!(self.stop().success(), "unclean exit:\n{}", self.log());
        self.detach_on_drop = false;
    }

    pub fn metrics(&self, ns: &Netns) -> String {
        assert_eq!(ns.name, self.ns_name);
        ns.run(|| http_get(METRICS_ADDR, "/metrics")).expect("GET /metrics")
    }
}

impl Drop for Netwatch {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.detach_on_drop {
            // In the namespace of the interfaces (netlink TC filters are
            // found there), or outside if it is gone.
            let inside = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.ns_name))
                .arg(bin())
                .args(["detach", "--pin-dir", &self.pin_dir])
                .output();
            if !inside.is_ok_and(|o| o.status.success()) {
                let _ = netwatch(&["detach", "--pin-dir", &self.pin_dir]);
            }
        }
        let _ = std::fs::remove_file(&self.log);
        if self.owns_state {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
    }
}

/// One HTTP/1.0 request to the controller's endpoint from inside `ns`:
/// the status code and the body, whatever the status.
pub fn http(ns: &Netns, method: &str, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    ns.run(|| {
        let mut s = std::net::TcpStream::connect(METRICS_ADDR).expect("connect to the endpoint");
        s.set_read_timeout(Some(crate::patience(Duration::from_secs(10))))
            .unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: {METRICS_ADDR}\r\nContent-Length: 0\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).expect("read the response");
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {head:?}"));
        (code, body.to_string())
    })
}

/// The labels of one exposition line's series, parsed (`k="v",...`,
/// with the format's escapes).
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some((key, tail)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = tail.char_indices();
        let mut end = tail.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => break,
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key.trim_start_matches(',').trim().to_string(), value));
        rest = &tail[end..];
    }
    out
}

/// The values of every series `name{...}` of a text exposition whose
/// labels include all of `labels` (others may be present).
pub fn series(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let have = parse_labels(rest);
            labels
                .iter()
                .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
                .then(|| value.parse::<f64>().ok())?
        })
        .collect()
}

/// The sum of the series `name{labels}` (see [`series`]), or `None` when
/// no series matches.
pub fn try_sample(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let values = series(exposition, name, labels);
    (!values.is_empty()).then(|| values.iter().sum())
}

/// The sum of the series `name{labels}` (see [`series`]). A series that
/// is not there fails the test: a metric that vanished is not a 0. Where
/// absence is what a test asserts, use [`absent`]; where a series only
/// appears later (a gauge counted in the background), [`try_sample`].
pub fn sample(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    try_sample(exposition, name, labels).unwrap_or_else(|| {
        let same_name: Vec<&str> = exposition
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .collect();
        panic!(
            "no series {name} with labels {labels:?} in the exposition; series of that name:\n{}",
            same_name.join("\n")
        )
    })
}

/// Whether no series `name{labels}` is in the exposition.
pub fn absent(exposition: &str, name: &str, labels: &[(&str, &str)]) -> bool {
    series(exposition, name, labels).is_empty()
}

/// Resident memory of a process, in MiB.
pub fn rss_mib(pid: i32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPOSITION: &str = "# HELP a_total help\n# TYPE a_total counter\n\
        a_total{interface=\"nw0\",direction=\"inbound\"} 3\n\
        a_total{interface=\"nw0\",direction=\"outbound\"} 4\n\
        a_total{xinterface=\"nw1\",direction=\"inbound\"} 100\n\
        b 1\n\
        c{reason=\"a \\\"quoted\\\" one, with a comma\"} 7\n";

    #[test]
    fn samples_are_summed_over_matching_series_only() {
        assert_eq!(sample(EXPOSITION, "a_total", &[("interface", "nw0")]), 7.0);
        assert_eq!(
            sample(
                EXPOSITION,
                "a_total",
                &[("interface", "nw0"), ("direction", "outbound")]
            ),
            4.0
        );
        // A label is matched by name, not as a substring of another.
        assert_eq!(try_sample(EXPOSITION, "a_total", &[("interface", "nw1")]), None);
        assert_eq!(sample(EXPOSITION, "b", &[]), 1.0);
        assert_eq!(
            sample(EXPOSITION, "c", &[("reason", "a \"quoted\" one, with a comma")]),
            7.0
        );
        assert!(absent(EXPOSITION, "a", &[]));
    }

    #[test]
    #[should_panic(expected = "no series a_total with labels")]
    fn an_absent_series_is_not_a_zero() {
        sample(EXPOSITION, "a_total", &[("interface", "nw9")]);
    }
}
