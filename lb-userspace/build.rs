//! Compiles the XDP program (lb-ebpf) with aya-build so the `lb` binary embeds it.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    // The eBPF crate needs `-Z build-std=core` on the pinned stable toolchain; aya-build
    // passes it when RUSTC_BOOTSTRAP names the crate, and the child cargo inherits this.
    // SAFETY: build scripts are single-threaded here.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let toolchain = std::env::var("LB_EBPF_TOOLCHAIN").unwrap_or_else(|_| "1.98.0".into());
    println!("cargo::rerun-if-env-changed=LB_EBPF_TOOLCHAIN");
    commit();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}

/// `LB_COMMIT` for `lb --version` (see `service::VERSION`): the commit HEAD names (work
/// tree changes on top of it are not tracked); nothing outside a git checkout.
fn commit() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(head) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return;
    };
    println!("cargo::rustc-env=LB_COMMIT={head}");
    // A new commit moves HEAD or the branch it names (a loose ref, or packed-refs). A path
    // that does not exist would make cargo rerun this script every time: only existing ones.
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    watch.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for path in watch {
        if let Some(p) = git(&["rev-parse", "--git-path", &path])
            && std::path::Path::new(&p).exists()
        {
            println!("cargo::rerun-if-changed={p}");
        }
    }
}
