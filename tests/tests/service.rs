//! The Debian package and the systemd service, under a real systemd: each test builds the
//! namespace test bed (see `xtask::testbed`), boots a Debian 12 machine with systemd as its
//! PID 1 in the balancer's network namespace (`xtask::machine`: debootstrap root cached
//! under /var/cache, `systemd-nspawn -b`, bpffs bound in), installs the `.deb` made from
//! the `lb` binary under test (`xtask::package`) with dpkg, and drives the service with
//! systemctl while the test bed's client sends traffic through the VIP.
//!
//! Needs debootstrap, systemd-container, lintian and what the end-to-end tests need
//! (`./x.sh test` installs them); a missing one fails the test, saying which.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use lb_tests::e2e::{name, run_ok, serial, vip4};
use serde_json::Value;
use xtask::{
    machine::Machine,
    package,
    testbed::{Config, Proc, Testbed, find_in_path, monotonic_us, wait_until},
};

const UNIT: &str = "lb@eth0.service";
/// The version the tests install first, and the one they upgrade to.
const V1: &str = "0.1.0-1";
const V2: &str = "0.1.0-2";

/// The packages under test, built once per run from the `lb` binary the tests run.
fn packages() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf();
        let binary = xtask::testbed::bin_dir()
            .unwrap_or_else(|e| panic!("{e:#}"))
            .join("lb");
        assert!(
            binary.is_file(),
            "{} not found: run `cargo xtask test`",
            binary.display()
        );
        let out = root.join("target/service-tests");
        std::fs::create_dir_all(&out).expect("creating target/service-tests");
        for version in [V1, V2] {
            package::build(&package::Spec {
                root: &root,
                binary: &binary,
                version,
                out_dir: &out,
            })
            .unwrap_or_else(|e| panic!("building the {version} package: {e:#}"));
        }
        out
    })
}

fn deb(version: &str) -> PathBuf {
    let arch = String::from_utf8(
        Command::new("dpkg")
            .arg("--print-architecture")
            .output()
            .expect("dpkg")
            .stdout,
    )
    .expect("utf-8");
    packages().join(format!("lb_{version}_{}.deb", arch.trim()))
}

/// The same file as seen inside the machine (the package dir is bound at /host).
fn in_machine(deb: &Path) -> String {
    format!(
        "/host/{}",
        deb.file_name().expect("file name").to_string_lossy()
    )
}

/// A test bed with its backends serving and a machine booted in its balancer namespace.
/// Fields drop in order: machine, servers, then the namespaces.
struct Host {
    machine: Machine,
    _servers: Vec<Proc>,
    bed: Testbed,
}

impl Host {
    fn new() -> Host {
        let bed = Testbed::new(Config { backends: 2 }).unwrap_or_else(|e| panic!("{e:#}"));
        let servers = bed.start_backends().unwrap_or_else(|e| panic!("{e:#}"));
        let machine = Machine::boot(&format!("{}-m", bed.prefix), &bed.lb.ns, packages())
            .unwrap_or_else(|e| panic!("booting the machine: {e:#}"));
        Host {
            machine,
            _servers: servers,
            bed,
        }
    }

    /// `sh -c SCRIPT` in the machine; must succeed.
    fn sh(&self, script: &str) -> String {
        self.machine
            .sh(script)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", self.journal()))
    }

    /// The unit's journal, for failure messages.
    fn journal(&self) -> String {
        self.machine
            .run(&["journalctl", "--no-pager", "-n", "60", "-u", UNIT])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    fn install(&self, version: &str) {
        self.sh(&format!("dpkg -i {}", in_machine(&deb(version))));
    }

    fn property(&self, name: &str) -> String {
        self.sh(&format!("systemctl show -p {name} --value {UNIT}"))
            .trim()
            .to_string()
    }

    fn main_pid(&self) -> u32 {
        self.property("MainPID").parse().expect("MainPID")
    }

    fn active(&self) -> String {
        // is-active exits non-zero for anything but "active": read what it prints.
        self.machine
            .run(&["systemctl", "is-active", UNIT])
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    }

    /// `lb ARGS` in the machine, against the service's socket.
    fn lb(&self, args: &str) -> String {
        self.sh(&format!("lb {args}"))
    }

    /// Whether an XDP program is attached to the balancer's interface.
    fn xdp_attached(&self) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.bed.lb.ns, "link", "show", "eth0"])
            .output()
            .expect("ip link show");
        String::from_utf8_lossy(&out.stdout).contains("xdp")
    }

    /// Whether anything is pinned for the balancer's namespace.
    fn pinned(&self) -> bool {
        self.machine
            .run(&[
                "sh",
                "-c",
                "ls /sys/fs/bpf/lb/netns-$(stat -L -c %i /proc/self/ns/net)/",
            ])
            .map(|o| o.status.success() && !o.stdout.is_empty())
            .unwrap_or(false)
    }

    /// A VIP with both backends, through the CLI.
    fn configure(&self, vip: SocketAddr) {
        self.lb(&format!("vip add {vip}"));
        for b in &self.bed.backends {
            self.lb(&format!("backend add {vip} {}", b.ipv4));
        }
    }

    /// The journal's entries of the unit as JSON objects.
    fn journal_entries(&self) -> Vec<Value> {
        self.sh(&format!("journalctl --no-pager -o json -u {UNIT}"))
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// `count` new connections through the VIP from the client; every one must be answered.
    fn all_answered(&self, count: u32) {
        let tally = self.bed.requests(vip4(), count).expect("requests");
        assert!(
            tally.errors.is_empty() && tally.sequence.len() == count as usize,
            "{tally:?}\n{}",
            self.journal()
        );
    }

    /// Waits until the unit is active again with a main process other than `old`; returns
    /// the new one.
    fn new_agent(&self, after: &str, old: u32) -> u32 {
        self.wait(
            &format!("a new agent after {after}"),
            Duration::from_secs(30),
            || {
                let pid = self.main_pid();
                self.active() == "active" && pid != old && pid != 0
            },
        );
        self.main_pid()
    }

    fn wait(&self, what: &str, timeout: Duration, f: impl Fn() -> bool) {
        wait_until(timeout, || Ok(f()))
            .unwrap_or_else(|e| panic!("waiting for {what}: {e:#}\n{}", self.journal()));
    }
}

fn message(e: &Value) -> String {
    e["MESSAGE"].as_str().unwrap_or("").to_string()
}

/// lintian, Debian's package checker, finds no error and no warning in the package.
#[test]
fn package_passes_lintian() {
    let lintian =
        find_in_path("lintian").expect("lintian not found: install it (./x.sh test does)");
    run_ok(
        "lintian",
        Command::new(lintian)
            .args(["--fail-on", "error,warning", "--tag-display-limit", "0"])
            .arg(deb(V1)),
        Duration::from_secs(300),
    );
}

/// The package holds the binary (whose --version names the commit it was built from), the
/// unit, the default config as a conffile, the monitoring files, man pages and completions.
#[test]
fn package_holds_what_the_service_needs() {
    let deb = deb(V1);
    let list = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .expect("dpkg-deb -c");
    let list = String::from_utf8_lossy(&list.stdout);
    for path in [
        "./usr/bin/lb",
        "./lib/systemd/system/lb@.service",
        "./lib/systemd/system/lb-decap@.service",
        "./etc/lb/lb.toml",
        "./usr/share/lb/alerts.yml",
        "./usr/share/lb/grafana-dashboard.json",
        "./usr/share/man/man1/lb.1.gz",
        "./usr/share/man/man1/lb-run.1.gz",
        "./usr/share/man/man1/lb-vip-add.1.gz",
        "./usr/share/man/man1/lb-decap.1.gz",
        "./usr/share/bash-completion/completions/lb",
        "./usr/share/zsh/vendor-completions/_lb",
        "./usr/share/fish/vendor_completions.d/lb.fish",
        "./usr/share/doc/lb/copyright",
    ] {
        assert!(
            list.lines().any(|l| l.ends_with(path)),
            "{path} missing from the package:\n{list}"
        );
    }
    let dir = packages().join(format!("extracted-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ok = Command::new("dpkg-deb")
        .arg("-R")
        .arg(&deb)
        .arg(&dir)
        .status()
        .expect("dpkg-deb -R");
    assert!(ok.success());
    let conffiles = std::fs::read_to_string(dir.join("DEBIAN/conffiles")).expect("conffiles");
    assert_eq!(conffiles.trim(), "/etc/lb/lb.toml");
    // The default config configures nothing: every line is a comment or blank.
    let config = std::fs::read_to_string(dir.join("etc/lb/lb.toml")).expect("lb.toml");
    assert!(
        config
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')),
        "the default config configures something:\n{config}"
    );
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git rev-parse");
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    let version = Command::new(dir.join("usr/bin/lb"))
        .arg("--version")
        .output()
        .expect("lb --version");
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(!head.is_empty());
    assert!(
        version.contains(&format!("commit {head}")),
        "lb --version: {version}, HEAD {head}"
    );
    // The manual page renders and documents `lb run`'s options.
    let page = Command::new("gzip")
        .arg("-dc")
        .arg(dir.join("usr/share/man/man1/lb-run.1.gz"))
        .output()
        .expect("gzip -dc");
    let page = String::from_utf8_lossy(&page.stdout);
    assert!(page.contains("keep\\-forwarding"), "lb-run.1:\n{page}");
    let completion = std::fs::read_to_string(dir.join("usr/share/bash-completion/completions/lb"))
        .expect("bash completion");
    assert!(
        completion.contains("backend") && completion.contains("firewall"),
        "{completion}"
    );
}

/// Installing gives a unit systemd accepts (`systemd-analyze verify`) that is not started
/// by itself; enabled, it forwards; removing the package stops it, detaches the program
/// and removes its pins but keeps the config; purging removes the config too.
#[test]
fn install_remove_purge() {
    let _serial = serial();
    let h = Host::new();
    h.install(V1);
    // --man=no: the machine has no man-db; the pages are checked in the package test.
    h.sh(&format!("systemd-analyze verify --man=no {UNIT}"));
    assert_eq!(
        h.active(),
        "inactive",
        "the package must not start the service by itself"
    );
    assert!(!h.xdp_attached());

    h.sh(&format!("systemctl enable --now {UNIT}"));
    assert_eq!(h.active(), "active");
    assert!(
        h.xdp_attached(),
        "no XDP program on eth0 with the service active"
    );
    h.configure(vip4());
    h.all_answered(10);

    h.sh("dpkg -r lb");
    assert_ne!(h.active(), "active");
    assert!(
        !h.xdp_attached(),
        "the program is still attached after removal"
    );
    assert!(!h.pinned(), "pins left after removal");
    h.sh("test -f /etc/lb/lb.toml && ! test -e /usr/bin/lb && ! test -e /lib/systemd/system/lb@.service");
    h.sh(&format!(
        "! test -e /etc/systemd/system/multi-user.target.wants/{UNIT}"
    ));

    h.sh("dpkg -P lb");
    h.sh("! test -e /etc/lb");
    h.sh("! dpkg-query -W lb 2>/dev/null");
}

/// The package's `lb-decap@.service` (for a backend of tunnel and gue VIPs): valid for
/// systemd, not started by the package, attaches `lb decap` to the interface it names with
/// the VIPs of /etc/lb/decap.env, detaches when stopped, and is stopped on removal.
#[test]
fn decap_unit_attaches_and_detaches() {
    const DECAP: &str = "lb-decap@eth0.service";
    let _serial = serial();
    let h = Host::new();
    h.install(V1);
    h.sh(&format!("systemd-analyze verify --man=no {DECAP}"));
    assert!(
        !h.xdp_attached(),
        "the package must not attach anything by itself"
    );
    h.sh(&format!(
        "echo 'LB_DECAP_ARGS=--vip {}' > /etc/lb/decap.env && systemctl start {DECAP}",
        vip4().ip()
    ));
    let decap_active = || {
        h.machine
            .run(&["systemctl", "is-active", DECAP])
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "active")
            .unwrap_or(false)
    };
    // Type=simple: active at once; attached once the program is loaded.
    h.wait("lb decap attached to eth0", Duration::from_secs(20), || {
        decap_active() && h.xdp_attached()
    });
    h.sh(&format!("systemctl stop {DECAP}"));
    h.wait(
        "lb decap detached from eth0",
        Duration::from_secs(20),
        || !h.xdp_attached(),
    );

    h.sh(&format!("systemctl start {DECAP}"));
    h.wait("lb decap attached again", Duration::from_secs(20), || {
        h.xdp_attached()
    });
    h.sh("dpkg -r lb");
    assert!(!decap_active(), "lb decap still running after removal");
    assert!(!h.xdp_attached(), "lb decap still attached after removal");
    h.sh("! test -e /lib/systemd/system/lb-decap@.service");
}

/// `systemctl start` returns once the agent said READY: the control socket answers and the
/// program is attached at that moment. The status line and the journal (at the info
/// priority) say so, the process has exactly the unit's capabilities, and `systemctl stop`
/// stops it with the program left forwarding (the unit runs it with --keep-forwarding).
#[test]
fn service_is_ready_when_attached_and_stops_cleanly() {
    let _serial = serial();
    let h = Host::new();
    h.install(V1);
    // Start and ask at once: no sleep in between.
    h.sh(&format!("systemctl start {UNIT} && lb vip list --json"));
    assert!(h.xdp_attached());
    assert_eq!(h.property("StatusText"), "forwarding on eth0");
    assert_eq!(h.property("NRestarts"), "0");

    let entries = h.journal_entries();
    let attached = entries
        .iter()
        .find(|e| message(e).contains("attached to eth0"))
        .unwrap_or_else(|| panic!("no 'attached to eth0' in the journal:\n{}", h.journal()));
    assert_eq!(attached["PRIORITY"], "6", "{attached}");
    assert!(
        !message(attached).starts_with('<'),
        "the priority prefix leaked into the message: {attached}"
    );

    // CapEff of the agent: CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39), nothing else.
    let pid = h.main_pid();
    let status = h.sh(&format!("cat /proc/{pid}/status"));
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex"))
        .expect("CapEff");
    assert_eq!(
        cap_eff,
        (1 << 12) | (1 << 38) | (1 << 39),
        "CapEff {cap_eff:#x}"
    );

    h.configure(vip4());
    h.sh(&format!("systemctl stop {UNIT}"));
    assert_eq!(h.active(), "inactive");
    assert_eq!(h.property("Result"), "success");
    assert!(
        h.journal().contains("the data plane keeps forwarding"),
        "{}",
        h.journal()
    );
    // Stopped, the agent's program still balances with its pinned state.
    h.all_answered(10);
}

/// `systemctl reload` signals the running agent (same process, still active), which re-applies
/// its config file and reports the reload through RELOADING/READY; a broken config file makes the reload fail with an
/// error in the journal (priority err) and the status line, and the agent keeps running.
#[test]
fn reload_keeps_the_agent_and_reports_a_broken_config() {
    let _serial = serial();
    let h = Host::new();
    h.install(V1);
    h.sh(&format!("systemctl start {UNIT}"));
    h.configure(vip4());
    let pid = h.main_pid();

    h.sh(&format!("systemctl reload {UNIT}"));
    h.wait("the reload to be reported", Duration::from_secs(10), || {
        h.journal()
            .contains("reload: SIGHUP: /etc/lb/lb.toml: 0 added, 0 changed, 0 removed")
    });
    assert_eq!(h.main_pid(), pid);
    assert_eq!(h.active(), "active");

    // A reload applies what the file now says (the agent wrote no [firewall] table yet).
    h.sh("printf '[firewall]\\ndrop = [\"198.51.100.0/24\"]\\n' >> /etc/lb/lb.toml");
    h.sh(&format!("systemctl reload {UNIT}"));
    h.wait(
        "the edited file to be applied",
        Duration::from_secs(10),
        || {
            h.journal()
                .contains("reload: SIGHUP: /etc/lb/lb.toml: 1 added, 0 changed, 0 removed")
        },
    );
    assert!(
        h.lb("firewall list").contains("198.51.100.0/24"),
        "{}",
        h.journal()
    );
    assert_eq!(h.main_pid(), pid);

    h.sh("echo 'this is = not [ toml' >> /etc/lb/lb.toml");
    h.sh(&format!("systemctl reload {UNIT}"));
    h.wait(
        "the failed reload in the status line",
        Duration::from_secs(10),
        || {
            h.property("StatusText")
                .starts_with("reload failed: /etc/lb/lb.toml: line")
        },
    );
    let failed = h
        .journal_entries()
        .into_iter()
        .find(|e| message(e).contains("reload failed"))
        .unwrap_or_else(|| panic!("no failed reload in the journal:\n{}", h.journal()));
    assert_eq!(failed["PRIORITY"], "3", "{failed}");
    assert_eq!(h.main_pid(), pid);
    assert_eq!(h.active(), "active");
    h.all_answered(10);
}

/// Under steady load (a new connection every 20 ms), a `systemctl restart`, a package
/// upgrade (whose postinst restarts the unit on the new binary) and a crash (kill -9;
/// Restart=on-failure) fail no request: the pinned program forwards while no agent runs and
/// each new agent adopts it.
#[test]
fn restart_upgrade_and_crash_under_load_fail_no_request() {
    let _serial = serial();
    let h = Host::new();
    h.install(V1);
    h.sh(&format!("systemctl enable --now {UNIT}"));
    h.configure(vip4());
    let load = h
        .bed
        .load(
            vip4(),
            Duration::from_millis(20),
            Duration::from_secs(120),
            Some(2000),
        )
        .expect("starting the load");
    // Waits until attempts that started 2 s after now have been answered: the load ran
    // through whatever just happened and beyond.
    let run_on = || {
        load.wait_for(monotonic_us() + 2_000_000, Duration::from_secs(20), |_| {
            true
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
    };
    run_on();

    let mut pid = h.main_pid();
    h.sh(&format!("systemctl restart {UNIT}"));
    pid = h.new_agent("systemctl restart", pid);
    run_on();

    h.install(V2);
    pid = h.new_agent("the upgrade", pid);
    assert_eq!(h.sh("dpkg-query -W -f '${Version}' lb"), V2);
    run_on();

    let crashed_at = monotonic_us();
    h.sh(&format!("kill -9 {pid}"));
    h.new_agent("kill -9", pid);
    assert_eq!(h.property("NRestarts"), "1");
    run_on();

    let attempts = load.finish().expect("load");
    let failed: Vec<_> = attempts.iter().filter(|a| a.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        attempts.len()
    );
    // Both backends served after the crash: the new agent balances.
    for i in 1..=2 {
        let backend = name(i);
        assert!(
            attempts
                .iter()
                .filter(|a| a.start_us > crashed_at)
                .any(|a| a.backend() == Some(backend.as_str())),
            "{backend} served nothing after the crash"
        );
    }
    let took_over = h
        .journal_entries()
        .iter()
        .filter(|e| message(e).contains("took over eth0"))
        .count();
    assert_eq!(took_over, 3, "{}", h.journal());
    eprintln!(
        "{} requests, none failed, through a restart, an upgrade and a crash",
        attempts.len()
    );
}

/// An agent that stops answering (SIGSTOP: no watchdog pings) is killed by systemd's
/// watchdog and restarted, and it comes back adopting the pinned state.
#[test]
fn watchdog_restarts_a_hung_agent() {
    let _serial = serial();
    let h = Host::new();
    h.install(V1);
    // A short watchdog for the test; the unit's own is 30 s.
    h.sh(&format!(
        "mkdir -p /etc/systemd/system/{UNIT}.d && printf '[Service]\\nWatchdogSec=2s\\nTimeoutAbortSec=2s\\n' > /etc/systemd/system/{UNIT}.d/watchdog.conf && systemctl daemon-reload"
    ));
    h.sh(&format!("systemctl start {UNIT}"));
    h.configure(vip4());
    let pid = h.main_pid();
    h.sh(&format!("kill -STOP {pid}"));
    h.new_agent("SIGSTOP", pid);
    assert!(h.journal().contains("Watchdog timeout"), "{}", h.journal());
    assert!(h.journal().contains("took over eth0"), "{}", h.journal());
    h.all_answered(10);
}

/// Each capability the unit grants is needed: without any one of them the agent fails to
/// start (and says why in the journal).
#[test]
fn every_capability_of_the_unit_is_needed() {
    let _serial = serial();
    let h = Host::new();
    h.install(V1);
    let dropin = format!("/etc/systemd/system/{UNIT}.d");
    let caps = ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"];
    for cap in caps {
        let others = caps
            .iter()
            .filter(|c| **c != cap)
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        h.sh(&format!(
            "mkdir -p {dropin} && printf '[Service]\\nCapabilityBoundingSet=\\nCapabilityBoundingSet={others}\\nAmbientCapabilities=\\nAmbientCapabilities={others}\\nRestart=no\\n' > {dropin}/cap.conf && systemctl daemon-reload"
        ));
        let out = h
            .machine
            .run(&["systemctl", "start", UNIT])
            .expect("systemctl start");
        assert!(
            !out.status.success(),
            "the service started without {cap}:\n{}",
            h.journal()
        );
        // The agent ran and failed (exit code 1, its error in the journal), rather than
        // systemd failing to run it.
        assert_eq!(
            h.property("ExecMainStatus"),
            "1",
            "without {cap}:\n{}",
            h.journal()
        );
        h.sh(&format!(
            "systemctl reset-failed {UNIT}; rm -rf /sys/fs/bpf/lb/netns-$(stat -L -c %i /proc/self/ns/net)"
        ));
    }
    h.sh(&format!(
        "rm -r {dropin} && systemctl daemon-reload && systemctl start {UNIT}"
    ));
    assert_eq!(h.active(), "active");
}
