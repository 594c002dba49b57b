//! Flow sharing between balancers (`lb::flowsync`): what it costs the data plane's new-flow
//! path, how many new flows per second one balancer can share, and how soon a peer has the
//! pin.
//!
//! - **New-flow cost**: the real program under BPF_PROG_TEST_RUN, one run per call, a new
//!   TCP SYN every call, with sharing off (one array read more than before) and on (the
//!   event written into the ring, which is drained between batches, and every call checked
//!   to have made exactly one event), beside the MAC-swap XDP_TX baseline, taking turns as
//!   in the data-plane part; medians over rounds, ratios to the baseline.
//! - **Throughput and delay**: two programs with their own maps (balancers A and B, the
//!   same VIP and backend addresses under different backend ids) and the real sharing
//!   loop of each (`lb::flowsync::sync::run`) on a tokio runtime, over UDP on loopback.
//!   Throughput: one thread makes `flows` new flows on A as fast as BPF_PROG_TEST_RUN
//!   allows; the figure is the pins B installed per second, from the first new flow to the
//!   last install, beside the rate the generator made them (the same-run baseline: the
//!   share keeps up if the two are equal). Delay: one new flow on A, then B's flow table
//!   is polled (one map lookup a microsecond or so) until the pin is there; the baseline
//!   is a bare UDP datagram between two loopback sockets, timed the same way.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsFd as _,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb::flowsync::{
    directory::Directory,
    sync::{self, Link, Maps, Stats},
    wire::Key,
};
use lb_common::{FlowEvent, PROTO_TCP};
use lb_tests::fixtures::{Fixture, Pkt, TCP_SYN, TEST_RUN_IFINDEX, flow_key, vip_key};
use serde::Serialize;

use crate::{
    bpf::{self, XDP_TX},
    stats::{Summary, median},
};

#[derive(Clone, Debug)]
pub struct Options {
    pub calls: u32,
    pub rounds: u32,
    /// New flows made for the throughput figure, per round.
    pub flows: u32,
    /// Single flows timed for the delay figure.
    pub delays: u32,
}

impl Options {
    pub fn full() -> Self {
        Options {
            calls: 5_000,
            rounds: 9,
            flows: 200_000,
            delays: 500,
        }
    }

    pub fn quick() -> Self {
        Options {
            calls: 2_000,
            rounds: 5,
            flows: 100_000,
            delays: 200,
        }
    }

    pub fn smoke() -> Self {
        Options {
            calls: 20,
            rounds: 1,
            flows: 1_000,
            delays: 5,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CostRow {
    pub case: String,
    pub ns: Summary,
    pub ratio_tx: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    /// New flows per second the generator made on A (BPF_PROG_TEST_RUN, one thread).
    pub made_per_s: f64,
    /// Pins per second B installed, first new flow to last install.
    pub shared_per_s: f64,
    pub made: u64,
    pub installed: u64,
    /// Events A's data plane could not write into a full ring.
    pub ring_drops: u64,
    pub datagrams_rejected: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Delay {
    pub median_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub samples: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub cost: Vec<CostRow>,
    /// Per round.
    pub throughput: Vec<Throughput>,
    pub delay: Delay,
    pub udp_delay: Delay,
}

const VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10)), 80);
const BACKENDS: u32 = 4;

/// A program with one round-robin VIP over `BACKENDS` backends whose ids start at
/// `first_id`, and its directory (what the agent would build from its state).
fn balancer(first_id: u32) -> (Fixture, Directory) {
    let mut fx = Fixture::new();
    let mut dir = Directory::new(1);
    let ids: Vec<u32> = (first_id..first_id + BACKENDS).collect();
    for (i, id) in ids.iter().enumerate() {
        let addr = IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1 + i as u8));
        fx.backend(*id, addr, TEST_RUN_IFINDEX);
        dir.add_backend(vip_key(VIP, PROTO_TCP), addr, *id, 1);
    }
    fx.vip(VIP, PROTO_TCP, 0, 0, &ids);
    (fx, dir)
}

/// A SYN from a new client on every call: (address, port) from a counter.
struct NewFlows {
    frame: Vec<u8>,
    next: u32,
}

impl NewFlows {
    fn new(first: u32) -> Self {
        let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 0)), 1);
        NewFlows {
            frame: Pkt::tcp(src, VIP).flags(TCP_SYN).build(),
            next: first,
        }
    }

    /// The next frame, and its client.
    fn next(&mut self) -> (&[u8], SocketAddr) {
        let i = self.next;
        self.next += 1;
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i / 50_000);
        let port = 10_000 + (i % 50_000) as u16;
        self.frame[26..30].copy_from_slice(&ip.octets());
        self.frame[34..36].copy_from_slice(&port.to_be_bytes());
        (&self.frame, SocketAddr::new(IpAddr::V4(ip), port))
    }
}

// ---- the new-flow path with sharing off and on ------------------------------------------

fn cost(opts: &Options, progress: &mut dyn FnMut(&str)) -> Result<Vec<CostRow>> {
    progress("flow sharing: the new-flow path with sharing off and on");
    let (mut fx, _) = balancer(1);
    let prog = fx.dp.program_fd()?;
    let mut ring = fx.dp.take_flow_events()?;
    let tx = bpf::load_xdp("bench_mac_swap", &bpf::mac_swap_tx())?;
    let tx_frame = Pkt::tcp("198.18.0.1:1000".parse()?, VIP).build();
    let mut flows = NewFlows::new(0);
    const CASES: [&str; 3] = [
        "baseline: MAC-swap XDP_TX",
        "new IPv4 TCP flow, sharing off",
        "new IPv4 TCP flow, sharing on",
    ];
    let mut rounds: [Vec<f64>; 3] = Default::default();
    let mut durations = Vec::with_capacity(opts.calls as usize);
    for round in 0..=opts.rounds {
        for turn in 0..3 {
            let case = (turn + round as usize) % 3;
            durations.clear();
            if case > 0 {
                fx.dp.set_flow_sharing(case == 2)?;
            }
            for _ in 0..opts.calls {
                let run = if case == 0 {
                    bpf::test_run(tx.as_fd(), &tx_frame, None, 1)?
                } else {
                    let (frame, _) = flows.next();
                    bpf::test_run(prog.as_fd(), frame, None, 1)?
                };
                if run.retval != XDP_TX {
                    bail!("{}: XDP action {}", CASES[case], run.retval);
                }
                durations.push(f64::from(run.duration_ns));
            }
            let mut events = 0u32;
            while let Some(item) = ring.next() {
                bytemuck::try_pod_read_unaligned::<FlowEvent>(&item)
                    .map_err(|e| anyhow::anyhow!("a ring record of another size: {e}"))?;
                events += 1;
            }
            let want = if case == 2 { opts.calls } else { 0 };
            if events != want {
                bail!("{}: {events} events for {} calls", CASES[case], opts.calls);
            }
            if round > 0 {
                rounds[case].push(median(&durations));
            }
        }
    }
    fx.dp.set_flow_sharing(false)?;
    let base = median(&rounds[0]);
    Ok(CASES
        .iter()
        .zip(&rounds)
        .map(|(case, r)| {
            let ns = Summary::of_rounds(r);
            CostRow {
                case: case.to_string(),
                ratio_tx: ns.median / base,
                ns,
            }
        })
        .collect())
}

// ---- two balancers sharing over loopback ----------------------------------------------

struct Fleet {
    a: Fixture,
    b: Fixture,
    stats_a: Arc<Stats>,
    stats_b: Arc<Stats>,
    runtime: tokio::runtime::Runtime,
}

fn fleet() -> Result<Fleet> {
    let (mut a, dir_a) = balancer(1);
    let (mut b, dir_b) = balancer(101);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let key = Key::new(b"the benchmark fleet's shared key")?;
    let sock_a = sync::bind("127.0.0.1:0".parse()?)?;
    let sock_b = sync::bind("127.0.0.1:0".parse()?)?;
    let (addr_a, addr_b) = (sock_a.local_addr()?, sock_b.local_addr()?);
    let (stats_a, stats_b) = (Arc::new(Stats::default()), Arc::new(Stats::default()));
    for (fx, sock, local, peer, dir, stats) in [
        (&mut a, sock_a, addr_a, addr_b, dir_a, &stats_a),
        (&mut b, sock_b, addr_b, addr_a, dir_b, &stats_b),
    ] {
        let maps = Maps {
            ring: fx.dp.take_flow_events()?,
            flows: fx.dp.flow_table()?,
            drops: fx.dp.flow_share_drops()?,
        };
        fx.dp.set_flow_sharing(true)?;
        let key = key.clone();
        let stats = stats.clone();
        runtime.spawn(async move {
            let link = Link {
                socket: tokio::net::UdpSocket::from_std(sock).expect("a tokio socket"),
                local,
                peers: vec![peer],
                key,
            };
            if let Err(e) = sync::run(maps, link, dir, stats).await {
                eprintln!("flow sharing loop: {e:#}");
            }
        });
    }
    Ok(Fleet {
        a,
        b,
        stats_a,
        stats_b,
        runtime,
    })
}

fn throughput(fleet: &mut Fleet, flows: &mut NewFlows, n: u32) -> Result<Throughput> {
    let prog = fleet.a.dp.program_fd()?;
    let installed0 = fleet.stats_b.installed.load(Relaxed);
    let drops = fleet.a.dp.flow_share_drops()?;
    let lost = || -> Result<u64> { Ok(drops.get(&0, 0)?.iter().sum()) };
    let drops0 = lost()?;
    let events0 = fleet.stats_a.events.load(Relaxed);
    let started = Instant::now();
    for _ in 0..n {
        let (frame, _) = flows.next();
        let run = bpf::test_run(prog.as_fd(), frame, None, 1)?;
        if run.retval != XDP_TX {
            bail!("a new flow came out with XDP action {}", run.retval);
        }
    }
    let made = started.elapsed();
    // Until A has read its ring dry (every new flow read or lost to the full ring), sent
    // (or given up on) every event it read, and B has taken every datagram A sent (or
    // nothing moved for 5 s): the last install ends the run. A counts an event when it
    // reads it and a pin once sent, so `sent` lags `events` while A is sending.
    let progress = |f: &Fleet| {
        (
            f.stats_a.events.load(Relaxed),
            f.stats_a.sent.load(Relaxed),
            f.stats_a.unsent.load(Relaxed),
            f.stats_b.received.load(Relaxed),
            f.stats_b.installed.load(Relaxed),
        )
    };
    let (mut last, mut last_change) = (progress(fleet), Instant::now());
    loop {
        let now = progress(fleet);
        if now != last {
            (last, last_change) = (now, Instant::now());
        }
        let (events, sent, unsent, received, installed) = now;
        let ring_dry = events - events0 + lost()? - drops0 >= u64::from(n);
        if (ring_dry && sent + unsent >= events && received >= sent && installed == received)
            || last_change.elapsed() > Duration::from_secs(5)
        {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let done = last_change.max(started + made) - started;
    let installed = fleet.stats_b.installed.load(Relaxed) - installed0;
    Ok(Throughput {
        made_per_s: f64::from(n) / made.as_secs_f64(),
        shared_per_s: installed as f64 / done.as_secs_f64(),
        made: n.into(),
        installed,
        ring_drops: lost()? - drops0,
        datagrams_rejected: fleet.stats_b.rejected.iter().map(|r| r.load(Relaxed)).sum(),
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn delay_of(mut samples: Vec<f64>) -> Delay {
    samples.sort_by(f64::total_cmp);
    Delay {
        median_us: median(&samples),
        p99_us: percentile(&samples, 0.99),
        max_us: *samples.last().unwrap_or(&f64::NAN),
        samples: samples.len(),
    }
}

fn delay(fleet: &mut Fleet, flows: &mut NewFlows, n: u32) -> Result<Delay> {
    let prog = fleet.a.dp.program_fd()?;
    let mut samples = Vec::new();
    for _ in 0..n {
        std::thread::sleep(Duration::from_millis(5));
        let (frame, client) = flows.next();
        let key = flow_key(client, VIP, PROTO_TCP);
        let started = Instant::now();
        bpf::test_run(prog.as_fd(), frame, None, 1)?;
        while fleet.b.dp.flow(&key).is_none() {
            if started.elapsed() > Duration::from_secs(5) {
                bail!(
                    "B had no pin for {client} 5 s after A made it; A: {:?}; B: {:?}",
                    fleet.stats_a.view(),
                    fleet.stats_b.view()
                );
            }
        }
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    Ok(delay_of(samples))
}

/// The baseline: a datagram between two loopback sockets, the receiver polling.
fn udp_delay(n: u32) -> Result<Delay> {
    let rx = UdpSocket::bind("127.0.0.1:0")?;
    rx.set_nonblocking(true)?;
    let tx = UdpSocket::bind("127.0.0.1:0")?;
    let to = rx.local_addr()?;
    let mut buf = [0u8; 64];
    let mut samples = Vec::new();
    for _ in 0..n {
        std::thread::sleep(Duration::from_millis(5));
        let started = Instant::now();
        tx.send_to(b"pin", to)?;
        loop {
            match rx.recv_from(&mut buf) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e).context("receiving"),
            }
            if started.elapsed() > Duration::from_secs(1) {
                bail!("a loopback datagram took over a second");
            }
        }
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    Ok(delay_of(samples))
}

pub fn run(opts: &Options, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    let cost = cost(opts, progress)?;
    progress("flow sharing: two balancers over loopback");
    let mut fleet = fleet()?;
    let mut flows = NewFlows::new(1_000_000);
    let mut rounds = Vec::new();
    for _ in 0..opts.rounds.min(3) {
        rounds.push(throughput(&mut fleet, &mut flows, opts.flows)?);
    }
    let delay = delay(&mut fleet, &mut flows, opts.delays)?;
    let udp_delay = udp_delay(opts.delays)?;
    fleet.runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(Report {
        cost,
        throughput: rounds,
        delay,
        udp_delay,
    })
}

/// The Markdown tables.
pub fn markdown(r: &Report) -> String {
    let mut out = String::from(
        "| case | ns/packet (median) | rounds min–max | × MAC-swap XDP_TX |\n|---|---:|---:|---:|\n",
    );
    for row in &r.cost {
        out += &format!(
            "| {} | {:.0} | {:.0}–{:.0} | {:.2}× |\n",
            row.case, row.ns.median, row.ns.min_round, row.ns.max_round, row.ratio_tx
        );
    }
    out += "\n| round | new flows made on A /s | pins installed on B /s | × made | made | installed | ring drops | rejected |\n|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for (i, t) in r.throughput.iter().enumerate() {
        out += &format!(
            "| {} | {:.0} | {:.0} | {:.2}× | {} | {} | {} | {} |\n",
            i + 1,
            t.made_per_s,
            t.shared_per_s,
            t.shared_per_s / t.made_per_s,
            t.made,
            t.installed,
            t.ring_drops,
            t.datagrams_rejected
        );
    }
    out += "\n| delay | median µs | p99 µs | max µs | samples |\n|---|---:|---:|---:|---:|\n";
    for (name, d) in [
        ("new flow on A → pin in B's flow table", &r.delay),
        ("baseline: one UDP datagram over loopback", &r.udp_delay),
    ] {
        out += &format!(
            "| {name} | {:.0} | {:.0} | {:.0} | {} |\n",
            d.median_us, d.p99_us, d.max_us, d.samples
        );
    }
    out += &format!(
        "\ndelay ratio (median, to the bare datagram): {:.1}×\n",
        r.delay.median_us / r.udp_delay.median_us
    );
    out
}
