//! Writing policy into the maps, atomic as the datapath sees it.
//!
//! The maps hold two versions of the policy (rules, list answers,
//! settings; see `netwatch_common::Settings`). Every change — a start, a
//! SIGHUP reload, `netwatch block/allow/unblock/disallow`, the expiry of a
//! `--ttl` entry — builds the version not in force completely and then
//! switches `Settings::active` with one write. The datapath sees the old
//! policy or the new one, never a mix; a crash before the switch leaves the
//! old one in force, after it the new one. Writers hold the policy lock, so
//! a reload and a command-line change never undo each other.

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::Path,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    maps::{MapData, PerCpuValues},
    util::nr_cpus,
};
use ipnet::IpNet;
use netwatch_common::{
    Counter, Direction, HASH_KEY_WORDS, ListEntry, MAX_CIDRS, MAX_IFACES, MAX_RULES, MAX_WEB_PORTS, Outcome,
    PORT_CONTACTS, PORT_NBNS, PORT_WEB, PolicySettings, PortRule, PortRules, Protocol, RuleInfo, Settings, SourceKey,
    actions, bitmap_bits_for, flag_counter_index, maps, port_rule_index, rule_counter_index,
};

use super::lists::{ListItem, ListKind};
use crate::{
    clock::boot_secs,
    datapath::PinnedMaps,
    policy::{Policy, check_allow_block},
};

/// Serialises every writer of policy (the daemon's starts and reloads,
/// the list commands, expiry) on one pin directory. Released on drop.
pub struct PolicyLock {
    _dir: fs::File,
}

/// The policy lock: a directory in the pin directory, since bpffs holds
/// no regular files (nor names with a dot).
pub const LOCK_DIR: &str = "policy_lock";

/// Takes the policy lock of `pin_dir`, waiting for the current holder.
pub fn lock(pin_dir: &Path) -> Result<PolicyLock> {
    let path = pin_dir.join(LOCK_DIR);
    match fs::create_dir(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
    }
    let dir = fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    dir.lock().with_context(|| format!("locking {}", path.display()))?;
    Ok(PolicyLock { _dir: dir })
}

/// Everything one policy version holds besides the lists' answers.
struct VersionSpec {
    /// Rules with their slots.
    rules: Vec<(u32, RuleInfo, PortRule)>,
    /// Slots taken from a rule still in force (all 64 were in use): purged
    /// again once the switch has stopped the old rule's traffic.
    purge_after: Vec<u32>,
    settings: PolicySettings,
    /// Config entries of each list.
    config: HashMap<ListKind, Vec<IpNet>>,
}

/// A change of the command-line list entries.
pub enum CliChange {
    /// Add or replace the entry of a CIDR (until = `LIST_FOREVER` or when
    /// it ends).
    Add { kind: ListKind, net: IpNet, until: u32 },
    /// Remove the entry of exactly this CIDR.
    Remove { kind: ListKind, net: IpNet },
    /// Only drop command-line entries that have expired.
    Expire,
}

/// Writes a policy from the config (start, reload) and puts it in force.
pub fn apply_policy(maps: &PinnedMaps, policy: &Policy) -> Result<()> {
    let _lock = lock(maps.dir())?;
    let settings = maps.settings()?;
    let next = 1 - (settings.active & 1);
    let (rules, purge_after) = assign_rule_slots(maps, policy, settings.active & 1)?;
    let mut web_ports = [0u16; MAX_WEB_PORTS];
    web_ports[..policy.web_ports.len()].copy_from_slice(&policy.web_ports);
    let spec = VersionSpec {
        rules,
        purge_after,
        settings: PolicySettings {
            mode: policy.mode.into(),
            allowlist_active: 0,
            blocklist_active: 0,
            visitor_secs: policy.visitor_secs,
            web_ports,
        },
        config: HashMap::from([
            (ListKind::Allow, policy.allowlist.clone()),
            (ListKind::Block, policy.blocklist.clone()),
        ]),
    };
    install(maps, spec, next)
}

/// Changes the command-line list entries: the policy in force with the
/// change, installed as the next version. Returns whether there was
/// anything to change (false: `Remove` of a CIDR not on the list).
pub fn change_lists(maps: &PinnedMaps, change: CliChange) -> Result<bool> {
    let _lock = lock(maps.dir())?;
    let settings = maps.settings()?;
    let live = settings.active & 1;
    let now = boot_secs();
    match &change {
        CliChange::Add { kind, net, until } => {
            let in_force = |k| -> Result<Vec<IpNet>> {
                Ok(maps
                    .list(k)?
                    .into_iter()
                    .filter(|i| i.own_until(live, now).is_some())
                    .map(|i| i.net)
                    .collect())
            };
            let (allow, block) = match kind {
                ListKind::Allow => (vec![*net], in_force(ListKind::Block)?),
                ListKind::Block => (in_force(ListKind::Allow)?, vec![*net]),
            };
            check_allow_block(&allow, &block)?;
            let list = maps.list(*kind)?;
            let same_family =
                |n: &IpNet| matches!((n, net), (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_)));
            let live_entries = list
                .iter()
                .filter(|i| same_family(&i.net) && i.net != *net && i.own_until(live, now).is_some())
                .count();
            if live_entries >= MAX_CIDRS as usize {
                bail!(
                    "the {} already has {MAX_CIDRS} entries for this address family; remove some first",
                    kind.label()
                );
            }
            let mut entry = match list.iter().find(|i| i.net == *net) {
                Some(item) => item.entry,
                // A new prefix answers, in the version in force, what the
                // entries around it answer until the switch.
                None => {
                    let mut entry = ListEntry::default();
                    entry.until[live as usize] = covering_until(&own_entries(&list, live, now), net);
                    entry
                }
            };
            entry.cli_until = *until;
            maps.list_write(*kind, *net, entry)?;
        }
        CliChange::Remove { kind, net } => {
            let list = maps.list(*kind)?;
            match list.into_iter().find(|i| i.net == *net) {
                Some(mut item) if item.entry.cli_until > now => {
                    item.entry.cli_until = 0;
                    maps.list_write(*kind, *net, item.entry)?;
                }
                Some(item) if item.from_config(live) => bail!(
                    "{net} is in the {} of the config file; remove it there and reload (SIGHUP)",
                    kind.label()
                ),
                _ => return Ok(false),
            }
        }
        CliChange::Expire => {
            let mut any = false;
            for kind in ListKind::ALL {
                for mut item in maps.list(kind)? {
                    if item.entry.cli_until != 0 && item.entry.cli_until <= now {
                        item.entry.cli_until = 0;
                        maps.list_write(kind, item.net, item.entry)?;
                        any = true;
                    }
                }
            }
            if !any {
                return Ok(false);
            }
        }
    }
    let spec = spec_in_force(maps, &settings)?;
    install(maps, spec, 1 - live)?;
    Ok(true)
}

/// The version in force, as a spec to install again (with the lists'
/// command-line entries as they are now).
fn spec_in_force(maps: &PinnedMaps, settings: &Settings) -> Result<VersionSpec> {
    let live = settings.active & 1;
    let rules = maps.rules_in_force()?;
    let mut config = HashMap::new();
    for kind in ListKind::ALL {
        config.insert(
            kind,
            maps.list(kind)?
                .into_iter()
                .filter(|i| i.from_config(live))
                .map(|i| i.net)
                .collect(),
        );
    }
    Ok(VersionSpec {
        rules,
        purge_after: Vec::new(),
        settings: *settings.policy(live),
        config,
    })
}

/// Builds version `next` from `spec` completely, then puts it in force.
fn install(maps: &PinnedMaps, mut spec: VersionSpec, next: u32) -> Result<()> {
    let settings = maps.settings()?;
    let live = settings.active & 1;
    if next == live {
        bail!("internal error: installing over the policy version in force");
    }

    // Rule slots: bit `next` of each slot says version `next` holds it.
    let mut rule_info = maps.array::<RuleInfo>(maps::RULE_INFO)?;
    let mut stale_indexes = HashSet::new();
    for (slot, mut info) in maps.rule_slots_all()? {
        if info.in_use & (1 << next) != 0 {
            stale_indexes.insert(info.port_rule_index());
        }
        let wanted = spec.rules.iter().find(|(s, _, _)| *s == slot);
        let in_use = (info.in_use & !(1 << next)) | if wanted.is_some() { 1 << next } else { 0 };
        if let Some((_, want, _)) = wanted {
            info = RuleInfo { in_use, ..*want };
        } else {
            info.in_use = in_use;
        }
        rule_info.set(slot, info, 0)?;
    }

    // The port table: version `next` of every (protocol, port) it touches.
    let mut port_rules = maps.array::<PortRules>(maps::PORT_RULES)?;
    let mut wanted: HashMap<u32, PortRule> = HashMap::new();
    for port in settings.policy(next).web_ports.iter().filter(|p| **p != 0) {
        stale_indexes.insert(port_rule_index(Protocol::Tcp, *port));
    }
    for (_, info, rule) in &spec.rules {
        wanted.insert(info.port_rule_index(), *rule);
    }
    for port in spec.settings.web_ports.iter().filter(|p| **p != 0) {
        wanted.entry(port_rule_index(Protocol::Tcp, *port)).or_default().flags |= PORT_WEB;
    }
    for index in stale_indexes.iter().chain(wanted.keys()) {
        let mut entry = port_rules.get(index, 0)?;
        let version = wanted.get(index).copied().unwrap_or_default();
        if entry.versions[next as usize] != version {
            entry.versions[next as usize] = version;
            port_rules.set(*index, entry, 0)?;
        }
    }

    // The lists' answers for version `next`.
    let now = boot_secs();
    for kind in ListKind::ALL {
        let config = spec.config.remove(&kind).unwrap_or_default();
        let any = write_list_version(maps, kind, next, &config, now)?;
        match kind {
            ListKind::Allow => spec.settings.allowlist_active = any as u32,
            ListKind::Block => spec.settings.blocklist_active = any as u32,
        }
    }

    // Settings of version `next`, then the switch.
    let mut new = settings;
    new.versions[next as usize] = spec.settings;
    if new.hash_key == [0; HASH_KEY_WORDS] {
        new.hash_key = new_hash_key()?;
    }
    let mut settings_map = maps.array::<Settings>(maps::SETTINGS)?;
    settings_map.set(0, new, 0)?;
    new.switch_to(next);
    settings_map.set(0, new, 0)?;

    for slot in &spec.purge_after {
        purge_rule_slot(maps, *slot)?;
    }
    // Now that `next` is in force, drop prefixes that carry nothing in it.
    for kind in ListKind::ALL {
        for item in maps.list(kind)? {
            if item.own_until(next, now).is_none() {
                maps.list_delete(kind, item.net)?;
            }
        }
    }
    Ok(())
}

/// Writes version `version` of a list: `config` as its config entries,
/// the command-line entries as they are, and every stored prefix's answer.
/// Returns whether the version has any entry.
fn write_list_version(maps: &PinnedMaps, kind: ListKind, version: u32, config: &[IpNet], now: u32) -> Result<bool> {
    let stored = maps.list(kind)?;
    let bit = 1u32 << version;
    let mut entries: HashMap<IpNet, ListEntry> = stored.iter().map(|i| (i.net, i.entry)).collect();
    for entry in entries.values_mut() {
        entry.config_versions &= !bit;
    }
    for net in config {
        entries.entry(*net).or_default().config_versions |= bit;
    }
    let items: Vec<ListItem> = entries
        .iter()
        .map(|(net, entry)| ListItem {
            net: *net,
            entry: *entry,
        })
        .collect();
    let own = own_entries(&items, version, now);
    // A prefix new to the trie must keep answering, in the version in
    // force, what the entries around it answer there until the switch.
    let other = 1 - version;
    let own_in_force = own_entries(&stored, other, now);
    let before: HashMap<IpNet, ListEntry> = stored.into_iter().map(|i| (i.net, i.entry)).collect();
    for (net, entry) in &mut entries {
        entry.until[version as usize] = covering_until(&own, net);
        if !before.contains_key(net) {
            entry.until[other as usize] = covering_until(&own_in_force, net);
        }
        if before.get(net) != Some(entry) {
            maps.list_write(kind, *net, *entry)?;
        }
    }
    Ok(!own.is_empty())
}

/// The prefixes with an entry of their own in `version` at `now`, and
/// when each ends.
fn own_entries(items: &[ListItem], version: u32, now: u32) -> HashMap<IpNet, u32> {
    items
        .iter()
        .filter_map(|item| item.own_until(version, now).map(|until| (item.net, until)))
        .collect()
}

/// The latest end among the entries of `own` that contain `net` (0: none).
fn covering_until(own: &HashMap<IpNet, u32>, net: &IpNet) -> u32 {
    (0..=net.prefix_len())
        .filter_map(|len| {
            let wider = IpNet::new(net.addr(), len).expect("shorter prefix").trunc();
            own.get(&wider).copied()
        })
        .max()
        .unwrap_or(0)
}

/// Slots for the rules of `policy`: a rule in force keeps its slot; a rule
/// coming back takes the slot it had (its counters continue); a new rule
/// takes a slot never used, or else one last used by another rule, whose
/// counters and per-source state are purged first. A slot held by the
/// version in force goes to another rule only when no other is left; it
/// is purged again after the switch (the second list returned).
#[allow(clippy::type_complexity)]
fn assign_rule_slots(
    maps: &PinnedMaps,
    policy: &Policy,
    live: u32,
) -> Result<(Vec<(u32, RuleInfo, PortRule)>, Vec<u32>)> {
    let mut slots: Vec<RuleInfo> = maps.rule_slots_all()?.into_iter().map(|(_, info)| info).collect();
    let same = |info: &RuleInfo, protocol: Protocol, port: u16| info.protocol() == protocol && info.port == port;
    let mut taken = HashSet::new();
    let mut out = Vec::new();
    let mut purge_after = Vec::new();
    let kept = |i: &RuleInfo| policy.rules.iter().any(|r| same(i, r.protocol, r.port));
    for rule in &policy.rules {
        let held = |i: &RuleInfo| i.in_use & (1 << live) != 0;
        let free = |s: usize, i: &RuleInfo| !held(i) && !taken.contains(&s);
        let slot = slots
            .iter()
            .enumerate()
            .position(|(s, i)| !taken.contains(&s) && same(i, rule.protocol, rule.port))
            .or_else(|| slots.iter().enumerate().position(|(s, i)| free(s, i) && i.port == 0))
            .or_else(|| slots.iter().enumerate().position(|(s, i)| free(s, i)))
            .or_else(|| {
                let slot = slots
                    .iter()
                    .enumerate()
                    .position(|(s, i)| !taken.contains(&s) && !kept(i))?;
                purge_after.push(slot as u32);
                Some(slot)
            })
            .ok_or_else(|| anyhow!("more than {MAX_RULES} rules"))?;
        taken.insert(slot);
        if !same(&slots[slot], rule.protocol, rule.port) {
            if slots[slot].port != 0 {
                purge_rule_slot(maps, slot as u32)?;
            }
            slots[slot] = RuleInfo {
                protocol: rule.protocol.into(),
                port: rule.port,
                ..RuleInfo::default()
            };
        }
        let d = &rule.detection;
        let mut flags = if rule.is_netbios_ns() { PORT_NBNS } else { 0 };
        if d.failed_contacts != 0 {
            flags |= PORT_CONTACTS;
        }
        if rule.protocol == Protocol::Tcp && policy.web_ports.contains(&rule.port) {
            flags |= PORT_WEB;
        }
        let info = RuleInfo {
            in_use: slots[slot].in_use,
            protocol: rule.protocol.into(),
            port: rule.port,
            action: actions(rule.inbound, rule.outbound),
            _pad: [0; 2],
        };
        let port_rule = PortRule {
            id: slot as u16 + 1,
            action: actions(rule.inbound, rule.outbound),
            flags,
            threshold: d.threshold,
            flag_bits: bitmap_bits_for(d.threshold),
            window_secs: d.window_secs,
            block_secs: d.block_secs.unwrap_or(0),
        };
        out.push((slot as u32, info, port_rule));
    }
    Ok((out, purge_after))
}

/// A rule slot handed to a different rule starts clean: its counters, the
/// per-source records and the auto-blocks its old rule left.
fn purge_rule_slot(maps: &PinnedMaps, slot: u32) -> Result<()> {
    let cpus = nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
    for name in [maps::RULE_COUNTERS, maps::REVERSE_COUNTERS] {
        let mut counters = maps.per_cpu_array::<Counter>(name)?;
        for iface in 0..MAX_IFACES {
            for dir in Direction::ALL {
                for outcome in Outcome::ALL {
                    let zeros = PerCpuValues::try_from(vec![Counter::default(); cpus])?;
                    counters.set(rule_counter_index(iface, dir, slot, outcome), zeros, 0)?;
                }
            }
        }
    }
    let mut flags = maps.per_cpu_array::<u64>(maps::FLAG_COUNTERS)?;
    for dir in Direction::ALL {
        flags.set(
            flag_counter_index(slot, dir),
            PerCpuValues::try_from(vec![0u64; cpus])?,
            0,
        )?;
    }
    let mut contact_flags = maps.array::<u64>(maps::CONTACT_FLAGS)?;
    for dir in Direction::ALL {
        contact_flags.set(flag_counter_index(slot, dir), 0, 0)?;
    }
    let mut stale: Vec<SourceKey> = Vec::new();
    crate::detection::sources::for_each(maps, |key, _| {
        if key.rule as u32 == slot {
            stale.push(*key);
        }
    })?;
    let mut sources: aya::maps::HashMap<MapData, SourceKey, netwatch_common::SourceState> =
        aya::maps::HashMap::try_from(maps.map_by_name(maps::SOURCES)?)?;
    for key in &stale {
        // Gone already (evicted) is as good as removed.
        let _ = sources.remove(key);
    }
    let mut blocks = crate::detection::sources::blocks_map(maps)?;
    for (key, _) in crate::detection::sources::blocks(maps)? {
        if key.rule as u32 == slot {
            let _ = blocks.remove(&key);
        }
    }
    Ok(())
}

/// A fresh secret key for the destination hash, from the kernel's CSPRNG.
/// Odd multipliers keep every word of the address in the hash.
fn new_hash_key() -> Result<[u64; HASH_KEY_WORDS]> {
    let mut bytes = [0u8; HASH_KEY_WORDS * 8];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("reading /dev/urandom for the destination hash key")?;
    let mut key = [0u64; HASH_KEY_WORDS];
    for (word, chunk) in key.iter_mut().zip(bytes.chunks_exact(8)) {
        *word = u64::from_ne_bytes(chunk.try_into().expect("8 bytes")) | 1;
    }
    Ok(key)
}
