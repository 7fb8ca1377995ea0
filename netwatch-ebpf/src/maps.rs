//! The maps of the datapath. The controller pins each of them under the
//! pin directory by its name (see `netwatch_common::maps`).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use netwatch_common::{
    CLASS_COUNTER_ENTRIES, Contact, ContactKey, Counter, EVENT_LOSS_CAUSES, EventBudget, FLAG_COUNTER_ENTRIES,
    FloodCache, Handshake, HandshakeKey, IfaceInfo, ListEntry, MAX_AUTO_BLOCKS, MAX_CIDRS, MAX_CONTACTS,
    MAX_HANDSHAKES, MAX_IFACES, MAX_RULES, MAX_SOURCES, MAX_VISITORS, PORT_RULE_ENTRIES, PortRules,
    RULE_COUNTER_ENTRIES, RuleInfo, STATS as STAT_ENTRIES, Settings, SourceKey, SourceState, VisitorKey,
};

#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// (protocol, port) -> rule in each policy version: an array, so the one
/// lookup every packet with ports pays is an inlined index, not a hash.
#[map]
pub static PORT_RULES: Array<PortRules> = Array::with_max_entries(PORT_RULE_ENTRIES, 0);

/// Rule slot descriptions for the controller; the datapath never reads it.
#[map]
pub static RULE_INFO: Array<RuleInfo> = Array::with_max_entries(MAX_RULES, 0);

/// Interface slot descriptions for the controller; never read here.
#[map]
pub static IFACE_INFO: Array<IfaceInfo> = Array::with_max_entries(MAX_IFACES, 0);

/// The kernel's name of a slot's interface after a rename (zeroes: its
/// configured name), for the controller and `status`; never read here.
#[map]
pub static IFACE_KERNEL_NAMES: Array<[u8; 16]> = Array::with_max_entries(MAX_IFACES, 0);

#[map]
pub static RULE_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(RULE_COUNTER_ENTRIES, 0);

#[map]
pub static CLASS_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(CLASS_COUNTER_ENTRIES, 0);

#[map]
pub static ALLOW_V4: LpmTrie<[u8; 4], ListEntry> = LpmTrie::with_max_entries(MAX_CIDRS, BPF_F_NO_PREALLOC);
#[map]
pub static ALLOW_V6: LpmTrie<[u8; 16], ListEntry> = LpmTrie::with_max_entries(MAX_CIDRS, BPF_F_NO_PREALLOC);
#[map]
pub static BLOCK_V4: LpmTrie<[u8; 4], ListEntry> = LpmTrie::with_max_entries(MAX_CIDRS, BPF_F_NO_PREALLOC);
#[map]
pub static BLOCK_V6: LpmTrie<[u8; 16], ListEntry> = LpmTrie::with_max_entries(MAX_CIDRS, BPF_F_NO_PREALLOC);

/// Per-source state of traffic that matched a rule. LRU: a flood of new
/// sources evicts the least recently seen.
#[map]
pub static SOURCES: LruHashMap<SourceKey, SourceState> = LruHashMap::with_max_entries(MAX_SOURCES, 0);

/// (local address, visitor) pairs whose TCP handshake on a web port
/// completed, value: CLOCK_MONOTONIC second of the visitor's ACK. Only
/// that proof inserts here.
#[map]
pub static VISITORS: LruHashMap<VisitorKey, u32> = LruHashMap::with_max_entries(MAX_VISITORS, 0);

/// SYN-ACKs a web port sent, by the visitor's address and port, waiting
/// for the ACK that proves the visitor saw them. A flood of spoofed SYNs
/// churns this map only.
#[map]
pub static HANDSHAKES: LruHashMap<HandshakeKey, Handshake> = LruHashMap::with_max_entries(MAX_HANDSHAKES, 0);

/// One `FlagEvent` per source crossing its threshold.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// `STAT_*` counters.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_ENTRIES, 0);

/// Sources flagged, per rule and direction.
#[map]
pub static FLAG_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(FLAG_COUNTER_ENTRIES, 0);

/// Reverse lookups (udp/137 towards a recent web visitor), indexed like
/// `RULE_COUNTERS`.
#[map]
pub static REVERSE_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(RULE_COUNTER_ENTRIES, 0);

/// One `FloodCache` per CPU.
#[map]
pub static FLOOD_CACHE: PerCpuArray<FloodCache> = PerCpuArray::with_max_entries(1, 0);

/// Flag events not delivered, by cause (`EVENT_LOSS_*`).
#[map]
pub static EVENT_LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(EVENT_LOSS_CAUSES, 0);

/// One `EventBudget` per CPU.
#[map]
pub static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(1, 0);

/// Auto-blocks: the flagged source's key -> the CLOCK_MONOTONIC second the
/// block ends. Apart from the per-source records, so that the LRU cannot
/// end a block by evicting its record; a preallocated hash map, so that an
/// insert fails once `MAX_AUTO_BLOCKS` entries are held (the cap).
#[map]
pub static AUTO_BLOCKS: HashMap<SourceKey, u32> = HashMap::with_max_entries(MAX_AUTO_BLOCKS, 0);

/// Sources the controller flagged for failed first contacts, indexed like
/// `FLAG_COUNTERS`; written by the controller only (pinned, so the counts
/// survive its restarts), never read here.
#[map]
pub static CONTACT_FLAGS: Array<u64> = Array::with_max_entries(FLAG_COUNTER_ENTRIES, 0);

/// First contacts of probing sources and whether they were answered
/// (see `contacts`). LRU: a flood of new contacts evicts the oldest.
#[map]
pub static CONTACTS: LruHashMap<ContactKey, Contact> = LruHashMap::with_max_entries(MAX_CONTACTS, 0);
