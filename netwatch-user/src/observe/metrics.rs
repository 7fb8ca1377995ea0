//! Prometheus exposition: one registry for the process, holding a
//! collector that reads the maps into a [`Snapshot`] at scrape time, the
//! controller's own counters (atomics, bumped by `run`'s loop) and the
//! process metrics.
//!
//! No per-source-IP labels: label values come only from the interfaces,
//! rules and fixed enumerations, so the series count is bounded.

use std::{
    cell::RefCell,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
};

use anyhow::Result;
use prometheus::{
    Encoder as _, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use netwatch_common::{ATTACHED_TC, ATTACHED_XDP, MAX_AUTO_BLOCKS, MAX_SOURCES};

use crate::{datapath::PinnedMaps, observe::snapshot::Snapshot};

/// Controller-side facts that do not live in the maps, shared by `run`'s
/// loop (which bumps them) and the collector (which reads them).
#[derive(Debug)]
pub struct ControllerStats {
    /// Delay from the kernel raising a flag to the controller reading it.
    flag_delay: prometheus::Histogram,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    last_reload_ok: AtomicBool,
    /// Sources in the kernel's map at the last count (counted in the
    /// background, never at scrape time); [`NOT_COUNTED`] before the
    /// first count.
    sources_tracked: AtomicU64,
    /// Source records evicted, as of the last count: the highest `created
    /// - tracked` seen, so it never goes backwards.
    sources_evicted: AtomicU64,
    /// Incident database writes that failed.
    incident_errors: AtomicU64,
    /// First contacts judged: answered, failed (see `detection::contacts`).
    contacts_answered: AtomicU64,
    contacts_failed: AtomicU64,
    /// Set when a fleet is configured.
    fleet: std::sync::OnceLock<Arc<crate::fleet::FleetStats>>,
}

const NOT_COUNTED: u64 = u64::MAX;

impl Default for ControllerStats {
    fn default() -> Self {
        let opts = prometheus::HistogramOpts::new(
            "netwatch_flag_event_delay_seconds",
            "Time from the kernel flagging a source to the controller receiving the event.",
        )
        .buckets(vec![0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 1.0]);
        ControllerStats {
            flag_delay: prometheus::Histogram::with_opts(opts).expect("valid histogram"),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            last_reload_ok: AtomicBool::new(true),
            sources_tracked: AtomicU64::new(NOT_COUNTED),
            sources_evicted: AtomicU64::new(0),
            incident_errors: AtomicU64::new(0),
            contacts_answered: AtomicU64::new(0),
            contacts_failed: AtomicU64::new(0),
            fleet: std::sync::OnceLock::new(),
        }
    }
}

impl ControllerStats {
    /// A flag event arrived `seconds` after the kernel raised it.
    pub fn flag_delay(&self, seconds: f64) {
        self.flag_delay.observe(seconds);
    }

    /// A reload (SIGHUP) was applied (`ok`) or rejected.
    pub fn reload(&self, ok: bool) {
        if ok {
            self.reloads_ok.fetch_add(1, Relaxed);
        } else {
            self.reloads_failed.fetch_add(1, Relaxed);
        }
        self.last_reload_ok.store(ok, Relaxed);
    }

    /// The last count of the per-source map: `tracked` records in it,
    /// `created` by the kernel when the count began. What is not there
    /// any more was evicted; the figure only ever grows (a count that
    /// races with new records is never taken back).
    pub fn sources_counted(&self, tracked: u64, created: u64) {
        self.sources_tracked.store(tracked.min(NOT_COUNTED - 1), Relaxed);
        self.sources_evicted.fetch_max(created.saturating_sub(tracked), Relaxed);
    }

    /// First contacts judged so far (totals).
    pub fn contacts_judged(&self, answered: u64, failed: u64) {
        self.contacts_answered.store(answered, Relaxed);
        self.contacts_failed.store(failed, Relaxed);
    }

    /// A write to the incident database failed.
    pub fn incident_error(&self) {
        self.incident_errors.fetch_add(1, Relaxed);
    }

    /// A fleet is configured: its metrics are reported from `fleet`.
    pub fn set_fleet(&self, fleet: Arc<crate::fleet::FleetStats>) {
        let _ = self.fleet.set(fleet);
    }
}

/// The process's registry: the maps' collector and the process metrics.
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new(maps: PinnedMaps, stats: Arc<ControllerStats>) -> Result<Self> {
        let registry = Registry::new();
        registry.register(Box::new(MapsCollector { maps, stats }))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(Self { registry })
    }

    /// Reads the maps and renders the text exposition format; an error
    /// reading the maps fails the scrape.
    pub fn render(&self) -> Result<String> {
        SCRAPE_ERROR.with_borrow_mut(|e| *e = None);
        let families = self.registry.gather();
        if let Some(err) = SCRAPE_ERROR.with_borrow_mut(Option::take) {
            return Err(err);
        }
        encode(&families)
    }
}

thread_local! {
    /// What went wrong in [`MapsCollector::collect`], which cannot return
    /// an error; it runs in the thread that gathers.
    static SCRAPE_ERROR: RefCell<Option<anyhow::Error>> = const { RefCell::new(None) };
}

/// Reads the maps at scrape time.
struct MapsCollector {
    maps: PinnedMaps,
    stats: Arc<ControllerStats>,
}

impl Collector for MapsCollector {
    /// None declared up front: the label values follow the interfaces and
    /// rules in the maps (an unchecked collector).
    fn desc(&self) -> Vec<&Desc> {
        Vec::new()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        match (self.maps.still_pinned())
            .and_then(Snapshot::read)
            .and_then(|snapshot| families(&snapshot, Some(&self.stats)))
        {
            Ok(families) => families,
            Err(err) => {
                SCRAPE_ERROR.with_borrow_mut(|e| *e = Some(err));
                Vec::new()
            }
        }
    }
}

fn encode(families: &[MetricFamily]) -> Result<String> {
    let mut out = Vec::new();
    TextEncoder::new().encode(families, &mut out)?;
    Ok(String::from_utf8(out)?)
}

/// What [`families`] builds, collected once it is filled.
type Built = Vec<Box<dyn Collector>>;

fn counter_vec(built: &mut Built, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    built.push(Box::new(c.clone()));
    Ok(c)
}

fn gauge_vec(built: &mut Built, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    built.push(Box::new(g.clone()));
    Ok(g)
}

/// The metric families of a snapshot (and of the controller's counters),
/// by name; families without a sample are left out by the registry.
fn families(snapshot: &Snapshot, controller: Option<&ControllerStats>) -> Result<Vec<MetricFamily>> {
    let mut built = Built::new();
    let registry = &mut built;
    let rule_labels = ["interface", "direction", "rule", "action"];
    let packets = counter_vec(
        registry,
        "netwatch_packets_total",
        "Packets that matched a rule, by interface, direction, rule and what was done with them.",
        &rule_labels,
    )?;
    let bytes = counter_vec(
        registry,
        "netwatch_bytes_total",
        "Bytes of packets that matched a rule.",
        &rule_labels,
    )?;
    let configured: std::collections::HashSet<&str> = (snapshot.interfaces.iter())
        .filter(|i| i.configured != 0)
        .map(|i| i.name.as_str())
        .collect();
    for c in snapshot
        .rule_counters
        .iter()
        .filter(|c| configured.contains(c.interface.as_str()))
    {
        let labels = [c.interface.as_str(), c.direction, c.rule.as_str(), c.action];
        packets.with_label_values(&labels).inc_by(c.packets);
        bytes.with_label_values(&labels).inc_by(c.bytes);
    }

    let if_labels = ["interface", "direction"];
    let unmatched = counter_vec(
        registry,
        "netwatch_unmatched_packets_total",
        "IP packets that matched no rule (passed at minimal cost).",
        &if_labels,
    )?;
    let unmatched_bytes = counter_vec(
        registry,
        "netwatch_unmatched_bytes_total",
        "Bytes of IP packets that matched no rule.",
        &if_labels,
    )?;
    let fragments = counter_vec(
        registry,
        "netwatch_fragments_total",
        "Non-first IP fragments: they carry no ports, so they are counted and passed, never matched.",
        &if_labels,
    )?;
    let non_ip = counter_vec(
        registry,
        "netwatch_non_ip_packets_total",
        "Frames that are not IPv4 or IPv6 (ARP, LLDP, ...).",
        &if_labels,
    )?;
    let malformed = counter_vec(
        registry,
        "netwatch_malformed_packets_total",
        "Truncated or malformed frames, passed untouched, by reason.",
        &["interface", "direction", "reason"],
    )?;
    for c in snapshot
        .class_counters
        .iter()
        .filter(|c| configured.contains(c.interface.as_str()))
    {
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

    // Only the interfaces the running configuration names, and only
    // their configured hooks: an interface dropped from the configuration
    // keeps its counters in the maps (they continue if it comes back) but
    // has no series, and an interface without --egress has no tc_egress
    // series (not a 0 that would page as detached).
    let d = &snapshot.detection;
    let flagged = counter_vec(
        registry,
        "netwatch_scanners_flagged_total",
        "Sources flagged as scanning (distinct destinations reached the rule's threshold within its window, or failed first contacts outnumbered answered ones by the rule's failed_contacts).",
        &["rule", "direction"],
    )?;
    for f in &d.flagged {
        flagged
            .with_label_values(&[f.rule.as_str(), f.direction])
            .inc_by(f.flagged);
    }
    let reverse = counter_vec(
        registry,
        "netwatch_reverse_lookups_total",
        "Outbound packets on a rule port (udp/137) towards a recent web visitor: IIS-style reverse lookups, not scans. A subset of netwatch_packets_total.",
        &["interface", "rule", "action"],
    )?;
    for c in d
        .reverse_lookups
        .iter()
        .filter(|c| configured.contains(c.interface.as_str()))
    {
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
        counter_vec(registry, name, help, &[])?
            .with_label_values::<&str>(&[])
            .inc_by(value);
    }
    let capacity = gauge_vec(
        registry,
        "netwatch_sources_capacity",
        "Capacity of the kernel's per-source map.",
        &[],
    )?;
    capacity.with_label_values::<&str>(&[]).set(MAX_SOURCES as i64);
    let created = counter_vec(
        registry,
        "netwatch_sources_created_total",
        "Source records the kernel created (a source seen on a rule, per rule, direction and kind).",
        &[],
    )?;
    created.with_label_values::<&str>(&[]).inc_by(d.sources_created);
    let lost = counter_vec(
        registry,
        "netwatch_events_lost_total",
        "Flag events not delivered to the controller, by cause: rate_limit (over the per-CPU budget), ring_full (no room in the ring buffer), unattributed (counted by a version before causes were).",
        &["cause"],
    )?;
    lost.with_label_values(&["rate_limit"])
        .inc_by(d.events_lost_rate_limited);
    lost.with_label_values(&["ring_full"]).inc_by(d.events_lost_ring_full);
    let unattributed = d
        .events_lost
        .saturating_sub(d.events_lost_rate_limited + d.events_lost_ring_full);
    if unattributed > 0 {
        lost.with_label_values(&["unattributed"]).inc_by(unattributed);
    }
    let auto = counter_vec(
        registry,
        "netwatch_auto_blocks_total",
        "Sources auto-blocked by the kernel when flagged.",
        &[],
    )?;
    auto.with_label_values::<&str>(&[]).inc_by(d.auto_blocks);
    let capped = counter_vec(
        registry,
        "netwatch_auto_blocks_capped_total",
        &format!("Flagged sources not auto-blocked because {MAX_AUTO_BLOCKS} blocks were in force."),
        &[],
    )?;
    capped.with_label_values::<&str>(&[]).inc_by(d.auto_blocks_capped);
    let blocked = gauge_vec(
        registry,
        "netwatch_sources_blocked",
        "Auto-blocks in force right now (a source on a rule and direction).",
        &[],
    )?;
    blocked
        .with_label_values::<&str>(&[])
        .set(d.auto_blocks_in_force as i64);

    let info = gauge_vec(
        registry,
        "netwatch_info",
        "netwatch version and mode (always 1).",
        &["version", "mode"],
    )?;
    info.with_label_values(&[env!("CARGO_PKG_VERSION"), snapshot.mode])
        .set(1);
    let rules = gauge_vec(
        registry,
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
        registry,
        "netwatch_interface_attached",
        "1 when a netwatch program is attached to the interface at this hook (xdp, tc_egress).",
        &["interface", "role", "hook", "mode"],
    )?;
    for i in &snapshot.interfaces {
        if i.configured & ATTACHED_XDP != 0 {
            attached
                .with_label_values(&[i.name.as_str(), i.role, "xdp", i.xdp.unwrap_or("none")])
                .set(i.xdp.is_some() as i64);
        }
        if i.configured & ATTACHED_TC != 0 {
            attached
                .with_label_values(&[i.name.as_str(), i.role, "tc_egress", i.tc_egress_mode.unwrap_or("none")])
                .set(i.tc_egress as i64);
        }
    }
    let lists = gauge_vec(
        registry,
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
        registry.push(Box::new(stats.flag_delay.clone()));
        let reloads = counter_vec(
            registry,
            "netwatch_config_reloads_total",
            "Configuration reloads (SIGHUP) by result.",
            &["result"],
        )?;
        reloads
            .with_label_values(&["success"])
            .inc_by(stats.reloads_ok.load(Relaxed));
        reloads
            .with_label_values(&["failure"])
            .inc_by(stats.reloads_failed.load(Relaxed));
        let last = gauge_vec(
            registry,
            "netwatch_config_last_reload_successful",
            "1 if the last configuration reload succeeded (or none was tried).",
            &[],
        )?;
        last.with_label_values::<&str>(&[])
            .set(stats.last_reload_ok.load(Relaxed) as i64);
        let tracked = stats.sources_tracked.load(Relaxed);
        if let Some(n) = (tracked != NOT_COUNTED).then_some(tracked) {
            let g = gauge_vec(
                registry,
                "netwatch_sources_tracked",
                &format!("Sources in the kernel's per-source map (LRU, capacity {MAX_SOURCES}), counted every 30 s."),
                &[],
            )?;
            g.with_label_values::<&str>(&[]).set(n as i64);
            let evicted = counter_vec(
                registry,
                "netwatch_sources_evicted_total",
                "Source records the LRU map evicted to make room for new ones (created minus tracked, as of the last count; never decreases).",
                &[],
            )?;
            evicted
                .with_label_values::<&str>(&[])
                .inc_by(stats.sources_evicted.load(Relaxed));
        }
        let errors = counter_vec(
            registry,
            "netwatch_incident_store_errors_total",
            "Failed writes to the incident database (full disk, permissions).",
            &[],
        )?;
        errors
            .with_label_values::<&str>(&[])
            .inc_by(stats.incident_errors.load(Relaxed));
        let contacts = counter_vec(
            registry,
            "netwatch_first_contacts_total",
            "First contacts of probing sources judged by the controller: answered by the probed address and port, or failed (no answer within the rule's contact_secs).",
            &["outcome"],
        )?;
        contacts
            .with_label_values(&["answered"])
            .inc_by(stats.contacts_answered.load(Relaxed));
        contacts
            .with_label_values(&["failed"])
            .inc_by(stats.contacts_failed.load(Relaxed));
        if let Some(fleet) = stats.fleet.get() {
            gauge_vec(
                registry,
                "netwatch_fleet_connected",
                "1 while the connection to the fleet's NATS server is up (only with [fleet]).",
                &[],
            )?
            .with_label_values::<&str>(&[])
            .set(fleet.connected() as i64);
            gauge_vec(
                registry,
                "netwatch_fleet_outbox_incidents",
                "Incidents waiting in the outbox to be delivered to the fleet.",
                &[],
            )?
            .with_label_values::<&str>(&[])
            .set(fleet.outbox_depth() as i64);
            counter_vec(
                registry,
                "netwatch_fleet_incidents_published_total",
                "Incident states (an incident opened or changed) the fleet's stream confirmed it holds, each counted once however often it was sent.",
                &[],
            )?
            .with_label_values::<&str>(&[])
            .inc_by(fleet.published());
            counter_vec(
                registry,
                "netwatch_fleet_decisions_created_total",
                "Fleet decisions (sources confirmed by enough sensors) this sensor created; one another sensor created first is not counted.",
                &[],
            )?
            .with_label_values::<&str>(&[])
            .inc_by(fleet.decisions_created());
            counter_vec(
                registry,
                "netwatch_fleet_decisions_applied_total",
                "Fleet decisions applied to this sensor's kernel blocks (enforce mode, rules with auto_block).",
                &[],
            )?
            .with_label_values::<&str>(&[])
            .inc_by(fleet.decisions_applied());
        }
    }

    Ok(built.iter().flat_map(|c| c.collect()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::snapshot::{
        ClassCounter, DetectionStats, FlagCount, InterfaceState, ListView, RuleCounter, RuleState,
    };

    fn snapshot() -> Snapshot {
        Snapshot {
            mode: "enforce",
            interfaces: vec![InterfaceState {
                name: "veth0".into(),
                kernel_name: None,
                role: "wan",
                ifindex: 7,
                xdp: Some("native"),
                tc_egress: true,
                tc_egress_mode: Some("tcx"),
                configured: ATTACHED_XDP | ATTACHED_TC,
                slot: 0,
            }],
            rules: vec![RuleState {
                rule: "udp/137".into(),
                inbound: "drop",
                outbound: "count",
                threshold: 20,
                window_secs: 300,
                block_secs: None,
                slot: 0,
            }],
            allowlist: vec![ListView {
                cidr: "198.18.0.0/24".into(),
                origin: "config",
                expires: None,
            }],
            blocklist: Vec::new(),
            rule_counters: vec![RuleCounter {
                interface: "veth0".into(),
                direction: "inbound",
                rule: "udp/137".into(),
                action: "dropped",
                packets: 256,
                bytes: 19_968,
            }],
            class_counters: vec![
                ClassCounter {
                    interface: "veth0".into(),
                    direction: "inbound",
                    class: "unmatched",
                    reason: None,
                    packets: 3,
                    bytes: 180,
                },
                ClassCounter {
                    interface: "veth0".into(),
                    direction: "inbound",
                    class: "malformed",
                    reason: Some("truncated_ip"),
                    packets: 1,
                    bytes: 20,
                },
            ],
            detection: DetectionStats {
                sources_created: 5,
                events_lost: 5,
                events_lost_rate_limited: 3,
                events_lost_ring_full: 1,
                auto_blocks: 1,
                auto_blocks_in_force: 1,
                auto_blocks_capped: 0,
                visitors_recorded: 0,
                web_syn_acks: 0,
                web_acks_rejected: 0,
                flagged: vec![FlagCount {
                    rule: "udp/137".into(),
                    direction: "inbound",
                    flagged: 1,
                }],
                reverse_lookups: Vec::new(),
            },
        }
    }

    /// What one registry gathers from `families` of the hand-built
    /// snapshot, as text.
    fn exposition(stats: Option<&ControllerStats>) -> String {
        exposition_of(&snapshot(), stats)
    }

    /// What one registry gathers from `families` of `snapshot`, as text.
    fn exposition_of(snapshot: &Snapshot, stats: Option<&ControllerStats>) -> String {
        struct Fixed(Vec<MetricFamily>);
        impl Collector for Fixed {
            fn desc(&self) -> Vec<&Desc> {
                Vec::new()
            }
            fn collect(&self) -> Vec<MetricFamily> {
                self.0.clone()
            }
        }
        let registry = Registry::new();
        registry
            .register(Box::new(Fixed(families(snapshot, stats).unwrap())))
            .unwrap();
        encode(&registry.gather()).unwrap()
    }

    #[test]
    fn the_exposition_names_every_series_with_its_labels_and_value() {
        let text = exposition(None);
        for line in [
            r#"netwatch_packets_total{action="dropped",direction="inbound",interface="veth0",rule="udp/137"} 256"#,
            r#"netwatch_bytes_total{action="dropped",direction="inbound",interface="veth0",rule="udp/137"} 19968"#,
            r#"netwatch_unmatched_packets_total{direction="inbound",interface="veth0"} 3"#,
            r#"netwatch_malformed_packets_total{direction="inbound",interface="veth0",reason="truncated_ip"} 1"#,
            r#"netwatch_scanners_flagged_total{direction="inbound",rule="udp/137"} 1"#,
            "netwatch_sources_created_total 5",
            r#"netwatch_events_lost_total{cause="rate_limit"} 3"#,
            r#"netwatch_events_lost_total{cause="ring_full"} 1"#,
            // Lost before the pins had causes: neither.
            r#"netwatch_events_lost_total{cause="unattributed"} 1"#,
            "netwatch_sources_blocked 1",
            "netwatch_sources_capacity ",
            r#"netwatch_rule_info{inbound="drop",outbound="count",rule="udp/137"} 1"#,
            r#"netwatch_interface_attached{hook="xdp",interface="veth0",mode="native",role="wan"} 1"#,
            r#"netwatch_interface_attached{hook="tc_egress",interface="veth0",mode="tcx",role="wan"} 1"#,
            r#"netwatch_list_entries{list="allowlist"} 1"#,
            r#"netwatch_list_entries{list="blocklist"} 0"#,
            r#"netwatch_info{mode="enforce",version=""#,
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        // Without the controller's counters, none of its series.
        assert!(!text.contains("netwatch_config_reloads_total"), "{text}");
        // Families come sorted by name, each with HELP and TYPE.
        let names: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert_eq!(text.lines().filter(|l| l.starts_with("# HELP ")).count(), names.len());
    }

    #[test]
    fn controller_counters_are_exported_as_they_were_bumped() {
        let stats = ControllerStats::default();
        let before = exposition(Some(&stats));
        assert!(before.contains("netwatch_config_last_reload_successful 1"), "{before}");
        // Not counted yet: no sources_tracked nor evicted series.
        assert!(!before.contains("netwatch_sources_tracked"), "{before}");
        stats.reload(true);
        stats.reload(false);
        stats.incident_error();
        stats.sources_counted(3, 5);
        stats.flag_delay(0.0002);
        let after = exposition(Some(&stats));
        for line in [
            r#"netwatch_config_reloads_total{result="success"} 1"#,
            r#"netwatch_config_reloads_total{result="failure"} 1"#,
            "netwatch_config_last_reload_successful 0",
            "netwatch_incident_store_errors_total 1",
            "netwatch_sources_tracked 3",
            // created (5) minus tracked (3) when counted
            "netwatch_sources_evicted_total 2",
            r#"netwatch_flag_event_delay_seconds_bucket{le="0.0005"} 1"#,
            "netwatch_flag_event_delay_seconds_count 1",
        ] {
            assert!(after.contains(line), "{line:?} missing from:\n{after}");
        }
    }

    #[test]
    fn evictions_never_go_backwards() {
        let stats = ControllerStats::default();
        let mut last = 0.0;
        // created grows, tracked is recounted: created - tracked dips
        // (records created during a count) but the counter never does.
        for (tracked, created) in [(10, 10), (10, 30), (40, 45), (45, 50), (1000, 1020)] {
            stats.sources_counted(tracked, created);
            let text = exposition(Some(&stats));
            let value: f64 = (text.lines())
                .find_map(|l| l.strip_prefix("netwatch_sources_evicted_total "))
                .unwrap()
                .parse()
                .unwrap();
            assert!(value >= last, "evictions went from {last} to {value}");
            last = value;
        }
        assert_eq!(last, 20.0);
    }

    #[test]
    fn only_configured_interfaces_and_hooks_are_exported() {
        let mut s = snapshot();
        // XDP only (a router's interfaces): no tc_egress series at all.
        s.interfaces[0].configured = ATTACHED_XDP;
        s.interfaces[0].tc_egress = false;
        s.interfaces[0].tc_egress_mode = None;
        // An interface dropped from the configuration: its counters stay
        // in the maps, its series are gone.
        let mut gone = InterfaceState {
            name: "eth9".into(),
            configured: 0,
            ..s.interfaces[0].clone()
        };
        gone.xdp = None;
        s.interfaces.push(gone);
        s.rule_counters.push(RuleCounter {
            interface: "eth9".into(),
            ..s.rule_counters[0].clone()
        });
        let registry = Registry::new();
        struct Fixed(Vec<MetricFamily>);
        impl Collector for Fixed {
            fn desc(&self) -> Vec<&Desc> {
                Vec::new()
            }
            fn collect(&self) -> Vec<MetricFamily> {
                self.0.clone()
            }
        }
        registry.register(Box::new(Fixed(families(&s, None).unwrap()))).unwrap();
        let text = encode(&registry.gather()).unwrap();
        assert!(
            text.contains(r#"netwatch_interface_attached{hook="xdp",interface="veth0",mode="native",role="wan"} 1"#),
            "{text}"
        );
        assert!(!text.contains(r#"hook="tc_egress""#), "{text}");
        assert!(!text.contains("eth9"), "{text}");
        assert!(
            text.contains(
                r#"netwatch_packets_total{action="dropped",direction="inbound",interface="veth0",rule="udp/137"} 256"#
            ),
            "{text}"
        );
    }

    /// An interface renamed while attached: its series keep the
    /// configured name (stable series); `status` shows the kernel's.
    #[test]
    fn a_renamed_interface_keeps_the_configured_name_as_its_label() {
        let mut s = snapshot();
        s.interfaces[0].kernel_name = Some("ppp9".into());
        let text = exposition_of(&s, None);
        assert!(
            text.contains(r#"netwatch_interface_attached{hook="xdp",interface="veth0",mode="native",role="wan"} 1"#),
            "{text}"
        );
        assert!(!text.contains("ppp9"), "{text}");
        let status = crate::commands::status::render_text(&s);
        assert!(
            status.contains("veth0            role wan   xdp native, tc egress (tcx), kernel name ppp9 (ifindex 7)"),
            "{status}"
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["interfaces"][0]["kernel_name"], "ppp9");
    }

    #[test]
    fn the_status_json_keeps_its_shape() {
        let value = serde_json::to_value(snapshot()).unwrap();
        let keys = |v: &serde_json::Value| -> Vec<String> {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(
            keys(&value),
            [
                "allowlist",
                "blocklist",
                "class_counters",
                "detection",
                "interfaces",
                "mode",
                "rule_counters",
                "rules"
            ]
        );
        // Slots are internal: never serialised.
        assert_eq!(
            keys(&value["interfaces"][0]),
            [
                "ifindex",
                "kernel_name",
                "name",
                "role",
                "tc_egress",
                "tc_egress_mode",
                "xdp"
            ]
        );
        assert_eq!(
            keys(&value["rules"][0]),
            ["block_secs", "inbound", "outbound", "rule", "threshold", "window_secs"]
        );
        assert_eq!(value["allowlist"][0]["expires"], serde_json::Value::Null);
    }
}
