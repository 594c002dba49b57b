//! Data-plane cost per packet: the real XDP program under BPF_PROG_TEST_RUN, beside three
//! trivial programs timed by the same code in the same run.
//!
//! Measured the way Katran's perf mode does, one program run per call: a repeat count above
//! 1 would re-run the program on the frame its previous run rewrote, and a new flow would
//! only be new once. Each call's kernel-reported duration is kept; a round is `calls` calls
//! per case, the cases take turns within a round (so noise from the shared machine falls on
//! all of them alike), and a case's figure is the median over rounds of its per-round
//! median. Ratios are taken against the MAC-swap XDP_TX baseline of the same phase.
//!
//! Two phases, each a freshly loaded program with fresh maps:
//! - "1 backend" and "1,000 backends": VIPs whose rings hold 1 or 1,000 backends; the
//!   established cases hit one flow over and over (hot in cache), the new-flow case uses a
//!   new source port (and address) on every call, so every call selects and inserts.
//! - "1M flows": the flow table pre-filled with 1,000,000 flows (of the 1,048,576 it holds);
//!   the established cases pick a random pre-filled flow on every call, so lookups miss the
//!   CPU caches as they would on a busy balancer; new flows evict the least recently used.

use std::{
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_common::{FlowValue, PROTO_TCP, PROTO_UDP};
use lb_tests::fixtures::{Fixture, LB_MAC, Pkt, TCP_SYN, TEST_RUN_IFINDEX, flow_key};
use serde::Serialize;

use crate::{
    bpf::{self, XDP_DROP, XDP_PASS, XDP_TX},
    stats::{Summary, median},
};

/// How much to measure.
#[derive(Clone, Debug)]
pub struct Options {
    /// Program runs (one per BPF_PROG_TEST_RUN call) per case per round.
    pub calls: u32,
    /// Rounds, after one warm-up round that is not counted.
    pub rounds: u32,
    /// Flows pre-filled for the "1M flows" phase; 0 skips the phase.
    pub table_flows: u32,
}

impl Options {
    pub fn full() -> Self {
        Options {
            calls: 5_000,
            rounds: 9,
            table_flows: 1_000_000,
        }
    }

    pub fn quick() -> Self {
        Options {
            calls: 1_000,
            rounds: 5,
            table_flows: 1_000_000,
        }
    }

    /// Just enough to see every case produce a number (the harness's own test).
    pub fn smoke() -> Self {
        Options {
            calls: 20,
            rounds: 1,
            table_flows: 2_000,
        }
    }
}

/// One line of the result table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub case: String,
    pub config: String,
    /// ns per packet; None when the case cannot run (yet).
    pub ns: Option<Summary>,
    /// ns per packet over the MAC-swap XDP_TX baseline of the same phase.
    pub ratio_tx: Option<f64>,
    /// Cross-check where re-running on the rewritten frame is the same work: ns per run
    /// with the repeat count amortising the kernel's per-call timing overhead.
    pub amortized: Option<Summary>,
    pub amortized_ratio_tx: Option<f64>,
    pub note: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

pub const CASE_PASS: &str = "baseline: XDP_PASS";
pub const CASE_DROP: &str = "baseline: XDP_DROP";
pub const CASE_TX: &str = "baseline: MAC-swap XDP_TX";
pub const CASE_LOOKUP40: &str = "reference: one flow-table lookup, 40-byte key";
pub const CASE_LOOKUP16: &str = "reference: one flow-table lookup, 16-byte key";
pub const CASE_NEW_TCP4: &str = "new IPv4 TCP flow";
pub const CASE_EST_TCP4: &str = "established IPv4 TCP flow";
pub const CASE_EST_TCP6: &str = "established IPv6 TCP flow";
pub const CASE_EST_UDP4: &str = "established IPv4 UDP flow";
pub const CASE_NON_VIP: &str = "non-VIP IPv4 (XDP_PASS)";
pub const CASE_FIREWALL: &str = "firewall drop (source in a drop list)";

pub const CONFIG_1: &str = "1 backend";
pub const CONFIG_1000: &str = "1,000 backends";
pub const CONFIG_1M: &str = "1,000 backends, 1M flows";

// ---- flows and frames ----------------------------------------------------------------------

/// Client source ports used per source address; a flow index maps to (address, port).
const PORTS_PER_ADDR: u64 = 50_000;

/// Source address bases (benchmark ranges: RFC 2544, RFC 3849): flows pre-filled and hit as
/// established come from the EST ones, flows that must be new from NEW_V4.
const EST_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
const NEW_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);
const EST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 0);

/// The client socket of flow `i` from `base`.
fn client(base: IpAddr, i: u64) -> SocketAddr {
    let port = 10_000 + (i % PORTS_PER_ADDR) as u16;
    let n = i / PORTS_PER_ADDR;
    let ip = match base {
        IpAddr::V4(b) => IpAddr::V4(Ipv4Addr::from(u32::from(b) + n as u32)),
        IpAddr::V6(b) => IpAddr::V6(Ipv6Addr::from(u128::from(b) + u128::from(n))),
    };
    SocketAddr::new(ip, port)
}

/// A frame whose source address and port are patched per call.
#[derive(Clone)]
struct Template {
    frame: Vec<u8>,
    base: IpAddr,
}

impl Template {
    /// TCP frames are data segments of an established connection (ACK PSH).
    fn new(base: IpAddr, vip: SocketAddr, proto: u8) -> Self {
        Self::with(base, vip, proto, None)
    }

    /// A TCP SYN: the first packet of a new connection (always balanced afresh).
    fn syn(base: IpAddr, vip: SocketAddr) -> Self {
        Self::with(base, vip, PROTO_TCP, Some(TCP_SYN))
    }

    fn with(base: IpAddr, vip: SocketAddr, proto: u8, flags: Option<u8>) -> Self {
        let src = client(base, 0);
        let pkt = match (proto, flags) {
            (PROTO_UDP, _) => Pkt::udp(src, vip),
            (_, Some(f)) => Pkt::tcp(src, vip).flags(f),
            (_, None) => Pkt::tcp(src, vip),
        };
        Template {
            frame: pkt.build(),
            base,
        }
    }

    /// Writes flow `i`'s source address and port into `buf` (no VLAN tag: L3 at 14). The
    /// data plane reads no checksum, so none is fixed.
    fn write(&self, i: u64, buf: &mut Vec<u8>) {
        buf.clear();
        buf.extend_from_slice(&self.frame);
        let c = client(self.base, i);
        let port_at = match c.ip() {
            IpAddr::V4(a) => {
                buf[26..30].copy_from_slice(&a.octets());
                34
            }
            IpAddr::V6(a) => {
                buf[22..38].copy_from_slice(&a.octets());
                54
            }
        };
        buf[port_at..port_at + 2].copy_from_slice(&c.port().to_be_bytes());
    }
}

enum Frames {
    /// The same frame on every call.
    Fixed(Vec<u8>),
    /// A flow never seen before on every call.
    New { t: Template, next: u64 },
    /// A random one of `count` pre-filled flows on every call.
    Random { t: Template, count: u64 },
}

impl Frames {
    fn next(&mut self, buf: &mut Vec<u8>) {
        match self {
            Frames::Fixed(f) => {
                buf.clear();
                buf.extend_from_slice(f);
            }
            Frames::New { t, next } => {
                t.write(*next, buf);
                *next += 1;
            }
            Frames::Random { t, count } => t.write(fastrand::u64(0..*count), buf),
        }
    }
}

/// What a case's flows should do to the VIP's new-flow counter: every call a new flow, or
/// none (an established flow that was evicted would show up here).
#[derive(Clone, Copy, PartialEq, Eq)]
enum FlowCheck {
    AllNew,
    NoneNew,
    NotAVip,
}

struct Case<'a> {
    name: &'static str,
    config: &'static str,
    prog: BorrowedFd<'a>,
    frames: Frames,
    expect: u32,
    vip_id: Option<u32>,
    check: FlowCheck,
    rounds: Vec<f64>,
    /// Whether running the program again on the frame it rewrote is the same work (true of
    /// the baselines, a hot established flow and a passed packet), so a repeat count may
    /// amortise the kernel's timing overhead as a cross-check.
    repeatable: bool,
    /// Per round: the kernel's duration of one call with repeat = calls.
    amortized: Vec<f64>,
    /// Established packets that found no flow (evicted) and were re-balanced.
    surprises: u64,
}

/// The three trivial programs.
pub struct Baselines {
    pub pass: OwnedFd,
    pub drop: OwnedFd,
    pub tx: OwnedFd,
    /// One lookup of a hot key in a flow-table-sized LRU hash, with today's 40-byte flow
    /// key and with a 16-byte IPv4-only key: the floor under the established path, and
    /// what a smaller IPv4 key would save (`lookups`).
    pub lookup40: OwnedFd,
    pub lookup16: OwnedFd,
    _tables: [OwnedFd; 2],
}

impl Baselines {
    pub fn load() -> Result<Self> {
        let table = |key: &[u8]| -> Result<(OwnedFd, OwnedFd)> {
            let map = bpf::lru_hash(key.len() as u32, lb_common::MAX_FLOWS)
                .context("creating an LRU hash the size of the flow table")?;
            bpf::map_update(map.as_fd(), key, 1).context("inserting the looked-up key")?;
            let name = format!("bench_lookup{}", key.len());
            let prog = bpf::load_xdp(&name, &bpf::lookup_pass(map.as_fd(), key))?;
            Ok((map, prog))
        };
        // The established IPv4 flow's key as the flow table holds it (`FlowKey`, 40 bytes),
        // and the same flow in 16 bytes (addresses, ports, protocol, padding).
        let key40: Vec<u8> = (0u8..40).map(|i| i.wrapping_mul(37)).collect();
        let (map40, lookup40) = table(&key40)?;
        let (map16, lookup16) = table(&key40[..16])?;
        Ok(Baselines {
            pass: bpf::load_xdp("bench_pass", &bpf::return_action(XDP_PASS))?,
            drop: bpf::load_xdp("bench_drop", &bpf::return_action(XDP_DROP))?,
            tx: bpf::load_xdp("bench_mac_swap", &bpf::mac_swap_tx())?,
            lookup40,
            lookup16,
            _tables: [map40, map16],
        })
    }
}

/// The VIPs of both phases. vip ids: 0-2 one backend, 3-5 a thousand.
struct Vips {
    tcp4: (SocketAddr, u32),
    tcp6: (SocketAddr, u32),
    udp4: (SocketAddr, u32),
}

const ONE: Vips = Vips {
    tcp4: (
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10)), 80),
        0,
    ),
    tcp6: (
        SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10)),
            80,
        ),
        1,
    ),
    udp4: (
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10)), 53),
        2,
    ),
};

const THOUSAND: Vips = Vips {
    tcp4: (
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10)), 81),
        3,
    ),
    tcp6: (
        SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10)),
            81,
        ),
        4,
    ),
    udp4: (
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10)), 54),
        5,
    ),
};

const BACKENDS: u32 = 1_000;
/// Backend ids, one set per VIP as the agent gives them (a backend serves one VIP): IPv4
/// TCP 1..=1000, IPv6 TCP from V6_IDS, IPv4 UDP from UDP4_IDS; the 1-backend VIPs ONE_IDS,
/// +1, +2.
const UDP4_IDS: u32 = 2_001;
const ONE_IDS: u32 = 3_001;
/// Drop-list rules configured in every phase: /24s of 100.64.0.0/10, and the one the
/// firewall case's source falls in.
const FIREWALL_RULES: u32 = 1_000;
const DROPPED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
/// Backend ids of the IPv6 VIPs start here (ids of IPv4 backends are 1..=1000).
const V6_IDS: u32 = 1_001;

/// A program loaded with fresh maps, configured with both VIP sets and 3,003 backends, all
/// behind the test-run ingress (so forwarded frames leave with XDP_TX), and 1,001 firewall
/// drop rules (which every packet is checked against first), as the agent would.
fn configured_fixture() -> Fixture {
    let mut fx = Fixture::new();
    for i in 0..BACKENDS {
        let v4 = Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8);
        backend_at_lb_mac(&mut fx, 1 + i, IpAddr::V4(v4));
        let v6 = Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, i as u16);
        backend_at_lb_mac(&mut fx, V6_IDS + i, IpAddr::V6(v6));
        let udp4 = Ipv4Addr::new(10, 2, (i >> 8) as u8, i as u8);
        backend_at_lb_mac(&mut fx, UDP4_IDS + i, IpAddr::V4(udp4));
    }
    backend_at_lb_mac(&mut fx, ONE_IDS, "10.3.0.1".parse().unwrap());
    backend_at_lb_mac(&mut fx, ONE_IDS + 1, "fd03::2".parse().unwrap());
    backend_at_lb_mac(&mut fx, ONE_IDS + 2, "10.3.0.3".parse().unwrap());
    for i in 0..FIREWALL_RULES {
        let net = ipnet::Ipv4Net::new(Ipv4Addr::new(100, 64 + (i >> 8) as u8, i as u8, 0), 24)
            .expect("a /24");
        fx.dp
            .set_firewall_rule(&ipnet::IpNet::V4(net), i + 1)
            .expect("writing a drop rule");
    }
    let dropped = ipnet::Ipv4Net::new(Ipv4Addr::new(203, 0, 113, 0), 24).expect("a /24");
    fx.dp
        .set_firewall_rule(&ipnet::IpNet::V4(dropped), FIREWALL_RULES + 1)
        .expect("writing a drop rule");
    let all4: Vec<u32> = (1..=BACKENDS).collect();
    let all6: Vec<u32> = (V6_IDS..V6_IDS + BACKENDS).collect();
    let all_udp4: Vec<u32> = (UDP4_IDS..UDP4_IDS + BACKENDS).collect();
    fx.vip(ONE.tcp4.0, PROTO_TCP, ONE.tcp4.1, 0, &[ONE_IDS]);
    fx.vip(ONE.tcp6.0, PROTO_TCP, ONE.tcp6.1, 16, &[ONE_IDS + 1]);
    fx.vip(ONE.udp4.0, PROTO_UDP, ONE.udp4.1, 32, &[ONE_IDS + 2]);
    fx.vip(THOUSAND.tcp4.0, PROTO_TCP, THOUSAND.tcp4.1, 1024, &all4);
    fx.vip(THOUSAND.tcp6.0, PROTO_TCP, THOUSAND.tcp6.1, 2048, &all6);
    fx.vip(THOUSAND.udp4.0, PROTO_UDP, THOUSAND.udp4.1, 3072, &all_udp4);
    fx
}

/// A backend behind the test-run ingress whose MAC is the ingress's own: a forwarded
/// frame is then still addressed to the balancer, so the amortised runs (each on the frame
/// the one before left) take the forwarding path every time, with the same MAC check, not
/// the cheaper `pass_not_our_mac`.
fn backend_at_lb_mac(fx: &mut Fixture, id: u32, ip: IpAddr) {
    let mut b = fx.backend(id, ip, TEST_RUN_IFINDEX);
    b.mac = LB_MAC;
    fx.set_backend(id, b);
}

fn est4() -> IpAddr {
    IpAddr::V4(EST_V4)
}
fn est6() -> IpAddr {
    IpAddr::V6(EST_V6)
}

/// Which established flows a case hits.
#[derive(Clone, Copy)]
enum Kind {
    Tcp4,
    Tcp6,
    Udp4,
}

/// The lb cases of one configuration.
fn lb_cases<'a>(
    prog: BorrowedFd<'a>,
    config: &'static str,
    vips: &Vips,
    established: impl Fn(Template, Kind) -> Frames,
) -> Vec<Case<'a>> {
    let case = |name, frames: Frames, expect, vip_id: Option<u32>, check| Case {
        name,
        config,
        prog,
        repeatable: matches!(frames, Frames::Fixed(_)),
        frames,
        expect,
        vip_id,
        check,
        rounds: Vec::new(),
        amortized: Vec::new(),
        surprises: 0,
    };
    vec![
        case(
            CASE_NEW_TCP4,
            Frames::New {
                t: Template::syn(IpAddr::V4(NEW_V4), vips.tcp4.0),
                // Per configuration its own range of new flows.
                next: u64::from(vips.tcp4.1) << 32,
            },
            XDP_TX,
            Some(vips.tcp4.1),
            FlowCheck::AllNew,
        ),
        case(
            CASE_EST_TCP4,
            established(Template::new(est4(), vips.tcp4.0, PROTO_TCP), Kind::Tcp4),
            XDP_TX,
            Some(vips.tcp4.1),
            FlowCheck::NoneNew,
        ),
        case(
            CASE_EST_TCP6,
            established(Template::new(est6(), vips.tcp6.0, PROTO_TCP), Kind::Tcp6),
            XDP_TX,
            Some(vips.tcp6.1),
            FlowCheck::NoneNew,
        ),
        case(
            CASE_EST_UDP4,
            established(Template::new(est4(), vips.udp4.0, PROTO_UDP), Kind::Udp4),
            XDP_TX,
            Some(vips.udp4.1),
            FlowCheck::NoneNew,
        ),
        case(
            CASE_NON_VIP,
            Frames::Fixed(
                Pkt::tcp(
                    client(est4(), 0),
                    SocketAddr::new("10.0.0.99".parse().unwrap(), 80),
                )
                .build(),
            ),
            XDP_PASS,
            None,
            FlowCheck::NotAVip,
        ),
        case(
            CASE_FIREWALL,
            Frames::Fixed(
                Pkt::tcp(SocketAddr::new(IpAddr::V4(DROPPED), 40000), vips.tcp4.0).build(),
            ),
            XDP_DROP,
            None,
            FlowCheck::NotAVip,
        ),
    ]
}

/// The two lookup references (`Baselines::lookup40`, `lookup16`), for the first phase.
fn lookup_cases<'a>(b: &'a Baselines, config: &'static str) -> Vec<Case<'a>> {
    programs_on_one_frame(
        config,
        [
            (CASE_LOOKUP40, b.lookup40.as_fd(), XDP_PASS),
            (CASE_LOOKUP16, b.lookup16.as_fd(), XDP_PASS),
        ],
    )
}

fn baseline_cases<'a>(b: &'a Baselines, config: &'static str) -> Vec<Case<'a>> {
    programs_on_one_frame(
        config,
        [
            (CASE_PASS, b.pass.as_fd(), XDP_PASS),
            (CASE_DROP, b.drop.as_fd(), XDP_DROP),
            (CASE_TX, b.tx.as_fd(), XDP_TX),
        ],
    )
}

/// Cases of trivial programs (name, program, expected action), each run on the same
/// established IPv4 frame, which none of them needs a flow for.
fn programs_on_one_frame<'a>(
    config: &'static str,
    programs: impl IntoIterator<Item = (&'static str, BorrowedFd<'a>, u32)>,
) -> Vec<Case<'a>> {
    let frame = Template::new(est4(), ONE.tcp4.0, PROTO_TCP).frame;
    programs
        .into_iter()
        .map(|(name, prog, expect)| Case {
            name,
            config,
            prog,
            frames: Frames::Fixed(frame.clone()),
            expect,
            vip_id: None,
            check: FlowCheck::NotAVip,
            rounds: Vec::new(),
            repeatable: true,
            amortized: Vec::new(),
            surprises: 0,
        })
        .collect()
}

/// Runs every case `opts.rounds` times (plus a warm-up), taking turns.
fn measure(fx: &Fixture, cases: &mut [Case<'_>], opts: &Options) -> Result<()> {
    let mut buf = Vec::with_capacity(256);
    let mut durations = Vec::with_capacity(opts.calls as usize);
    for round in 0..=opts.rounds {
        // Rotate the order so no case always follows the same one.
        let n = cases.len();
        for k in 0..n {
            let case = &mut cases[(k + round as usize) % n];
            let before = match case.vip_id {
                Some(id) => fx.dp.vip_counters(id)?.new_flows,
                None => 0,
            };
            durations.clear();
            for _ in 0..opts.calls {
                case.frames.next(&mut buf);
                let run = bpf::test_run(case.prog, &buf, None, 1)
                    .with_context(|| format!("BPF_PROG_TEST_RUN for {}", case.name))?;
                if run.retval != case.expect {
                    bail!(
                        "{} ({}): XDP action {} where {} was expected",
                        case.name,
                        case.config,
                        run.retval,
                        case.expect
                    );
                }
                durations.push(f64::from(run.duration_ns));
            }
            if let Some(id) = case.vip_id {
                let new = fx.dp.vip_counters(id)?.new_flows - before;
                match case.check {
                    FlowCheck::AllNew if new != u64::from(opts.calls) => bail!(
                        "{} ({}): {new} of {} calls made a new flow",
                        case.name,
                        case.config,
                        opts.calls
                    ),
                    FlowCheck::NoneNew => case.surprises += new,
                    _ => {}
                }
            }
            if round > 0 {
                case.rounds.push(median(&durations));
                if case.repeatable {
                    let run = bpf::test_run(case.prog, &buf, None, opts.calls)?;
                    // The last run, on what the others left of the frame, must still have
                    // taken the case's path.
                    if run.retval != case.expect {
                        bail!(
                            "{} ({}): XDP action {} where {} was expected after {} runs on \
                             one frame",
                            case.name,
                            case.config,
                            run.retval,
                            case.expect,
                            opts.calls
                        );
                    }
                    case.amortized.push(f64::from(run.duration_ns));
                }
            }
            // Let whatever else the machine does run between batches, not inside them.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(())
}

fn rows(cases: &[Case<'_>], notes: &mut Vec<String>) -> Vec<Row> {
    let tx = cases
        .iter()
        .find(|c| c.name == CASE_TX)
        .map(|c| median(&c.rounds));
    let tx_amortized = cases
        .iter()
        .find(|c| c.name == CASE_TX)
        .map(|c| median(&c.amortized));
    cases
        .iter()
        .map(|c| {
            let s = Summary::of_rounds(&c.rounds);
            if c.surprises > 0 {
                notes.push(format!(
                    "{} ({}): {} of the established packets found their flow evicted and \
                     were re-balanced",
                    c.name, c.config, c.surprises
                ));
            }
            let amortized = (!c.amortized.is_empty()).then(|| Summary::of_rounds(&c.amortized));
            Row {
                case: c.name.into(),
                config: c.config.into(),
                ns: Some(s),
                ratio_tx: tx.map(|tx| s.median / tx),
                amortized,
                amortized_ratio_tx: amortized.zip(tx_amortized).map(|(a, tx)| a.median / tx),
                note: None,
            }
        })
        .collect()
}

/// Builds each phase's program and cases and hands them to `each`; returns notes.
fn phases(
    opts: &Options,
    baselines: &Baselines,
    progress: &mut dyn FnMut(&str),
    each: &mut dyn FnMut(&Fixture, &mut Vec<Case<'_>>) -> Result<()>,
) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    // Phase 1: 1 and 1,000 backends, a flow table holding only what the cases insert.
    {
        progress("data plane: loading the program, 3,003 backends, 6 VIPs");
        let mut fx = configured_fixture();
        let prog = fx.dp.program_fd()?;
        let size = bpf::prog_size(prog.as_fd())?;
        notes.push(size.note());
        // The established flows exist before timing starts.
        for vips in [&ONE, &THOUSAND] {
            for (vip, proto, base) in [
                (vips.tcp4.0, PROTO_TCP, est4()),
                (vips.tcp6.0, PROTO_TCP, est6()),
                (vips.udp4.0, PROTO_UDP, est4()),
            ] {
                let mut buf = Vec::new();
                Template::new(base, vip, proto).write(0, &mut buf);
                bpf::expect_action(prog.as_fd(), &buf, XDP_TX, "the first packet of a flow")?;
            }
        }
        let fixed = |t: Template, _| {
            let mut f = Vec::new();
            t.write(0, &mut f);
            Frames::Fixed(f)
        };
        let mut cases = baseline_cases(baselines, "1 and 1,000 backends");
        cases.extend(lookup_cases(baselines, "1 and 1,000 backends"));
        cases.extend(lb_cases(prog.as_fd(), CONFIG_1, &ONE, fixed));
        cases.extend(lb_cases(prog.as_fd(), CONFIG_1000, &THOUSAND, fixed));
        progress(&format!(
            "data plane: {} cases x {} rounds x {} calls",
            cases.len(),
            opts.rounds,
            opts.calls
        ));
        each(&fx, &mut cases)?;
    }

    tunnel::phase(baselines, progress, each)?;

    // Phase 2: a full flow table.
    if opts.table_flows > 0 {
        let mut fx = configured_fixture();
        let prog = fx.dp.program_fd()?;
        let total = u64::from(opts.table_flows);
        let (n4, n6) = (total * 6 / 10, total * 2 / 10);
        let n_udp = total - n4 - n6;
        progress(&format!(
            "data plane: pre-filling the flow table with {total} flows (one map update each)"
        ));
        let started = Instant::now();
        let mut fill = |vip: SocketAddr, proto: u8, base: IpAddr, n: u64, first_id: u32| {
            for i in 0..n {
                let key = flow_key(client(base, i), vip, proto);
                let value = FlowValue {
                    backend_id: first_id + (i % u64::from(BACKENDS)) as u32,
                    backend_generation: 1,
                };
                fx.dp.insert_flow(&key, &value)?;
            }
            anyhow::Ok(())
        };
        fill(THOUSAND.tcp4.0, PROTO_TCP, est4(), n4, 1)?;
        fill(THOUSAND.tcp6.0, PROTO_TCP, est6(), n6, V6_IDS)?;
        fill(THOUSAND.udp4.0, PROTO_UDP, est4(), n_udp, UDP4_IDS)?;
        let secs = started.elapsed().as_secs_f64();
        let filled: u64 = fx.dp.flows_per_backend().values().sum();
        notes.push(format!(
            "1M flows: {total} flows ({n4} IPv4 TCP, {n6} IPv6 TCP, {n_udp} IPv4 UDP) inserted \
             from userspace in {secs:.1} s, one BPF_MAP_UPDATE_ELEM each; the table then held \
             {filled}"
        ));
        let random = |t, kind| Frames::Random {
            t,
            count: match kind {
                Kind::Tcp4 => n4,
                Kind::Tcp6 => n6,
                Kind::Udp4 => n_udp,
            },
        };
        let mut cases = baseline_cases(baselines, CONFIG_1M);
        cases.extend(lb_cases(prog.as_fd(), CONFIG_1M, &THOUSAND, random));
        progress(&format!(
            "data plane (1M flows): {} cases x {} rounds x {} calls",
            cases.len(),
            opts.rounds,
            opts.calls
        ));
        each(&fx, &mut cases)?;
    }
    Ok(notes)
}

// ---- full NAT ---------------------------------------------------------------------------------

pub const CONFIG_NAT: &str = "NAT, 1 backend (own namespace)";
pub const CASE_DSR_EST: &str = "dsr: established IPv4 TCP flow";
pub const CASE_NAT_FWD: &str = "nat forward: established IPv4 TCP flow";
pub const CASE_NAT_FWD6: &str = "nat forward: established IPv6 TCP flow";
pub const CASE_NAT_REPLY: &str = "nat reply: IPv4 TCP, backend to client (FIB lookup)";
pub const CASE_NAT_REPLY6: &str = "nat reply: IPv6 TCP, backend to client (FIB lookup)";

/// Full NAT beside direct server return in one program and one run: an established flow
/// translated toward its backend, and the backend's answer translated back (a reverse
/// lookup and the kernel's FIB). In a namespace of its own (the reply path needs routes to
/// the clients and forwarding on, which the host's namespace is not to be given).
fn nat_phase(opts: &Options, baselines: &Baselines) -> Result<Vec<Row>> {
    use lb_common::{BACKEND_F_NAT, FAMILY_V4, FAMILY_V6, NatSnat};
    use lb_tests::fixtures::{addr, with_veth_in_netns};
    with_veth_in_netns(|veth| -> Result<Vec<Row>> {
        lb_tests::nat::client_routes();
        let mut fx = Fixture::new();
        fx.dp.add_tx_port(veth)?;
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        fx.backend(1, ip("10.3.0.1"), TEST_RUN_IFINDEX);
        fx.backend(2, ip("10.1.0.1"), TEST_RUN_IFINDEX);
        fx.backend(3, ip("fd01::3"), TEST_RUN_IFINDEX);
        for id in [2, 3] {
            fx.update_backend(id, |b| b.flags |= BACKEND_F_NAT);
        }
        let vip = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let (dsr, nat4, nat6) = (
            vip("10.0.0.10:80"),
            vip("10.0.0.10:81"),
            vip("[fd00::10]:81"),
        );
        fx.vip(dsr, PROTO_TCP, 0, 0, &[1]);
        fx.vip(nat4, PROTO_TCP, 1, 8, &[2]);
        fx.vip(nat6, PROTO_TCP, 2, 16, &[3]);
        for (family, snat) in [(FAMILY_V4, "10.1.0.254"), (FAMILY_V6, "fd01::fe")] {
            let snat = NatSnat {
                addr: addr(ip(snat)),
                port_first: 1024,
                port_last: 32767,
                _pad: 0,
            };
            fx.dp.set_nat_snat(family, &snat)?;
        }
        let prog = fx.dp.program_fd()?;
        let mut fixed = Vec::new();
        for (client, to) in [
            (vip("192.0.2.1:40000"), dsr),
            (vip("192.0.2.1:40000"), nat4),
            (vip("[2001:db8::1]:40000"), nat6),
        ] {
            let frame = Pkt::tcp(client, to).build();
            bpf::expect_action(prog.as_fd(), &frame, XDP_TX, "the first packet of a flow")?;
            let answer = fx
                .dp
                .nat_forward(&flow_key(client, to, PROTO_TCP))
                .map(|t| {
                    let snat = SocketAddr::new(
                        lb_common::addr_from_map(t.to.src, t.to.family),
                        u16::from_be(t.to.sport),
                    );
                    let backend = SocketAddr::new(
                        lb_common::addr_from_map(t.to.dst, t.to.family),
                        u16::from_be(t.to.dport),
                    );
                    Pkt::tcp(backend, snat).build()
                });
            fixed.push((frame, answer));
        }
        let case = |name, frame: Vec<u8>, expect, vip_id| Case {
            name,
            config: CONFIG_NAT,
            prog: prog.as_fd(),
            repeatable: false,
            frames: Frames::Fixed(frame),
            expect,
            vip_id: Some(vip_id),
            check: FlowCheck::NoneNew,
            rounds: Vec::new(),
            amortized: Vec::new(),
            surprises: 0,
        };
        let reply = |i: usize| fixed[i].1.clone().expect("a NAT flow has its translation");
        let mut cases = baseline_cases(baselines, CONFIG_NAT);
        cases.push(case(CASE_DSR_EST, fixed[0].0.clone(), XDP_TX, 0));
        cases.push(case(CASE_NAT_FWD, fixed[1].0.clone(), XDP_TX, 1));
        cases.push(case(CASE_NAT_FWD6, fixed[2].0.clone(), XDP_TX, 2));
        cases.push(case(CASE_NAT_REPLY, reply(1), bpf::XDP_REDIRECT, 1));
        cases.push(case(CASE_NAT_REPLY6, reply(2), bpf::XDP_REDIRECT, 2));
        measure(&fx, &mut cases, opts)?;
        let mut notes = Vec::new();
        Ok(rows(&cases, &mut notes))
    })
}

// ---- new flows on two CPUs at once ---------------------------------------------------------

pub const CASE_NEW_RR: &str = "new IPv4 TCP flow, round robin (one shared cursor)";
pub const CASE_NEW_HASH: &str = "new IPv4 TCP flow, Maglev (no cursor)";
pub const CONFIG_ONE_CPU: &str = "1 CPU";
pub const CONFIG_TWO_CPUS: &str = "2 CPUs at once";

/// What one shared round-robin cursor per VIP costs when two CPUs make new flows at once:
/// the same new-flow SYNs to a round-robin VIP and to a Maglev VIP (whose selection writes
/// nothing shared), from one thread and from two threads pinned to CPUs 0 and 1. Both
/// VIPs insert into the same flow table, so the LRU's own contention is in both; what the
/// cursor's cache line adds is (RR − Maglev) on two CPUs minus the same on one.
fn contention(opts: &Options, baselines: &Baselines) -> Result<Vec<Row>> {
    let mut fx = Fixture::new();
    fx.backend(1, "10.1.0.1".parse()?, TEST_RUN_IFINDEX);
    fx.backend(2, "10.1.0.2".parse()?, TEST_RUN_IFINDEX);
    let rr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10)), 80);
    let hash = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10)), 82);
    fx.vip(rr, PROTO_TCP, 0, 0, &[1]);
    // VIP id 8: its cursor slot is on another cache line than VIP 0's (it uses none).
    fx.vip_with_flags(hash, PROTO_TCP, 8, 16, &[2], lb_common::VIP_F_HASH);
    let prog = fx.dp.program_fd()?;
    let tx_frame = Template::new(est4(), rr, PROTO_TCP).frame;
    let calls = opts.calls.max(1) as u64;
    let mut next = 0u64;
    // Per (case, threads): each round's median ns per call.
    let mut results: Vec<(&str, &str, Vec<f64>)> = Vec::new();
    let mut tx_rounds = Vec::new();
    for (case, _) in [(CASE_NEW_RR, rr), (CASE_NEW_HASH, hash)] {
        for config in [CONFIG_ONE_CPU, CONFIG_TWO_CPUS] {
            results.push((case, config, Vec::new()));
        }
    }
    for round in 0..=opts.rounds {
        let mut tx = Vec::with_capacity(calls as usize);
        for _ in 0..calls {
            tx.push(f64::from(
                bpf::test_run(baselines.tx.as_fd(), &tx_frame, None, 1)?.duration_ns,
            ));
        }
        for (case, config, rounds) in results.iter_mut() {
            let vip = if *case == CASE_NEW_RR { rr } else { hash };
            let threads: u64 = if *config == CONFIG_TWO_CPUS { 2 } else { 1 };
            let first = next;
            next += threads * calls;
            let prog = prog.as_fd();
            let durations: Vec<f64> = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..threads)
                    .map(|t| {
                        scope.spawn(move || -> Result<Vec<f64>> {
                            pin_to_cpu(t as usize)?;
                            let mut frames = Frames::New {
                                t: Template::syn(IpAddr::V4(NEW_V4), vip),
                                next: (1 << 40) + first + t * calls,
                            };
                            let mut buf = Vec::with_capacity(256);
                            let mut d = Vec::with_capacity(calls as usize);
                            for _ in 0..calls {
                                frames.next(&mut buf);
                                let run = bpf::test_run(prog, &buf, None, 1)?;
                                if run.retval != XDP_TX {
                                    bail!("a new flow came out with XDP action {}", run.retval);
                                }
                                d.push(f64::from(run.duration_ns));
                            }
                            Ok(d)
                        })
                    })
                    .collect();
                let mut all = Vec::new();
                for w in workers {
                    all.extend(
                        w.join()
                            .map_err(|_| anyhow::anyhow!("a worker panicked"))??,
                    );
                }
                anyhow::Ok(all)
            })?;
            if round > 0 {
                rounds.push(median(&durations));
            }
        }
        if round > 0 {
            tx_rounds.push(median(&tx));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let tx = median(&tx_rounds);
    Ok(results
        .into_iter()
        .map(|(case, config, rounds)| {
            let s = Summary::of_rounds(&rounds);
            Row {
                case: case.into(),
                config: config.into(),
                ns: Some(s),
                ratio_tx: Some(s.median / tx),
                amortized: None,
                amortized_ratio_tx: None,
                note: None,
            }
        })
        .collect())
}

pub(crate) fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; the calls only write into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` outlives the call.
    let r = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        bail!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs the whole data-plane benchmark. `progress` gets a line now and then.
pub fn run(opts: &Options, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    let baselines = Baselines::load()?;
    let mut rows_out = Vec::new();
    let mut notes = Vec::new();
    let mut more = phases(opts, &baselines, progress, &mut |fx, cases| {
        measure(fx, cases, opts)?;
        rows_out.extend(rows(cases, &mut notes));
        Ok(())
    })?;
    notes.append(&mut more);
    progress("data plane: full NAT beside direct server return");
    rows_out.extend(nat_phase(opts, &baselines)?);
    if opts.table_flows > 0 {
        progress("data plane: new flows on one CPU and on two at once");
        rows_out.extend(contention(opts, &baselines)?);
    }
    Ok(Report {
        rows: rows_out,
        notes,
    })
}

/// What a spin did: program runs, and the kernel's own measure of their time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spun {
    pub runs: u64,
    /// Sum over calls of BPF_PROG_TEST_RUN's duration (mean per run) times the repeat count.
    pub kernel_ns: f64,
}

/// When a spin calls back: with the case's program loaded and set up, right before the
/// first run and right after the last (a profiler starts and stops there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpinAt {
    Start,
    Stop,
}

/// Runs one case (by name and configuration) over and over for `secs`, for a profiler
/// (`perf record -e cpu-clock`) to watch; the other phase is skipped when it can be.
pub fn spin(
    case: &str,
    config: &str,
    secs: f64,
    repeat: u32,
    at: &mut dyn FnMut(SpinAt, BorrowedFd<'_>) -> Result<()>,
) -> Result<Spun> {
    let baselines = Baselines::load()?;
    let opts = Options {
        calls: 1,
        rounds: 1,
        table_flows: if config == CONFIG_1M { 1_000_000 } else { 0 },
    };
    let mut spun = Spun::default();
    let mut found = false;
    phases(
        &opts,
        &baselines,
        &mut |m| eprintln!("{m}"),
        &mut |_, cases| {
            let Some(c) = cases
                .iter_mut()
                .find(|c| c.name == case && c.config == config)
            else {
                return Ok(());
            };
            found = true;
            eprintln!("spinning {case} ({config}) for {secs} s");
            let mut buf = Vec::new();
            at(SpinAt::Start, c.prog)?;
            let until = Instant::now() + Duration::from_secs_f64(secs);
            // About 1,000 runs between looks at the clock, however many a call makes.
            let calls = 1000u32.div_ceil(repeat.max(1));
            while Instant::now() < until {
                for _ in 0..calls {
                    c.frames.next(&mut buf);
                    let run = bpf::test_run(c.prog, &buf, None, repeat)?;
                    spun.kernel_ns += f64::from(run.duration_ns) * f64::from(repeat);
                }
                spun.runs += u64::from(calls) * u64::from(repeat);
            }
            at(SpinAt::Stop, c.prog)
        },
    )?;
    if !found {
        bail!("no case {case:?} with configuration {config:?}");
    }
    Ok(spun)
}

// ---- tunnel and gue beside dsr -------------------------------------------------------------

pub use tunnel::{CASE_DSR, CASE_GUE, CASE_TUNNEL, CONFIG_TUNNEL};

/// What wrapping a packet in an outer header costs: one established flow each to a dsr, a
/// tunnel and a gue VIP (one backend each), IPv4 and IPv6, beside the baselines of the same
/// phase. These rewrite the frame (it grows), so no case is re-run on its own output.
mod tunnel {
    use lb::{model::Mode, tunnel::TunnelSettings};

    use super::*;

    pub const CASE_DSR: &str = "established TCP flow, dsr";
    pub const CASE_TUNNEL: &str = "established TCP flow, tunnel (IP-in-IP)";
    pub const CASE_GUE: &str = "established TCP flow, gue";
    pub const CONFIG_TUNNEL: &str = "modes, IPv4";
    pub const CONFIG_TUNNEL6: &str = "modes, IPv6";

    pub fn phase(
        baselines: &Baselines,
        progress: &mut dyn FnMut(&str),
        each: &mut dyn FnMut(&Fixture, &mut Vec<Case<'_>>) -> Result<()>,
    ) -> Result<()> {
        progress("data plane: tunnel and gue beside dsr");
        let mut fx = Fixture::new();
        fx.dp.set_tunnel(
            &TunnelSettings {
                source_v4: Some(Ipv4Addr::new(10, 0, 0, 2)),
                source_v6: Some("fd00::2".parse()?),
                gue_port: None,
            }
            .entry(&[]),
        )?;
        let modes = [
            (CASE_DSR, Mode::Dsr),
            (CASE_TUNNEL, Mode::Tunnel),
            (CASE_GUE, Mode::Gue),
        ];
        let mut flows = Vec::new();
        for (i, (name, mode)) in modes.iter().enumerate() {
            let i = i as u32;
            for (config, v6) in [(CONFIG_TUNNEL, false), (CONFIG_TUNNEL6, true)] {
                let id = 1 + i * 2 + u32::from(v6);
                let (backend, vip, base): (IpAddr, IpAddr, IpAddr) = if v6 {
                    ("fd01::1".parse()?, "fd00::10".parse()?, est6())
                } else {
                    ("10.1.0.1".parse()?, "10.0.0.10".parse()?, est4())
                };
                fx.backend(id, backend, TEST_RUN_IFINDEX);
                fx.update_backend(id, |b| b.flags |= mode.backend_flags());
                let vip = SocketAddr::new(vip, 80 + i as u16);
                fx.vip(vip, PROTO_TCP, id, 16 * id, &[id]);
                flows.push((*name, config, id, Template::new(base, vip, PROTO_TCP)));
            }
        }
        let prog = fx.dp.program_fd()?;
        let mut cases = baseline_cases(baselines, CONFIG_TUNNEL);
        for (name, config, id, t) in flows {
            let mut frame = Vec::new();
            t.write(0, &mut frame);
            bpf::expect_action(prog.as_fd(), &frame, XDP_TX, "the first packet of a flow")?;
            cases.push(Case {
                name,
                config,
                prog: prog.as_fd(),
                frames: Frames::Fixed(frame),
                expect: XDP_TX,
                vip_id: Some(id),
                check: FlowCheck::NoneNew,
                rounds: Vec::new(),
                repeatable: false,
                amortized: Vec::new(),
                surprises: 0,
            });
        }
        each(&fx, &mut cases)
    }
}
