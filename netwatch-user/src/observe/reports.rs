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
    let mut incidents = incident_store(state_dir)?
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
    merge_live(&mut incidents, &tracked);
    Ok(LookupReport {
        ip,
        incidents,
        tracked,
        blocks,
    })
}

/// Brings each open incident up to what the kernel counts right now: the
/// controller writes an incident when the flag arrives and then every few
/// seconds, while the kernel's record of the source keeps counting (after
/// a sweep, the incident can say 20 destinations while the record says
/// 249). The open incident of a flagged record is the newest one of its
/// rule, direction and classification last seen within
/// [`REOPEN_AFTER`](crate::detection::detector::REOPEN_AFTER) of it; its
/// packets, distinct destinations, last sighting and block are the larger
/// of the two. `incidents` is newest first.
pub fn merge_live(incidents: &mut [Incident], tracked: &[SourceView]) {
    for live in tracked.iter().filter(|t| t.flagged) {
        let Ok(live_last) = humantime::parse_rfc3339_weak(&live.last_seen) else {
            continue;
        };
        let Some(open) = incidents.iter_mut().find(|i| {
            i.summary_sources.is_none()
                && i.rule == live.rule
                && i.direction == live.direction
                && i.classification == live.classification
        }) else {
            continue;
        };
        if live_last.duration_since(open.last_seen).unwrap_or_default() > crate::detection::detector::REOPEN_AFTER {
            continue;
        }
        open.packets = open.packets.max(live.packets);
        open.distinct_destinations = open.distinct_destinations.max(live.distinct_destinations);
        open.last_seen = open.last_seen.max(live_last);
        if let Some(until) = live
            .blocked_until
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        {
            open.blocked_until = Some(open.blocked_until.map_or(until, |t| t.max(until)));
            open.blocked = true;
        }
    }
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::{clock::rfc3339, detection::incidents::Classification};

    fn incident(id: i64, rule: &str, last_seen: SystemTime, packets: u64, distinct: u32) -> Incident {
        Incident {
            id,
            source: "198.18.0.66".parse().unwrap(),
            rule: rule.into(),
            direction: "inbound".into(),
            interface: "veth0".into(),
            classification: Classification::Scan,
            first_seen: last_seen - Duration::from_secs(2),
            last_seen,
            packets,
            distinct_destinations: distinct,
            blocked: false,
            blocked_until: None,
            recovered: false,
            reason: Default::default(),
            failed_contacts: 0,
            summary_sources: None,
        }
    }

    fn tracked(rule: &str, last_seen: SystemTime, packets: u64, distinct: u32, flagged: bool) -> SourceView {
        SourceView {
            source: "198.18.0.66".parse().unwrap(),
            rule: rule.into(),
            direction: "inbound",
            interface: "veth0".into(),
            classification: Classification::Scan,
            first_seen: rfc3339(last_seen - Duration::from_secs(3)),
            last_seen: rfc3339(last_seen),
            packets,
            bytes: packets * 50,
            distinct_destinations: distinct,
            flagged,
            blocked_until: None,
        }
    }

    /// Right after an nbtscan sweep: the incident was written at the flag
    /// (20 destinations), the kernel has counted the rest of the /24.
    #[test]
    fn an_open_incident_shows_the_kernels_live_counts() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let mut incidents = vec![
            incident(3, "udp/137", now - Duration::from_secs(4), 20, 20),
            incident(2, "tcp/5190", now - Duration::from_secs(4), 20, 20),
            // An older, closed incident of the same rule.
            incident(1, "udp/137", now - Duration::from_secs(86400), 30, 30),
        ];
        let live = [
            tracked("udp/137", now, 249, 249, true),
            // Not flagged: no incident of its own to update.
            tracked("tcp/5190", now, 999, 999, false),
        ];
        merge_live(&mut incidents, &live);
        assert_eq!((incidents[0].packets, incidents[0].distinct_destinations), (249, 249));
        assert_eq!(incidents[0].last_seen, now);
        assert_eq!(
            incidents[0].first_seen,
            now - Duration::from_secs(6),
            "first_seen is the incident's"
        );
        assert_eq!((incidents[1].packets, incidents[1].distinct_destinations), (20, 20));
        assert_eq!((incidents[2].packets, incidents[2].distinct_destinations), (30, 30));
        // A record flagged long after the newest incident closed is a new
        // flag's, not the incident's.
        let mut closed = vec![incident(1, "udp/137", now - Duration::from_secs(86400), 30, 30)];
        merge_live(&mut closed, &live);
        assert_eq!(closed[0].packets, 30);
    }
}
