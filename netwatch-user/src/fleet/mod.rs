//! A fleet of sensors on NATS JetStream (`[fleet]`, `--fleet`): every
//! incident a sensor opens or updates is published to one stream, from
//! an outbox table in the incident database, so nothing is lost while
//! the server is unreachable; `lookup --fleet` and `top --fleet` read
//! the stream. Written to what nats-server 2.9 (Debian's) offers.
//!
//! Subjects: `netwatch.incidents.<sensor>.<address>.<incident id>`, one
//! per incident, so the newest message of each subject is the incident's
//! state and a lookup by address is one filter.

pub mod decisions;
mod publisher;
mod query;
pub mod report;

use std::{net::IpAddr, time::Duration};

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, stream};

use crate::config::FleetConfig;

pub use publisher::{FleetStats, Publisher};
pub use query::{FleetSource, fleet_incidents, fleet_top};

pub const STREAM: &str = "NETWATCH_INCIDENTS";
pub const SUBJECT_PREFIX: &str = "netwatch.incidents";
/// Re-publications of one message id within this long are dropped by the
/// server (a publication whose acknowledgement was lost, sent again).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);
/// Messages kept per incident: its newest states.
pub const HISTORY_PER_INCIDENT: i64 = 8;
/// Incidents not updated for this long leave the stream (the local
/// database keeps them for `incident_retention_days`).
pub const STREAM_MAX_AGE: Duration = Duration::from_secs(90 * 86400);

/// An address as one subject token (subject tokens cannot hold dots).
pub fn address_token(ip: IpAddr) -> String {
    ip.to_string().replace('.', "-")
}

pub fn incident_subject(sensor: &str, source: IpAddr, incident: i64) -> String {
    format!("{SUBJECT_PREFIX}.{sensor}.{}.{incident}", address_token(source))
}

/// Connects to the fleet's server. `wait`: give up (with an error naming
/// the URL) when it cannot be reached now, as the query commands do; a
/// sensor instead keeps trying in the background.
pub async fn connect(
    fleet_url: &str,
    credentials: Option<&std::path::Path>,
    name: &str,
    wait: bool,
) -> Result<async_nats::Client> {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        // Back in a second once the server is back (the default waits up
        // to several seconds between attempts).
        .reconnect_delay_callback(|attempts| Duration::from_millis((attempts as u64 * 100).min(1000)));
    if let Some(path) = credentials {
        options = with_credentials(options, path)?;
    }
    if !wait {
        options = options.retry_on_initial_connect();
    }
    let addrs = fleet_url
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("fleet.url {fleet_url:?}"))?;
    options
        .connect(addrs)
        .await
        .with_context(|| format!("connecting to the fleet at {fleet_url}"))
}

/// A NATS credentials file (user JWT and NKey seed, as `nsc` writes it)
/// or a file holding just a user's NKey seed (`SU...`, for a server whose
/// `authorization` lists users by NKey).
fn with_credentials(options: async_nats::ConnectOptions, path: &std::path::Path) -> Result<async_nats::ConnectOptions> {
    let context = || format!("fleet.credentials {}", path.display());
    let text = std::fs::read_to_string(path).with_context(context)?;
    if text.contains("BEGIN NATS USER JWT") {
        return options.credentials(&text).with_context(context);
    }
    let seed = text.trim();
    nkeys::KeyPair::from_seed(seed)
        .map_err(|e| anyhow::anyhow!("neither a NATS credentials file nor an NKey seed ({e})"))
        .with_context(context)?;
    Ok(options.nkey(seed.to_string()))
}

/// The incidents stream, created on first use with the fleet's settings
/// (`replicas`: copies kept by a JetStream cluster).
pub async fn incidents_stream(js: &jetstream::Context, replicas: usize) -> Result<stream::Stream> {
    js.get_or_create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec![format!("{SUBJECT_PREFIX}.>")],
        max_messages_per_subject: HISTORY_PER_INCIDENT,
        max_age: STREAM_MAX_AGE,
        duplicate_window: DUPLICATE_WINDOW,
        num_replicas: replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("opening the JetStream stream {STREAM}: {e}"))
}

/// The fleet URL and credentials a query command uses: `--fleet URL`, or
/// the config file's `[fleet]` table when `--fleet` is given bare.
pub fn query_target(flag: &str, file: Option<&crate::config::FleetEntry>) -> Result<FleetConfig> {
    let (url, credentials) = if flag.is_empty() {
        let entry =
            file.context("--fleet without a URL takes it from the config file's [fleet] table, which is not there")?;
        (entry.url.clone(), entry.credentials.clone())
    } else {
        (flag.to_string(), file.and_then(|f| f.credentials.clone()))
    };
    crate::config::check_fleet_url(&url)?;
    Ok(FleetConfig {
        url,
        credentials,
        sensor: String::new(),
        confirmation: Default::default(),
        replicas: 1,
        report: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_hold_the_sensor_the_address_and_the_incident() {
        assert_eq!(
            incident_subject("edge-1", "198.18.0.66".parse().unwrap(), 7),
            "netwatch.incidents.edge-1.198-18-0-66.7"
        );
        assert_eq!(
            incident_subject("b", "2001:db8::1".parse().unwrap(), 12),
            "netwatch.incidents.b.2001:db8::1.12"
        );
        // A summary incident's source.
        assert_eq!(address_token("0.0.0.0".parse().unwrap()), "0-0-0-0");
    }
}
