//! `cargo xtask charts`: the dashboard's main panels as PNG charts for the
//! README, drawn from the dashboard's own PromQL queries run against a
//! real Prometheus that scraped a real `netwatch run` carrying real
//! traffic (a scanner, an IIS-style web host, an outbound sweep).

use std::{
    net::{TcpListener, UdpSocket},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use netwatch_tests::{
    daemon::Netwatch,
    dashboard::{dashboard, repo},
    lab::*,
    prometheus::{PROM_ADDR, start_prometheus},
    unique,
};
use plotters::prelude::*;

/// The panels drawn, by title prefix.
const PANELS: [&str; 4] = [
    "Packets by rule",
    "Dropped vs passed",
    "Scanners flagged",
    "Reverse lookups",
];

fn main() {
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(
            std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
                .expect("fonts-dejavu-core")
                .into_boxed_slice(),
        ),
    )
    .map_err(|_| "font")
    .unwrap();
    let out_dir = repo().join("docs/img");
    std::fs::create_dir_all(&out_dir).unwrap();

    println!("==> lab: scanner + IIS-style web host running netwatch (enforce), Prometheus scraping every second");
    let lab = Lab::new();
    let nw = Netwatch::start(
        &lab.victim,
        &format!("/sys/fs/bpf/{}", unique("ch")),
        &[
            "--iface",
            &format!("{VICTIM_IF}:host"),
            "--egress",
            VICTIM_IF,
            "--mode",
            "enforce",
        ],
    );
    let _prom = start_prometheus(&lab.victim);
    for i in 100..120 {
        lab.scanner
            .ip(&["addr", "add", &format!("198.18.0.{i}/24"), "dev", SCANNER_IF]);
    }
    lab.scanner.local_range("198.18.2.0/24");
    lab.victim.ip(&["route", "add", "198.18.2.0/24", "via", SCANNER_IP]);
    let start = SystemTime::now();

    // 70 s of traffic in phases, bounded in count and time.
    let begin = Instant::now();
    let at = |secs: u64| {
        let t = Duration::from_secs(secs);
        while begin.elapsed() < t {
            send_udp(&lab.scanner, "198.18.0.2:53", 10);
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    at(8);
    println!("==> t=8s  nbtscan sweeps 198.18.1.0/24 (udp/137)");
    let _ = lab.nbtscan(TARGET_RANGE);
    at(20);
    println!("==> t=20s 20 visitors browse the web host, which looks each one up on udp/137");
    visits(&lab, 20);
    at(32);
    println!("==> t=32s nmap probes 198.18.1.0/27 on tcp/5190");
    let _ = lab
        .scanner
        .command("nmap")
        .args(["-n", "-Pn", "-sT", "-p", "5190", "198.18.1.0/27"])
        .output();
    at(44);
    println!("==> t=44s the web host itself sweeps 30 addresses that never visited (outbound scan)");
    lab.victim.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for i in 1..=30 {
            let _ = s.send_to(b"nb", format!("198.18.2.{i}:137"));
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    at(56);
    println!("==> t=56s a second nbtscan sweep");
    let _ = lab.nbtscan("198.18.1.0/25");
    at(70);
    let end = SystemTime::now();

    let d = dashboard();
    for panel in d["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        if !PANELS.iter().any(|p| title.starts_with(p)) {
            continue;
        }
        let mut series = Vec::new();
        for target in panel["targets"].as_array().unwrap() {
            let expr =
                netwatch_tests::dashboard::substitute(target["expr"].as_str().unwrap()).replace("[30s]", "[10s]");
            let legend = target["legendFormat"].as_str().unwrap_or("");
            series.extend(query_range(&lab, &expr, legend, start, end));
        }
        let file = out_dir.join(format!("{}.png", slug(title)));
        draw(
            &file,
            title,
            panel["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or(""),
            &series,
        );
        println!(
            "==> {} ({} series)",
            file.strip_prefix(repo()).unwrap().display(),
            series.len()
        );
    }
    drop(nw);
}

fn slug(title: &str) -> String {
    title
        .to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

/// The IIS-like web host: every visitor is looked up on its udp/137.
fn visits(lab: &Lab, n: u8) {
    let (listener, lookup) = lab.victim.run(|| {
        (
            TcpListener::bind("198.18.0.2:80").unwrap(),
            UdpSocket::bind("198.18.0.2:0").unwrap(),
        )
    });
    let server = std::thread::spawn(move || {
        for _ in 0..n {
            let (conn, peer) = listener.accept().unwrap();
            let _ = lookup.send_to(b"NBSTAT", (peer.ip(), 137));
            drop(conn);
        }
    });
    lab.scanner.run(|| {
        for i in 0..n {
            let local = std::net::Ipv4Addr::new(198, 18, 0, 100 + i);
            let _ = netwatch_user::lab::netns::tcp_connect_from(local, "198.18.0.2:80".parse().unwrap());
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    server.join().unwrap();
}

type Series = (String, Vec<(f64, f64)>);

fn query_range(lab: &Lab, expr: &str, legend: &str, start: SystemTime, end: SystemTime) -> Vec<Series> {
    let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
    let path = format!(
        "/api/v1/query_range?query={}&start={:.0}&end={:.0}&step=1",
        netwatch_tests::prometheus::encode(expr),
        secs(start),
        secs(end)
    );
    let body = lab
        .victim
        .run(|| netwatch_user::lab::netns::http_get(PROM_ADDR, &path))
        .expect("query_range");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "success", "{expr}: {v}");
    v["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let mut name = legend.to_string();
            for (k, val) in r["metric"].as_object().unwrap() {
                name = name.replace(&format!("{{{{{k}}}}}"), val.as_str().unwrap_or(""));
            }
            let points = r["values"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|p| {
                    Some((
                        p[0].as_f64()? - secs(start),
                        p[1].as_str()?.parse::<f64>().ok().filter(|x| x.is_finite())?,
                    ))
                })
                .collect();
            (name, points)
        })
        .collect()
}

fn draw(file: &Path, title: &str, unit: &str, series: &[Series]) {
    let root = BitMapBackend::new(file, (900, 380)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let x_max = series.iter().flat_map(|s| s.1.iter().map(|p| p.0)).fold(1.0, f64::max);
    let y_max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .unwrap();
    chart
        .configure_mesh()
        .x_desc("seconds into the lab run")
        .y_desc(match unit {
            "pps" => "packets per second",
            "Bps" => "bytes per second",
            "short" => "per 10 s",
            other => other,
        })
        .label_style(("sans-serif", 12))
        .draw()
        .unwrap();
    // The first query of a panel is its subject: draw it last, on top.
    for (i, (name, points)) in series.iter().enumerate().rev() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .unwrap()
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .unwrap();
    root.present().unwrap();
}
