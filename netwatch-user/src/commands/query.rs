//! `lookup` and `top`: what netwatch knows about sources.

use std::{fmt::Write as _, net::IpAddr, path::Path, time::Duration};

use anyhow::Result;

use crate::{
    clock::rfc3339,
    datapath::PinnedMaps,
    detection::{
        incidents::{Incident, Reason},
        sources::SourceView,
    },
    observe::reports::{incidents_report, lookup_report, top_report},
};

pub fn lookup(pin_dir: &Path, state_dir: &Path, ip: IpAddr, json: bool) -> Result<()> {
    // Pins that are gone (after `detach`, or no `run` yet) leave the
    // incidents to answer; pins that are there but cannot be read
    // (permission, another layout) are an error.
    let maps = match std::fs::symlink_metadata(pin_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        _ => Some(PinnedMaps::open(pin_dir)?),
    };
    let report = lookup_report(maps.as_ref(), state_dir, ip)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut out = String::new();
    let _ = writeln!(out, "{}", report.ip);
    if report.incidents.is_empty() {
        let _ = writeln!(out, "incidents: none");
    } else {
        let _ = writeln!(out, "incidents (newest first):");
    }
    for i in &report.incidents {
        let _ = writeln!(out, "  {}", describe_incident(i));
    }
    for b in &report.blocks {
        let _ = writeln!(
            out,
            "auto-blocked: {} {} until {}",
            b.rule, b.direction, b.blocked_until
        );
    }
    if maps.is_none() {
        let _ = writeln!(
            out,
            "tracked now: unknown ({} does not exist: netwatch is not running with this pin directory)",
            pin_dir.display()
        );
    } else if report.tracked.is_empty() {
        let _ = writeln!(out, "tracked now: nothing");
    } else {
        let _ = writeln!(out, "tracked now:");
        for s in &report.tracked {
            let _ = writeln!(out, "  {}", describe(s));
        }
    }
    print!("{out}");
    Ok(())
}

/// One incident on one line, as `lookup` and `incidents` print it
/// (without its source address).
fn describe_incident(i: &Incident) -> String {
    let blocked = match (i.blocked, i.blocked_until) {
        (true, Some(t)) => format!(", blocked until {}", rfc3339(t)),
        _ => String::new(),
    };
    let recovered = match (i.summary_sources, i.recovered) {
        (Some(n), _) => format!(" (summary of {n} sources: a flood of new sources)"),
        (None, true) => " (recovered: its flag event was lost)".to_string(),
        (None, false) => String::new(),
    };
    let reason = match i.reason {
        Reason::FailedContacts => format!(", flagged for {} failed first contacts", i.failed_contacts),
        Reason::DistinctDestinations => String::new(),
    };
    format!(
        "#{} {} {} {} on {}: {} packets, {} distinct destinations{}, {} .. {}{}{}",
        i.id,
        i.classification.label(),
        i.rule,
        i.direction,
        i.interface,
        i.packets,
        i.distinct_destinations,
        reason,
        rfc3339(i.first_seen),
        rfc3339(i.last_seen),
        blocked,
        recovered
    )
}

pub fn incidents(state_dir: &Path, since: Option<Duration>, json: bool) -> Result<()> {
    let report = incidents_report(state_dir, since)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if report.incidents.is_empty() {
        match since {
            Some(d) => println!("no incidents in the last {}", humantime::format_duration(d)),
            None => println!("no incidents"),
        }
    }
    for i in &report.incidents {
        println!("{:<40} {}", i.source, describe_incident(i));
    }
    Ok(())
}

fn describe(s: &SourceView) -> String {
    format!(
        "{} {} {} on {}: {} packets, {} bytes, {} distinct destinations this window{}{}, last seen {}",
        s.rule,
        s.direction,
        s.classification.label(),
        s.interface,
        s.packets,
        s.bytes,
        s.distinct_destinations,
        if s.flagged { ", FLAGGED" } else { "" },
        s.blocked_until
            .as_ref()
            .map(|t| format!(", blocked until {t}"))
            .unwrap_or_default(),
        s.last_seen
    )
}

pub fn top(pin_dir: &Path, limit: usize, json: bool) -> Result<()> {
    let report = top_report(&PinnedMaps::open(pin_dir)?, limit)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    if report.sources.is_empty() {
        println!("no tracked sources");
    }
    for s in &report.sources {
        println!("{:<40} {}", s.source, describe(s));
    }
    Ok(())
}

/// `lookup --fleet`: every sensor's incidents of `ip`.
pub fn fleet_lookup(fleet: &crate::config::FleetConfig, ip: IpAddr, json: bool) -> Result<()> {
    let incidents = crate::fleet::fleet_incidents(fleet, ip)?;
    if json {
        let report = serde_json::json!({ "ip": ip, "incidents": incidents });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("{ip} in the fleet at {}", fleet.url);
    if incidents.is_empty() {
        println!("incidents: none");
    }
    let field = |v: &serde_json::Value, key: &str| match v.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    for i in &incidents {
        println!(
            "  {} #{} {} {} {} on {}: {} packets, {} distinct destinations, {} .. {}{}",
            field(i, "sensor"),
            field(i, "id"),
            field(i, "classification"),
            field(i, "rule"),
            field(i, "direction"),
            field(i, "interface"),
            field(i, "packets"),
            field(i, "distinct_destinations"),
            field(i, "first_seen"),
            field(i, "last_seen"),
            if i.get("blocked").and_then(serde_json::Value::as_bool) == Some(true) {
                format!(", blocked until {}", field(i, "blocked_until"))
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

/// `top --fleet`: the sources seen by the most sensors.
pub fn fleet_top(fleet: &crate::config::FleetConfig, limit: usize, json: bool) -> Result<()> {
    let sources = crate::fleet::fleet_top(fleet, limit)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "sources": sources }))?
        );
        return Ok(());
    }
    if sources.is_empty() {
        println!("no incidents in the fleet at {}", fleet.url);
    }
    for s in &sources {
        println!(
            "{:<40} {} sensors ({}), {} incidents, {} packets, last seen {}",
            s.source,
            s.sensors.len(),
            s.sensors.iter().cloned().collect::<Vec<_>>().join(", "),
            s.incidents,
            s.packets,
            s.last_seen
        );
    }
    Ok(())
}
