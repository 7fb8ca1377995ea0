//! `block`, `unblock`, `allow`, `disallow`: change the lists live. The
//! entries are kept apart from the config's, so a config reload keeps
//! them; each change is installed as a new policy version (see
//! `install`), so it never races a reload.

use std::path::Path;

use anyhow::{Result, bail};
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

pub fn remove(kind: ListKind, pin_dir: &Path, args: &ListArgs) -> Result<()> {
    let maps = PinnedMaps::open(pin_dir)?;
    let removed = install::change_lists(&maps, CliChange::Remove { kind, net: args.cidr })?;
    let lifted = if kind == ListKind::Block {
        sources::lift_auto_blocks(&maps, args.cidr)?
    } else {
        0
    };
    match (removed, lifted) {
        (false, 0) => bail!(
            "{} is not on the {}{}",
            args.cidr,
            kind.label(),
            if kind == ListKind::Block {
                " and no source in it is auto-blocked"
            } else {
                ""
            }
        ),
        (removed, lifted) => {
            if removed {
                println!("{}: removed {}", kind.label(), args.cidr);
            }
            if lifted > 0 {
                println!("lifted {lifted} auto-blocks inside {}", args.cidr);
            }
        }
    }
    Ok(())
}
