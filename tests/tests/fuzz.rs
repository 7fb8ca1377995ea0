//! Packet fuzzing through the real program: random and mutated frames run
//! through the XDP and TC programs that a live `netwatch run` attached,
//! each checked against the userspace reference classifier (verdict and
//! counter class), with the counters adding up and the controller staying
//! up. Seeded and reproducible: `NETWATCH_FUZZ_SEED`, `NETWATCH_FUZZ_FRAMES`
//! (`cargo xtask fuzz` runs a long one).

use std::{net::Ipv6Addr, process::Command, time::Instant};

use aya::{
    maps::{MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use aya_obj::programs::XdpAttachType;
use netwatch_common::{Class, Counter, Direction, class_counter_index, maps, rule_counter_index};
use netwatch_tests::{
    daemon::{METRICS_ADDR, Netwatch},
    frames::{Ext, Frame},
    netns::Netns,
    reference::{Counted, classify},
    require_privileged, unique,
};
use netwatch_user::{
    config::{ConfigFile, Overrides, RunConfig},
    datapath::PinnedMaps,
};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

const CONFIG: &str = r#"
mode = "enforce"
allowlist = ["198.18.7.0/24", "2001:db8:7::/48"]
blocklist = ["198.18.9.0/24", "2001:db8:9::/48"]
[[rule]]
protocol = "udp"
port = 137
threshold = 2000
[[rule]]
protocol = "tcp"
port = 5190
threshold = 2000
[[rule]]
protocol = "udp"
port = 138
inbound = "count"
outbound = "count"
threshold = 2000
[[rule]]
protocol = "tcp"
port = 445
inbound = "drop"
outbound = "count"
threshold = 2000
"#;

const IFACE: &str = "nw-fz0";

const PORTS: [u16; 8] = [137, 5190, 138, 445, 53, 80, 139, 0];

fn v4(rng: &mut StdRng) -> [u8; 4] {
    let third = *[0u8, 7, 9, 1].choose(rng).unwrap();
    [198, 18, third, rng.random()]
}

fn v6(rng: &mut StdRng) -> Ipv6Addr {
    let third = *[0u16, 7, 9, 1].choose(rng).unwrap();
    Ipv6Addr::new(0x2001, 0xdb8, third, 0, 0, 0, 0, rng.random())
}

fn port(rng: &mut StdRng) -> u16 {
    if rng.random_bool(0.8) {
        *PORTS.choose(rng).unwrap()
    } else {
        rng.random()
    }
}

/// A well-formed frame of a random shape.
fn template(rng: &mut StdRng) -> Vec<u8> {
    let tcp = rng.random_bool(0.5);
    let (sport, dport) = (port(rng), port(rng));
    let mut frame = if rng.random_bool(0.6) {
        let f = if tcp {
            Frame::tcp4(v4(rng), v4(rng), sport, dport)
        } else {
            Frame::udp4(v4(rng), v4(rng), sport, dport)
        };
        let f = f.ipv4_options(*[0usize, 0, 4, 12, 40].choose(rng).unwrap());
        if rng.random_bool(0.1) {
            f.ipv4_fragment(rng.random_range(0..4), rng.random())
        } else {
            f
        }
    } else {
        let f = if tcp {
            Frame::tcp6(v6(rng), v6(rng), sport, dport)
        } else {
            Frame::udp6(v6(rng), v6(rng), sport, dport)
        };
        let all = [
            Ext::HopByHop,
            Ext::Routing,
            Ext::DestOpts,
            Ext::Fragment { offset: 0, more: true },
            Ext::Fragment { offset: 3, more: false },
        ];
        let n = *[0usize, 0, 1, 2, 4, 6, 7].choose(rng).unwrap();
        let ext: Vec<Ext> = (0..n).map(|_| *all.choose(rng).unwrap()).collect();
        f.ipv6_ext(&ext)
    };
    let vlans = [
        vec![],
        vec![],
        vec![0x8100],
        vec![0x88a8, 0x8100],
        vec![0x8100, 0x8100, 0x8100],
    ];
    frame = frame.vlan(vlans.choose(rng).unwrap()).payload(rng.random_range(0..64));
    if rng.random_bool(0.05) {
        frame = frame.proto(*[1u8, 47, 58, 132].choose(rng).unwrap());
    }
    frame.build()
}

/// A template, a mutation of one, or noise; never shorter than an
/// Ethernet header (BPF_PROG_TEST_RUN refuses those).
fn frame(rng: &mut StdRng) -> Vec<u8> {
    let mut f = template(rng);
    match rng.random_range(0..10) {
        0..=2 => {}
        3 | 4 => f.truncate(rng.random_range(14..=f.len())),
        5 | 6 => {
            for _ in 0..rng.random_range(1..5) {
                let i = rng.random_range(12..f.len());
                f[i] = rng.random();
            }
        }
        7 => {
            // A header field set to anything: ethertype, IHL/version, protocol or next header.
            let i = *[12usize, 13, 14, 20, 23, 18].choose(rng).unwrap();
            if i < f.len() {
                f[i] = rng.random();
            }
        }
        8 => f.extend((0..rng.random_range(1..40)).map(|_| rng.random::<u8>())),
        _ => f = (0..rng.random_range(14..160)).map(|_| rng.random()).collect(),
    }
    f
}

/// The id of the program netwatch attached at `hook` (`xdp` or `tc`) of
/// the lab's interface, from the link it pinned.
fn prog_id(pins: &str, hook: &str) -> u64 {
    let link = format!("{pins}/links/{hook}_{IFACE}");
    let out = Command::new("bpftool")
        .args(["-j", "link", "show", "pinned", &link])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool link show JSON");
    v["prog_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no program behind {link}: {v}"))
}

/// A program pinned for the test's own handle; unpinned when dropped,
/// also when the test fails.
struct ProgPin(std::path::PathBuf);

impl Drop for ProgPin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn pin_prog(id: u64) -> ProgPin {
    let pin = std::path::PathBuf::from("/sys/fs/bpf").join(unique("fz"));
    let out = Command::new("bpftool")
        .args(["prog", "pin", "id", &id.to_string()])
        .arg(&pin)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ProgPin(pin)
}

fn sum(map: &PerCpuArray<MapData, Counter>, index: u32) -> u64 {
    map.get(&index, 0).unwrap().iter().map(|c| c.packets).sum()
}

#[test]
fn fuzzed_frames_agree_with_the_reference_classifier() {
    require_privileged!();
    let frames: u64 = std::env::var("NETWATCH_FUZZ_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let seed: u64 = std::env::var("NETWATCH_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6e65_7477_6174_6368);
    eprintln!("fuzz: {frames} frames, seed {seed} (NETWATCH_FUZZ_SEED={seed} reproduces)");
    let mut rng = StdRng::seed_from_u64(seed);

    // A quiet interface: its peer stays down and IPv6 is off, so nothing
    // but the fuzzer's frames is ever counted on it.
    let ns = Netns::new("fz");
    ns.ip(&["link", "add", IFACE, "type", "veth", "peer", "name", "nw-fzpeer"]);
    ns.ip(&["link", "set", IFACE, "up"]);
    let out = ns
        .command("sysctl")
        .args(["-qw", "net.ipv6.conf.all.disable_ipv6=1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let dir = std::env::temp_dir().join(unique("fz"));
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("netwatch.toml");
    std::fs::write(&config_path, CONFIG).unwrap();
    let policy = RunConfig::build(Some(&ConfigFile::parse(CONFIG).unwrap()), &Overrides::default())
        .unwrap()
        .policy;
    let pins = format!("/sys/fs/bpf/{}", unique("p"));
    let nw = Netwatch::start(
        &ns,
        &pins,
        &[
            "--config",
            config_path.to_str().unwrap(),
            "--iface",
            IFACE,
            "--egress",
            IFACE,
        ],
    );

    // The very programs the controller attached.
    let xdp_pin = pin_prog(prog_id(&pins, "xdp"));
    let tc_pin = pin_prog(prog_id(&pins, "tc"));
    let xdp = Xdp::from_pin(&xdp_pin.0, XdpAttachType::Interface).unwrap();
    let tc = SchedClassifier::from_pin(&tc_pin.0).unwrap();
    let pinned = PinnedMaps::open(std::path::Path::new(&pins)).unwrap();
    let slot = pinned
        .iface_slots()
        .unwrap()
        .into_iter()
        .find(|(_, i)| netwatch_user::datapath::iface_name(i) == IFACE)
        .unwrap()
        .0;
    let rule_slot: Vec<u32> = policy
        .rules
        .iter()
        .map(|r| {
            pinned
                .rules()
                .unwrap()
                .into_iter()
                .find(|(_, i)| i.port == r.port && i.protocol == r.protocol as u8)
                .unwrap()
                .0
        })
        .collect();
    let rule_map = pinned.per_cpu_array::<Counter>(maps::RULE_COUNTERS).unwrap();
    let class_map = pinned.per_cpu_array::<Counter>(maps::CLASS_COUNTERS).unwrap();
    let index_of = |dir: usize, counted: Counted| match counted {
        Counted::Class(c) => (false, class_counter_index(slot, dir as u32, c as u32)),
        Counted::Rule { rule, dropped } => (
            true,
            rule_counter_index(slot, dir as u32, rule_slot[rule], dropped as u32),
        ),
    };
    let total = || -> u64 {
        let mut t = 0;
        for dir in [Direction::Inbound as u32, Direction::Outbound as u32] {
            for c in Class::ALL {
                t += sum(&class_map, class_counter_index(slot, dir, c as u32));
            }
            for r in &rule_slot {
                for o in 0..2 {
                    t += sum(&rule_map, rule_counter_index(slot, dir, *r, o));
                }
            }
        }
        t
    };

    let start = Instant::now();
    let base = total();
    let (mut fed, mut refused, mut dropped) = (0u64, 0u64, 0u64);
    let mut tally = std::collections::BTreeMap::<String, u64>::new();
    let mut out = vec![0u8; 4096];
    for n in 0..frames {
        let f = frame(&mut rng);
        let outbound = rng.random_bool(0.5);
        let dir = outbound as usize;
        let expect = classify(&policy, dir, &f);
        let (is_rule, index) = index_of(dir, expect);
        let map = if is_rule { &rule_map } else { &class_map };
        let before = sum(map, index);
        let opts = TestRunOptions {
            data_in: Some(&f),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        };
        let result = if outbound {
            tc.test_run(opts)
        } else {
            xdp.test_run(opts)
        };
        let verdict = match result {
            Ok(r) => r.return_value,
            // skb test runs refuse frames whose L3 header is cut short.
            Err(_) if outbound => {
                refused += 1;
                continue;
            }
            Err(e) => panic!("frame {n}: XDP test run failed: {e} ({f:02x?})"),
        };
        fed += 1;
        let label = match expect {
            Counted::Class(c) => format!("{c:?}"),
            Counted::Rule { rule, dropped } => format!(
                "{}{}",
                policy.rules[rule].label(),
                if dropped { " dropped" } else { " passed" }
            ),
        };
        *tally.entry(label).or_default() += 1;
        let kernel_dropped = if outbound {
            assert!(verdict == 2 || verdict == u32::MAX, "frame {n}: TC verdict {verdict}");
            verdict == 2
        } else {
            assert!(verdict == 1 || verdict == 2, "frame {n}: XDP verdict {verdict}");
            verdict == 1
        };
        let want_drop = matches!(expect, Counted::Rule { dropped: true, .. });
        assert_eq!(
            kernel_dropped,
            want_drop,
            "frame {n} (seed {seed}, {}): expected {expect:?}\n{f:02x?}",
            if outbound { "tc" } else { "xdp" }
        );
        dropped += kernel_dropped as u64;
        assert_eq!(
            sum(map, index),
            before + 1,
            "frame {n} (seed {seed}): not counted as {expect:?}\n{f:02x?}"
        );
        if n % 50_000 == 0 {
            // Each frame in exactly one counter: nothing else moved.
            assert_eq!(total() - base, fed, "counters do not add up after {fed} frames");
        }
    }
    assert_eq!(total() - base, fed, "counters do not add up");
    // The controller is still there and answering.
    let m = nw.metrics(&ns);
    assert!(m.contains("netwatch_info"));
    assert!(
        ns.run(|| netwatch_user::netns::http_get(METRICS_ADDR, "/api/status"))
            .is_ok()
    );
    eprintln!(
        "fuzz: {fed} frames agreed with the reference ({dropped} dropped, {refused} refused by the skb test run) in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    eprintln!("fuzz: frames per class: {tally:?}");
    // The generator reaches every class and every rule outcome.
    for class in Class::ALL.iter().filter(|c| **c != Class::EthTruncated) {
        assert!(
            tally.contains_key(&format!("{class:?}")) || frames < 100_000,
            "no fuzzed frame was {class:?}"
        );
    }
    drop(nw);
    let _ = std::fs::remove_dir_all(&dir);
}
