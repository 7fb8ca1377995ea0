//! `netwatch check-config`: everything `run` checks before it attaches,
//! without attaching (systemd's ExecStartPre= and ExecReload= run it).

use anyhow::{Result, bail};

use crate::{
    cli::{CheckConfigArgs, RunArgs},
    commands::run::{check_interfaces, load_config},
    config::ConfigSource,
};

/// Checks, in order: the file exists and is valid TOML with known keys
/// (errors give the line); every setting is in range and consistent
/// (errors name the key: `rule[1] (tcp/5190)`, `allowlist[0]`, ...); at
/// least one interface is named; and, unless `--offline`, every named
/// interface exists in this network namespace with a link type netwatch
/// can parse. Not checked: whether bpffs is mounted, the metrics port is
/// free, or the kernel accepts the programs (that needs loading them).
pub fn check_config(source: &ConfigSource, args: &CheckConfigArgs) -> Result<()> {
    if !source.path.exists() {
        bail!("config file {} does not exist", source.path.display());
    }
    // No flags: the file alone, with the environment `run` would see.
    let none = RunArgs::default();
    let config = load_config(&none, source)?;
    if !args.offline {
        check_interfaces(&config)?;
    }
    let interfaces: Vec<String> = config
        .interfaces
        .iter()
        .map(|i| format!("{}:{}", i.name, i.role.label()))
        .collect();
    println!(
        "{}: OK: mode {}, interfaces [{}], egress [{}], {} rules, {} allowlist and {} blocklist entries, pin_dir {}, state_dir {}, metrics {}, keep_attached {}{}{}",
        source.path.display(),
        config.policy.mode.label(),
        interfaces.join(", "),
        config.egress.join(", "),
        config.policy.rules.len(),
        config.policy.allowlist.len(),
        config.policy.blocklist.len(),
        config.pin_dir.display(),
        config.state_dir.display(),
        config.metrics_addr,
        config.keep_attached,
        config
            .fleet
            .as_ref()
            .map(|f| format!(", fleet: sensor {} at {}", f.sensor, f.url))
            .unwrap_or_default(),
        if args.offline {
            " (interfaces not checked: --offline)"
        } else {
            ""
        }
    );
    Ok(())
}
