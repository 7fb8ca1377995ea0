//! Command-line interface.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

use crate::{
    config::{DEFAULT_PIN_DIR, DEFAULT_STATE_DIR},
    policy::{IfaceSpec, Mode, Rule, parse_cidr},
    tc::TcAttach,
};

/// Count and drop NetBIOS (udp/137) and AOL/ICQ (tcp/5190) probes at line
/// rate with XDP and TC, and export what was seen to Prometheus.
#[derive(Debug, Parser)]
#[command(name = "netwatch", version, about, long_about = None)]
pub struct Cli {
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
    /// Build a throwaway network-namespace lab, run netwatch and a real
    /// NetBIOS scanner in it, print what netwatch saw, and clean up.
    Lab(LabArgs),
}

#[derive(Debug, Args)]
pub struct PinDirArg {
    /// bpffs directory holding netwatch's pinned maps and links.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR, env = "NETWATCH_PIN_DIR")]
    pub pin_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct StateDirArg {
    /// Directory of the incident database.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR, env = "NETWATCH_STATE_DIR")]
    pub state_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct LookupArgs {
    /// IPv4 or IPv6 address.
    pub ip: IpAddr,
    #[command(flatten)]
    pub pin_dir: PinDirArg,
    #[command(flatten)]
    pub state_dir: StateDirArg,
    /// Print JSON: {"ip", "incidents": [...], "tracked": [...]}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub pin_dir: PinDirArg,
    /// How many sources to show.
    #[arg(long, default_value_t = 10)]
    pub limit: usize,
    /// Print JSON: {"sources": [...]}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BlockArgs {
    /// CIDR or address.
    #[arg(value_parser = parse_net)]
    pub cidr: IpNet,
    /// How long the entry applies, e.g. `30m`, `2h`, `7d`; none = until removed.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
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

#[derive(Debug, Args)]
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
    /// TOML configuration file; flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
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
    /// bpffs directory for pinned maps and links. [default: /sys/fs/bpf/netwatch]
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Directory of the incident database. [default: /var/lib/netwatch]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Attach XDP in generic (SKB) mode without trying native mode first.
    #[arg(long)]
    pub xdp_generic: bool,
    /// Leave the programs attached (counting and enforcing) when the
    /// controller exits; the next `run` re-adopts them, `detach` removes them.
    #[arg(long)]
    pub keep_attached: bool,
    /// How TC egress attaches: `auto` (TCX where the kernel has it, Linux
    /// 6.6+, else a clsact filter through netlink), `tcx` or `netlink`. [default: auto]
    #[arg(long, value_enum, value_name = "HOW")]
    pub tc_attach: Option<TcAttach>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub pin_dir: PinDirArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

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

fn parse_net(s: &str) -> Result<IpNet, String> {
    parse_cidr(s).map_err(|e| format!("{e:#}"))
}
