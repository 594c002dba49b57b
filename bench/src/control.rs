//! Control plane: how long changes take to apply, and to reach the data plane.
//!
//! - Bulk: N backends added to a VIP of a running agent one request at a time over its
//!   control socket (exactly the request `lb backend add` sends, without starting a process
//!   per backend), and the first part of it through the real `lb` CLI; and the same N
//!   backends from the config file at agent start (the batch path: rings built once).
//!   Backends must be on-link with a known MAC, so the balancer's namespace gets an extra
//!   /16 on its interface and a static (permanent) neighbour entry per backend address. No
//!   packet is ever sent to these addresses.
//! - Maglev: building the 65,537-entry table (library call `lb::model::maglev_ring`),
//!   writing it into the ring slab (`Datapath::write_ring`, one map update per entry), and
//!   both together through the socket (`lb vip set --algo maglev`).
//! - Reaction: from issuing `backend add` on the socket to the first new flow that the
//!   attached program (run under BPF_PROG_TEST_RUN, a new source port per call) sends to
//!   the new backend.
//! - At scale (issue 9): agent start with 10,000 backends in one VIP and in 100 VIPs x 100,
//!   against an empty configuration in the same run; single changes (add, set, drain,
//!   undrain, del) answered on the socket with 10,000 backends present, against the same
//!   changes on a one-backend VIP of the same agent; reads (`vip list`, `stats`, `backend
//!   list`) alone and while changes run; and a health-state change applied to the state
//!   and maps of 10,000 backends (library: `State::on_report` with the loaded program's
//!   maps), against one backend.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb::{
    config::{BackendConfig, Config, VipConfig},
    control::{self, BackendSpec, Request, Response, VipSpec},
    health::{CheckPatch, CheckSpec},
    model::{self, Algo, Proto, RingMember},
};
use lb_tests::fixtures::Pkt;
use serde::Serialize;
use xtask::testbed::{self, Testbed, VIP4};

use crate::{bpf, netns, stats::median};

#[derive(Clone, Debug)]
pub struct Options {
    /// Backend counts to apply.
    pub counts: Vec<u32>,
    /// How many of the first count's backends go through the `lb` CLI (a process each).
    pub cli: u32,
    /// Longest one bulk apply through the socket may take before it is stopped (and its
    /// rate reported).
    pub budget: Duration,
    /// Trials of the reaction measurement.
    pub trials: u32,
}

impl Options {
    pub fn full() -> Self {
        Options {
            counts: vec![1_000, 10_000],
            cli: 1_000,
            budget: Duration::from_secs(300),
            trials: 10,
        }
    }

    pub fn quick() -> Self {
        Options {
            counts: vec![1_000, 10_000],
            cli: 200,
            budget: Duration::from_secs(60),
            trials: 5,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Bulk {
    pub how: String,
    pub backends: u32,
    /// Backends applied before the budget ran out (= backends when it did not).
    pub applied: u32,
    pub secs: f64,
    /// ms per backend over the first and the last tenth applied.
    pub first_ms: f64,
    pub last_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    pub what: String,
    pub ms: f64,
}

/// One timed operation, with its same-run baseline.
#[derive(Clone, Debug, Serialize)]
pub struct Scaled {
    pub what: String,
    pub trials: usize,
    pub median_ms: f64,
    pub max_ms: f64,
    pub baseline: String,
    pub baseline_median_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub bulk: Vec<Bulk>,
    pub scaled: Vec<Scaled>,
    pub maglev: Vec<Timing>,
    /// Per trial: ms from issuing `backend add` to the answer, and to the first new flow
    /// forwarded to the new backend.
    pub reaction_answer_ms: Vec<f64>,
    pub reaction_first_flow_ms: Vec<f64>,
    pub notes: Vec<String>,
}

/// The address of fake backend `i`: 10.100.0.2 upwards, on the balancer's extra /16.
fn fake_backend(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 100, (i / 250) as u8, (i % 250) as u8 + 2))
}

fn ok(r: Response) -> Result<()> {
    match r {
        Response::Ok { .. } => Ok(()),
        Response::Error { error } => bail!("{error}"),
    }
}

fn vip_add(socket: &Path, vip: SocketAddr) -> Result<()> {
    ok(control::call(
        socket,
        &Request::VipAdd(VipSpec {
            algo: Some(Algo::Rr),
            ..VipSpec::new(vip, Proto::Tcp)
        }),
    )?)
}

fn backend_add(socket: &Path, vip: SocketAddr, backend: IpAddr) -> Result<()> {
    ok(control::call(
        socket,
        &Request::BackendAdd(BackendSpec {
            vip,
            proto: Proto::Tcp,
            backend,
            weight: None,
            backup: None,
            check: CheckPatch::default(),
        }),
    )?)
}

fn vip_del(socket: &Path, vip: SocketAddr) -> Result<()> {
    ok(control::call(
        socket,
        &Request::VipDel {
            vip,
            proto: Proto::Tcp,
        },
    )?)
}

fn backend_del(socket: &Path, vip: SocketAddr, backend: IpAddr) -> Result<()> {
    ok(control::call(
        socket,
        // At once: the benchmark measures the removal, not a grace period.
        &Request::BackendDel {
            vip,
            proto: Proto::Tcp,
            backend,
            grace_s: None,
            now: true,
        },
    )?)
}

/// Gives the balancer's namespace backend addresses `from..to` (on-link, on its extra
/// /16) with static MACs.
fn fake_neighbours(bed: &Testbed, from: u32, to: u32) -> Result<()> {
    if from >= to {
        return Ok(());
    }
    let mut batch = String::new();
    for i in from..to {
        let _ = writeln!(
            batch,
            "neigh replace {} lladdr 02:bb:00:00:{:02x}:{:02x} dev eth0 nud permanent",
            fake_backend(i),
            i >> 8 & 0xff,
            i & 0xff
        );
    }
    let file = bed.dir().join("neigh.batch");
    std::fs::write(&file, batch)?;
    let path = file.to_string_lossy().into_owned();
    bed.ip(&bed.lb.ns, &["-batch", &path])
}

fn bulk(
    vip: SocketAddr,
    count: u32,
    budget: Duration,
    how: &str,
    add: &mut dyn FnMut(IpAddr) -> Result<()>,
) -> Result<Bulk> {
    let started = Instant::now();
    let mut each = Vec::with_capacity(count as usize);
    for i in 0..count {
        let t = Instant::now();
        add(fake_backend(i)).with_context(|| format!("adding backend {i} to {vip}"))?;
        each.push(t.elapsed().as_secs_f64() * 1e3);
        if started.elapsed() > budget {
            break;
        }
    }
    let tenth = (each.len() / 10).max(1);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len().max(1) as f64;
    Ok(Bulk {
        how: how.into(),
        backends: count,
        applied: each.len() as u32,
        secs: started.elapsed().as_secs_f64(),
        first_ms: mean(&each[..tenth]),
        last_ms: mean(&each[each.len() - tenth..]),
    })
}

/// Starts `lb run` on the balancer's interface and returns it with the seconds until it
/// answered `lb vip list` (bounded by `limit`).
pub fn start_agent_timed(
    bed: &Testbed,
    config: &Path,
    socket: &Path,
    limit: Duration,
) -> Result<(testbed::Proc, f64)> {
    let lb = bed.bin("lb")?;
    let started = Instant::now();
    let mut proc = bed.spawn_in(
        &bed.lb.ns,
        lb,
        [
            "run".as_ref(),
            "--iface".as_ref(),
            "eth0".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            "--socket".as_ref(),
            socket.as_os_str(),
            "--no-pin".as_ref(),
            // Several agents run at once here; none serves metrics.
            "--metrics".as_ref(),
            "off".as_ref(),
        ],
    )?;
    testbed::wait_until(limit, || {
        if let Some(s) = proc.try_wait() {
            bail!("the agent exited ({s}):\n{}", proc.log());
        }
        Ok(control::call(socket, &Request::VipList).is_ok())
    })
    .with_context(|| format!("waiting for the agent to start with {}", config.display()))?;
    Ok((proc, started.elapsed().as_secs_f64()))
}

pub fn stop(mut agent: testbed::Proc) -> Result<()> {
    agent.signal(libc::SIGTERM)?;
    if agent.wait_timeout(Duration::from_secs(60)).is_none() {
        agent.kill();
    }
    Ok(())
}

pub fn run(opts: &Options, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    let mut report = Report {
        bulk: Vec::new(),
        scaled: Vec::new(),
        maglev: Vec::new(),
        reaction_answer_ms: Vec::new(),
        reaction_first_flow_ms: Vec::new(),
        notes: Vec::new(),
    };
    progress("control plane: test bed with 2 backends");
    let bed = Testbed::new(testbed::Config { backends: 2 })?;
    bed.ip(&bed.lb.ns, &["addr", "add", "10.100.0.1/16", "dev", "eth0"])?;
    let dir: PathBuf = bed.dir().to_path_buf();
    let socket = dir.join("lb.sock");
    let config = dir.join("lb.toml");

    // ---- at scale: 10,000 backends ----
    fake_neighbours(&bed, 0, SCALE + 1)?;
    scale(&bed, opts, &mut report, progress)?;
    health_at_scale(&mut report)?;

    // ---- reaction, while the agent is small ----
    let (mut agent, _) = start_agent_timed(&bed, &config, &socket, Duration::from_secs(30))?;
    progress("control plane: backend add -> first flow on the new backend");
    let mut neighbours = SCALE + 1;
    reaction(&bed, &socket, opts.trials, &mut report)?;

    for (k, &count) in opts.counts.iter().enumerate() {
        // As many neighbour entries as backends, as a host with that many would have
        // (the agent reads the whole table per backend resolved).
        fake_neighbours(&bed, neighbours, count)?;
        neighbours = neighbours.max(count);

        // ---- through the CLI and the socket, into the running agent ----
        let vip = SocketAddr::new(IpAddr::V4(VIP4), 1000 + k as u16);
        if k == 0 && opts.cli > 0 {
            progress(&format!(
                "control plane: {} backends through the lb CLI",
                opts.cli.min(count)
            ));
            vip_add(&socket, vip)?;
            let v = vip.to_string();
            let b = bulk(
                vip,
                opts.cli.min(count),
                opts.budget,
                "`lb backend add` (CLI, one process per backend)",
                &mut |addr| {
                    bed.lb_cli_ok(&socket, ["backend", "add", &v, &addr.to_string()])
                        .map(drop)
                },
            )?;
            report.bulk.push(b);
            vip_del(&socket, vip)?;
        }
        progress(&format!(
            "control plane: {count} backends through the control socket (budget {} s)",
            opts.budget.as_secs()
        ));
        vip_add(&socket, vip)?;
        let b = bulk(
            vip,
            count,
            opts.budget,
            "control socket, one `backend add` request each",
            &mut |addr| backend_add(&socket, vip, addr),
        )?;
        let applied = b.applied;
        report.bulk.push(b);
        if k == 0 {
            // Maglev over these backends, through the socket.
            let t = Instant::now();
            ok(control::call(
                &socket,
                &Request::VipSet(VipSpec {
                    algo: Some(Algo::Maglev),
                    ..VipSpec::new(vip, Proto::Tcp)
                }),
            )?)?;
            report.maglev.push(Timing {
                what: format!(
                    "`vip set --algo maglev` with {applied} backends (socket: build, write \
                     65,537 entries, flip, save config)"
                ),
                ms: t.elapsed().as_secs_f64() * 1e3,
            });
        }
        stop(agent)?;

        // ---- the config file at start ----
        let cfg = Config {
            vips: vec![one_vip_config(vip, 0..count)],
            ..Default::default()
        };
        let path = dir.join(format!("start-{count}.toml"));
        cfg.save(&path)?;
        let sock = dir.join(format!("start-{count}.sock"));
        progress(&format!(
            "control plane: agent start with {count} backends in the config file"
        ));
        match start_agent_timed(&bed, &path, &sock, opts.budget) {
            Ok((a, secs)) => {
                report.bulk.push(Bulk {
                    how: "config file at agent start (`lb run`, until it answers)".into(),
                    backends: count,
                    applied: count,
                    secs,
                    first_ms: f64::NAN,
                    last_ms: f64::NAN,
                });
                stop(a)?;
            }
            Err(e) => report.notes.push(format!(
                "agent start with {count} backends did not answer within {} s: {e:#}",
                opts.budget.as_secs()
            )),
        }
        // A fresh, empty agent for the next count.
        let fresh = dir.join(format!("fresh-{k}.toml"));
        agent = start_agent_timed(&bed, &fresh, &socket, Duration::from_secs(30))?.0;
    }
    stop(agent)?;

    // ---- Maglev through the library ----
    for &count in &opts.counts {
        let members: Vec<RingMember> = (0..count)
            .map(|i| RingMember {
                id: i + 1,
                weight: 1,
                addr: fake_backend(i),
            })
            .collect();
        let mut times = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let ring = model::maglev_ring(&members, model::MAGLEV_TABLE_SIZE);
            times.push(t.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(ring);
        }
        report.maglev.push(Timing {
            what: format!("`lb::model::maglev_ring`, {count} backends (library, median of 3)"),
            ms: median(&times),
        });
    }
    let mut dp = lb::datapath::Datapath::load()?;
    let ring: Vec<u32> = (0..model::MAGLEV_TABLE_SIZE)
        .map(|i| i % 1000 + 1)
        .collect();
    let t = Instant::now();
    dp.write_ring(0, &ring)?;
    report.maglev.push(Timing {
        what: "`Datapath::write_ring`, 65,537 entries (library, one batched update)".into(),
        ms: t.elapsed().as_secs_f64() * 1e3,
    });
    drop(bed);
    Ok(report)
}

/// Trials of: `backend add` b2 on the socket while this thread runs the attached program
/// on new flows until one comes out addressed to b2's MAC; then `backend del` b2.
fn reaction(bed: &Testbed, socket: &Path, trials: u32, report: &mut Report) -> Result<()> {
    let vip = SocketAddr::new(IpAddr::V4(VIP4), 80);
    vip_add(socket, vip)?;
    let (b1, b2) = (bed.backends[0].ipv4, bed.backends[1].ipv4);
    backend_add(socket, vip, IpAddr::V4(b1))?;
    let b2_mac = netns::mac(&bed.backends[1].ns, "eth0")?;
    let prog = bpf::prog_fd_by_id(netns::xdp_prog_id(&bed.lb.ns, "eth0")?)?;
    // Resolve b2's MAC once (the agent provokes ARP), so trials time the change alone.
    backend_add(socket, vip, IpAddr::V4(b2))?;
    backend_del(socket, vip, IpAddr::V4(b2))?;
    let client = bed.client.ipv4;
    let mut port: u16 = 1024;
    let mut out = vec![0u8; 256];
    for _ in 0..trials {
        std::thread::sleep(Duration::from_millis(600));
        let sock = socket.to_path_buf();
        let issued = Instant::now();
        let adder = std::thread::spawn(move || {
            let r = backend_add(&sock, vip, IpAddr::V4(b2));
            (r, Instant::now())
        });
        let deadline = issued + Duration::from_secs(10);
        let first = loop {
            port = port.checked_add(1).unwrap_or(1024);
            let frame = Pkt::tcp(SocketAddr::new(IpAddr::V4(client), port), vip).build();
            let run = bpf::test_run(prog.as_fd(), &frame, Some(&mut out), 1)?;
            if (run.retval == bpf::XDP_TX || run.retval == bpf::XDP_REDIRECT) && out[0..6] == b2_mac
            {
                break Instant::now();
            }
            if Instant::now() > deadline {
                bail!("no new flow reached the added backend within 10 s");
            }
            // Paced, so the probing thread leaves the agent a CPU (2-core machine); the
            // resolution is this pause plus one run, about 0.1 ms.
            std::thread::sleep(Duration::from_micros(50));
        };
        let (r, answered) = adder
            .join()
            .map_err(|_| anyhow::anyhow!("adder panicked"))?;
        r?;
        report
            .reaction_answer_ms
            .push((answered - issued).as_secs_f64() * 1e3);
        report
            .reaction_first_flow_ms
            .push((first - issued).as_secs_f64() * 1e3);
        backend_del(socket, vip, IpAddr::V4(b2))?;
    }
    Ok(())
}

/// Backends in the scale cases.
const SCALE: u32 = 10_000;

fn one_vip_config(vip: SocketAddr, backends: std::ops::Range<u32>) -> VipConfig {
    let backends = backends
        .map(|i| BackendConfig::new(fake_backend(i)))
        .collect();
    VipConfig::new(vip, Algo::Rr, backends)
}

/// `applied in N ms` from the agent's start-up line.
fn applied_ms(log: &str) -> f64 {
    log.split("applied in ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(f64::NAN)
}

fn timed(trials: usize, f: &mut dyn FnMut(usize) -> Result<()>) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(trials);
    for i in 0..trials {
        let t = Instant::now();
        f(i)?;
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

fn scaled(what: String, samples: &[f64], baseline: String, base: &[f64]) -> Scaled {
    Scaled {
        what,
        trials: samples.len(),
        median_ms: median(samples),
        max_ms: samples.iter().copied().fold(f64::NAN, f64::max),
        baseline,
        baseline_median_ms: median(base),
    }
}

fn request(socket: &Path, r: &Request) -> Result<()> {
    ok(control::call(socket, r)?)
}

/// Starts, changes and reads with 10,000 backends.
fn scale(
    bed: &Testbed,
    opts: &Options,
    report: &mut Report,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let dir = bed.dir().to_path_buf();
    let base_vip = SocketAddr::new(IpAddr::V4(VIP4), 2000);
    let big_vip = SocketAddr::new(IpAddr::V4(VIP4), 2001);
    let trials = (opts.trials as usize * 2).max(10);

    // Start: empty, 1 x 10,000 and 100 x 100, a few times each, interleaved.
    let cases: Vec<(String, Config)> = vec![
        ("empty configuration".into(), Config::default()),
        (
            format!("1 VIP x {SCALE} backends"),
            Config {
                vips: vec![one_vip_config(big_vip, 0..SCALE)],
                ..Default::default()
            },
        ),
        (
            format!("100 VIPs x {} backends", SCALE / 100),
            Config {
                vips: (0..100)
                    .map(|v| {
                        let vip = SocketAddr::new(IpAddr::V4(VIP4), 3000 + v as u16);
                        one_vip_config(vip, v * (SCALE / 100)..(v + 1) * (SCALE / 100))
                    })
                    .collect(),
                ..Default::default()
            },
        ),
    ];
    let mut start: Vec<(Vec<f64>, Vec<f64>)> = vec![Default::default(); cases.len()];
    for round in 0..3 {
        for (i, (name, cfg)) in cases.iter().enumerate() {
            progress(&format!(
                "control plane: agent start, {name} (round {round})"
            ));
            let path = dir.join(format!("scale-start-{i}.toml"));
            cfg.save(&path)?;
            let sock = dir.join(format!("scale-start-{i}.sock"));
            let (agent, secs) = start_agent_timed(bed, &path, &sock, Duration::from_secs(120))?;
            start[i].0.push(secs * 1e3);
            start[i].1.push(applied_ms(&agent.log()));
            stop(agent)?;
        }
    }
    for (i, (name, _)) in cases.iter().enumerate().skip(1) {
        report.scaled.push(scaled(
            format!("`lb run` start with {name}: process start to answering (ms)"),
            &start[i].0,
            "same, empty configuration".into(),
            &start[0].0,
        ));
        report.scaled.push(scaled(
            format!("  of which applying the configuration (agent's log, before attach)"),
            &start[i].1,
            "same, empty configuration".into(),
            &start[0].1,
        ));
    }

    // Changes and reads on a running agent with 10,000 backends, beside a small VIP.
    let mut cfg = Config {
        vips: vec![
            one_vip_config(base_vip, SCALE..SCALE + 1),
            one_vip_config(big_vip, 0..SCALE),
        ],
        ..Default::default()
    };
    cfg.vips[0].backends.clear();
    let path = dir.join("scale-run.toml");
    cfg.save(&path)?;
    let sock = dir.join("scale-run.sock");
    let (agent, _) = start_agent_timed(bed, &path, &sock, Duration::from_secs(120))?;
    progress("control plane: single changes with 10,000 backends present");
    let spare = fake_backend(SCALE);
    let one = fake_backend(SCALE - 1);
    let changes: Vec<(&str, Box<dyn Fn(SocketAddr, IpAddr) -> Request>)> = vec![
        (
            "backend add",
            Box::new(|vip, b| {
                Request::BackendAdd(BackendSpec {
                    vip,
                    proto: Proto::Tcp,
                    backend: b,
                    weight: None,
                    backup: None,
                    check: CheckPatch::default(),
                })
            }),
        ),
        (
            "backend set --weight 2",
            Box::new(|vip, b| {
                Request::BackendSet(BackendSpec {
                    vip,
                    proto: Proto::Tcp,
                    backend: b,
                    weight: Some(2),
                    backup: None,
                    check: CheckPatch::default(),
                })
            }),
        ),
        (
            "backend drain",
            Box::new(|vip, b| Request::BackendDrain {
                vip,
                proto: Proto::Tcp,
                backend: b,
                drain: true,
            }),
        ),
        (
            "backend undrain",
            Box::new(|vip, b| Request::BackendDrain {
                vip,
                proto: Proto::Tcp,
                backend: b,
                drain: false,
            }),
        ),
        (
            "backend del",
            Box::new(|vip, b| Request::BackendDel {
                vip,
                proto: Proto::Tcp,
                backend: b,
                grace_s: None,
                now: true,
            }),
        ),
    ];
    let mut big: Vec<Vec<f64>> = vec![Vec::new(); changes.len()];
    let mut small: Vec<Vec<f64>> = vec![Vec::new(); changes.len()];
    for _ in 0..trials {
        for (i, (_, make)) in changes.iter().enumerate() {
            big[i].extend(timed(1, &mut |_| request(&sock, &make(big_vip, spare)))?);
            small[i].extend(timed(1, &mut |_| request(&sock, &make(base_vip, one)))?);
        }
    }
    for (i, (name, _)) in changes.iter().enumerate() {
        report.scaled.push(scaled(
            format!("`{name}` answered on the socket, VIP with {SCALE} backends (ms)"),
            &big[i],
            "same change, VIP with 1 backend, same agent".into(),
            &small[i],
        ));
    }

    progress("control plane: reads with 10,000 backends present");
    let reads: Vec<(&str, Request)> = vec![
        ("vip list", Request::VipList),
        ("stats", Request::Stats),
        (
            "backend list (walks the flow table)",
            Request::BackendList {
                vip: None,
                proto: Proto::Tcp,
            },
        ),
    ];
    // Big first, on this agent; the baseline after it, on an agent with one backend (one
    // agent attaches to the interface at a time).
    let mut big_reads = Vec::new();
    for (_, r) in &reads {
        big_reads.push(timed(trials, &mut |_| request(&sock, r))?);
    }
    // Reads while changes run: a reader thread times `stats` while this one adds and
    // removes a backend of the big VIP in a loop.
    progress("control plane: reads while changes run");
    let stop_flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let sock = sock.clone();
        let stop_flag = stop_flag.clone();
        std::thread::spawn(move || -> Result<Vec<f64>> {
            let mut t = Vec::new();
            while !stop_flag.load(std::sync::atomic::Ordering::Relaxed) && t.len() < 2000 {
                t.extend(timed(1, &mut |_| request(&sock, &Request::VipList))?);
            }
            Ok(t)
        })
    };
    let quiet = timed(trials, &mut |_| request(&sock, &Request::VipList))?;
    for _ in 0..trials {
        request(&sock, &changes[0].1(big_vip, spare))?;
        request(&sock, &changes[4].1(big_vip, spare))?;
    }
    stop_flag.store(true, std::sync::atomic::Ordering::Relaxed);
    let busy = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    report.scaled.push(scaled(
        format!("`vip list` while `backend add`/`del` run back to back, {SCALE} backends (ms)"),
        &busy,
        "`vip list` with no change running, same agent".into(),
        &quiet,
    ));
    stop(agent)?;

    let small_sock = dir.join("scale-small.sock");
    let small_path = dir.join("scale-small.toml");
    Config {
        vips: vec![one_vip_config(base_vip, SCALE..SCALE + 1)],
        ..Default::default()
    }
    .save(&small_path)?;
    let (small_agent, _) =
        start_agent_timed(bed, &small_path, &small_sock, Duration::from_secs(60))?;
    for ((name, r), big_t) in reads.iter().zip(&big_reads) {
        let small_t = timed(trials, &mut |_| request(&small_sock, r))?;
        report.scaled.push(scaled(
            format!("`{name}` answered, {SCALE} backends (ms)"),
            big_t,
            "same, an agent with 1 backend".into(),
            &small_t,
        ));
    }
    stop(small_agent)?;
    Ok(())
}

/// A health-state change of one backend among 10,000 applied to the state and the loaded
/// program's maps (what the agent does under its lock when a check result arrives), against
/// the same with one backend. Round robin and Maglev.
fn health_at_scale(report: &mut Report) -> Result<()> {
    use lb::{
        health::{CheckKind, Outcome, Report as CheckReport},
        model::{L2Path, Reach},
        state::State,
    };
    let trials = 40;
    let check = CheckSpec {
        check: CheckKind::Tcp,
        rise: 1,
        fall: 1,
        ..Default::default()
    };
    let run = |count: u32, algo: Algo| -> Result<Vec<f64>> {
        let dp = lb::datapath::Datapath::load()?;
        let mut state = State::new(dp, None);
        let vip = SocketAddr::new(IpAddr::V4(VIP4), 80);
        let mut vc = one_vip_config(vip, 0..count);
        vc.algo = algo;
        vc.check = check.clone();
        let reach = vc
            .backends
            .iter()
            .map(|b| {
                let l2 = L2Path {
                    ifindex: 1,
                    src_mac: [2, 0, 0, 0, 0, 1],
                    dst_mac: [2, 0, 0, 0, 0, 2],
                    via: None,
                };
                let r = Reach {
                    l2: Some(l2),
                    ..Default::default()
                };
                (b.address, r)
            })
            .collect();
        state.apply(
            &Config {
                vips: vec![vc],
                ..Default::default()
            },
            &reach,
        )?;
        let service = lb::model::Service::new(vip, Proto::Tcp)?;
        let b = state.backend(&service, fake_backend(count / 2))?;
        let (id, generation) = (b.id, b.generation);
        timed(trials, &mut |i| {
            let changed = state.on_report(CheckReport {
                backend_id: id,
                generation,
                outcome: Outcome {
                    ok: i % 2 == 1,
                    latency_us: 1,
                    detail: String::new(),
                },
            })?;
            if !changed {
                bail!("the report did not change the backend's state");
            }
            Ok(())
        })
    };
    for algo in [Algo::Rr, Algo::Maglev] {
        let base = run(1, algo)?;
        let big = run(SCALE, algo)?;
        report.scaled.push(scaled(
            format!(
                "health change of 1 backend among {SCALE} ({algo}): result to maps written                  (library, `State::on_report`, ms)"
            ),
            &big,
            format!("same, 1 backend ({algo})"),
            &base,
        ));
    }
    Ok(())
}
