//! End to end in the namespace test bed (`xtask::testbed`): client, balancer and one
//! backend on one bridge, each in its own namespace, all created (and removed) by the run.
//!
//! - Packets per second forwarded, counted at the receiver (the backend interface's
//!   kernel RX counter): live frames (BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES,
//!   run in the balancer's namespace as if received on its interface: the frames are
//!   really transmitted) through lb's attached program, beside a bare XDP_REDIRECT and a
//!   bare XDP_TX program writing the same MACs; and the public generators trafgen
//!   (netsniff-ng) and tcpreplay sending from the client, through lb and straight to the
//!   backend.
//! - HTTP requests/s with wrk from the client, keep-alive and `Connection: close`, to the
//!   backend directly, through lb's VIP (direct server return), through HAProxy (mode
//!   tcp, balance roundrobin) and through nginx stream, both of which run in the
//!   balancer's namespace and proxy to the same backend (a full proxy: the client connects
//!   to the proxy's address, the proxy opens its own connection to the backend). The
//!   backend is nginx (one worker) answering a fixed body.
//!
//! Traffic goes only to addresses in the namespaces this run created; every generator
//! runs for a bounded time and is killed by PID.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use etherparse::PacketBuilder;
use serde::Serialize;
use xtask::testbed::{self, Proc, Testbed, VIP4};

use crate::{bpf, control, netns, stats::median};

#[derive(Clone, Debug)]
pub struct Options {
    /// Measurement window of each packet-rate run.
    pub window: Duration,
    /// wrk duration of each run.
    pub wrk: Duration,
    /// wrk connections.
    pub connections: u32,
    /// Repetitions of every run (interleaved); the median is reported.
    pub reps: u32,
}

impl Options {
    pub fn full() -> Self {
        Options {
            window: Duration::from_secs(3),
            wrk: Duration::from_secs(10),
            connections: 32,
            reps: 3,
        }
    }

    pub fn quick() -> Self {
        Options {
            window: Duration::from_secs(1),
            wrk: Duration::from_secs(3),
            connections: 32,
            reps: 1,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Rate {
    pub group: String,
    pub what: String,
    /// Median over repetitions.
    pub value: f64,
    pub samples: Vec<f64>,
    /// Name of the row this one is compared with, and the ratio.
    pub versus: Option<(String, f64)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub packets: Vec<Rate>,
    pub http: Vec<Rate>,
    pub notes: Vec<String>,
}

const UDP_PORT: u16 = 9000;
const HAPROXY_PORT: u16 = 8080;
const NGINX_PORT: u16 = 8081;

/// A 60-byte UDP frame from the client to `dst` (the VIP or the backend's address),
/// addressed at L2 to `dst_mac`.
fn udp_frame(bed: &Testbed, dst_mac: [u8; 6], sport: u16) -> Result<Vec<u8>> {
    let src_mac = netns::mac(&bed.client.ns, "eth0")?;
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(bed.client.ipv4.octets(), VIP4.octets(), 64)
        .udp(sport, UDP_PORT)
        .write(&mut out, &[0x5a; 18])?;
    Ok(out)
}

fn sysctl(bed: &Testbed, ns: &str, kv: &str) -> Result<()> {
    bed.run_in_ok(ns, "sysctl", ["-qw", kv]).map(drop)
}

pub fn run(opts: &Options, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    for tool in ["trafgen", "tcpreplay", "wrk", "haproxy", "nginx"] {
        if testbed::find_in_path(tool).is_none() {
            bail!("{tool} not found: `cargo xtask bench` installs it (apt)");
        }
    }
    let mut report = Report {
        packets: Vec::new(),
        http: Vec::new(),
        notes: Vec::new(),
    };
    progress("end to end: test bed with 1 backend, nginx on it, the agent");
    let bed = Testbed::new(testbed::Config { backends: 1 })?;
    let b1 = bed.backends[0].clone();
    for ns in [&bed.client.ns, &bed.lb.ns] {
        // Short connections at many thousands a second need the whole port range and
        // TIME_WAIT reuse (namespace-local settings of namespaces this run created).
        sysctl(&bed, ns, "net.ipv4.ip_local_port_range=1024 65535")?;
        sysctl(&bed, ns, "net.ipv4.tcp_tw_reuse=1")?;
    }
    let backend = start_nginx_backend(&bed)?;
    let socket = bed.dir().join("lb.sock");
    let (agent, _) = control::start_agent_timed(
        &bed,
        &bed.dir().join("lb.toml"),
        &socket,
        Duration::from_secs(30),
    )?;
    let vip_http = SocketAddr::new(IpAddr::V4(VIP4), 80);
    let vip_udp = SocketAddr::new(IpAddr::V4(VIP4), UDP_PORT);
    for (vip, proto) in [(vip_http, "tcp"), (vip_udp, "udp")] {
        let v = vip.to_string();
        bed.lb_cli_ok(&socket, ["vip", "add", &v, "--proto", proto])?;
        bed.lb_cli_ok(
            &socket,
            ["backend", "add", &v, &b1.ipv4.to_string(), "--proto", proto],
        )?;
    }

    let result = packets(&bed, opts, progress, &mut report)
        .and_then(|()| http(&bed, opts, progress, &mut report));
    drop(backend);
    drop(agent);
    kill_leftovers(&bed);
    drop(bed);
    result.map(|()| report)
}

// ---- packets per second -----------------------------------------------------------------

/// Packets the backend's interface received while `during` ran.
fn received(bed: &Testbed, during: impl FnOnce() -> Result<Duration>) -> Result<(u64, Duration)> {
    let ns = &bed.backends[0].ns;
    let before = netns::rx_packets(ns, "eth0")?;
    let took = during()?;
    // Frames still in flight (queues between the veths) land within a moment.
    std::thread::sleep(Duration::from_millis(50));
    let after = netns::rx_packets(ns, "eth0")?;
    Ok((after - before, took))
}

fn packets(
    bed: &Testbed,
    opts: &Options,
    progress: &mut dyn FnMut(&str),
    report: &mut Report,
) -> Result<()> {
    let lb_mac = netns::mac(&bed.lb.ns, "eth0")?;
    let b1_mac = netns::mac(&bed.backends[0].ns, "eth0")?;
    let lb_ifindex = netns::ifindex(&bed.lb.ns, "eth0")?;
    let lb_prog = bpf::prog_fd_by_id(netns::xdp_prog_id(&bed.lb.ns, "eth0")?)?;
    let redirect = bpf::load_xdp(
        "bench_redirect",
        &bpf::set_macs_redirect(b1_mac, lb_mac, lb_ifindex),
    )?;
    let tx = bpf::load_xdp("bench_set_tx", &bpf::set_macs_tx(b1_mac, lb_mac))?;
    let frame = udp_frame(bed, lb_mac, 5000)?;

    // ---- live frames ----
    progress("end to end: live frames (lb, bare XDP_REDIRECT, bare XDP_TX)");
    let progs = [
        ("lb (attached program, XDP_TX)", lb_prog.as_fd()),
        (
            "bare XDP_REDIRECT (bpf_redirect, same MACs)",
            redirect.as_fd(),
        ),
        ("bare XDP_TX (same MACs)", tx.as_fd()),
    ];
    // Calibrate the frame count so that a run lasts about the window.
    let (n, took) = received(bed, || {
        live(bed, progs[1].1, &frame, lb_ifindex, 200_000, 200_000)
    })?;
    let rate = n as f64 / took.as_secs_f64();
    let frames = ((rate * opts.window.as_secs_f64()) as u32).clamp(100_000, 50_000_000);
    let mut samples = vec![Vec::new(); progs.len()];
    let mut generated = vec![Vec::new(); progs.len()];
    for _ in 0..opts.reps {
        for (k, (_, prog)) in progs.iter().enumerate() {
            let per_call = if k == 0 { LIVE_BATCH } else { frames };
            let (n, took) = received(bed, || {
                live(bed, *prog, &frame, lb_ifindex, frames, per_call)
            })?;
            samples[k].push(n as f64 / took.as_secs_f64());
            generated[k].push(f64::from(frames) / took.as_secs_f64());
        }
    }
    let base = median(&samples[1]);
    for (k, (name, _)) in progs.iter().enumerate() {
        let v = median(&samples[k]);
        report.packets.push(Rate {
            group: "live frames (BPF_F_TEST_XDP_LIVE_FRAMES, batch 64)".into(),
            what: (*name).into(),
            value: v,
            samples: samples[k].clone(),
            versus: Some(("bare XDP_REDIRECT".into(), v / base)),
        });
    }
    // How fast each program ran and transmitted the frames (what the balancer itself
    // sustains), whatever the veths and the bridge behind it then carried.
    let base_run = median(&generated[1]);
    for (k, (name, _)) in progs.iter().enumerate() {
        let v = median(&generated[k]);
        report.packets.push(Rate {
            group: "live frames: frames run and transmitted per second (not all arrive)".into(),
            what: (*name).into(),
            value: v,
            samples: generated[k].clone(),
            versus: Some(("bare XDP_REDIRECT".into(), v / base_run)),
        });
        report.notes.push(format!(
            "live frames, {name}: {:.0}% of the frames run reached the backend (the rest \
             were dropped on the way: the veth and bridge path behind the balancer carries \
             less than the programs transmit)",
            100.0 * median(&samples[k]) / v
        ));
    }

    live_many_flows(bed, opts, progress, report, &progs[..2], lb_mac, lb_ifindex)?;

    // ---- public generators ----
    let through_lb = frame.clone();
    let direct = udp_frame(bed, b1_mac, 5000)?;
    progress("end to end: trafgen and tcpreplay, through lb and straight to the backend");
    let cfg_lb = trafgen_config(bed.dir(), "lb", &through_lb)?;
    let cfg_direct = trafgen_config(bed.dir(), "direct", &direct)?;
    let pcap_lb = pcap(bed.dir(), "lb", bed, lb_mac)?;
    let pcap_direct = pcap(bed.dir(), "direct", bed, b1_mac)?;
    type Gen<'a> = (&'a str, &'a str, Vec<String>);
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let gens: Vec<Gen> = vec![
        ("trafgen", "through lb", trafgen_args(&s(&cfg_lb))),
        (
            "trafgen",
            "straight to the backend",
            trafgen_args(&s(&cfg_direct)),
        ),
        ("tcpreplay", "through lb", tcpreplay_args(&s(&pcap_lb))),
        (
            "tcpreplay",
            "straight to the backend",
            tcpreplay_args(&s(&pcap_direct)),
        ),
    ];
    let mut samples = vec![Vec::new(); gens.len()];
    for _ in 0..opts.reps {
        for (k, (tool, _, args)) in gens.iter().enumerate() {
            samples[k].push(generator_rate(bed, tool, args, opts.window)?);
        }
    }
    for (k, (tool, what, _)) in gens.iter().enumerate() {
        let v = median(&samples[k]);
        let direct = median(&samples[k | 1]);
        report.packets.push(Rate {
            group: format!("{tool} from the client (one flow)"),
            what: (*what).into(),
            value: v,
            samples: samples[k].clone(),
            versus: Some(("straight to the backend".into(), v / direct)),
        });
    }
    Ok(())
}

/// Frames per live-frames batch, and per BPF_PROG_TEST_RUN call: each call gets a page
/// pool of its own with one batch of pages, each holding a fresh copy of the frame. A
/// call of more frames recycles pages, and a recycled page still holds the frame as the
/// program rewrote it: lb would then see a frame addressed to the backend's MAC and pass
/// it up (`pass_not_our_mac`), timing a pass instead of a forward.
const LIVE_BATCH: u32 = 64;

/// Runs `frames` live frames (rounded up to whole calls) through `prog` in the balancer's
/// namespace, `per_call` a BPF_PROG_TEST_RUN call: `LIVE_BATCH` for lb (fresh pages every
/// time); all in one call for the bare programs, which write the same MACs into any page
/// and would otherwise pay, on every call, the kernel's update of its XDP dispatcher for a
/// program attached nowhere (milliseconds: `bpf_prog_change_xdp`, text poking; lb's program
/// is attached, so its calls do not). lb's figure therefore carries a page pool set up per
/// 64 frames that the bare programs' does not: it errs on lb's side.
fn live(
    bed: &Testbed,
    prog: std::os::fd::BorrowedFd<'_>,
    frame: &[u8],
    ifindex: u32,
    frames: u32,
    per_call: u32,
) -> Result<Duration> {
    netns::run_in(&bed.lb.ns, || {
        let t = Instant::now();
        for _ in 0..frames.div_ceil(per_call) {
            bpf::test_run_live(prog, frame, ifindex, per_call, LIVE_BATCH)
                .context("live-frames test run")?;
        }
        Ok(t.elapsed())
    })
}

/// Flows of the many-flows live-frames runs (distinct source ports), split between CPUs.
const MANY_FLOWS: u16 = 2_000;
/// Frames per BPF_PROG_TEST_RUN call in those runs: one call sends one batch of one
/// flow's frame (see `LIVE_BATCH`).
const FRAMES_PER_FLOW_CALL: u32 = LIVE_BATCH;

/// Live frames of many flows, from one CPU and from both at once: each thread pinned to
/// its CPU sends its own flows in turn (one call per flow), so lb's flow table, its LRU and
/// the veth's transmit queue are shared by two CPUs as on a NIC with two RX queues. lb and
/// the bare XDP_REDIRECT program, interleaved; frames run per second summed over threads,
/// and what reached the backend.
fn live_many_flows(
    bed: &Testbed,
    opts: &Options,
    progress: &mut dyn FnMut(&str),
    report: &mut Report,
    progs: &[(&str, std::os::fd::BorrowedFd<'_>)],
    lb_mac: [u8; 6],
    lb_ifindex: u32,
) -> Result<()> {
    progress("end to end: live frames, 2,000 flows on one CPU and on both (lb, bare XDP_REDIRECT)");
    let flows = (0..MANY_FLOWS)
        .map(|i| udp_frame(bed, lb_mac, 10_000 + i))
        .collect::<Result<Vec<_>>>()?;
    // Every flow is made once before timing, so the runs measure established flows.
    let cpus_all = [0usize, 1];
    live_flows(
        bed,
        progs[0].1,
        &flows,
        lb_ifindex,
        &cpus_all,
        1,
        Duration::ZERO,
    )?;
    let configs: [(&str, &[usize]); 2] = [("1 CPU", &cpus_all[..1]), ("2 CPUs at once", &cpus_all)];
    let mut ran = vec![vec![Vec::new(); progs.len()]; configs.len()];
    let mut arrived = vec![vec![Vec::new(); progs.len()]; configs.len()];
    for _ in 0..opts.reps {
        for (c, (_, cpus)) in configs.iter().enumerate() {
            for (k, (_, prog)) in progs.iter().enumerate() {
                let mut frames = 0;
                let (n, took) = received(bed, || {
                    let (f, took) = live_flows(
                        bed,
                        *prog,
                        &flows,
                        lb_ifindex,
                        cpus,
                        FRAMES_PER_FLOW_CALL,
                        opts.window,
                    )?;
                    frames = f;
                    Ok(took)
                })?;
                ran[c][k].push(frames as f64 / took.as_secs_f64());
                arrived[c][k].push(n as f64 / took.as_secs_f64());
            }
        }
    }
    for (group, values) in [
        (
            "live frames, 2,000 flows: frames run and transmitted per second",
            &ran,
        ),
        (
            "live frames, 2,000 flows: packets/s at the backend",
            &arrived,
        ),
    ] {
        for (c, (cpus, _)) in configs.iter().enumerate() {
            let base = median(&values[c][1]);
            for (k, (name, _)) in progs.iter().enumerate() {
                let v = median(&values[c][k]);
                report.packets.push(Rate {
                    group: group.into(),
                    what: format!("{name}, {cpus}"),
                    value: v,
                    samples: values[c][k].clone(),
                    versus: Some((format!("bare XDP_REDIRECT, {cpus}"), v / base)),
                });
            }
        }
    }
    Ok(())
}

/// Sends `flows` in turn, `frames` live frames per call, from one thread per CPU of `cpus`
/// (thread t takes every len(cpus)-th flow from t) until `window` ends or every thread has
/// made 1,000,000 calls; the frames run in all and the time taken.
fn live_flows(
    bed: &Testbed,
    prog: std::os::fd::BorrowedFd<'_>,
    flows: &[Vec<u8>],
    ifindex: u32,
    cpus: &[usize],
    frames: u32,
    window: Duration,
) -> Result<(u64, Duration)> {
    let started = Instant::now();
    let deadline = started + window;
    let ran = std::thread::scope(|s| {
        let threads: Vec<_> = cpus
            .iter()
            .enumerate()
            .map(|(t, &cpu)| {
                s.spawn(move || {
                    netns::run_in(&bed.lb.ns, || {
                        crate::dataplane::pin_to_cpu(cpu)?;
                        let mine = flows.iter().skip(t).step_by(cpus.len());
                        let mut ran = 0u64;
                        // One pass at least (the warm-up relies on it), then until the deadline.
                        for (i, frame) in mine.clone().cycle().take(1_000_000).enumerate() {
                            if i >= mine.len() && Instant::now() >= deadline {
                                break;
                            }
                            bpf::test_run_live(prog, frame, ifindex, frames, LIVE_BATCH)
                                .context("live-frames test run")?;
                            ran += u64::from(frames);
                        }
                        Ok(ran)
                    })
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow!("a live-frames thread panicked"))?
            })
            .sum::<Result<u64>>()
    })?;
    Ok((ran, started.elapsed()))
}

fn trafgen_config(dir: &Path, name: &str, frame: &[u8]) -> Result<std::path::PathBuf> {
    let mut cfg = String::from("{\n");
    for chunk in frame.chunks(12) {
        let line: Vec<String> = chunk.iter().map(|b| format!("0x{b:02x}")).collect();
        let _ = writeln!(cfg, "  {},", line.join(", "));
    }
    cfg.push_str("}\n");
    let path = dir.join(format!("trafgen-{name}.cfg"));
    std::fs::write(&path, cfg)?;
    Ok(path)
}

fn trafgen_args(cfg: &str) -> Vec<String> {
    // One sending process; a bounded count as a second stop beside the kill.
    [
        "--dev",
        "eth0",
        "--conf",
        cfg,
        "--cpus",
        "1",
        "--num",
        "200000000",
    ]
    .map(String::from)
    .to_vec()
}

fn tcpreplay_args(pcap: &str) -> Vec<String> {
    [
        "--intf1=eth0",
        "--topspeed",
        "--preload-pcap",
        "--loop=0",
        "--duration=60",
        "--quiet",
        pcap,
    ]
    .map(String::from)
    .to_vec()
}

/// A pcap of 1,000 frames (one flow each, so after the first loop all established).
fn pcap(dir: &Path, name: &str, bed: &Testbed, dst_mac: [u8; 6]) -> Result<std::path::PathBuf> {
    let path = dir.join(format!("replay-{name}.pcap"));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
    // Global header: magic, version 2.4, zone, sigfigs, snaplen, Ethernet.
    for v in [0xa1b2_c3d4u32] {
        f.write_all(&v.to_le_bytes())?;
    }
    f.write_all(&2u16.to_le_bytes())?;
    f.write_all(&4u16.to_le_bytes())?;
    for v in [0u32, 0, 65_535, 1] {
        f.write_all(&v.to_le_bytes())?;
    }
    for i in 0..1000u32 {
        let frame = udp_frame(bed, dst_mac, 20_000 + i as u16)?;
        for v in [0u32, i, frame.len() as u32, frame.len() as u32] {
            f.write_all(&v.to_le_bytes())?;
        }
        f.write_all(&frame)?;
    }
    f.flush()?;
    Ok(path)
}

/// Starts a generator in the client namespace, lets it settle, and measures the rate the
/// backend receives over `window`; then kills it.
fn generator_rate(bed: &Testbed, tool: &str, args: &[String], window: Duration) -> Result<f64> {
    let mut proc = bed.spawn_in(&bed.client.ns, tool, args)?;
    std::thread::sleep(Duration::from_millis(700));
    if let Some(s) = proc.try_wait() {
        bail!("{tool} exited early ({s}):\n{}", proc.log());
    }
    let (n, took) = received(bed, || {
        std::thread::sleep(window);
        Ok(window)
    })?;
    proc.kill();
    Ok(n as f64 / took.as_secs_f64())
}

// ---- HTTP -------------------------------------------------------------------------------

/// A server with worker processes (nginx): stopped with SIGTERM so the master takes its
/// workers down with it (a SIGKILLed master would orphan them), then killed if need be.
struct Server(Proc);

impl Drop for Server {
    fn drop(&mut self) {
        if self.0.signal(libc::SIGTERM).is_ok() {
            let _ = self.0.wait_timeout(Duration::from_secs(5));
        }
        self.0.kill();
    }
}

/// Kills (by PID) whatever still runs in the test bed's namespaces, before they go.
fn kill_leftovers(bed: &Testbed) {
    let mut all = vec![bed.switch.clone(), bed.client.ns.clone(), bed.lb.ns.clone()];
    all.extend(bed.backends.iter().map(|b| b.ns.clone()));
    for ns in all {
        let Ok(out) = std::process::Command::new("ip")
            .args(["netns", "pids", &ns])
            .output()
        else {
            continue;
        };
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<libc::pid_t>().ok())
        {
            // SAFETY: plain syscall; the process lives in a namespace this run created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// nginx on the backend: one worker, a fixed answer, keep-alive without a request limit.
fn start_nginx_backend(bed: &Testbed) -> Result<Server> {
    let dir = bed.dir().join("nginx-b1");
    std::fs::create_dir_all(&dir)?;
    let d = dir.to_string_lossy();
    let conf = format!(
        "user root;\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\nevents {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
         uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         keepalive_requests 10000000;\n  keepalive_timeout 60s;\n  \
         server {{\n    listen 80 backlog=4096;\n    location / {{ return 200 \"backend-1\\n\"; }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let p = path.to_string_lossy().into_owned();
    let server = Server(bed.spawn_in(
        &bed.backends[0].ns,
        "nginx",
        ["-c", p.as_str(), "-p", &d, "-e", &format!("{d}/error.log")],
    )?);
    wait_http(bed, SocketAddr::new(IpAddr::V4(bed.backends[0].ipv4), 80))?;
    Ok(server)
}

/// Waits until a request from the client to `to` is answered.
fn wait_http(bed: &Testbed, to: SocketAddr) -> Result<()> {
    testbed::wait_until(Duration::from_secs(10), || {
        Ok(bed.requests(to, 1).is_ok_and(|t| t.errors.is_empty()))
    })
    .with_context(|| format!("waiting for HTTP answers from {to}"))
}

fn start_haproxy(bed: &Testbed) -> Result<Server> {
    let conf = format!(
        "global\n  maxconn 8000\n\ndefaults\n  mode tcp\n  timeout connect 2s\n  \
         timeout client 30s\n  timeout server 30s\n\nfrontend fe\n  bind {}:{HAPROXY_PORT}\n  \
         default_backend be\n\nbackend be\n  balance roundrobin\n  server b1 {}:80\n",
        bed.lb.ipv4, bed.backends[0].ipv4
    );
    let path = bed.dir().join("haproxy.cfg");
    std::fs::write(&path, conf)?;
    let p = path.to_string_lossy().into_owned();
    let server = Server(bed.spawn_in(&bed.lb.ns, "haproxy", ["-f", p.as_str(), "-db"])?);
    wait_http(bed, SocketAddr::new(IpAddr::V4(bed.lb.ipv4), HAPROXY_PORT))?;
    Ok(server)
}

fn start_nginx_stream(bed: &Testbed) -> Result<Server> {
    let dir = bed.dir().join("nginx-stream");
    std::fs::create_dir_all(&dir)?;
    let d = dir.to_string_lossy();
    let module = "/usr/lib/nginx/modules/ngx_stream_module.so";
    let conf = format!(
        "load_module {module};\nuser root;\nworker_processes auto;\ndaemon off;\n\
         pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 8192; }}\n\
         stream {{\n  upstream be {{ server {}:80; }}\n  \
         server {{ listen {}:{NGINX_PORT} backlog=4096; proxy_pass be; }}\n}}\n",
        bed.backends[0].ipv4, bed.lb.ipv4
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let p = path.to_string_lossy().into_owned();
    let server = Server(bed.spawn_in(
        &bed.lb.ns,
        "nginx",
        ["-c", p.as_str(), "-p", &d, "-e", &format!("{d}/error.log")],
    )?);
    wait_http(bed, SocketAddr::new(IpAddr::V4(bed.lb.ipv4), NGINX_PORT))?;
    Ok(server)
}

/// Requests/s from one wrk run (errors make it fail).
fn wrk(bed: &Testbed, url: &str, close: bool, opts: &Options) -> Result<f64> {
    let secs = format!("{}s", opts.wrk.as_secs().max(1));
    let conns = opts.connections.to_string();
    let mut args = vec!["-t1", "-c", &conns, "-d", &secs, "--timeout", "2s"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let out = bed.run_in(&bed.client.ns, "wrk", &args)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "wrk {url} failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| anyhow!("no Requests/sec in wrk's output:\n{text}"))?;
    if let Some(l) = text
        .lines()
        .find(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
    {
        bail!("wrk {url}: {l}\n{text}");
    }
    Ok(rps)
}

fn http(
    bed: &Testbed,
    opts: &Options,
    progress: &mut dyn FnMut(&str),
    report: &mut Report,
) -> Result<()> {
    progress("end to end: HAProxy and nginx stream in the balancer's namespace");
    let _haproxy = start_haproxy(bed)?;
    let _nginx = start_nginx_stream(bed)?;
    let b1 = bed.backends[0].ipv4;
    let targets = [
        ("straight to the backend", format!("http://{b1}/")),
        ("lb VIP (DSR)", format!("http://{VIP4}/")),
        (
            "HAProxy (mode tcp)",
            format!("http://{}:{HAPROXY_PORT}/", bed.lb.ipv4),
        ),
        (
            "nginx stream",
            format!("http://{}:{NGINX_PORT}/", bed.lb.ipv4),
        ),
    ];
    for (close, mode) in [(false, "keep-alive"), (true, "Connection: close")] {
        progress(&format!(
            "end to end: wrk {mode}, {} targets x {} runs of {} s",
            targets.len(),
            opts.reps,
            opts.wrk.as_secs()
        ));
        let mut samples = vec![Vec::new(); targets.len()];
        for _ in 0..opts.reps {
            for (k, (_, url)) in targets.iter().enumerate() {
                samples[k].push(wrk(bed, url, close, opts)?);
            }
        }
        let direct = median(&samples[0]);
        let haproxy = median(&samples[2]);
        for (k, (name, _)) in targets.iter().enumerate() {
            let v = median(&samples[k]);
            report.http.push(Rate {
                group: format!(
                    "wrk {mode} (-t1 -c{}, {} s)",
                    opts.connections,
                    opts.wrk.as_secs()
                ),
                what: (*name).into(),
                value: v,
                samples: samples[k].clone(),
                versus: Some(("straight to the backend".into(), v / direct)),
            });
        }
        let lb = median(&samples[1]);
        report.notes.push(format!(
            "wrk {mode}: lb VIP / HAProxy = {:.2}×, lb VIP / straight = {:.2}×",
            lb / haproxy,
            lb / direct
        ));
    }
    Ok(())
}
