//! `block`, `unblock`, `allow`, `disallow`: change the lists live. The
//! entries are marked as coming from the command line, so a config reload
//! keeps them.

use anyhow::{Result, bail};
use netwatch_common::{ListEntry, ORIGIN_CLI};

use crate::{
    cli::{BlockArgs, ListArgs},
    clock::{boot_rfc3339, boot_secs},
    datapath::{self, ListKind, PinnedMaps},
    sources,
};

pub fn add(kind: ListKind, args: &BlockArgs) -> Result<()> {
    let maps = PinnedMaps::open(&args.pin_dir.pin_dir)?;
    let expires = match args.ttl {
        None => 0,
        Some(ttl) if ttl.as_secs() == 0 => bail!("--ttl must be at least one second"),
        Some(ttl) => boot_secs().saturating_add(u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX - boot_secs())),
    };
    maps.list_insert(
        kind,
        args.cidr,
        ListEntry {
            expires,
            origin: ORIGIN_CLI,
        },
    )?;
    datapath::refresh_list_flags(&maps)?;
    match expires {
        0 => println!("{}: added {}", kind.label(), args.cidr),
        t => println!("{}: added {} until {}", kind.label(), args.cidr, boot_rfc3339(t)),
    }
    Ok(())
}

pub fn remove(kind: ListKind, args: &ListArgs) -> Result<()> {
    let maps = PinnedMaps::open(&args.pin_dir.pin_dir)?;
    let removed = maps.list_remove(kind, args.cidr)?;
    datapath::refresh_list_flags(&maps)?;
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
