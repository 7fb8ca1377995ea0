use clap::Parser as _;
use netwatch_user::{cli::Cli, commands};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    match commands::dispatch(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("netwatch: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
