//! The classification core shared by the XDP and TC programs: parse,
//! look the destination port up in the rule table, consult the lists,
//! track the source, decide, count. Each concern is its own function;
//! `should_drop` strings them together.

use netwatch_common::{
    Action, Class, Direction, LinkKind, Mode, Outcome, PORT_NBNS, PolicySettings, PortRule, class_counter_index,
    port_rule_index, rule_counter_index,
};

use crate::{
    contacts,
    handshake::{is_recent_visitor, observe_web_handshake},
    helpers::{coarse_monotonic_secs, count_packet},
    lists::{either_allowlisted, source_allowlisted, source_blocklisted},
    maps::{CLASS_COUNTERS, PORT_RULES, REVERSE_COUNTERS, RULE_COUNTERS, SETTINGS},
    memo,
    parse::{Addrs, parse},
    track::{source_auto_blocked, track_source},
};

/// Classifies the packet readable in `[start, end)`, `len` bytes long,
/// seen on interface slot `iface` (whose frames start as `link` says) in
/// direction `dir`, counts it, and says whether to drop it.
#[inline(always)]
pub fn should_drop(start: usize, end: usize, len: usize, iface: u32, dir: Direction, link: LinkKind) -> bool {
    let bytes = len as u64;
    let packet = match parse(start, end, len, link) {
        Ok(packet) => packet,
        Err(class) => {
            count_class(iface, dir, class, bytes);
            // What the parser could not judge may carry a rule port.
            return class.fails_closed() && enforcing();
        }
    };
    let Some(rules) = PORT_RULES.get(port_rule_index(packet.protocol, packet.dst_port)) else {
        return false;
    };
    // Most traffic: no rule and no web port in either policy version.
    if rules.versions[0].is_empty() && rules.versions[1].is_empty() {
        // A SYN-ACK leaving a web port goes to the visitor's ephemeral
        // port, which has no rule: the handshake check must see it here.
        if dir == Direction::Outbound {
            observe_web_handshake(&packet, 0, dir);
        }
        // It may answer a probe (from the probed port back to the prober).
        contacts::observe_answer(&packet);
        count_class(iface, dir, Class::Unmatched, bytes);
        return false;
    }
    let Some(settings) = SETTINGS.get(0) else {
        return false;
    };
    // A flood's repeats stop here.
    let policy_word = settings.active_word();
    if let Some(drop) = memo::replay(&packet, iface, dir, policy_word, bytes) {
        return drop;
    }
    // Staged here, while the addresses are read anyway (reading them again
    // at the end would split the verifier's states).
    memo::stage(&packet, iface, dir, policy_word);
    let version = policy_word & 1;
    let rule = rules.version(version);
    let policy = settings.policy(version);
    observe_web_handshake(&packet, rule.flags, dir);
    if rule.id == 0 {
        count_class(iface, dir, Class::Unmatched, bytes);
        return false;
    }
    // Decided here, where the verifier walks few paths, rather than at
    // the end, where it walks many.
    let memoisable = memo::memoisable(&packet, rule.flags, dir);

    let enforce = policy.mode() == Mode::Enforce;
    let allowlisted =
        enforce && policy.allowlist_active != 0 && either_allowlisted(&packet.addrs, version, coarse_monotonic_secs());
    let reverse = is_reverse_lookup(&packet.addrs, rule, policy, dir);
    let action = rule.action(dir);
    let blocklisted = enforce
        && !allowlisted
        && action != Action::Drop
        && policy.blocklist_active != 0
        && source_blocklisted(&packet.addrs, version, coarse_monotonic_secs());
    // An NBNS response (a name server answering) is traffic, not a probe:
    // counted and judged by the lists and the rule's action, never
    // tracked nor memoised; it may answer a first contact of the host it
    // goes to. A path of its own that ends here, so the tracker's paths
    // stay as they were. A response to port 137 comes from port 137
    // (RFC 1002 4.2.1); an auto-blocked source's responses are dropped
    // like its probes (a flood of forged responses, as BadTunnel sends,
    // is no way past a block).
    if rule.flags & PORT_NBNS != 0 && packet.nbns_response && packet.src_port == packet.dst_port {
        contacts::observe_answer(&packet);
        let auto_blocked =
            enforce && !allowlisted && rule.block_secs != 0 && source_auto_blocked(&packet.addrs, rule, dir);
        let drop = enforce && !allowlisted && (action == Action::Drop || blocklisted || auto_blocked);
        count_matched(iface, dir, rule.slot(), drop, false, bytes);
        return drop;
    }
    // Only the source's own allowlisting spares it an auto-block: a probe
    // to an allowlisted address passes, yet counts towards (and may set)
    // its source's block. The second lookup is paid only by allowlisted
    // traffic on auto-block rules.
    let may_block = enforce
        && (!allowlisted
            || (rule.block_secs != 0 && !source_allowlisted(&packet.addrs, version, coarse_monotonic_secs())));
    // The packet's addresses are not read after this point: the tracker,
    // the largest part of the program, then starts from one verifier
    // state whichever way the parser went through the headers.
    let tracked = track_source(
        &packet.addrs,
        rule,
        dir,
        reverse,
        &settings.hash_key,
        iface,
        bytes,
        may_block,
    );
    let drop = enforce && !allowlisted && (action == Action::Drop || tracked.blocked || blocklisted);
    let counter = count_matched(iface, dir, rule.slot(), drop, reverse, bytes);
    memo::remember(drop, reverse, counter, tracked.memoised && memoisable);
    drop
}

/// Whether the active policy enforces (drops) rather than monitors.
#[inline(always)]
fn enforcing() -> bool {
    matches!(SETTINGS.get(0), Some(s) if s.policy(s.active_version()).mode() == Mode::Enforce)
}

/// udp/137 towards a peer that just visited a web port: a reverse lookup
/// (IIS), tracked apart and never flagged as a scan.
#[inline(always)]
fn is_reverse_lookup(addrs: &Addrs, rule: &PortRule, policy: &PolicySettings, dir: Direction) -> bool {
    rule.flags & PORT_NBNS != 0
        && dir == Direction::Outbound
        && is_recent_visitor(addrs, coarse_monotonic_secs(), policy.visitor_secs)
}

/// Counts a packet under its parse class (`Class::Unmatched` included).
#[inline(always)]
fn count_class(iface: u32, dir: Direction, class: Class, bytes: u64) {
    count_packet(
        CLASS_COUNTERS.get_ptr_mut(class_counter_index(iface, dir, class)),
        bytes,
    );
}

/// Counts a packet that matched rule slot `slot` under its outcome, and
/// a reverse lookup also apart; returns the counters' index.
#[inline(always)]
fn count_matched(iface: u32, dir: Direction, slot: u32, dropped: bool, reverse: bool, bytes: u64) -> u32 {
    let outcome = if dropped { Outcome::Dropped } else { Outcome::Passed };
    let index = rule_counter_index(iface, dir, slot, outcome);
    count_packet(RULE_COUNTERS.get_ptr_mut(index), bytes);
    if reverse {
        count_packet(REVERSE_COUNTERS.get_ptr_mut(index), bytes);
    }
    index
}
