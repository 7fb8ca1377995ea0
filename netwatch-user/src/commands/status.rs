use std::fmt::Write as _;

use std::path::Path;

use anyhow::Result;

use crate::{
    datapath::PinnedMaps,
    observe::snapshot::{ListView, Snapshot},
};

pub fn status(pin_dir: &Path, json: bool) -> Result<()> {
    let maps = PinnedMaps::open(pin_dir)?;
    let snapshot = Snapshot::read(&maps)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&snapshot)?);
    } else {
        print!("{}", render_text(&snapshot));
    }
    Ok(())
}

fn list(v: &[ListView]) -> String {
    if v.is_empty() {
        return "(empty)".to_string();
    }
    v.iter()
        .map(|l| match &l.expires {
            Some(t) => format!("{} ({}, until {t})", l.cidr, l.origin),
            None => format!("{} ({})", l.cidr, l.origin),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn render_text(s: &Snapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "mode: {}", s.mode);
    let _ = writeln!(out, "interfaces:");
    if s.interfaces.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for i in &s.interfaces {
        let xdp = i
            .xdp
            .map(|m| format!("xdp {m}"))
            .unwrap_or_else(|| "xdp detached".into());
        let tc = i
            .tc_egress_mode
            .map(|m| format!(", tc egress ({m})"))
            .unwrap_or_default();
        let renamed = i
            .kernel_name
            .as_ref()
            .map(|k| format!(", kernel name {k} (ifindex {})", i.ifindex))
            .unwrap_or_default();
        let _ = writeln!(out, "  {:<16} role {:<5} {xdp}{tc}{renamed}", i.name, i.role);
    }
    let _ = writeln!(out, "rules:");
    for r in &s.rules {
        let _ = writeln!(
            out,
            "  {:<10} inbound {:<5} outbound {:<5} flag at {} destinations in {} s{}",
            r.rule,
            r.inbound,
            r.outbound,
            r.threshold,
            r.window_secs,
            r.block_secs.map(|t| format!(", auto-block {t} s")).unwrap_or_default()
        );
    }
    let _ = writeln!(out, "allowlist: {}", list(&s.allowlist));
    let _ = writeln!(out, "blocklist: {}", list(&s.blocklist));
    let _ = writeln!(out, "rule counters:");
    let header = ("INTERFACE", "DIRECTION", "RULE", "ACTION", "PACKETS", "BYTES");
    let _ = writeln!(
        out,
        "  {:<16} {:<9} {:<10} {:<8} {:>12} {:>14}",
        header.0, header.1, header.2, header.3, header.4, header.5
    );
    for c in s.rule_counters.iter().filter(|c| c.packets > 0) {
        let _ = writeln!(
            out,
            "  {:<16} {:<9} {:<10} {:<8} {:>12} {:>14}",
            c.interface, c.direction, c.rule, c.action, c.packets, c.bytes
        );
    }
    let _ = writeln!(out, "other traffic:");
    let _ = writeln!(
        out,
        "  {:<16} {:<9} {:<28} {:>12} {:>14}",
        "INTERFACE", "DIRECTION", "CLASS", "PACKETS", "BYTES"
    );
    for c in s.class_counters.iter().filter(|c| c.packets > 0) {
        let class = match c.reason {
            Some(reason) => format!("malformed/{reason}"),
            None => c.class.to_string(),
        };
        let _ = writeln!(
            out,
            "  {:<16} {:<9} {:<28} {:>12} {:>14}",
            c.interface, c.direction, class, c.packets, c.bytes
        );
    }
    let d = &s.detection;
    let flagged: Vec<String> = d
        .flagged
        .iter()
        .filter(|f| f.flagged > 0)
        .map(|f| format!("{} {} {}", f.rule, f.direction, f.flagged))
        .collect();
    let _ = writeln!(
        out,
        "detection: {} sources tracked so far, flagged: {}, auto-blocks: {} set, {} in force, events lost: {}",
        d.sources_created,
        if flagged.is_empty() {
            "none".to_string()
        } else {
            flagged.join(", ")
        },
        d.auto_blocks,
        d.auto_blocks_in_force,
        d.events_lost
    );
    let reverse: u64 = d.reverse_lookups.iter().map(|c| c.packets).sum();
    let _ = writeln!(out, "reverse lookups (udp/137 to recent web visitors): {reverse}");
    let _ = writeln!(
        out,
        "web visitors: {} recorded (handshakes completed), {} SYN-ACKs seen leaving a web port, {} ACKs rejected",
        d.visitors_recorded, d.web_syn_acks, d.web_acks_rejected
    );
    out
}
