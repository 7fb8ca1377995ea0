//! One module per subcommand.

mod detach;
pub mod lab;
mod lists;
pub mod query;
mod run;
mod status;

use anyhow::Result;

use crate::{
    cli::{Cli, Command},
    install::ListKind,
};

pub fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Status(args) => status::status(&args),
        Command::Lookup(args) => query::lookup(&args),
        Command::Top(args) => query::top(&args),
        Command::Block(args) => lists::add(ListKind::Block, &args),
        Command::Unblock(args) => lists::remove(ListKind::Block, &args),
        Command::Allow(args) => lists::add(ListKind::Allow, &args),
        Command::Disallow(args) => lists::remove(ListKind::Allow, &args),
        Command::Detach(args) => detach::detach(&args.pin_dir),
        Command::Lab(args) => lab::lab(&args),
    }
}
