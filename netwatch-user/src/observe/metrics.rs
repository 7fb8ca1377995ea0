//! Prometheus exposition, built from a [`Snapshot`] at scrape time.
//!
//! No per-source-IP labels: label values come only from the interfaces,
//! rules and fixed enumerations, so the series count is bounded.

use anyhow::Result;
use prometheus::{Encoder as _, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use netwatch_common::{MAX_AUTO_BLOCKS, MAX_SOURCES};

use crate::observe::snapshot::Snapshot;

/// Controller-side facts that do not live in the maps.
#[derive(Debug, Clone)]
pub struct ControllerStats {
    /// Delay from the kernel raising a flag to the controller reading it.
    pub flag_delay: prometheus::Histogram,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub last_reload_ok: bool,
    /// Sources in the kernel's map at the last count (counted in the
    /// background, never at scrape time); `None` before the first count.
    pub sources_tracked: Option<u64>,
    /// Incident database writes that failed.
    pub incident_errors: u64,
}

impl Default for ControllerStats {
    fn default() -> Self {
        let opts = prometheus::HistogramOpts::new(
            "netwatch_flag_event_delay_seconds",
            "Time from the kernel flagging a source to the controller receiving the event.",
        )
        .buckets(vec![0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 1.0]);
        ControllerStats {
            flag_delay: prometheus::Histogram::with_opts(opts).expect("valid histogram"),
            reloads_ok: 0,
            reloads_failed: 0,
            last_reload_ok: true,
            sources_tracked: None,
            incident_errors: 0,
        }
    }
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

/// Renders the text exposition format.
pub fn render(snapshot: &Snapshot, controller: Option<&ControllerStats>) -> Result<String> {
    let registry = Registry::new();
    let rule_labels = ["interface", "direction", "rule", "action"];
    let packets = counter_vec(
        &registry,
        "netwatch_packets_total",
        "Packets that matched a rule, by interface, direction, rule and what was done with them.",
        &rule_labels,
    )?;
    let bytes = counter_vec(
        &registry,
        "netwatch_bytes_total",
        "Bytes of packets that matched a rule.",
        &rule_labels,
    )?;
    for c in &snapshot.rule_counters {
        let labels = [c.interface.as_str(), c.direction, c.rule.as_str(), c.action];
        packets.with_label_values(&labels).inc_by(c.packets);
        bytes.with_label_values(&labels).inc_by(c.bytes);
    }

    let if_labels = ["interface", "direction"];
    let unmatched = counter_vec(
        &registry,
        "netwatch_unmatched_packets_total",
        "IP packets that matched no rule (passed at minimal cost).",
        &if_labels,
    )?;
    let unmatched_bytes = counter_vec(
        &registry,
        "netwatch_unmatched_bytes_total",
        "Bytes of IP packets that matched no rule.",
        &if_labels,
    )?;
    let fragments = counter_vec(
        &registry,
        "netwatch_fragments_total",
        "Non-first IP fragments: they carry no ports, so they are counted and passed, never matched.",
        &if_labels,
    )?;
    let non_ip = counter_vec(
        &registry,
        "netwatch_non_ip_packets_total",
        "Frames that are not IPv4 or IPv6 (ARP, LLDP, ...).",
        &if_labels,
    )?;
    let malformed = counter_vec(
        &registry,
        "netwatch_malformed_packets_total",
        "Truncated or malformed frames, passed untouched, by reason.",
        &["interface", "direction", "reason"],
    )?;
    for c in &snapshot.class_counters {
        let labels = [c.interface.as_str(), c.direction];
        match (c.class, c.reason) {
            ("unmatched", _) => {
                unmatched.with_label_values(&labels).inc_by(c.packets);
                unmatched_bytes.with_label_values(&labels).inc_by(c.bytes);
            }
            ("fragment", _) => fragments.with_label_values(&labels).inc_by(c.packets),
            ("non_ip", _) => non_ip.with_label_values(&labels).inc_by(c.packets),
            (_, Some(reason)) => malformed
                .with_label_values(&[labels[0], labels[1], reason])
                .inc_by(c.packets),
            _ => {}
        }
    }

    let d = &snapshot.detection;
    let flagged = counter_vec(
        &registry,
        "netwatch_scanners_flagged_total",
        "Sources flagged as scanning (distinct destinations reached the rule's threshold within its window).",
        &["rule", "direction"],
    )?;
    for f in &d.flagged {
        flagged
            .with_label_values(&[f.rule.as_str(), f.direction])
            .inc_by(f.flagged);
    }
    let reverse = counter_vec(
        &registry,
        "netwatch_reverse_lookups_total",
        "Outbound packets on a rule port (udp/137) towards a recent web visitor: IIS-style reverse lookups, not scans. A subset of netwatch_packets_total.",
        &["interface", "rule", "action"],
    )?;
    for c in &d.reverse_lookups {
        reverse
            .with_label_values(&[c.interface.as_str(), c.rule.as_str(), c.action])
            .inc_by(c.packets);
    }
    for (name, help, value) in [
        (
            "netwatch_web_syn_acks_total",
            "SYN-ACKs seen leaving a web port (web_ports): handshakes waiting for the visitor's ACK.",
            d.web_syn_acks,
        ),
        (
            "netwatch_visitors_recorded_total",
            "Web visitors recorded: handshakes whose ACK carried the acknowledgement number the SYN-ACK asked for. Only these make udp/137 towards the visitor a reverse lookup.",
            d.visitors_recorded,
        ),
        (
            "netwatch_web_acks_rejected_total",
            "ACKs to a web port for a pending handshake with the wrong acknowledgement number (forged, or not an ordinary handshake); no visitor recorded.",
            d.web_acks_rejected,
        ),
    ] {
        counter_vec(&registry, name, help, &[])?
            .with_label_values::<&str>(&[])
            .inc_by(value);
    }
    let capacity = gauge_vec(
        &registry,
        "netwatch_sources_capacity",
        "Capacity of the kernel's per-source map.",
        &[],
    )?;
    capacity.with_label_values::<&str>(&[]).set(MAX_SOURCES as i64);
    let created = counter_vec(
        &registry,
        "netwatch_sources_created_total",
        "Source records the kernel created (a source seen on a rule, per rule, direction and kind).",
        &[],
    )?;
    created.with_label_values::<&str>(&[]).inc_by(d.sources_created);
    let lost = counter_vec(
        &registry,
        "netwatch_events_lost_total",
        "Flag events not delivered to the controller: ring buffer full or over the per-CPU rate limit.",
        &[],
    )?;
    lost.with_label_values::<&str>(&[]).inc_by(d.events_lost);
    let auto = counter_vec(
        &registry,
        "netwatch_auto_blocks_total",
        "Sources auto-blocked by the kernel when flagged.",
        &[],
    )?;
    auto.with_label_values::<&str>(&[]).inc_by(d.auto_blocks);
    let capped = counter_vec(
        &registry,
        "netwatch_auto_blocks_capped_total",
        &format!("Flagged sources not auto-blocked because {MAX_AUTO_BLOCKS} blocks were in force."),
        &[],
    )?;
    capped.with_label_values::<&str>(&[]).inc_by(d.auto_blocks_capped);
    let blocked = gauge_vec(
        &registry,
        "netwatch_sources_blocked",
        "Auto-blocks in force right now (a source on a rule and direction).",
        &[],
    )?;
    blocked
        .with_label_values::<&str>(&[])
        .set(d.auto_blocks_in_force as i64);

    let info = gauge_vec(
        &registry,
        "netwatch_info",
        "netwatch version and mode (always 1).",
        &["version", "mode"],
    )?;
    info.with_label_values(&[env!("CARGO_PKG_VERSION"), snapshot.mode])
        .set(1);
    let rules = gauge_vec(
        &registry,
        "netwatch_rule_info",
        "Configured rules and their action per direction (always 1).",
        &["rule", "inbound", "outbound"],
    )?;
    for r in &snapshot.rules {
        rules
            .with_label_values(&[r.rule.as_str(), r.inbound, r.outbound])
            .set(1);
    }
    let attached = gauge_vec(
        &registry,
        "netwatch_interface_attached",
        "1 when a netwatch program is attached to the interface at this hook (xdp, tc_egress).",
        &["interface", "role", "hook", "mode"],
    )?;
    for i in &snapshot.interfaces {
        attached
            .with_label_values(&[i.name.as_str(), i.role, "xdp", i.xdp.unwrap_or("none")])
            .set(i.xdp.is_some() as i64);
        attached
            .with_label_values(&[i.name.as_str(), i.role, "tc_egress", i.tc_egress_mode.unwrap_or("none")])
            .set(i.tc_egress as i64);
    }
    let lists = gauge_vec(
        &registry,
        "netwatch_list_entries",
        "Entries on the allowlist and blocklist.",
        &["list"],
    )?;
    lists
        .with_label_values(&["allowlist"])
        .set(snapshot.allowlist.len() as i64);
    lists
        .with_label_values(&["blocklist"])
        .set(snapshot.blocklist.len() as i64);

    if let Some(stats) = controller {
        registry.register(Box::new(stats.flag_delay.clone()))?;
        let reloads = counter_vec(
            &registry,
            "netwatch_config_reloads_total",
            "Configuration reloads (SIGHUP) by result.",
            &["result"],
        )?;
        reloads.with_label_values(&["success"]).inc_by(stats.reloads_ok);
        reloads.with_label_values(&["failure"]).inc_by(stats.reloads_failed);
        let last = gauge_vec(
            &registry,
            "netwatch_config_last_reload_successful",
            "1 if the last configuration reload succeeded (or none was tried).",
            &[],
        )?;
        last.with_label_values::<&str>(&[]).set(stats.last_reload_ok as i64);
        if let Some(n) = stats.sources_tracked {
            let g = gauge_vec(
                &registry,
                "netwatch_sources_tracked",
                &format!("Sources in the kernel's per-source map (LRU, capacity {MAX_SOURCES}), counted every 30 s."),
                &[],
            )?;
            g.with_label_values::<&str>(&[]).set(n as i64);
            let evicted = counter_vec(
                &registry,
                "netwatch_sources_evicted_total",
                "Source records the LRU map evicted to make room for new ones (created minus tracked, as of the last count).",
                &[],
            )?;
            evicted
                .with_label_values::<&str>(&[])
                .inc_by(d.sources_created.saturating_sub(n));
        }
        let errors = counter_vec(
            &registry,
            "netwatch_incident_store_errors_total",
            "Failed writes to the incident database (full disk, permissions).",
            &[],
        )?;
        errors.with_label_values::<&str>(&[]).inc_by(stats.incident_errors);
    }

    let mut families = registry.gather();
    families.extend(prometheus::gather());
    let mut out = Vec::new();
    TextEncoder::new().encode(&families, &mut out)?;
    Ok(String::from_utf8(out)?)
}
