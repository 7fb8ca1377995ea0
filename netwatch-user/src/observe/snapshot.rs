//! A point-in-time read of the pinned maps: what `status` prints and what
//! `/metrics` exports. Read on demand, never copied on a timer.

use anyhow::Result;
use netwatch_common::{
    ATTACHED_TC, ATTACHED_TC_NETLINK, ATTACHED_XDP, Class, Counter, Direction, Outcome, PORT_NBNS, STAT_AUTO_BLOCKED,
    STAT_AUTO_BLOCKS_CAPPED, STAT_EVENTS_LOST, STAT_HANDSHAKES_REJECTED, STAT_HANDSHAKES_STARTED, STAT_SOURCES_CREATED,
    STAT_VISITORS_RECORDED, class_counter_index, flag_counter_index, maps, rule_counter_index,
};
use serde::Serialize;

use crate::{
    clock::boot_rfc3339,
    datapath::lists::ListKind,
    datapath::{PinnedMaps, iface_name, kernel_names},
};

#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub mode: &'static str,
    pub interfaces: Vec<InterfaceState>,
    pub rules: Vec<RuleState>,
    pub allowlist: Vec<ListView>,
    pub blocklist: Vec<ListView>,
    pub rule_counters: Vec<RuleCounter>,
    pub class_counters: Vec<ClassCounter>,
    pub detection: DetectionStats,
}

/// An active allowlist or blocklist entry.
#[derive(Debug, Serialize)]
pub struct ListView {
    pub cidr: String,
    /// `config` (replaced on reload) or `cli` (`netwatch block/allow`).
    pub origin: &'static str,
    /// RFC 3339, or null for no expiry.
    pub expires: Option<String>,
}

/// What scan detection has done, from the datapath's counters.
#[derive(Debug, Serialize)]
pub struct DetectionStats {
    /// New (source, rule, direction, kind) records created.
    pub sources_created: u64,
    /// Flag events not delivered (both causes).
    pub events_lost: u64,
    /// Of those: over the per-CPU budget, and no room in the ring buffer
    /// (since the pins got the `EVENT_LOSSES` map; losses counted by an
    /// earlier version are in neither).
    #[serde(skip)]
    pub events_lost_rate_limited: u64,
    #[serde(skip)]
    pub events_lost_ring_full: u64,
    /// Auto-blocks set by the kernel so far.
    pub auto_blocks: u64,
    /// Auto-blocks in force now (entries of `AUTO_BLOCKS` not expired).
    pub auto_blocks_in_force: u64,
    /// Auto-blocks not set because the cap was reached.
    pub auto_blocks_capped: u64,
    /// Web visitors recorded: TCP handshakes on a web port whose ACK
    /// carried the acknowledgement number the SYN-ACK asked for.
    pub visitors_recorded: u64,
    /// SYN-ACKs seen leaving a web port (handshakes awaiting the ACK).
    pub web_syn_acks: u64,
    /// ACKs for a pending handshake with the wrong acknowledgement number.
    pub web_acks_rejected: u64,
    pub flagged: Vec<FlagCount>,
    /// Outbound rule traffic to recent web visitors (subset of the rule counters).
    pub reverse_lookups: Vec<RuleCounter>,
}

#[derive(Debug, Serialize)]
pub struct FlagCount {
    pub rule: String,
    pub direction: &'static str,
    pub flagged: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct InterfaceState {
    /// The configured name: the slot's, and the `interface` label of its
    /// counters, whatever the kernel calls the interface now.
    pub name: String,
    /// The kernel's name of the interface (`ifindex`) where it was renamed
    /// while attached; null when it has the configured name.
    pub kernel_name: Option<String>,
    pub role: &'static str,
    pub ifindex: u32,
    /// `native`, `generic` or `null` when no XDP program is attached.
    pub xdp: Option<&'static str>,
    pub tc_egress: bool,
    /// How TC egress is attached: `tcx`, `netlink` or `null` when it is not.
    pub tc_egress_mode: Option<&'static str>,
    /// The hooks the running controller's configuration asks for
    /// (`ATTACHED_XDP`, `ATTACHED_TC`); 0 once dropped from it.
    #[serde(skip)]
    pub configured: u8,
    #[serde(skip)]
    pub slot: u32,
}

#[derive(Debug, Serialize)]
pub struct RuleState {
    pub rule: String,
    pub inbound: &'static str,
    pub outbound: &'static str,
    /// Distinct destinations within `window_secs` that flag a source.
    pub threshold: u32,
    pub window_secs: u32,
    /// Auto-block duration, or null when auto-block is off.
    pub block_secs: Option<u32>,
    #[serde(skip)]
    pub slot: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct RuleCounter {
    pub interface: String,
    pub direction: &'static str,
    pub rule: String,
    /// The [`netwatch_common::Outcome`] label (`passed`/`dropped`), under
    /// the name the JSON output and the metrics have always used for it.
    pub action: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ClassCounter {
    pub interface: String,
    pub direction: &'static str,
    /// `unmatched`, `fragment`, `non_ip` or `malformed`.
    pub class: &'static str,
    /// Set for `malformed`.
    pub reason: Option<&'static str>,
    pub packets: u64,
    pub bytes: u64,
}

pub fn class_label(class: Class) -> &'static str {
    match class {
        Class::Unmatched => "unmatched",
        Class::NonIp => "non_ip",
        Class::Fragment => "fragment",
        _ => "malformed",
    }
}

impl Snapshot {
    pub fn read(maps: &PinnedMaps) -> Result<Self> {
        let settings = maps.settings()?;
        // Counters are kept for every slot ever used, so counters of an
        // interface that is not attached right now still show.
        let kernel = kernel_names(maps);
        let interfaces: Vec<InterfaceState> = maps
            .iface_slots()?
            .into_iter()
            .map(|(slot, info)| InterfaceState {
                name: iface_name(&info),
                kernel_name: kernel.get(slot as usize).cloned().flatten(),
                role: info.role().label(),
                ifindex: info.ifindex,
                xdp: (info.attached & ATTACHED_XDP != 0).then_some(if info.xdp_generic != 0 {
                    "generic"
                } else {
                    "native"
                }),
                tc_egress: info.attached & ATTACHED_TC != 0,
                tc_egress_mode: (info.attached & ATTACHED_TC != 0).then_some(
                    if info.attached & ATTACHED_TC_NETLINK != 0 {
                        "netlink"
                    } else {
                        "tcx"
                    },
                ),
                configured: info.configured,
                slot,
            })
            .collect();
        let mut rules = Vec::new();
        // Slots whose rule recognises reverse lookups (udp/137).
        let mut reverse_slots = std::collections::HashSet::new();
        for (slot, info, params) in maps.rules_in_force()? {
            if params.flags & PORT_NBNS != 0 {
                reverse_slots.insert(slot);
            }
            rules.push(RuleState {
                rule: crate::detection::sources::rule_label(&info),
                inbound: params.action(Direction::Inbound).label(),
                outbound: params.action(Direction::Outbound).label(),
                threshold: params.threshold,
                window_secs: params.window_secs,
                block_secs: (params.block_secs != 0).then_some(params.block_secs),
                slot,
            });
        }

        let rule_map = maps.per_cpu_array::<Counter>(maps::RULE_COUNTERS)?;
        let class_map = maps.per_cpu_array::<Counter>(maps::CLASS_COUNTERS)?;
        let mut rule_counters = Vec::new();
        let mut class_counters = Vec::new();
        for iface in &interfaces {
            for dir in Direction::ALL {
                for rule in &rules {
                    for outcome in Outcome::ALL {
                        let index = rule_counter_index(iface.slot, dir, rule.slot, outcome);
                        let c = PinnedMaps::counter_sum(&rule_map, index)?;
                        rule_counters.push(RuleCounter {
                            interface: iface.name.clone(),
                            direction: dir.label(),
                            rule: rule.rule.clone(),
                            action: outcome.label(),
                            packets: c.packets,
                            bytes: c.bytes,
                        });
                    }
                }
                for class in Class::ALL {
                    let c = PinnedMaps::counter_sum(&class_map, class_counter_index(iface.slot, dir, class))?;
                    class_counters.push(ClassCounter {
                        interface: iface.name.clone(),
                        direction: dir.label(),
                        class: class_label(class),
                        reason: class.malformed_reason(),
                        packets: c.packets,
                        bytes: c.bytes,
                    });
                }
            }
        }
        let list = |kind| -> Result<Vec<ListView>> {
            Ok(maps
                .list_in_force(kind)?
                .into_iter()
                .map(|(net, expires, config)| ListView {
                    cidr: net.to_string(),
                    origin: if config { "config" } else { "cli" },
                    expires: expires.map(boot_rfc3339),
                })
                .collect())
        };
        let stats = maps.per_cpu_array::<u64>(maps::STATS)?;
        let stat = |index| -> Result<u64> { Ok(stats.get(&index, 0)?.iter().sum()) };
        let losses = maps.per_cpu_array::<u64>(maps::EVENT_LOSSES)?;
        let loss = |index| -> Result<u64> { Ok(losses.get(&index, 0)?.iter().sum()) };
        let flag_map = maps.per_cpu_array::<u64>(maps::FLAG_COUNTERS)?;
        // The controller's flags for failed first contacts beside the
        // kernel's (pins made before it have no such map).
        let contact_flags = maps.array::<u64>(maps::CONTACT_FLAGS).ok();
        let mut flagged = Vec::new();
        for rule in &rules {
            for dir in Direction::ALL {
                let index = flag_counter_index(rule.slot, dir);
                let kernel: u64 = flag_map.get(&index, 0)?.iter().sum();
                let n = kernel + contact_flags.as_ref().map_or(0, |m| m.get(&index, 0).unwrap_or(0));
                flagged.push(FlagCount {
                    rule: rule.rule.clone(),
                    direction: dir.label(),
                    flagged: n,
                });
            }
        }
        let reverse_map = maps.per_cpu_array::<Counter>(maps::REVERSE_COUNTERS)?;
        let mut reverse_lookups = Vec::new();
        for iface in &interfaces {
            for rule in &rules {
                for outcome in Outcome::ALL {
                    let index = rule_counter_index(iface.slot, Direction::Outbound, rule.slot, outcome);
                    let c = PinnedMaps::counter_sum(&reverse_map, index)?;
                    // A rule that recognises reverse lookups has its series
                    // from the start, like every other counter.
                    if c.packets > 0 || reverse_slots.contains(&rule.slot) {
                        reverse_lookups.push(RuleCounter {
                            interface: iface.name.clone(),
                            direction: Direction::Outbound.label(),
                            rule: rule.rule.clone(),
                            action: outcome.label(),
                            packets: c.packets,
                            bytes: c.bytes,
                        });
                    }
                }
            }
        }
        let detection = DetectionStats {
            sources_created: stat(STAT_SOURCES_CREATED)?,
            events_lost: stat(STAT_EVENTS_LOST)?,
            events_lost_rate_limited: loss(netwatch_common::EVENT_LOSS_RATE_LIMITED)?,
            events_lost_ring_full: loss(netwatch_common::EVENT_LOSS_RING_FULL)?,
            auto_blocks: stat(STAT_AUTO_BLOCKED)?,
            auto_blocks_in_force: crate::detection::sources::blocks_in_force(maps)?,
            auto_blocks_capped: stat(STAT_AUTO_BLOCKS_CAPPED)?,
            visitors_recorded: stat(STAT_VISITORS_RECORDED)?,
            web_syn_acks: stat(STAT_HANDSHAKES_STARTED)?,
            web_acks_rejected: stat(STAT_HANDSHAKES_REJECTED)?,
            flagged,
            reverse_lookups,
        };
        Ok(Snapshot {
            mode: settings.policy(settings.active & 1).mode().label(),
            interfaces,
            rules,
            allowlist: list(ListKind::Allow)?,
            blocklist: list(ListKind::Block)?,
            rule_counters,
            class_counters,
            detection,
        })
    }
}
