//! A point-in-time read of the pinned maps: what `status` prints and what
//! `/metrics` exports. Read on demand, never copied on a timer.

use anyhow::Result;
use netwatch_common::{
    ATTACHED_TC, ATTACHED_XDP, Class, Counter, Direction, Outcome, Protocol, class_counter_index,
    maps, rule_counter_index,
};
use serde::Serialize;

use crate::{
    datapath::{PinnedMaps, iface_name},
    policy::{Action, Mode, Role},
};

#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub mode: &'static str,
    pub interfaces: Vec<InterfaceState>,
    pub rules: Vec<RuleState>,
    pub allowlist: Vec<String>,
    pub blocklist: Vec<String>,
    pub rule_counters: Vec<RuleCounter>,
    pub class_counters: Vec<ClassCounter>,
}

#[derive(Debug, Serialize)]
pub struct InterfaceState {
    pub name: String,
    pub role: &'static str,
    pub ifindex: u32,
    /// `native`, `generic` or `null` when no XDP program is attached.
    pub xdp: Option<&'static str>,
    pub tc_egress: bool,
    #[serde(skip)]
    pub slot: u32,
}

#[derive(Debug, Serialize)]
pub struct RuleState {
    pub rule: String,
    pub inbound: &'static str,
    pub outbound: &'static str,
    #[serde(skip)]
    pub slot: u32,
}

#[derive(Debug, Serialize)]
pub struct RuleCounter {
    pub interface: String,
    pub direction: &'static str,
    pub rule: String,
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
        let interfaces: Vec<InterfaceState> = maps
            .iface_slots()?
            .into_iter()
            .map(|(slot, info)| InterfaceState {
                name: iface_name(&info),
                role: Role::from_u32(info.role).label(),
                ifindex: info.ifindex,
                xdp: (info.attached & ATTACHED_XDP != 0).then_some(if info.xdp_generic != 0 {
                    "generic"
                } else {
                    "native"
                }),
                tc_egress: info.attached & ATTACHED_TC != 0,
                slot,
            })
            .collect();
        let rules: Vec<RuleState> = maps
            .rules()?
            .into_iter()
            .map(|(slot, info)| {
                let protocol = if info.protocol == Protocol::Tcp as u8 {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                };
                RuleState {
                    rule: format!("{}/{}", protocol.label(), info.port),
                    inbound: Action::from_u8(info.action[0]).label(),
                    outbound: Action::from_u8(info.action[1]).label(),
                    slot,
                }
            })
            .collect();

        let rule_map = maps.per_cpu_array::<Counter>(maps::RULE_COUNTERS)?;
        let class_map = maps.per_cpu_array::<Counter>(maps::CLASS_COUNTERS)?;
        let mut rule_counters = Vec::new();
        let mut class_counters = Vec::new();
        for iface in &interfaces {
            for dir in Direction::ALL {
                for rule in &rules {
                    for outcome in Outcome::ALL {
                        let index =
                            rule_counter_index(iface.slot, dir as u32, rule.slot, outcome as u32);
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
                    let c = PinnedMaps::counter_sum(
                        &class_map,
                        class_counter_index(iface.slot, dir as u32, class as u32),
                    )?;
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
        let list = |v4, v6| -> Result<Vec<String>> {
            Ok(maps
                .list_v4(v4)?
                .into_iter()
                .chain(maps.list_v6(v6)?)
                .map(|n| n.to_string())
                .collect())
        };
        Ok(Snapshot {
            mode: Mode::from_u32(settings.mode).label(),
            interfaces,
            rules,
            allowlist: list(maps::ALLOW_V4, maps::ALLOW_V6)?,
            blocklist: list(maps::BLOCK_V4, maps::BLOCK_V6)?,
            rule_counters,
            class_counters,
        })
    }
}
