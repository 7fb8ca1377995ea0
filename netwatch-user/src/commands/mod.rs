//! One module per subcommand.

mod check;
mod detach;
mod generate;
mod lists;
mod query;
mod run;
pub(crate) mod status;

use anyhow::Result;

use crate::{
    cli::{Cli, Command},
    config::{ConfigSource, Dirs},
    datapath::lists::ListKind,
};

pub fn dispatch(cli: Cli) -> Result<()> {
    let source = ConfigSource::new(cli.config.as_deref());
    // pin_dir and state_dir of the commands that read what `run` left.
    let dirs = Dirs::new(&source);
    match cli.command {
        Command::Run(args) => run::run(args, &source),
        Command::CheckConfig(args) => check::check_config(&source, &args),
        Command::Status(args) => status::status(&dirs.pin_dir(args.pin_dir.pin_dir.as_deref())?, args.json),
        Command::Lookup(args) if args.fleet.fleet.is_some() => query::fleet_lookup(
            &crate::fleet::query_target(args.fleet.fleet.as_deref().unwrap_or_default(), dirs.fleet()?)?,
            args.ip,
            args.json,
        ),
        Command::Top(args) if args.fleet.fleet.is_some() => query::fleet_top(
            &crate::fleet::query_target(args.fleet.fleet.as_deref().unwrap_or_default(), dirs.fleet()?)?,
            args.limit,
            args.json,
        ),
        Command::Lookup(args) => query::lookup(
            &dirs.pin_dir(args.pin_dir.pin_dir.as_deref())?,
            &dirs.state_dir(args.state_dir.state_dir.as_deref())?,
            args.ip,
            args.json,
        ),
        Command::Incidents(args) => query::incidents(
            &dirs.state_dir(args.state_dir.state_dir.as_deref())?,
            args.since,
            args.json,
        ),
        Command::Top(args) => query::top(&dirs.pin_dir(args.pin_dir.pin_dir.as_deref())?, args.limit, args.json),
        Command::Block(args) => lists::add(ListKind::Block, &dirs.pin_dir(args.pin_dir.pin_dir.as_deref())?, &args),
        Command::Unblock(args) => {
            // With a fleet, the fleet's decisions are lifted too.
            let fleet = match dirs.fleet()? {
                Some(entry) => Some(crate::config::FleetConfig::build(
                    &entry.url,
                    entry.credentials.clone(),
                    entry.sensor.as_deref(),
                )?),
                None => None,
            };
            lists::unblock(&dirs.pin_dir(args.pin_dir.pin_dir.as_deref())?, &args, fleet.as_ref())
        }
        Command::Allow(args) => lists::add(ListKind::Allow, &dirs.pin_dir(args.pin_dir.pin_dir.as_deref())?, &args),
        Command::Disallow(args) => lists::disallow(&dirs.pin_dir(args.pin_dir.pin_dir.as_deref())?, &args),
        Command::Detach(args) => detach::detach(&dirs.pin_dir(args.pin_dir.as_deref())?),
        Command::Generate(args) => generate::generate(args.what, &args.dir),
        #[cfg(feature = "lab")]
        Command::Lab(args) => crate::lab::lab(&args),
    }
}
