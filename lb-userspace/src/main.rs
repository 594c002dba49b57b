//! `lb`: runs the agent (`lb run`) and talks to a running one (every other command); see
//! `lb::cli`.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match lb::cli::run(lb::cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the chain of causes.
            eprintln!("lb: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
