use clap::Parser as _;
use netwatch_user::{cli::Cli, commands};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // --log-format, else the config file's log_format (a file that does
    // not parse is reported by the command itself), else text.
    let format = cli.log_format.unwrap_or_else(|| {
        netwatch_user::config::ConfigSource::new(cli.config.as_deref())
            .load()
            .ok()
            .flatten()
            .and_then(|f| f.log_format)
            .unwrap_or_default()
    });
    netwatch_user::observe::logging::init(format);
    match commands::dispatch(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("netwatch: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
