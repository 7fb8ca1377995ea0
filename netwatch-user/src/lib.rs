//! The netwatch controller: loads and attaches the datapath, keeps its
//! maps in step with the configuration, and reports what it counted.

pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod datapath;
pub mod detector;
pub mod features;
pub mod http;
pub mod incidents;
pub mod install;
pub mod metrics;
pub mod netns;
pub mod policy;
pub mod snapshot;
pub mod sources;
pub mod tc;
