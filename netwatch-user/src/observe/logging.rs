//! The controller's log: prose lines (the default), or JSON lines
//! (`--log-format json`, `log_format = "json"`) that fail2ban, CrowdSec or
//! Loki read without parsing prose. A flag's JSON line carries its source
//! address, rule, direction and incident id as fields of their own.

use std::{io::Write as _, sync::OnceLock};

use log::info;

use crate::{
    clock::rfc3339,
    detection::incidents::{Observation, Reason, Recorded},
};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `[time LEVEL] message`, for people and the journal.
    #[default]
    Text,
    /// One JSON object per line: `time`, `level`, `message`, and for
    /// flags `event`, `source`, `rule`, `direction`, `incident`, ...
    Json,
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// The log target of flag lines; in JSON their message is the flag's
/// fields, merged into the line.
const FLAG_TARGET: &str = "netwatch::flag";

/// Sets up the logger (`RUST_LOG` filters it, `info` by default).
pub fn init(format: LogFormat) {
    let _ = FORMAT.set(format);
    let mut builder = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    builder.format_target(false);
    if format == LogFormat::Json {
        builder.format(|buf, record| {
            let mut line = serde_json::Map::new();
            line.insert("time".into(), rfc3339_millis().into());
            line.insert("level".into(), record.level().as_str().to_lowercase().into());
            let message = record.args().to_string();
            let fields = (record.target() == FLAG_TARGET)
                .then(|| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&message).ok())
                .flatten();
            match fields {
                Some(fields) => line.extend(fields),
                None => {
                    line.insert("message".into(), message.into());
                }
            }
            writeln!(buf, "{}", serde_json::Value::Object(line))
        });
    }
    builder.init();
}

fn rfc3339_millis() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Logs a flag once its incident is written.
pub fn flag(obs: &Observation, recorded: Recorded) {
    let blocked = obs
        .blocked_until
        .map(|t| format!(", auto-blocked until {}", rfc3339(t)))
        .unwrap_or_default();
    let summary = matches!(recorded, Recorded::Summarised(_));
    let why = match obs.reason {
        Reason::FailedContacts => format!(" ({} failed first contacts)", obs.failed_contacts),
        Reason::DistinctDestinations => String::new(),
    };
    let prose = format!(
        "flagged {} ({} {} {} on {}): {} distinct destinations{why}, {} packets{blocked} — {}incident #{}",
        obs.source,
        obs.classification.label(),
        obs.rule,
        obs.direction,
        obs.interface,
        obs.distinct_destinations,
        obs.packets,
        if summary {
            "a flood of new sources: counted into summary "
        } else {
            ""
        },
        recorded.id()
    );
    if FORMAT.get() != Some(&LogFormat::Json) {
        info!("{prose}");
        return;
    }
    let fields = serde_json::json!({
        "message": prose,
        "event": "flag",
        "source": obs.source.to_string(),
        "rule": obs.rule,
        "direction": obs.direction,
        "interface": obs.interface,
        "classification": obs.classification.label(),
        "incident": recorded.id(),
        "summary": summary,
        "packets": obs.packets,
        "distinct_destinations": obs.distinct_destinations,
        "reason": obs.reason.label(),
        "failed_contacts": obs.failed_contacts,
        "blocked_until": obs.blocked_until.map(rfc3339),
    });
    info!(target: FLAG_TARGET, "{fields}");
}
