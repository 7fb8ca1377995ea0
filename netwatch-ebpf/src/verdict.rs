//! The classification core shared by the XDP and TC programs: parse,
//! look the destination port up in the rule table, track the source,
//! count, decide.

use aya_ebpf::{
    helpers::bpf_ktime_get_coarse_ns,
    maps::{LpmTrie, lpm_trie::Key},
};
use netwatch_common::{
    ACTION_DROP, Class, Counter, Direction, HASH_KEY_WORDS, Handshake, HandshakeKey, KIND_PROBE, KIND_REVERSE_LOOKUP,
    LinkKind, ListEntry, MODE_ENFORCE, Outcome, PORT_REVERSE_LOOKUP, PORT_WEB, Protocol, STAT_HANDSHAKES_REJECTED,
    STAT_HANDSHAKES_STARTED, STAT_VISITORS_RECORDED, SourceKey, VisitorKey, class_counter_index, dst_hash_v4,
    dst_hash_v6, port_rule_index, rule_counter_index,
};

use crate::{
    maps::{
        ALLOW_V4, ALLOW_V6, BLOCK_V4, BLOCK_V6, CLASS_COUNTERS, HANDSHAKES, PORT_RULES, REVERSE_COUNTERS,
        RULE_COUNTERS, SETTINGS, STATS, VISITORS,
    },
    parse::{Addrs, Packet, TCP_ACK, TCP_RST, TCP_SYN, parse},
    track::{bump_stat, track},
};

#[inline(always)]
fn bump(counter: Option<*mut Counter>, bytes: u64) {
    if let Some(counter) = counter {
        // SAFETY: per-CPU map value, owned by this CPU while we run.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}

/// CLOCK_MONOTONIC nanoseconds from the coarse clock: a jiffy of
/// precision is plenty for windows and TTLs, and it costs far less than
/// reading the clocksource (in a VM especially).
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Seconds, as the maps store them (the controller converts to wall
/// time). A 64-bit division: only paths off the flood fast path pay it.
#[inline(always)]
pub fn secs(ns: u64) -> u32 {
    (ns / 1_000_000_000) as u32
}

/// Classifies the packet readable in `[start, end)`, `len` bytes long,
/// seen on interface slot `iface` (whose frames start as `link` says) in
/// direction `dir`, counts it, and says whether to drop it.
#[inline(always)]
pub fn should_drop(start: usize, end: usize, len: usize, iface: u32, dir: u32, link: LinkKind) -> bool {
    let bytes = len as u64;
    let packet = match parse(start, end, len, link) {
        Ok(packet) => packet,
        Err(class) => {
            let index = class_counter_index(iface, dir, class as u32);
            bump(CLASS_COUNTERS.get_ptr_mut(index), bytes);
            // What the parser could not judge may carry a rule port.
            return class.fails_closed()
                && matches!(SETTINGS.get(0), Some(s) if s.policy(s.active_version()).mode == MODE_ENFORCE);
        }
    };
    let Some(rules) = PORT_RULES.get(port_rule_index(packet.protocol, packet.dst_port)) else {
        return false;
    };
    // Most traffic: no rule and no web port in either policy version.
    if rules.versions[0].is_empty() && rules.versions[1].is_empty() {
        // A SYN-ACK leaving a web port goes to the visitor's ephemeral
        // port, which has no rule: the handshake check must see it here.
        if dir == Direction::Outbound as u32 {
            web_handshake(&packet, 0, dir);
        }
        count_unmatched(iface, dir, bytes);
        return false;
    }
    let Some(settings) = SETTINGS.get(0) else {
        return false;
    };
    let version = settings.active_version();
    let rule = rules.version(version);
    let policy = settings.policy(version);
    web_handshake(&packet, rule.flags, dir);
    if rule.id == 0 {
        count_unmatched(iface, dir, bytes);
        return false;
    }

    let enforce = policy.mode == MODE_ENFORCE;
    let allowlisted = enforce && policy.allowlist_active != 0 && either_listed(&packet.addrs, version, secs(now_ns()));

    // udp/137 towards a peer that just visited a web port: a reverse
    // lookup (IIS), tracked apart and never flagged as a scan.
    let reverse = rule.flags & PORT_REVERSE_LOOKUP != 0
        && dir == Direction::Outbound as u32
        && recent_visitor(&packet.addrs, secs(now_ns()), policy.visitor_secs);
    let action = if dir == 0 { rule.action[0] } else { rule.action[1] };
    // `action[dir]` would be compiled to pointer arithmetic on the stack
    // that the verifier rejects; hence the branch above.
    let blocklisted = enforce
        && !allowlisted
        && action != ACTION_DROP
        && policy.blocklist_active != 0
        && source_blocklisted(&packet.addrs, version, secs(now_ns()));
    // Only the source's own allowlisting spares it an auto-block: a probe
    // to an allowlisted address passes, yet counts towards (and may set)
    // its source's block. The second lookup is paid only by allowlisted
    // traffic on auto-block rules.
    let may_block = enforce
        && (!allowlisted || (rule.block_secs != 0 && !source_allowlisted(&packet.addrs, version, secs(now_ns()))));
    // The packet's addresses are not read after this point: the tracker,
    // the largest part of the program, then starts from one verifier
    // state whichever way the parser went through the headers.
    let (src_key, dst_hash) = source_key(&packet.addrs, rule.slot(), dir, reverse, &settings.hash_key);
    let tracked = track(&src_key, rule, dst_hash, iface, bytes, may_block);
    let drop = enforce && !allowlisted && (action == ACTION_DROP || tracked.blocked || blocklisted);
    let outcome = if drop { Outcome::Dropped } else { Outcome::Passed };
    let index = rule_counter_index(iface, dir, rule.slot(), outcome as u32);
    bump(RULE_COUNTERS.get_ptr_mut(index), bytes);
    if reverse {
        bump(REVERSE_COUNTERS.get_ptr_mut(index), bytes);
    }
    drop
}

#[inline(always)]
fn count_unmatched(iface: u32, dir: u32, bytes: u64) {
    bump(
        CLASS_COUNTERS.get_ptr_mut(class_counter_index(iface, dir, Class::Unmatched as u32)),
        bytes,
    );
}

/// The per-source key for the packet's source, and the keyed hash of its
/// destination.
#[inline(always)]
fn source_key(addrs: &Addrs, rule: u32, dir: u32, reverse: bool, hash_key: &[u64; HASH_KEY_WORDS]) -> (SourceKey, u32) {
    let mut key = SourceKey {
        rule: rule as u8,
        direction: dir as u8,
        kind: if reverse { KIND_REVERSE_LOOKUP } else { KIND_PROBE },
        ..SourceKey::default()
    };
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

/// An IPv4 address as the visitor maps store it: in the first 4 bytes.
#[inline(always)]
fn addr16(addr: *const [u8; 4]) -> [u8; 16] {
    // SAFETY: the parser checked the address lies inside the packet.
    let a = unsafe { *addr };
    [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// The packet's source and destination as a `VisitorKey`'s local
/// address and visitor.
#[inline(always)]
fn visitor_key(addrs: &Addrs) -> VisitorKey {
    match *addrs {
        Addrs::V4 { src, dst } => VisitorKey {
            local: addr16(src),
            visitor: addr16(dst),
            family: 4,
            _pad: [0; 3],
        },
        // SAFETY: the parser checked the addresses lie inside the packet.
        Addrs::V6 { src, dst } => unsafe {
            VisitorKey {
                local: *src,
                visitor: *dst,
                family: 6,
                _pad: [0; 3],
            }
        },
    }
}

/// The 32-bit number at `offset` of the TCP header.
#[inline(always)]
fn tcp_u32(packet: &Packet, offset: usize) -> u32 {
    // SAFETY: only called for TCP packets (flags set), whose `tcp` points
    // at 14 bytes the parser checked are inside the frame.
    u32::from_be_bytes(unsafe { *((packet.tcp as usize + offset) as *const [u8; 4]) })
}

/// Web handshakes: a SYN-ACK leaving a web port is remembered with the
/// acknowledgement number it asks for; the visitor's ACK carrying that
/// number, arriving, records the visitor. Only TCP to or from a web port
/// gets past the flag tests.
#[inline(always)]
fn web_handshake(packet: &Packet, rule_flags: u32, dir: u32) {
    let flags = packet.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST);
    if dir == Direction::Inbound as u32 {
        if rule_flags & PORT_WEB != 0 && flags == TCP_ACK {
            let (peer, family) = match packet.addrs {
                Addrs::V4 { src, .. } => (addr16(src), 4),
                // SAFETY: the parser checked the address lies inside the packet.
                Addrs::V6 { src, .. } => (unsafe { *src }, 6),
            };
            let key = HandshakeKey {
                peer,
                peer_port: packet.src_port,
                family,
                _pad: 0,
            };
            visitor_ack(&key, tcp_u32(packet, 8));
        }
    } else if flags == TCP_SYN | TCP_ACK
        && let Some(rules) = PORT_RULES.get(port_rule_index(Protocol::Tcp, packet.src_port))
        && let Some(settings) = SETTINGS.get(0)
        && rules.version(settings.active_version()).flags & PORT_WEB != 0
    {
        web_syn_ack(&visitor_key(&packet.addrs), packet.dst_port, tcp_u32(packet, 4));
    }
}

/// A SYN-ACK leaving a web port towards `visitor`'s `peer_port`, with
/// sequence number `seq`: the handshake is pending until the visitor
/// acknowledges it. Its own BPF function, so that its keys live in a
/// stack frame of their own: the main one has no 60 bytes to spare.
#[inline(never)]
fn web_syn_ack(visitor: &VisitorKey, peer_port: u16, seq: u32) {
    let key = HandshakeKey {
        peer: visitor.visitor,
        peer_port,
        family: visitor.family,
        _pad: 0,
    };
    let pending = Handshake {
        visitor: *visitor,
        ack: seq.wrapping_add(1),
    };
    if HANDSHAKES.insert(key, pending, 0).is_ok() {
        bump_stat(&STATS, STAT_HANDSHAKES_STARTED);
    }
}

/// An ACK with acknowledgement number `ack` arriving at a web port from
/// `key`'s end: if it acknowledges a pending SYN-ACK's sequence number,
/// the handshake is complete and its sender a visitor of the address that
/// sent the SYN-ACK. A wrong number leaves the pending handshake alone (a
/// forger must not cancel a real one). Its own BPF function, like
/// `web_syn_ack`.
#[inline(never)]
fn visitor_ack(key: &HandshakeKey, ack: u32) {
    let Some(pending) = HANDSHAKES.get_ptr(key) else {
        return;
    };
    // SAFETY: a map value; the helper reads the visitors' key straight
    // from it (hence the borrow: no copy on the stack).
    #[allow(clippy::needless_borrows_for_generic_args)]
    unsafe {
        if ack != (*pending).ack {
            bump_stat(&STATS, STAT_HANDSHAKES_REJECTED);
            return;
        }
        if VISITORS.insert(&(*pending).visitor, secs(now_ns()), 0).is_ok() {
            bump_stat(&STATS, STAT_VISITORS_RECORDED);
        }
    }
    let _ = HANDSHAKES.remove(key);
}

/// Whether the packet goes from a local address to a peer that completed
/// a handshake with it within `window` seconds.
#[inline(always)]
fn recent_visitor(addrs: &Addrs, now: u32, window: u32) -> bool {
    match VISITORS.get_ptr(visitor_key(addrs)) {
        // SAFETY: a map value.
        Some(seen) => now.wrapping_sub(unsafe { *seen }) <= window,
        None => false,
    }
}

#[inline(always)]
fn listed_v4(addr: *const [u8; 4], trie: &LpmTrie<[u8; 4], ListEntry>, version: u32, now: u32) -> bool {
    // SAFETY: the parser checked the address lies inside the packet.
    matches!(trie.get(Key::new(32, unsafe { *addr })), Some(e) if e.listed(version, now))
}

#[inline(always)]
fn listed_v6(addr: *const [u8; 16], trie: &LpmTrie<[u8; 16], ListEntry>, version: u32, now: u32) -> bool {
    // SAFETY: the parser checked the address lies inside the packet.
    matches!(trie.get(Key::new(128, unsafe { *addr })), Some(e) if e.listed(version, now))
}

#[inline(always)]
fn source_blocklisted(addrs: &Addrs, version: u32, now: u32) -> bool {
    match *addrs {
        Addrs::V4 { src, .. } => listed_v4(src, &BLOCK_V4, version, now),
        Addrs::V6 { src, .. } => listed_v6(src, &BLOCK_V6, version, now),
    }
}

#[inline(always)]
fn source_allowlisted(addrs: &Addrs, version: u32, now: u32) -> bool {
    match *addrs {
        Addrs::V4 { src, .. } => listed_v4(src, &ALLOW_V4, version, now),
        Addrs::V6 { src, .. } => listed_v6(src, &ALLOW_V6, version, now),
    }
}

#[inline(always)]
fn either_listed(addrs: &Addrs, version: u32, now: u32) -> bool {
    match *addrs {
        Addrs::V4 { src, dst } => listed_v4(src, &ALLOW_V4, version, now) || listed_v4(dst, &ALLOW_V4, version, now),
        Addrs::V6 { src, dst } => listed_v6(src, &ALLOW_V6, version, now) || listed_v6(dst, &ALLOW_V6, version, now),
    }
}
