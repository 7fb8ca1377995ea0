//! Reading the kernel's per-source map: a source's record (`lookup`),
//! the busiest sources (`top`), how many are tracked and which are
//! flagged (`census`); and the auto-blocks, which live in a map of their
//! own (`AUTO_BLOCKS`).

use std::{
    collections::{BinaryHeap, HashMap as StdHashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::Result;
use aya::maps::{HashMap, MapData, PerCpuArray};
use netwatch_common::{
    Classification, Direction, FloodCache, RuleInfo, SOURCE_FLAGGED, SourceKey, SourceState, estimate_distinct, maps,
};
use serde::Serialize;

use crate::{
    clock::boot_rfc3339,
    datapath::{PinnedMaps, iface_name},
};

/// A tracked source as the CLI and the HTTP API show it.
#[derive(Clone, Debug, Serialize)]
pub struct SourceView {
    pub source: IpAddr,
    pub rule: String,
    pub direction: &'static str,
    pub interface: String,
    pub classification: Classification,
    pub first_seen: String,
    pub last_seen: String,
    pub packets: u64,
    pub bytes: u64,
    /// Distinct destinations in the current window (exact up to 32, an
    /// estimate above).
    pub distinct_destinations: u32,
    pub flagged: bool,
    pub blocked_until: Option<String>,
}

pub fn key_for(addr: IpAddr, rule: u8, direction: Direction, classification: Classification) -> SourceKey {
    let mut key = SourceKey::new(rule, direction, classification);
    match addr {
        IpAddr::V4(a) => {
            key.addr[..4].copy_from_slice(&a.octets());
            key.family = 4;
        }
        IpAddr::V6(a) => {
            key.addr = a.octets();
            key.family = 6;
        }
    }
    key
}

pub fn addr_of(key: &SourceKey) -> IpAddr {
    if key.family == 4 {
        IpAddr::V4(Ipv4Addr::new(key.addr[0], key.addr[1], key.addr[2], key.addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(key.addr))
    }
}

/// A rule as it is named everywhere: `udp/137`.
pub fn rule_label(info: &RuleInfo) -> String {
    format!("{}/{}", info.protocol().label(), info.port)
}

/// Names of rule slots and interface slots, to label keys.
pub struct Names {
    rules: StdHashMap<u8, String>,
    ifaces: StdHashMap<u32, String>,
}

impl Names {
    pub fn read(maps: &PinnedMaps) -> Result<Self> {
        // Slots of either policy version: a flag raised just before a
        // reload still names the rule that raised it.
        let rules = maps
            .rule_slots_all()?
            .into_iter()
            .filter(|(_, info)| info.in_use != 0)
            .map(|(slot, info)| (slot as u8, rule_label(&info)))
            .collect();
        let ifaces = maps
            .iface_slots()?
            .into_iter()
            .map(|(slot, info)| (slot, iface_name(&info)))
            .collect();
        Ok(Names { rules, ifaces })
    }

    pub fn rule(&self, slot: u8) -> String {
        self.rules.get(&slot).cloned().unwrap_or_else(|| format!("rule#{slot}"))
    }

    pub fn iface(&self, slot: u32) -> String {
        self.ifaces.get(&slot).cloned().unwrap_or_else(|| format!("if#{slot}"))
    }

    pub fn rule_slots(&self) -> impl Iterator<Item = u8> + '_ {
        self.rules.keys().copied()
    }
}

/// A record as shown; `blocked_until` is its source's auto-block, if any
/// (from `AUTO_BLOCKS`, see [`blocks`]).
pub fn view(names: &Names, key: &SourceKey, state: &SourceState, blocked_until: Option<u32>) -> SourceView {
    let now = crate::clock::boot_secs();
    SourceView {
        source: addr_of(key),
        rule: names.rule(key.rule),
        direction: key.direction().label(),
        interface: names.iface(state.iface as u32),
        classification: key.classification(),
        first_seen: boot_rfc3339(state.first_seen),
        last_seen: boot_rfc3339(state.last_seen),
        packets: state.packets,
        bytes: state.bytes,
        distinct_destinations: estimate_distinct(state.distinct as u32, state.flags),
        flagged: state.flags & SOURCE_FLAGGED != 0,
        blocked_until: blocked_until.filter(|until| *until > now).map(boot_rfc3339),
    }
}

pub fn sources_map(maps: &PinnedMaps) -> Result<HashMap<MapData, SourceKey, SourceState>> {
    Ok(HashMap::try_from(maps.map_by_name(maps::SOURCES)?)?)
}

pub fn memo_map(maps: &PinnedMaps) -> Result<PerCpuArray<MapData, FloodCache>> {
    maps.per_cpu_array::<FloodCache>(maps::FLOOD_CACHE)
}

/// Counts of a flood still held in the CPUs' memos (see `FloodCache`):
/// they belong to the record of the memo's key, and every reader of a
/// record (`lookup`, `top`, flag events, incident refreshes, the census) adds
/// them through this one type.
pub struct Pending(Vec<FloodCache>);

impl Pending {
    pub fn read(memos: &PerCpuArray<MapData, FloodCache>) -> Result<Self> {
        Ok(Pending(memos.get(&0, 0)?.iter().copied().collect()))
    }

    /// Adds what the memos hold for `key` to `state`.
    pub fn add_to(&self, key: &SourceKey, state: &mut SourceState) {
        for memo in self.0.iter().filter(|m| m.key == *key) {
            state.packets += memo.pending_packets as u64;
            state.bytes += memo.pending_bytes as u64;
        }
    }
}

/// Everything the kernel tracks about `addr`, by direct lookups (one per
/// rule, direction and kind), never a walk of the map.
pub fn lookup(maps: &PinnedMaps, names: &Names, addr: IpAddr) -> Result<Vec<SourceView>> {
    let map = sources_map(maps)?;
    let pending = Pending::read(&memo_map(maps)?)?;
    let blocks = blocks_map(maps)?;
    let mut out = Vec::new();
    for rule in names.rule_slots() {
        for dir in Direction::ALL {
            for classification in Classification::ALL {
                let key = key_for(addr, rule, dir, classification);
                if let Ok(mut state) = map.get(&key, 0) {
                    pending.add_to(&key, &mut state);
                    out.push(view(names, &key, &state, blocks.get(&key, 0).ok()));
                }
            }
        }
    }
    out.sort_by(|a, b| b.last_seen.cmp(&a.last_seen));
    Ok(out)
}

/// An auto-block as `lookup` shows it (whether or not the kernel still
/// holds the source's record).
#[derive(Clone, Debug, Serialize)]
pub struct BlockView {
    pub rule: String,
    pub direction: &'static str,
    pub blocked_until: String,
}

pub fn blocks_map(maps: &PinnedMaps) -> Result<HashMap<MapData, SourceKey, u32>> {
    Ok(HashMap::try_from(maps.map_by_name(maps::AUTO_BLOCKS)?)?)
}

/// Every entry of `AUTO_BLOCKS` (at most `MAX_AUTO_BLOCKS`), expired ones
/// included: key, end of the block.
pub fn blocks(maps: &PinnedMaps) -> Result<Vec<(SourceKey, u32)>> {
    let map = blocks_map(maps)?;
    let keys: Vec<SourceKey> = map.keys().collect::<Result<_, _>>()?;
    // An entry deleted between the two reads is simply gone.
    Ok(keys
        .into_iter()
        .filter_map(|key| map.get(&key, 0).ok().map(|until| (key, until)))
        .collect())
}

/// Auto-blocks of `addr` in force, newest end first.
pub fn blocks_of(maps: &PinnedMaps, names: &Names, addr: IpAddr) -> Result<Vec<BlockView>> {
    let now = crate::clock::boot_secs();
    let mut found: Vec<(SourceKey, u32)> = blocks(maps)?
        .into_iter()
        .filter(|(key, until)| *until > now && addr_of(key) == addr)
        .collect();
    found.sort_by_key(|(_, until)| std::cmp::Reverse(*until));
    Ok(found
        .iter()
        .map(|(key, until)| BlockView {
            rule: names.rule(key.rule),
            direction: Direction::ALL[(key.direction & 1) as usize].label(),
            blocked_until: boot_rfc3339(*until),
        })
        .collect())
}

/// Entries fetched per BPF_MAP_LOOKUP_BATCH call.
const BATCH: usize = 4096;

/// Visits every record of the per-source map with BPF_MAP_LOOKUP_BATCH:
/// a few hundred syscalls for a million records instead of two million,
/// and a fixed buffer of `BATCH` records.
pub fn for_each(maps: &PinnedMaps, mut f: impl FnMut(&SourceKey, &SourceState)) -> Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let map = maps.map_by_name(maps::SOURCES)?;
    let aya::maps::Map::LruHashMap(data) = &map else {
        anyhow::bail!("pinned SOURCES is not an LRU hash map");
    };
    let fd = data.fd().as_fd().as_raw_fd();
    let mut keys = vec![SourceKey::default(); BATCH];
    let mut values = vec![SourceState::default(); BATCH];
    // Opaque batch cursors (a bucket index for hash maps).
    let mut cursor = [0u64; 2];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { cursor.as_ptr() as u64 },
            out_batch: cursor[1..].as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: the attribute points at buffers of BATCH keys and values
        // that outlive the call, and at the cursor words.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        let done = matches!(&err, Some(e) if e.raw_os_error() == Some(libc::ENOENT));
        if let Some(e) = err
            && !done
        {
            return Err(anyhow::Error::from(e).context("BPF_MAP_LOOKUP_BATCH on the per-source map"));
        }
        for i in 0..attr.count as usize {
            f(&keys[i], &values[i]);
        }
        if done {
            return Ok(());
        }
        cursor[0] = cursor[1];
        first = false;
    }
}

/// The `limit` sources with the most packets (walks the map in batches).
pub fn top(maps: &PinnedMaps, names: &Names, limit: usize) -> Result<Vec<SourceView>> {
    // A min-heap of the best `limit` so far: memory stays O(limit).
    let mut heap: BinaryHeap<std::cmp::Reverse<(u64, u64, [u8; 20])>> = BinaryHeap::new();
    let mut states = StdHashMap::new();
    // Ranked by what the sources sent, repeats still in the memos included.
    let pending = Pending::read(&memo_map(maps)?)?;
    for_each(maps, |key, state| {
        let mut state = *state;
        pending.add_to(key, &mut state);
        let state = &state;
        let raw = key_bytes(key);
        heap.push(std::cmp::Reverse((state.packets, state.bytes, raw)));
        states.insert(raw, (*key, *state));
        if heap.len() > limit
            && let Some(std::cmp::Reverse((_, _, evicted))) = heap.pop()
        {
            states.remove(&evicted);
        }
    })?;
    let blocks: StdHashMap<SourceKey, u32> = blocks(maps)?.into_iter().collect();
    let mut out: Vec<SourceView> = states
        .values()
        .map(|(k, s)| view(names, k, s, blocks.get(k).copied()))
        .collect();
    out.sort_by(|a, b| b.packets.cmp(&a.packets).then(b.bytes.cmp(&a.bytes)));
    Ok(out)
}

fn key_bytes(key: &SourceKey) -> [u8; 20] {
    let mut v = [0u8; 20];
    v[..16].copy_from_slice(&key.addr);
    v[16..].copy_from_slice(&[key.family, key.rule, key.direction, key.classification]);
    v
}

/// Number of tracked sources.
pub fn count(maps: &PinnedMaps) -> Result<u64> {
    let mut n = 0;
    for_each(maps, |_, _| n += 1)?;
    Ok(n)
}

/// What one walk of the per-source map found.
#[derive(Debug, Default)]
pub struct Census {
    /// Records in the map.
    pub tracked: u64,
    /// Records the kernel had created when the walk began: `created -
    /// tracked` is what was evicted by then (at least).
    pub created: u64,
    /// Flagged probe records (scans) whose keys are not in the walk's
    /// `skip` set, at most `max` of them.
    pub flagged: Vec<(SourceKey, SourceState)>,
    /// Flagged records past `max`, left for a later walk.
    pub more_flagged: u64,
}

/// Counts the tracked sources and collects flagged ones (see [`Census`]).
pub fn census(maps: &PinnedMaps, skip: &HashSet<SourceKey>, max: usize) -> Result<Census> {
    let mut census = Census {
        created: maps.stat(netwatch_common::STAT_SOURCES_CREATED)?,
        ..Census::default()
    };
    for_each(maps, |key, state| {
        census.tracked += 1;
        if key.classification() == Classification::Scan && state.flags & SOURCE_FLAGGED != 0 && !skip.contains(key) {
            if census.flagged.len() < max {
                census.flagged.push((*key, *state));
            } else {
                census.more_flagged += 1;
            }
        }
    })?;
    Ok(census)
}

/// Lifts the auto-blocks of every source inside `net`: deletes their
/// entries from `AUTO_BLOCKS` (which frees their slots of the cap) and
/// touches nothing else. Returns how many of them were in force.
pub fn lift_auto_blocks(maps: &PinnedMaps, net: ipnet::IpNet) -> Result<usize> {
    let now = crate::clock::boot_secs();
    let mut map = blocks_map(maps)?;
    let mut lifted = 0;
    for (key, until) in blocks(maps)? {
        if net.contains(&addr_of(&key)) && map.remove(&key).is_ok() && until > now {
            lifted += 1;
        }
    }
    Ok(lifted)
}

/// Deletes the entries of `AUTO_BLOCKS` that are no blocks in force: the
/// expired ones (the datapath deletes those it meets; this catches the
/// rest) and those of rule slots without auto-block now (a reload turned
/// it off or removed the rule; the datapath no longer consults them). So
/// the cap counts only blocks in force. Returns how many it deleted.
pub fn sweep_auto_blocks(maps: &PinnedMaps) -> Result<usize> {
    let entries = blocks(maps)?;
    if entries.is_empty() {
        return Ok(0);
    }
    let now = crate::clock::boot_secs();
    let auto_block_slots: HashSet<u8> = maps
        .rules_in_force()?
        .into_iter()
        .filter(|(_, _, rule)| rule.block_secs != 0)
        .map(|(slot, _, _)| slot as u8)
        .collect();
    let mut map = blocks_map(maps)?;
    let mut deleted = 0;
    for (key, until) in entries {
        // Re-read just before deleting: the datapath may have replaced an
        // expired block by a new one since.
        if (until <= now || !auto_block_slots.contains(&key.rule))
            && map.get(&key, 0).ok() == Some(until)
            && map.remove(&key).is_ok()
        {
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Auto-blocks in force: entries of `AUTO_BLOCKS` whose end has not passed.
pub fn blocks_in_force(maps: &PinnedMaps) -> Result<u64> {
    let now = crate::clock::boot_secs();
    Ok(blocks(maps)?.iter().filter(|(_, until)| *until > now).count() as u64)
}
