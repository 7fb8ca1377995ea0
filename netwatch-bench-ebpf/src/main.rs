//! Benchmark traffic generator: an XDP program run through
//! BPF_PROG_TEST_RUN with `BPF_F_TEST_XDP_LIVE_FRAMES`, transmitting
//! every frame out of the interface it is "received" on (XDP_TX), so it
//! arrives at the veth peer under test. With `count > 0` it rewrites the
//! IPv4 source (or destination) address of each frame, or the low 32 bits
//! of the IPv6 one (so a million sources fit in 2001:db8::/32), cycling through
//! `count` distinct addresses from `base`: many spoofed sources fill
//! netwatch's per-source map; many destinations make one scanner. Also holds
//! the bare `XDP_DROP` program the benchmarks compare against.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::map, macros::xdp, maps::Array, programs::XdpContext};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct GenState {
    pub next: u32,
    /// How many distinct addresses to cycle through (0: none).
    pub count: u32,
    /// First address, host order.
    pub base: u32,
    /// 0: rewrite the source address; 1: the destination address.
    pub field: u32,
}

#[map]
static GEN: Array<GenState> = Array::with_max_entries(1, 0);

/// Offsets, in an untagged frame, of the IPv4 source address and of the
/// last four bytes of the IPv6 source address; destinations follow at +4
/// (IPv4) and +16 (IPv6).
const IPV4_SRC: usize = 14 + 12;
const IPV6_SRC_LOW: usize = 14 + 8 + 12;

#[xdp]
pub fn netwatch_bench_gen(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if let Some(state) = GEN.get_ptr_mut(0) {
        // SAFETY: map value.
        let state = unsafe { &mut *state };
        // SAFETY: 14 bytes are checked before the ethertype is read.
        let ipv6 = start + 14 <= end && unsafe { *((start + 12) as *const [u8; 2]) } == [0x86, 0xdd];
        let at = match (ipv6, state.field) {
            (false, 0) => start + IPV4_SRC,
            (false, _) => start + IPV4_SRC + 4,
            (true, 0) => start + IPV6_SRC_LOW,
            (true, _) => start + IPV6_SRC_LOW + 16,
        };
        if state.count > 0 && at + 4 <= end {
            let n = state.next;
            state.next = if n + 1 >= state.count { 0 } else { n + 1 };
            let addr = state.base.wrapping_add(n).to_be_bytes();
            // SAFETY: bounds checked above.
            unsafe { *(at as *mut [u8; 4]) = addr };
        }
    }
    xdp_action::XDP_TX
}

/// The floor of every per-packet comparison: drop without looking.
#[xdp]
pub fn netwatch_bench_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
