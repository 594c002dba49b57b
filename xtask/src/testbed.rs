//! A throw-away network of namespaces to run the balancer in, torn down on drop.
//!
//! ```text
//!                       switch ns "<prefix>-sw": bridge br0
//!        +----------------+---------------+-----------------+----------------+
//!     p-client           p-lb            p-b1       ...     p-bN   (veth, bridge side)
//!        |                |               |                 |
//!      eth0             eth0            eth0              eth0     (veth, host side)
//!  "<prefix>-client"  "<prefix>-lb"   "<prefix>-b1"      "<prefix>-bN"
//!   10.99.0.1          10.99.0.2       10.99.0.11        10.99.0.(10+N)
//!   fd00:99::1         fd00:99::2      fd00:99::11       fd00:99::(10+N)
//! ```
//!
//! One L2 segment. The client routes the VIPs (10.99.1.1/32, fd00:99:1::1/128) via the lb
//! host, whose XDP program rewrites the MACs and sends each packet back out to a backend.
//! More balancers can join the segment ([`Testbed::add_balancer`]: `lb2` at 10.99.0.3,
//! `lb3` at .4, ...), and the client's VIP routes can be moved to any of them
//! ([`Testbed::route_vips_via`]), as a router would move them between balancers.
//! Backends hold the VIPs on `lo` (and neither answer nor announce them in ARP), so they
//! accept the packets and answer the client directly: direct server return.
//!
//! Every test bed lives in namespaces of its own, named `lbt-<pid>-<n>-<role>`, so any
//! number can exist at once, even with the same addresses: nothing is shared between two
//! test beds but the host's kernel. Interface names are the same in every test bed (they
//! live inside the namespaces) and stay within the kernel's 15 characters.
//!
//! Processes run in a namespace through `nsenter --net=/run/netns/NAME` rather than
//! `ip netns exec`, which remounts /sys and so hides bpffs pins from them. Every process the
//! test bed starts is killed by its PID (never by name) when its [`Proc`] or the test bed is
//! dropped, and dies with the thread that started it if the test process itself is killed.
//! Only the namespaces this instance created are deleted.

use std::{
    collections::BTreeSet,
    ffi::OsStr,
    fs,
    io::{BufRead as _, BufReader, Read as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::{
        fs::MetadataExt as _,
        process::{CommandExt as _, ExitStatusExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

mod routed;

pub use crate::traffic::monotonic_us;
use crate::traffic::{Answer, Attempt, Tally};

/// The IPv4 VIP the client routes via the lb host and the backends hold on `lo`.
pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 1);
/// The IPv6 VIP, likewise.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 1, 0, 0, 0, 0, 1);
/// The port the backends serve HTTP on.
pub const HTTP_PORT: u16 = 80;
/// Interface name of every host's veth end.
pub const HOST_IF: &str = "eth0";

/// Longest any helper command may run before it is killed and reported.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// How a test bed is built.
#[derive(Clone, Debug)]
pub struct Config {
    /// Number of backend hosts on the segment (0..=50; routed ones are added apart).
    pub backends: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config { backends: 2 }
    }
}

/// A host of the test bed: a namespace with one interface on the segment.
#[derive(Clone, Debug)]
pub struct Host {
    /// Namespace name (also under /run/netns).
    pub ns: String,
    /// Its interface on the segment.
    pub ifname: String,
    /// The veth end in the switch namespace, on the bridge.
    pub switch_port: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Host {
    /// Host `role` of test bed `prefix`: namespace `<prefix>-<role>`, bridge port
    /// `p-<role>`, addresses 10.99.0.`last` and fd00:99::`last` (written with the same
    /// digits, ::11 for .11, so the two are easy to match).
    fn new(prefix: &str, role: &str, last: u8) -> Host {
        Host {
            ns: format!("{prefix}-{role}"),
            ifname: HOST_IF.into(),
            switch_port: format!("p-{role}"),
            ipv4: Ipv4Addr::new(10, 99, 0, last),
            ipv6: Ipv6Addr::new(
                0xfd00,
                0x99,
                0,
                0,
                0,
                0,
                0,
                u16::from_str_radix(&last.to_string(), 16).expect("decimal digits"),
            ),
        }
    }

    /// This host's address of the given family.
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 {
            self.ipv6.into()
        } else {
            self.ipv4.into()
        }
    }
}

/// What must be torn down for one test bed, shared with the signal handler.
struct Teardown {
    namespaces: Mutex<Vec<String>>,
    /// PIDs of started processes not yet reaped. Reaping happens under this lock, so a PID
    /// in here always still names our own child (alive or a zombie), never a reused PID.
    pids: Mutex<BTreeSet<u32>>,
    /// The temp dir, removed by the signal handler (`Drop` leaves that to `TempDir`).
    dir: PathBuf,
    /// Where an agent in one of our namespaces pins its maps and XDP link by default
    /// (`/sys/fs/bpf/lb/netns-<inode>`): agents killed with SIGKILL leave them behind, and
    /// pinned maps outlive the namespace, so they are removed with it.
    pin_dirs: Mutex<Vec<PathBuf>>,
}

impl Teardown {
    fn pids(&self) -> MutexGuard<'_, BTreeSet<u32>> {
        self.pids.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) {
        for &pid in self.pids().iter() {
            // SAFETY: plain syscall; the PID is an unreaped child of ours (see `pids`).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        for dir in std::mem::take(&mut *self.pin_dirs.lock().unwrap_or_else(|e| e.into_inner())) {
            let _ = fs::remove_dir_all(dir);
        }
        let namespaces =
            std::mem::take(&mut *self.namespaces.lock().unwrap_or_else(|e| e.into_inner()));
        // Hosts first, the switch (which holds the bridge ends of the veths) last.
        for ns in namespaces.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

static LIVE: Mutex<Vec<Arc<Teardown>>> = Mutex::new(Vec::new());
static INSTANCES: AtomicU32 = AtomicU32::new(0);

/// Tears every live test bed of this process down on SIGINT/SIGTERM/SIGHUP, then exits
/// with 130. For interactive use (the demo); tests rely on `Drop`.
pub fn teardown_on_signal() -> Result<()> {
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: tearing the test bed down");
        for t in LIVE.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            t.run();
            let _ = fs::remove_dir_all(&t.dir);
        }
        std::process::exit(130);
    })
    .context("installing the signal handler")
}

/// The namespace test bed. Build with [`Testbed::new`]; dropping it kills what it started
/// and deletes its namespaces.
pub struct Testbed {
    /// `lbt-<pid>-<n>`: every namespace name starts with it.
    pub prefix: String,
    /// The namespace holding the bridge.
    pub switch: String,
    pub client: Host,
    /// The balancer the client routes the VIPs through at first.
    pub lb: Host,
    /// Balancers added with [`Testbed::add_balancer`], in order (`lb2`, `lb3`, ...).
    pub extra_balancers: Vec<Host>,
    pub backends: Vec<Host>,
    teardown: Arc<Teardown>,
    dir: tempfile::TempDir,
    bin_dir: PathBuf,
}

impl Testbed {
    /// Checks the environment (see [`check_environment`]) and builds the namespaces.
    pub fn new(config: Config) -> Result<Testbed> {
        check_environment()?;
        if config.backends > 50 {
            bail!("a test bed has 0 to 50 backends, not {}", config.backends);
        }
        let n = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("lbt-{}-{n}", std::process::id());
        let client = Host::new(&prefix, "client", 1);
        let lb = Host::new(&prefix, "lb", 2);
        let backends = (1..=config.backends)
            .map(|i| Host::new(&prefix, &format!("b{i}"), 10 + i as u8))
            .collect();
        let dir = tempfile::Builder::new()
            .prefix("lbt-")
            .tempdir()
            .context("creating a temp dir")?;
        let bin_dir = bin_dir()?;
        let teardown = Arc::new(Teardown {
            namespaces: Mutex::new(Vec::new()),
            pids: Mutex::new(BTreeSet::new()),
            dir: dir.path().to_path_buf(),
            pin_dirs: Mutex::new(Vec::new()),
        });
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(teardown.clone());
        let bed = Testbed {
            switch: format!("{prefix}-sw"),
            prefix,
            client,
            lb,
            extra_balancers: Vec::new(),
            backends,
            teardown,
            dir,
            bin_dir,
        };
        // On error `bed` is dropped here, which removes whatever was already created.
        bed.build()
            .with_context(|| format!("building test bed {}", bed.prefix))?;
        Ok(bed)
    }

    fn hosts(&self) -> impl Iterator<Item = &Host> {
        [&self.client, &self.lb]
            .into_iter()
            .chain(self.backends.iter())
    }

    fn add_netns(&self, name: &str) -> Result<()> {
        run_ok(Command::new("ip").args(["netns", "add", name]))?;
        self.teardown
            .namespaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.to_string());
        let netns = Path::new("/run/netns").join(name);
        let inode = fs::metadata(&netns)
            .with_context(|| format!("reading {}", netns.display()))?
            .ino();
        self.teardown
            .pin_dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(PathBuf::from(format!("/sys/fs/bpf/lb/netns-{inode}")));
        self.ip(name, &["link", "set", "lo", "up"])
    }

    fn build(&self) -> Result<()> {
        self.add_netns(&self.switch)?;
        let sw = self.switch.as_str();
        // No STP (ports forward at once) and no multicast snooping (neighbour discovery's
        // multicast reaches every port without a querier).
        self.ip(
            sw,
            &[
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "stp_state",
                "0",
                "mcast_snooping",
                "0",
            ],
        )?;
        self.ip(sw, &["link", "set", "br0", "up"])?;
        for h in self.hosts() {
            self.add_host(h)?;
        }

        // The client reaches the VIPs through the balancer and sends full checksums:
        // partial (offloaded) checksums do not survive XDP_TX/REDIRECT between veths.
        let c = &self.client;
        self.route_vips_via(&self.lb)?;
        self.run_in_ok(&c.ns, "ethtool", ["-K", c.ifname.as_str(), "tx", "off"])?;
        self.prepare_balancer(&self.lb)?;

        for b in &self.backends {
            // The VIPs are local addresses here but must not be claimed on the segment.
            for scope in ["all", HOST_IF] {
                self.sysctl(&b.ns, &format!("net.ipv4.conf.{scope}.arp_ignore"), "1")?;
                self.sysctl(&b.ns, &format!("net.ipv4.conf.{scope}.arp_announce"), "2")?;
            }
            // One [::] socket serves both families.
            self.sysctl(&b.ns, "net.ipv6.bindv6only", "0")?;
            self.hold_vips(&b.ns)?;
            // Replies go straight to the client, which is on-link (connected /24 and /64):
            // no gateway, so no route through the balancer.
        }
        Ok(())
    }

    /// Creates `h`'s namespace and plugs it into the bridge with its addresses.
    fn add_host(&self, h: &Host) -> Result<()> {
        let sw = self.switch.as_str();
        self.add_netns(&h.ns)?;
        // Addresses must be usable at once: no duplicate address detection.
        self.sysctl(&h.ns, "net.ipv6.conf.all.accept_dad", "0")?;
        self.sysctl(&h.ns, "net.ipv6.conf.default.accept_dad", "0")?;
        self.sysctl(&h.ns, "net.ipv6.conf.default.accept_ra", "0")?;
        self.ip(
            sw,
            &[
                "link",
                "add",
                &h.switch_port,
                "type",
                "veth",
                "peer",
                "name",
                &h.ifname,
                "netns",
                &h.ns,
            ],
        )?;
        self.ip(sw, &["link", "set", &h.switch_port, "master", "br0", "up"])?;
        self.ip(&h.ns, &["link", "set", &h.ifname, "up"])?;
        self.ip(
            &h.ns,
            &["addr", "add", &format!("{}/24", h.ipv4), "dev", &h.ifname],
        )?;
        self.ip(
            &h.ns,
            &[
                "-6",
                "addr",
                "add",
                &format!("{}/64", h.ipv6),
                "dev",
                &h.ifname,
                "nodad",
            ],
        )?;
        Ok(())
    }

    /// Makes `lb` able to send with XDP_TX/XDP_REDIRECT: the bridge end of its veth must
    /// take those frames. GRO enables the NAPI that XDP_REDIRECT needs, and an XDP program
    /// (XDP_PASS) is what makes XDP_TX frames get delivered at all (see `xdp_pass`).
    fn prepare_balancer(&self, lb: &Host) -> Result<()> {
        let (sw, port) = (self.switch.as_str(), lb.switch_port.as_str());
        self.run_in_ok(sw, "ethtool", ["-K", port, "gro", "on"])?;
        self.run_in_ok(sw, self.bin("xtask")?, ["xdp-pass", "--iface", port])?;
        Ok(())
    }

    /// Adds another balancer host to the segment (`lb2` at 10.99.0.3, `lb3` at .4, ... up
    /// to `lb8`), prepared like the first for XDP_TX, and returns it (it is also kept in
    /// [`Testbed::extra_balancers`]). It gets no traffic until the client's VIP routes
    /// point at it ([`Testbed::route_vips_via`]); start an agent on it with
    /// [`Testbed::start_agent_on`].
    pub fn add_balancer(&mut self) -> Result<Host> {
        let n = self.extra_balancers.len() + 2;
        if n > 8 {
            bail!("a test bed has at most 8 balancers");
        }
        let h = Host::new(&self.prefix, &format!("lb{n}"), n as u8 + 1);
        self.add_host(&h)
            .and_then(|()| self.prepare_balancer(&h))
            .with_context(|| format!("adding balancer {}", h.ns))?;
        self.extra_balancers.push(h.clone());
        Ok(h)
    }

    /// Undoes what `new` does to the backends for direct server return (the VIPs on
    /// loopback, the ARP sysctls), leaving plain servers, as full NAT needs them; and lets
    /// the balancer forward (the FIB lookup of a NAT reply needs it). The backends' veths
    /// send frames, not 64 KB segments (as real NICs do; the client's are set the same).
    pub fn plain_backends_for_nat(&self) -> Result<()> {
        for b in &self.backends {
            self.ip(&b.ns, &["addr", "del", &format!("{VIP4}/32"), "dev", "lo"])?;
            self.ip(
                &b.ns,
                &["-6", "addr", "del", &format!("{VIP6}/128"), "dev", "lo"],
            )?;
            for scope in ["all", HOST_IF] {
                self.sysctl(&b.ns, &format!("net.ipv4.conf.{scope}.arp_ignore"), "0")?;
                self.sysctl(&b.ns, &format!("net.ipv4.conf.{scope}.arp_announce"), "0")?;
            }
            self.run_in_ok(&b.ns, "ethtool", ["-K", b.ifname.as_str(), "tx", "off"])?;
        }
        for key in [
            "net.ipv4.conf.all.forwarding",
            "net.ipv6.conf.all.forwarding",
        ] {
            self.sysctl(&self.lb.ns, key, "1")?;
        }
        Ok(())
    }

    /// Points the client's routes for both VIPs at balancer `lb` (replacing the routes it
    /// had), as a router moving the VIPs from one balancer to another would. Established
    /// connections keep going; their next packets go through `lb`.
    pub fn route_vips_via(&self, lb: &Host) -> Result<()> {
        let c = &self.client.ns;
        let v4 = lb.ipv4.to_string();
        let v6 = lb.ipv6.to_string();
        self.ip(c, &["route", "replace", &format!("{VIP4}/32"), "via", &v4])?;
        self.ip(
            c,
            &["-6", "route", "replace", &format!("{VIP6}/128"), "via", &v6],
        )
    }

    /// `ip -n NS ARGS...`, failing with its stderr.
    pub fn ip(&self, ns: &str, args: &[&str]) -> Result<()> {
        run_ok(Command::new("ip").arg("-n").arg(ns).args(args)).map(drop)
    }

    /// Puts `a4/len4` and `a6/64` on `ifname` in `ns` (no duplicate address detection to
    /// wait for) and brings it up.
    fn address(
        &self,
        ns: &str,
        ifname: &str,
        (a4, len4): (impl std::fmt::Display, u8),
        a6: impl std::fmt::Display,
    ) -> Result<()> {
        self.ip(ns, &["addr", "add", &format!("{a4}/{len4}"), "dev", ifname])?;
        let a6 = format!("{a6}/64");
        self.ip(ns, &["-6", "addr", "add", &a6, "dev", ifname, "nodad"])?;
        self.ip(ns, &["link", "set", ifname, "up"])
    }

    /// Both VIPs on `ns`'s loopback, as a backend that answers clients itself holds them.
    fn hold_vips(&self, ns: &str) -> Result<()> {
        self.ip(ns, &["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])?;
        let vip6 = format!("{VIP6}/128");
        self.ip(ns, &["-6", "addr", "add", &vip6, "dev", "lo", "nodad"])
    }

    fn sysctl(&self, ns: &str, key: &str, value: &str) -> Result<()> {
        self.run_in_ok(ns, "sysctl", ["-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn command_in(&self, ns: &str, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `program args` in `ns` to completion (killed after 30 s) and returns its output.
    pub fn run_in<I, S>(&self, ns: &str, program: impl AsRef<OsStr>, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command_in(ns, program);
        cmd.args(args);
        run_with_timeout(&mut cmd, COMMAND_TIMEOUT)
    }

    /// Like [`Testbed::run_in`], failing unless the command exits 0; returns its stdout.
    pub fn run_in_ok<I, S>(&self, ns: &str, program: impl AsRef<OsStr>, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command_in(ns, program);
        cmd.args(args);
        run_ok(&mut cmd)
    }

    /// Starts `program args` in `ns`; stdout and stderr go to a log file in the test bed's
    /// temp dir (see [`Proc::log`]). Killed by PID when the `Proc` or the test bed drops.
    pub fn spawn_in<I, S>(&self, ns: &str, program: impl AsRef<OsStr>, args: I) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command_in(ns, program);
        cmd.args(args);
        self.spawn(cmd, false)
    }

    /// Like [`Testbed::spawn_in`] with stdout piped to the caller ([`Proc::take_stdout`]).
    pub fn spawn_in_piped<I, S>(
        &self,
        ns: &str,
        program: impl AsRef<OsStr>,
        args: I,
    ) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command_in(ns, program);
        cmd.args(args);
        self.spawn(cmd, true)
    }

    fn spawn(&self, mut cmd: Command, pipe_stdout: bool) -> Result<Proc> {
        let label = describe(&cmd);
        let n = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let name = cmd
            .get_args()
            .nth(2)
            .and_then(|p| Path::new(p).file_name())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|| "proc".into());
        let log = self.dir.path().join(format!("{name}-{n}.log"));
        let log_file =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null());
        if pipe_stdout {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(log_file.try_clone()?);
        }
        cmd.stderr(log_file);
        die_with_parent(&mut cmd);
        let mut pids = self.teardown.pids();
        let child = cmd.spawn().with_context(|| format!("starting {label}"))?;
        pids.insert(child.id());
        drop(pids);
        Ok(Proc {
            child: Some(child),
            status: None,
            label,
            log,
            teardown: self.teardown.clone(),
        })
    }

    /// The test bed's private temp dir (agent socket, config, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Where `lb` and `xtask` are looked for.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Path of a workspace binary, or an error saying how to build it.
    pub fn bin(&self, name: &str) -> Result<PathBuf> {
        let path = self.bin_dir.join(name);
        if !path.is_file() {
            bail!(
                "{} not found: build the binaries first (`cargo build --workspace --exclude lb-ebpf --bins`, or run the tests with `cargo xtask test`)",
                path.display()
            );
        }
        Ok(path)
    }

    /// Starts `xtask serve --name backend-N --port 80` on every backend and waits until
    /// each listens.
    pub fn start_backends(&self) -> Result<Vec<Proc>> {
        (1..=self.backends.len())
            .map(|i| self.start_backend(i))
            .collect()
    }

    /// Starts backend `i` (1-based), answering with `backend-i`.
    pub fn start_backend(&self, i: usize) -> Result<Proc> {
        let host = self
            .backends
            .get(i.wrapping_sub(1))
            .ok_or_else(|| anyhow!("no backend {i}"))?;
        let xtask = self.bin("xtask")?;
        let name = format!("backend-{i}");
        let port = HTTP_PORT.to_string();
        let mut proc =
            self.spawn_in(&host.ns, xtask, ["serve", "--name", &name, "--port", &port])?;
        let ready = format!("{name} listening");
        wait_until(Duration::from_secs(10), || {
            if let Some(status) = proc.try_wait() {
                bail!(
                    "{name} exited with {status} before listening:\n{}",
                    proc.log()
                );
            }
            Ok(proc.log().contains(&ready))
        })
        .with_context(|| format!("waiting for {name} to listen"))?;
        Ok(proc)
    }

    /// Starts the agent in the lb namespace on its segment interface, with its control
    /// socket and config file given (use paths under [`Testbed::dir`]), and waits until
    /// `lb vip list` answers.
    pub fn start_agent(&self, config: &Path, socket: &Path) -> Result<Agent> {
        self.start_agent_on(&self.lb, config, socket, &[])
    }

    /// Like [`Testbed::start_agent`], on balancer host `lb` (e.g. one from
    /// [`Testbed::add_balancer`]) and with `extra` arguments appended to `lb run`. Started
    /// again with the same config file and socket (after a crash, say), an agent takes
    /// over what the previous one pinned in bpffs.
    pub fn start_agent_on(
        &self,
        lb: &Host,
        config: &Path,
        socket: &Path,
        extra: &[&str],
    ) -> Result<Agent> {
        let mut cmd = self.command_in(&lb.ns, self.bin("lb")?);
        cmd.args(["run", "--iface", &lb.ifname, "--config"])
            .arg(config)
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        let proc = self.spawn(cmd, false)?;
        let mut agent = Agent {
            proc,
            socket: socket.to_path_buf(),
            config: config.to_path_buf(),
        };
        agent.wait_ready(self, Duration::from_secs(20))?;
        Ok(agent)
    }

    /// Runs the `lb` CLI (in this namespace: it talks to the agent over a Unix socket) with
    /// `--socket` appended; killed after 30 s.
    pub fn lb_cli<I, S>(&self, socket: &Path, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(self.bin("lb")?);
        cmd.args(args).arg("--socket").arg(socket);
        run_with_timeout(&mut cmd, COMMAND_TIMEOUT)
    }

    /// Like [`Testbed::lb_cli`], failing unless it exits 0; returns stdout.
    pub fn lb_cli_ok<I, S>(&self, socket: &Path, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let out = self.lb_cli(socket, &args)?;
        if !out.status.success() {
            bail!(
                "`lb {}` failed ({}): {}",
                args.iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Makes `count` new TCP connections from the client to `to`, one request each (every
    /// connect and read has a 2 s timeout), and counts the answering backends.
    pub fn requests(&self, to: SocketAddr, count: u32) -> Result<Tally> {
        self.client_run(to, count, &[])
    }

    /// Like [`Testbed::requests`], connection i from source port `first_port + i` (closed
    /// with a reset, so the port is free again at once): the same call again makes the same
    /// flows, e.g. through another balancer, and ports nothing else used (below the
    /// ephemeral range, 32768) make flows the balancer has never seen. (The balancer's
    /// flow table outlives connections, so a connection from an ephemeral port the kernel
    /// hands out again is an old flow to it, pinned where the old one went.)
    pub fn requests_from(&self, to: SocketAddr, count: u32, first_port: u16) -> Result<Tally> {
        self.client_run(to, count, &["--source-port", &first_port.to_string()])
    }

    fn client_run(&self, to: SocketAddr, count: u32, extra: &[&str]) -> Result<Tally> {
        let xtask = self.bin("xtask")?;
        let mut args = vec![
            "client".to_string(),
            "--to".into(),
            to.to_string(),
            "--count".into(),
            count.to_string(),
            "--timeout-ms".into(),
            "2000".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let out = self.run_in(&self.client.ns, xtask, &args)?;
        if !out.status.success() {
            bail!(
                "xtask client failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "parsing client output {:?}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Opens one keep-alive connection from the client to `to`, sending a request every
    /// `interval` for at most `max` (then it stops by itself).
    pub fn keepalive(
        &self,
        to: SocketAddr,
        interval: Duration,
        max: Duration,
    ) -> Result<KeepAlive> {
        let proc = self.spawn_in_piped(
            &self.client.ns,
            self.bin("xtask")?,
            [
                "keepalive",
                "--to",
                &to.to_string(),
                "--interval-ms",
                &interval.as_millis().to_string(),
                "--max-secs",
                &max.as_secs().max(1).to_string(),
            ],
        )?;
        Ok(KeepAlive(Lines::follow(proc)?))
    }

    /// Starts steady load from the client: a new connection to `to` every `interval`, one
    /// request each (2 s timeouts), for at most `max`; every attempt is recorded with its
    /// start time and the answering backend or the error (see [`Load`]). With
    /// `first_port`, attempt n comes from source port `first_port + n` (as in
    /// [`Testbed::requests_from`]): use ports below the ephemeral range (32768) that
    /// nothing else used, and every attempt is a new flow for the balancer, never one its
    /// flow table remembers from an earlier connection that happened to reuse a port.
    pub fn load(
        &self,
        to: SocketAddr,
        interval: Duration,
        max: Duration,
        first_port: Option<u16>,
    ) -> Result<Load> {
        let mut extra = Vec::new();
        if let Some(p) = first_port {
            extra.extend(["--source-port".into(), p.to_string()]);
        }
        self.start_load(to, interval, max, extra)
    }

    /// Like [`Testbed::load`] with UDP: a datagram to `to` from a new socket every
    /// `interval`, each answered by its backend's name (2 s timeout), for at most `max`.
    pub fn load_udp(&self, to: SocketAddr, interval: Duration, max: Duration) -> Result<Load> {
        self.start_load(to, interval, max, vec!["--udp".into()])
    }

    fn start_load(
        &self,
        to: SocketAddr,
        interval: Duration,
        max: Duration,
        extra: Vec<String>,
    ) -> Result<Load> {
        let mut args = vec![
            "load".to_string(),
            "--to".into(),
            to.to_string(),
            "--interval-ms".into(),
            interval.as_millis().max(1).to_string(),
            "--max-secs".into(),
            max.as_secs().max(1).to_string(),
            "--timeout-ms".into(),
            "2000".into(),
        ];
        args.extend(extra);
        let proc = self.spawn_in_piped(&self.client.ns, self.bin("xtask")?, &args)?;
        Ok(Load(Lines::follow(proc)?))
    }

    /// The last `max_bytes` of every log in the test bed's temp dir, for failure reports.
    pub fn logs(&self, max_bytes: usize) -> String {
        let mut out = String::new();
        let Ok(entries) = fs::read_dir(self.dir.path()) else {
            return out;
        };
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths
            .into_iter()
            .filter(|p| p.extension() == Some(OsStr::new("log")))
        {
            let text = fs::read_to_string(&p).unwrap_or_default();
            let tail = &text[text.len().saturating_sub(max_bytes)..];
            let tail = tail.trim_end();
            out.push_str(&format!(
                "--- {} ---\n{}\n",
                p.display(),
                if tail.is_empty() { "(empty)" } else { tail }
            ));
        }
        out
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test bed {} logs:\n{}", self.prefix, self.logs(4000));
        }
        self.teardown.run();
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|t| !Arc::ptr_eq(t, &self.teardown));
    }
}

/// A process started in the test bed.
pub struct Proc {
    child: Option<Child>,
    status: Option<ExitStatus>,
    label: String,
    log: PathBuf,
    teardown: Arc<Teardown>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// The command line, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Its stdout, once, if started with [`Testbed::spawn_in_piped`].
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.as_mut().and_then(|c| c.stdout.take())
    }

    /// Everything it wrote to the log (stderr, and stdout unless piped) so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Its exit status if it has exited (reaping it), else `None`.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            let mut pids = self.teardown.pids();
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                pids.remove(&child.id());
                self.status = Some(status);
            }
        }
        self.status
    }

    /// Sends `signal` unless the process was already reaped.
    pub fn signal(&mut self, signal: i32) -> Result<()> {
        let pids = self.teardown.pids();
        if self.status.is_some() {
            bail!("{} already exited", self.label);
        }
        let pid = self.pid();
        if !pids.contains(&pid) {
            bail!("{} was already reaped", self.label);
        }
        // SAFETY: plain syscall on our own unreaped child.
        if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
            bail!(
                "signalling {}: {}",
                self.label,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if self.try_wait().is_some() {
            return;
        }
        let mut pids = self.teardown.pids();
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            if let Ok(status) = child.wait() {
                self.status = Some(status);
            }
            pids.remove(&child.id());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `lb` agent running in the lb namespace.
pub struct Agent {
    pub proc: Proc,
    pub socket: PathBuf,
    pub config: PathBuf,
}

impl Agent {
    /// Polls `lb vip list` until it exits 0; fails early if the agent exits.
    pub fn wait_ready(&mut self, bed: &Testbed, timeout: Duration) -> Result<()> {
        let mut last = String::new();
        let r = wait_until(timeout, || {
            if let Some(status) = self.proc.try_wait() {
                bail!(
                    "the agent exited with {status} before it was ready:\n{}",
                    self.proc.log()
                );
            }
            let out = bed.lb_cli(&self.socket, ["vip", "list"])?;
            last = String::from_utf8_lossy(&out.stderr).trim().to_string();
            Ok(out.status.success())
        });
        r.with_context(|| {
            format!(
                "waiting for the agent to answer `lb vip list` (last error: {last}); its log:\n{}",
                self.proc.log()
            )
        })
    }

    /// SIGTERM, then waits up to `timeout` for it to exit (SIGKILL after that, reported as
    /// an error). Returns the exit status.
    pub fn stop(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.proc.signal(libc::SIGTERM)?;
        match self.proc.wait_timeout(timeout) {
            Some(status) => Ok(status),
            None => {
                self.proc.kill();
                bail!(
                    "the agent did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    self.proc.log()
                )
            }
        }
    }
}

/// A process whose stdout lines are collected as they come, by a thread of their own.
struct Lines {
    proc: Proc,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl Lines {
    /// Follows `proc`, which must have been started with [`Testbed::spawn_in_piped`].
    fn follow(mut proc: Proc) -> Result<Lines> {
        let stdout = proc
            .take_stdout()
            .ok_or_else(|| anyhow!("{} has no piped stdout", proc.label()))?;
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Ok(Lines {
            proc,
            lines,
            reader: Some(reader),
        })
    }

    /// Every line so far, parsed with `parse` (lines it refuses are left out).
    fn parsed<T>(&self, parse: impl Fn(&str) -> Option<T>) -> Vec<T> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|l| parse(l))
            .collect()
    }

    /// Kills the process and waits for the last of its output.
    fn kill(&mut self) {
        self.proc.kill();
        self.join_reader();
    }

    fn join_reader(&mut self) {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// A keep-alive connection running in the client namespace.
pub struct KeepAlive(Lines);

impl KeepAlive {
    /// Answers so far, in order.
    pub fn answers(&self) -> Vec<Answer> {
        self.0.parsed(Answer::parse)
    }

    /// Waits until at least `n` answers (or any error) have arrived.
    pub fn wait_answers(&self, n: usize, timeout: Duration) -> Result<Vec<Answer>> {
        let mut answers = Vec::new();
        wait_until(timeout, || {
            answers = self.answers();
            Ok(answers.len() >= n || answers.iter().any(|a| matches!(a, Answer::Err { .. })))
        })
        .with_context(|| {
            format!(
                "waiting for {n} keep-alive answers; got {answers:?}; log:\n{}",
                self.0.proc.log()
            )
        })?;
        Ok(answers)
    }

    /// Stops the connection and returns every answer it got.
    pub fn stop(mut self) -> Vec<Answer> {
        self.0.kill();
        self.answers()
    }

    /// The process, e.g. to read its log.
    pub fn proc(&self) -> &Proc {
        &self.0.proc
    }
}

/// Steady load running in the client namespace (see [`Testbed::load`]).
pub struct Load(Lines);

impl Load {
    /// The attempts completed so far, in the order they started.
    pub fn attempts(&self) -> Vec<Attempt> {
        let mut v = self.0.parsed(Attempt::parse);
        v.sort_by_key(|a| a.seq);
        v
    }

    /// Waits until some attempt that started at `since_us` ([`monotonic_us`]) or later
    /// satisfies `f`, and returns it.
    pub fn wait_for(
        &self,
        since_us: u64,
        timeout: Duration,
        f: impl Fn(&Attempt) -> bool,
    ) -> Result<Attempt> {
        let mut found = None;
        wait_until(timeout, || {
            found = self
                .attempts()
                .into_iter()
                .find(|a| a.start_us >= since_us && f(a));
            Ok(found.is_some())
        })
        .with_context(|| format!("waiting for a load attempt; log:\n{}", self.0.proc.log()))?;
        Ok(found.expect("found"))
    }

    /// Stops starting new connections (SIGTERM), waits up to 5 s for those under way to
    /// finish, and returns every attempt, in the order they started. Fails if the load
    /// process does not end cleanly: then attempts could be missing.
    pub fn finish(mut self) -> Result<Vec<Attempt>> {
        let ended = match self.0.proc.signal(libc::SIGTERM) {
            Ok(()) => self.0.proc.wait_timeout(Duration::from_secs(5)),
            Err(_) => self.0.proc.try_wait(), // it had ended by itself
        };
        self.0.kill();
        match ended {
            Some(status) if status.success() => Ok(self.attempts()),
            other => bail!(
                "the load generator did not end cleanly ({other:?}); log:\n{}",
                self.0.proc.log()
            ),
        }
    }

    /// The process, e.g. to read its log.
    pub fn proc(&self) -> &Proc {
        &self.0.proc
    }
}

/// Where the workspace binaries are: the directory of the running executable, or its
/// parent when that is `deps/` (test executables live in `target/<profile>/deps/`).
pub fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", exe.display()))?;
    Ok(if dir.file_name() == Some(OsStr::new("deps")) {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    }
    .to_path_buf())
}

/// Fails, saying what is missing, unless this process runs as root with `ip`, `nsenter`,
/// `ethtool` and `sysctl` on PATH.
pub fn check_environment() -> Result<()> {
    let mut missing = Vec::new();
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        missing.push(
            "root (the test bed creates network namespaces and attaches XDP: run as root)"
                .to_string(),
        );
    }
    for tool in ["ip", "nsenter", "ethtool", "sysctl"] {
        if find_in_path(tool).is_none() {
            missing.push(format!("`{tool}` on PATH"));
        }
    }
    if !missing.is_empty() {
        bail!("the namespace test bed needs {}", missing.join(", "));
    }
    Ok(())
}

/// `name` found in one of PATH's directories.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Polls `f` every 50 ms until it returns true, errors, or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Makes the child die (SIGKILL) with the thread that starts it, so a killed test run
/// leaves no servers behind.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: getpid is async-signal-safe.
    let parent = unsafe { libc::getpid() };
    // SAFETY: prctl and getppid are async-signal-safe and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::other("parent exited during spawn"));
            }
            Ok(())
        });
    }
}

/// Runs `cmd` to completion with its output captured, killing it after `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let label = describe(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(cmd);
    let mut child = cmd.spawn().with_context(|| format!("starting {label}"))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{label}` did not finish within {timeout:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs `cmd`, failing with its stderr unless it exits 0; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let label = describe(cmd);
    let out = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
    if !out.status.success() {
        let how = match out.status.code() {
            Some(code) => format!("exit code {code}"),
            None => format!("signal {}", out.status.signal().unwrap_or(0)),
        };
        bail!(
            "`{label}` failed ({how}): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes namespaces left behind by test beds of processes that no longer exist (a test
/// run killed with SIGKILL cannot run its destructors), killing (by PID) whatever still
/// runs in them first. Returns the names deleted.
pub fn clean_stale() -> Result<Vec<String>> {
    let list = run_ok(Command::new("ip").args(["netns", "list"]))?;
    let mut deleted = Vec::new();
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix("lbt-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue; // its owner still runs and will clean up itself
        }
        let pids = run_ok(Command::new("ip").args(["netns", "pids", name])).unwrap_or_default();
        for p in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<libc::pid_t>().ok())
        {
            // SAFETY: plain syscall.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        run_ok(Command::new("ip").args(["netns", "del", name]))?;
        deleted.push(name.to_string());
    }
    Ok(deleted)
}
