//! Parts 3 and 4: the controller with the per-source map full (kernel
//! map memory, resident memory, `/metrics` and `top` latency, CPU at idle
//! and under a flood of new sources), and time to flag a scanner.

use std::{
    net::{Ipv4Addr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use super::{
    Size,
    flood::{DUT_IF, GEN_IF, Rig},
    median, ms, sh,
};
use crate::daemon::{METRICS_ADDR, Netwatch, netwatch, rss_mib, sample, try_sample};

pub struct Report {
    pub sources: u32,
    pub tracked: f64,
    pub sources_map_mib: f64,
    pub all_maps_mib: f64,
    pub rss_mib: f64,
    pub metrics_ms: f64,
    pub baseline_metrics_ms: f64,
    pub top_ms: f64,
    pub lookup_ms: f64,
    pub cpu_idle_pct: f64,
    pub cpu_flood_pct: f64,
    pub flood_mpps: f64,
    pub flag_probes: u32,
    pub flag_event_ms: f64,
    pub flag_lookup_ms: f64,
}

fn memlock_bytes(pin: &str) -> f64 {
    let v: serde_json::Value =
        serde_json::from_str(&sh(Command::new("bpftool").args(["-j", "map", "show", "pinned", pin]))).unwrap();
    v["bytes_memlock"].as_f64().unwrap_or(0.0)
}

/// CPU seconds (user + system) the process has used.
fn cpu_secs(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split_whitespace().collect();
    // SAFETY: sysconf without side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / hz
}

fn cpu_percent(pid: i32, over: Duration, during: impl FnOnce()) -> f64 {
    let start = cpu_secs(pid);
    let t = Instant::now();
    during();
    let rest = over.saturating_sub(t.elapsed());
    std::thread::sleep(rest);
    (cpu_secs(pid) - start) / t.elapsed().as_secs_f64() * 100.0
}

fn scrape_ms(rig: &Rig, n: usize) -> f64 {
    median(
        (0..n)
            .map(|_| {
                let t = Instant::now();
                rig.dut
                    .run(|| netwatch_user::lab::netns::http_get(METRICS_ADDR, "/metrics"))
                    .expect("scrape");
                ms(t.elapsed())
            })
            .collect(),
    )
}

pub fn run(size: Size) -> Report {
    let mut rig = Rig::new();
    let pins = format!("/sys/fs/bpf/{}", crate::unique("sc"));
    let mut nw = Netwatch::start(&rig.dut, &pins, &["--iface", DUT_IF, "--mode", "monitor"]);
    let pid = nw.pid();
    let baseline_metrics_ms = scrape_ms(&rig, 20);

    // Fill: every frame from a new source address (2001:db8:1::/96).
    rig.bench.set_sources(size.sources, 0);
    rig.bench.flood(&rig.gen_ns, GEN_IF, &rig.probe6, size.sources);
    let m = nw.metrics(&rig.dut);
    let created = sample(&m, "netwatch_sources_created_total", &[]);
    // The background count runs every 30 s; wait for one after the fill.
    let deadline = Instant::now() + Duration::from_secs(70);
    let mut tracked = 0.0;
    while Instant::now() < deadline {
        // Absent until the first background count.
        tracked = try_sample(&nw.metrics(&rig.dut), "netwatch_sources_tracked", &[]).unwrap_or(0.0);
        if tracked >= created * 0.9 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let sources_map_mib = memlock_bytes(&format!("{pins}/SOURCES")) / 1048576.0;
    let all_maps_mib = netwatch_common::maps::ALL
        .iter()
        .map(|m| memlock_bytes(&format!("{pins}/{m}")))
        .sum::<f64>()
        / 1048576.0;
    let metrics_ms = scrape_ms(&rig, 20);
    let t = Instant::now();
    let out = netwatch(&["top", "--limit", "10", "--pin-dir", &pins]);
    assert!(out.status.success());
    let top_ms = ms(t.elapsed());
    let t = Instant::now();
    nw.lookup("2001:db8:1::7");
    let lookup_ms = ms(t.elapsed());
    let rss = rss_mib(pid);

    let cpu_idle_pct = cpu_percent(
        pid,
        // 65 s in the full run: two of the controller's background
        // counts of the map (every 30 s) fall in the window.
        Duration::from_secs(if size.sources > 100_000 { 65 } else { 5 }),
        || {},
    );
    // A flood of new sources (the next range of addresses) while measuring.
    rig.bench.set_sources(size.sources, 0x1000_0000);
    let mut flood_mpps = 0.0;
    let cpu_flood_pct = cpu_percent(pid, Duration::from_secs(5), || {
        let t = rig.bench.flood(&rig.gen_ns, GEN_IF, &rig.probe6, size.flood_frames);
        flood_mpps = size.flood_frames as f64 / t.as_secs_f64() / 1e6;
    });
    let rss_mib_after = rss_mib(pid).max(rss);
    assert!(nw.stop().success());
    drop(nw);

    // Part 4: time to flag, on a fresh controller with default thresholds.
    let pins = format!("/sys/fs/bpf/{}", crate::unique("tf"));
    let nw = Netwatch::start(&rig.dut, &pins, &["--iface", DUT_IF, "--mode", "monitor"]);
    let threshold = 20u32;
    let socket = rig.gen_ns.run(|| UdpSocket::bind("198.18.0.1:0").unwrap());
    rig.dut.ip(&["route", "add", "local", "198.18.50.0/24", "dev", "lo"]);
    rig.gen_ns.ip(&["route", "add", "198.18.50.0/24", "via", "198.18.0.2"]);
    for i in 1..threshold {
        socket
            .send_to(b"probe", (Ipv4Addr::new(198, 18, 50, i as u8), 137))
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let sent = Instant::now();
    socket
        .send_to(b"probe", (Ipv4Addr::new(198, 18, 50, threshold as u8), 137))
        .unwrap();
    let flag_lookup_ms = rig.dut.run(|| {
        loop {
            let body = netwatch_user::lab::netns::http_get(METRICS_ADDR, "/api/lookup/198.18.0.1").unwrap();
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if !v["incidents"].as_array().unwrap().is_empty() {
                break ms(sent.elapsed());
            }
            assert!(sent.elapsed() < Duration::from_secs(10), "never flagged");
        }
    });
    let m = nw.metrics(&rig.dut);
    let count = sample(&m, "netwatch_flag_event_delay_seconds_count", &[]);
    let flag_event_ms = sample(&m, "netwatch_flag_event_delay_seconds_sum", &[]) / count * 1e3;
    drop(nw);

    Report {
        sources: size.sources,
        tracked,
        sources_map_mib,
        all_maps_mib,
        rss_mib: rss_mib_after,
        metrics_ms,
        baseline_metrics_ms,
        top_ms,
        lookup_ms,
        cpu_idle_pct,
        cpu_flood_pct,
        flood_mpps,
        flag_probes: threshold,
        flag_event_ms,
        flag_lookup_ms,
    }
}

pub fn print(r: &Report) {
    println!("| measure | value | goal |");
    println!("|---|---:|---|");
    println!(
        "| distinct sources sent / tracked | {} / {:.0} | |",
        r.sources, r.tracked
    );
    println!(
        "| per-source map (kernel memory) | {:.1} MiB | < 256 MiB at 1M |",
        r.sources_map_mib
    );
    println!("| all netwatch maps | {:.1} MiB | |", r.all_maps_mib);
    println!(
        "| `netwatch run` resident memory (max seen) | {:.1} MiB | < 64 MiB |",
        r.rss_mib
    );
    println!(
        "| `/metrics` latency, map full (empty map) | {:.2} ms ({:.2} ms) | < 50 ms |",
        r.metrics_ms, r.baseline_metrics_ms
    );
    println!("| `netwatch top --limit 10` (walks the map) | {:.0} ms | |", r.top_ms);
    println!("| `netwatch lookup IP` | {:.1} ms | |", r.lookup_ms);
    println!("| controller CPU at idle | {:.2} % of a core | < 1 % |", r.cpu_idle_pct);
    println!(
        "| controller CPU during a flood of new sources ({:.1} Mpps) | {:.2} % of a core | |",
        r.flood_mpps, r.cpu_flood_pct
    );
    println!("| probes to flag (threshold) | {} | |", r.flag_probes);
    println!(
        "| kernel flag -> controller event | {:.3} ms | < 10 ms |",
        r.flag_event_ms
    );
    println!(
        "| threshold-crossing probe -> incident in `/api/lookup` | {:.1} ms | |",
        r.flag_lookup_ms
    );
}
