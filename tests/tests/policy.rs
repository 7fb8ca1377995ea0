//! Policy state through reloads and command-line changes, on the verified
//! datapath (BPF_PROG_TEST_RUN): a reload is atomic as the datapath sees
//! it, a rule slot handed to another rule starts clean, and list entries
//! with a TTL expire without hiding wider ones.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use netwatch_common::{Direction::Inbound, LIST_FOREVER};
use netwatch_tests::{
    daemon::netwatch,
    frames::Frame,
    harness::{Harness, Hook, policy},
    require_privileged,
};
use netwatch_user::{
    clock::boot_secs,
    datapath::PinnedMaps,
    datapath::{
        install::{self, CliChange},
        lists::ListKind,
    },
    policy::{Mode, Policy, Rule},
};

const VICTIM: [u8; 4] = [198, 18, 0, 2];

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// 2000 allowlist entries, one of them covering `198.18.7.0/24`.
fn big_allowlist(extra: u32) -> Vec<IpNet> {
    let mut list = vec![net("198.18.7.0/24")];
    for i in 0..1999 + extra {
        let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i * 4);
        list.push(IpNet::new(a.into(), 30).unwrap());
    }
    list
}

/// An allowlisted source probing a drop rule must pass on every packet
/// while the policy is reloaded again and again (each reload rewrites the
/// lists, the mode stays enforce). Before the policy was double-buffered,
/// a reload switched the lists off while it rewrote them.
#[test]
fn reloads_never_switch_the_lists_off() {
    require_privileged!();
    let make = |extra| {
        let mut p = policy(Mode::Enforce, &["udp/137", "tcp/5190"]);
        p.allowlist = big_allowlist(extra);
        p
    };
    let h = Harness::new(&make(0));
    let frame = Frame::udp4([198, 18, 7, 9], VICTIM, 40000, 137).build();
    const RELOADS: u32 = 100;
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let reloader = s.spawn(|| {
            let maps = PinnedMaps::open(&h.pin_dir).unwrap();
            for i in 0..RELOADS {
                install::apply_policy(&maps, &make(i % 2)).expect("reload");
            }
            done.store(true, Ordering::Relaxed);
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
            h.run_repeat(Hook::Xdp(Inbound), &frame, 2000);
        }
        reloader.join().unwrap();
    });
    let passed = h.rule_packets("inbound", "udp/137", "passed");
    let dropped = h.rule_packets("inbound", "udp/137", "dropped");
    eprintln!("{RELOADS} reloads under allowlisted traffic: {passed} passed, {dropped} dropped (wrong verdicts)");
    assert!(passed > 0, "no traffic ran during the reloads");
    assert_eq!(dropped, 0, "allowlisted probes dropped during reloads");
}

/// A rule whose slot goes to another rule leaves nothing behind: with all
/// 64 slots in use, a source auto-blocked on udp/5190, and udp/5190
/// replaced by a count-only udp/445 (which can only take udp/5190's slot),
/// the source's udp/445 traffic passes and is neither flagged nor blocked.
#[test]
fn a_reused_rule_slot_starts_clean() {
    require_privileged!();
    let mut auto: Rule = "udp/5190".parse().unwrap();
    auto.detection.threshold = 2;
    auto.detection.block_secs = Some(3600);
    let fillers: Vec<Rule> = (0..63)
        .map(|i| format!("tcp/{}=count", 20000 + i).parse().unwrap())
        .collect();
    let before = Policy::new(Mode::Enforce, fillers.iter().cloned().chain([auto]).collect());
    let h = Harness::new(&before);
    let scanner = [198, 18, 3, 3];
    for dst in 1..=3u8 {
        h.run(
            Hook::Xdp(Inbound),
            &Frame::udp4(scanner, [198, 18, 0, dst], 1, 5190).build(),
        );
    }
    let blocked = h.tracked(Ipv4Addr::from(scanner).into());
    assert!(
        blocked
            .iter()
            .any(|v| v.rule == "udp/5190" && v.blocked_until.is_some()),
        "the scanner was not auto-blocked on udp/5190: {blocked:?}"
    );

    let after = Policy::new(
        Mode::Enforce,
        fillers.into_iter().chain(["udp/445=count".parse().unwrap()]).collect(),
    );
    h.apply(&after);
    let mut delivered = 0;
    for dst in 1..=20u8 {
        if !h.dropped(
            Hook::Xdp(Inbound),
            &Frame::udp4(scanner, [198, 18, 0, dst], 1, 445).build(),
        ) {
            delivered += 1;
        }
    }
    assert_eq!(
        delivered, 20,
        "udp/445 traffic of a source blocked under the slot's old rule was dropped"
    );
    for view in h.tracked(Ipv4Addr::from(scanner).into()) {
        assert_eq!(view.rule, "udp/445", "a record of the old rule survived: {view:?}");
        assert!(view.blocked_until.is_none(), "udp/445 shows a block: {view:?}");
    }
    assert_eq!(
        h.rule_packets("inbound", "udp/445", "passed"),
        20,
        "udp/445 inherited counts"
    );
}

/// A short command-line entry inside a wider permanent one: while it
/// lasts and after it expires the source stays blocked (the trie answers
/// with the longest match, which must carry the wider entry's answer);
/// once expired it is removed and no longer listed.
#[test]
fn an_expired_entry_never_hides_a_wider_one() {
    require_privileged!();
    let mut p = policy(Mode::Enforce, &["udp/137=count"]);
    p.blocklist = vec![net("198.18.0.0/24")];
    let h = Harness::new(&p);
    let probe = Frame::udp4([198, 18, 0, 1], VICTIM, 1, 137).build();
    let outside = Frame::udp4([198, 18, 1, 1], VICTIM, 1, 137).build();
    assert!(h.dropped(Hook::Xdp(Inbound), &probe));
    let until = boot_secs() + 1;
    install::change_lists(
        &h.maps,
        CliChange::Add {
            kind: ListKind::Block,
            net: net("198.18.0.1/32"),
            until,
        },
    )
    .unwrap();
    assert!(h.dropped(Hook::Xdp(Inbound), &probe), "blocked under the CLI entry");
    while boot_secs() <= until {
        std::thread::sleep(Duration::from_millis(100));
    }
    let dropped = (0..20).filter(|_| h.dropped(Hook::Xdp(Inbound), &probe)).count();
    assert_eq!(dropped, 20, "after the /32 expired, the /24 stopped applying");
    assert!(
        !h.dropped(Hook::Xdp(Inbound), &outside),
        "a source outside the lists is blocked"
    );

    // The daemon's periodic sweep removes it; the /24 remains.
    assert!(install::change_lists(&h.maps, CliChange::Expire).unwrap());
    let listed: Vec<IpNet> = h
        .maps
        .list(ListKind::Block)
        .unwrap()
        .into_iter()
        .map(|i| i.net)
        .collect();
    assert_eq!(listed, vec![net("198.18.0.0/24")], "expired entry still stored");
    assert!(h.dropped(Hook::Xdp(Inbound), &probe));

    // A permanent CLI entry inside it, then removed: the /24 still holds.
    let add = CliChange::Add {
        kind: ListKind::Block,
        net: net("198.18.0.0/28"),
        until: LIST_FOREVER,
    };
    install::change_lists(&h.maps, add).unwrap();
    let remove = CliChange::Remove {
        kind: ListKind::Block,
        net: net("198.18.0.0/28"),
    };
    assert!(install::change_lists(&h.maps, remove).unwrap());
    assert!(h.dropped(Hook::Xdp(Inbound), &probe));
    assert_eq!(h.maps.list(ListKind::Block).unwrap().len(), 1);
}

/// Command-line entries survive a reload; config entries removed from the
/// file stop applying at once, with no window in between.
#[test]
fn command_line_entries_survive_a_reload() {
    require_privileged!();
    let mut p = policy(Mode::Enforce, &["udp/137=count"]);
    p.blocklist = vec![net("198.18.4.0/24")];
    let h = Harness::new(&p);
    let cli_source = Frame::udp4([198, 18, 5, 1], VICTIM, 1, 137).build();
    let config_source = Frame::udp4([198, 18, 4, 1], VICTIM, 1, 137).build();
    let add = CliChange::Add {
        kind: ListKind::Block,
        net: net("198.18.5.0/24"),
        until: LIST_FOREVER,
    };
    install::change_lists(&h.maps, add).unwrap();
    assert!(h.dropped(Hook::Xdp(Inbound), &cli_source));
    assert!(h.dropped(Hook::Xdp(Inbound), &config_source));
    p.blocklist.clear();
    h.apply(&p);
    assert!(
        h.dropped(Hook::Xdp(Inbound), &cli_source),
        "the CLI entry did not survive the reload"
    );
    assert!(
        !h.dropped(Hook::Xdp(Inbound), &config_source),
        "a removed config entry still applies"
    );
}

/// `netwatch block` refuses what the config refuses, with the same
/// message: a block inside the allowlist, and an allow over a block.
#[test]
fn the_command_line_refuses_what_the_config_refuses() {
    require_privileged!();
    let mut p = policy(Mode::Enforce, &["udp/137"]);
    p.allowlist = vec![net("198.18.7.0/24")];
    p.blocklist = vec![net("198.18.9.0/24")];
    let mut refused = p.clone();
    refused.blocklist.push(net("198.18.7.5/32"));
    let config_error = refused.validate().unwrap_err().to_string();
    let h = Harness::new(&p);
    let pins = h.pin_dir.to_str().unwrap();
    let out = netwatch(&["block", "198.18.7.5/32", "--pin-dir", pins]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "block inside the allowlist accepted");
    assert!(
        stderr.contains(&config_error),
        "CLI said {stderr:?}, the config says {config_error:?}"
    );
    let out = netwatch(&["allow", "198.18.8.0/23", "--pin-dir", pins]);
    assert!(!out.status.success(), "allow over a blocklist entry accepted");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is covered by allowlist entry 198.18.8.0/23"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing changed.
    let blocked: Vec<IpNet> = h
        .maps
        .list(ListKind::Block)
        .unwrap()
        .into_iter()
        .map(|i| i.net)
        .collect();
    assert_eq!(blocked, vec![net("198.18.9.0/24")]);
}

/// A list holds 16 384 CIDRs per address family: installed in full, its
/// last entry applies; `netwatch allow` of one more is refused, for that
/// list and family only. (A config with 16 385 is refused at start, see
/// e2e's `bad_input_is_refused_with_a_clear_error`.)
#[test]
fn lists_hold_16384_cidrs_per_family_and_refuse_one_more() {
    require_privileged!();
    assert_eq!(netwatch_common::MAX_CIDRS, 16_384, "the documented limit");
    let mut p = policy(Mode::Enforce, &["udp/137"]);
    // 198.19.0.0, 198.19.0.1, ... and, last, 198.18.0.9.
    p.allowlist = (0..16_383u32)
        .map(|i| {
            IpNet::from(ipnet::Ipv4Net::from(Ipv4Addr::from(
                u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i,
            )))
        })
        .chain([net("198.18.0.9/32")])
        .collect();
    let h = Harness::new(&p);
    assert_eq!(h.snapshot().allowlist.len(), 16_384);
    let from = |src: [u8; 4]| Frame::udp4(src, VICTIM, 1, 137).build();
    assert!(
        !h.dropped(Hook::Xdp(Inbound), &from([198, 18, 0, 9])),
        "the 16 384th entry does not apply"
    );
    assert!(!h.dropped(Hook::Xdp(Inbound), &from([198, 19, 0, 0])));
    assert!(h.dropped(Hook::Xdp(Inbound), &from([198, 18, 0, 10])));

    let pins = h.pin_dir.to_str().unwrap();
    let out = netwatch(&["allow", "198.18.0.11", "--pin-dir", pins]);
    assert!(!out.status.success(), "a 16 385th allowlist entry was accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the allowlist already has 16384 entries for this address family"),
        "{stderr}"
    );
    assert!(h.dropped(
        Hook::Xdp(Inbound),
        &Frame::udp4([198, 18, 0, 11], VICTIM, 1, 137).build()
    ));
    for other in [["allow", "2001:db8:5::/48"], ["block", "198.18.0.10"]] {
        let out = netwatch(&[other[0], other[1], "--pin-dir", pins]);
        assert!(
            out.status.success(),
            "{other:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let s = h.snapshot();
    assert_eq!((s.allowlist.len(), s.blocklist.len()), (16_385, 1));
}
