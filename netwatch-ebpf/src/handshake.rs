//! Web visitors: a SYN-ACK leaving a web port is remembered with the
//! acknowledgement number it asks for; the visitor's ACK carrying that
//! number, arriving, records the visitor. A udp/137 lookup towards a
//! recent visitor is then a reverse lookup, not a probe.

use netwatch_common::{
    Direction, Handshake, HandshakeKey, PORT_WEB, Protocol, STAT_HANDSHAKES_REJECTED, STAT_HANDSHAKES_STARTED,
    STAT_VISITORS_RECORDED, VisitorKey, port_rule_index,
};

use crate::{
    helpers::{coarse_monotonic_secs, increment, ipv4_as_16, source_addr16},
    maps::{HANDSHAKES, PORT_RULES, SETTINGS, STATS, VISITORS},
    parse::{Addrs, Packet, TCP_ACK, TCP_RST, TCP_SYN, TcpHead},
};

/// The packet's source and destination as a `VisitorKey`'s local
/// address and visitor.
#[inline(always)]
fn visitor_key(addrs: &Addrs) -> VisitorKey {
    match *addrs {
        Addrs::V4 { src, dst } => VisitorKey {
            local: ipv4_as_16(src),
            visitor: ipv4_as_16(dst),
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

/// The TCP header's first bytes. Only called for TCP packets (flags
/// set), whose `tcp` the parser checked is inside the frame.
#[inline(always)]
fn tcp_head(packet: &Packet) -> &TcpHead {
    // SAFETY: as above.
    unsafe { &*packet.tcp }
}

/// Watches web handshakes: remembers a SYN-ACK leaving a web port, and
/// records the visitor whose ACK to a web port acknowledges one. Only TCP
/// to or from a web port gets past the flag tests. `rule_flags`: the
/// destination port's rule flags (0 where it has none).
#[inline(always)]
pub fn observe_web_handshake(packet: &Packet, rule_flags: u32, dir: Direction) {
    let flags = packet.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST);
    if dir == Direction::Inbound {
        if rule_flags & PORT_WEB != 0 && flags == TCP_ACK {
            let (peer, family) = source_addr16(&packet.addrs);
            let key = HandshakeKey {
                peer,
                peer_port: packet.src_port,
                family,
                _pad: 0,
            };
            record_visitor_on_ack(&key, u32::from_be_bytes(tcp_head(packet).ack));
        }
    } else if flags == TCP_SYN | TCP_ACK
        && let Some(rules) = PORT_RULES.get(port_rule_index(Protocol::Tcp, packet.src_port))
        && let Some(settings) = SETTINGS.get(0)
        && rules.version(settings.active_version()).flags & PORT_WEB != 0
    {
        remember_syn_ack(
            &visitor_key(&packet.addrs),
            packet.dst_port,
            u32::from_be_bytes(tcp_head(packet).seq),
        );
    }
}

/// A SYN-ACK leaving a web port towards `visitor`'s `peer_port`, with
/// sequence number `seq`: the handshake is pending until the visitor
/// acknowledges it. Its own BPF function, so that its keys live in a
/// stack frame of their own: the main one has no 60 bytes to spare.
#[inline(never)]
fn remember_syn_ack(visitor: &VisitorKey, peer_port: u16, seq: u32) {
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
        increment(&STATS, STAT_HANDSHAKES_STARTED);
    }
}

/// An ACK with acknowledgement number `ack` arriving at a web port from
/// `key`'s end: if it acknowledges a pending SYN-ACK's sequence number,
/// the handshake is complete and its sender a visitor of the address that
/// sent the SYN-ACK. A wrong number leaves the pending handshake alone (a
/// forger must not cancel a real one). Its own BPF function, like
/// `remember_syn_ack`.
#[inline(never)]
fn record_visitor_on_ack(key: &HandshakeKey, ack: u32) {
    let Some(pending) = HANDSHAKES.get_ptr(key) else {
        return;
    };
    // SAFETY: a map value; the helper reads the visitors' key straight
    // from it (hence the borrow: no copy on the stack).
    #[allow(clippy::needless_borrows_for_generic_args)]
    unsafe {
        if ack != (*pending).ack {
            increment(&STATS, STAT_HANDSHAKES_REJECTED);
            return;
        }
        if VISITORS.insert(&(*pending).visitor, coarse_monotonic_secs(), 0).is_ok() {
            increment(&STATS, STAT_VISITORS_RECORDED);
        }
    }
    let _ = HANDSHAKES.remove(key);
}

/// Whether the packet goes from a local address to a peer that completed
/// a handshake with it within `window` seconds.
#[inline(always)]
pub fn is_recent_visitor(addrs: &Addrs, now: u32, window: u32) -> bool {
    match VISITORS.get_ptr(visitor_key(addrs)) {
        // SAFETY: a map value.
        Some(seen) => now.wrapping_sub(unsafe { *seen }) <= window,
        None => false,
    }
}
