//! Benchmark traffic generator: an XDP program run through
//! BPF_PROG_TEST_RUN with `BPF_F_TEST_XDP_LIVE_FRAMES`, transmitting
//! every frame out of the interface it is "received" on (XDP_TX), so it
//! arrives at the veth peer under test. With `sources > 0` it rewrites the
//! IPv4 source address of each frame, cycling through `sources` distinct
//! addresses from `base`, to fill netwatch's per-source map. Also holds
//! the bare `XDP_DROP` program the benchmarks compare against.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::map, macros::xdp, maps::Array, programs::XdpContext};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct GenState {
    pub next: u32,
    pub sources: u32,
    /// First source address, host order.
    pub base: u32,
    pub _pad: u32,
}

#[map]
static GEN: Array<GenState> = Array::with_max_entries(1, 0);

/// Offset of the IPv4 source address in an untagged frame.
const IPV4_SRC: usize = 14 + 12;

#[xdp]
pub fn netwatch_bench_gen(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if let Some(state) = GEN.get_ptr_mut(0) {
        // SAFETY: map value.
        let state = unsafe { &mut *state };
        if state.sources > 0 && start + IPV4_SRC + 4 <= end {
            let n = state.next;
            state.next = if n + 1 >= state.sources { 0 } else { n + 1 };
            let addr = state.base.wrapping_add(n).to_be_bytes();
            // SAFETY: bounds checked above.
            unsafe { *((start + IPV4_SRC) as *mut [u8; 4]) = addr };
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
