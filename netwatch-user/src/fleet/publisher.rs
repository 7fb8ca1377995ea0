//! The sensor's side: the outbox delivered to the incidents stream, in a
//! thread of its own (its own runtime and database connection), so
//! neither a slow server nor the disk holds up `run`'s loop.

use std::{
    path::Path,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, message::PublishMessage};
use log::{error, info, warn};
use serde::Serialize;
use tokio::sync::Notify;

use crate::{
    config::FleetConfig,
    datapath::PinnedMaps,
    detection::incidents::{Incident, Store},
    fleet::{
        decisions::{Applied, apply, confirm, keep_running},
        report::Reporter,
    },
    fleet::{incident_subject, incidents_stream},
};

/// Outbox entries published per round (then acknowledged together).
const BATCH: usize = 256;
/// The outbox is looked at this often even without a notification.
const IDLE: Duration = Duration::from_secs(1);
/// Wait after a failed round before the next.
const RETRY: Duration = Duration::from_secs(1);

/// What the metrics report about the fleet.
#[derive(Debug, Default)]
pub struct FleetStats {
    client: OnceLock<async_nats::Client>,
    outbox_depth: AtomicU64,
    published: AtomicU64,
    /// Decisions this sensor created (not those another sensor had
    /// created first).
    pub(crate) decisions_created: AtomicU64,
    /// Decisions applied to this sensor's kernel blocks.
    pub(crate) decisions_applied: AtomicU64,
}

impl FleetStats {
    pub fn connected(&self) -> bool {
        self.client
            .get()
            .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected)
    }

    /// Incidents waiting in the outbox, as of the last round.
    pub fn outbox_depth(&self) -> u64 {
        self.outbox_depth.load(Relaxed)
    }

    /// Outbox entries (incident states) the stream confirmed it holds,
    /// each counted once however often it was sent.
    pub fn published(&self) -> u64 {
        self.published.load(Relaxed)
    }

    pub fn decisions_created(&self) -> u64 {
        self.decisions_created.load(Relaxed)
    }

    pub fn decisions_applied(&self) -> u64 {
        self.decisions_applied.load(Relaxed)
    }
}

/// One incident as the fleet sees it: the sensor's incident with the
/// sensor's name and the outbox sequence number it was sent under.
#[derive(Serialize)]
pub struct FleetIncident<'a> {
    pub sensor: &'a str,
    pub revision: i64,
    #[serde(flatten)]
    pub incident: &'a Incident,
}

pub struct Publisher;

impl Publisher {
    /// Connects (in the background: an unreachable server is no error,
    /// a bad credentials file is) and starts the thread delivering the
    /// outbox of the database in `state_dir`; `notify` wakes it. The
    /// thread also confirms sources flagged by several sensors, and with
    /// `apply_to` (an enforce-mode sensor's maps) applies the fleet's
    /// decisions.
    pub fn start(
        fleet: &FleetConfig,
        state_dir: &Path,
        stats: Arc<FleetStats>,
        notify: Arc<Notify>,
        apply_to: Option<PinnedMaps>,
    ) -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let client = runtime.block_on(super::connect(
            &fleet.url,
            fleet.credentials.as_deref(),
            &format!("netwatch-{}", fleet.sensor),
            false,
        ))?;
        let _ = stats.client.set(client.clone());
        let store = Store::open(state_dir)?;
        let fleet = fleet.clone();
        std::thread::Builder::new()
            .name("fleet".into())
            .spawn(move || {
                let confirmation = &fleet.confirmation;
                let reporter = fleet.report.clone().map(|(command, to)| Reporter {
                    command,
                    to,
                    sensor: fleet.sensor.clone(),
                });
                runtime.block_on(async {
                    // Needs the runtime's context.
                    let js = jetstream::new(client.clone());
                    let confirming = keep_running("confirming sources", || {
                        confirm(&js, confirmation, fleet.replicas, &stats, reporter.as_ref())
                    });
                    let applying = async {
                        if let Some(maps) = &apply_to {
                            let applied = std::sync::Mutex::new(Applied::default());
                            keep_running("applying decisions", || {
                                apply(&js, confirmation, fleet.replicas, maps, &stats, &applied)
                            })
                            .await
                        }
                    };
                    tokio::join!(
                        deliver(client.clone(), fleet.clone(), store, stats.clone(), notify),
                        confirming,
                        applying
                    );
                })
            })
            .context("starting the fleet thread")?;
        Ok(())
    }
}

async fn deliver(
    client: async_nats::Client,
    fleet: FleetConfig,
    mut store: Store,
    stats: Arc<FleetStats>,
    notify: Arc<Notify>,
) {
    let js = jetstream::new(client);
    let mut stream_ready = false;
    // Logged once per outage, not once per round.
    let mut failing = false;
    loop {
        match store.outbox_depth() {
            Ok(n) => stats.outbox_depth.store(n, Relaxed),
            Err(err) => error!("fleet: reading the outbox: {err:#}"),
        }
        let round = async {
            // Published while disconnected, a message would wait in the
            // client's buffer and arrive after its acknowledgement timed
            // out: stored then, next to the newer state sent again.
            if js.client().connection_state() != async_nats::connection::State::Connected {
                if stats.outbox_depth() == 0 {
                    return Ok(0);
                }
                anyhow::bail!("not connected");
            }
            if !stream_ready {
                incidents_stream(&js, fleet.replicas).await?;
                stream_ready = true;
            }
            publish_round(&js, &fleet.sensor, &mut store, &stats).await
        };
        match round.await {
            Ok(0) => {
                if failing {
                    failing = false;
                    info!("fleet: the outbox is delivered to {}", fleet.url);
                }
                let _ = tokio::time::timeout(IDLE, notify.notified()).await;
            }
            Ok(_) => {}
            Err(err) => {
                // The stream may be gone (a new server): made again first.
                stream_ready = false;
                if !failing {
                    failing = true;
                    warn!(
                        "fleet: cannot deliver to {} ({err:#}); incidents wait in the outbox ({} now) and are delivered on reconnect",
                        fleet.url,
                        stats.outbox_depth()
                    );
                }
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// Publishes up to [`BATCH`] outbox entries, each under a message id of
/// its own (sensor, incident, outbox sequence), and removes those the
/// server acknowledged; returns how many entries it handled. An entry
/// whose acknowledgement did not come stays and is published again: the
/// server drops the copy within its duplicate window.
async fn publish_round(js: &jetstream::Context, sensor: &str, store: &mut Store, stats: &FleetStats) -> Result<usize> {
    let queued = store.outbox(BATCH)?;
    if queued.is_empty() {
        return Ok(0);
    }
    let mut delivered = Vec::new();
    let mut acks = Vec::new();
    let mut failed = None;
    for (seq, id, incident) in &queued {
        let Some(incident) = incident else {
            // Deleted by retention before it could be delivered.
            delivered.push(*seq);
            continue;
        };
        let payload = serde_json::to_vec(&FleetIncident {
            sensor,
            revision: *seq,
            incident,
        })?;
        let publish = PublishMessage::build()
            .payload(payload.into())
            .message_id(format!("{sensor}.{id}.{seq}"));
        match js
            .send_publish(incident_subject(sensor, incident.source, *id), publish)
            .await
        {
            Ok(ack) => acks.push((*seq, ack)),
            Err(err) => {
                failed = Some(anyhow::anyhow!("publishing: {err}"));
                break;
            }
        }
    }
    for (seq, ack) in acks {
        match ack.await {
            // A duplicate: an earlier copy whose acknowledgement was lost
            // (sent while the connection was down) is stored already.
            Ok(_) => {
                delivered.push(seq);
                stats.published.fetch_add(1, Relaxed);
            }
            Err(err) => {
                failed.get_or_insert_with(|| anyhow::anyhow!("waiting for the acknowledgement: {err}"));
            }
        }
    }
    store.outbox_delivered(&delivered)?;
    match failed {
        Some(err) => Err(err),
        None => Ok(queued.len()),
    }
}
