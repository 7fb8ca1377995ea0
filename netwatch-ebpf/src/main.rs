//! netwatch datapath: an XDP program (traffic arriving on an interface)
//! and a TC egress program (traffic the host itself sends), both built on
//! one classification core in [`verdict`].
#![no_std]
#![no_main]
// For the atomic fetch-or in track.rs (nightly builds this crate).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod contacts;
mod handshake;
mod helpers;
mod lists;
mod maps;
mod memo;
mod parse;
mod track;
mod verdict;

use netwatch_common::{Direction, LinkKind};

use aya_ebpf::{
    Global,
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// Interface slot of the interface this instance is attached to. The
/// controller loads one instance per attachment and sets these globals,
/// so the verifier sees them as constants.
#[unsafe(no_mangle)]
static IFACE_SLOT: Global<u32> = Global::new(0);
/// `Direction` of the traffic this instance sees.
#[unsafe(no_mangle)]
static DIRECTION: Global<u8> = Global::new(0);
/// `LinkKind` of the interface: where its frames start.
#[unsafe(no_mangle)]
static LINK_KIND: Global<u32> = Global::new(0);

#[inline(always)]
fn link_kind() -> LinkKind {
    LINK_KIND.load().into()
}

#[inline(always)]
fn direction() -> Direction {
    DIRECTION.load().into()
}

#[xdp]
pub fn netwatch_xdp(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if verdict::should_drop(start, end, end - start, IFACE_SLOT.load(), direction(), link_kind()) {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// Bytes the TC program wants in the linear part of the skb: enough for
/// two VLAN tags or PPPoE, an IPv6 header with extension headers and the
/// ports. Headers beyond it are not read: such a packet counts as cut
/// short and fails closed.
const TC_PULL_LEN: u32 = 256;

#[classifier]
pub fn netwatch_tc(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let want = if len < TC_PULL_LEN { len } else { TC_PULL_LEN };
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        // Headers of locally generated packets are normally linear; pull
        // them in when they are not. Failure leaves the packet as is and
        // the parser counts it as truncated.
        let _ = ctx.pull_data(want);
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    // `len` with no known upper bound, as XDP's `end - start` is. Passed
    // as the 32-bit `skb->len`, its bounds make the 6.1 verifier split
    // states at every length check and walk twice the instructions
    // (920,000 of its 1,000,000; 457,000 this way).
    let linear = end - start;
    let frame_len = linear + core::hint::black_box(len as usize - linear);
    if verdict::should_drop(start, end, frame_len, IFACE_SLOT.load(), direction(), link_kind()) {
        TC_ACT_SHOT
    } else {
        // Let any later TC program see the packet.
        TC_ACT_UNSPEC
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
