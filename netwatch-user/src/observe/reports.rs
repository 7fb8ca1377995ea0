//! The data model of `lookup`, `incidents` and `top`: what the commands
//! print (as text or with `--json`) and what the JSON API serves.

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, SystemTime},
};

use anyhow::Result;
use serde::Serialize;

use crate::{
    datapath::PinnedMaps,
    detection::{
        incidents::{Incident, Store},
        sources::{self, BlockView, Names, SourceView},
    },
};

/// The answer to `lookup IP`, as printed with `--json` and served at
/// `/api/lookup/IP`.
#[derive(Debug, Serialize)]
pub struct LookupReport {
    pub ip: IpAddr,
    /// Newest first.
    pub incidents: Vec<Incident>,
    /// What the kernel tracks about the address right now.
    pub tracked: Vec<SourceView>,
    /// Its auto-blocks in force (they outlive the records in `tracked`).
    pub blocks: Vec<BlockView>,
}

/// `maps` is `None` when the pins are gone (after `detach`): incidents
/// still answer.
pub fn lookup_report(maps: Option<&PinnedMaps>, state_dir: &Path, ip: IpAddr) -> Result<LookupReport> {
    let incidents = match Store::open_read_only(state_dir)? {
        Some(store) => store.by_source(ip)?,
        None => Vec::new(),
    };
    let (tracked, blocks) = match maps {
        Some(maps) => {
            let names = Names::read(maps)?;
            (
                sources::lookup(maps, &names, ip)?,
                sources::blocks_of(maps, &names, ip)?,
            )
        }
        None => (Vec::new(), Vec::new()),
    };
    Ok(LookupReport {
        ip,
        incidents,
        tracked,
        blocks,
    })
}

/// The answer to `incidents`, as printed with `--json`.
#[derive(Debug, Serialize)]
pub struct IncidentsReport {
    /// Newest first.
    pub incidents: Vec<Incident>,
}

/// Incidents last seen within `since` (all without it), newest first; no
/// database yet means none.
pub fn incidents_report(state_dir: &Path, since: Option<Duration>) -> Result<IncidentsReport> {
    let cutoff = since.map(|d| SystemTime::now().checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH));
    let incidents = match Store::open_read_only(state_dir)? {
        Some(store) => store.seen_since(cutoff)?,
        None => Vec::new(),
    };
    Ok(IncidentsReport { incidents })
}

#[derive(Debug, Serialize)]
pub struct TopReport {
    pub sources: Vec<SourceView>,
}

pub fn top_report(maps: &PinnedMaps, limit: usize) -> Result<TopReport> {
    Ok(TopReport {
        sources: sources::top(maps, &Names::read(maps)?, limit)?,
    })
}
