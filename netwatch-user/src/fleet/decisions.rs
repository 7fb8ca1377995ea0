//! Confirmed blocks: a source whose scan incidents come from at least
//! `confirm_sensors` distinct sensors within `confirm_window_secs`
//! becomes one fleet decision, and every enforce-mode sensor puts it in
//! its kernel's auto-block map.
//!
//! Every sensor watches the incidents stream and may find the same
//! confirmation; the decision's message id is made from what they all
//! see (source, rule, direction and the first sighting of the sensor that
//! confirmed it), so the stream keeps it once, however many publish it.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull},
    message::PublishMessage,
    stream,
};
use futures_util::StreamExt as _;
use log::{info, warn};
use netwatch_common::{Classification, Direction};
use serde::{Deserialize, Serialize};

use crate::{
    clock::rfc3339,
    config::Confirmation,
    datapath::PinnedMaps,
    detection::sources::{blocks_map, key_for},
    fleet::{FleetStats, SUBJECT_PREFIX, address_token, incidents_stream},
};

pub const DECISIONS_STREAM: &str = "NETWATCH_DECISIONS";
pub const DECISIONS_PREFIX: &str = "netwatch.decisions";

/// A fleet decision, as stored in the decisions stream.
#[derive(Debug, Serialize, Deserialize)]
pub struct Decision {
    pub source: IpAddr,
    pub rule: String,
    pub direction: String,
    /// The sensors whose incidents confirmed it.
    pub sensors: Vec<String>,
    /// The first sighting of the sensor whose incident confirmed it.
    pub confirmed_at: String,
    pub until: String,
}

/// A decision lifted by `netwatch unblock`: it replaces the decision in
/// the stream (one message per subject), so every sensor lifts the block
/// it applied and none applies the decision again when it starts.
#[derive(Debug, Serialize, Deserialize)]
pub struct Lift {
    pub source: IpAddr,
    pub rule: String,
    pub direction: String,
    pub lifted_at: String,
    /// The sensor where `unblock` ran.
    pub lifted_by: String,
}

/// What the decisions stream holds.
#[derive(Deserialize)]
#[serde(untagged)]
enum DecisionMessage {
    Decision(Decision),
    Lift(Lift),
}

fn decision_subject(source: IpAddr, rule: &str, direction: &str) -> String {
    format!(
        "{DECISIONS_PREFIX}.{}.{}.{direction}",
        address_token(source),
        rule.replace('/', "-")
    )
}

/// The decisions stream: one subject per source, rule and direction;
/// decisions leave it when their block ends, and a decision published
/// again while it is in force is dropped as a duplicate.
async fn decisions_stream(
    js: &jetstream::Context,
    confirmation: &Confirmation,
    replicas: usize,
) -> Result<stream::Stream> {
    js.get_or_create_stream(stream::Config {
        name: DECISIONS_STREAM.into(),
        subjects: vec![format!("{DECISIONS_PREFIX}.>")],
        max_messages_per_subject: 1,
        max_age: confirmation.block,
        duplicate_window: confirmation.block,
        num_replicas: replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("opening the JetStream stream {DECISIONS_STREAM}: {e}"))
}

fn parse_time(v: &serde_json::Value, key: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(v.get(key)?.as_str()?).ok()
}

/// What the incidents stream says about one source on one rule and
/// direction: each sensor's first and last sighting.
type Sightings = HashMap<String, (SystemTime, SystemTime)>;

/// A source on a rule and direction.
type Followed = (IpAddr, String, String);

/// The newest state of each incident, by sensor and incident id.
type Evidence = HashMap<(String, i64), serde_json::Value>;

/// Sources on a rule and direction followed at most; past it those
/// without a sighting in the window are forgotten.
const MAX_FOLLOWED: usize = 100_000;

/// The confirmation rule, fed with the incidents as the stream delivers
/// them (sensor from the subject, incident as published).
pub struct Confirmer {
    confirmation: Confirmation,
    seen: HashMap<Followed, Sightings>,
    /// The newest state of every incident behind `seen`, by sensor and
    /// incident id: what a report about the source says.
    evidence: HashMap<Followed, Evidence>,
    published: HashSet<String>,
}

impl Confirmer {
    pub fn new(confirmation: Confirmation) -> Self {
        Confirmer {
            confirmation,
            seen: HashMap::new(),
            evidence: HashMap::new(),
            published: HashSet::new(),
        }
    }

    /// A decision (with its message id) when this incident completes a
    /// confirmation not decided yet. The id depends only on what every
    /// sensor reads alike from the stream: the source, rule, direction and
    /// the first sighting of the sensor that completed the count (the
    /// N-th earliest first sighting), not on the order incidents arrive.
    pub fn observe(
        &mut self,
        sensor: &str,
        incident: &serde_json::Value,
        now: SystemTime,
    ) -> Option<(String, Decision)> {
        if incident.get("classification").and_then(|c| c.as_str()) != Some(Classification::Scan.label())
            || incident.get("summary_sources").is_some()
        {
            return None;
        }
        let source = incident.get("source")?.as_str()?.parse::<IpAddr>().ok()?;
        if self.confirmation.allowlisted(source) {
            return None;
        }
        let rule = incident.get("rule")?.as_str()?;
        let direction = incident.get("direction")?.as_str()?;
        let (first, last) = (parse_time(incident, "first_seen")?, parse_time(incident, "last_seen")?);
        let window = self.confirmation.window;
        let fresh = move |last: &SystemTime| now.duration_since(*last).unwrap_or_default() <= window;
        if self.seen.len() >= MAX_FOLLOWED {
            self.seen
                .retain(|_, sightings| sightings.values().any(|(_, last)| fresh(last)));
            let seen = &self.seen;
            self.evidence.retain(|key, _| seen.contains_key(key));
        }
        let key = (source, rule.to_string(), direction.to_string());
        if let Some(id) = incident.get("id").and_then(|i| i.as_i64()) {
            self.evidence
                .entry(key.clone())
                .or_default()
                .insert((sensor.to_string(), id), incident.clone());
        }
        let sightings = self.seen.entry(key).or_default();
        let earliest = sightings.get(sensor).map_or(first, |(f, _)| (*f).min(first));
        let latest = sightings.get(sensor).map_or(last, |(_, l)| (*l).max(last));
        sightings.insert(sensor.to_string(), (earliest, latest));
        sightings.retain(|_, (_, last)| fresh(last));
        let needed = self.confirmation.sensors as usize;
        if sightings.len() < needed {
            return None;
        }
        let mut firsts: Vec<SystemTime> = sightings.values().map(|(f, _)| *f).collect();
        firsts.sort();
        let confirmed_at = rfc3339(firsts[needed - 1]);
        let id = format!("{}.{rule}.{direction}.{confirmed_at}", address_token(source));
        if !self.published.insert(id.clone()) {
            return None;
        }
        let mut sensors: Vec<String> = sightings.keys().cloned().collect();
        sensors.sort();
        Some((
            id,
            Decision {
                source,
                rule: rule.to_string(),
                direction: direction.to_string(),
                sensors,
                confirmed_at,
                until: rfc3339(now + self.confirmation.block_for(rule)),
            },
        ))
    }
}

impl Confirmer {
    /// The incidents (newest states, each with its `sensor`) behind a
    /// decision, of the sensors that confirmed it.
    pub fn evidence(&self, decision: &Decision) -> Vec<serde_json::Value> {
        let key = (decision.source, decision.rule.clone(), decision.direction.clone());
        let mut incidents: Vec<serde_json::Value> = self
            .evidence
            .get(&key)
            .into_iter()
            .flatten()
            .filter(|((sensor, _), _)| decision.sensors.contains(sensor))
            .map(|((sensor, _), incident)| {
                let mut incident = incident.clone();
                incident["sensor"] = sensor.as_str().into();
                incident
            })
            .collect();
        incidents
            .sort_by(|a, b| (a["sensor"].as_str(), a["id"].as_i64()).cmp(&(b["sensor"].as_str(), b["id"].as_i64())));
        incidents
    }
}

/// Watches the incidents stream (from `window` ago) and publishes a
/// decision for every source confirmed by enough sensors. Runs until the
/// connection fails; the caller starts it again.
pub async fn confirm(
    js: &jetstream::Context,
    confirmation: &Confirmation,
    replicas: usize,
    stats: &FleetStats,
    report: Option<&super::report::Reporter>,
) -> Result<()> {
    let incidents = incidents_stream(js, replicas).await?;
    decisions_stream(js, confirmation, replicas).await?;
    let start = time::OffsetDateTime::now_utc() - confirmation.window;
    let consumer = incidents
        .create_consumer(pull::OrderedConfig {
            filter_subject: format!("{SUBJECT_PREFIX}.>"),
            deliver_policy: DeliverPolicy::ByStartTime { start_time: start },
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("watching the incidents: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("watching the incidents: {e}"))?;
    let mut confirmer = Confirmer::new(confirmation.clone());
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| anyhow::anyhow!("watching the incidents: {e}"))?;
        let Some(sensor) = message.subject.split('.').nth(2) else {
            continue;
        };
        let Ok(incident) = serde_json::from_slice::<serde_json::Value>(&message.payload) else {
            continue;
        };
        let Some((id, decision)) = confirmer.observe(sensor, &incident, SystemTime::now()) else {
            continue;
        };
        let (source, rule, direction) = (decision.source, decision.rule.as_str(), decision.direction.as_str());
        let subject = decision_subject(source, rule, direction);
        let ack = js
            .send_publish(
                subject,
                PublishMessage::build()
                    .payload(serde_json::to_vec(&decision)?.into())
                    .message_id(&id),
            )
            .await
            .map_err(|e| anyhow::anyhow!("publishing a decision: {e}"))?
            .await
            .map_err(|e| anyhow::anyhow!("publishing a decision: {e}"))?;
        if !ack.duplicate {
            stats.decisions_created.fetch_add(1, Relaxed);
            // The sensor that created the decision reports it: one report
            // per decision across the fleet.
            if let Some(report) = report {
                report.send(&decision, &confirmer.evidence(&decision));
            }
            info!(
                "fleet: {source} confirmed by {} sensors ({}) on {rule} {direction}: blocked by the fleet until {}",
                decision.sensors.len(),
                decision.sensors.join(", "),
                decision.until
            );
        }
    }
    anyhow::bail!("the incidents stream ended")
}

/// The prefix a cap counts decisions in: the /24 of an IPv4 source, the
/// /64 of an IPv6 one.
fn prefix_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(a) => std::net::Ipv4Addr::from(u32::from(a) & 0xffff_ff00).into(),
        IpAddr::V6(a) => std::net::Ipv6Addr::from(u128::from(a) & !((1u128 << 64) - 1)).into(),
    }
}

/// Applies every decision of the decisions stream, as it arrives, to the
/// kernel's auto-block map: the source's block on the decision's rule and
/// direction, until the decision's end (on the boot-time clock the kernel
/// keeps). Only rules with `auto_block` consult that map, so a decision
/// for another rule is logged, not applied; the allowlist wins in the
/// kernel (an allowlisted source is never blocked), the fleet allowlist
/// here; at most `per_prefix` decisions per /24 (or /64) and
/// `max_applied` in all are in force.
pub async fn apply(
    js: &jetstream::Context,
    confirmation: &Confirmation,
    replicas: usize,
    maps: &PinnedMaps,
    stats: &Arc<FleetStats>,
    applied: &std::sync::Mutex<Applied>,
) -> Result<()> {
    let decisions = decisions_stream(js, confirmation, replicas).await?;
    let consumer = decisions
        .create_consumer(pull::OrderedConfig {
            filter_subject: format!("{DECISIONS_PREFIX}.>"),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("watching the decisions: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("watching the decisions: {e}"))?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| anyhow::anyhow!("watching the decisions: {e}"))?;
        let mut applied = applied.lock().unwrap_or_else(|e| e.into_inner());
        match serde_json::from_slice::<DecisionMessage>(&message.payload) {
            Ok(DecisionMessage::Decision(decision)) => {
                if let Err(err) = apply_one(&decision, confirmation, maps, &mut applied, stats) {
                    warn!(
                        "fleet: decision for {} on {} not applied: {err:#}",
                        decision.source, decision.rule
                    );
                }
            }
            Ok(DecisionMessage::Lift(lift)) => {
                if let Err(err) = lift_one(&lift, maps, &mut applied) {
                    warn!(
                        "fleet: lifting the decision for {} on {}: {err:#}",
                        lift.source, lift.rule
                    );
                }
            }
            Err(_) => warn!("fleet: skipping a message on {} that is no decision", message.subject),
        }
    }
    anyhow::bail!("the decisions stream ended")
}

/// The decisions this sensor applied, with their ends: what the caps
/// (`decisions_per_prefix`, `decisions_max`) count and lifts take out.
/// Kept across reconnections, so a lift met after one still finds them.
#[derive(Default)]
pub struct Applied(HashMap<Followed, SystemTime>);

impl Applied {
    /// Room for `decision` under the caps (one in force already is
    /// replaced, so always has room); blocks that ended are forgotten.
    fn admit(&mut self, decision: &Decision, confirmation: &Confirmation, now: SystemTime) -> Result<()> {
        self.0.retain(|_, until| *until > now);
        if confirmation.allowlisted(decision.source) {
            anyhow::bail!("the source is on the fleet allowlist");
        }
        if self.0.contains_key(&followed(decision)) {
            return Ok(());
        }
        if self.0.len() >= confirmation.max_applied as usize {
            anyhow::bail!("{} decisions in force here already (decisions_max)", self.0.len());
        }
        let prefix = prefix_of(decision.source);
        let mut in_prefix: Vec<IpAddr> = self
            .0
            .keys()
            .map(|(source, _, _)| *source)
            .filter(|source| prefix_of(*source) == prefix)
            .collect();
        in_prefix.sort();
        in_prefix.dedup();
        if !in_prefix.contains(&decision.source) && in_prefix.len() >= confirmation.per_prefix as usize {
            anyhow::bail!(
                "{} decisions in force in its prefix already (decisions_per_prefix)",
                in_prefix.len()
            );
        }
        Ok(())
    }
}

fn followed(decision: &Decision) -> Followed {
    (decision.source, decision.rule.clone(), decision.direction.clone())
}

fn apply_one(
    decision: &Decision,
    confirmation: &Confirmation,
    maps: &PinnedMaps,
    applied: &mut Applied,
    stats: &FleetStats,
) -> Result<()> {
    let until = humantime::parse_rfc3339(&decision.until).context("its end")?;
    let now = SystemTime::now();
    let Ok(left) = until.duration_since(now) else {
        return Ok(());
    };
    let (key, auto_block) = block_key(maps, decision.source, &decision.rule, &decision.direction)?;
    if !auto_block {
        anyhow::bail!(
            "rule {} has no auto_block here, so the kernel does not consult blocks on it",
            decision.rule
        );
    }
    applied.admit(decision, confirmation, now)?;
    let end = crate::clock::boot_secs().saturating_add(left.as_secs().min(u32::MAX as u64) as u32);
    blocks_map(maps)?
        .insert(key, end, 0)
        .map_err(|e| anyhow::anyhow!("the auto-block map refused it (full?): {e}"))?;
    applied.0.insert(followed(decision), until);
    stats.decisions_applied.fetch_add(1, Relaxed);
    info!(
        "fleet: applied the decision blocking {} on {} {} until {} (confirmed by {})",
        decision.source,
        decision.rule,
        decision.direction,
        decision.until,
        decision.sensors.join(", ")
    );
    Ok(())
}

/// The auto-block map's key of `source` on `rule` and `direction` here,
/// and whether the rule has auto_block.
fn block_key(
    maps: &PinnedMaps,
    source: IpAddr,
    rule: &str,
    direction: &str,
) -> Result<(netwatch_common::SourceKey, bool)> {
    let (slot, _, info) = maps
        .rules_in_force()?
        .into_iter()
        .find(|(_, info, _)| crate::detection::sources::rule_label(info) == rule)
        .with_context(|| format!("no rule {rule} here"))?;
    let direction = Direction::from_label(direction).context("its direction")?;
    Ok((
        key_for(source, slot as u8, direction, Classification::Scan),
        info.block_secs != 0,
    ))
}

/// A lift of a decision this sensor applied (since it started) takes its
/// block out of the kernel's map; any other is a decision lifted before.
fn lift_one(lift: &Lift, maps: &PinnedMaps, applied: &mut Applied) -> Result<()> {
    let followed = (lift.source, lift.rule.clone(), lift.direction.clone());
    if applied.0.remove(&followed).is_none() {
        return Ok(());
    }
    let (key, _) = block_key(maps, lift.source, &lift.rule, &lift.direction)?;
    let _ = blocks_map(maps)?.remove(&key);
    info!(
        "fleet: lifted the decision blocking {} on {} {} (netwatch unblock at {}, {})",
        lift.source, lift.rule, lift.direction, lift.lifted_by, lift.lifted_at
    );
    Ok(())
}

/// `netwatch unblock CIDR` with a fleet: every decision in force for a
/// source inside `net` is replaced by a lift (its message id made from
/// the decision, so sensors lifting it at once store one). Returns how
/// many decisions it lifted.
pub fn lift_decisions(fleet: &crate::config::FleetConfig, net: ipnet::IpNet) -> Result<usize> {
    super::query::within_time(fleet, async {
        let client = super::connect(&fleet.url, fleet.credentials.as_deref(), "netwatch-unblock", true).await?;
        let js = jetstream::new(client);
        let messages =
            super::query::newest_messages(&js, &fleet.url, DECISIONS_STREAM, format!("{DECISIONS_PREFIX}.>")).await?;
        let now = SystemTime::now();
        let mut lifted = 0;
        for (subject, message) in messages {
            let Ok(DecisionMessage::Decision(decision)) = serde_json::from_value::<DecisionMessage>(message) else {
                continue;
            };
            let in_force = humantime::parse_rfc3339(&decision.until).is_ok_and(|until| until > now);
            if !in_force || !net.contains(&decision.source) {
                continue;
            }
            let lift = Lift {
                source: decision.source,
                rule: decision.rule.clone(),
                direction: decision.direction.clone(),
                lifted_at: rfc3339(now),
                lifted_by: fleet.sensor.clone(),
            };
            js.send_publish(
                subject.clone(),
                PublishMessage::build()
                    .payload(serde_json::to_vec(&lift)?.into())
                    .message_id(format!("lift.{subject}.{}", decision.confirmed_at)),
            )
            .await
            .map_err(|e| anyhow::anyhow!("publishing a lift: {e}"))?
            .await
            .map_err(|e| anyhow::anyhow!("publishing a lift: {e}"))?;
            lifted += 1;
        }
        Ok(lifted)
    })
}

/// Runs `task` again a second after each failure, for ever.
pub async fn keep_running<F, Fut>(what: &str, mut task: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    // Logged once per outage: a failure after a while of running is a
    // new one.
    let mut failing = false;
    loop {
        let started = std::time::Instant::now();
        if let Err(err) = task().await {
            if started.elapsed() > Duration::from_secs(10) {
                failing = false;
            }
            if !failing {
                warn!("fleet: {what}: {err:#}; trying again every second");
                failing = true;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incident(source: &str, first: &str, last: &str) -> serde_json::Value {
        serde_json::json!({
            "source": source, "rule": "udp/137", "direction": "inbound", "classification": "scan",
            "first_seen": first, "last_seen": last, "packets": 20,
        })
    }

    fn at(t: &str) -> SystemTime {
        humantime::parse_rfc3339(t).unwrap()
    }

    /// Two sensors confirm a source; every observer, whatever order the
    /// incidents reach it in, makes the same decision id; a third sensor
    /// seeing it later changes nothing; reverse lookups, summaries and
    /// sightings older than the window never confirm.
    #[test]
    fn a_confirmation_is_the_same_for_every_observer() {
        let now = at("2026-12-08T00:30:00Z");
        let a = incident("198.18.0.1", "2026-12-08T00:10:00Z", "2026-12-08T00:12:00Z");
        let b = incident("198.18.0.1", "2026-12-08T00:20:00Z", "2026-12-08T00:21:00Z");
        let c = incident("198.18.0.1", "2026-12-08T00:25:00Z", "2026-12-08T00:26:00Z");
        let mut first = Confirmer::new(Confirmation::default());
        assert!(first.observe("edge-a", &a, now).is_none());
        // A sensor's second incident of the source counts once.
        assert!(first.observe("edge-a", &a, now).is_none());
        let (id, decision) = first.observe("edge-b", &b, now).expect("confirmed");
        assert_eq!(decision.sensors, ["edge-a", "edge-b"]);
        assert_eq!(decision.confirmed_at, "2026-12-08T00:20:00Z");
        assert_eq!(id, "198-18-0-1.udp/137.inbound.2026-12-08T00:20:00Z");
        assert!(first.observe("edge-c", &c, now).is_none(), "decided again");
        let mut other = Confirmer::new(Confirmation::default());
        assert!(other.observe("edge-c", &c, now).is_none());
        let (other_id, _) = other.observe("edge-b", &b, now).expect("confirmed by b and c");
        // c and b alone: b completes it (the 2nd earliest is c's) — the
        // same sources seen alike give the same id, in any order:
        let mut reversed = Confirmer::new(Confirmation::default());
        reversed.observe("edge-b", &b, now);
        assert_eq!(reversed.observe("edge-c", &c, now).unwrap().0, other_id);
        let mut ba = Confirmer::new(Confirmation::default());
        ba.observe("edge-b", &b, now);
        assert_eq!(ba.observe("edge-a", &a, now).unwrap().0, id);

        let mut strict = Confirmer::new(Confirmation::default());
        let mut reverse = b.clone();
        reverse["classification"] = "reverse-lookup".into();
        let mut summary = b.clone();
        summary["summary_sources"] = 500.into();
        let stale = incident("198.18.0.1", "2026-12-07T20:00:00Z", "2026-12-07T21:00:00Z");
        strict.observe("edge-a", &a, now);
        assert!(strict.observe("edge-b", &reverse, now).is_none());
        assert!(strict.observe("edge-b", &summary, now).is_none());
        assert!(strict.observe("edge-b", &stale, now).is_none());
    }

    /// Fleet-allowlisted sources are never decided on; decisions on UDP
    /// rules block for `udp_decision_secs`.
    #[test]
    fn the_fleet_allowlist_and_udp_evidence() {
        let now = at("2026-12-08T00:30:00Z");
        let confirmation = Confirmation {
            allowlist: vec!["198.18.0.0/31".parse().unwrap()],
            ..Confirmation::default()
        };
        let mut confirmer = Confirmer::new(confirmation);
        for source in ["198.18.0.1", "198.18.0.2"] {
            let mut tcp = incident(source, "2026-12-08T00:10:00Z", "2026-12-08T00:12:00Z");
            tcp["rule"] = "tcp/445".into();
            let udp = incident(source, "2026-12-08T00:10:00Z", "2026-12-08T00:12:00Z");
            for sensor in ["edge-a", "edge-b"] {
                let decided = [&tcp, &udp].map(|i| confirmer.observe(sensor, i, now).map(|(_, d)| d.until));
                if source == "198.18.0.1" || sensor == "edge-a" {
                    assert_eq!(decided, [None, None], "{source} at {sensor}");
                } else {
                    assert_eq!(
                        decided,
                        [Some("2026-12-08T01:30:00Z".into()), Some("2026-12-08T00:45:00Z".into())]
                    );
                }
            }
        }
    }

    /// The caps count the decisions in force: per prefix, in all, and a
    /// decision in force again always has room.
    #[test]
    fn the_caps_count_decisions_in_force() {
        let now = at("2026-12-08T00:30:00Z");
        let confirmation = Confirmation {
            per_prefix: 2,
            max_applied: 3,
            ..Confirmation::default()
        };
        let decision = |source: &str| Decision {
            source: source.parse().unwrap(),
            rule: "udp/137".into(),
            direction: "inbound".into(),
            sensors: vec![],
            confirmed_at: String::new(),
            until: String::new(),
        };
        let mut applied = Applied::default();
        let mut apply = |source: &str, until: &str| {
            let d = decision(source);
            applied.admit(&d, &confirmation, now)?;
            applied.0.insert(followed(&d), at(until));
            anyhow::Ok(())
        };
        apply("198.18.0.1", "2026-12-08T01:00:00Z").unwrap();
        apply("198.18.0.2", "2026-12-08T00:31:00Z").unwrap();
        let err = apply("198.18.0.3", "2026-12-08T01:00:00Z").unwrap_err();
        assert!(err.to_string().contains("decisions_per_prefix"), "{err}");
        apply("198.18.0.1", "2026-12-08T01:00:00Z").unwrap();
        apply("198.18.1.1", "2026-12-08T01:00:00Z").unwrap();
        let err = apply("198.18.2.1", "2026-12-08T01:00:00Z").unwrap_err();
        assert!(err.to_string().contains("decisions_max"), "{err}");
        // 198.18.0.2's block ended: room again.
        let later = at("2026-12-08T00:32:00Z");
        applied.admit(&decision("198.18.2.1"), &confirmation, later).unwrap();
    }

    #[test]
    fn caps_count_per_24_and_per_64() {
        assert_eq!(
            prefix_of("198.18.7.9".parse().unwrap()),
            "198.18.7.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            prefix_of("2001:db8:1:2:3::4".parse().unwrap()),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
    }
}
