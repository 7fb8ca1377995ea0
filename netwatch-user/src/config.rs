//! The TOML configuration file and how `netwatch run` flags override it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use crate::tc::TcAttach;

use crate::policy::{
    Action, DEFAULT_BLOCK_SECS, DEFAULT_VISITOR_SECS, DEFAULT_WEB_PORTS, IfaceSpec, Mode, Policy, Rule, default_rules,
    parse_cidr, parse_port, parse_protocol,
};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/netwatch";
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9737";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/netwatch";

/// The file as written. Every key is optional; unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub mode: Option<Mode>,
    pub metrics_addr: Option<String>,
    pub pin_dir: Option<PathBuf>,
    /// `["eth0:wan", "eth1:lan"]`
    pub interfaces: Option<Vec<String>>,
    /// Interfaces whose outgoing traffic the TC egress program sees.
    pub egress: Option<Vec<String>>,
    #[serde(rename = "rule")]
    pub rules: Option<Vec<RuleEntry>>,
    pub allowlist: Option<Vec<String>>,
    pub blocklist: Option<Vec<String>>,
    /// Where the incident database lives.
    pub state_dir: Option<PathBuf>,
    /// TCP ports whose visitors' NetBIOS lookups are reverse lookups.
    pub web_ports: Option<Vec<i64>>,
    pub visitor_secs: Option<i64>,
    /// How TC egress attaches: `auto` (TCX where the kernel has it, else
    /// netlink), `tcx` or `netlink`.
    pub tc_attach: Option<TcAttach>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleEntry {
    pub protocol: String,
    pub port: i64,
    #[serde(default = "drop_action")]
    pub inbound: Action,
    #[serde(default = "drop_action")]
    pub outbound: Action,
    /// Distinct destinations in the window that flag a source.
    pub threshold: Option<i64>,
    pub window_secs: Option<i64>,
    /// Auto-block flagged sources on this port (enforce mode only).
    #[serde(default)]
    pub auto_block: bool,
    pub block_secs: Option<i64>,
}

/// A non-negative integer that fits u32, or an error naming the key.
fn secs(key: &str, v: i64) -> Result<u32> {
    u32::try_from(v).map_err(|_| anyhow::anyhow!("{key} = {v} is out of range"))
}

fn drop_action() -> Action {
    Action::Drop
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        Ok(toml::from_str(text)?)
    }
}

/// What the flags of `netwatch run` say; `None` / empty means "not given".
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub mode: Option<Mode>,
    pub metrics_addr: Option<SocketAddr>,
    pub pin_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub interfaces: Vec<IfaceSpec>,
    pub egress: Vec<String>,
    pub rules: Vec<Rule>,
    pub allowlist: Vec<ipnet::IpNet>,
    pub blocklist: Vec<ipnet::IpNet>,
    pub tc_attach: Option<TcAttach>,
}

/// The merged, validated configuration of a running controller.
#[derive(Clone, Debug, PartialEq)]
pub struct RunConfig {
    pub metrics_addr: SocketAddr,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub interfaces: Vec<IfaceSpec>,
    pub egress: Vec<String>,
    pub tc_attach: TcAttach,
    pub policy: Policy,
}

impl RunConfig {
    /// Merges a file (if any) with flags: a flag given replaces the file's
    /// value, list flags replace the whole list.
    pub fn build(file: Option<&ConfigFile>, flags: &Overrides) -> Result<Self> {
        let empty = ConfigFile::default();
        let file = file.unwrap_or(&empty);

        let interfaces = if !flags.interfaces.is_empty() {
            flags.interfaces.clone()
        } else {
            let mut out = Vec::new();
            for (i, spec) in file.interfaces.iter().flatten().enumerate() {
                out.push(spec.parse().with_context(|| format!("interfaces[{i}]"))?);
            }
            out
        };
        let egress = if !flags.egress.is_empty() {
            flags.egress.clone()
        } else {
            file.egress.clone().unwrap_or_default()
        };
        for (i, name) in egress.iter().enumerate() {
            let spec: IfaceSpec = name.parse().with_context(|| format!("egress[{i}]"))?;
            if spec.name != *name {
                bail!("egress[{i}] = {name:?}: egress interfaces take no role");
            }
        }
        for (i, spec) in interfaces.iter().enumerate() {
            if interfaces[..i].iter().any(|s| s.name == spec.name) {
                bail!("interface {} is given twice", spec.name);
            }
        }

        let rules = if !flags.rules.is_empty() {
            flags.rules.clone()
        } else if let Some(entries) = &file.rules {
            let mut rules = Vec::new();
            for (i, e) in entries.iter().enumerate() {
                let rule = (|| -> Result<Rule> {
                    let protocol = parse_protocol(&e.protocol)?;
                    let port = parse_port(&e.port.to_string())?;
                    let mut rule = Rule::new(protocol, port, e.inbound, e.outbound)?;
                    let d = &mut rule.detection;
                    if let Some(t) = e.threshold {
                        d.threshold = secs("threshold", t)?;
                    }
                    if let Some(w) = e.window_secs {
                        d.window_secs = secs("window_secs", w)?;
                    }
                    if let Some(b) = e.block_secs {
                        if !e.auto_block {
                            bail!("block_secs is set but auto_block is not");
                        }
                        d.block_secs = Some(secs("block_secs", b)?);
                    } else if e.auto_block {
                        d.block_secs = Some(DEFAULT_BLOCK_SECS);
                    }
                    d.validate()?;
                    Ok(rule)
                })()
                .with_context(|| format!("rule[{i}] ({}/{})", e.protocol, e.port))?;
                rules.push(rule);
            }
            rules
        } else {
            default_rules()
        };

        let list = |flag: &Vec<ipnet::IpNet>, file: &Option<Vec<String>>, name: &str| -> Result<Vec<ipnet::IpNet>> {
            if !flag.is_empty() {
                return Ok(flag.clone());
            }
            file.iter()
                .flatten()
                .enumerate()
                .map(|(i, s)| parse_cidr(s).with_context(|| format!("{name}[{i}]")))
                .collect()
        };
        let web_ports = match &file.web_ports {
            None => DEFAULT_WEB_PORTS.to_vec(),
            Some(ports) => ports
                .iter()
                .enumerate()
                .map(|(i, p)| parse_port(&p.to_string()).with_context(|| format!("web_ports[{i}]")))
                .collect::<Result<_>>()?,
        };
        let visitor_secs = match file.visitor_secs {
            None => DEFAULT_VISITOR_SECS,
            Some(v) => secs("visitor_secs", v)?,
        };
        let policy = Policy {
            mode: flags.mode.or(file.mode).unwrap_or_default(),
            rules,
            allowlist: list(&flags.allowlist, &file.allowlist, "allowlist")?,
            blocklist: list(&flags.blocklist, &file.blocklist, "blocklist")?,
            web_ports,
            visitor_secs,
        };
        policy.validate()?;

        let metrics_addr = match (flags.metrics_addr, &file.metrics_addr) {
            (Some(addr), _) => addr,
            (None, Some(s)) => s
                .parse()
                .with_context(|| format!("metrics_addr {s:?} is not ADDRESS:PORT"))?,
            (None, None) => DEFAULT_METRICS_ADDR.parse()?,
        };
        let pin_dir = flags
            .pin_dir
            .clone()
            .or_else(|| file.pin_dir.clone())
            .unwrap_or_else(|| DEFAULT_PIN_DIR.into());
        if !pin_dir.is_absolute() {
            bail!("pin_dir {} must be an absolute path on bpffs", pin_dir.display());
        }
        let state_dir = flags
            .state_dir
            .clone()
            .or_else(|| file.state_dir.clone())
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        Ok(RunConfig {
            metrics_addr,
            pin_dir,
            state_dir,
            interfaces,
            egress,
            tc_attach: flags.tc_attach.or(file.tc_attach).unwrap_or_default(),
            policy,
        })
    }
}
