//! The data model of `lookup`, `incidents` and `top`: what the commands
//! print (as text or with `--json`) and what the JSON API serves.

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use crate::{
    datapath::PinnedMaps,
    detection::{
        incidents::{DB_FILE, Incident, Store},
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

/// The incident database of `state_dir`, opened read-only. What cannot
/// be read is an error naming the path and why — never taken for an
/// empty database: a directory or database the caller may not read
/// (root-only), a state directory or database that does not exist (no
/// `netwatch run` with this `state_dir`), a file that is not netwatch's
/// database.
pub fn incident_store(state_dir: &Path) -> Result<Store> {
    let path = state_dir.join(DB_FILE);
    let denied = |what: &Path| {
        anyhow::anyhow!(
            "permission denied reading {}: the incident database is readable only by the user `netwatch run` runs as (root); run this as root",
            what.display()
        )
    };
    use std::io::ErrorKind::{NotFound, PermissionDenied};
    match std::fs::metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == PermissionDenied => return Err(denied(&path)),
        Err(e) if e.kind() == NotFound => match std::fs::metadata(state_dir) {
            Err(e) if e.kind() == PermissionDenied => return Err(denied(state_dir)),
            Err(e) if e.kind() == NotFound => bail!(
                "state directory {} does not exist: no `netwatch run` has used it (set it with --state-dir, NETWATCH_STATE_DIR or state_dir in the config)",
                state_dir.display()
            ),
            _ => bail!(
                "no incident database {}: no `netwatch run` has used this state directory (set it with --state-dir, NETWATCH_STATE_DIR or state_dir in the config)",
                path.display()
            ),
        },
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    Store::open_read_only(state_dir)?.with_context(|| format!("no incident database {}", path.display()))
}

/// `maps` is `None` when the pins are gone (after `detach`): incidents
/// still answer.
pub fn lookup_report(maps: Option<&PinnedMaps>, state_dir: &Path, ip: IpAddr) -> Result<LookupReport> {
    let incidents = incident_store(state_dir)?
        .by_source(ip)
        .with_context(|| format!("reading incidents from {}", state_dir.join(DB_FILE).display()))?;
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

/// Incidents last seen within `since` (all without it), newest first; a
/// database that cannot be read is an error (see [`incident_store`]).
pub fn incidents_report(state_dir: &Path, since: Option<Duration>) -> Result<IncidentsReport> {
    let cutoff = since.map(|d| SystemTime::now().checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH));
    let incidents = incident_store(state_dir)?
        .seen_since(cutoff)
        .with_context(|| format!("reading incidents from {}", state_dir.join(DB_FILE).display()))?;
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
