//! The netwatch controller: loads and attaches the datapath, keeps its
//! maps in step with the configuration, and reports what it counted.
//!
//! - `datapath`: the eBPF object, its pinned maps, policy written into
//!   them, and attachments;
//! - `detection`: flag events into incidents;
//! - `observe`: snapshots, reports, metrics and the HTTP endpoint;
//! - `fleet`: incidents shared with other sensors through NATS JetStream;
//! - `commands`: one module per subcommand, on top of the others;
//! - `lab` (cargo feature `lab`, on by default): the namespace demo.

pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod datapath;
pub mod detection;
pub mod features;
pub mod fleet;
#[cfg(feature = "lab")]
pub mod lab;
pub mod observe;
pub mod policy;
