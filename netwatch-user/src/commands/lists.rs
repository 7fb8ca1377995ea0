//! `block`, `unblock`, `allow`, `disallow`: change the lists live. The
//! entries are kept apart from the config's, so a config reload keeps
//! them; each change is installed as a new policy version (see
//! `install`), so it never races a reload.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use netwatch_common::LIST_FOREVER;

use crate::{
    cli::{BlockArgs, ListArgs},
    clock::{boot_rfc3339, boot_secs},
    datapath::PinnedMaps,
    datapath::{
        install::{self, CliChange},
        lists::ListKind,
    },
    detection::sources,
};

pub fn add(kind: ListKind, pin_dir: &Path, args: &BlockArgs) -> Result<()> {
    let maps = PinnedMaps::open(pin_dir)?;
    let until = match args.ttl {
        None => LIST_FOREVER,
        Some(ttl) if ttl.as_secs() == 0 => bail!("--ttl must be at least one second"),
        Some(ttl) => boot_secs()
            .saturating_add(u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX))
            .min(LIST_FOREVER - 1),
    };
    install::change_lists(
        &maps,
        CliChange::Add {
            kind,
            net: args.cidr,
            until,
        },
    )?;
    match until {
        LIST_FOREVER => println!("{}: added {}", kind.label(), args.cidr),
        t => println!("{}: added {} until {}", kind.label(), args.cidr, boot_rfc3339(t)),
    }
    Ok(())
}

pub fn disallow(pin_dir: &Path, args: &ListArgs) -> Result<()> {
    let maps = PinnedMaps::open(pin_dir)?;
    if !install::change_lists(
        &maps,
        CliChange::Remove {
            kind: ListKind::Allow,
            net: args.cidr,
        },
    )? {
        bail!("{} is not on the {}", args.cidr, ListKind::Allow.label());
    }
    println!("{}: removed {}", ListKind::Allow.label(), args.cidr);
    Ok(())
}

/// Off the blocklist, auto-blocks inside the CIDR lifted, and with a
/// fleet, the fleet's decisions for sources inside it lifted at every
/// sensor.
pub fn unblock(pin_dir: &Path, args: &ListArgs, fleet: Option<&crate::config::FleetConfig>) -> Result<()> {
    let maps = PinnedMaps::open(pin_dir)?;
    let kind = ListKind::Block;
    let removed = install::change_lists(&maps, CliChange::Remove { kind, net: args.cidr })?;
    let lifted = sources::lift_auto_blocks(&maps, args.cidr)?;
    if removed {
        println!("{}: removed {}", kind.label(), args.cidr);
    }
    if lifted > 0 {
        println!("lifted {lifted} auto-blocks inside {}", args.cidr);
    }
    let fleet_lifted = match fleet {
        Some(fleet) => crate::fleet::decisions::lift_decisions(fleet, args.cidr).with_context(|| {
            format!(
                "the fleet's decisions inside {} are not lifted (this sensor's blocks are)",
                args.cidr
            )
        })?,
        None => 0,
    };
    if fleet_lifted > 0 {
        println!(
            "lifted {fleet_lifted} fleet decisions inside {} at every sensor",
            args.cidr
        );
    }
    if !removed && lifted == 0 && fleet_lifted == 0 {
        bail!(
            "{} is not on the {} and no source in it is auto-blocked{}",
            args.cidr,
            kind.label(),
            if fleet.is_some() {
                " or decided on by the fleet"
            } else {
                ""
            }
        );
    }
    Ok(())
}
