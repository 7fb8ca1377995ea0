//! The Grafana dashboard and the alert rules shipped in `deploy/`, read
//! the way the tests and the chart step use them.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn dashboard() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(repo().join("deploy/grafana/netwatch.json")).unwrap()).unwrap()
}

/// Every PromQL expression of the dashboard, with Grafana's variables
/// replaced by what a real query would carry.
pub fn dashboard_queries() -> Vec<(String, String)> {
    let d = dashboard();
    let mut out = Vec::new();
    for panel in d["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            out.push((
                panel["title"].as_str().unwrap().to_string(),
                target["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

pub fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$__range", "5m")
        .replace("$job", "netwatch")
        .replace("$instance", ".*")
        .replace("$interface", ".*")
        .replace("$rule", ".*")
        .replace("$direction", ".*")
}

/// Metric names an expression uses (ours, the process collector's, `up`).
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_alphabetic() || bytes[i] == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let word = &expr[start..i];
            let quoted = start > 0 && matches!(bytes[start - 1], b'"' | b'$');
            if !quoted && (word.starts_with("netwatch_") || word.starts_with("process_") || word == "up") {
                names.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    names
}

pub fn alert_rules() -> Vec<(String, String)> {
    // The rules file is small, regular YAML: take `alert:` and `expr:`
    // (inline or `|` block) pairs.
    let text = std::fs::read_to_string(repo().join("deploy/prometheus/netwatch.rules.yml")).unwrap();
    let mut rules = Vec::new();
    let mut lines = text.lines().peekable();
    let mut name = String::new();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if let Some(n) = t.strip_prefix("- alert:") {
            name = n.trim().to_string();
        } else if let Some(e) = t.strip_prefix("expr:") {
            let e = e.trim();
            let expr = if e == "|" {
                let mut block = Vec::new();
                while let Some(next) = lines.peek() {
                    if next.trim().is_empty() || !next.starts_with("          ") {
                        break;
                    }
                    block.push(lines.next().unwrap().trim().to_string());
                }
                block.join(" ")
            } else {
                e.to_string()
            };
            rules.push((name.clone(), expr));
        }
    }
    rules
}
