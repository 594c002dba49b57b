//! The manual pages and shell completions, generated from the CLI definition (clap_mangen,
//! clap_complete) so they never drift from `--help`. The package build runs the hidden
//! `lb man DIR` and `lb completions SHELL` and installs what they write.

use std::{fs, io, path::Path};

use anyhow::{Context as _, Result};
use clap_complete::Shell;

/// Writes `lb.1` and one page per visible subcommand (`lb-run.1`, `lb-vip-add.1`, ...)
/// into `dir`, creating it.
pub fn man_pages(cli: clap::Command, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cli = with_descriptions(cli, "lb");
    clap_mangen::generate_to(cli, dir)
        .with_context(|| format!("writing man pages to {}", dir.display()))
}

/// A page's NAME line needs a description (whatis, apropos): a subcommand without one
/// gets its full name, e.g. "lb vip del".
fn with_descriptions(mut cmd: clap::Command, path: &str) -> clap::Command {
    if cmd.get_about().is_none() {
        cmd = cmd.about(path.to_string());
    }
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    for name in names {
        let sub_path = format!("{path} {name}");
        cmd = cmd.mut_subcommand(&name, |sub| with_descriptions(sub, &sub_path));
    }
    cmd
}

/// Prints the completion script for `shell` on stdout.
pub fn completions(mut cli: clap::Command, shell: Shell) -> Result<()> {
    let name = cli.get_name().to_string();
    clap_complete::generate(shell, &mut cli, name, &mut io::stdout());
    Ok(())
}
