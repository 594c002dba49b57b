//! `cargo xtask test`: build every binary the tests run, then the whole test suite.

use anyhow::{Context as _, Result};
use xtask::testbed;

pub fn run(extra: &[String]) -> Result<()> {
    // The end-to-end tests need all of this; say so up front instead of letting them fail
    // one by one (and never let them skip).
    testbed::check_environment().context("cannot run the end-to-end tests")?;
    // lb-ebpf is a BPF-target crate: the `lb` build script compiles it (and embeds it);
    // built for the host it does not compile, so it is left out of --workspace here.
    super::cargo(&["build", "--workspace", "--exclude", "lb-ebpf", "--bins"])?;
    let mut args = vec!["test", "--workspace", "--exclude", "lb-ebpf"];
    args.extend(extra.iter().map(String::as_str));
    super::cargo(&args)
}
