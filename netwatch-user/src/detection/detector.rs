//! The controller's half of scan detection: turns the datapath's flag
//! events into incidents, keeps open incidents up to date with what the
//! kernel keeps counting, and records the flags whose events were lost.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use log::{info, warn};
use netwatch_common::{Direction, FlagEvent, FloodCache, SourceKey, SourceState, estimate_distinct};

use crate::{
    clock::{boot_secs, to_system},
    datapath::PinnedMaps,
    detection::incidents::{Classification, Observation, Seen, Store},
    detection::sources::{self, Names, Pending, addr_of, classification_of, key_for},
};

/// A flag within this long of an incident's last sighting updates it
/// instead of opening a new one.
pub const REOPEN_AFTER: Duration = Duration::from_secs(3600);
/// Open incidents followed at most (the rest still get their flag events).
const MAX_FOLLOWED: usize = 10_000;
/// Flagged sources without an incident recorded per walk of the source map
/// at most (a flood of flags is recorded over several walks, as long as
/// the kernel keeps the records).
pub const MAX_RECOVERED_PER_WALK: usize = 10_000;

pub struct Detector {
    store: Store,
    sources: BpfHashMap<MapData, SourceKey, SourceState>,
    memos: PerCpuArray<MapData, FloodCache>,
    blocks: BpfHashMap<MapData, SourceKey, u32>,
    maps: PinnedMaps,
    names: Names,
    /// Flagged sources whose incidents are still open, with when they were
    /// last seen moving.
    followed: HashMap<SourceKey, Instant>,
}

impl Detector {
    pub fn open(maps: &PinnedMaps, state_dir: &Path) -> Result<Self> {
        let store = Store::open(state_dir)?;
        let names = Names::read(maps)?;
        let mut detector = Detector {
            store,
            sources: sources::sources_map(maps)?,
            memos: sources::memo_map(maps)?,
            blocks: sources::blocks_map(maps)?,
            maps: maps.clone(),
            names,
            followed: HashMap::new(),
        };
        detector.follow_open_incidents()?;
        Ok(detector)
    }

    /// After a restart, keep following the incidents that are still open.
    fn follow_open_incidents(&mut self) -> Result<()> {
        let now = std::time::SystemTime::now();
        for incident in self.store.recent(MAX_FOLLOWED)? {
            if now.duration_since(incident.last_seen).unwrap_or_default() > REOPEN_AFTER {
                continue;
            }
            let direction = if incident.direction == "inbound" {
                Direction::Inbound
            } else {
                Direction::Outbound
            };
            let kind = match incident.classification {
                Classification::Scan => netwatch_common::KIND_PROBE,
                Classification::ReverseLookup => netwatch_common::KIND_REVERSE_LOOKUP,
            };
            if let Some(rule) = self.names.rule_slots().find(|s| self.names.rule(*s) == incident.rule) {
                self.followed
                    .insert(key_for(incident.source, rule, direction, kind), Instant::now());
            }
        }
        Ok(())
    }

    /// What the kernel's record says; `blocked_until`: the source's
    /// auto-block, if any.
    fn observation(&self, seen: Seen, key: &SourceKey, state: &SourceState, blocked_until: Option<u32>) -> Observation {
        let now = boot_secs();
        Observation {
            seen,
            source: addr_of(key),
            rule: self.names.rule(key.rule),
            direction: if key.direction == Direction::Inbound as u8 {
                "inbound"
            } else {
                "outbound"
            }
            .to_string(),
            interface: self.names.iface(state.iface as u32),
            classification: classification_of(key.kind),
            first_seen: to_system(state.first_seen),
            last_seen: to_system(state.last_seen),
            packets: state.packets,
            distinct_destinations: estimate_distinct(state.distinct as u32, state.flags),
            blocked_until: blocked_until.filter(|t| *t > now).map(to_system),
        }
    }

    /// A flag event from the datapath: record the incident.
    pub fn on_event(&mut self, event: &FlagEvent) -> Result<()> {
        if self.names.rule_slots().all(|s| s != event.key.rule) {
            // A rule added by a reload since we last looked.
            self.names = Names::read(&self.maps)?;
        }
        let mut state = SourceState {
            packets: event.packets,
            bytes: event.bytes,
            flags: event.flags,
            first_seen: event.first_seen,
            last_seen: event.last_seen,
            distinct: event.distinct as u16,
            iface: event.iface as u16,
            ..SourceState::default()
        };
        // Repeats other CPUs' memos held when the flag was raised are in
        // no record yet.
        Pending::read(&self.memos)?.add_to(&event.key, &mut state);
        let obs = self.observation(Seen::Flag, &event.key, &state, Some(event.blocked_until));
        // Follow first: if the write fails (a full disk), the refresh
        // retries it from the kernel's record, so the incident is not lost.
        self.follow(event.key);
        let id = self.store.record(&obs, REOPEN_AFTER)?;
        info!(
            "flagged {} ({} {} {} on {}): {} distinct destinations, {} packets{} — incident #{id}",
            obs.source,
            obs.classification.label(),
            obs.rule,
            obs.direction,
            obs.interface,
            obs.distinct_destinations,
            obs.packets,
            obs.blocked_until
                .map(|t| format!(", auto-blocked until {}", crate::clock::rfc3339(t)))
                .unwrap_or_default()
        );
        Ok(())
    }

    fn follow(&mut self, key: SourceKey) {
        self.followed.insert(key, Instant::now());
        if self.followed.len() > MAX_FOLLOWED
            && let Some(oldest) = self.followed.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k)
        {
            self.followed.remove(&oldest);
        }
    }

    /// Re-reads the rule names after a reload: a slot handed to a new rule
    /// must be recorded under the new rule's name.
    pub fn reload_names(&mut self, maps: &PinnedMaps) -> Result<()> {
        self.names = Names::read(maps)?;
        Ok(())
    }

    /// Brings open incidents up to date (packets, last seen, blocks) with
    /// one map lookup each; stops following those gone quiet.
    pub fn refresh(&mut self) -> Result<()> {
        let mut quiet = Vec::new();
        let keys: Vec<SourceKey> = self.followed.keys().copied().collect();
        let pending = Pending::read(&self.memos)?;
        let mut failed = None;
        for key in keys {
            match self.sources.get(&key, 0) {
                Ok(mut state) => {
                    pending.add_to(&key, &mut state);
                    let obs = self.observation(Seen::Refresh, &key, &state, self.blocks.get(&key, 0).ok());
                    if let Err(err) = self.store.record(&obs, REOPEN_AFTER) {
                        failed.get_or_insert(err);
                        continue;
                    }
                    if boot_secs().saturating_sub(state.last_seen) as u64 > REOPEN_AFTER.as_secs() {
                        quiet.push(key);
                    }
                }
                // Evicted by the LRU: the incident keeps its last values.
                Err(_) => quiet.push(key),
            }
        }
        for key in quiet {
            self.followed.remove(&key);
        }
        failed.map_or(Ok(()), Err)
    }

    /// Keys of the incidents followed: the walk of the source map skips
    /// them (see [`Detector::recover`]).
    pub fn followed_keys(&self) -> HashSet<SourceKey> {
        self.followed.keys().copied().collect()
    }

    /// Records flagged sources (from a walk of the source map, see
    /// [`sources::census`]) that have no open incident as incidents marked
    /// recovered: their flag events were lost to the per-CPU budget or a
    /// full ring buffer. Returns how many it recorded.
    pub fn recover(&mut self, flagged: &[(SourceKey, SourceState)]) -> Result<usize> {
        if flagged
            .iter()
            .any(|(k, _)| self.names.rule_slots().all(|s| s != k.rule))
        {
            self.names = Names::read(&self.maps)?;
        }
        let pending = Pending::read(&self.memos)?;
        let mut keys = Vec::new();
        let observations: Vec<Observation> = flagged
            .iter()
            .filter(|(key, _)| !self.followed.contains_key(key))
            .map(|(key, state)| {
                let mut state = *state;
                pending.add_to(key, &mut state);
                keys.push(*key);
                self.observation(Seen::Recovered, key, &state, self.blocks.get(key, 0).ok())
            })
            .collect();
        let n = self.store.record_new(&observations, REOPEN_AFTER)?;
        // Follow them while there is room (the followed set is for open
        // incidents that flag events opened first).
        for key in keys {
            if self.followed.len() >= MAX_FOLLOWED {
                break;
            }
            self.followed.insert(key, Instant::now());
        }
        Ok(n)
    }
}

/// Reads a flag event out of a ring buffer record.
pub fn parse_event(bytes: &[u8]) -> Option<FlagEvent> {
    if bytes.len() < std::mem::size_of::<FlagEvent>() {
        warn!("short ring buffer record ({} bytes)", bytes.len());
        return None;
    }
    // SAFETY: FlagEvent is plain data; read_unaligned copes with alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const FlagEvent) })
}
