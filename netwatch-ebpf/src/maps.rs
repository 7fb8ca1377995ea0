//! The maps of the datapath. The controller pins each of them under the
//! pin directory by its name (see `netwatch_common::maps`).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, LpmTrie, PerCpuArray},
};
use netwatch_common::{
    CLASS_COUNTER_ENTRIES, Counter, IfaceInfo, MAX_CIDRS, MAX_IFACES, MAX_RULES, PORT_RULE_ENTRIES,
    PortRule, RULE_COUNTER_ENTRIES, RuleInfo, Settings,
};

#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// (protocol, port) -> rule: an array, so the one lookup every packet with
/// ports pays is an inlined index, not a hash.
#[map]
pub static PORT_RULES: Array<PortRule> = Array::with_max_entries(PORT_RULE_ENTRIES, 0);

/// Rule slot descriptions for the controller; the datapath never reads it.
#[map]
pub static RULE_INFO: Array<RuleInfo> = Array::with_max_entries(MAX_RULES, 0);

/// Interface slot descriptions for the controller; never read here.
#[map]
pub static IFACE_INFO: Array<IfaceInfo> = Array::with_max_entries(MAX_IFACES, 0);

#[map]
pub static RULE_COUNTERS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(RULE_COUNTER_ENTRIES, 0);

#[map]
pub static CLASS_COUNTERS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(CLASS_COUNTER_ENTRIES, 0);

#[map]
pub static ALLOW_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(MAX_CIDRS, BPF_F_NO_PREALLOC);
#[map]
pub static ALLOW_V6: LpmTrie<[u8; 16], u8> =
    LpmTrie::with_max_entries(MAX_CIDRS, BPF_F_NO_PREALLOC);
#[map]
pub static BLOCK_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(MAX_CIDRS, BPF_F_NO_PREALLOC);
#[map]
pub static BLOCK_V6: LpmTrie<[u8; 16], u8> =
    LpmTrie::with_max_entries(MAX_CIDRS, BPF_F_NO_PREALLOC);
