//! The `lb` command line: clap definitions, requests to the agent, tables and `--watch`.

pub mod table;
pub mod watch;
