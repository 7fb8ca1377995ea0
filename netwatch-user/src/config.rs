//! The TOML configuration file and how `netwatch run` flags override it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use crate::datapath::tc::TcAttach;

use crate::policy::{
    Action, DEFAULT_BLOCK_SECS, DEFAULT_VISITOR_SECS, DEFAULT_WEB_PORTS, IfaceSpec, Mode, Policy, Rule, default_rules,
    parse_cidr, parse_port, parse_protocol,
};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/netwatch";
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9737";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/netwatch";
pub const DEFAULT_CONFIG: &str = "/etc/netwatch/netwatch.toml";
pub const PIN_DIR_ENV: &str = "NETWATCH_PIN_DIR";
pub const STATE_DIR_ENV: &str = "NETWATCH_STATE_DIR";

/// Which config file the command line names: `--config FILE`, or the
/// default path (which may be absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigSource {
    pub path: PathBuf,
    /// Given with `--config`: a missing file is an error.
    pub explicit: bool,
}

impl ConfigSource {
    pub fn new(flag: Option<&Path>) -> Self {
        match flag {
            Some(path) => ConfigSource {
                path: path.to_path_buf(),
                explicit: true,
            },
            None => ConfigSource {
                path: DEFAULT_CONFIG.into(),
                explicit: false,
            },
        }
    }

    /// The parsed file; `None` when the default file does not exist.
    pub fn load(&self) -> Result<Option<ConfigFile>> {
        if !self.explicit && !self.path.exists() {
            return Ok(None);
        }
        ConfigFile::load(&self.path).map(Some)
    }
}

/// Where a directory setting comes from: the flag, else the environment
/// variable, else the config file, else the built-in default.
pub fn resolve_dir(flag: Option<&Path>, env: Option<&std::ffi::OsStr>, file: Option<&Path>, default: &str) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| env.filter(|v| !v.is_empty()).map(PathBuf::from))
        .or_else(|| file.map(Path::to_path_buf))
        .unwrap_or_else(|| default.into())
}

/// `pin_dir` and `state_dir` for the commands that read what `run` left:
/// flag > `NETWATCH_PIN_DIR` / `NETWATCH_STATE_DIR` > config file >
/// default. The file is read only when a flag or variable leaves a
/// setting open, and at most once.
pub struct Dirs<'a> {
    source: &'a ConfigSource,
    file: std::cell::OnceCell<Option<ConfigFile>>,
}

impl<'a> Dirs<'a> {
    pub fn new(source: &'a ConfigSource) -> Self {
        Dirs {
            source,
            file: std::cell::OnceCell::new(),
        }
    }

    fn file(&self) -> Result<Option<&ConfigFile>> {
        if self.file.get().is_none() {
            let _ = self.file.set(self.source.load()?);
        }
        Ok(self.file.get().and_then(Option::as_ref))
    }

    fn resolve(
        &self,
        flag: Option<&Path>,
        env: &str,
        key: fn(&ConfigFile) -> Option<&Path>,
        default: &str,
    ) -> Result<PathBuf> {
        let env = std::env::var_os(env).filter(|v| !v.is_empty());
        let file = if flag.is_some() || env.is_some() {
            None
        } else {
            self.file()?.and_then(key)
        };
        Ok(resolve_dir(flag, env.as_deref(), file, default))
    }

    pub fn pin_dir(&self, flag: Option<&Path>) -> Result<PathBuf> {
        self.resolve(flag, PIN_DIR_ENV, |f| f.pin_dir.as_deref(), DEFAULT_PIN_DIR)
    }

    pub fn state_dir(&self, flag: Option<&Path>) -> Result<PathBuf> {
        self.resolve(flag, STATE_DIR_ENV, |f| f.state_dir.as_deref(), DEFAULT_STATE_DIR)
    }

    /// The `[fleet]` table of the config file, if any.
    pub fn fleet(&self) -> Result<Option<&FleetEntry>> {
        Ok(self.file()?.and_then(|f| f.fleet.as_ref()))
    }
}

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
    /// Leave the programs attached when the controller exits (service
    /// restarts and package upgrades keep enforcing).
    pub keep_attached: Option<bool>,
    /// How TC egress attaches: `auto` (TCX where the kernel has it, else
    /// netlink), `tcx` or `netlink`.
    pub tc_attach: Option<TcAttach>,
    /// Incidents last seen more than this many days ago are deleted.
    pub incident_retention_days: Option<i64>,
    /// New incidents per rule and direction in one minute before further
    /// sources are counted into one summary incident (a spoofed flood).
    pub incidents_per_minute: Option<i64>,
    /// `text` or `json` log lines.
    pub log_format: Option<crate::observe::logging::LogFormat>,
    /// A fleet of sensors sharing incidents through NATS JetStream.
    pub fleet: Option<FleetEntry>,
}

/// The `[fleet]` table as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetEntry {
    pub url: String,
    /// A NATS credentials file (user JWT and NKey seed).
    pub credentials: Option<PathBuf>,
    /// This sensor's name in the fleet [default: the host name].
    pub sensor: Option<String>,
    /// Distinct sensors whose incidents of a source confirm it.
    pub confirm_sensors: Option<i64>,
    /// Within how long those incidents were last seen.
    pub confirm_window_secs: Option<i64>,
    /// How long a fleet decision blocks.
    pub decision_secs: Option<i64>,
    /// Enforce mode: apply the fleet's decisions to the kernel's blocks.
    pub apply_decisions: Option<bool>,
    /// Decisions applied per /24 (IPv4) or /64 (IPv6) at most.
    pub decisions_per_prefix: Option<i64>,
    /// Decisions applied at once at most, in all.
    pub decisions_max: Option<i64>,
    /// How long a fleet decision on a UDP rule blocks (shorter: UDP
    /// sources are easily spoofed).
    pub udp_decision_secs: Option<i64>,
    /// Sources (CIDRs) the fleet never decides on.
    pub allowlist: Option<Vec<String>>,
    /// Copies of the fleet's streams a JetStream cluster keeps.
    pub stream_replicas: Option<i64>,
    /// A command (argv, no shell) that reads a report about every source
    /// this sensor confirms on its standard input, e.g. sendmail -t.
    pub report_command: Option<Vec<String>>,
    /// The reports' `To:` header.
    pub report_to: Option<String>,
}

/// When a source flagged by several sensors becomes a fleet decision, and
/// what a sensor does with the decisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confirmation {
    pub sensors: u32,
    pub window: std::time::Duration,
    pub block: std::time::Duration,
    pub apply: bool,
    pub per_prefix: u32,
    /// Decisions applied at once at most (`decisions_max`).
    pub max_applied: u32,
    /// The block of a decision on a UDP rule (`udp_decision_secs`).
    pub udp_block: std::time::Duration,
    /// `fleet.allowlist`: no decision made or applied for these.
    pub allowlist: Vec<ipnet::IpNet>,
}

impl Default for Confirmation {
    fn default() -> Self {
        Confirmation {
            sensors: 2,
            window: std::time::Duration::from_secs(3600),
            block: std::time::Duration::from_secs(3600),
            apply: true,
            per_prefix: 16,
            max_applied: 512,
            udp_block: std::time::Duration::from_secs(900),
            allowlist: Vec::new(),
        }
    }
}

impl Confirmation {
    fn build(entry: Option<&FleetEntry>) -> Result<Self> {
        let mut c = Confirmation::default();
        let Some(e) = entry else { return Ok(c) };
        let ranged = |key: &str, v: Option<i64>, range: std::ops::RangeInclusive<i64>, default: u64| -> Result<u64> {
            match v {
                None => Ok(default),
                Some(v) if range.contains(&v) => Ok(v as u64),
                Some(v) => bail!(
                    "fleet.{key} = {v}: give a number from {} to {}",
                    range.start(),
                    range.end()
                ),
            }
        };
        c.sensors = ranged("confirm_sensors", e.confirm_sensors, 2..=1000, c.sensors as u64)? as u32;
        c.window = std::time::Duration::from_secs(ranged(
            "confirm_window_secs",
            e.confirm_window_secs,
            60..=7 * 86400,
            c.window.as_secs(),
        )?);
        c.block = std::time::Duration::from_secs(ranged(
            "decision_secs",
            e.decision_secs,
            60..=7 * 86400,
            c.block.as_secs(),
        )?);
        c.per_prefix = ranged(
            "decisions_per_prefix",
            e.decisions_per_prefix,
            1..=256,
            c.per_prefix as u64,
        )? as u32;
        c.max_applied = ranged("decisions_max", e.decisions_max, 1..=1024, c.max_applied as u64)? as u32;
        let udp_default = c.udp_block.min(c.block).as_secs();
        c.udp_block = std::time::Duration::from_secs(ranged(
            "udp_decision_secs",
            e.udp_decision_secs,
            60..=c.block.as_secs() as i64,
            udp_default,
        )?);
        c.allowlist = e
            .allowlist
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, s)| parse_cidr(s).with_context(|| format!("fleet.allowlist[{i}]")))
            .collect::<Result<_>>()?;
        c.apply = e.apply_decisions.unwrap_or(true);
        Ok(c)
    }
}

impl Confirmation {
    pub fn allowlisted(&self, source: std::net::IpAddr) -> bool {
        self.allowlist.iter().any(|net| net.contains(&source))
    }

    /// How long a decision on `rule` ("udp/137") blocks: UDP evidence,
    /// easily spoofed, for `udp_decision_secs`.
    pub fn block_for(&self, rule: &str) -> std::time::Duration {
        if rule.starts_with("udp/") {
            self.udp_block
        } else {
            self.block
        }
    }
}

/// Where a sensor reports to, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetConfig {
    /// One or more NATS server URLs, comma-separated.
    pub url: String,
    pub credentials: Option<PathBuf>,
    pub sensor: String,
    pub confirmation: Confirmation,
    /// `stream_replicas`: copies of the streams a sensor creates.
    pub replicas: usize,
    /// `report_command` and `report_to`.
    pub report: Option<(Vec<String>, Option<String>)>,
}

impl FleetConfig {
    /// `url` and `credentials` from the flag or the file, `sensor` from
    /// the flag, the file or the host name; errors name the setting.
    pub fn build(url: &str, credentials: Option<PathBuf>, sensor: Option<&str>) -> Result<Self> {
        check_fleet_url(url)?;
        let sensor = match sensor {
            Some(name) => name.to_string(),
            None => default_sensor_name().context("fleet.sensor is not set and the host name cannot be read")?,
        };
        check_sensor_name(&sensor)?;
        Ok(FleetConfig {
            url: url.to_string(),
            credentials,
            sensor,
            confirmation: Confirmation::default(),
            replicas: 1,
            report: None,
        })
    }
}

/// Every comma-separated part is a NATS server address.
pub fn check_fleet_url(url: &str) -> Result<()> {
    if url.trim().is_empty() {
        bail!("fleet.url is empty: give a NATS server URL such as nats://hub.example:4222");
    }
    for part in url.split(',') {
        part.trim()
            .parse::<async_nats::ServerAddr>()
            .map_err(|e| anyhow::anyhow!("fleet.url {part:?} is not a NATS server URL (nats://HOST:PORT): {e}"))?;
    }
    Ok(())
}

/// A sensor's name is one token of the NATS subjects it publishes on.
pub fn check_sensor_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        bail!("fleet.sensor {name:?}: give 1 to 64 letters, digits, '-' or '_'");
    }
    Ok(())
}

/// The host name up to its first dot.
fn default_sensor_name() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    Ok(name.trim().split('.').next().unwrap_or_default().to_string())
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
    /// Failed first contacts (beyond answered ones) that flag a source;
    /// 0 turns reply-aware flagging off.
    pub failed_contacts: Option<i64>,
    /// Seconds a first contact waits for its answer.
    pub contact_secs: Option<i64>,
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
    pub keep_attached: bool,
    pub tc_attach: Option<TcAttach>,
    /// `--fleet URL`
    pub fleet_url: Option<String>,
    /// `--sensor NAME`
    pub sensor: Option<String>,
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
    pub keep_attached: bool,
    /// `incident_retention_days`.
    pub incident_retention: std::time::Duration,
    /// `incidents_per_minute`.
    pub incidents_per_minute: u32,
    /// `[fleet]` or `--fleet`: none, no network code runs.
    pub fleet: Option<FleetConfig>,
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
                    if let Some(f) = e.failed_contacts {
                        d.failed_contacts = secs("failed_contacts", f)?;
                    }
                    if let Some(c) = e.contact_secs {
                        d.contact_secs = secs("contact_secs", c)?;
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
        let retention_days = match file.incident_retention_days {
            None => crate::detection::incidents::DEFAULT_RETENTION_DAYS,
            Some(d) if (1..=36500).contains(&d) => d as u32,
            Some(d) => bail!("incident_retention_days = {d}: give a number of days from 1 to 36500"),
        };
        let incidents_per_minute = match file.incidents_per_minute {
            None => crate::detection::incidents::AGGREGATE_AFTER,
            Some(n) if (1..=1_000_000).contains(&n) => n as u32,
            Some(n) => bail!("incidents_per_minute = {n}: give a number from 1 to 1000000"),
        };
        let fleet_file = file.fleet.as_ref();
        let confirmation = Confirmation::build(fleet_file)?;
        let replicas = match fleet_file.and_then(|f| f.stream_replicas) {
            None => 1,
            Some(n) if (1..=5).contains(&n) => n as usize,
            Some(n) => bail!("fleet.stream_replicas = {n}: give 1 to 5 (JetStream's limit)"),
        };
        let report = match fleet_file.and_then(|f| f.report_command.clone()) {
            None => None,
            Some(command) if command.is_empty() || command[0].is_empty() => {
                bail!(
                    "fleet.report_command is empty: give the command and its arguments, e.g. [\"/usr/sbin/sendmail\", \"-t\"]"
                )
            }
            Some(command) => Some((command, fleet_file.and_then(|f| f.report_to.clone()))),
        };
        let fleet = match (&flags.fleet_url, fleet_file) {
            (Some(url), _) => Some(FleetConfig::build(
                url,
                fleet_file.and_then(|f| f.credentials.clone()),
                flags.sensor.as_deref().or(fleet_file.and_then(|f| f.sensor.as_deref())),
            )?),
            (None, Some(f)) => Some(FleetConfig::build(
                &f.url,
                f.credentials.clone(),
                flags.sensor.as_deref().or(f.sensor.as_deref()),
            )?),
            (None, None) if flags.sensor.is_some() => {
                bail!("--sensor names this sensor in a fleet: give --fleet URL or a [fleet] table too")
            }
            (None, None) => None,
        }
        .map(|fleet| FleetConfig {
            confirmation,
            replicas,
            report,
            ..fleet
        });
        Ok(RunConfig {
            fleet,
            incident_retention: std::time::Duration::from_secs(retention_days as u64 * 86400),
            incidents_per_minute,
            metrics_addr,
            pin_dir,
            state_dir,
            interfaces,
            egress,
            tc_attach: flags.tc_attach.or(file.tc_attach).unwrap_or_default(),
            policy,
            keep_attached: flags.keep_attached || file.keep_attached.unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{ffi::OsStr, path::Path};

    use super::*;

    #[test]
    fn a_directory_comes_from_the_flag_then_the_environment_then_the_file_then_the_default() {
        let (flag, env, file) = (Some(Path::new("/f")), Some(OsStr::new("/e")), Some(Path::new("/c")));
        assert_eq!(resolve_dir(flag, env, file, "/d"), Path::new("/f"));
        assert_eq!(resolve_dir(None, env, file, "/d"), Path::new("/e"));
        assert_eq!(resolve_dir(None, None, file, "/d"), Path::new("/c"));
        assert_eq!(resolve_dir(None, None, None, "/d"), Path::new("/d"));
        // An empty variable is as good as unset.
        assert_eq!(resolve_dir(None, Some(OsStr::new("")), file, "/d"), Path::new("/c"));
        assert_eq!(resolve_dir(flag, None, None, "/d"), Path::new("/f"));
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("netwatch-config-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("netwatch.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_commands_take_pin_dir_and_state_dir_from_the_config_file() {
        // Tests run in parallel: this one does not depend on the variables
        // being unset, it only checks the file's part when they are.
        if std::env::var_os(PIN_DIR_ENV).is_some() || std::env::var_os(STATE_DIR_ENV).is_some() {
            return;
        }
        let path = temp_file("dirs", "pin_dir = \"/sys/fs/bpf/nw-conf\"\nstate_dir = \"/srv/nw\"\n");
        let source = ConfigSource::new(Some(&path));
        let dirs = Dirs::new(&source);
        assert_eq!(dirs.pin_dir(None).unwrap(), Path::new("/sys/fs/bpf/nw-conf"));
        assert_eq!(dirs.state_dir(None).unwrap(), Path::new("/srv/nw"));
        assert_eq!(dirs.pin_dir(Some(Path::new("/x"))).unwrap(), Path::new("/x"));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_missing_default_config_means_defaults_and_a_missing_given_one_is_an_error() {
        let absent = Path::new("/nonexistent/netwatch.toml");
        let implicit = ConfigSource {
            path: absent.into(),
            explicit: false,
        };
        assert!(implicit.load().unwrap().is_none());
        let explicit = ConfigSource::new(Some(absent));
        let err = format!("{:#}", explicit.load().unwrap_err());
        assert!(err.contains("/nonexistent/netwatch.toml"), "{err}");
        // A flag never reads the file, so a broken file does not matter.
        let broken = temp_file("broken", "pin_dir = [\n");
        let source = ConfigSource::new(Some(&broken));
        let dirs = Dirs::new(&source);
        assert_eq!(dirs.pin_dir(Some(Path::new("/p"))).unwrap(), Path::new("/p"));
        if std::env::var_os(STATE_DIR_ENV).is_none() {
            let err = format!("{:#}", dirs.state_dir(None).unwrap_err());
            assert!(err.contains("line 1"), "{err}");
        }
        std::fs::remove_dir_all(broken.parent().unwrap()).unwrap();
    }

    #[test]
    fn incident_retention_and_summaries_have_defaults_and_errors_name_the_setting() {
        let config = RunConfig::build(None, &Overrides::default()).unwrap();
        assert_eq!(config.incident_retention.as_secs(), 90 * 86400);
        assert_eq!(config.incidents_per_minute, 60);
        let file = ConfigFile::parse("incident_retention_days = 7\nincidents_per_minute = 500\n").unwrap();
        let config = RunConfig::build(Some(&file), &Overrides::default()).unwrap();
        assert_eq!(config.incident_retention.as_secs(), 7 * 86400);
        assert_eq!(config.incidents_per_minute, 500);
        for (text, key) in [
            ("incident_retention_days = 0\n", "incident_retention_days"),
            ("incidents_per_minute = -1\n", "incidents_per_minute"),
        ] {
            let file = ConfigFile::parse(text).unwrap();
            let err = format!(
                "{:#}",
                RunConfig::build(Some(&file), &Overrides::default()).unwrap_err()
            );
            assert!(err.contains(key), "{err}");
        }
        let err = ConfigFile::parse("log_format = \"xml\"\n").unwrap_err().to_string();
        assert!(err.contains("log_format"), "{err}");
        assert_eq!(
            ConfigFile::parse("log_format = \"json\"\n").unwrap().log_format,
            Some(crate::observe::logging::LogFormat::Json)
        );
    }

    #[test]
    fn keep_attached_comes_from_the_flag_or_the_file() {
        let file = ConfigFile::parse("keep_attached = true\ninterfaces = [\"eth0\"]\n").unwrap();
        assert!(
            RunConfig::build(Some(&file), &Overrides::default())
                .unwrap()
                .keep_attached
        );
        assert!(!RunConfig::build(None, &Overrides::default()).unwrap().keep_attached);
        let flags = Overrides {
            keep_attached: true,
            ..Overrides::default()
        };
        assert!(RunConfig::build(None, &flags).unwrap().keep_attached);
        let err = ConfigFile::parse("keep_attached = \"yes\"\n").unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("keep_attached"), "{err}");
    }

    #[test]
    fn no_fleet_without_a_setting_and_bad_fleet_values_name_the_setting() {
        assert_eq!(RunConfig::build(None, &Overrides::default()).unwrap().fleet, None);
        let file = ConfigFile::parse("[fleet]\nurl = \"nats://hub.example:4222\"\nsensor = \"edge-1\"\ncredentials = \"/etc/netwatch/edge-1.creds\"\n").unwrap();
        let fleet = RunConfig::build(Some(&file), &Overrides::default())
            .unwrap()
            .fleet
            .unwrap();
        assert_eq!(
            fleet,
            FleetConfig {
                url: "nats://hub.example:4222".into(),
                credentials: Some("/etc/netwatch/edge-1.creds".into()),
                sensor: "edge-1".into(),
                confirmation: Confirmation::default(),
                replicas: 1,
                report: None,
            }
        );
        // The flags win over the file; the file's credentials stay.
        let flags = Overrides {
            fleet_url: Some("nats://10.0.0.1:4222,nats://10.0.0.2:4222".into()),
            sensor: Some("edge-2".into()),
            ..Overrides::default()
        };
        let fleet = RunConfig::build(Some(&file), &flags).unwrap().fleet.unwrap();
        assert_eq!(
            (fleet.url.as_str(), fleet.sensor.as_str()),
            ("nats://10.0.0.1:4222,nats://10.0.0.2:4222", "edge-2")
        );
        assert!(fleet.credentials.is_some());
        // The sensor's name defaults to the host name (its first label).
        let flags = Overrides {
            fleet_url: Some("nats://127.0.0.1:4222".into()),
            ..Overrides::default()
        };
        let sensor = RunConfig::build(None, &flags).unwrap().fleet.unwrap().sensor;
        assert!(!sensor.is_empty() && !sensor.contains('.'), "{sensor}");
        for (text, flags, says) in [
            (
                "[fleet]\nurl = \"http://hub:4222\"\n",
                Overrides::default(),
                "fleet.url",
            ),
            ("[fleet]\nurl = \"\"\n", Overrides::default(), "fleet.url"),
            (
                "[fleet]\nurl = \"nats://hub:4222\"\nsensor = \"a.b\"\n",
                Overrides::default(),
                "fleet.sensor",
            ),
            (
                "",
                Overrides {
                    sensor: Some("a".into()),
                    ..Overrides::default()
                },
                "--fleet",
            ),
            (
                "",
                Overrides {
                    fleet_url: Some("nats://hub:99999".into()),
                    ..Overrides::default()
                },
                "fleet.url",
            ),
        ] {
            let file = ConfigFile::parse(text).unwrap();
            let err = format!("{:#}", RunConfig::build(Some(&file), &flags).unwrap_err());
            assert!(err.contains(says), "{text:?}: {err}");
        }
        let err = ConfigFile::parse("[fleet]\nurl = \"nats://hub:4222\"\nuser = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("user"), "{err}");
    }
}
