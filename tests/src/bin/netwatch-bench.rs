//! `cargo xtask bench [--quick]`: see tests/src/bench.

use netwatch_tests::bench::{Size, cost, flood, scale};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let size = if quick { Size::quick() } else { Size::full() };
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let want = |part: &str| only.is_empty() || only.iter().any(|o| o == part);
    println!(
        "# netwatch benchmarks{}\n",
        if quick {
            " (--quick: small sizes, figures are rough)"
        } else {
            ""
        }
    );
    println!(
        "kernel {}, {} CPUs, {size:?}\n",
        uname(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    if want("cost") {
        println!(
            "## 1. Per-packet cost (BPF_PROG_TEST_RUN, median of {} rounds of {} runs)\n",
            size.rounds, size.repeat
        );
        cost::print(&cost::run(size));
        println!();
    }
    if want("flood") {
        println!(
            "## 2. Flood on veth (live-frames generator on the same core, {} frames, median of {})\n",
            size.flood_frames, size.rounds
        );
        flood::print(&flood::run(size));
        println!();
    }
    if want("scale") {
        println!("## 3-4. Controller at {} sources, time to flag\n", size.sources);
        scale::print(&scale::run(size));
        println!();
    }
}

fn uname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}
