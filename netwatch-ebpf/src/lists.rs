//! The allowlist and blocklist: LPM tries per address family whose
//! entries say in which policy version, and until when, they hold.

use aya_ebpf::maps::{LpmTrie, lpm_trie::Key};
use netwatch_common::ListEntry;

use crate::{
    maps::{ALLOW_V4, ALLOW_V6, BLOCK_V4, BLOCK_V6},
    parse::Addrs,
};

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

/// Whether the packet's source is on the blocklist.
#[inline(always)]
pub fn source_blocklisted(addrs: &Addrs, version: u32, now: u32) -> bool {
    match *addrs {
        Addrs::V4 { src, .. } => listed_v4(src, &BLOCK_V4, version, now),
        Addrs::V6 { src, .. } => listed_v6(src, &BLOCK_V6, version, now),
    }
}

/// Whether the packet's source is on the allowlist.
#[inline(always)]
pub fn source_allowlisted(addrs: &Addrs, version: u32, now: u32) -> bool {
    match *addrs {
        Addrs::V4 { src, .. } => listed_v4(src, &ALLOW_V4, version, now),
        Addrs::V6 { src, .. } => listed_v6(src, &ALLOW_V6, version, now),
    }
}

/// Whether the packet's source or destination is on the allowlist.
#[inline(always)]
pub fn either_allowlisted(addrs: &Addrs, version: u32, now: u32) -> bool {
    match *addrs {
        Addrs::V4 { src, dst } => listed_v4(src, &ALLOW_V4, version, now) || listed_v4(dst, &ALLOW_V4, version, now),
        Addrs::V6 { src, dst } => listed_v6(src, &ALLOW_V6, version, now) || listed_v6(dst, &ALLOW_V6, version, now),
    }
}
