//! The query side: every sensor's incidents, read from the stream.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    time::Duration,
};

use anyhow::{Context as _, Result};
use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, pull},
};
use futures_util::StreamExt as _;
use serde::Serialize;
use serde_json::Value;

use crate::{
    config::FleetConfig,
    fleet::{STREAM, SUBJECT_PREFIX, address_token},
};

/// How long a query waits for the server.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// The newest state of every incident whose subject matches `filter`, as
/// the sensors published them (JSON objects with `sensor`).
async fn newest_states(fleet: &FleetConfig, filter: String) -> Result<Vec<Value>> {
    let client = super::connect(&fleet.url, fleet.credentials.as_deref(), "netwatch-query", true).await?;
    let js = jetstream::new(client);
    let messages = newest_messages(&js, &fleet.url, STREAM, filter).await?;
    Ok(messages
        .into_iter()
        .filter_map(|(subject, mut v)| {
            if !v.is_object() {
                log::warn!("skipping a message on {subject} that is no incident");
                return None;
            }
            // The subject says who wrote it (the server's permissions can
            // hold a sensor to its own), not the payload.
            if let Some(sensor) = subject.split('.').nth(2) {
                v["sensor"] = sensor.into();
            }
            Some(v)
        })
        .collect())
}

/// The newest message of every subject of `stream_name` matching
/// `filter`, with its subject; none when the stream does not exist.
pub(super) async fn newest_messages(
    js: &jetstream::Context,
    url: &str,
    stream_name: &str,
    filter: String,
) -> Result<Vec<(String, Value)>> {
    let stream = match js.get_stream(stream_name).await {
        Ok(stream) => stream,
        // No sensor has published yet.
        Err(err)
            if matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(e)
                if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            return Ok(Vec::new());
        }
        Err(err) => return Err(anyhow::anyhow!("opening the stream {stream_name} at {url}: {err}")),
    };
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: filter,
            deliver_policy: DeliverPolicy::LastPerSubject,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("reading the stream {stream_name}: {e}"))?;
    let mut consumer = consumer;
    let mut pending = consumer
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("reading the stream {stream_name}: {e}"))?
        .num_pending as usize;
    let mut messages = Vec::with_capacity(pending);
    while pending > 0 {
        let mut batch = consumer
            .batch()
            .max_messages(pending.min(1000))
            .expires(QUERY_TIMEOUT)
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("reading the stream {stream_name}: {e}"))?;
        let mut got = 0;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| anyhow::anyhow!("reading the stream {stream_name}: {e}"))?;
            got += 1;
            match serde_json::from_slice::<Value>(&message.payload) {
                Ok(v) => messages.push((message.subject.to_string(), v)),
                Err(_) => log::warn!("skipping a message on {} that is no JSON", message.subject),
            }
        }
        if got == 0 {
            anyhow::bail!("the stream {stream_name} at {url} stopped answering");
        }
        pending = pending.saturating_sub(got);
    }
    let _ = stream.delete_consumer(consumer.cached_info().name.as_str()).await;
    Ok(messages)
}

/// Runs a query on a runtime of its own, bounded in time.
pub(super) fn within_time<T>(fleet: &FleetConfig, query: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime
        .block_on(async { tokio::time::timeout(QUERY_TIMEOUT * 3, query).await })
        .with_context(|| format!("the fleet at {} did not answer in time", fleet.url))?
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// Every sensor's incidents of `ip`, newest first.
pub fn fleet_incidents(fleet: &FleetConfig, ip: IpAddr) -> Result<Vec<Value>> {
    let filter = format!("{SUBJECT_PREFIX}.*.{}.*", address_token(ip));
    let mut incidents = within_time(fleet, newest_states(fleet, filter))?;
    // RFC 3339 times in UTC sort as text.
    incidents.sort_by(|a, b| {
        (
            text(b, "last_seen"),
            text(b, "sensor"),
            b.get("id").and_then(Value::as_i64),
        )
            .cmp(&(
                text(a, "last_seen"),
                text(a, "sensor"),
                a.get("id").and_then(Value::as_i64),
            ))
    });
    Ok(incidents)
}

/// A source as the fleet saw it.
#[derive(Debug, Serialize)]
pub struct FleetSource {
    pub source: String,
    /// The sensors with an incident of it.
    pub sensors: BTreeSet<String>,
    pub incidents: u64,
    pub packets: u64,
    pub last_seen: String,
}

/// The sources seen by the most sensors (then by packets), at most
/// `limit`; summary incidents (floods of spoofed sources) are left out.
pub fn fleet_top(fleet: &FleetConfig, limit: usize) -> Result<Vec<FleetSource>> {
    let all = within_time(fleet, newest_states(fleet, format!("{SUBJECT_PREFIX}.>")))?;
    let mut by_source: HashMap<String, FleetSource> = HashMap::new();
    for incident in all.iter().filter(|i| i.get("summary_sources").is_none()) {
        let source = text(incident, "source").to_string();
        let entry = by_source.entry(source.clone()).or_insert_with(|| FleetSource {
            source,
            sensors: BTreeSet::new(),
            incidents: 0,
            packets: 0,
            last_seen: String::new(),
        });
        entry.sensors.insert(text(incident, "sensor").to_string());
        entry.incidents += 1;
        entry.packets += incident.get("packets").and_then(Value::as_u64).unwrap_or(0);
        let seen = text(incident, "last_seen");
        if seen > entry.last_seen.as_str() {
            entry.last_seen = seen.to_string();
        }
    }
    let mut sources: Vec<FleetSource> = by_source.into_values().collect();
    sources.sort_by(|a, b| (b.sensors.len(), b.packets, &a.source).cmp(&(a.sensors.len(), a.packets, &b.source)));
    sources.truncate(limit);
    Ok(sources)
}
