//! Detection: flag events from the kernel become incidents.
//!
//! - `contacts`: reply-aware flagging (first contacts answered or not);
//! - `detector`: reads flag events, keeps open incidents up to date, and
//!   recovers flags whose events were lost;
//! - `incidents`: the SQLite incident database;
//! - `state_dir`: the state directory, owned by netwatch or refused;
//! - `sources`: the per-source records, auto-blocks and pending memo
//!   counts, as `lookup`, `top` and the detector read them.

pub mod contacts;
pub mod detector;
pub mod incidents;
pub mod sources;
pub mod state_dir;
