//! The incident record: every flag the datapath raises becomes (or
//! updates) a row in an embedded SQLite database under the state
//! directory, so incidents survive restarts and can be looked up by IP.

use std::{collections::HashMap, net::IpAddr, path::Path, time::SystemTime};

use anyhow::{Context as _, Result};
use rusqlite::{Connection, OpenFlags, OptionalExtension as _, params};
use serde::Serialize;

use crate::clock::{from_unix, rfc3339, unix_secs};

pub const DB_FILE: &str = "incidents.sqlite";

/// What kind of traffic an incident is about: the classification of the
/// kernel's per-source record it comes from.
pub use netwatch_common::Classification;

/// Why a source was flagged: it reached its rule's count of distinct
/// destinations within the window, or its first contacts failed (went
/// unanswered) that many more often than they were answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    #[default]
    DistinctDestinations,
    FailedContacts,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::DistinctDestinations => "distinct-destinations",
            Reason::FailedContacts => "failed-contacts",
        }
    }

    fn from_label(label: &str) -> Reason {
        match label {
            "failed-contacts" => Reason::FailedContacts,
            _ => Reason::DistinctDestinations,
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
    /// Why the source was flagged first (a later flag of the other kind
    /// updates the incident but not its reason).
    pub reason: Reason,
    /// First contacts that went unanswered when it was flagged for them
    /// (0 for a flag on distinct destinations).
    pub failed_contacts: u32,
    /// A summary incident (a flood of new sources, see
    /// [`AGGREGATE_AFTER`]): how many sources it counts; its `source` is
    /// then the unspecified address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary_sources: Option<u64>,
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
///
/// Its times are taken once, when the controller reads the event or the
/// kernel record (see [`Stamp`]): the wall clock then, minus how long ago
/// the kernel saw the source. They are never recomputed later with another
/// offset between the kernel's clock and the wall clock.
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
    pub reason: Reason,
    pub failed_contacts: u32,
    /// When the controller made the observation.
    pub at: Stamp,
}

/// The moment an observation was made, on both clocks: the wall clock
/// (what people read; it may step, e.g. when NTP first syncs a router
/// without a real-time clock) and CLOCK_BOOTTIME (which never steps and
/// keeps counting through a suspend), with the boot it belongs to.
#[derive(Clone, Debug, PartialEq)]
pub struct Stamp {
    pub wall: SystemTime,
    pub boot: std::time::Duration,
    pub boot_id: String,
}

impl Stamp {
    pub fn now(clock: &dyn Clock) -> Self {
        Stamp {
            wall: clock.wall(),
            boot: clock.boot(),
            boot_id: clock.boot_id(),
        }
    }
}

/// New incidents per rule and direction in one minute past which further
/// sources are counted into one summary incident (see [`Store::record`]).
///
/// A real scanner opens one incident per rule and direction and keeps it
/// open for an hour; even a LAN full of infected machines opens a few a
/// minute. Hundreds of new sources a minute on one rule are spoofed (or a
/// botnet, where the individual addresses do not matter either): past
/// this, one row per rule, direction and minute carries their count, so
/// a flood at the datapath's whole per-CPU flag budget adds at most
/// `AGGREGATE_AFTER + 1` rows a minute per rule and direction instead of
/// one per packet's source.
pub const AGGREGATE_AFTER: u32 = 60;

/// How long incidents are kept (last seen this long ago, they are
/// deleted) unless `incident_retention_days` says otherwise.
pub const DEFAULT_RETENTION_DAYS: u32 = 90;

/// The schema version this code writes (`PRAGMA user_version`); see
/// [`MIGRATIONS`].
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Migration `i` takes a database from version `i` to `i + 1`, each in a
/// transaction with the version bump. Version 0 is every database made
/// before versions existed (with or without the `recovered` column).
const MIGRATIONS: &[fn(&Connection) -> rusqlite::Result<()>] = &[migrate_v0_to_v1, migrate_v1_to_v2, migrate_v2_to_v3];

/// Why a source was flagged, and its failed first contacts.
fn migrate_v1_to_v2(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "ALTER TABLE incidents ADD COLUMN reason TEXT NOT NULL DEFAULT 'distinct-destinations';
         ALTER TABLE incidents ADD COLUMN failed_contacts INTEGER NOT NULL DEFAULT 0;",
    )
}

/// The fleet's outbox: incidents opened or changed since they were last
/// delivered to the fleet, in the order they changed. Filled (by triggers,
/// see [`Store::enable_outbox`]) only while a fleet is configured.
fn migrate_v2_to_v3(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            incident INTEGER NOT NULL UNIQUE
        );",
    )
}

fn migrate_v0_to_v1(conn: &Connection) -> rusqlite::Result<()> {
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
        );",
    )?;
    let has = |column: &str| -> rusqlite::Result<bool> {
        conn.prepare("SELECT 1 FROM pragma_table_info('incidents') WHERE name = ?1")?
            .exists(params![column])
    };
    if !has("recovered")? {
        conn.execute_batch("ALTER TABLE incidents ADD COLUMN recovered INTEGER NOT NULL DEFAULT 0;")?;
    }
    conn.execute_batch(
        // The boot and boot-time second of the last sighting: open
        // incidents are matched on them, so a step of the wall clock
        // neither duplicates nor closes one. NULL in rows from before.
        "ALTER TABLE incidents ADD COLUMN boot_id TEXT;
         ALTER TABLE incidents ADD COLUMN last_seen_boot INTEGER;
         -- Summary incidents: how many sources (0 for one source's own).
         ALTER TABLE incidents ADD COLUMN sources INTEGER NOT NULL DEFAULT 0;
         -- lookup and /api/lookup (by source); incidents, /api/incidents,
         -- retention and the open-incident search (by last_seen).
         DROP INDEX IF EXISTS incidents_by_source;
         CREATE INDEX incidents_by_source ON incidents (source, rule, direction, classification, last_seen);
         CREATE INDEX incidents_by_last_seen ON incidents (last_seen);",
    )
}

/// Where the store's times come from: the real clocks, or a test's.
pub trait Clock: Send {
    fn wall(&self) -> SystemTime;
    /// CLOCK_BOOTTIME.
    fn boot(&self) -> std::time::Duration;
    fn boot_id(&self) -> String;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
    fn boot(&self) -> std::time::Duration {
        crate::clock::boottime()
    }
    fn boot_id(&self) -> String {
        crate::clock::boot_id()
    }
}

/// Counts of new incidents per rule and direction in the current minute
/// (of boot time), and the summary incident of that minute.
#[derive(Default)]
struct Window {
    minute: u64,
    opened: u32,
    summary: Option<i64>,
}

pub struct Store {
    conn: Connection,
    windows: HashMap<(String, String), Window>,
    summary_after: u32,
}

impl Store {
    /// Opens (creating if needed) the database for writing, in WAL mode
    /// so readers (`lookup`, the HTTP API) never block the controller, and
    /// migrates it to [`SCHEMA_VERSION`].
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
        migrate(&conn).with_context(|| format!("migrating the incident database {}", path.display()))?;
        Ok(Store {
            conn,
            windows: HashMap::new(),
            summary_after: AGGREGATE_AFTER,
        })
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
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .with_context(|| format!("reading incidents from {}", path.display()))?;
        if version > SCHEMA_VERSION {
            anyhow::bail!(
                "incident database {} has schema version {version}, newer than this netwatch knows ({SCHEMA_VERSION})",
                path.display()
            );
        }
        Ok(Some(Store {
            conn,
            windows: HashMap::new(),
            summary_after: AGGREGATE_AFTER,
        }))
    }

    /// New incidents per rule and direction in a minute before further
    /// sources are summarised (`incidents_per_minute`).
    pub fn set_summary_after(&mut self, n: u32) {
        self.summary_after = n;
    }

    /// From now on, every incident this connection opens, or changes (its
    /// packets, last sighting, destinations, block, sources or recovered
    /// mark), is queued in the outbox, in the same transaction as the
    /// change itself: nothing recorded is missed, and an incident changed
    /// again before delivery is delivered once, in its newest state. The
    /// triggers are TEMP (this connection's only): without a fleet nothing
    /// is queued.
    pub fn enable_outbox(&self) -> Result<()> {
        self.conn.execute_batch(
            "CREATE TEMP TRIGGER IF NOT EXISTS outbox_opened AFTER INSERT ON main.incidents BEGIN
                 INSERT OR REPLACE INTO outbox (incident) VALUES (NEW.id);
             END;
             CREATE TEMP TRIGGER IF NOT EXISTS outbox_changed AFTER UPDATE ON main.incidents
             WHEN OLD.packets IS NOT NEW.packets OR OLD.last_seen IS NOT NEW.last_seen
               OR OLD.distinct_destinations IS NOT NEW.distinct_destinations
               OR OLD.blocked_until IS NOT NEW.blocked_until OR OLD.sources IS NOT NEW.sources
               OR OLD.recovered IS NOT NEW.recovered OR OLD.reason IS NOT NEW.reason
               OR OLD.failed_contacts IS NOT NEW.failed_contacts BEGIN
                 INSERT OR REPLACE INTO outbox (incident) VALUES (NEW.id);
             END;",
        )?;
        Ok(())
    }

    /// The oldest `limit` outbox entries: their sequence number (a fresh
    /// one every time the incident is queued again) and the incident as it
    /// is now (`None` once retention deleted it).
    pub fn outbox(&self, limit: usize) -> Result<Vec<(i64, i64, Option<Incident>)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT seq, incident FROM outbox ORDER BY seq LIMIT ?1")?;
        let queued: Vec<(i64, i64)> = stmt
            .query_map(params![limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        // The incidents of the whole batch in one query.
        let mut incidents: HashMap<i64, Incident> = self
            .query(
                "WHERE id IN (SELECT incident FROM outbox ORDER BY seq LIMIT ?1)",
                params![limit as i64],
            )?
            .into_iter()
            .map(|i| (i.id, i))
            .collect();
        Ok(queued
            .into_iter()
            .map(|(seq, id)| (seq, id, incidents.remove(&id)))
            .collect())
    }

    /// Removes delivered outbox entries: an entry queued again since (a
    /// newer sequence number) stays.
    pub fn outbox_delivered(&mut self, seqs: &[i64]) -> Result<()> {
        self.batch(|store| {
            let mut stmt = store.conn.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?;
            for seq in seqs {
                stmt.execute(params![seq])?;
            }
            Ok(())
        })
    }

    /// Entries in the outbox.
    pub fn outbox_depth(&self) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// The schema version of the database (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// The open incident of the observation's source, rule, direction and
    /// classification: one whose last sighting is within `reopen_after` of
    /// this one — on the boot-time clock when it was seen in this boot (a
    /// step of the wall clock changes nothing), else on the wall clock.
    pub fn open_incident(&self, obs: &Observation, reopen_after: std::time::Duration) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id FROM incidents
                 WHERE source = ?1 AND rule = ?2 AND direction = ?3 AND classification = ?4
                   AND (CASE WHEN boot_id = ?7 THEN last_seen_boot >= ?6 ELSE last_seen >= ?5 END)
                 ORDER BY id DESC LIMIT 1",
                params![
                    obs.source.to_string(),
                    obs.rule,
                    obs.direction,
                    obs.classification.label(),
                    unix_secs(obs.last_seen) - reopen_after.as_secs() as i64,
                    obs.at.boot.as_secs() as i64 - reopen_after.as_secs() as i64,
                    obs.at.boot_id,
                ],
                |row| row.get(0),
            )
            .optional()?)
    }

    /// Records an observation: updates the open incident (see
    /// [`Store::open_incident`]), or opens a new one. A flag event marks
    /// the incident as not recovered. `first_seen` is written once, when
    /// the incident opens. Past [`AGGREGATE_AFTER`] new incidents in a
    /// minute for the rule and direction, a new source is counted into
    /// the minute's summary incident instead (whose id is returned).
    pub fn record(&mut self, obs: &Observation, reopen_after: std::time::Duration) -> Result<Recorded> {
        match self.open_incident(obs, reopen_after)? {
            Some(id) => {
                self.conn.execute(
                    "UPDATE incidents SET interface = ?2, last_seen = MAX(last_seen, ?3), packets = MAX(packets, ?4),
                     distinct_destinations = MAX(distinct_destinations, ?5),
                     blocked_until = COALESCE(?6, blocked_until),
                     recovered = CASE WHEN ?7 THEN 0 ELSE recovered END,
                     boot_id = ?8, last_seen_boot = MAX(COALESCE(last_seen_boot, 0), ?9),
                     failed_contacts = MAX(failed_contacts, ?10) WHERE id = ?1",
                    params![
                        id,
                        obs.interface,
                        unix_secs(obs.last_seen),
                        obs.packets as i64,
                        obs.distinct_destinations,
                        obs.blocked_until.map(unix_secs),
                        obs.seen == Seen::Flag,
                        obs.at.boot_id,
                        obs.at.boot.as_secs() as i64,
                        obs.failed_contacts,
                    ],
                )?;
                Ok(Recorded::Updated(id))
            }
            None => self.open_new(obs),
        }
    }

    fn open_new(&mut self, obs: &Observation) -> Result<Recorded> {
        let minute = obs.at.boot.as_secs() / 60;
        let window = self
            .windows
            .entry((obs.rule.clone(), obs.direction.clone()))
            .or_default();
        if window.minute != minute {
            *window = Window {
                minute,
                ..Window::default()
            };
        }
        if window.opened < self.summary_after {
            window.opened += 1;
            return Ok(Recorded::Opened(self.insert(obs, None)?));
        }
        let summary = window.summary;
        match summary {
            Some(id) => {
                self.conn.execute(
                    "UPDATE incidents SET sources = sources + 1, packets = packets + ?2,
                     distinct_destinations = MAX(distinct_destinations, ?3), last_seen = MAX(last_seen, ?4),
                     last_seen_boot = MAX(COALESCE(last_seen_boot, 0), ?5) WHERE id = ?1",
                    params![
                        id,
                        obs.packets as i64,
                        obs.distinct_destinations,
                        unix_secs(obs.last_seen),
                        obs.at.boot.as_secs() as i64
                    ],
                )?;
                Ok(Recorded::Summarised(id))
            }
            None => {
                let id = self.insert(obs, Some(1))?;
                if let Some(w) = self.windows.get_mut(&(obs.rule.clone(), obs.direction.clone())) {
                    w.summary = Some(id);
                }
                Ok(Recorded::Summarised(id))
            }
        }
    }

    /// `summary`: a summary incident's first count of sources (its source
    /// is then stored as `*`).
    fn insert(&self, obs: &Observation, summary: Option<u64>) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO incidents (source, rule, direction, interface, classification, first_seen, last_seen,
                     packets, distinct_destinations, blocked_until, recovered, boot_id, last_seen_boot, sources,
                     reason, failed_contacts)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            params![
                summary.map_or_else(|| obs.source.to_string(), |_| SUMMARY_SOURCE.to_string()),
                obs.rule,
                obs.direction,
                obs.interface,
                obs.classification.label(),
                unix_secs(obs.first_seen),
                unix_secs(obs.last_seen),
                obs.packets as i64,
                obs.distinct_destinations,
                obs.blocked_until.map(unix_secs),
                obs.seen == Seen::Recovered,
                obs.at.boot_id,
                obs.at.boot.as_secs() as i64,
                summary.unwrap_or(0) as i64,
                obs.reason.label(),
                obs.failed_contacts,
            ],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Records each observation that has no open incident as a new one
    /// (summarised past the flood threshold), in one transaction; returns
    /// how many it recorded.
    pub fn record_new(&mut self, observations: &[Observation], reopen_after: std::time::Duration) -> Result<usize> {
        self.batch(|store| {
            let mut recorded = 0;
            for obs in observations {
                if store.record_new_one(obs, reopen_after)?.is_some() {
                    recorded += 1;
                }
            }
            Ok(recorded)
        })
    }

    /// Records the observation as a new incident if it has none open.
    pub fn record_new_one(&mut self, obs: &Observation, reopen_after: std::time::Duration) -> Result<Option<Recorded>> {
        if self.open_incident(obs, reopen_after)?.is_some() {
            return Ok(None);
        }
        self.open_new(obs).map(Some)
    }

    /// Runs `f` in one transaction (a batch of writes: one commit, one
    /// fsync of the WAL, instead of one per observation).
    pub fn batch<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = f(self).and_then(|v| {
            self.conn.execute_batch("COMMIT")?;
            Ok(v)
        });
        // A failed write or commit (a full disk) must not leave the
        // transaction open for the next batch (SQLite may have rolled it
        // back already: then this is a no-op error).
        if result.is_err() && !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        result
    }

    /// Deletes incidents last seen before `cutoff`, in chunks (so readers
    /// are never held up long); returns how many.
    pub fn prune(&self, cutoff: SystemTime) -> Result<usize> {
        let mut deleted = 0;
        loop {
            let n = self.conn.execute(
                "DELETE FROM incidents WHERE id IN (SELECT id FROM incidents WHERE last_seen < ?1 LIMIT 10000)",
                params![unix_secs(cutoff)],
            )?;
            deleted += n;
            if n < 10000 {
                return Ok(deleted);
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

    /// Incidents last seen at or after `cutoff` (every one without it),
    /// newest first.
    pub fn seen_since(&self, cutoff: Option<SystemTime>) -> Result<Vec<Incident>> {
        let from = cutoff.map_or(i64::MIN, unix_secs);
        self.query("WHERE last_seen >= ?1 ORDER BY last_seen DESC, id DESC", params![from])
    }

    /// Rows in the database.
    pub fn count(&self) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM incidents", [], |r| r.get::<_, i64>(0))? as u64)
    }

    fn query(&self, tail: &str, args: impl rusqlite::Params) -> Result<Vec<Incident>> {
        // A database no `run` of this version has opened yet (read-only
        // here) may lack columns.
        let recovered = if has_column(&self.conn, "recovered")? {
            "recovered"
        } else {
            "0"
        };
        let sources = if has_column(&self.conn, "sources")? {
            "sources"
        } else {
            "0"
        };
        let (reason, failed_contacts) = if has_column(&self.conn, "reason")? {
            ("reason", "failed_contacts")
        } else {
            ("''", "0")
        };
        let mut stmt = self.conn.prepare(&format!(
            "SELECT id, source, rule, direction, interface, classification, first_seen, last_seen, packets,
             distinct_destinations, blocked_until, {recovered}, {sources}, {reason}, {failed_contacts}
             FROM incidents {tail}"
        ))?;
        let now = SystemTime::now();
        let rows = stmt.query_map(args, |row| {
            let source: String = row.get(1)?;
            let classification: String = row.get(5)?;
            let blocked_until: Option<i64> = row.get(10)?;
            let blocked_until = blocked_until.map(from_unix);
            let summary: i64 = row.get(12)?;
            Ok(Incident {
                id: row.get(0)?,
                source: source.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
                rule: row.get(2)?,
                direction: row.get(3)?,
                interface: row.get(4)?,
                classification: Classification::from_label(&classification).unwrap_or_default(),
                first_seen: from_unix(row.get(6)?),
                last_seen: from_unix(row.get(7)?),
                packets: row.get::<_, i64>(8)? as u64,
                distinct_destinations: row.get(9)?,
                blocked: blocked_until.is_some_and(|t| t > now),
                blocked_until,
                recovered: row.get::<_, i64>(11)? != 0,
                reason: Reason::from_label(&row.get::<_, String>(13)?),
                failed_contacts: row.get(14)?,
                summary_sources: (summary > 0).then_some(summary as u64),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// The source column of a summary incident.
pub const SUMMARY_SOURCE: &str = "*";

/// What [`Store::record`] did with an observation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Updated this open incident.
    Updated(i64),
    /// Opened this incident.
    Opened(i64),
    /// Counted the source into this summary incident (a flood).
    Summarised(i64),
}

impl Recorded {
    pub fn id(self) -> i64 {
        match self {
            Recorded::Updated(id) | Recorded::Opened(id) | Recorded::Summarised(id) => id,
        }
    }
}

/// Brings a database to [`SCHEMA_VERSION`], one migration per transaction.
fn migrate(conn: &Connection) -> Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        anyhow::bail!(
            "schema version {version} is newer than this netwatch knows ({SCHEMA_VERSION}); a newer netwatch made it"
        );
    }
    for (from, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.unchecked_transaction()?;
        step(conn).with_context(|| format!("migration from schema version {from} to {}", from + 1))?;
        conn.pragma_update(None, "user_version", from as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

fn has_column(conn: &Connection, column: &str) -> Result<bool> {
    let mut stmt = conn.prepare("SELECT 1 FROM pragma_table_info('incidents') WHERE name = ?1")?;
    Ok(stmt.exists(params![column])?)
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use super::*;

    /// A clock a test steps by hand (the store, its SQLite file and its
    /// SQL are real).
    #[derive(Clone)]
    struct FakeClock(Arc<Mutex<(SystemTime, Duration)>>);

    impl FakeClock {
        fn new(wall: SystemTime, boot: Duration) -> Self {
            FakeClock(Arc::new(Mutex::new((wall, boot))))
        }
        /// Time passes on both clocks.
        fn advance(&self, d: Duration) {
            let mut t = self.0.lock().unwrap();
            t.0 += d;
            t.1 += d;
        }
        /// The wall clock steps (NTP's first sync); boot time does not.
        fn step_wall(&self, to: SystemTime) {
            self.0.lock().unwrap().0 = to;
        }
    }

    impl Clock for FakeClock {
        fn wall(&self) -> SystemTime {
            self.0.lock().unwrap().0
        }
        fn boot(&self) -> Duration {
            self.0.lock().unwrap().1
        }
        fn boot_id(&self) -> String {
            "fake-boot".into()
        }
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("netwatch-incidents-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn observation(seen: Seen, packets: u64) -> Observation {
        observation_at(seen, packets, &SystemClock)
    }

    /// What the detector makes of a kernel record that saw the source
    /// until now: the wall time taken once, from `clock`.
    fn observation_at(seen: Seen, packets: u64, clock: &dyn Clock) -> Observation {
        let at = Stamp::now(clock);
        Observation {
            seen,
            source: "198.18.0.66".parse().unwrap(),
            rule: "udp/137".into(),
            direction: "inbound".into(),
            interface: "eth0".into(),
            classification: Classification::Scan,
            first_seen: at.wall,
            last_seen: at.wall,
            packets,
            distinct_destinations: 20,
            blocked_until: None,
            reason: Reason::DistinctDestinations,
            failed_contacts: 0,
            at,
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// `incidents --since`: only incidents last seen within the window,
    /// newest first; without a window, all of them.
    #[test]
    fn incidents_seen_since_a_cutoff_newest_first() {
        let dir = temp_dir("since");
        let mut store = Store::open(&dir).unwrap();
        let now = SystemTime::now();
        for (source, age) in [
            ("198.18.0.1", 3 * HOUR),
            ("198.18.0.2", HOUR / 2),
            ("198.18.0.3", HOUR * 25),
        ] {
            let mut obs = observation(Seen::Flag, 30);
            obs.source = source.parse().unwrap();
            obs.first_seen = now - age;
            obs.last_seen = now - age;
            store.record(&obs, HOUR).unwrap();
        }
        let sources = |v: Vec<Incident>| v.iter().map(|i| i.source.to_string()).collect::<Vec<_>>();
        assert_eq!(sources(store.seen_since(Some(now - HOUR)).unwrap()), ["198.18.0.2"]);
        assert_eq!(
            sources(store.seen_since(Some(now - 4 * HOUR)).unwrap()),
            ["198.18.0.2", "198.18.0.1"]
        );
        assert_eq!(
            sources(store.seen_since(None).unwrap()),
            ["198.18.0.2", "198.18.0.1", "198.18.0.3"]
        );
        assert!(store.seen_since(Some(now + HOUR)).unwrap().is_empty());
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The schema of every database made before schema versions (v0), as
    /// the old code created it, with the old code's index.
    const V0_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS incidents (
            id INTEGER PRIMARY KEY, source TEXT NOT NULL, rule TEXT NOT NULL, direction TEXT NOT NULL,
            interface TEXT NOT NULL, classification TEXT NOT NULL, first_seen INTEGER NOT NULL,
            last_seen INTEGER NOT NULL, packets INTEGER NOT NULL, distinct_destinations INTEGER NOT NULL,
            blocked_until INTEGER
        );
        CREATE INDEX IF NOT EXISTS incidents_by_source ON incidents (source, last_seen);";

    /// A database made before the `recovered` column existed opens, read
    /// only and for writing, with its incidents intact and not recovered.
    #[test]
    fn a_database_without_the_recovered_column_opens() {
        let dir = temp_dir("v0-norecovered");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(DB_FILE);
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(V0_SCHEMA).unwrap();
        conn.execute_batch(
            "INSERT INTO incidents VALUES (1, '198.18.0.66', 'udp/137', 'inbound', 'eth0', 'scan', 1, 2, 30, 20, NULL);",
        )
        .unwrap();
        drop(conn);
        let source = "198.18.0.66".parse().unwrap();
        let old = Store::open_read_only(&dir).unwrap().unwrap().by_source(source).unwrap();
        assert_eq!((old.len(), old[0].packets, old[0].recovered), (1, 30, false));

        let mut store = Store::open(&dir).unwrap();
        assert!(!store.by_source(source).unwrap()[0].recovered);
        // A recovered incident, then its flag event after all.
        assert_eq!(store.record_new(&[observation(Seen::Recovered, 40)], HOUR).unwrap(), 1);
        assert_eq!(store.record_new(&[observation(Seen::Recovered, 50)], HOUR).unwrap(), 0);
        let newest = &store.by_source(source).unwrap()[0];
        assert_eq!((newest.packets, newest.recovered), (40, true));
        store.record(&observation(Seen::Refresh, 45), HOUR).unwrap();
        assert!(
            store.by_source(source).unwrap()[0].recovered,
            "a refresh is no flag event"
        );
        store.record(&observation(Seen::Flag, 46), HOUR).unwrap();
        let newest = &store.by_source(source).unwrap()[0];
        assert_eq!((newest.packets, newest.recovered), (46, false));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A v0 database (the old code's SQL, with the `recovered` column the
    /// old code added, and user_version 0) is migrated when opened for
    /// writing: its rows kept, the version bumped, the indexes for the
    /// API's queries made; reopening migrates nothing again.
    #[test]
    fn a_v0_database_is_migrated() {
        let dir = temp_dir("v0-migrate");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(DB_FILE);
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(V0_SCHEMA).unwrap();
        conn.execute_batch("ALTER TABLE incidents ADD COLUMN recovered INTEGER NOT NULL DEFAULT 0;")
            .unwrap();
        let now = unix_secs(SystemTime::now());
        conn.execute(
            "INSERT INTO incidents VALUES (7, '198.18.0.66', 'udp/137', 'inbound', 'eth0', 'scan', ?1, ?1, 30, 20, NULL, 1)",
            params![now - 60],
        )
        .unwrap();
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, 0);
        drop(conn);

        let mut store = Store::open(&dir).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        let plan = |sql: &str| -> String {
            store
                .conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map([], |r| r.get::<_, String>(3))
                .unwrap()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
                .join("; ")
        };
        let recent = plan("SELECT * FROM incidents ORDER BY last_seen DESC LIMIT 10");
        assert!(recent.contains("incidents_by_last_seen"), "{recent}");
        let by_source = plan("SELECT * FROM incidents WHERE source = '198.18.0.66' ORDER BY last_seen DESC");
        assert!(by_source.contains("incidents_by_source"), "{by_source}");
        let source = "198.18.0.66".parse().unwrap();
        let old = store.by_source(source).unwrap();
        assert_eq!((old[0].id, old[0].packets, old[0].recovered), (7, 30, true));
        // A flag for the old row's source updates it: its row matches on
        // the wall clock (it has no boot-time stamp).
        assert_eq!(
            store.record(&observation(Seen::Flag, 31), HOUR).unwrap(),
            Recorded::Updated(7)
        );
        drop(store);
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(store.by_source(source).unwrap().len(), 1);
        drop(store);
        // A database from a newer netwatch is refused, naming the versions.
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let err = format!("{:#}", Store::open(&dir).err().expect("a newer schema"));
        assert!(
            err.contains("newer") && err.contains(&path.display().to_string()),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// On a router without a real-time clock the wall clock starts in 1970
    /// and steps when NTP syncs: an incident opened before the step is
    /// updated after it (not duplicated), its first_seen never rewritten.
    #[test]
    fn a_wall_clock_step_neither_duplicates_an_incident_nor_rewrites_first_seen() {
        let dir = temp_dir("clock-step");
        let mut store = Store::open(&dir).unwrap();
        let clock = FakeClock::new(
            SystemTime::UNIX_EPOCH + Duration::from_secs(95),
            Duration::from_secs(95),
        );
        let first = observation_at(Seen::Flag, 30, &clock);
        let id = store.record(&first, HOUR).unwrap().id();
        clock.advance(Duration::from_secs(60));
        // NTP: it is really 2026.
        let ntp = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        clock.step_wall(ntp);
        clock.advance(Duration::from_secs(5));
        let mut later = observation_at(Seen::Refresh, 80, &clock);
        // The kernel record's first sighting, converted anew after the
        // step, would say 2026: the stored one stays.
        later.first_seen = ntp;
        assert_eq!(store.record(&later, HOUR).unwrap(), Recorded::Updated(id));
        let incidents = store.by_source(first.source).unwrap();
        assert_eq!(incidents.len(), 1, "the incident was duplicated by the clock step");
        assert_eq!(incidents[0].first_seen, from_unix(95), "first_seen was rewritten");
        assert_eq!(incidents[0].last_seen, from_unix(unix_secs(ntp) + 5));
        assert_eq!(incidents[0].packets, 80);
        // An hour of boot time later (however the wall clock moved), a new
        // flag opens a new incident.
        clock.advance(HOUR + Duration::from_secs(1));
        clock.step_wall(SystemTime::UNIX_EPOCH + Duration::from_secs(200));
        let next = store.record(&observation_at(Seen::Flag, 5, &clock), HOUR).unwrap();
        assert!(matches!(next, Recorded::Opened(n) if n != id), "{next:?}");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A flood of spoofed sources: the first AGGREGATE_AFTER of a minute
    /// (per rule and direction) get their own incidents, the rest one
    /// summary incident per minute carrying their count; another rule or
    /// direction has its own budget; the next minute starts afresh.
    #[test]
    fn a_flood_of_new_sources_is_summarised() {
        let dir = temp_dir("flood");
        let mut store = Store::open(&dir).unwrap();
        let clock = FakeClock::new(SystemTime::now(), Duration::from_secs(6000));
        let flood = 1000u32;
        let spoofed = |i: u32, clock: &FakeClock| {
            let mut obs = observation_at(Seen::Flag, 3, clock);
            obs.source = IpAddr::from(std::net::Ipv4Addr::from(0xc612_0000 + i));
            obs
        };
        let mut summaries = std::collections::HashSet::new();
        store
            .batch(|store| {
                for i in 0..flood {
                    if let Recorded::Summarised(id) = store.record(&spoofed(i, &clock), HOUR)? {
                        summaries.insert(id);
                    }
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(summaries.len(), 1);
        assert_eq!(store.count().unwrap(), AGGREGATE_AFTER as u64 + 1);
        let summary = &store
            .recent(1000)
            .unwrap()
            .into_iter()
            .find(|i| i.summary_sources.is_some())
            .unwrap();
        assert_eq!(summary.summary_sources, Some((flood - AGGREGATE_AFTER) as u64));
        assert_eq!(summary.packets, 3 * (flood - AGGREGATE_AFTER) as u64);
        // The same minute, outbound: its own budget.
        let mut out = spoofed(5000, &clock);
        out.direction = "outbound".into();
        assert!(matches!(store.record(&out, HOUR).unwrap(), Recorded::Opened(_)));
        // A source with an incident of its own is still updated.
        assert!(matches!(
            store.record(&spoofed(1, &clock), HOUR).unwrap(),
            Recorded::Updated(_)
        ));
        // The next minute: new incidents again.
        clock.advance(Duration::from_secs(60));
        assert!(matches!(
            store.record(&spoofed(9999, &clock), HOUR).unwrap(),
            Recorded::Opened(_)
        ));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Retention: incidents last seen before the cutoff are deleted, the
    /// others kept.
    #[test]
    fn retention_deletes_incidents_last_seen_before_the_cutoff() {
        let dir = temp_dir("retention");
        let mut store = Store::open(&dir).unwrap();
        let now = SystemTime::now();
        let day = Duration::from_secs(86400);
        for (i, age) in [100 * day, 91 * day, 89 * day, day].into_iter().enumerate() {
            let mut obs = observation(Seen::Flag, 1);
            obs.source = IpAddr::from([198, 18, 0, i as u8]);
            obs.first_seen = now - age;
            obs.last_seen = now - age;
            store.record(&obs, HOUR).unwrap();
        }
        assert_eq!(store.prune(now - 90 * day).unwrap(), 2);
        assert_eq!(store.count().unwrap(), 2);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The fleet's outbox: nothing queued without a fleet; with one, an
    /// incident opened or changed is queued once, in its newest state
    /// (a fresh sequence number), a refresh that changes nothing queues
    /// nothing, and delivering an older state leaves the newer entry.
    #[test]
    fn the_outbox_queues_each_changed_incident_once() {
        let dir = temp_dir("outbox");
        let mut store = Store::open(&dir).unwrap();
        store.record(&observation(Seen::Flag, 30), HOUR).unwrap();
        assert_eq!(store.outbox_depth().unwrap(), 0, "queued without a fleet");
        store.enable_outbox().unwrap();
        let mut other = observation(Seen::Flag, 5);
        other.source = "198.18.0.77".parse().unwrap();
        let id = store.record(&other, HOUR).unwrap().id();
        let queued = store.outbox(10).unwrap();
        assert_eq!(queued.len(), 1);
        let (first_seq, queued_id, incident) = &queued[0];
        assert_eq!((*queued_id, incident.as_ref().unwrap().packets), (id, 5));
        // A refresh with the same figures: nothing new.
        let mut same = other.clone();
        same.seen = Seen::Refresh;
        store.record(&same, HOUR).unwrap();
        assert_eq!(store.outbox(10).unwrap()[0].0, *first_seq);
        // More packets: queued again under a new number, still once.
        let mut more = other.clone();
        more.packets = 9;
        store.record(&more, HOUR).unwrap();
        let queued = store.outbox(10).unwrap();
        assert_eq!(queued.len(), 1);
        assert!(queued[0].0 > *first_seq);
        assert_eq!(queued[0].2.as_ref().unwrap().packets, 9);
        // The older state's delivery leaves the newer one queued.
        store.outbox_delivered(&[*first_seq]).unwrap();
        assert_eq!(store.outbox_depth().unwrap(), 1);
        store.outbox_delivered(&[queued[0].0]).unwrap();
        assert_eq!(store.outbox_depth().unwrap(), 0);
        // The queue survives a restart; the triggers are the connection's.
        store.record(&observation(Seen::Flag, 99), HOUR).unwrap();
        assert_eq!(store.outbox_depth().unwrap(), 1);
        drop(store);
        let mut store = Store::open(&dir).unwrap();
        let queued = store.outbox(10).unwrap();
        assert_eq!(queued.len(), 1);
        // Without enable_outbox this connection queues nothing new (the
        // entry left is delivered with the incident as it is then).
        store.record(&observation(Seen::Flag, 120), HOUR).unwrap();
        assert_eq!(store.outbox(10).unwrap()[0].0, queued[0].0);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
