//! Command-line interface.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

use crate::{
    datapath::tc::TcAttach,
    policy::{IfaceSpec, Mode, Rule, parse_cidr},
};

/// Count and drop NetBIOS (udp/137) and AOL/ICQ (tcp/5190) probes at line
/// rate with XDP and TC, and export what was seen to Prometheus.
#[derive(Debug, Parser)]
#[command(name = "netwatch", version, about, long_about = None)]
pub struct Cli {
    /// TOML configuration file: `run` and `check-config` read all of it,
    /// the other commands take `pin_dir` and `state_dir` from it. A
    /// missing default file means built-in defaults; a missing file given
    /// here is an error. [default: /etc/netwatch/netwatch.toml]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log lines as `text` or as `json` (one object per line; a flag's
    /// carries `source`, `rule`, `direction` and `incident`). [default:
    /// `log_format` of the config file, else text]
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    pub log_format: Option<crate::observe::logging::LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to interfaces and run in the foreground until SIGINT or
    /// SIGTERM; SIGHUP reloads rules, lists and mode from the config file.
    Run(RunArgs),
    /// Show attached interfaces, mode, rules and counters from the pinned
    /// maps (works while `run` is running, and after it stopped).
    Status(StatusArgs),
    /// Every incident of an IP address, newest first, and what the kernel
    /// tracks about it right now (also for sources not flagged).
    Lookup(LookupArgs),
    /// The busiest sources the kernel tracks right now.
    Top(TopArgs),
    /// Drop a source CIDR on rule ports (enforce mode), live.
    Block(BlockArgs),
    /// Remove a CIDR from the blocklist and lift auto-blocks inside it.
    Unblock(ListArgs),
    /// Never drop traffic from or to a CIDR, live.
    Allow(BlockArgs),
    /// Remove a CIDR from the allowlist.
    Disallow(ListArgs),
    /// Remove every program, link and pinned map netwatch made.
    Detach(PinDirArg),
    /// Incidents from the database, newest first.
    Incidents(IncidentsArgs),
    /// Check the configuration as `run` would, without attaching anything:
    /// exit 0 if it is valid, else non-zero with an error naming the
    /// setting (and, for TOML syntax, the line).
    CheckConfig(CheckConfigArgs),
    /// Write the man pages or the shell completions into DIR (packaging).
    #[command(hide = true)]
    Generate(GenerateArgs),
    /// Build a throwaway network-namespace lab, run netwatch and a real
    /// NetBIOS scanner in it, print what netwatch saw, and clean up.
    #[cfg(feature = "lab")]
    Lab(LabArgs),
}

#[derive(Debug, Args)]
pub struct PinDirArg {
    /// bpffs directory holding netwatch's pinned maps and links.
    /// [default: $NETWATCH_PIN_DIR, else `pin_dir` of the config file,
    /// else /sys/fs/bpf/netwatch]
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StateDirArg {
    /// Directory of the incident database. [default: $NETWATCH_STATE_DIR,
    /// else `state_dir` of the config file, else /var/lib/netwatch]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct IncidentsArgs {
    #[command(flatten)]
    pub state_dir: StateDirArg,
    /// Only incidents seen within this long, e.g. `30m`, `2h`, `7d`.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub since: Option<std::time::Duration>,
    /// Print JSON: {"incidents": [...]}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// Skip the checks against this host's network namespace (that every
    /// named interface exists and has a link type netwatch can parse):
    /// for checking a file written for another machine.
    #[arg(long)]
    pub offline: bool,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[arg(value_enum)]
    pub what: Generated,
    /// Directory to write into (created if missing).
    pub dir: PathBuf,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Generated {
    /// netwatch.8 and one page per subcommand (netwatch-run.8, ...).
    Man,
    /// netwatch.bash, _netwatch (zsh) and netwatch.fish.
    Completions,
}

#[derive(Debug, Args)]
pub struct LookupArgs {
    /// IPv4 or IPv6 address.
    pub ip: IpAddr,
    #[command(flatten)]
    pub pin_dir: PinDirArg,
    #[command(flatten)]
    pub state_dir: StateDirArg,
    /// Print JSON: {"ip", "incidents": [...], "tracked": [...]}; with
    /// --fleet {"ip", "incidents": [...]}, each incident with its `sensor`.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub fleet: FleetArg,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub pin_dir: PinDirArg,
    /// How many sources to show.
    #[arg(long, default_value_t = 10)]
    pub limit: usize,
    /// Print JSON: {"sources": [...]}; with --fleet, the sources seen by
    /// the most sensors, each with its `sensors` and `incidents`.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub fleet: FleetArg,
}

#[derive(Debug, Args)]
pub struct BlockArgs {
    /// CIDR or address.
    #[arg(value_parser = parse_net)]
    pub cidr: IpNet,
    /// How long the entry applies, e.g. `30m`, `2h`, `7d`; none = until removed.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ttl: Option<std::time::Duration>,
    #[command(flatten)]
    pub pin_dir: PinDirArg,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// CIDR or address.
    #[arg(value_parser = parse_net)]
    pub cidr: IpNet,
    #[command(flatten)]
    pub pin_dir: PinDirArg,
}

#[derive(Debug, Default, Args)]
pub struct RunArgs {
    /// Interface to attach XDP to, with its role: `wan` (router uplink,
    /// sees inbound), `lan` (router LAN side, sees outbound traffic with
    /// internal addresses), `host` (a host's own interface, inbound;
    /// the default). Repeatable.
    #[arg(long = "iface", value_name = "IFACE[:wan|lan|host]", value_parser = parse_iface)]
    pub interfaces: Vec<IfaceSpec>,
    /// Interface whose outgoing traffic (what this host sends) the TC
    /// egress program counts and filters. Repeatable.
    #[arg(long = "egress", value_name = "IFACE")]
    pub egress: Vec<String>,
    /// `monitor` counts only; `enforce` applies drop actions and the blocklist.
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Address of the Prometheus endpoint (/metrics). [default: 127.0.0.1:9737]
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_addr: Option<SocketAddr>,
    /// Rule `PROTO/PORT[=ACTION|=INBOUND,OUTBOUND]` with ACTION `count` or
    /// `drop` (default `drop`), e.g. `udp/138`, `tcp/445=count,drop`.
    /// Replaces the default rules (udp/137, tcp/5190). Repeatable.
    #[arg(long = "rule", value_name = "RULE", value_parser = parse_rule)]
    pub rules: Vec<Rule>,
    /// CIDR whose traffic (as source or destination) is never dropped. Repeatable.
    #[arg(long = "allow", value_name = "CIDR", value_parser = parse_net)]
    pub allowlist: Vec<IpNet>,
    /// Source CIDR dropped on rule ports in enforce mode. Repeatable.
    #[arg(long = "block", value_name = "CIDR", value_parser = parse_net)]
    pub blocklist: Vec<IpNet>,
    /// bpffs directory for pinned maps and links. [default:
    /// $NETWATCH_PIN_DIR, else `pin_dir` of the config file, else
    /// /sys/fs/bpf/netwatch]
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Directory of the incident database. [default: $NETWATCH_STATE_DIR,
    /// else `state_dir` of the config file, else /var/lib/netwatch]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Attach XDP in generic (SKB) mode without trying native mode first.
    #[arg(long)]
    pub xdp_generic: bool,
    /// Run even when the bpffs holding the pin directory is private to
    /// this process's mount namespace (as under `ip netns exec`): its pins
    /// vanish when netwatch exits. For throwaway set-ups (`netwatch lab`);
    /// without it such a bpffs is refused.
    #[arg(long)]
    pub allow_private_bpffs: bool,
    /// Leave the programs attached (counting and enforcing) when the
    /// controller exits; the next `run` re-adopts them, `detach` removes them.
    /// Also `keep_attached = true` in the config file.
    #[arg(long)]
    pub keep_attached: bool,
    /// How TC egress attaches: `auto` (TCX where the kernel has it, Linux
    /// 6.6+, else a clsact filter through netlink), `tcx` or `netlink`. [default: auto]
    #[arg(long, value_enum, value_name = "HOW")]
    pub tc_attach: Option<TcAttach>,
    /// Share incidents with a fleet of sensors through this NATS JetStream
    /// server (`nats://HOST:PORT`, several comma-separated). [default:
    /// `url` of the config file's [fleet] table; without either, no network
    /// code runs]
    #[arg(long, value_name = "URL")]
    pub fleet: Option<String>,
    /// This sensor's name in the fleet. [default: `sensor` of [fleet], else
    /// the host name]
    #[arg(long, value_name = "NAME")]
    pub sensor: Option<String>,
}

/// `--fleet [URL]` of the query commands.
#[derive(Debug, Default, Args)]
pub struct FleetArg {
    /// Ask the fleet (every sensor's incidents in NATS JetStream) instead
    /// of this host: at URL, or at `url` of the config file's [fleet] table.
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "")]
    pub fleet: Option<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub pin_dir: PinDirArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[cfg(feature = "lab")]
#[derive(Debug, Args)]
pub struct LabArgs {
    /// Keep running (metrics endpoint up) until Ctrl-C instead of cleaning
    /// up right after the demo.
    #[arg(long)]
    pub stay: bool,
}

fn parse_iface(s: &str) -> Result<IfaceSpec, String> {
    s.parse().map_err(|e: anyhow::Error| format!("{e:#}"))
}

fn parse_rule(s: &str) -> Result<Rule, String> {
    s.parse().map_err(|e: anyhow::Error| format!("{e:#}"))
}

/// A duration such as `90s`, `30m`, `2h`, `7d` (humantime's syntax).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 90s, 30m, 2h or 7d: {e}"))
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    parse_cidr(s).map_err(|e| format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::{CommandFactory as _, Parser as _};

    use super::*;

    #[test]
    fn durations_read_as_humans_write_them() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        let err = parse_duration("soon").unwrap_err();
        assert!(err.contains("\"soon\"") && err.contains("30m"), "{err}");
        assert!(parse_duration("10").is_err(), "a bare number has no unit");
    }

    #[test]
    fn config_is_a_global_flag() {
        let before = Cli::try_parse_from(["netwatch", "--config", "/a.toml", "status"]).unwrap();
        assert_eq!(before.config.as_deref(), Some(std::path::Path::new("/a.toml")));
        let after = Cli::try_parse_from(["netwatch", "incidents", "--since", "2h", "--config", "/b.toml"]).unwrap();
        assert_eq!(after.config.as_deref(), Some(std::path::Path::new("/b.toml")));
        match after.command {
            Command::Incidents(args) => assert_eq!(args.since, Some(Duration::from_secs(7200))),
            other => panic!("{other:?}"),
        }
        let bad = Cli::try_parse_from(["netwatch", "incidents", "--since", "later"]).unwrap_err();
        assert!(bad.to_string().contains("--since"), "{bad}");
        Cli::command().debug_assert();
    }
}
