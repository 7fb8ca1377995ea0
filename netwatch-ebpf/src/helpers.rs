//! Kernel helpers every part of the datapath uses: the clock, the
//! counters, the addresses as the maps key them and the destination hash.
//! They depend on nothing else in this crate but the parser's `Addrs`.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, maps::PerCpuArray};
use netwatch_common::{Classification, Counter, Direction, HASH_KEY_WORDS, SourceKey, dst_hash_v4, dst_hash_v6};

use crate::parse::Addrs;

/// CLOCK_MONOTONIC nanoseconds from the coarse clock: a jiffy of
/// precision is plenty for windows and TTLs, and it costs far less than
/// reading the clocksource (in a VM especially).
#[inline(always)]
pub fn coarse_monotonic_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Seconds, as the maps store them (the controller converts to wall
/// time). A 64-bit division: only paths off the flood fast path pay it.
#[inline(always)]
pub fn ns_to_secs(ns: u64) -> u32 {
    (ns / 1_000_000_000) as u32
}

/// The coarse CLOCK_MONOTONIC second: list entry and visitor times.
#[inline(always)]
pub fn coarse_monotonic_secs() -> u32 {
    ns_to_secs(coarse_monotonic_ns())
}

/// Adds one packet of `bytes` to a per-CPU `Counter`, if the index was
/// inside its map.
#[inline(always)]
pub fn count_packet(counter: Option<*mut Counter>, bytes: u64) {
    if let Some(counter) = counter {
        // SAFETY: per-CPU map value, owned by this CPU while we run.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}

/// Increments the per-CPU `u64` at `index` of `map` (the `STAT_*` and
/// flag counters).
#[inline(always)]
pub fn increment(map: &PerCpuArray<u64>, index: u32) {
    if let Some(v) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU value.
        unsafe { *v += 1 };
    }
}

/// An IPv4 address as the 16-byte maps store it: in the first 4 bytes.
#[inline(always)]
pub fn ipv4_as_16(addr: *const [u8; 4]) -> [u8; 16] {
    // SAFETY: the parser checked the address lies inside the packet.
    let a = unsafe { *addr };
    [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// The packet's source address as the per-source and handshake maps key
/// it (16 bytes), and its family (4 or 6).
#[inline(always)]
pub fn source_addr16(addrs: &Addrs) -> ([u8; 16], u8) {
    match *addrs {
        Addrs::V4 { src, .. } => (ipv4_as_16(src), 4),
        // SAFETY: the parser checked the address lies inside the packet.
        Addrs::V6 { src, .. } => (unsafe { *src }, 6),
    }
}

/// The per-source key of the packet's source for rule slot `rule` in
/// direction `dir` with `classification` (probes or reverse lookups),
/// and the keyed hash of its destination (the sketch's input). One match
/// over the address family for both, so the code after it starts from
/// one verifier state.
#[inline(always)]
pub fn source_key_and_destination_hash(
    addrs: &Addrs,
    rule: u32,
    dir: Direction,
    classification: Classification,
    hash_key: &[u64; HASH_KEY_WORDS],
) -> (SourceKey, u32) {
    let mut key = SourceKey::new(rule as u8, dir, classification);
    // SAFETY: the parser checked the addresses lie inside the packet.
    let hash = unsafe {
        match *addrs {
            Addrs::V4 { src, dst } => {
                let (s, dst) = (*src, *dst);
                key.addr = [s[0], s[1], s[2], s[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                key.family = 4;
                dst_hash_v4(u32::from_be_bytes(dst), hash_key)
            }
            Addrs::V6 { src, dst } => {
                key.addr = *src;
                key.family = 6;
                let d = *dst;
                let words = [
                    u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
                    u32::from_be_bytes([d[4], d[5], d[6], d[7]]),
                    u32::from_be_bytes([d[8], d[9], d[10], d[11]]),
                    u32::from_be_bytes([d[12], d[13], d[14], d[15]]),
                ];
                dst_hash_v6(words, hash_key)
            }
        }
    };
    (key, hash)
}
