//! Per-source tracking of matched traffic: packets, bytes, first and
//! last seen, distinct destinations in the current window, the one flag
//! event when a source crosses its rule's threshold, and auto-blocks.

use core::intrinsics::{AtomicOrdering, atomic_and, atomic_or};

use aya_ebpf::bindings::{BPF_NOEXIST, BPF_RB_FORCE_WAKEUP};
use netwatch_common::{
    CONTACTS_PER_WINDOW, Classification, Direction, EVENT_LOSS_RATE_LIMITED, EVENT_LOSS_RING_FULL, FlagEvent,
    HASH_KEY_WORDS, MAX_EVENTS_PER_CPU_SECOND, PORT_CONTACTS, PortRule, SKETCH_BITS, SKETCH_LIST_LEN, SKETCH_WORDS,
    SOURCE_BITMAP, SOURCE_FLAGGED, STAT_AUTO_BLOCKED, STAT_AUTO_BLOCKS_CAPPED, STAT_EVENTS_LOST, STAT_SOURCES_CREATED,
    SourceKey, SourceState, flag_counter_index,
};

use crate::{
    contacts::remember_first_contact,
    helpers::{coarse_monotonic_secs, increment, source_addr16, source_key_and_destination_hash},
    maps::{AUTO_BLOCKS, EVENT_BUDGET, EVENT_LOSSES, EVENTS, FLAG_COUNTERS, FLOOD_CACHE, SOURCES, STATS},
    parse::Addrs,
};

/// Adds a destination hash to the sketch; updates `distinct`.
#[inline(always)]
fn add_destination(state: &mut SourceState, hash: u32) {
    // 0 marks an empty list slot (a new or reset sketch is all zeros), so
    // the list scan stops at the first empty slot rather than at
    // `distinct`: a loop bounded by a constant, which every verifier
    // follows. A bound of `min(distinct, SKETCH_WORDS)` is one the 6.1
    // verifier cannot (it loses the counter's range and reads past the end).
    let hash = hash | 1;
    if state.flags & SOURCE_BITMAP == 0 {
        for i in 0..SKETCH_WORDS {
            let word = state.sketch[i];
            if word == hash {
                return;
            }
            if word == 0 {
                break;
            }
        }
        // A fresh load of `distinct` for the store: reusing the register the
        // loop compared against leads older verifiers down the impossible
        // `SKETCH_LIST_LEN <= len < SKETCH_LIST_LEN` branch.
        // SAFETY: `state` is a valid map value.
        let len = unsafe { core::ptr::read_volatile(&state.distinct) } as u32;
        if len < SKETCH_LIST_LEN {
            if let Some(slot) = state.sketch.get_mut(len as usize) {
                *slot = hash;
                state.distinct = len as u16 + 1;
            }
            return;
        }
        // The list is full: turn it into a bitmap holding the same hashes.
        let list = state.sketch;
        state.sketch = [0; SKETCH_WORDS];
        state.distinct = 0;
        set_flags(state, SOURCE_BITMAP);
        for h in list {
            set_bit(state, h);
        }
    }
    set_bit(state, hash);
}

#[inline(always)]
fn set_bit(state: &mut SourceState, hash: u32) {
    // Multiply-shift maps the hash onto 0..SKETCH_BITS without a division.
    let bit = ((hash as u64 * SKETCH_BITS as u64) >> 32) as u32;
    let mask = 1u32 << (bit & 31);
    // LLVM proves the word index < SKETCH_WORDS and drops the bounds
    // check, but the verifier's range for it is looser; black_box keeps
    // an explicit check the verifier can follow.
    let index = core::hint::black_box(bit >> 5) as usize;
    if let Some(word) = state.sketch.get_mut(index)
        && *word & mask == 0
    {
        *word |= mask;
        state.distinct += 1;
    }
}

/// Whether the source has reached its rule's threshold in this window.
#[inline(always)]
fn crossed(state: &SourceState, rule: &PortRule) -> bool {
    if state.flags & SOURCE_BITMAP == 0 {
        state.distinct as u32 >= rule.threshold
    } else {
        state.distinct as u32 >= rule.flag_bits
    }
}

/// `SOURCE_*` bits where they sit in the 64-bit word starting at `flags`.
#[inline(always)]
const fn in_word(bits: u32) -> u64 {
    if cfg!(target_endian = "little") {
        bits as u64
    } else {
        (bits as u64) << 32
    }
}

// Every write to `flags` is one of these two atomics. A plain
// read-modify-write of the word (the window reset, the switch to the
// bitmap) could write back a copy read before another CPU's fetch-or of
// `SOURCE_FLAGGED`, undoing it: the source would be flagged twice. Rust's
// BPF target has no atomic types, hence the intrinsics, and 64 bits
// because that is what the instruction set bpf-linker targets offers.
// The other fields of the word (`distinct`, `iface`) are only ever stored
// to, never read-modify-written as part of it.

/// Sets `bits` in `state.flags`; returns the word as it was.
#[inline(always)]
fn set_flags(state: &mut SourceState, bits: u32) -> u64 {
    // SAFETY: `flags` starts an 8-byte-aligned word of the map value
    // (see `SourceState`); the OR only touches `bits`.
    unsafe {
        atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(&mut state.flags as *mut u32 as *mut u64, in_word(bits))
    }
}

/// Clears `bits` in `state.flags`.
#[inline(always)]
fn clear_flags(state: &mut SourceState, bits: u32) {
    // SAFETY: as in `set_flags`; the AND only touches `bits`.
    unsafe {
        atomic_and::<u64, u64, { AtomicOrdering::Relaxed }>(&mut state.flags as *mut u32 as *mut u64, !in_word(bits));
    }
}

/// What tracking decided about the packet's source.
pub struct Tracked {
    /// The source is auto-blocked on this rule right now.
    pub blocked: bool,
    /// The flood memo now holds this source: the packet's verdict may be
    /// memoised (`memo::remember`).
    pub memoised: bool,
}

/// Records one packet of `bytes` that matched `rule` from the source in
/// `addrs`, on interface slot `iface` in direction `dir`; `reverse`: a
/// reverse lookup rather than a probe; `hash_key` keys the
/// destination hash. `may_block`: the mode is enforce and the source is
/// not allowlisted (so auto-block, if the rule has it on, applies).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn track_source(
    addrs: &Addrs,
    rule: &PortRule,
    dir: Direction,
    reverse: bool,
    hash_key: &[u64; HASH_KEY_WORDS],
    iface: u32,
    bytes: u64,
    may_block: bool,
) -> Tracked {
    let classification = if reverse {
        Classification::ReverseLookup
    } else {
        Classification::Scan
    };
    let (key, dst_hash) = source_key_and_destination_hash(addrs, rule.slot(), dir, classification, hash_key);
    record_packet(&key, dir, classification, rule, dst_hash, iface, bytes, may_block)
}

/// Records one packet from `key`'s source to the destination `dst_hash`
/// in the source's record (its sketch, its flag, its auto-block), first
/// folding into its record what the CPU's flood memo holds (see `memo`),
/// and makes this source the memo's.
/// `dir` and `classification` are the key's, as the caller knows them
/// (the verifier then follows the constants rather than the key's bytes).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn record_packet(
    key: &SourceKey,
    dir: Direction,
    classification: Classification,
    rule: &PortRule,
    dst_hash: u32,
    iface: u32,
    bytes: u64,
    may_block: bool,
) -> Tracked {
    let untracked = Tracked {
        blocked: false,
        memoised: false,
    };
    let Some(cache) = FLOOD_CACHE.get_ptr_mut(0) else {
        return untracked;
    };
    // SAFETY: per-CPU map value, ours while we run.
    let cache = unsafe { &mut *cache };
    let now = coarse_monotonic_secs();
    // Fold what the memo holds into its record: here if it is this
    // source's, else with a lookup of its own.
    let (pending_packets, pending_bytes) = (cache.pending_packets as u64, cache.pending_bytes as u64);
    cache.pending_packets = 0;
    cache.pending_bytes = 0;
    let same_source = cache.key == *key;
    if pending_packets != 0
        && !same_source
        && let Some(other) = SOURCES.get_ptr_mut(cache.key)
    {
        // SAFETY: a map value.
        unsafe {
            (*other).packets += pending_packets;
            (*other).bytes += pending_bytes;
        }
    }

    let state = match SOURCES.get_ptr_mut(key) {
        Some(state) => state,
        None => {
            let fresh = SourceState {
                first_seen: now,
                window_start: now,
                ..SourceState::default()
            };
            // BPF_NOEXIST: another CPU may have created it meanwhile.
            if SOURCES.insert(key, fresh, 1).is_ok() {
                increment(&STATS, STAT_SOURCES_CREATED);
            }
            match SOURCES.get_ptr_mut(key) {
                Some(state) => state,
                None => return untracked,
            }
        }
    };
    // SAFETY: a map value; concurrent updates of one source from several
    // CPUs may lose an increment, never corrupt memory.
    let state = unsafe { &mut *state };
    if now.wrapping_sub(state.window_start) >= rule.window_secs {
        state.window_start = now;
        state.distinct = 0;
        state.sketch = [0; SKETCH_WORDS];
        clear_flags(state, SOURCE_BITMAP | SOURCE_FLAGGED);
    }
    state.packets += 1;
    state.bytes += bytes;
    if same_source {
        state.packets += pending_packets;
        state.bytes += pending_bytes;
    }
    state.last_seen = now;
    state.iface = iface as u16;
    // The count before, re-read after: whether the destination was new
    // comes from the record, not from which way the sketch code went
    // (a constant per way would split the verifier's states after it).
    // SAFETY: `state` is a valid map value.
    let known = unsafe { core::ptr::read_volatile(&state.distinct) };
    add_destination(state, dst_hash);
    // A probe's first contact with a destination, while few are known:
    // the controller then sees whether it was answered (the memo holds
    // the packet's addresses and port, staged for it).
    if classification == Classification::Scan
        && rule.flags & PORT_CONTACTS != 0
        && state.flags & (SOURCE_FLAGGED | SOURCE_BITMAP) == 0
        && state.distinct != known
        && state.distinct <= CONTACTS_PER_WINDOW
    {
        remember_first_contact(&cache.tag, rule.slot(), dir, iface, now);
    }

    // Auto-blocks are looked up only where one can apply: probes on a
    // rule with auto-block on, in enforce mode, from a source that is not
    // allowlisted; the memo above keeps the answer for a flood's repeats.
    let auto_block = may_block && rule.block_secs != 0 && classification == Classification::Scan;
    let mut blocked_until = if auto_block { block_in_force(key, now) } else { 0 };
    // The fetch-or makes one CPU the one that reports a flag when two
    // cross the threshold together.
    if classification == Classification::Scan
        && state.flags & SOURCE_FLAGGED == 0
        && crossed(state, rule)
        && set_flags(state, SOURCE_FLAGGED) & in_word(SOURCE_FLAGGED) == 0
    {
        // A source still blocked from an earlier window keeps its block
        // (and its one slot).
        if auto_block && blocked_until == 0 {
            blocked_until = start_block(key, now + rule.block_secs);
        }
        increment(&FLAG_COUNTERS, flag_counter_index(key.rule.into(), dir));
        if within_event_budget(now) {
            emit(key, state, blocked_until);
        } else {
            increment(&STATS, STAT_EVENTS_LOST);
            increment(&EVENT_LOSSES, EVENT_LOSS_RATE_LIMITED);
        }
    }
    cache.key = *key;
    Tracked {
        blocked: blocked_until != 0,
        memoised: true,
    }
}

/// Whether the source in `addrs` is auto-blocked on `rule` going `dir`
/// (its probes' block: the key of a scan).
#[inline(always)]
pub fn source_auto_blocked(addrs: &Addrs, rule: &PortRule, dir: Direction) -> bool {
    let mut key = SourceKey::new(rule.slot() as u8, dir, Classification::Scan);
    (key.addr, key.family) = source_addr16(addrs);
    block_in_force(&key, coarse_monotonic_secs()) != 0
}

/// When `key`'s auto-block ends, or 0 when none is in force. An expired
/// block met here is deleted, so it no longer holds a slot of the cap.
#[inline(always)]
fn block_in_force(key: &SourceKey, now: u32) -> u32 {
    match AUTO_BLOCKS.get_ptr(key) {
        // SAFETY: a map value.
        Some(until) => match unsafe { *until } {
            until if until > now => until,
            _ => {
                let _ = AUTO_BLOCKS.remove(key);
                0
            }
        },
        None => 0,
    }
}

const EEXIST: i32 = 17;

/// Blocks `key`'s source on its rule until `until`; returns `until`, or 0
/// when `MAX_AUTO_BLOCKS` blocks are held (the map is full, the insert
/// fails). Runs once per flag, never per packet.
#[inline(always)]
fn start_block(key: &SourceKey, until: u32) -> u32 {
    match AUTO_BLOCKS.insert(key, until, BPF_NOEXIST as u64) {
        Ok(()) => {
            increment(&STATS, STAT_AUTO_BLOCKED);
            until
        }
        // Another CPU blocked it meanwhile: one block, one slot.
        Err(err) if err == -EEXIST => until,
        Err(_) => {
            increment(&STATS, STAT_AUTO_BLOCKS_CAPPED);
            0
        }
    }
}

#[inline(always)]
fn within_event_budget(now: u32) -> bool {
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU map value.
    let budget = unsafe { &mut *budget };
    if budget.second != now {
        budget.second = now;
        budget.sent = 0;
    }
    budget.sent += 1;
    budget.sent <= MAX_EVENTS_PER_CPU_SECOND
}

#[inline(always)]
fn emit(key: &SourceKey, state: &SourceState, blocked_until: u32) {
    match EVENTS.reserve::<FlagEvent>(0) {
        Some(mut entry) => {
            entry.write(FlagEvent {
                key: *key,
                iface: state.iface as u32,
                distinct: state.distinct as u32,
                first_seen: state.first_seen,
                last_seen: state.last_seen,
                blocked_until,
                flags: state.flags,
                _pad: 0,
                packets: state.packets,
                bytes: state.bytes,
                // The precise clock, once per flag (the hot path uses the
                // coarse one).
                // SAFETY: helper without arguments.
                flagged_ns: unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() },
            });
            // Flags are rare: wake the controller now, not at the next batch.
            entry.submit(BPF_RB_FORCE_WAKEUP as u64);
        }
        None => {
            increment(&STATS, STAT_EVENTS_LOST);
            increment(&EVENT_LOSSES, EVENT_LOSS_RING_FULL);
        }
    }
}
