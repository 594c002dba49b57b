//! End to end, high availability: health checks under steady load (failover and rise),
//! backups taking over and handing back, drain, weights, two Maglev balancers agreeing on
//! every flow (also one moved between them mid-stream), and `kill -9` of the agent under
//! load. Real TCP connections from the client namespace through the VIP, in the namespace
//! test bed of `xtask::testbed` (see `tests/e2e.rs` for the basics).
//!
//! Timing is measured, not assumed: the steady load (`Testbed::load`) records every new
//! connection attempt with its start time on CLOCK_MONOTONIC, the clock the test reads too,
//! so "how long after the kill did connections fail" is a difference of two timestamps.
//! The numbers are printed (run with `-- --nocapture` to see them).
//!
//! Needs root, `ip`, `nsenter`, `ethtool`, and the binaries `target/<profile>/{lb,xtask}`
//! (`cargo xtask test` builds them first). Every wait has a bound, every loop a count.

use std::{collections::BTreeSet, path::Path, time::Duration};

use lb_tests::e2e::*;
use serde_json::Value;
use xtask::{
    testbed::{Load, Testbed, monotonic_us},
    traffic::{Answer, Attempt},
};

/// Health checks of these tests: HAProxy's `inter 200 fall 2 rise 2`.
const INTERVAL_MS: u64 = 200;
const FALL: u64 = 2;
const RISE: u64 = 2;
/// A new connection this often under steady load.
const LOAD_EVERY: Duration = Duration::from_millis(20);
/// Upper bound of any steady load here (it is stopped well before).
const LOAD_MAX: Duration = Duration::from_secs(40);
const SECOND_US: u64 = 1_000_000;
/// Source ports: the steady load's attempt n comes from `FIRST_LOAD_PORT + n`; runs of
/// one connection after another use ports from 20000 (each test its own, none twice).
/// Both stay below the ephemeral range (32768), so every connection is a flow the balancer
/// has never seen: its flow table outlives connections, and a connection from an ephemeral
/// port the kernel happens to hand out again would be pinned where the old one went.
const FIRST_LOAD_PORT: u16 = 24_000;

/// About how long a failed backend keeps getting new connections: `fall` checks, each an
/// interval after the one before (±10% jitter), plus up to one interval for the first check
/// to come round. Printed beside the measured window; never a pass/fail bound (timings
/// belong in benchmarks).
fn expected_fall_us() -> u64 {
    (FALL + 1) * INTERVAL_MS * 1000
}

/// About how long a recovered backend takes to get new connections again.
fn expected_rise_us() -> u64 {
    (RISE + 1) * INTERVAL_MS * 1000
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// `lb vip add VIP --check CHECK` with the tests' interval, fall and rise.
fn add_checked(s: &Setup, check: &str) {
    add_checked_vip(
        |a| s.lb(a),
        &vip4().to_string(),
        check,
        INTERVAL_MS,
        RISE,
        FALL,
    );
}

/// The VIP with a TCP check (see `add_checked`), and the given backends (1-based) with
/// extra `lb backend add` arguments each.
fn configure_checked(s: &Setup, backends: &[(usize, &[&str])]) {
    add_checked(s, "tcp");
    let vip = vip4().to_string();
    for &(i, extra) in backends {
        let addr = s.backend(i, false);
        let mut args = vec!["backend", "add", vip.as_str(), addr.as_str()];
        args.extend(extra);
        s.lb(&args);
    }
}

/// Waits until every backend of the agent on `socket` is up with a passed check.
fn wait_checked(bed: &Testbed, socket: &Path) {
    wait_backends(bed, socket, "every backend up and checked", |list| {
        !list.is_empty()
            && list
                .iter()
                .all(|b| field(b, "state") == "up" && b["last_check"] == "ok")
    });
}

/// The list entry of backend address `addr`.
fn entry<'a>(list: &'a [Value], addr: &str) -> &'a Value {
    list.iter()
        .find(|b| field(b, "address") == addr)
        .unwrap_or_else(|| panic!("backend {addr} not listed: {list:#?}"))
}

/// The attempts as a timeline relative to `t0`, for failure messages: the failed ones
/// with five attempts either side, or every attempt if none failed.
fn timeline(attempts: &[Attempt], t0: u64) -> String {
    let near_failure = |i: usize| {
        attempts[i.saturating_sub(5)..(i + 6).min(attempts.len())]
            .iter()
            .any(Attempt::is_err)
    };
    let all = !attempts.iter().any(Attempt::is_err);
    let mut out = Vec::new();
    for (i, a) in attempts.iter().enumerate() {
        if !all && !near_failure(i) {
            if out.last().is_none_or(|l: &String| l != "...") {
                out.push("...".to_string());
            }
            continue;
        }
        let at = (a.start_us as i64 - t0 as i64) as f64 / 1000.0;
        out.push(match &a.outcome {
            Ok(b) => format!("{at:+.0}ms {b}"),
            Err(e) => format!("{at:+.0}ms ERR {e}"),
        });
    }
    out.join("\n")
}

/// Every attempt of the load is there, in order; returns the longest time between two
/// attempts' starts (the load's threads can be scheduled late on a busy machine).
fn longest_gap(attempts: &[Attempt]) -> u64 {
    assert!(!attempts.is_empty(), "the load made no attempts");
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a.seq, i as u64, "attempts missing from the load's record");
    }
    attempts
        .windows(2)
        .map(|w| w[1].start_us.saturating_sub(w[0].start_us))
        .max()
        .unwrap_or(0)
}

/// The load was steady enough to measure a failure window: no stretch as long as a check
/// interval went without a new connection. Returns the longest gap.
fn assert_steady(attempts: &[Attempt]) -> u64 {
    let gap = longest_gap(attempts);
    assert!(
        gap <= INTERVAL_MS * 1000,
        "the load stalled: {:.0} ms without a new connection",
        ms(gap)
    );
    gap
}

/// Failed attempts that started in `[from_us, to_us)`.
fn failures(attempts: &[Attempt], from_us: u64, to_us: u64) -> Vec<&Attempt> {
    attempts
        .iter()
        .filter(|a| a.is_err() && (from_us..to_us).contains(&a.start_us))
        .collect()
}

/// The backends that answered attempts started in `[from_us, to_us)`.
fn answered(attempts: &[Attempt], from_us: u64, to_us: u64) -> BTreeSet<String> {
    attempts
        .iter()
        .filter(|a| (from_us..to_us).contains(&a.start_us))
        .filter_map(|a| a.backend().map(str::to_string))
        .collect()
}

/// How long after `since_us` new connections kept failing: (failed attempts, start of the
/// last failed one minus `since_us`). Panics if any attempt failed before `since_us`; one
/// still in flight then (its server killed under it) belongs to the window.
fn failure_window(attempts: &[Attempt], since_us: u64) -> (usize, u64) {
    let early: Vec<&Attempt> = failures(attempts, 0, since_us)
        .into_iter()
        .filter(|a| a.start_us + a.latency_us < since_us)
        .collect();
    assert!(
        early.is_empty(),
        "connections failed before the backend was killed:\n{}",
        timeline(attempts, since_us)
    );
    let failed: Vec<&Attempt> = failures(attempts, 0, u64::MAX)
        .into_iter()
        .filter(|a| a.start_us + a.latency_us >= since_us)
        .collect();
    let last = failed
        .last()
        .map_or(0, |a| a.start_us.saturating_sub(since_us));
    (failed.len(), last)
}

/// Steady load on the VIP: a new connection every [`LOAD_EVERY`], attempt n from source
/// port `FIRST_LOAD_PORT + n`.
fn steady_load(bed: &Testbed) -> Load {
    bed.load(vip4(), LOAD_EVERY, LOAD_MAX, Some(FIRST_LOAD_PORT))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// [`steady_load`], once it has run half a second (25 attempts) with every backend up.
fn answered_load(bed: &Testbed) -> Load {
    let load = steady_load(bed);
    wait_load(&load, 0, "baseline", &|a| a.seq >= 25);
    load
}

/// The first attempt of `load` started at `since` or later that `f` accepts (within 5 s).
fn wait_load(load: &Load, since: u64, what: &str, f: &dyn Fn(&Attempt) -> bool) -> Attempt {
    load.wait_for(since, Duration::from_secs(5), f)
        .unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// Ends `load` once an attempt started at `until_us` or later (`what`): all its attempts.
fn finish_load(load: Load, until_us: u64, what: &str) -> Vec<Attempt> {
    wait_load(&load, until_us, what, &|_| true);
    load.finish().unwrap_or_else(|e| panic!("{e:#}"))
}

/// Waits until `load` has run a second past the expected end of the failover that began
/// at `killed_us`.
fn wait_past_fall(load: &Load, killed_us: u64, what: &str) {
    wait_load(
        load,
        killed_us + expected_fall_us() + SECOND_US,
        what,
        &|_| true,
    );
}

/// Starts backend 1 again under `load`: when it was restarted, when it listened (the checks
/// can see it from there) and its first new connection.
fn restart_backend_1(s: &mut Setup, load: &Load) -> (u64, u64, Attempt) {
    let restarted = monotonic_us();
    s.servers[0] = s.bed.start_backend(1).unwrap_or_else(|e| panic!("{e:#}"));
    // start_backend waits for the server to listen.
    let listening = monotonic_us();
    let back = wait_load(load, restarted, "backend 1 answering again", &|a| {
        a.backend() == Some("backend-1")
    });
    (restarted, listening, back)
}

/// A backend's server dies under steady load: new connections fail only until the agent
/// marks it down (after `fall` failed checks), then none fail; it comes back after `rise`
/// good checks. How long each step took is printed (a measurement, never a bound here).
#[test]
fn failover_window_under_steady_load() {
    let _serial = serial();
    let mut s = Setup::new(2);
    configure_checked(&s, &[(1, &[]), (2, &[])]);
    wait_checked(&s.bed, &s.socket);
    let b1 = s.backend(1, false);

    let load = answered_load(&s.bed);

    let killed = monotonic_us();
    s.servers[0].kill();
    wait_backends(&s.bed, &s.socket, "backend 1 down", |l| {
        field(entry(l, &b1), "state") == "down"
    });
    let seen_down = monotonic_us();
    // A second of traffic with backend 1 down.
    wait_past_fall(&load, killed, "traffic after failover");

    let (restarted, listening, back) = restart_backend_1(&mut s, &load);
    // Another half second with both answering.
    let attempts = finish_load(load, back.start_us + SECOND_US / 2, "traffic after rise");

    let gap = assert_steady(&attempts);
    let (failed, window) = failure_window(&attempts, killed);
    let first = failures(&attempts, killed, u64::MAX)
        .first()
        .map_or(0, |a| a.start_us - killed);
    let rise = back.start_us.saturating_sub(listening);
    println!(
        "failover: backend 1 killed under a new connection every {} ms; {failed} of {} \
         connections failed, from {:.0} ms to {:.0} ms after the kill (expected about \
         (fall {FALL} + 1) x {INTERVAL_MS} ms = {:.0} ms); `lb backend list` said down \
         after {:.0} ms; restarted, it answered new connections again {:.0} ms after it \
         listened (expected about (rise {RISE} + 1) x {INTERVAL_MS} ms = {:.0} ms); \
         longest gap between new connections {:.0} ms",
        LOAD_EVERY.as_millis(),
        attempts.len(),
        ms(first),
        ms(window),
        ms(expected_fall_us()),
        ms(seen_down - killed),
        ms(rise),
        ms(expected_rise_us()),
        ms(gap),
    );
    let report = || timeline(&attempts, killed);
    assert!(
        failed > 0,
        "no connection failed after the kill: was the server killed?\n{}",
        report()
    );
    // Ordered by events, not by a clock: the agent wrote the ring before it said "down".
    assert!(
        failures(&attempts, seen_down, u64::MAX).is_empty(),
        "new connections failed after the agent said backend 1 was down:\n{}",
        report()
    );
    assert_eq!(
        answered(&attempts, seen_down, restarted),
        BTreeSet::from([name(2)]),
        "only backend 2 should answer while backend 1 is down"
    );
    assert_eq!(
        answered(&attempts, back.start_us + INTERVAL_MS * 1000, u64::MAX),
        BTreeSet::from([name(1), name(2)]),
        "both backends should answer after the rise"
    );
}

/// Active-passive: while a primary is up the backup gets nothing; when every primary dies
/// the backup takes all new connections once the agent marks them down; when a primary returns it
/// gets every new connection again (and the backup none).
#[test]
fn backup_takes_over_and_fails_back() {
    let _serial = serial();
    let mut s = Setup::new(3);
    configure_checked(&s, &[(1, &[]), (2, &[]), (3, &["--backup"])]);
    wait_checked(&s.bed, &s.socket);
    let roles: Vec<String> = s.backend_list().iter().map(|b| field(b, "role")).collect();
    assert_eq!(roles, ["primary", "primary", "backup"]);

    let load = answered_load(&s.bed);

    let killed = monotonic_us();
    s.servers[0].kill();
    s.servers[1].kill();
    let takeover = wait_load(&load, killed, "the backup answering", &|a| {
        a.backend() == Some("backend-3")
    });
    let (b1, b2) = (s.backend(1, false), s.backend(2, false));
    wait_backends(&s.bed, &s.socket, "both primaries down", |l| {
        field(entry(l, &b1), "state") == "down" && field(entry(l, &b2), "state") == "down"
    });
    let seen_down = monotonic_us();
    wait_past_fall(&load, killed, "traffic on the backup");

    let (restarted, listening, back) = restart_backend_1(&mut s, &load);
    let attempts = finish_load(load, back.start_us + SECOND_US, "traffic after failback");

    let gap = assert_steady(&attempts);
    let (failed, window) = failure_window(&attempts, killed);
    let failback = back.start_us.saturating_sub(listening);
    println!(
        "backup: both primaries killed; {failed} of {} connections failed, the last one \
         starting {:.0} ms after the kill (expected about {:.0} ms); the backup answered \
         from {:.0} ms; `lb backend list` said both down after {:.0} ms; a primary \
         restarted got new connections again {:.0} ms after it listened (expected about \
         {:.0} ms); longest gap between new connections {:.0} ms",
        attempts.len(),
        ms(window),
        ms(expected_fall_us()),
        ms(takeover.start_us - killed),
        ms(seen_down - killed),
        ms(failback),
        ms(expected_rise_us()),
        ms(gap),
    );
    let report = || timeline(&attempts, killed);
    assert_eq!(
        answered(&attempts, 0, killed),
        BTreeSet::from([name(1), name(2)]),
        "before the kill the primaries (only) answer"
    );
    assert!(failed > 0, "nothing failed after the kill:\n{}", report());
    assert_eq!(
        answered(&attempts, seen_down, restarted),
        BTreeSet::from([name(3)]),
        "the backup should take every new connection while the primaries are down"
    );
    assert!(
        failures(&attempts, seen_down, u64::MAX).is_empty(),
        "connections failed after the agent said the primaries were down:\n{}",
        report()
    );
    // The ring flips at once: a connection that starts an interval after the primary's
    // first answer must not meet the backup.
    assert_eq!(
        answered(
            &attempts,
            back.start_us + LOAD_EVERY.as_micros() as u64,
            u64::MAX
        ),
        BTreeSet::from([name(1)]),
        "after failback only the primary should get new connections:\n{}",
        report()
    );
}

/// Drain: the drained backend's keep-alive connection goes on being answered by it, every
/// new connection goes elsewhere, `lb backend drain` says how many flows it still has, and
/// undrain brings new connections back.
#[test]
fn drain_keeps_established_connections() {
    let _serial = serial();
    let s = Setup::serving(2, &[1, 2]);
    let vip = vip4().to_string();

    // The only connection through the VIP so far: the drained backend has exactly one flow.
    let (keepalive, kept) =
        s.pinned_keepalive(vip4(), Duration::from_millis(50), Duration::from_secs(30));
    let (k, other) = if kept == name(1) { (1, 2) } else { (2, 1) };
    let k_addr = s.backend(k, false);

    let said = s.lb(&["backend", "drain", &vip, &k_addr]);
    println!("drain: `lb backend drain` said: {}", said.trim());
    let flows: u64 = said
        .trim()
        .strip_suffix(" flows remain")
        .and_then(|t| t.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no flow count in {said:?}"));
    assert_eq!(
        flows, 1,
        "the drained backend has the keep-alive flow: {said}"
    );

    let tally = s.requests_from(vip4(), 40, 20_000);
    assert_split(&tally, &[(other, 40)]);
    let list = s.backend_list();
    let drained = entry(&list, &k_addr);
    assert_eq!(field(drained, "state"), "draining");
    assert_eq!(drained["drain"], true);
    assert_eq!(number(drained, "flows"), 1, "{drained}");
    assert_eq!(number(drained, "new_flows"), 1, "{drained}");
    let config = std::fs::read_to_string(&s.config).expect("config file");
    assert!(
        config.contains("drain = true"),
        "drain not saved:\n{config}"
    );

    // The keep-alive connection went on being answered all along.
    let before = keepalive.answers().len();
    keepalive
        .wait_answers(before + 5, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}"));

    let said = s.lb(&["backend", "undrain", &vip, &k_addr]);
    println!("undrain: {}", said.trim());
    let tally = s.requests_from(vip4(), 20, 20_040);
    assert_split(&tally, &[(1, 10), (2, 10)]);

    let answers = keepalive.stop();
    println!(
        "drain: {} keep-alive answers, all from {kept}; 40 new connections all to {}",
        answers.len(),
        name(other)
    );
    assert!(answers.len() >= before + 5, "{answers:?}");
    assert_all_from(&answers, &kept, "drained and undrained");
}

/// Weights 3:1 over 400 new connections: exactly 300 and 100, interleaved A A B A.
#[test]
fn weights_split_exactly_and_interleave() {
    let _serial = serial();
    let s = Setup::new(2);
    let vip = vip4().to_string();
    s.lb(&["vip", "add", &vip]);
    s.lb(&[
        "backend",
        "add",
        &vip,
        &s.backend(1, false),
        "--weight",
        "3",
    ]);
    s.lb(&[
        "backend",
        "add",
        &vip,
        &s.backend(2, false),
        "--weight",
        "1",
    ]);
    s.wait_all_up();

    let tally = s.requests_from(vip4(), 400, 20_000);
    println!(
        "weights 3:1: {:?}; first eight: {:?}",
        tally.counts,
        &tally.sequence[..8]
    );
    assert_split(&tally, &[(1, 300), (2, 100)]);
    // A fresh VIP's round-robin cursor starts at the ring's start: A A B A from the first.
    let pattern = [name(1), name(1), name(2), name(1)];
    for (i, got) in tally.sequence.iter().enumerate() {
        assert_eq!(
            got,
            &pattern[i % 4],
            "connection {i} (0-based) should go to {}; sequence from there: {:?}",
            pattern[i % 4],
            &tally.sequence[i..(i + 8).min(tally.sequence.len())]
        );
    }
    let list = s.backend_list();
    for (i, weight, flows) in [(1, 3, 300), (2, 1, 100)] {
        let b = entry(&list, &s.backend(i, false));
        assert_eq!(number(b, "weight"), weight, "{b}");
        assert_eq!(number(b, "new_flows"), flows, "{b}");
    }
}

/// Two balancers with `--algo maglev` and the same backends, sharing nothing: the same
/// flows (same source ports) go to the same backends through either, and a live
/// connection moved from one to the other mid-stream stays on its backend.
#[test]
fn maglev_balancers_agree_and_take_over_live_connections() {
    let _serial = serial();
    let mut s = Setup::new(3);
    let lb2 = s.bed.add_balancer().unwrap_or_else(|e| panic!("{e:#}"));
    let socket2 = s.bed.dir().join("lb2.sock");
    let _agent2 = s
        .bed
        .start_agent_on(&lb2, &s.bed.dir().join("lb2.toml"), &socket2, &[])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let vip = vip4().to_string();
    // The same backends, added in another order: Maglev's table depends on the addresses
    // only.
    for (socket, order) in [(&s.socket, [1, 2, 3]), (&socket2, [3, 1, 2])] {
        lb_at(&s.bed, socket, &["vip", "add", &vip, "--algo", "maglev"]);
        for i in order {
            lb_at(
                &s.bed,
                socket,
                &["backend", "add", &vip, &s.backend(i, false)],
            );
        }
        wait_backends(&s.bed, socket, "every backend up", |l| {
            l.len() == 3 && l.iter().all(|b| field(b, "state") == "up")
        });
    }
    let vip_counter = |socket: &Path, name: &str| -> u64 {
        let out = lb_at(&s.bed, socket, &["vip", "list", "--json"]);
        let list: Value = serde_json::from_str(&out).expect("vip list JSON");
        number(&list[0], name)
    };

    // The same 60 flows through lb1, then through lb2.
    const FLOWS: u32 = 60;
    const FIRST_PORT: u16 = 20_000;
    let through_lb1 = s
        .bed
        .requests_from(vip4(), FLOWS, FIRST_PORT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    s.bed
        .route_vips_via(&lb2)
        .unwrap_or_else(|e| panic!("{e:#}"));
    // One other flow first: round robin (a shared cursor) would now be one step on from
    // where lb1 started, and send every flow of the run elsewhere; Maglev must not care.
    let other = s
        .bed
        .requests_from(vip4(), 1, FIRST_PORT + FLOWS as u16)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(other.errors.is_empty(), "{other:?}");
    let through_lb2 = s
        .bed
        .requests_from(vip4(), FLOWS, FIRST_PORT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "maglev: {FLOWS} flows (source ports {FIRST_PORT}..) through lb1: {:?}, through lb2: \
         {:?}; first ten: {:?}",
        through_lb1.counts,
        through_lb2.counts,
        &through_lb1.sequence[..10]
    );
    for t in [&through_lb1, &through_lb2] {
        assert!(t.errors.is_empty(), "failed connections: {:?}", t.errors);
    }
    assert_eq!(
        through_lb1.sequence.len(),
        FLOWS as usize,
        "{through_lb1:?}"
    );
    assert_eq!(
        through_lb1.counts.len(),
        3,
        "60 flows should reach all three backends: {:?}",
        through_lb1.counts
    );
    for (i, (a, b)) in through_lb1
        .sequence
        .iter()
        .zip(&through_lb2.sequence)
        .enumerate()
    {
        assert_eq!(
            a,
            b,
            "source port {}: {a} through lb1, {b} through lb2",
            FIRST_PORT + i as u16
        );
    }
    // Each balancer really carried its run, hashing.
    for (socket, flows) in [(&s.socket, FLOWS), (&socket2, FLOWS + 1)] {
        assert_eq!(vip_counter(socket, "new_flows"), u64::from(flows));
        let out = lb_at(&s.bed, socket, &["vip", "list", "--json"]);
        let list: Value = serde_json::from_str(&out).expect("vip list JSON");
        assert_eq!(list[0]["algo"], "maglev", "{list}");
    }

    // A keep-alive connection opened through lb1 moves to lb2 mid-stream.
    s.bed
        .route_vips_via(&s.bed.lb)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let keepalive = s
        .bed
        .keepalive(vip4(), Duration::from_millis(50), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let before = keepalive
        .wait_answers(5, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let lb2_packets = vip_counter(&socket2, "packets");
    s.bed
        .route_vips_via(&lb2)
        .unwrap_or_else(|e| panic!("{e:#}"));
    keepalive
        .wait_answers(before.len() + 10, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let answers = keepalive.stop();
    let moved = vip_counter(&socket2, "packets") - lb2_packets;
    println!(
        "maglev: keep-alive connection moved from lb1 to lb2 after {} answers; {} answers in \
         all, {moved} of its packets through lb2",
        before.len(),
        answers.len()
    );
    let Some(Answer::Ok { backend: kept, .. }) = answers.first() else {
        panic!("keep-alive answers: {answers:?}");
    };
    assert_all_from(&answers, kept, "moved between balancers");
    assert!(
        moved >= 10,
        "only {moved} packets of the moved connection went through lb2"
    );
    assert_eq!(
        vip_counter(&socket2, "new_flows"),
        u64::from(FLOWS) + 2,
        "lb2 should have seen the moved connection as one new flow"
    );
}

/// `kill -9` of the agent under steady load: the pinned program keeps forwarding, not one
/// connection fails, and the agent started again with the same config and socket takes
/// over with the same backends, weights, drain and health state, and balances as before.
/// One backend is down (its server dead) throughout: the new agent must not send new
/// connections to it while its checks find out again.
#[test]
fn agent_kill_9_under_load_is_hitless() {
    let _serial = serial();
    let mut s = Setup::new(4);
    configure_checked(
        &s,
        &[
            (1, &["--weight", "2"]),
            (2, &[]),
            (3, &["--weight", "1"]),
            (4, &[]),
        ],
    );
    let vip = vip4().to_string();
    s.lb(&["backend", "drain", &vip, &s.backend(3, false)]);
    s.servers[3].kill();
    let b4 = s.backend(4, false);
    wait_backends(&s.bed, &s.socket, "checked, backend 4 down", |l| {
        l.iter().all(|b| {
            let down = field(b, "address") == b4;
            b["last_check"] == if down { "failed" } else { "ok" }
                && (field(b, "state") == "down") == down
        })
    });
    let settings = |list: &[Value]| -> BTreeSet<Vec<String>> {
        list.iter()
            .map(|b| {
                [
                    "vip", "address", "weight", "role", "drain", "state", "check",
                ]
                .iter()
                .map(|f| field(b, f))
                .collect()
            })
            .collect()
    };
    let before = s.backend_list();

    let load = steady_load(&s.bed);
    let wait = |since: u64, what: &str| wait_load(&load, since, what, &|_| true);
    wait(monotonic_us() + SECOND_US / 2, "baseline");

    let killed = monotonic_us();
    s.agent.proc.kill();
    let status = s.agent.proc.try_wait().expect("reaped");
    // Half a second with no agent at all: the pinned program forwards alone.
    wait(killed + SECOND_US / 2, "traffic without an agent");
    let restarted = monotonic_us();
    s.agent = s
        .bed
        .start_agent(&s.config, &s.socket)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let ready = monotonic_us();
    let attempts = finish_load(load, ready + SECOND_US, "traffic after the restart");
    let after = s.backend_list();

    // What matters here is that no connection failed and enough ran while no agent was
    // there (checked below), not the pacing.
    let gap = longest_gap(&attempts);
    let failed = failures(&attempts, 0, u64::MAX);
    let during = attempts
        .iter()
        .filter(|a| (killed..ready).contains(&a.start_us))
        .count();
    println!(
        "kill -9: agent killed ({status}), started again {:.0} ms later, ready after {:.0} ms \
         more; {} connections, {during} of them while no agent answered, {} failed; longest \
         gap between new connections {:.0} ms",
        ms(restarted - killed),
        ms(ready - restarted),
        attempts.len(),
        failed.len(),
        ms(gap)
    );
    assert!(
        failed.is_empty(),
        "connections failed across the agent's kill and restart:\n{}",
        timeline(&attempts, killed)
    );
    assert!(
        during >= 20,
        "only {during} connections while the agent was away"
    );
    assert_eq!(
        answered(&attempts, 0, u64::MAX),
        BTreeSet::from([name(1), name(2)]),
        "the drained backend must get no new connections, before or after the restart"
    );
    let log = s.agent.proc.log();
    assert!(
        log.contains("took over"),
        "the new agent should take over the pinned state; its log:\n{log}"
    );
    assert_eq!(
        settings(&after),
        settings(&before),
        "backends after the restart"
    );
    // Counters were adopted, not reset.
    for b in &before {
        let now = entry(&after, &field(b, "address"));
        assert!(
            number(now, "new_flows") >= number(b, "new_flows"),
            "counters went back: {b} -> {now}"
        );
    }

    // Still balanced 2:1 (and nothing to the drained backend).
    let tally = s.requests_from(vip4(), 300, 20_000);
    assert_split(&tally, &[(1, 200), (2, 100)]);
}

/// An HTTP check follows the status of its path: a backend is up while `http:/health`
/// answers 200, goes down once `http:/fail` answers 503 (`fall` times), and comes back; the
/// backend list shows state, last check and its latency.
#[test]
fn http_check_marks_backends_down_and_up() {
    let _serial = serial();
    let s = Setup::new(2);
    let vip = vip4().to_string();
    add_checked(&s, "http:/health");
    for i in [1, 2] {
        s.lb(&["backend", "add", &vip, &s.backend(i, false)]);
    }
    wait_checked(&s.bed, &s.socket);
    for b in s.backend_list() {
        assert_eq!(field(&b, "check"), "http:/health", "{b}");
        assert_eq!(field(&b, "last_check_detail"), "HTTP 200", "{b}");
        assert!(number(&b, "check_latency_us") > 0, "{b}");
    }
    assert_split(&s.requests_from(vip4(), 10, 20_000), &[(1, 5), (2, 5)]);

    let set = monotonic_us();
    s.lb(&["vip", "set", &vip, "--check", "http:/fail"]);
    wait_backends(&s.bed, &s.socket, "every backend down", |l| {
        l.iter().all(|b| field(b, "state") == "down")
    });
    let down = monotonic_us() - set;
    let list = s.backend_list();
    for b in &list {
        assert_eq!(field(b, "last_check"), "failed", "{b}");
        assert!(field(b, "last_check_detail").contains("503"), "{b}");
        assert!(number(b, "check_latency_us") > 0, "{b}");
    }
    println!(
        "http check: /fail (503) took both backends down after {:.0} ms (expected about \
         {:.0} ms); last check: {:?}",
        ms(down),
        ms(expected_fall_us()),
        list.iter()
            .map(|b| field(b, "last_check_detail"))
            .collect::<Vec<_>>()
    );
    // No backend can take a new connection now: it is refused with a RST, and counted so.
    let tally = s
        .bed
        .requests_from(vip4(), 1, 20_010)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(tally.errors.len(), 1, "{tally:?}");
    let stats: Value = serde_json::from_str(&s.lb(&["stats", "--json"])).expect("stats JSON");
    assert!(
        number(&stats["reasons"]["reset_no_backend"], "packets") > 0,
        "{stats:#}"
    );

    s.lb(&["vip", "set", &vip, "--check", "http:/health"]);
    wait_checked(&s.bed, &s.socket);
    assert_split(&s.requests_from(vip4(), 10, 20_011), &[(1, 5), (2, 5)]);
}
