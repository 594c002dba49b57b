//! `lb`: runs the agent (`lb run`) and talks to a running one (every other command); see
//! `lb::cli`.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    lb::service::init_logging();
    match lb::cli::run(lb::cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the chain of causes.
            let line = format!("{e:#}").replace('\n', " ");
            eprintln!("{}lb: {line}", lb::service::error_prefix());
            ExitCode::FAILURE
        }
    }
}
