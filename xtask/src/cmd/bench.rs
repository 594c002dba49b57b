//! `cargo xtask bench`: install the traffic tools the benchmarks compare against, build
//! everything in release mode, and run `lb-bench` (see BENCHMARKS.md).

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use xtask::testbed;

/// Debian packages of the end-to-end part: public packet generators, an HTTP load generator,
/// and the two proxies lb is compared with (nginx also serves HTTP on the backends).
const PACKAGES: [&str; 6] = [
    "netsniff-ng",
    "tcpreplay",
    "wrk",
    "haproxy",
    "nginx",
    "libnginx-mod-stream",
];

/// Debian's perf, which `lb-bench --profile` runs (installed with every bench, so a
/// profile can follow a benchmark run).
const PROFILE_PACKAGES: [&str; 1] = ["linux-perf"];

pub fn run(args: &[String]) -> Result<()> {
    testbed::check_environment()
        .context("the benchmarks load XDP programs and build a test bed")?;
    install_missing(&PROFILE_PACKAGES)?;
    let profiling = args
        .iter()
        .any(|a| a == "--profile" || a.starts_with("--profile="));
    if !profiling && wants_e2e(args) {
        install_missing(&PACKAGES)?;
    }
    super::cargo(&[
        "build",
        "--release",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--bins",
    ])?;
    let bench = super::workspace_root().join("target/release/lb-bench");
    println!("$ {} {}", bench.display(), args.join(" "));
    let status = Command::new(&bench)
        .args(args)
        .current_dir(super::workspace_root())
        .status()
        .with_context(|| format!("running {}", bench.display()))?;
    if !status.success() {
        bail!("lb-bench failed ({status})");
    }
    Ok(())
}

/// Whether the arguments select the end-to-end part (all parts run unless `--only` says).
fn wants_e2e(args: &[String]) -> bool {
    let mut only = None;
    for (i, a) in args.iter().enumerate() {
        if let Some(v) = a.strip_prefix("--only=") {
            only = Some(v.to_string());
        } else if a == "--only" {
            only = args.get(i + 1).cloned();
        }
    }
    only.is_none_or(|o| o.split(',').any(|p| p == "e2e"))
}

fn install_missing(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("$ apt-get install {}", missing.join(" "));
    let ok = |s: std::process::ExitStatus| s.success();
    if !Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .is_ok_and(ok)
    {
        bail!("apt-get update failed");
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get install {} failed ({status})", missing.join(" "));
    }
    Ok(())
}
