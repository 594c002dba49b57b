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
    control::{self, Request, Response},
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

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub bulk: Vec<Bulk>,
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
        &Request::VipAdd {
            vip,
            proto: Proto::Tcp,
            algo: Some(Algo::Rr),
            check: CheckPatch::default(),
            rate_limit: None,
            burst: None,
        },
    )?)
}

fn backend_add(socket: &Path, vip: SocketAddr, backend: IpAddr) -> Result<()> {
    ok(control::call(
        socket,
        &Request::BackendAdd {
            vip,
            proto: Proto::Tcp,
            backend,
            weight: None,
            backup: None,
            check: CheckPatch::default(),
        },
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
        &Request::BackendDel {
            vip,
            proto: Proto::Tcp,
            backend,
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

    // ---- reaction, while the agent is small ----
    let (mut agent, _) = start_agent_timed(&bed, &config, &socket, Duration::from_secs(30))?;
    progress("control plane: backend add -> first flow on the new backend");
    reaction(&bed, &socket, opts.trials, &mut report)?;

    let mut neighbours = 0;
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
                &Request::VipSet {
                    vip,
                    proto: Proto::Tcp,
                    algo: Some(Algo::Maglev),
                    check: CheckPatch::default(),
                    rate_limit: None,
                    burst: None,
                },
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
            firewall: Default::default(),
            vips: vec![VipConfig {
                address: vip,
                proto: Proto::Tcp,
                algo: Algo::Rr,
                check: CheckSpec::default(),
                rate_limit: 0,
                burst: 0,
                backends: (0..count)
                    .map(|i| BackendConfig {
                        address: fake_backend(i),
                        weight: 1,
                        backup: false,
                        drain: false,
                        check: None,
                    })
                    .collect(),
            }],
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
        what: "`Datapath::write_ring`, 65,537 entries (library, one map update each)".into(),
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
