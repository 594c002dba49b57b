//! `cargo xtask package`: a release build of `lb`, packaged as a `.deb` (see
//! `xtask::package`) under target/package/.

use anyhow::Result;
use xtask::package;

pub fn run() -> Result<()> {
    super::cargo(&["build", "--release", "-p", "lb-userspace", "--bin", "lb"])?;
    let root = super::workspace_root();
    let out_dir = root.join("target/package");
    std::fs::create_dir_all(&out_dir)?;
    let deb = package::build(&package::Spec {
        root: &root,
        binary: &root.join("target/release/lb"),
        version: &package::debian_version(),
        out_dir: &out_dir,
    })?;
    println!("{}", deb.display());
    Ok(())
}
