//! Reports about confirmed sources (`report_command`): one per fleet
//! decision, written by the sensor that created it, as a MIME message
//! with a plain-text part and a JSON part modelled on X-ARF's port-scan
//! reports, handed to a command on its standard input (`sendmail -t`).

use std::{
    collections::BTreeSet,
    io::Write as _,
    process::{Command, Stdio},
};

use log::{info, warn};
use serde_json::{Value, json};

use crate::fleet::decisions::Decision;

#[derive(Clone, Debug)]
pub struct Reporter {
    /// The command and its arguments (no shell).
    pub command: Vec<String>,
    /// The report's `To:` header, if any.
    pub to: Option<String>,
    /// The sensor writing it.
    pub sensor: String,
}

/// The machine-readable part: X-ARF-style (its `Version`, `ReporterInfo`
/// and `Report` with `ReportClass` "Activity", `ReportType` "PortScan"),
/// with netwatch's own fields for what the sensors saw.
pub fn xarf(decision: &Decision, incidents: &[Value], sensor: &str) -> Value {
    let field = |key: &'static str| incidents.iter().filter_map(move |i| i.get(key));
    let first = field("first_seen").filter_map(Value::as_str).min().unwrap_or_default();
    let last = field("last_seen").filter_map(Value::as_str).max().unwrap_or_default();
    let packets: u64 = field("packets").filter_map(Value::as_u64).sum();
    let destinations = field("distinct_destinations")
        .filter_map(Value::as_u64)
        .max()
        .unwrap_or(0);
    let (protocol, port) = decision.rule.split_once('/').unwrap_or((decision.rule.as_str(), ""));
    json!({
        "Version": "4",
        "ReporterInfo": { "ReporterOrg": "netwatch", "ReporterSensor": sensor },
        "Disclosure": true,
        "Report": {
            "ReportClass": "Activity",
            "ReportType": "PortScan",
            "Date": decision.confirmed_at,
            "SourceIp": decision.source.to_string(),
            "Protocol": protocol,
            "DestinationPort": port.parse::<u16>().ok(),
            "Direction": decision.direction,
            "Sensors": decision.sensors,
            "Rules": incidents.iter().filter_map(|i| i.get("rule")?.as_str()).collect::<BTreeSet<_>>(),
            "FirstSeen": first,
            "LastSeen": last,
            "Packets": packets,
            "DistinctDestinations": destinations,
            "BlockedUntil": decision.until,
            "Incidents": incidents,
        }
    })
}

/// The plain-text part.
pub fn text(decision: &Decision, report: &Value) -> String {
    let r = &report["Report"];
    let mut out = format!(
        "{} probed {} ({}) and was seen by {} sensors of a netwatch fleet ({}).\n\
         First seen {}, last seen {}; {} packets to {} distinct destinations.\n\
         The fleet blocks it on {} until {}.\n\nIncidents:\n",
        decision.source,
        decision.rule,
        decision.direction,
        decision.sensors.len(),
        decision.sensors.join(", "),
        r["FirstSeen"].as_str().unwrap_or_default(),
        r["LastSeen"].as_str().unwrap_or_default(),
        r["Packets"],
        r["DistinctDestinations"],
        decision.rule,
        decision.until
    );
    for i in r["Incidents"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {} #{}: {} {} {} .. {}, {} packets, {} distinct destinations\n",
            i["sensor"].as_str().unwrap_or_default(),
            i["id"],
            i["rule"].as_str().unwrap_or_default(),
            i["direction"].as_str().unwrap_or_default(),
            i["first_seen"].as_str().unwrap_or_default(),
            i["last_seen"].as_str().unwrap_or_default(),
            i["packets"],
            i["distinct_destinations"]
        ));
    }
    out
}

/// The whole message the command reads.
pub fn message(decision: &Decision, incidents: &[Value], sensor: &str, to: Option<&str>) -> String {
    let report = xarf(decision, incidents, sensor);
    let boundary = format!("netwatch-report-{}", decision.confirmed_at.replace(':', ""));
    let mut out = String::new();
    if let Some(to) = to {
        out.push_str(&format!("To: {to}\n"));
    }
    out.push_str(&format!(
        "Subject: netwatch: port scan from {} ({})\nMIME-Version: 1.0\n\
         Content-Type: multipart/mixed; boundary=\"{boundary}\"\n\n\
         --{boundary}\nContent-Type: text/plain; charset=utf-8\n\n{}\n\
         --{boundary}\nContent-Type: application/json; charset=utf-8\nContent-Disposition: attachment; filename=\"report.json\"\n\n{}\n\
         --{boundary}--\n",
        decision.source,
        decision.rule,
        text(decision, &report),
        serde_json::to_string_pretty(&report).unwrap_or_default()
    ));
    out
}

impl Reporter {
    /// Runs the command with the report on its standard input, in a
    /// thread of its own (a slow mailer holds up nothing).
    pub fn send(&self, decision: &Decision, incidents: &[Value]) {
        let message = message(decision, incidents, &self.sensor, self.to.as_deref());
        let command = self.command.clone();
        let source = decision.source;
        std::thread::spawn(move || {
            let run = || -> std::io::Result<std::process::ExitStatus> {
                let mut child = Command::new(&command[0])
                    .args(&command[1..])
                    .stdin(Stdio::piped())
                    .spawn()?;
                child.stdin.take().expect("piped").write_all(message.as_bytes())?;
                child.wait()
            };
            match run() {
                Ok(status) if status.success() => info!("fleet: reported {source} to {:?}", command[0]),
                Ok(status) => warn!("fleet: the report command for {source} failed ({status})"),
                Err(err) => warn!("fleet: running the report command {:?} for {source}: {err}", command[0]),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_has_a_text_and_a_json_part_with_the_evidence() {
        let decision = Decision {
            source: "198.18.0.1".parse().unwrap(),
            rule: "udp/137".into(),
            direction: "inbound".into(),
            sensors: vec!["edge-a".into(), "edge-b".into()],
            confirmed_at: "2026-12-08T00:20:00Z".into(),
            until: "2026-12-08T01:20:00Z".into(),
        };
        let incidents = vec![
            json!({"sensor": "edge-a", "id": 1, "rule": "udp/137", "direction": "inbound", "packets": 256,
                   "distinct_destinations": 256, "first_seen": "2026-12-08T00:10:00Z", "last_seen": "2026-12-08T00:11:00Z"}),
            json!({"sensor": "edge-b", "id": 4, "rule": "udp/137", "direction": "inbound", "packets": 30,
                   "distinct_destinations": 30, "first_seen": "2026-12-08T00:20:00Z", "last_seen": "2026-12-08T00:21:00Z"}),
        ];
        let report = xarf(&decision, &incidents, "edge-b");
        let r = &report["Report"];
        assert_eq!(r["ReportType"], "PortScan");
        assert_eq!(r["SourceIp"], "198.18.0.1");
        assert_eq!(r["DestinationPort"], 137);
        assert_eq!(r["Packets"], 286);
        assert_eq!(r["DistinctDestinations"], 256);
        assert_eq!(
            (r["FirstSeen"].as_str(), r["LastSeen"].as_str()),
            (Some("2026-12-08T00:10:00Z"), Some("2026-12-08T00:21:00Z"))
        );
        let message = message(&decision, &incidents, "edge-b", Some("abuse@example.net"));
        assert!(
            message.starts_with("To: abuse@example.net\nSubject: netwatch: port scan from 198.18.0.1"),
            "{message}"
        );
        assert!(
            message.contains("seen by 2 sensors of a netwatch fleet (edge-a, edge-b)"),
            "{message}"
        );
        assert!(message.contains("edge-b #4: udp/137 inbound"), "{message}");
        let json_part = message.split("filename=\"report.json\"\n\n").nth(1).unwrap();
        let json_part = json_part.split("\n--netwatch-report").next().unwrap();
        assert_eq!(serde_json::from_str::<Value>(json_part).unwrap(), report);
    }
}
