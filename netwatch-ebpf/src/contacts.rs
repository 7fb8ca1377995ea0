//! Reply-aware detection, the kernel's half: a probing source's first
//! contacts with new destinations are remembered in `CONTACTS`, and an
//! answer from a probed address and port (any datagram or segment from
//! it back to the prober) marks its contact answered. The controller
//! judges each contact once its rule's answer time has passed (see the
//! controller's `detection::contacts`): answered is a success, silent a
//! failure.

use netwatch_common::{
    CONTACT_ANSWERED, CONTACT_PORT_MASK, CONTACT_REFUSED, Contact, ContactKey, Direction, MemoTag, PORT_CONTACTS,
    Protocol,
};

use crate::{
    maps::{CONTACTS, PORT_RULES},
    memo,
    parse::{Packet, TCP_RST},
};

/// Remembers the first contact the memo's staged `tag` describes (the
/// packet just judged), made at second `now` on interface slot `iface`
/// in direction `dir` under rule slot `rule`. Replaces an earlier contact
/// with the same destination (a new window's): its answer is awaited
/// afresh.
#[inline(always)]
pub fn remember_first_contact(tag: &MemoTag, rule: u32, dir: Direction, iface: u32, now: u32) {
    let key = contact_key(tag.src, tag.dst, tag.port);
    let contact = Contact {
        since: now,
        iface: iface as u16,
        rule: rule as u8,
        direction: dir.into(),
        answered: 0,
    };
    let _ = CONTACTS.insert(key, contact, 0);
}

/// The key of a contact from `prober` to `probed` at the memo tag's port
/// word `port` (destination port, protocol, family; the rest dropped).
#[inline(always)]
fn contact_key(prober: [u32; 4], probed: [u32; 4], port: u32) -> ContactKey {
    ContactKey {
        prober,
        probed,
        port: port & CONTACT_PORT_MASK,
    }
}

/// If `packet` comes from the address and port of a remembered first
/// contact, back to its prober: marks the contact answered, or refused
/// for a TCP RST (a closed port: a failure, as threshold random walk
/// counts it), whichever came first. Only
/// packets whose source port has a rule that records contacts look the
/// map up.
#[inline(always)]
pub fn observe_answer(packet: &Packet) {
    let Some(rules) = PORT_RULES.get(netwatch_common::port_rule_index(packet.protocol, packet.src_port)) else {
        return;
    };
    if (rules.versions[0].flags | rules.versions[1].flags) & PORT_CONTACTS == 0 {
        return;
    }
    // The probe's tag, seen from the answer: its source is the prober,
    // its destination port the answer's source port.
    let tag = memo::tag_of(packet, 0, Direction::Inbound, 0);
    let key = contact_key(tag.dst, tag.src, tag.port & !0xffff | packet.src_port as u32);
    let answer = if packet.protocol == Protocol::Tcp && packet.tcp_flags & TCP_RST != 0 {
        CONTACT_REFUSED
    } else {
        CONTACT_ANSWERED
    };
    if let Some(contact) = CONTACTS.get_ptr_mut(key) {
        // SAFETY: a map value; two CPUs racing store answers of the same
        // contact, either is right.
        unsafe {
            if (*contact).answered == 0 {
                (*contact).answered = answer;
            }
        }
    }
}
