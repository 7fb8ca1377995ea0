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
    /// Recorded from the controller's walk of the kernel's per-source map,
    /// because the flag event was lost (the per-CPU event budget or a full
    /// ring buffer); false once a flag event for it arrives.
    pub recovered: bool,
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

/// Where an observation comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// A flag event from the datapath.
    Flag,
    /// The controller's refresh of an incident it follows.
    Refresh,
    /// The controller's walk of the per-source map: a flagged source whose
    /// flag event was lost.
    Recovered,
}

/// A flag (or a refresh of one) as the controller reports it.
#[derive(Clone, Debug)]
pub struct Observation {
    pub seen: Seen,
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
        // Databases made before incidents could be recovered lack the
        // column; every incident in them came from a flag event.
        if !has_column(&conn, "recovered")? {
            conn.execute_batch("ALTER TABLE incidents ADD COLUMN recovered INTEGER NOT NULL DEFAULT 0;")
                .with_context(|| format!("adding the recovered column in {}", path.display()))?;
        }
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

    /// The open incident of the observation's source, rule, direction and
    /// classification: one whose last sighting is within `reopen_after` of
    /// this one.
    pub fn open_incident(&self, obs: &Observation, reopen_after: std::time::Duration) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id FROM incidents
                 WHERE source = ?1 AND rule = ?2 AND direction = ?3 AND classification = ?4 AND last_seen >= ?5
                 ORDER BY last_seen DESC LIMIT 1",
                params![
                    obs.source.to_string(),
                    obs.rule,
                    obs.direction,
                    obs.classification.label(),
                    unix_secs(obs.last_seen) - reopen_after.as_secs() as i64
                ],
                |row| row.get(0),
            )
            .optional()?)
    }

    /// Records an observation: updates the open incident (see
    /// [`Store::open_incident`]), or opens a new one. A flag event marks
    /// the incident as not recovered.
    pub fn record(&self, obs: &Observation, reopen_after: std::time::Duration) -> Result<i64> {
        let last = unix_secs(obs.last_seen);
        let blocked_until = obs.blocked_until.map(unix_secs);
        match self.open_incident(obs, reopen_after)? {
            Some(id) => {
                self.conn.execute(
                    "UPDATE incidents SET interface = ?2, last_seen = MAX(last_seen, ?3), packets = MAX(packets, ?4),
                     distinct_destinations = MAX(distinct_destinations, ?5),
                     blocked_until = COALESCE(?6, blocked_until),
                     recovered = CASE WHEN ?7 THEN 0 ELSE recovered END WHERE id = ?1",
                    params![
                        id,
                        obs.interface,
                        last,
                        obs.packets as i64,
                        obs.distinct_destinations,
                        blocked_until,
                        obs.seen == Seen::Flag
                    ],
                )?;
                Ok(id)
            }
            None => self.insert(obs),
        }
    }

    fn insert(&self, obs: &Observation) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO incidents (source, rule, direction, interface, classification, first_seen, last_seen,
                     packets, distinct_destinations, blocked_until, recovered)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                obs.source.to_string(),
                obs.rule,
                obs.direction,
                obs.interface,
                obs.classification.label(),
                unix_secs(obs.first_seen),
                unix_secs(obs.last_seen),
                obs.packets as i64,
                obs.distinct_destinations,
                obs.blocked_until.map(unix_secs),
                obs.seen == Seen::Recovered
            ],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Records each observation that has no open incident as a new one,
    /// in one transaction; returns how many it recorded.
    pub fn record_new(&self, observations: &[Observation], reopen_after: std::time::Duration) -> Result<usize> {
        let tx = self.conn.unchecked_transaction()?;
        let mut recorded = 0;
        for obs in observations {
            if self.open_incident(obs, reopen_after)?.is_none() {
                self.insert(obs)?;
                recorded += 1;
            }
        }
        tx.commit()?;
        Ok(recorded)
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

    /// Incidents last seen at or after `cutoff` (every one without it),
    /// newest first.
    pub fn seen_since(&self, cutoff: Option<SystemTime>) -> Result<Vec<Incident>> {
        let from = cutoff.map_or(i64::MIN, unix_secs);
        self.query("WHERE last_seen >= ?1 ORDER BY last_seen DESC, id DESC", params![from])
    }

    fn query(&self, tail: &str, args: impl rusqlite::Params) -> Result<Vec<Incident>> {
        // A database no `run` of this version has opened yet (read-only
        // here) may lack the column.
        let recovered = if has_column(&self.conn, "recovered")? {
            "recovered"
        } else {
            "0"
        };
        let mut stmt = self.conn.prepare(&format!(
            "SELECT id, source, rule, direction, interface, classification, first_seen, last_seen, packets,
             distinct_destinations, blocked_until, {recovered} FROM incidents {tail}"
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
                recovered: row.get::<_, i64>(11)? != 0,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn has_column(conn: &Connection, column: &str) -> Result<bool> {
    let mut stmt = conn.prepare("SELECT 1 FROM pragma_table_info('incidents') WHERE name = ?1")?;
    Ok(stmt.exists(params![column])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observation(seen: Seen, packets: u64) -> Observation {
        let now = SystemTime::now();
        Observation {
            seen,
            source: "198.18.0.66".parse().unwrap(),
            rule: "udp/137".into(),
            direction: "inbound".into(),
            interface: "eth0".into(),
            classification: Classification::Scan,
            first_seen: now,
            last_seen: now,
            packets,
            distinct_destinations: 20,
            blocked_until: None,
        }
    }

    /// `incidents --since`: only incidents last seen within the window,
    /// newest first; without a window, all of them.
    #[test]
    fn incidents_seen_since_a_cutoff_newest_first() {
        let dir = std::env::temp_dir().join(format!("netwatch-incidents-since-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        let hour = std::time::Duration::from_secs(3600);
        let now = SystemTime::now();
        let mut ids = Vec::new();
        for (source, age) in [
            ("198.18.0.1", 3 * hour),
            ("198.18.0.2", hour / 2),
            ("198.18.0.3", hour * 25),
        ] {
            let mut obs = observation(Seen::Flag, 30);
            obs.source = source.parse().unwrap();
            obs.first_seen = now - age;
            obs.last_seen = now - age;
            ids.push(store.record(&obs, hour).unwrap());
        }
        let sources = |v: Vec<Incident>| v.iter().map(|i| i.source.to_string()).collect::<Vec<_>>();
        assert_eq!(sources(store.seen_since(Some(now - hour)).unwrap()), ["198.18.0.2"]);
        assert_eq!(
            sources(store.seen_since(Some(now - 4 * hour)).unwrap()),
            ["198.18.0.2", "198.18.0.1"]
        );
        assert_eq!(
            sources(store.seen_since(None).unwrap()),
            ["198.18.0.2", "198.18.0.1", "198.18.0.3"]
        );
        assert!(store.seen_since(Some(now + hour)).unwrap().is_empty());
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A database made before the `recovered` column existed opens, read
    /// only and for writing, with its incidents intact and not recovered.
    #[test]
    fn a_database_without_the_recovered_column_opens() {
        let dir = std::env::temp_dir().join(format!("netwatch-incidents-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(DB_FILE);
        let _ = std::fs::remove_file(&path);
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE incidents (
                    id INTEGER PRIMARY KEY, source TEXT NOT NULL, rule TEXT NOT NULL, direction TEXT NOT NULL,
                    interface TEXT NOT NULL, classification TEXT NOT NULL, first_seen INTEGER NOT NULL,
                    last_seen INTEGER NOT NULL, packets INTEGER NOT NULL, distinct_destinations INTEGER NOT NULL,
                    blocked_until INTEGER
                );
                INSERT INTO incidents VALUES (1, '198.18.0.66', 'udp/137', 'inbound', 'eth0', 'scan', 1, 2, 30, 20, NULL);",
            )
            .unwrap();
        let source = "198.18.0.66".parse().unwrap();
        let old = Store::open_read_only(&dir).unwrap().unwrap().by_source(source).unwrap();
        assert_eq!((old.len(), old[0].packets, old[0].recovered), (1, 30, false));

        let store = Store::open(&dir).unwrap();
        assert!(!store.by_source(source).unwrap()[0].recovered);
        // A recovered incident, then its flag event after all.
        let hour = std::time::Duration::from_secs(3600);
        assert_eq!(store.record_new(&[observation(Seen::Recovered, 40)], hour).unwrap(), 1);
        assert_eq!(store.record_new(&[observation(Seen::Recovered, 50)], hour).unwrap(), 0);
        let newest = &store.by_source(source).unwrap()[0];
        assert_eq!((newest.packets, newest.recovered), (40, true));
        store.record(&observation(Seen::Refresh, 45), hour).unwrap();
        assert!(
            store.by_source(source).unwrap()[0].recovered,
            "a refresh is no flag event"
        );
        store.record(&observation(Seen::Flag, 46), hour).unwrap();
        let newest = &store.by_source(source).unwrap()[0];
        assert_eq!((newest.packets, newest.recovered), (46, false));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
