//! The Debian package: lays out the tree (binary, systemd unit, default config, monitoring
//! files, manual pages and completions the binary writes from its own CLI definition,
//! maintainer scripts from `packaging/debian/`) and builds the `.deb` with Debian's own
//! `dpkg-deb`. `cargo xtask package` runs it on a release build; the service tests run it
//! on the binary they test.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::testbed::{run_ok, run_with_timeout};

/// The package's name, and its binary's.
pub const NAME: &str = "lb";
/// Where the package puts the unit (Debian 12 keeps units under /lib).
pub const UNIT_PATH: &str = "lib/systemd/system/lb@.service";
/// And the unit of `lb decap`, for backends of tunnel and gue VIPs.
pub const DECAP_UNIT_PATH: &str = "lib/systemd/system/lb-decap@.service";

/// The package version: the workspace's, Debian revision 1.
pub fn debian_version() -> String {
    format!("{}-1", env!("CARGO_PKG_VERSION"))
}

/// What goes into a package.
pub struct Spec<'a> {
    /// The workspace root (packaging/, monitoring/, README.md are read from it).
    pub root: &'a Path,
    /// The `lb` binary to package (stripped on the way in).
    pub binary: &'a Path,
    /// The Debian version, e.g. `0.1.0-1`.
    pub version: &'a str,
    /// Where to write the `.deb` (and the staging tree next to it).
    pub out_dir: &'a Path,
}

/// `dpkg --print-architecture`, the architecture the binary was built for.
fn architecture() -> Result<String> {
    Ok(run_ok(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string())
}

fn write(path: &Path, contents: impl AsRef<[u8]>, mode: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    let data = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write(to, data, mode)
}

/// gzip -9n: no name or timestamp inside, so the same input gives the same bytes.
fn gzip(path: &Path) -> Result<()> {
    run_ok(Command::new("gzip").args(["-9nf"]).arg(path)).map(drop)
}

/// Builds the package; returns the path of the `.deb`.
pub fn build(spec: &Spec) -> Result<PathBuf> {
    let arch = architecture()?;
    let stem = format!("{NAME}_{}_{arch}", spec.version);
    let tree = spec.out_dir.join(&stem);
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    }
    let pkg = spec.root.join("packaging");
    let at = |p: &str| tree.join(p);

    let bin = at("usr/bin/lb");
    copy(spec.binary, &bin, 0o755)?;
    run_ok(
        Command::new("strip")
            .args(["--strip-unneeded", "--remove-section=.comment"])
            .arg(&bin),
    )?;

    copy(&pkg.join("lb@.service"), &at(UNIT_PATH), 0o644)?;
    copy(&pkg.join("lb-decap@.service"), &at(DECAP_UNIT_PATH), 0o644)?;
    copy(&pkg.join("lb.toml"), &at("etc/lb/lb.toml"), 0o644)?;
    for f in ["alerts.yml", "grafana-dashboard.json"] {
        copy(
            &spec.root.join("monitoring").join(f),
            &at(&format!("usr/share/lb/{f}")),
            0o644,
        )?;
    }

    // Manual pages and completions from the binary's own CLI definition.
    let man = at("usr/share/man/man1");
    run_ok(Command::new(spec.binary).arg("man").arg(&man))?;
    for page in fs::read_dir(&man)? {
        let page = page?.path();
        fs::set_permissions(&page, fs::Permissions::from_mode(0o644))?;
        gzip(&page)?;
    }
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/lb"),
        ("zsh", "usr/share/zsh/vendor-completions/_lb"),
        ("fish", "usr/share/fish/vendor_completions.d/lb.fish"),
    ] {
        let script = run_ok(Command::new(spec.binary).args(["completions", shell]))?;
        write(&at(path), script, 0o644)?;
    }

    let doc = at("usr/share/doc/lb");
    copy(&pkg.join("debian/copyright"), &doc.join("copyright"), 0o644)?;
    let changelog =
        fs::read_to_string(pkg.join("debian/changelog"))?.replace("@VERSION@", spec.version);
    write(&doc.join("changelog.Debian"), changelog, 0o644)?;
    gzip(&doc.join("changelog.Debian"))?;
    copy(
        &pkg.join("debian/lintian-overrides"),
        &at("usr/share/lintian/overrides/lb"),
        0o644,
    )?;

    let debian = at("DEBIAN");
    for script in ["postinst", "prerm", "postrm"] {
        copy(
            &pkg.join("debian").join(script),
            &debian.join(script),
            0o755,
        )?;
    }
    write(&debian.join("conffiles"), "/etc/lb/lb.toml\n", 0o644)?;
    let installed_kb = dir_size(&tree)?.div_ceil(1024);
    let control = fs::read_to_string(pkg.join("debian/control"))?
        .replace("@VERSION@", spec.version)
        .replace("@ARCH@", &arch)
        .replace("@SIZE@", &installed_kb.to_string());
    write(&debian.join("control"), control, 0o644)?;
    write_md5sums(&tree)?;

    let deb = spec.out_dir.join(format!("{stem}.deb"));
    // gzip: a fraction of xz's time on a large binary, and every dpkg reads it.
    let out = run_with_timeout(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zgzip", "--build"])
            .arg(&tree)
            .arg(&deb),
        Duration::from_secs(300),
    )?;
    if !out.status.success() {
        bail!(
            "dpkg-deb --build failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(deb)
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut all = Vec::new();
    files(dir, &mut all)?;
    all.iter()
        .map(|p| Ok(fs::metadata(p)?.len()))
        .sum::<Result<u64>>()
}

/// DEBIAN/md5sums: every installed file but conffiles, as dpkg expects.
fn write_md5sums(tree: &Path) -> Result<()> {
    let mut all = Vec::new();
    files(tree, &mut all)?;
    all.sort();
    let mut out = Vec::new();
    for path in all {
        let rel = path.strip_prefix(tree)?.to_string_lossy().into_owned();
        if rel.starts_with("DEBIAN/") || rel.starts_with("etc/") {
            continue;
        }
        let sum = run_ok(Command::new("md5sum").arg(&path))?;
        let Some(hash) = sum.split_whitespace().next() else {
            bail!("md5sum printed nothing for {}", path.display());
        };
        writeln!(out, "{hash}  {rel}")?;
    }
    write(&tree.join("DEBIAN/md5sums"), out, 0o644)
}
