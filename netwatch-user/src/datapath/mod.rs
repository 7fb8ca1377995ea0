//! The eBPF datapath as the controller sees it: one module per concern.
//!
//! - `controller`: [`Datapath`], what `run` drives: open, apply, attach,
//!   detach;
//! - `load`: the embedded object, one program instance per attachment;
//! - `pins`: the pin directory (bpffs, lock, layout check);
//! - `maps`: [`PinnedMaps`], the handle on the pinned maps;
//! - `install` and `lists`: policy versions and list entries written into
//!   the maps;
//! - `slots`: interface slots and what is attached to them;
//! - `iface`: interface index and link type;
//! - `links`: link notifications (rtnetlink), which `run` follows;
//! - `attach` and `tc`: XDP and TC egress attachments, and detaching.
//!
//! Every map is pinned by name under the pin directory, so counters and
//! enforcement state outlive the controller. Each attachment (XDP on an
//! interface, TC egress on an interface) is its own program instance with
//! the interface slot and direction set as load-time constants, sharing
//! the pinned maps.

mod attach;
mod controller;
mod iface;
pub mod install;
mod links;
pub mod lists;
mod load;
mod maps;
mod pins;
mod slots;
pub mod tc;

pub use attach::{Attachments, XdpAttachMode, detach_all};
pub use controller::Datapath;
pub use iface::{ifindex, ifname, link_kind};
pub use links::{LinkEvent, LinkEvents};
pub use load::{EBPF_OBJECT, TC_PROGRAM, XDP_PROGRAM, load_instance};
pub use maps::PinnedMaps;
pub use pins::{PinDirLock, lock_pin_dir, prepare_pin_dir};
pub use slots::{claim_iface_slot, iface_name, kernel_names, mark_all_detached, mark_attached, update_iface};
