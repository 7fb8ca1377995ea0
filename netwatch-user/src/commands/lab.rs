//! `netwatch lab`: a throwaway demo in network namespaces. A scanner host
//! sweeps a /24 (local to the protected host) with nbtscan and nmap; the
//! protected host runs `netwatch run` in enforce mode and makes a few
//! NetBIOS lookups of its own. Then it prints what netwatch saw and
//! removes everything it made.

use std::{
    net::UdpSocket,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{cli::LabArgs, netns};

const SCANNER: &str = "netwatch-lab-scanner";
const HOST: &str = "netwatch-lab-host";
const PIN_DIR: &str = "/sys/fs/bpf/netwatch-lab";
const METRICS: &str = "127.0.0.1:9737";

fn step(msg: &str) {
    println!("==> {msg}");
}

fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    sh(Command::new("ip").args(args))
}

/// Runs a program inside a namespace's network stack only.
fn in_ns(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}")).arg(program);
    cmd
}

/// Everything the lab made, undone on drop (also on error or Ctrl-C).
struct Lab {
    netwatch: Option<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut child) = self.netwatch.take() {
            // SAFETY: plain kill(2) on our child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        let _ = crate::datapath::detach_all(PIN_DIR.as_ref());
        for ns in [SCANNER, HOST] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

pub fn lab(args: &LabArgs) -> Result<()> {
    let exe = std::env::current_exe()?;
    let exe = exe.to_str().context("netwatch path is not UTF-8")?;
    // Leftovers of an interrupted lab.
    drop(Lab { netwatch: None });
    let mut lab = Lab { netwatch: None };

    step("making namespaces: scanner 198.18.0.1 <-veth-> protected host 198.18.0.2 (owns 198.18.1.0/24)");
    ip(&["netns", "add", SCANNER])?;
    ip(&["netns", "add", HOST])?;
    ip(&[
        "link",
        "add",
        "lab-scan0",
        "netns",
        SCANNER,
        "type",
        "veth",
        "peer",
        "name",
        "lab-host0",
        "netns",
        HOST,
    ])?;
    for (ns, dev, addr) in [
        (SCANNER, "lab-scan0", "198.18.0.1/24"),
        (HOST, "lab-host0", "198.18.0.2/24"),
    ] {
        ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    ip(&["-n", HOST, "route", "add", "local", "198.18.1.0/24", "dev", "lo"])?;
    ip(&["-n", SCANNER, "route", "add", "198.18.1.0/24", "via", "198.18.0.2"])?;

    step("starting `netwatch run --iface lab-host0:host --egress lab-host0 --mode enforce` on the protected host");
    let child = in_ns(HOST, exe)
        .args([
            "run",
            "--iface",
            "lab-host0:host",
            "--egress",
            "lab-host0",
            "--mode",
            "enforce",
        ])
        .args(["--pin-dir", PIN_DIR, "--metrics-addr", METRICS])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting netwatch run")?;
    lab.netwatch = Some(child);
    wait_for_metrics(&mut lab)?;

    step("scanner: nbtscan sweeps 198.18.1.0/24 on udp/137 (a worm-style NetBIOS sweep)");
    match sh(in_ns(SCANNER, "nbtscan").args(["-q", "-t", "200", "198.18.1.0/24"])) {
        Ok(_) => {}
        Err(err) => println!("    (nbtscan not run: {err:#}; `cargo xtask setup` installs it)"),
    }
    step("scanner: nmap connect scan of 198.18.1.0/28 on tcp/5190 (AOL/ICQ)");
    match sh(in_ns(SCANNER, "nmap").args(["-n", "-Pn", "-sT", "-p", "5190", "--max-retries", "0", "198.18.1.0/28"])) {
        Ok(_) => {}
        Err(err) => println!("    (nmap not run: {err:#})"),
    }
    step("protected host: 8 outbound NetBIOS lookups to 198.18.0.1 (stopped by TC egress)");
    send_from_ns(HOST, "198.18.0.1:137", 8)?;
    std::thread::sleep(Duration::from_millis(200));

    step("what netwatch saw (`netwatch status`):");
    print!("{}", sh(Command::new(exe).args(["status", "--pin-dir", PIN_DIR]))?);
    step(&format!(
        "a few lines of http://{METRICS}/metrics (inside the host namespace):"
    ));
    let metrics = scrape()?;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("netwatch_packets_total") && !l.ends_with(" 0"))
    {
        println!("    {line}");
    }
    if args.stay {
        step(&format!(
            "lab stays up; try `ip netns exec {HOST} curl -s {METRICS}/metrics` or `netwatch status --pin-dir {PIN_DIR}`; Ctrl-C to clean up"
        ));
        wait_for_ctrl_c();
    }
    step("cleaning up: stopping netwatch, detaching, removing the namespaces");
    drop(lab);
    Ok(())
}

fn wait_for_metrics(lab: &mut Lab) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = lab.netwatch.as_mut().unwrap().try_wait()? {
            bail!("netwatch run exited: {status}");
        }
        if scrape().is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("netwatch run did not answer on {METRICS} within 15 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn send_from_ns(ns: &str, dst: &str, count: usize) -> Result<()> {
    let dst: std::net::SocketAddr = dst.parse()?;
    netns::run_in(ns, || -> Result<()> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        for _ in 0..count {
            socket.send_to(b"lab", dst)?;
        }
        Ok(())
    })?
}

fn scrape() -> Result<String> {
    Ok(netns::run_in(HOST, || netns::http_get(METRICS, "/metrics"))??)
}

fn wait_for_ctrl_c() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
    });
}
