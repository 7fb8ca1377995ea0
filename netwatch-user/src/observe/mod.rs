//! Observation: what the kernel and the controller counted, for people
//! and for Prometheus.
//!
//! - `snapshot`: the maps read into one consistent view;
//! - `reports`: the data model of `lookup`, `top` and `incidents`, shared
//!   by the commands and the JSON API;
//! - `metrics`: the Prometheus exposition;
//! - `http`: `/metrics` and the read-only JSON API.

pub mod http;
pub mod logging;
pub mod metrics;
pub mod reports;
pub mod snapshot;
