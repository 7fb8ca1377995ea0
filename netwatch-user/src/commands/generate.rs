//! `netwatch generate man|completions DIR` (hidden): the man pages and
//! shell completions the Debian package ships, made from the same clap
//! definition the binary parses with.

use std::path::Path;

use anyhow::{Context as _, Result};
use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::cli::{Cli, Generated};

/// netwatch is a system administration command (in /usr/sbin).
pub const MAN_SECTION: &str = "8";

pub fn generate(what: Generated, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    match what {
        Generated::Man => man_pages(&cmd, dir),
        Generated::Completions => {
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                let path = clap_complete::generate_to(shell, &mut cmd.clone(), "netwatch", dir)
                    .with_context(|| format!("writing {shell} completions into {}", dir.display()))?;
                println!("{}", path.display());
            }
            Ok(())
        }
    }
}

/// netwatch.8 and, for each visible subcommand, netwatch-NAME.8.
fn man_pages(cmd: &clap::Command, dir: &Path) -> Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, dir)?;
    }
    let man = clap_mangen::Man::new(cmd.clone())
        .section(MAN_SECTION)
        .manual("System Administration")
        .source(format!("netwatch {}", env!("CARGO_PKG_VERSION")));
    let path = man
        .generate_to(dir)
        .with_context(|| format!("writing the man page of {} into {}", cmd.get_name(), dir.display()))?;
    println!("{}", path.display());
    Ok(())
}
