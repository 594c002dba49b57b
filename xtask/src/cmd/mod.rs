pub mod bench;
pub mod demo;
pub mod demo_fleet;
pub mod demo_nat;
pub mod package;
pub mod test;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

/// The workspace root: xtask's manifest dir's parent.
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Runs cargo with `args` in the workspace root, inheriting the terminal.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("$ cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}
