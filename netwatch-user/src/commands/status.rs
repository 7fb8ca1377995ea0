use anyhow::Result;

use crate::{cli::StatusArgs, datapath::PinnedMaps, snapshot::Snapshot};

pub fn status(args: &StatusArgs) -> Result<()> {
    let maps = PinnedMaps::open(&args.pin_dir.pin_dir)?;
    let snapshot = Snapshot::read(&maps)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&snapshot)?);
    } else {
        print!("{}", render_text(&snapshot));
    }
    Ok(())
}

pub fn render_text(s: &Snapshot) -> String {
    use std::fmt::Write as _;
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
        let tc = if i.tc_egress { ", tc egress" } else { "" };
        let _ = writeln!(out, "  {:<16} role {:<5} {xdp}{tc}", i.name, i.role);
    }
    let _ = writeln!(out, "rules:");
    for r in &s.rules {
        let _ = writeln!(
            out,
            "  {:<10} inbound {:<5} outbound {}",
            r.rule, r.inbound, r.outbound
        );
    }
    let list = |v: &Vec<String>| {
        if v.is_empty() {
            "(empty)".to_string()
        } else {
            v.join(", ")
        }
    };
    let _ = writeln!(out, "allowlist: {}", list(&s.allowlist));
    let _ = writeln!(out, "blocklist: {}", list(&s.blocklist));
    let _ = writeln!(out, "rule counters:");
    let _ = writeln!(
        out,
        "  {:<16} {:<9} {:<10} {:<8} {:>12} {:>14}",
        "INTERFACE", "DIRECTION", "RULE", "ACTION", "PACKETS", "BYTES"
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
    out
}
