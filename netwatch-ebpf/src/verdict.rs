//! The classification core shared by the XDP and TC programs: parse,
//! look the destination port up in the rule table, count, decide.

use aya_ebpf::maps::{LpmTrie, lpm_trie::Key};
use netwatch_common::{
    ACTION_DROP, Class, Counter, MODE_ENFORCE, Outcome, class_counter_index, port_rule_index,
    rule_counter_index,
};

use crate::{
    maps::{
        ALLOW_V4, ALLOW_V6, BLOCK_V4, BLOCK_V6, CLASS_COUNTERS, PORT_RULES, RULE_COUNTERS, SETTINGS,
    },
    parse::{Addrs, parse},
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

/// Classifies the packet in `[start, end)` seen on interface slot `iface`
/// in direction `dir`, counts it, and says whether to drop it.
#[inline(always)]
pub fn should_drop(start: usize, end: usize, bytes: u64, iface: u32, dir: u32) -> bool {
    let packet = match parse(start, end) {
        Ok(packet) => packet,
        Err(class) => {
            let index = class_counter_index(iface, dir, class as u32);
            bump(CLASS_COUNTERS.get_ptr_mut(index), bytes);
            return false;
        }
    };
    let rule = match PORT_RULES.get(port_rule_index(packet.protocol, packet.dst_port)) {
        Some(rule) if rule.id != 0 => *rule,
        _ => {
            let index = class_counter_index(iface, dir, Class::Unmatched as u32);
            bump(CLASS_COUNTERS.get_ptr_mut(index), bytes);
            return false;
        }
    };

    let drop = match SETTINGS.get(0) {
        Some(settings) if settings.mode == MODE_ENFORCE => {
            // A branch, not `action[dir]`: LLVM turns a variable index into
            // pointer arithmetic on the stack that the verifier rejects.
            let action = if dir == 0 {
                rule.action[0]
            } else {
                rule.action[1]
            };
            let wanted = action == ACTION_DROP
                || (settings.blocklist_active != 0
                    && source_listed(&packet.addrs, &BLOCK_V4, &BLOCK_V6));
            // The allowlist always wins, for either end of the packet.
            wanted && !(settings.allowlist_active != 0 && either_listed(&packet.addrs))
        }
        _ => false,
    };
    let outcome = if drop {
        Outcome::Dropped
    } else {
        Outcome::Passed
    };
    let index = rule_counter_index(iface, dir, rule.slot(), outcome as u32);
    bump(RULE_COUNTERS.get_ptr_mut(index), bytes);
    drop
}

#[inline(always)]
fn listed_v4(addr: *const [u8; 4], trie: &LpmTrie<[u8; 4], u8>) -> bool {
    // SAFETY: the parser checked the address lies inside the packet.
    trie.get(Key::new(32, unsafe { *addr })).is_some()
}

#[inline(always)]
fn listed_v6(addr: *const [u8; 16], trie: &LpmTrie<[u8; 16], u8>) -> bool {
    // SAFETY: the parser checked the address lies inside the packet.
    trie.get(Key::new(128, unsafe { *addr })).is_some()
}

#[inline(always)]
fn source_listed(addrs: &Addrs, v4: &LpmTrie<[u8; 4], u8>, v6: &LpmTrie<[u8; 16], u8>) -> bool {
    match *addrs {
        Addrs::V4 { src, .. } => listed_v4(src, v4),
        Addrs::V6 { src, .. } => listed_v6(src, v6),
    }
}

#[inline(always)]
fn either_listed(addrs: &Addrs) -> bool {
    match *addrs {
        Addrs::V4 { src, dst } => listed_v4(src, &ALLOW_V4) || listed_v4(dst, &ALLOW_V4),
        Addrs::V6 { src, dst } => listed_v6(src, &ALLOW_V6) || listed_v6(dst, &ALLOW_V6),
    }
}
