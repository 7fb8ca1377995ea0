//! Reply-aware flagging, the controller's half: the kernel remembers a
//! probing source's first contacts and marks those the probed address
//! and port answered (`CONTACTS`); here each contact is judged once its
//! rule's `contact_secs` have passed, answered or failed, and a source
//! whose failures outnumber its answers by the rule's `failed_contacts`
//! is flagged: a threshold random walk (see
//! [`crate::policy::DEFAULT_FAILED_CONTACTS`] for its parameters).
//!
//! Contacts are judged only where netwatch sees both ways (an interface
//! with XDP and TC egress): elsewhere an answer could pass unseen and
//! every contact would look failed.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::Result;
use aya::maps::{HashMap as BpfHashMap, MapData};
use netwatch_common::{
    ATTACHED_TC, ATTACHED_XDP, CONTACT_ANSWERED, Classification, Contact, ContactKey, Direction, MAX_CONTACTS, Mode,
    SourceKey, maps,
};

use crate::{
    clock::boot_secs,
    datapath::{PinnedMaps, lists::ListKind},
    detection::sources::key_for,
    policy::Policy,
};

/// Walks kept at most (sources with first contacts judged in their
/// window); past it they start afresh, which only delays a flag.
const MAX_WALKS: usize = 100_000;

/// A source flagged for its failed first contacts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContactFlag {
    pub key: SourceKey,
    pub failed: u32,
    pub answered: u32,
    /// Auto-block it for this long: enforce mode, a rule with auto-block
    /// on, a source the allowlist does not hold.
    pub block_secs: Option<u32>,
}

/// One source's walk within its rule's window.
#[derive(Clone, Copy, Debug, Default)]
struct Walk {
    failed: u32,
    answered: u32,
    /// Failures minus answers, never below minus the rule's threshold
    /// (the walk's benign bound: a host whose contacts succeed earns at
    /// most that much credit, so after many answers a sweep is flagged
    /// within twice the threshold's failures).
    score: i32,
    started: u32,
    flagged: bool,
}

/// What the judge needs of a rule, by rule slot.
struct RuleTerms {
    failed_contacts: u32,
    contact_secs: u32,
    window_secs: u32,
    block_secs: u32,
}

pub struct Contacts {
    map: BpfHashMap<MapData, ContactKey, Contact>,
    walks: HashMap<SourceKey, Walk>,
    /// First contacts judged so far: answered, failed.
    pub answered: u64,
    pub failed: u64,
}

impl Contacts {
    pub fn open(maps: &PinnedMaps) -> Result<Self> {
        Ok(Contacts {
            map: BpfHashMap::try_from(maps.map_by_name(maps::CONTACTS)?)?,
            walks: HashMap::new(),
            answered: 0,
            failed: 0,
        })
    }

    /// Judges the contacts whose answer time has passed (deleting them
    /// from the kernel's map) and returns the sources flagged by them.
    pub fn judge(&mut self, maps: &PinnedMaps, policy: &Policy) -> Result<Vec<ContactFlag>> {
        // At most the map's size: a walk restarted by an eviction (the
        // kernel starts over when the key it continues from is gone)
        // neither judges a contact twice nor runs on. An entry evicted or
        // deleted during the walk ends it early; the rest is judged next
        // time.
        let pending: HashMap<ContactKey, Contact> = self
            .map
            .iter()
            .take(MAX_CONTACTS as usize)
            .map_while(|entry| entry.ok())
            .collect();
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        let now = boot_secs();
        let rules = rule_terms(maps, policy)?;
        let watched: HashSet<u32> = maps
            .iface_slots()?
            .into_iter()
            .filter(|(_, info)| info.attached & (ATTACHED_XDP | ATTACHED_TC) == ATTACHED_XDP | ATTACHED_TC)
            .map(|(slot, _)| slot)
            .collect();
        // Whole seconds on both sides: strictly more than `contact_secs`
        // of them waits at least `contact_secs`. A contact of a rule no
        // longer recording contacts is due at once (and dropped).
        let due = pending.into_iter().filter(|(_, contact)| {
            rules
                .get(&contact.rule)
                .is_none_or(|terms| now.wrapping_sub(contact.since) > terms.contact_secs)
        });
        let mut flags = Vec::new();
        let mut allowlist = None;
        for (key, contact) in due {
            // Judged once: by whoever deletes it (the kernel's LRU may
            // have evicted it meanwhile).
            if self.map.remove(&key).is_err() {
                continue;
            }
            let Some(terms) = rules.get(&contact.rule) else {
                continue;
            };
            if !watched.contains(&(contact.iface as u32)) {
                continue;
            }
            let source = key_for(
                prober_addr(&key),
                contact.rule,
                Direction::from(contact.direction),
                Classification::Scan,
            );
            if self.walks.len() >= MAX_WALKS && !self.walks.contains_key(&source) {
                self.walks.clear();
            }
            let walk = self.walks.entry(source).or_default();
            if walk.failed + walk.answered == 0 || now.wrapping_sub(walk.started) >= terms.window_secs {
                *walk = Walk {
                    started: now,
                    ..Walk::default()
                };
            }
            let bound = terms.failed_contacts as i32;
            if contact.answered == CONTACT_ANSWERED {
                self.answered += 1;
                walk.answered += 1;
                walk.score = (walk.score - 1).max(-bound);
            } else {
                self.failed += 1;
                walk.failed += 1;
                walk.score += 1;
            }
            if !walk.flagged && walk.score >= bound {
                walk.flagged = true;
                let auto_block = policy.mode == Mode::Enforce && terms.block_secs != 0;
                let block_secs = if auto_block {
                    let allowlist = match &mut allowlist {
                        Some(list) => list,
                        None => allowlist.insert(maps.list_in_force(ListKind::Allow)?),
                    };
                    let addr = prober_addr(&key);
                    (!allowlist.iter().any(|(net, _, _)| net.contains(&addr))).then_some(terms.block_secs)
                } else {
                    None
                };
                flags.push(ContactFlag {
                    key: source,
                    failed: walk.failed,
                    answered: walk.answered,
                    block_secs,
                });
            }
        }
        // Walks past their window are done.
        self.walks.retain(|key, walk| {
            rules
                .get(&key.rule)
                .is_some_and(|terms| now.wrapping_sub(walk.started) < terms.window_secs)
        });
        Ok(flags)
    }
}

/// The rules in force that record first contacts, by slot.
fn rule_terms(maps: &PinnedMaps, policy: &Policy) -> Result<HashMap<u8, RuleTerms>> {
    Ok(maps
        .rules_in_force()?
        .into_iter()
        .filter_map(|(slot, info, port_rule)| {
            let rule = policy
                .rules
                .iter()
                .find(|r| r.protocol == info.protocol() && r.port == info.port)?;
            (rule.detection.failed_contacts != 0).then_some((
                slot as u8,
                RuleTerms {
                    failed_contacts: rule.detection.failed_contacts,
                    contact_secs: rule.detection.contact_secs,
                    window_secs: port_rule.window_secs,
                    block_secs: port_rule.block_secs,
                },
            ))
        })
        .collect())
}

/// The prober's address of a contact: words as the packet held them.
fn prober_addr(key: &ContactKey) -> IpAddr {
    let mut bytes = [0u8; 16];
    for (i, word) in key.prober.iter().enumerate() {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    if (key.port >> 24) & 0x7 == 4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes))
    }
}
