//! The controller's half of scan detection: turns the datapath's flag
//! events into incidents, keeps open incidents up to date with what the
//! kernel keeps counting, and records the flags whose events were lost.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray};
use log::{error, info, warn};
use netwatch_common::{
    Direction, FlagEvent, FloodCache, SOURCE_FLAGGED, SourceKey, SourceState, estimate_distinct, flag_counter_index,
};

use crate::{
    clock::boot_secs,
    datapath::PinnedMaps,
    detection::contacts::ContactFlag,
    detection::incidents::{
        AGGREGATE_AFTER, Clock as _, DEFAULT_RETENTION_DAYS, Observation, Reason, Recorded, Seen, Stamp, Store,
        SystemClock,
    },
    detection::sources::{self, Names, Pending, addr_of, key_for},
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

/// How the detector keeps its incident database.
#[derive(Clone)]
pub struct Options {
    /// Incidents last seen longer ago are deleted (hourly).
    pub retention: Duration,
    /// New incidents per rule and direction in a minute before further
    /// sources go into a summary incident.
    pub summary_after: u32,
    /// Called on every failed write (the controller's error counter).
    pub on_error: Arc<dyn Fn() + Send + Sync>,
    /// A fleet is configured: incidents opened or changed are queued in
    /// the outbox, and this is notified after each write that may have
    /// queued some.
    pub outbox: Option<Arc<tokio::sync::Notify>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            retention: Duration::from_secs(DEFAULT_RETENTION_DAYS as u64 * 86400),
            summary_after: AGGREGATE_AFTER,
            on_error: Arc::new(|| {}),
            outbox: None,
        }
    }
}

pub struct Detector {
    writer: Writer,
    /// Sources counted into summary incidents (a flood): neither followed
    /// nor recovered one by one. Bounded: cleared when full.
    summarised: Arc<Mutex<HashSet<SourceKey>>>,
    sources: BpfHashMap<MapData, SourceKey, SourceState>,
    memos: PerCpuArray<MapData, FloodCache>,
    blocks: BpfHashMap<MapData, SourceKey, u32>,
    /// The controller's own flags (failed first contacts), by rule and
    /// direction, pinned beside the kernel's `FLAG_COUNTERS`.
    contact_flags: Array<MapData, u64>,
    maps: PinnedMaps,
    names: Names,
    /// Flagged sources whose incidents are still open, with when they were
    /// last seen moving.
    followed: HashMap<SourceKey, Instant>,
}

impl Detector {
    pub fn open(maps: &PinnedMaps, state_dir: &Path) -> Result<Self> {
        Self::open_with(maps, state_dir, Options::default())
    }

    pub fn open_with(maps: &PinnedMaps, state_dir: &Path, options: Options) -> Result<Self> {
        let mut store = Store::open(state_dir)?;
        store.set_summary_after(options.summary_after);
        if options.outbox.is_some() {
            store.enable_outbox()?;
        }
        let recent = store.recent(MAX_FOLLOWED)?;
        let names = Names::read(maps)?;
        let summarised = Arc::new(Mutex::new(HashSet::new()));
        let mut detector = Detector {
            writer: Writer::start(store, options, summarised.clone())?,
            summarised,
            sources: sources::sources_map(maps)?,
            memos: sources::memo_map(maps)?,
            blocks: sources::blocks_map(maps)?,
            contact_flags: maps.array::<u64>(netwatch_common::maps::CONTACT_FLAGS)?,
            maps: maps.clone(),
            names,
            followed: HashMap::new(),
        };
        detector.follow_open_incidents(recent);
        Ok(detector)
    }

    /// After a restart, keep following the incidents that are still open.
    fn follow_open_incidents(&mut self, recent: Vec<crate::detection::incidents::Incident>) {
        let now = SystemTime::now();
        for incident in recent {
            if incident.summary_sources.is_some() {
                continue;
            }
            if now.duration_since(incident.last_seen).unwrap_or_default() > REOPEN_AFTER {
                continue;
            }
            let direction = Direction::from_label(&incident.direction).unwrap_or_default();
            if let Some(rule) = self.names.rule_slots().find(|s| self.names.rule(*s) == incident.rule) {
                self.followed.insert(
                    key_for(incident.source, rule, direction, incident.classification),
                    Instant::now(),
                );
            }
        }
    }

    /// What the kernel's record says; `blocked_until`: the source's
    /// auto-block, if any.
    ///
    /// The wall time is taken once, now (`at`): the kernel's stamps
    /// (CLOCK_MONOTONIC seconds) become wall times by their age now, which
    /// a later suspend or clock step cannot change.
    fn observation(&self, seen: Seen, key: &SourceKey, state: &SourceState, blocked_until: Option<u32>) -> Observation {
        let now = boot_secs();
        let at = Stamp::now(&SystemClock);
        let wall = |stamp: u32| -> SystemTime {
            let (now, stamp) = (now as u64, stamp as u64);
            if stamp <= now {
                at.wall.checked_sub(Duration::from_secs(now - stamp)).unwrap_or(at.wall)
            } else {
                at.wall + Duration::from_secs(stamp - now)
            }
        };
        Observation {
            seen,
            source: addr_of(key),
            rule: self.names.rule(key.rule),
            direction: key.direction().label().to_string(),
            interface: self.names.iface(state.iface as u32),
            classification: key.classification(),
            first_seen: wall(state.first_seen),
            last_seen: wall(state.last_seen),
            packets: state.packets,
            distinct_destinations: estimate_distinct(state.distinct as u32, state.flags),
            blocked_until: blocked_until.filter(|t| *t > now).map(wall),
            reason: Reason::DistinctDestinations,
            failed_contacts: 0,
            at,
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
        if !self.is_summarised(&event.key) {
            self.follow(event.key);
        }
        // The writer thread records it (off the async runtime, batched)
        // and logs the flag with its incident once the write is done.
        self.writer.send(Op::Flag(event.key, Box::new(obs)))
    }

    fn is_summarised(&self, key: &SourceKey) -> bool {
        self.summarised.lock().map(|s| s.contains(key)).unwrap_or(false)
    }

    /// A source flagged for its failed first contacts (see
    /// [`crate::detection::contacts`]): its incident says so; in enforce
    /// mode, on a rule with auto-block on, it is blocked as a flag in the
    /// kernel would block it. A source the kernel has flagged in this
    /// window already (on distinct destinations) has its incident.
    pub fn on_contact_flag(&mut self, flag: &ContactFlag) -> Result<()> {
        let Ok(mut state) = self.sources.get(&flag.key, 0) else {
            // Evicted meanwhile: nothing to show for it.
            return Ok(());
        };
        if state.flags & SOURCE_FLAGGED != 0 {
            return Ok(());
        }
        if self.names.rule_slots().all(|s| s != flag.key.rule) {
            self.names = Names::read(&self.maps)?;
        }
        Pending::read(&self.memos)?.add_to(&flag.key, &mut state);
        let blocked_until = flag.block_secs.and_then(|secs| {
            let now = boot_secs();
            // A block in force stays as it is; a full map is the cap, as
            // for the kernel's own auto-blocks.
            let current = self.blocks.get(&flag.key, 0).ok().filter(|until| *until > now);
            current.or_else(|| {
                let until = now.saturating_add(secs);
                self.blocks.insert(flag.key, until, 0).ok().map(|()| until)
            })
        });
        let mut obs = self.observation(Seen::Flag, &flag.key, &state, blocked_until);
        obs.reason = Reason::FailedContacts;
        obs.failed_contacts = flag.failed;
        if !self.is_summarised(&flag.key) {
            self.follow(flag.key);
        }
        self.writer.send(Op::Flag(flag.key, Box::new(obs)))?;
        // Counted beside the kernel's flags (netwatch_scanners_flagged_total),
        // in a pinned map only the controller writes.
        let index = flag_counter_index(flag.key.rule as u32, flag.key.direction());
        let n = self.contact_flags.get(&index, 0).unwrap_or(0);
        self.contact_flags.set(index, n + 1, 0)?;
        Ok(())
    }

    /// Waits until everything sent so far is written.
    pub fn flush(&self) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        self.writer.send(Op::Flush(tx))?;
        rx.recv().map_err(|_| anyhow::anyhow!("the incident writer stopped"))
    }

    /// Follows `key` while there is room. When full (a flood of spoofed
    /// sources), new keys are not followed: evicting the oldest would cost
    /// a scan of the whole set per flag, and their incidents are still
    /// written from the flag, and shown with the kernel's live counts by
    /// `lookup` (see [`crate::observe::reports::merge_live`]); quiet ones
    /// make room on the next refresh.
    fn follow(&mut self, key: SourceKey) {
        if self.followed.len() < MAX_FOLLOWED || self.followed.contains_key(&key) {
            self.followed.insert(key, Instant::now());
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
        let mut observations = Vec::new();
        for key in keys {
            if self.is_summarised(&key) {
                quiet.push(key);
                continue;
            }
            match self.sources.get(&key, 0) {
                Ok(mut state) => {
                    pending.add_to(&key, &mut state);
                    observations.push((
                        key,
                        self.observation(Seen::Refresh, &key, &state, self.blocks.get(&key, 0).ok()),
                    ));
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
        self.writer.send(Op::Refresh(observations))
    }

    /// Keys of the incidents followed: the walk of the source map skips
    /// them (see [`Detector::recover`]).
    pub fn followed_keys(&self) -> HashSet<SourceKey> {
        let mut keys: HashSet<SourceKey> = self.followed.keys().copied().collect();
        if let Ok(summarised) = self.summarised.lock() {
            keys.extend(summarised.iter().copied());
        }
        keys
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
        let observations: Vec<(SourceKey, Observation)> = flagged
            .iter()
            .filter(|(key, _)| !self.followed.contains_key(key) && !self.is_summarised(key))
            .map(|(key, state)| {
                let mut state = *state;
                pending.add_to(key, &mut state);
                keys.push(*key);
                (
                    *key,
                    self.observation(Seen::Recovered, key, &state, self.blocks.get(key, 0).ok()),
                )
            })
            .collect();
        let n = observations.len();
        if n > 0 {
            self.writer.send(Op::Recovered(observations))?;
        }
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

/// Sources remembered as summarised at most (then the set starts afresh:
/// a source forgotten is at worst counted into a summary once more).
const MAX_SUMMARISED: usize = 200_000;

/// Work for the writer thread.
enum Op {
    Flag(SourceKey, Box<Observation>),
    Refresh(Vec<(SourceKey, Observation)>),
    Recovered(Vec<(SourceKey, Observation)>),
    Flush(mpsc::Sender<()>),
}

/// Operations written per transaction at most.
const BATCH: usize = 4096;
/// How often incidents past their retention are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The thread that owns the writable database: the async runtime (and
/// with it the HTTP endpoint) never waits for the disk. It takes what
/// has queued up in one transaction.
struct Writer {
    tx: Option<mpsc::Sender<Op>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(mut store: Store, options: Options, summarised: Arc<Mutex<HashSet<SourceKey>>>) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Op>();
        let thread = std::thread::Builder::new()
            .name("incident-writer".into())
            .spawn(move || {
                let clock = SystemClock;
                let mut pruned: Option<Instant> = None;
                while let Ok(first) = rx.recv() {
                    if pruned.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
                        pruned = Some(Instant::now());
                        let cutoff = clock.wall().checked_sub(options.retention);
                        match cutoff.map(|c| store.prune(c)).transpose() {
                            Ok(Some(n)) if n > 0 => info!(
                                "deleted {n} incidents last seen more than {} days ago (incident_retention_days)",
                                options.retention.as_secs() / 86400
                            ),
                            Ok(_) => {}
                            Err(err) => {
                                (options.on_error)();
                                error!("deleting incidents past their retention failed: {err:#}");
                            }
                        }
                    }
                    let mut ops = vec![first];
                    while ops.len() < BATCH
                        && let Ok(op) = rx.try_recv()
                    {
                        ops.push(op);
                    }
                    let mut flags = Vec::new();
                    let mut recovered = 0;
                    let mut done = Vec::new();
                    let written = store.batch(|store| {
                        for op in ops {
                            match op {
                                Op::Flag(key, obs) => {
                                    let r = store.record(&obs, REOPEN_AFTER)?;
                                    note_summarised(&summarised, key, r);
                                    flags.push((*obs, r));
                                }
                                Op::Refresh(list) => {
                                    for (key, obs) in list {
                                        // Counted into a summary since it was sent.
                                        if summarised.lock().is_ok_and(|s| s.contains(&key)) {
                                            continue;
                                        }
                                        let r = store.record(&obs, REOPEN_AFTER)?;
                                        note_summarised(&summarised, key, r);
                                    }
                                }
                                Op::Recovered(list) => {
                                    for (key, obs) in list {
                                        if let Some(r) = store.record_new_one(&obs, REOPEN_AFTER)? {
                                            note_summarised(&summarised, key, r);
                                            recovered += 1;
                                        }
                                    }
                                }
                                Op::Flush(reply) => done.push(reply),
                            }
                        }
                        Ok(())
                    });
                    match written {
                        Ok(()) => {
                            if let Some(outbox) = &options.outbox {
                                outbox.notify_one();
                            }
                            for (obs, r) in &flags {
                                crate::observe::logging::flag(obs, *r);
                            }
                            if recovered > 0 {
                                info!(
                                    "recorded {recovered} flagged sources whose events were lost as recovered incidents"
                                );
                            }
                        }
                        Err(err) => {
                            (options.on_error)();
                            error!(
                                "recording incidents failed (the kernel keeps counting; retried on refresh): {err:#}"
                            );
                        }
                    }
                    for reply in done {
                        let _ = reply.send(());
                    }
                }
            })
            .map_err(|e| anyhow::anyhow!("starting the incident writer thread: {e}"))?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn send(&self, op: Op) -> Result<()> {
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(op).ok())
            .ok_or_else(|| anyhow::anyhow!("the incident writer thread stopped"))
    }
}

impl Drop for Writer {
    /// Writes what is queued before the controller exits.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn note_summarised(summarised: &Mutex<HashSet<SourceKey>>, key: SourceKey, r: Recorded) {
    if let (Recorded::Summarised(_), Ok(mut set)) = (r, summarised.lock()) {
        if set.len() >= MAX_SUMMARISED {
            set.clear();
        }
        set.insert(key);
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
