//! `netwatch lab`: a throwaway demo in network namespaces. A protected
//! web host runs `netwatch run` in enforce mode and, like IIS, looks up
//! every visitor by NetBIOS; ten visitors come by; then an infected host
//! sweeps a /24 (local to the protected host) with nbtscan and tcp/5190
//! with nmap. The lab prints what netwatch saw and removes everything.
//!
//! Not part of the product's core: it drives the `netwatch` binary from
//! outside, as a user would, and is built with the `lab` cargo feature
//! (on by default, so `cargo xtask run` shows it). `netns` holds its
//! namespace plumbing and HTTP client, which the tests share.

pub mod netns;

use std::{
    io::Read as _,
    net::{Ipv4Addr, TcpListener, UdpSocket},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::cli::LabArgs;

const SCANNER: &str = "netwatch-lab-outside";
const HOST: &str = "netwatch-lab-host";
const PIN_DIR: &str = "/sys/fs/bpf/netwatch-lab";
const METRICS: &str = "127.0.0.1:9737";
const VISITORS: u8 = 10;

fn step(msg: &str) {
    println!("\n==> {msg}");
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

/// Runs a program inside a namespace's network stack only (bpffs and the
/// rest of the file system stay as they are).
fn in_ns(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}")).arg(program);
    cmd
}

/// Everything the lab made, undone on drop (also on error or Ctrl-C).
struct Lab {
    netwatch: Option<Child>,
    state_dir: std::path::PathBuf,
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
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

pub fn lab(args: &LabArgs) -> Result<()> {
    let exe = std::env::current_exe()?;
    let exe = exe.to_str().context("netwatch path is not UTF-8")?;
    let state_dir = std::env::temp_dir().join("netwatch-lab-state");
    // Leftovers of an interrupted lab.
    drop(Lab {
        netwatch: None,
        state_dir: state_dir.clone(),
    });
    let mut lab = Lab {
        netwatch: None,
        state_dir: state_dir.clone(),
    };

    step(
        "network: outside 198.18.0.1 (+ visitors .100-.109) <-veth-> protected web host 198.18.0.2, which owns 198.18.1.0/24",
    );
    ip(&["netns", "add", SCANNER])?;
    ip(&["netns", "add", HOST])?;
    ip(&[
        "link",
        "add",
        "lab-out0",
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
        (SCANNER, "lab-out0", "198.18.0.1/24"),
        (HOST, "lab-host0", "198.18.0.2/24"),
    ] {
        ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    for i in 0..VISITORS {
        ip(&[
            "-n",
            SCANNER,
            "addr",
            "add",
            &format!("198.18.0.{}/24", 100 + i),
            "dev",
            "lab-out0",
        ])?;
    }
    ip(&["-n", HOST, "route", "add", "local", "198.18.1.0/24", "dev", "lo"])?;
    ip(&["-n", SCANNER, "route", "add", "198.18.1.0/24", "via", "198.18.0.2"])?;

    step("protected host: netwatch run --iface lab-host0:host --egress lab-host0 --mode enforce");
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
        // The lab's pins are throwaway (it detaches on exit), also where
        // its bpffs is private (a test runs it in its own mount namespace).
        .arg("--allow-private-bpffs")
        // The lab's own settings, not a host config's (/etc/netwatch).
        .args(["--config", "/dev/null"])
        .arg("--state-dir")
        .arg(&state_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting netwatch run")?;
    lab.netwatch = Some(child);
    wait_for_metrics(&mut lab)?;

    step(&format!(
        "{VISITORS} visitors open the web site; the host looks each one up on udp/137, as IIS does"
    ));
    web_visits()?;

    step("an infected host outside sweeps 198.18.1.0/24 with nbtscan (udp/137), as Opaserv did");
    match sh(in_ns(SCANNER, "nbtscan").args(["-q", "-t", "200", "198.18.1.0/24"])) {
        Ok(_) => {}
        Err(err) => println!("    (nbtscan not run: {err:#}; `cargo xtask setup` installs it)"),
    }
    step("and probes 198.18.1.0/28 on tcp/5190 (AOL/ICQ) with nmap");
    match sh(in_ns(SCANNER, "nmap").args(["-n", "-Pn", "-sT", "-p", "5190", "--max-retries", "0", "198.18.1.0/28"])) {
        Ok(_) => {}
        Err(err) => println!("    (nmap not run: {err:#})"),
    }
    std::thread::sleep(Duration::from_millis(300));

    let pin = ["--pin-dir", PIN_DIR];
    step("netwatch status");
    print!("{}", sh(Command::new(exe).arg("status").args(pin))?);
    step("netwatch top --limit 5");
    print!("{}", sh(Command::new(exe).args(["top", "--limit", "5"]).args(pin))?);
    step("netwatch lookup 198.18.0.1   (the scanner)");
    let state = state_dir.to_str().context("state dir")?;
    print!(
        "{}",
        sh(Command::new(exe)
            .args(["lookup", "198.18.0.1", "--state-dir", state])
            .args(pin))?
    );
    step("netwatch lookup 198.18.0.2   (the web host: reverse lookups, not a scan)");
    print!(
        "{}",
        sh(Command::new(exe)
            .args(["lookup", "198.18.0.2", "--state-dir", state])
            .args(pin))?
    );
    step(&format!(
        "http://{METRICS}/metrics (inside {HOST}), non-zero netwatch_packets_total and flags:"
    ));
    let metrics = netns::run_in(HOST, || netns::http_get(METRICS, "/metrics"))??;
    for line in metrics.lines().filter(|l| {
        (l.starts_with("netwatch_packets_total")
            || l.starts_with("netwatch_scanners_flagged_total")
            || l.starts_with("netwatch_reverse_lookups_total"))
            && !l.ends_with(" 0")
    }) {
        println!("    {line}");
    }
    if args.stay {
        step(&format!(
            "the lab stays up: `ip netns exec {HOST} curl -s {METRICS}/metrics`, `netwatch status --pin-dir {PIN_DIR}`; Ctrl-C cleans up"
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
        if let Some(status) = lab.netwatch.as_mut().expect("started").try_wait()? {
            bail!("netwatch run exited: {status}");
        }
        if netns::run_in(HOST, || netns::http_get(METRICS, "/metrics"))?.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("netwatch run did not answer on {METRICS} within 15 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An IIS-like web server on the host: every accepted visitor is looked
/// up with a NetBIOS node-status request to its udp/137.
fn web_visits() -> Result<()> {
    let (listener, lookup) = netns::run_in(HOST, || -> Result<(TcpListener, UdpSocket)> {
        Ok((TcpListener::bind("198.18.0.2:80")?, UdpSocket::bind("198.18.0.2:0")?))
    })??;
    let server = std::thread::spawn(move || -> Result<()> {
        for _ in 0..VISITORS {
            let (mut conn, peer) = listener.accept()?;
            // A NetBIOS NBSTAT query for "*", the lookup IIS sends.
            let mut query = vec![0x13, 0x37, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x20, b'C', b'K'];
            query.extend(std::iter::repeat_n(b'A', 30));
            query.extend_from_slice(&[0, 0, 0x21, 0, 1]);
            lookup.send_to(&query, (peer.ip(), 137))?;
            let mut buf = [0u8; 16];
            let _ = conn.read(&mut buf);
        }
        Ok(())
    });
    netns::run_in(SCANNER, || -> Result<()> {
        for i in 0..VISITORS {
            let local = Ipv4Addr::new(198, 18, 0, 100 + i);
            drop(netns::tcp_connect_from(local, "198.18.0.2:80".parse()?)?);
        }
        Ok(())
    })??;
    server.join().expect("web server thread")
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
