//! One module per subcommand.

mod detach;
pub mod lab;
mod run;
mod status;

use anyhow::Result;

use crate::cli::{Cli, Command};

pub fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Status(args) => status::status(&args),
        Command::Detach(args) => detach::detach(&args.pin_dir),
        Command::Lab(args) => lab::lab(&args),
    }
}
