//! A Debian machine booted with its own systemd as PID 1, for the tests of the package and
//! the service: a `debootstrap --variant=minbase` root of bookworm with systemd (built once
//! and kept under /var/cache), started with `systemd-nspawn -b` on a throw-away overlay of
//! it, inside a network namespace of the test bed, with bpffs bound in. Commands run in it
//! through `nsenter` into its PID 1's namespaces (no machined here: `--register=no`).
//!
//! Dropping a [`Machine`] kills its nspawn by PID and removes the overlay.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::testbed::{find_in_path, run_ok, run_with_timeout, wait_until};

/// The cached root. Delete it to have the next run build it afresh.
pub const ROOT: &str = "/var/cache/lb-tests/bookworm-systemd";
/// Longest a command in the machine may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// How long systemd may take to boot.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// The Debian mirror apt is configured with here (the first `URIs:` or `deb` line), so
/// debootstrap fetches from where this machine is allowed to.
fn mirror() -> Result<String> {
    let mut sources = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        sources.extend(dir.flatten().map(|e| e.path()));
    }
    for path in sources {
        let text = fs::read_to_string(&path).unwrap_or_default();
        for line in text.lines().map(str::trim) {
            let uri = line.strip_prefix("URIs:").map(str::trim).or_else(|| {
                line.strip_prefix("deb ")
                    .map(|r| r.split_whitespace().last().unwrap_or(""))
            });
            if let Some(uri) = uri.and_then(|u| u.split_whitespace().next())
                && uri.ends_with("/debian")
            {
                return Ok(uri.to_string());
            }
        }
    }
    bail!("no Debian mirror found in /etc/apt/sources.list{{,.d/*}}")
}

/// The cached bookworm root with systemd, made with debootstrap on first use (about 240 MB,
/// a few minutes). Built in a temp dir and renamed, so a killed run leaves no half root.
pub fn cached_root() -> Result<PathBuf> {
    let root = PathBuf::from(ROOT);
    // systemd, and procps for the unit's ExecReload=/bin/kill (a dependency of the package).
    if ["lib/systemd/systemd", "bin/kill"]
        .iter()
        .all(|p| root.join(p).is_file())
    {
        return Ok(root);
    }
    if root.exists() {
        bail!("{ROOT} lacks systemd or procps: delete it, and the next run builds it afresh");
    }
    for tool in ["debootstrap", "systemd-nspawn"] {
        if find_in_path(tool).is_none() {
            bail!("{tool} not found: install debootstrap and systemd-container (./x.sh test does)");
        }
    }
    let parent = root
        .parent()
        .ok_or_else(|| anyhow!("{ROOT} has no parent"))?;
    fs::create_dir_all(parent)?;
    let tmp = parent.join(format!("bookworm-systemd.tmp-{}", std::process::id()));
    let mirror = mirror()?;
    eprintln!("building {ROOT} with debootstrap from {mirror} (once; a few minutes)");
    let out = run_with_timeout(
        Command::new("debootstrap")
            .args([
                "--variant=minbase",
                "--include=systemd,systemd-sysv,dbus,procps",
                "bookworm",
            ])
            .arg(&tmp)
            .arg(&mirror),
        Duration::from_secs(900),
    )?;
    if !out.status.success() {
        let _ = fs::remove_dir_all(&tmp);
        bail!(
            "debootstrap failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
    // Another run may have finished first; either root will do.
    if fs::rename(&tmp, &root).is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    Ok(root)
}

/// A booted machine. See the module docs.
pub struct Machine {
    nspawn: Child,
    /// The machine's PID 1, as seen from here.
    leader: u32,
    merged: PathBuf,
    dir: tempfile::TempDir,
    pub name: String,
}

impl Machine {
    /// Boots the cached root on an overlay, in network namespace `netns` (a name under
    /// /run/netns), with /sys/fs/bpf bound in and `host_dir` bound read-only at /host, and
    /// waits until systemd has finished booting.
    pub fn boot(name: &str, netns: &str, host_dir: &Path) -> Result<Machine> {
        let root = cached_root()?;
        mount_bpffs()?;
        let dir = tempfile::Builder::new()
            .prefix("lb-machine-")
            .tempdir_in("/var/tmp")
            .context("creating the overlay dir")?;
        let (upper, work, merged) = (
            dir.path().join("upper"),
            dir.path().join("work"),
            dir.path().join("root"),
        );
        for d in [&upper, &work, &merged] {
            fs::create_dir(d)?;
        }
        run_ok(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!(
                    "lowerdir={},upperdir={},workdir={}",
                    root.display(),
                    upper.display(),
                    work.display()
                ))
                .arg(&merged),
        )?;
        let log = fs::File::create(dir.path().join("console.log"))?;
        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("-D")
            .arg(&merged)
            .args(["-b", "--register=no", "--keep-unit", "-q"])
            .arg(format!("--machine={name}"))
            .arg(format!("--network-namespace-path=/run/netns/{netns}"))
            .arg("--bind=/sys/fs/bpf")
            .arg(format!("--bind-ro={}:/host", host_dir.display()))
            // The agent's capabilities (the unit narrows them down again).
            .arg("--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN")
            // nspawn's own seccomp filter refuses bpf() to everything in the machine.
            .arg("--system-call-filter=bpf")
            .arg("--console=passive")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe; the machine dies with the
        // thread that started it if the test process is killed.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let nspawn = cmd.spawn().context("starting systemd-nspawn")?;
        let mut machine = Machine {
            leader: 0,
            nspawn,
            merged,
            dir,
            name: name.to_string(),
        };
        let nspawn_pid = machine.nspawn.id();
        wait_until(Duration::from_secs(20), || {
            if let Ok(Some(status)) = machine.nspawn.try_wait() {
                bail!(
                    "systemd-nspawn exited with {status}:\n{}",
                    machine.console()
                );
            }
            Ok(match find_init(nspawn_pid) {
                Some(pid) => {
                    machine.leader = pid;
                    true
                }
                None => false,
            })
        })
        .context("waiting for the machine's systemd to start")?;
        // `is-system-running --wait` returns once booting is over: "running", or "degraded"
        // when some unit the container cannot run failed, which is fine here.
        wait_until(BOOT_TIMEOUT, || {
            let out = machine.run(&["systemctl", "is-system-running", "--wait"])?;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            Ok(state == "running" || state == "degraded")
        })
        .with_context(|| format!("waiting for the machine to boot:\n{}", machine.console()))?;
        Ok(machine)
    }

    /// What the machine wrote to its console.
    pub fn console(&self) -> String {
        fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    /// The machine's root directory as seen from here.
    pub fn root(&self) -> &Path {
        &self.merged
    }

    /// A command that runs `args` inside the machine (all its namespaces, its root).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.leader.to_string())
            .args(["-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w", "--"])
            .arg("/usr/bin/env")
            .arg("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .arg("LANG=C.UTF-8")
            .arg("DEBIAN_FRONTEND=noninteractive")
            .args(args);
        cmd
    }

    /// Runs `args` inside the machine to completion and returns its output.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        run_with_timeout(&mut self.command(args), COMMAND_TIMEOUT)
    }

    /// Like [`Machine::run`], failing (with stdout and stderr) unless it exits 0.
    pub fn run_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            bail!(
                "`{}` in {} failed ({}): {} {}",
                args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `sh -c SCRIPT` inside the machine, which must exit 0; returns stdout.
    pub fn sh(&self, script: &str) -> Result<String> {
        self.run_ok(&["sh", "-c", script])
    }
}

/// Mounts bpffs on /sys/fs/bpf here when nothing is (as systemd does at boot and the agent
/// does when run by hand), so the machine gets the host's bpffs bound in.
fn mount_bpffs() -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let path = c"/sys/fs/bpf";
    // SAFETY: statfs(2) on a NUL-terminated path into a zeroed struct it fills.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    run_ok(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"])).map(drop)
}

/// The machine's systemd among the descendants of nspawn (nspawn forks an inner child
/// that execs systemd): the first descendant whose command is `systemd`.
fn find_init(nspawn: u32) -> Option<u32> {
    // (pid, parent, command) of every process.
    let procs: Vec<(u32, u32, String)> = fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces, so split at the last ')'.
            let (head, tail) = stat.rsplit_once(')')?;
            let comm = head.split_once('(')?.1.to_string();
            let ppid = tail.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid, comm))
        })
        .collect();
    let mut queue = vec![nspawn];
    while let Some(parent) = queue.pop() {
        for (pid, _, comm) in procs.iter().filter(|(_, ppid, _)| *ppid == parent) {
            if comm == "systemd" {
                return Some(*pid);
            }
            queue.push(*pid);
        }
    }
    None
}

impl Drop for Machine {
    fn drop(&mut self) {
        // SIGKILL to the machine's PID 1 ends every process in its PID namespace; nspawn
        // then exits. SAFETY: kill(2) on PIDs of processes we started (the leader is reaped
        // by nspawn only after this, so its PID cannot have been reused).
        if self.leader != 0 {
            unsafe { libc::kill(self.leader as i32, libc::SIGKILL) };
        }
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGKILL) };
        let _ = self.nspawn.wait();
        // The machine's processes die with its PID namespace; give them a moment before
        // taking the overlay away.
        let _ = wait_until(Duration::from_secs(10), || {
            let out = Command::new("umount").arg(&self.merged).output()?;
            Ok(out.status.success())
        });
    }
}
