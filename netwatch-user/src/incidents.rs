//! The incident record: every flag the datapath raises becomes (or
//! updates) a row in an embedded SQLite database under the state
//! directory, so incidents survive restarts and can be looked up by IP.

use std::{net::IpAddr, path::Path, time::SystemTime};

use anyhow::{Context as _, Result};
use rusqlite::{Connection, OpenFlags, OptionalExtension as _, params};
use serde::Serialize;

use crate::clock::{from_unix, rfc3339, unix_secs};

pub const DB_FILE: &str = "incidents.sqlite";

/// What kind of traffic an incident is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Classification {
    /// One-to-many probes: a worm or a scanner.
    Scan,
    /// udp/137 towards hosts that just visited a web port (IIS).
    ReverseLookup,
}

impl Classification {
    pub fn label(self) -> &'static str {
        match self {
            Classification::Scan => "scan",
            Classification::ReverseLookup => "reverse-lookup",
        }
    }
    fn parse(s: &str) -> Self {
        if s == "reverse-lookup" {
            Classification::ReverseLookup
        } else {
            Classification::Scan
        }
    }
}

/// One incident, as stored and as `lookup` prints it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Incident {
    pub id: i64,
    pub source: IpAddr,
    pub rule: String,
    pub direction: String,
    pub interface: String,
    pub classification: Classification,
    #[serde(serialize_with = "ser_time")]
    pub first_seen: SystemTime,
    #[serde(serialize_with = "ser_time")]
    pub last_seen: SystemTime,
    pub packets: u64,
    pub distinct_destinations: u32,
    pub blocked: bool,
    #[serde(serialize_with = "ser_opt_time")]
    pub blocked_until: Option<SystemTime>,
}

fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

fn ser_opt_time<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339(*t)),
        None => s.serialize_none(),
    }
}

/// A flag (or a refresh of one) as the controller reports it.
#[derive(Clone, Debug)]
pub struct Observation {
    pub source: IpAddr,
    pub rule: String,
    pub direction: String,
    pub interface: String,
    pub classification: Classification,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    pub packets: u64,
    pub distinct_destinations: u32,
    pub blocked_until: Option<SystemTime>,
}

pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) the database for writing, in WAL mode
    /// so readers (`lookup`, the HTTP API) never block the controller.
    pub fn open(state_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating state directory {}", state_dir.display()))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting permissions of {}", state_dir.display()))?;
        let path = state_dir.join(DB_FILE);
        let conn = Connection::open(&path).with_context(|| format!("opening incident database {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting permissions of {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS incidents (
                id INTEGER PRIMARY KEY,
                source TEXT NOT NULL,
                rule TEXT NOT NULL,
                direction TEXT NOT NULL,
                interface TEXT NOT NULL,
                classification TEXT NOT NULL,
                first_seen INTEGER NOT NULL,
                last_seen INTEGER NOT NULL,
                packets INTEGER NOT NULL,
                distinct_destinations INTEGER NOT NULL,
                blocked_until INTEGER
            );
            CREATE INDEX IF NOT EXISTS incidents_by_source ON incidents (source, last_seen);",
        )
        .with_context(|| format!("creating the schema in {}", path.display()))?;
        Ok(Store { conn })
    }

    /// Opens an existing database read-only (for the query commands).
    pub fn open_read_only(state_dir: &Path) -> Result<Option<Self>> {
        let path = state_dir.join(DB_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening incident database {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Some(Store { conn }))
    }

    /// Records an observation: updates the open incident of the same
    /// source, rule, direction and classification (one whose last sighting
    /// is within `reopen_after` of this one), or opens a new one.
    pub fn record(&self, obs: &Observation, reopen_after: std::time::Duration) -> Result<i64> {
        let last = unix_secs(obs.last_seen);
        let open: Option<(i64, i64)> = self
            .conn
            .query_row(
                "SELECT id, first_seen FROM incidents
                 WHERE source = ?1 AND rule = ?2 AND direction = ?3 AND classification = ?4 AND last_seen >= ?5
                 ORDER BY last_seen DESC LIMIT 1",
                params![
                    obs.source.to_string(),
                    obs.rule,
                    obs.direction,
                    obs.classification.label(),
                    last - reopen_after.as_secs() as i64
                ],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let blocked_until = obs.blocked_until.map(unix_secs);
        match open {
            Some((id, _)) => {
                self.conn.execute(
                    "UPDATE incidents SET interface = ?2, last_seen = MAX(last_seen, ?3), packets = MAX(packets, ?4),
                     distinct_destinations = MAX(distinct_destinations, ?5),
                     blocked_until = COALESCE(?6, blocked_until) WHERE id = ?1",
                    params![
                        id,
                        obs.interface,
                        last,
                        obs.packets as i64,
                        obs.distinct_destinations,
                        blocked_until
                    ],
                )?;
                Ok(id)
            }
            None => {
                self.conn.execute(
                    "INSERT INTO incidents (source, rule, direction, interface, classification, first_seen, last_seen,
                     packets, distinct_destinations, blocked_until) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    params![
                        obs.source.to_string(),
                        obs.rule,
                        obs.direction,
                        obs.interface,
                        obs.classification.label(),
                        unix_secs(obs.first_seen),
                        last,
                        obs.packets as i64,
                        obs.distinct_destinations,
                        blocked_until
                    ],
                )?;
                Ok(self.conn.last_insert_rowid())
            }
        }
    }

    /// Every incident of `source`, newest first.
    pub fn by_source(&self, source: IpAddr) -> Result<Vec<Incident>> {
        self.query(
            "WHERE source = ?1 ORDER BY last_seen DESC, id DESC",
            params![source.to_string()],
        )
    }

    /// The most recent incidents.
    pub fn recent(&self, limit: usize) -> Result<Vec<Incident>> {
        self.query("ORDER BY last_seen DESC, id DESC LIMIT ?1", params![limit as i64])
    }

    fn query(&self, tail: &str, args: impl rusqlite::Params) -> Result<Vec<Incident>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT id, source, rule, direction, interface, classification, first_seen, last_seen, packets,
             distinct_destinations, blocked_until FROM incidents {tail}"
        ))?;
        let now = SystemTime::now();
        let rows = stmt.query_map(args, |row| {
            let source: String = row.get(1)?;
            let classification: String = row.get(5)?;
            let blocked_until: Option<i64> = row.get(10)?;
            let blocked_until = blocked_until.map(from_unix);
            Ok(Incident {
                id: row.get(0)?,
                source: source.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
                rule: row.get(2)?,
                direction: row.get(3)?,
                interface: row.get(4)?,
                classification: Classification::parse(&classification),
                first_seen: from_unix(row.get(6)?),
                last_seen: from_unix(row.get(7)?),
                packets: row.get::<_, i64>(8)? as u64,
                distinct_destinations: row.get(9)?,
                blocked: blocked_until.is_some_and(|t| t > now),
                blocked_until,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
