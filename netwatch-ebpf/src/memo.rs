//! The per-CPU flood memo's fast path (see `netwatch_common::FloodCache`):
//! a matched packet that repeats the last one this CPU judged in full is
//! counted and answered from the memo right after parsing. A worm flood
//! or a blocked source's stream then costs a parse, one comparison and
//! one counter, not a rule lookup, the lists, a hash and the per-source
//! map.
//!
//! What the memo's answer can miss, and for how long: a change of policy
//! (rules, mode, lists) never, since every change advances
//! `Settings::active`, which the tag holds; the end of an auto-block, a
//! list entry's TTL or a visitor's recency, for at most
//! `FLOOD_CACHE_FLUSH` packets or `FLOOD_CACHE_JIFFIES`, as for the memo
//! before it. Packets of web-port rules and SYN-ACKs leaving are never
//! memoised (see [`memoisable`]): the handshake watch must see each one.

use aya_ebpf::helpers::bpf_jiffies64;
use netwatch_common::{Direction, FLOOD_CACHE_FLUSH, FLOOD_CACHE_JIFFIES, MEMO_DROP, MEMO_REVERSE, MemoTag, PORT_WEB};

use crate::{
    helpers::count_packet,
    maps::{FLOOD_CACHE, REVERSE_COUNTERS, RULE_COUNTERS},
    parse::{Addrs, Packet, TCP_ACK, TCP_RST, TCP_SYN},
};

/// The tag of `packet`, seen on interface slot `iface` in direction
/// `dir` under the policy word `policy` (`Settings::active`).
#[inline(always)]
pub fn tag_of(packet: &Packet, iface: u32, dir: Direction, policy: u32) -> MemoTag {
    // SAFETY: the parser checked the addresses lie inside the packet.
    let (src, dst) = unsafe {
        match packet.addrs {
            Addrs::V4 { src, dst } => ([u32::from_ne_bytes(*src), 0, 0, 0], [u32::from_ne_bytes(*dst), 0, 0, 0]),
            Addrs::V6 { src, dst } => (words(&*src), words(&*dst)),
        }
    };
    MemoTag {
        src,
        dst,
        port: port_word(packet),
        iface: iface_word(iface, dir),
        policy,
    }
}

/// Whether `tag` is `packet`'s (as [`tag_of`] would make it), compared
/// field by field as the packet holds them: an IPv4 packet compares one
/// word per address (the family in `port` vouches for the zeros).
#[inline(always)]
fn holds(tag: &MemoTag, packet: &Packet, iface: u32, dir: Direction, policy: u32) -> bool {
    if (tag.port ^ port_word(packet)) | (tag.iface ^ iface_word(iface, dir)) | (tag.policy ^ policy) != 0 {
        return false;
    }
    // SAFETY: the parser checked the addresses lie inside the packet.
    unsafe {
        match packet.addrs {
            Addrs::V4 { src, dst } => {
                (tag.src[0] ^ u32::from_ne_bytes(*src)) | (tag.dst[0] ^ u32::from_ne_bytes(*dst)) == 0
            }
            Addrs::V6 { src, dst } => {
                let (s, d) = (words(&*src), words(&*dst));
                let mut differ = 0;
                for i in 0..4 {
                    differ |= (tag.src[i] ^ s[i]) | (tag.dst[i] ^ d[i]);
                }
                differ == 0
            }
        }
    }
}

/// Destination port, protocol, address family and the TCP handshake
/// flags: a SYN-ACK, whose every copy the handshake watch must see (see
/// [`memoisable`]), never matches a memo another packet of its tuple made.
#[inline(always)]
fn port_word(packet: &Packet) -> u32 {
    let family = match packet.addrs {
        Addrs::V4 { .. } => 4u32,
        Addrs::V6 { .. } => 6,
    };
    let handshake = (packet.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST)) as u32;
    // FIN (bit 0 of the flags) is not in `handshake`: bit 27 is free for
    // the NBNS R bit, which UDP alone sets.
    packet.dst_port as u32
        | (u8::from(packet.protocol) as u32) << 16
        | family << 24
        | (handshake | packet.nbns_response as u32) << 27
}

/// Whether a packet that matched a rule with `rule_flags`, in direction
/// `dir`, may be answered from the memo next time: not on web-port rules
/// (each packet may be part of a handshake) and not a SYN-ACK leaving
/// (the handshake watch remembers each one). NBNS responses never reach
/// the memo (see `verdict`).
#[inline(always)]
pub fn memoisable(packet: &Packet, rule_flags: u32, dir: Direction) -> bool {
    rule_flags & PORT_WEB == 0
        && !(dir == Direction::Outbound && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK)
}

#[inline(always)]
fn iface_word(iface: u32, dir: Direction) -> u32 {
    iface | (u8::from(dir) as u32) << 16
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// If the memo holds `packet` (seen on `iface` in direction `dir` under
/// the policy word `policy`) and is fresh: counts the packet of `bytes`
/// as the memoised one was counted, adds it to the pending counts, and
/// returns whether to drop it. `None`: judge it in full.
#[inline(always)]
pub fn replay(packet: &Packet, iface: u32, dir: Direction, policy: u32, bytes: u64) -> Option<bool> {
    // SAFETY: per-CPU map value, ours while we run.
    let cache = unsafe { &mut *FLOOD_CACHE.get_ptr_mut(0)? };
    // SAFETY: helper without arguments (inlined by the verifier).
    let jiffies = unsafe { bpf_jiffies64() };
    if jiffies >= cache.expires_jiffies
        || cache.pending_packets >= FLOOD_CACHE_FLUSH
        || !holds(&cache.tag, packet, iface, dir, policy)
    {
        return None;
    }
    cache.pending_packets += 1;
    cache.pending_bytes += bytes as u32;
    count_packet(RULE_COUNTERS.get_ptr_mut(cache.counter), bytes);
    if cache.verdict & MEMO_REVERSE != 0 {
        count_packet(REVERSE_COUNTERS.get_ptr_mut(cache.counter), bytes);
    }
    Some(cache.verdict & MEMO_DROP != 0)
}

/// Puts `packet`'s tag in the memo, not yet valid: a packet judged in
/// full replaces the memo. Its source's counts and `key` stay as they
/// are until the tracker folds them in (`track::record_packet`).
#[inline(always)]
pub fn stage(packet: &Packet, iface: u32, dir: Direction, policy: u32) {
    if let Some(cache) = FLOOD_CACHE.get_ptr_mut(0) {
        // SAFETY: per-CPU map value, ours while we run.
        let cache = unsafe { &mut *cache };
        cache.expires_jiffies = 0;
        cache.tag = tag_of(packet, iface, dir, policy);
    }
}

/// Memoises the verdict of the packet staged last, judged in full and
/// tracked just now (the tracker made its source the memo's): `dropped`,
/// `reverse` and the rule counter index `counter`, valid for
/// `FLOOD_CACHE_JIFFIES` from now if `valid` (else the staged tag stays
/// invalid). Stores only, no branch: this runs at the end of every path
/// the verifier walks through the program.
#[inline(always)]
pub fn remember(dropped: bool, reverse: bool, counter: u32, valid: bool) {
    let Some(cache) = FLOOD_CACHE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU map value, ours while we run.
    let cache = unsafe { &mut *cache };
    cache.counter = counter;
    cache.verdict = (dropped as u32 * MEMO_DROP) | (reverse as u32 * MEMO_REVERSE);
    // All ones if valid, else zero; black_box keeps LLVM from turning
    // the mask back into a branch.
    let mask = core::hint::black_box(0u64.wrapping_sub(valid as u64));
    // SAFETY: helper without arguments (inlined by the verifier).
    cache.expires_jiffies = (unsafe { bpf_jiffies64() } + FLOOD_CACHE_JIFFIES) & mask;
}
