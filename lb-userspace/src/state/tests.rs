//! The state's changes against the in-memory data plane.

use std::{collections::HashMap, net::IpAddr};

use lb_common::{BACKEND_F_IN_USE, BACKEND_F_KEEP_FLOWS, BACKEND_F_RESOLVED};

use super::*;
use crate::{
    config::{BackendConfig, Config, VipConfig},
    health::{Outcome, Report},
    model::{L2Path, Proto},
};

fn service(port: u16) -> Service {
    Service::new(([10, 0, 0, 1], port).into(), Proto::Tcp).unwrap()
}

fn addr(i: u32) -> IpAddr {
    IpAddr::from([10, 1, (i >> 8) as u8, i as u8])
}

fn reached(i: u32) -> Reach {
    Reach {
        l2: Some(L2Path {
            ifindex: 2,
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, (i >> 8) as u8, i as u8],
            via: None,
        }),
        ..Default::default()
    }
}

fn backend(i: u32) -> BackendConfig {
    BackendConfig::new(addr(i))
}

fn vip(port: u16, algo: Algo, backends: impl IntoIterator<Item = u32>) -> VipConfig {
    VipConfig::new(
        service(port).addr,
        algo,
        backends.into_iter().map(backend).collect(),
    )
}

fn reach_all(config: &Config) -> HashMap<IpAddr, Reach> {
    config
        .vips
        .iter()
        .flat_map(|v| &v.backends)
        .map(|b| {
            let IpAddr::V4(a) = b.address else {
                unreachable!()
            };
            let o = a.octets();
            (b.address, reached((o[2] as u32) << 8 | o[3] as u32))
        })
        .collect()
}

fn state() -> State<Fake> {
    State::new(Fake::default(), None)
}

/// Applies a configuration of `vips` (nothing else), every backend resolved.
fn apply_vips(s: &mut State<Fake>, vips: Vec<VipConfig>) -> Plan {
    let config = Config {
        vips,
        ..Default::default()
    };
    s.apply(&config, &reach_all(&config)).unwrap()
}

/// Adds a VIP on `svc` with `algo`, no check or limits, and backends `backends`, resolved.
fn add_plain_vip(
    s: &mut State<Fake>,
    svc: Service,
    algo: Algo,
    backends: impl IntoIterator<Item = u32>,
) {
    s.add_vip(svc, algo, CheckSpec::default(), RateLimit::default())
        .unwrap();
    for i in backends {
        s.add_backend(&svc, &backend(i), reached(i)).unwrap();
    }
}

/// A round-robin VIP on port 80 with a TCP check of `rise` and `fall`, and backends
/// `1..=n`, all resolved.
fn checked_vip(s: &mut State<Fake>, rise: u32, fall: u32, n: u32) -> Service {
    let svc = service(80);
    let check = CheckSpec {
        check: crate::health::CheckKind::Tcp,
        rise,
        fall,
        ..Default::default()
    };
    s.add_vip(svc, Algo::Rr, check, RateLimit::default())
        .unwrap();
    for i in 1..=n {
        s.add_backend(&svc, &backend(i), reached(i)).unwrap();
    }
    svc
}

/// A check result for backend id `backend_id` of `generation`.
fn result_for(backend_id: u32, generation: u32, ok: bool) -> Report {
    Report {
        backend_id,
        generation,
        outcome: Outcome {
            ok,
            latency_us: 5,
            detail: String::new(),
        },
    }
}

/// A check result for the backend `addr(i)` of `svc` as it is now.
fn report(s: &State<Fake>, svc: &Service, i: u32, ok: bool) -> Report {
    let b = s.backend(svc, addr(i)).unwrap();
    result_for(b.id, b.generation, ok)
}

fn ring_addrs(s: &State<Fake>, svc: &Service) -> Vec<IpAddr> {
    let ids: HashMap<u32, IpAddr> = s
        .vip(svc)
        .unwrap()
        .backends
        .iter()
        .map(|b| (b.id, b.addr))
        .collect();
    s.dataplane()
        .ring(&svc.key())
        .iter()
        .map(|id| ids[id])
        .collect()
}

#[test]
fn only_resolved_backends_enter_the_ring() {
    let mut s = state();
    let svc = service(80);
    add_plain_vip(&mut s, svc, Algo::Rr, [1]);
    s.add_backend(&svc, &backend(2), Reach::default()).unwrap();
    assert_eq!(ring_addrs(&s, &svc), vec![addr(1)]);
    let b2 = s.backend(&svc, addr(2)).unwrap().id;
    assert_eq!(s.dataplane().backends[&b2].flags & BACKEND_F_RESOLVED, 0);

    // The kernel resolves it later: written and in the ring.
    s.apply_reach(&HashMap::from([(addr(2), reached(2))]))
        .unwrap();
    assert_eq!(ring_addrs(&s, &svc), vec![addr(1), addr(2)]);
    assert_ne!(s.dataplane().backends[&b2].flags & BACKEND_F_RESOLVED, 0);
    assert!(s.dataplane().tx_ports.contains(&2));
}

#[test]
fn a_failed_backend_leaves_the_ring_and_its_flows_move() {
    let mut s = state();
    let svc = checked_vip(&mut s, 1, 1, 3);
    let b2 = s.backend(&svc, addr(2)).unwrap();
    let (id, generation) = (b2.id, b2.generation);
    assert!(s.on_report(result_for(id, generation, false)).unwrap());
    assert_eq!(ring_addrs(&s, &svc), vec![addr(1), addr(3)]);
    let entry = s.dataplane().backends[&id];
    assert_eq!(entry.flags & BACKEND_F_KEEP_FLOWS, 0, "its flows move");
    assert_ne!(entry.flags & BACKEND_F_IN_USE, 0);
    // A result for an older generation of the id changes nothing.
    assert!(!s.on_report(result_for(id, generation + 1, true)).unwrap());
}

#[test]
fn backups_take_over_only_when_no_primary_can() {
    let mut s = state();
    let svc = service(80);
    add_plain_vip(&mut s, svc, Algo::Rr, [1]);
    let spare = BackendConfig {
        backup: true,
        ..backend(2)
    };
    s.add_backend(&svc, &spare, reached(2)).unwrap();
    assert_eq!(ring_addrs(&s, &svc), vec![addr(1)]);
    s.drain_backend(&svc, addr(1), true).unwrap();
    assert_eq!(ring_addrs(&s, &svc), vec![addr(2)]);
}

#[test]
fn a_removed_backend_is_out_of_the_ring_and_out_of_use() {
    let mut s = state();
    let svc = service(80);
    add_plain_vip(&mut s, svc, Algo::Rr, [1, 2]);
    let id = s.backend(&svc, addr(2)).unwrap().id;
    s.del_backend(&svc, addr(2)).unwrap();
    assert_eq!(ring_addrs(&s, &svc), vec![addr(1)]);
    assert_eq!(s.dataplane().backends[&id].flags, 0);
    assert!(s.backend(&svc, addr(2)).is_err());
}

/// A change to one backend among many rewrites only the ring slots that differ.
#[test]
fn maglev_changes_write_few_slots() {
    let mut s = state();
    apply_vips(&mut s, vec![vip(80, Algo::Maglev, 0..1000)]);
    let svc = service(80);
    assert_eq!(
        s.dataplane().ring(&svc.key()).len(),
        model::MAGLEV_TABLE_SIZE as usize
    );
    // Both regions hold a full table once each has been written.
    s.drain_backend(&svc, addr(5), true).unwrap();
    let before = s.dataplane().slot_writes;
    s.drain_backend(&svc, addr(7), true).unwrap();
    let written = s.dataplane().slot_writes - before;
    assert!(
        written < 1000,
        "{written} slots written for one backend of 1,000"
    );
    assert!(!ring_addrs(&s, &svc).contains(&addr(7)));
}

#[test]
fn applying_the_same_config_changes_nothing() {
    let mut s = state();
    let config = Config {
        vips: vec![vip(80, Algo::Rr, 0..10_000)],
        ..Default::default()
    };
    let plan = s.apply(&config, &reach_all(&config)).unwrap();
    assert_eq!(plan.changes.len(), 10_001);
    assert_eq!(ring_addrs(&s, &service(80)).len(), 10_000);
    assert!(s.plan(&config).unwrap().changes.is_empty());
    assert_eq!(s.config(), config);
}

/// An unchanged backend keeps its id and health; a changed one keeps its id too.
#[test]
fn apply_touches_only_what_changed() {
    let mut s = state();
    let mut config = Config {
        vips: vec![vip(80, Algo::Rr, 0..4), vip(81, Algo::Rr, 0..2)],
        ..Default::default()
    };
    config.firewall.drop = vec!["192.0.2.0/24".parse().unwrap()];
    s.apply(&config, &reach_all(&config)).unwrap();
    let svc = service(80);
    let ids: Vec<u32> = (0..4)
        .map(|i| s.backend(&svc, addr(i)).unwrap().id)
        .collect();
    let last = Outcome {
        ok: true,
        latency_us: 42,
        detail: "seen".into(),
    };
    s.vips[0].backends[0].health.last = Some(last.clone());

    config.vips[0].backends[1].weight = 3; // changed
    config.vips[0].backends.remove(2); // removed
    config.vips[0].backends.push(backend(9)); // added
    config.vips.remove(1); // VIP removed
    config.firewall.drop = vec!["198.51.100.0/24".parse().unwrap()];
    let plan = s.plan(&config).unwrap();
    let lines: Vec<String> = plan.changes.iter().map(|c| c.to_string()).collect();
    assert_eq!(
        lines,
        [
            "- drop 192.0.2.0/24",
            "- vip 10.0.0.1:81/tcp",
            "- backend 10.1.0.2 of 10.0.0.1:80/tcp",
            "+ drop 198.51.100.0/24",
            "~ backend 10.1.0.1 of 10.0.0.1:80/tcp",
            "+ backend 10.1.0.9 of 10.0.0.1:80/tcp",
        ]
    );
    assert_eq!(plan.summary(), "2 added, 1 changed, 3 removed");
    s.apply(&config, &reach_all(&config)).unwrap();
    let b0 = s.backend(&svc, addr(0)).unwrap();
    assert_eq!(b0.id, ids[0]);
    assert_eq!(b0.health.last.as_ref(), Some(&last), "health kept");
    assert_eq!(s.backend(&svc, addr(1)).unwrap().id, ids[1]);
    assert_eq!(s.backend(&svc, addr(1)).unwrap().weight, 3);
    assert_eq!(
        s.dataplane().backends[&ids[2]].flags,
        0,
        "removed: not in use"
    );
    assert!(s.vip(&service(81)).is_err());
    assert_eq!(s.config(), config);
    let ring = ring_addrs(&s, &svc);
    assert_eq!(ring.iter().filter(|a| **a == addr(1)).count(), 3);
    assert!(!ring.contains(&addr(2)));
}

#[test]
fn apply_that_does_not_fit_changes_nothing() {
    let mut s = state();
    let config = Config {
        vips: (0..(MAX_VIPS + 1) as u16)
            .map(|p| vip(1000 + p, Algo::Rr, []))
            .collect(),
        ..Default::default()
    };
    let err = s.apply(&config, &HashMap::new()).unwrap_err();
    assert!(err.to_string().contains("too many VIPs"), "{err}");
    assert!(s.vips().is_empty());
    assert!(s.dataplane().vips.is_empty());
}

#[test]
fn adoption_keeps_ids_and_removes_what_is_not_claimed() {
    // An earlier agent's maps: VIP 80 with backends 1 and 2, VIP 81, one rule.
    let mut old = state();
    apply_vips(
        &mut old,
        vec![vip(80, Algo::Rr, 1..3), vip(81, Algo::Rr, [])],
    );
    old.add_rule("192.0.2.0/24".parse().unwrap()).unwrap();
    let svc = service(80);
    let id1 = old.backend(&svc, addr(1)).unwrap().id;
    let id2 = old.backend(&svc, addr(2)).unwrap().id;
    let dp = std::mem::take(old.dataplane_mut());
    let pinned = Pinned {
        vips: dp.vips.iter().map(|(k, m)| (*k, *m)).collect(),
        backends: dp.backends.iter().map(|(i, b)| (*i, *b)).collect(),
        rules: dp.rules.iter().map(|(n, i)| (*n, *i)).collect(),
        vip_addrs: dp.vip_addrs.iter().copied().collect(),
    };

    let mut new = State::new(dp, None);
    new.prepare_adoption(pinned);
    apply_vips(&mut new, vec![vip(80, Algo::Rr, [2])]);
    new.finish_adoption().unwrap();
    assert_eq!(new.backend(&svc, addr(2)).unwrap().id, id2, "id kept");
    assert_eq!(
        new.dataplane().backends[&id1].flags,
        0,
        "unclaimed: out of use"
    );
    assert!(!new.dataplane().vips.contains_key(&service(81).key()));
    assert!(new.dataplane().rules.is_empty());
    assert_eq!(ring_addrs(&new, &svc), vec![addr(2)]);
}

/// A least-connections VIP's ring is (id, weight) pairs of the backends in rotation, its
/// backends are flagged for the data plane to watch their flows' FIN/RST, and switching
/// the algorithm back clears the flag.
#[test]
fn least_connections_writes_id_weight_pairs_and_flags_its_backends() {
    let mut s = state();
    let svc = service(3306);
    add_plain_vip(&mut s, svc, Algo::Leastconn, [1]);
    let heavy = BackendConfig {
        weight: 3,
        ..backend(2)
    };
    s.add_backend(&svc, &heavy, reached(2)).unwrap();
    let ids: Vec<u32> = [1, 2].map(|i| s.backend(&svc, addr(i)).unwrap().id).into();
    assert_eq!(s.dataplane().ring(&svc.key()), vec![ids[0], 1, ids[1], 3]);
    assert_eq!(
        s.dataplane().vips[&svc.key()].flags,
        lb_common::VIP_F_LEASTCONN
    );
    let flagged = |s: &State<Fake>| {
        ids.iter()
            .all(|id| s.dataplane().backends[id].flags & lb_common::BACKEND_F_LEASTCONN != 0)
    };
    assert!(flagged(&s));
    s.drain_backend(&svc, addr(1), true).unwrap();
    assert_eq!(s.dataplane().ring(&svc.key()), vec![ids[1], 3]);
    s.set_vip(
        &svc,
        Some(Algo::Rr),
        &CheckPatch::default(),
        &RatePatch::default(),
    )
    .unwrap();
    assert!(
        ids.iter()
            .all(|id| { s.dataplane().backends[id].flags & lb_common::BACKEND_F_LEASTCONN == 0 })
    );
}

/// Source affinity reaches the VIP's map entry (nanoseconds, the IPv6 mask), is saved in
/// the configuration, and a configuration that changes only it is a change of the VIP.
#[test]
fn persistence_is_written_saved_and_applied() {
    let mut s = state();
    let svc = service(443);
    add_plain_vip(&mut s, svc, Algo::Rr, []);
    let p = Persist {
        seconds: 300,
        prefix6: 48,
    };
    s.set_persist(&svc, p).unwrap();
    let meta = s.dataplane().vips[&svc.key()];
    assert_eq!((meta.persist_ns, meta.persist_mask6), p.meta());
    let mut config = s.config();
    assert_eq!(config.vips[0].persist, 300);
    assert_eq!(config.vips[0].persist_prefix6, 48);
    config.vips[0].persist = 0;
    let plan = s.apply(&config, &HashMap::new()).unwrap();
    assert_eq!(plan.changes, vec![Change::SetVip { vip: svc }]);
    assert_eq!(s.dataplane().vips[&svc.key()].persist_ns, 0);
    assert!(
        s.set_persist(
            &svc,
            Persist {
                seconds: 1,
                prefix6: 0
            }
        )
        .is_err()
    );
}
/// A changed check (the VIP's or the backend's own) starts counting afresh but does not
/// bring a down backend back: it stays out of the ring until `rise` good checks.
#[test]
fn a_changed_check_keeps_a_down_backend_down_until_rise() {
    let mut s = state();
    let svc = checked_vip(&mut s, 2, 1, 2);
    assert!(s.on_report(report(&s, &svc, 2, false)).unwrap());
    let down = |s: &State<Fake>| {
        let b = s.backend(&svc, addr(2)).unwrap();
        let entry = s.dataplane().backends[&b.id];
        !b.health.up && entry.flags & BACKEND_F_KEEP_FLOWS == 0
    };
    assert!(down(&s));

    let slower = CheckPatch {
        interval_ms: Some(3000),
        ..Default::default()
    };
    s.set_vip(&svc, None, &slower, &RatePatch::default())
        .unwrap();
    assert!(down(&s), "a VIP check change brought a down backend back");
    assert_eq!(ring_addrs(&s, &svc), vec![addr(1)]);
    let own = CheckPatch {
        timeout_ms: Some(500),
        ..Default::default()
    };
    s.set_backend(&svc, addr(2), None, None, &own).unwrap();
    assert!(down(&s), "a backend check change brought it back");
    assert_eq!(ring_addrs(&s, &svc), vec![addr(1)]);
    // The same through `apply`.
    let mut config = s.config();
    config.vips[0].check.interval_ms = 4000;
    config.vips[0].backends[1].check = None;
    s.apply(&config, &HashMap::new()).unwrap();
    assert!(down(&s), "an applied check change brought it back");

    assert!(!s.on_report(report(&s, &svc, 2, true)).unwrap());
    assert!(
        s.on_report(report(&s, &svc, 2, true)).unwrap(),
        "up after rise"
    );
    assert_eq!(ring_addrs(&s, &svc), vec![addr(1), addr(2)]);

    // With no check at all nothing could bring it back: it is up.
    assert!(s.on_report(report(&s, &svc, 2, false)).unwrap());
    let none = CheckPatch {
        check: Some(crate::health::CheckKind::None),
        ..Default::default()
    };
    s.set_backend(&svc, addr(2), None, None, &none).unwrap();
    assert!(!down(&s));
    assert_eq!(ring_addrs(&s, &svc), vec![addr(1), addr(2)]);
}

/// What the data plane reads: per VIP its id, flags, rate and ring (not where the ring
/// sits in the slab); every backend entry in use; the VIP addresses; the drop rules.
type Observed = (
    std::collections::BTreeMap<String, (u32, u32, u64, u64, Vec<u32>)>,
    std::collections::BTreeMap<u32, String>,
    Vec<String>,
    Vec<(String, u32)>,
);

fn observed(s: &State<Fake>) -> Observed {
    let dp = s.dataplane();
    let vips = dp
        .vips
        .iter()
        .map(|(k, m)| {
            let meta = (m.vip_id, m.flags, m.rate_interval_ns, m.rate_burst_ns);
            let key = format!("{k:?}");
            (key, (meta.0, meta.1, meta.2, meta.3, dp.ring(k)))
        })
        .collect();
    let backends = dp
        .backends
        .iter()
        .filter(|(_, b)| b.flags & BACKEND_F_IN_USE != 0)
        .map(|(id, b)| (*id, format!("{b:?}")))
        .collect();
    let mut addrs: Vec<String> = dp.vip_addrs.iter().map(|a| format!("{a:?}")).collect();
    addrs.sort();
    let mut rules: Vec<(String, u32)> = dp.rules.iter().map(|(n, i)| (n.to_string(), *i)).collect();
    rules.sort();
    (vips, backends, addrs, rules)
}

/// What the agent remembers: the configuration, and each backend's id, generation and
/// health.
fn remembered(s: &State<Fake>) -> (Config, Vec<(IpAddr, u32, u32, bool)>) {
    let ids = s
        .vips()
        .iter()
        .flat_map(|v| &v.backends)
        .map(|b| (b.addr, b.id, b.generation, b.health.up))
        .collect();
    (s.config(), ids)
}

/// Two VIPs with three backends each (one down, one draining), a drop rule. (Round robin:
/// a Maglev table takes long to build in a debug build; `vip set` makes one.)
fn busy_state() -> State<Fake> {
    let mut s = state();
    let mut rr = vip(80, Algo::Rr, 1..4);
    rr.check.check = crate::health::CheckKind::Tcp;
    rr.check.fall = 1;
    rr.backends[2].drain = true;
    let config = Config {
        vips: vec![rr, vip(81, Algo::Rr, 4..7)],
        firewall: crate::config::FirewallConfig {
            drop: vec!["192.0.2.0/24".parse().unwrap()],
        },
        ..Default::default()
    };
    s.apply(&config, &reach_all(&config)).unwrap();
    assert!(s.on_report(report(&s, &service(80), 2, false)).unwrap());
    s
}

/// Every change, failing at each of its map writes in turn, leaves the memory and what
/// the data plane reads as they were; the same change then succeeds.
#[test]
fn a_change_that_fails_at_any_map_write_changes_nothing() {
    type Step = fn(&mut State<Fake>) -> Result<()>;
    let changes: Vec<(&str, Step)> = vec![
        ("vip add", |s| {
            let check = CheckSpec::default();
            s.add_vip(service(82), Algo::Maglev, check, RateLimit::new(10, None))
        }),
        ("vip set", |s| {
            let check = CheckPatch {
                interval_ms: Some(100),
                ..Default::default()
            };
            s.set_vip(
                &service(80),
                Some(Algo::Maglev),
                &check,
                &RatePatch {
                    rate_limit: Some(5),
                    ..Default::default()
                },
            )
        }),
        ("vip del", |s| s.del_vip(&service(81))),
        ("backend add", |s| {
            s.add_backend(&service(80), &backend(9), reached(9))
        }),
        ("backend set", |s| {
            s.set_backend(
                &service(81),
                addr(4),
                Some(5),
                Some(true),
                &CheckPatch::default(),
            )
        }),
        ("backend check", |s| {
            s.set_backend(
                &service(80),
                addr(1),
                None,
                None,
                &CheckPatch {
                    check: Some(crate::health::CheckKind::None),
                    ..Default::default()
                },
            )
        }),
        ("backend drain", |s| {
            s.drain_backend(&service(81), addr(5), true)
        }),
        ("backend del", |s| s.del_backend(&service(81), addr(6))),
        ("firewall add", |s| {
            s.add_rule("198.51.100.0/24".parse().unwrap())
        }),
        ("firewall del", |s| {
            s.del_rule("192.0.2.0/24".parse().unwrap())
        }),
        ("apply", |s| {
            let mut config = s.config();
            config.vips[0].backends.remove(0);
            config.vips[0].backends.push(backend(10));
            config.vips[0].backends[0].weight = 7;
            config.vips[1].rate_limit = 50;
            config.vips.push(vip(83, Algo::Rr, 11..13));
            config.vips.remove(1);
            config.firewall.drop.push("203.0.113.0/24".parse().unwrap());
            let reach = reach_all(&config);
            s.apply(&config, &reach).map(drop)
        }),
    ];
    for (what, step) in changes {
        let mut s = busy_state();
        let base = s.dataplane().writes;
        s.change(step).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        let writes = s.dataplane().writes - base;
        assert!(writes > 0, "{what} writes nothing");
        for n in 1..=writes {
            let mut s = busy_state();
            let (before, memory) = (observed(&s), remembered(&s));
            let dp = s.dataplane_mut();
            dp.fail_at = Some(dp.writes + n);
            let err = s.change(step).err();
            assert!(err.is_some(), "{what}: write {n} of {writes} failed unseen");
            assert_eq!(
                remembered(&s),
                memory,
                "{what}, write {n} of {writes}: memory"
            );
            assert_eq!(
                observed(&s),
                before,
                "{what}, write {n} of {writes}: data plane"
            );
            s.change(step)
                .unwrap_or_else(|e| panic!("{what} after failing at write {n}: {e:#}"));
        }
    }
}

/// A change taken back after it was made (its configuration could not be saved): the
/// memory and the data plane are as before it, and health learned meanwhile is kept.
#[test]
fn an_undone_change_restores_memory_and_maps() {
    let mut s = busy_state();
    let (before, memory) = (observed(&s), remembered(&s));
    let ((), undo) = s
        .change(|s| {
            s.del_backend(&service(80), addr(3))?;
            s.add_backend(&service(80), &backend(9), reached(9))?;
            s.del_vip(&service(81))
        })
        .unwrap();
    assert_ne!(observed(&s), before);
    let id9 = s.backend(&service(80), addr(9)).unwrap().id;
    // Meanwhile backend 2 came back up.
    assert!(!s.on_report(report(&s, &service(80), 2, true)).unwrap());
    assert!(s.on_report(report(&s, &service(80), 2, true)).unwrap());
    s.undo(undo).unwrap();
    let b2 = s.backend(&service(80), addr(2)).unwrap();
    assert!(b2.health.up, "health learned meanwhile was lost");
    let mut memory = memory;
    memory.1.iter_mut().for_each(|b| b.3 |= b.0 == addr(2));
    assert_eq!(remembered(&s), memory);
    let mut now = observed(&s);
    let mut was = before;
    // Only backend 2's entry (now up) and its place in the ring differ.
    let id2 = b2.id;
    now.1.remove(&id2);
    was.1.remove(&id2);
    let vip80 = format!("{:?}", service(80).key());
    now.0.remove(&vip80);
    was.0.remove(&vip80);
    assert_eq!(now, was);
    assert_eq!(ring_addrs(&s, &service(80)), vec![addr(1), addr(2)]);
    // The taken-back backend's id is quarantined, not handed out again at once.
    s.change(|s| s.add_backend(&service(80), &backend(9), reached(9)))
        .unwrap();
    assert_ne!(s.backend(&service(80), addr(9)).unwrap().id, id9);
}

/// A leaving backend takes no new flows but keeps its own (KEEP_FLOWS), and comes back
/// leaving from the configuration file (a restart); it is due to go when its time is up
/// or when it is down.
#[test]
fn a_leaving_backend_keeps_its_flows_and_its_state_in_the_config() {
    let mut s = state();
    let svc = service(80);
    apply_vips(&mut s, vec![vip(80, Algo::Rr, 1..3)]);
    s.leave_backend(&svc, addr(2), 1000).unwrap();
    let b2 = s.backend(&svc, addr(2)).unwrap();
    assert_eq!(b2.state(), "leaving");
    let id = (b2.id, b2.generation);
    let flags = s.dataplane().backends[&id.0].flags;
    assert_ne!(flags & BACKEND_F_KEEP_FLOWS, 0, "its flows stay");
    assert_eq!(ring_addrs(&s, &svc), vec![addr(1)]);
    assert_eq!(s.leaving(999), vec![(svc, addr(2), id, false)]);
    assert_eq!(s.leaving(1000), vec![(svc, addr(2), id, true)]);

    let saved = s.config();
    assert_eq!(saved.vips[0].backends[1].leaving_until, Some(1000));
    let mut restarted = state();
    restarted.apply(&saved, &reach_all(&saved)).unwrap();
    assert_eq!(restarted.backend(&svc, addr(2)).unwrap().state(), "leaving");
    assert_eq!(ring_addrs(&restarted, &svc), vec![addr(1)]);
    let mut down = s;
    down.vips[0].backends[1].health.up = false;
    assert!(
        down.leaving(0)[0].3,
        "a down backend's flows move anyway: due"
    );
}

/// The pinned maps of `old`, as `Datapath::pinned` reads them, and the maps themselves.
fn pinned_of(mut old: State<Fake>) -> (Fake, Pinned) {
    let dp = std::mem::take(old.dataplane_mut());
    let pinned = Pinned {
        vips: dp.vips.iter().map(|(k, m)| (*k, *m)).collect(),
        backends: dp.backends.iter().map(|(i, b)| (*i, *b)).collect(),
        rules: dp.rules.iter().map(|(n, i)| (*n, *i)).collect(),
        vip_addrs: dp.vip_addrs.iter().copied().collect(),
    };
    (dp, pinned)
}

#[test]
fn adopted_ids_are_reserved_before_new_entries_whatever_the_order() {
    // An earlier agent: VIP 81 with backend 2 (VIP id 0, backend id 0), one rule.
    let mut old = state();
    apply_vips(&mut old, vec![vip(81, Algo::Rr, [2])]);
    old.add_rule("192.0.2.0/24".parse().unwrap()).unwrap();
    let (vip_id, backend) = {
        let v = old.vip(&service(81)).unwrap();
        (v.id, (v.backends[0].id, v.backends[0].generation))
    };
    let rule_id = old.rules()[0].1;
    let (dp, pinned) = pinned_of(old);

    // The new config puts a new VIP with a new backend, and a new rule, first.
    let mut new = State::new(dp, None);
    new.prepare_adoption(pinned);
    let mut config = Config {
        vips: vec![vip(80, Algo::Rr, [1]), vip(81, Algo::Rr, [2])],
        ..Default::default()
    };
    config.firewall.drop = vec![
        "198.51.100.0/24".parse().unwrap(),
        "192.0.2.0/24".parse().unwrap(),
    ];
    new.apply(&config, &reach_all(&config)).unwrap();
    new.finish_adoption().unwrap();
    let adopted = new.vip(&service(81)).unwrap();
    assert_eq!(adopted.id, vip_id, "the adopted VIP keeps its id");
    let b = &adopted.backends[0];
    assert_eq!(
        (b.id, b.generation),
        backend,
        "the adopted backend keeps its id"
    );
    assert_ne!(new.vip(&service(80)).unwrap().id, vip_id);
    assert_ne!(new.backend(&service(80), addr(1)).unwrap().id, backend.0);
    let rules: HashMap<IpNet, u32> = new.rules().iter().copied().collect();
    assert_eq!(rules[&"192.0.2.0/24".parse().unwrap()], rule_id);
    // The adopted backend's entry is as the data plane's flows expect it.
    let entry = new.dataplane().backends[&backend.0];
    assert_eq!(entry.generation, backend.1);
    assert_ne!(entry.flags & BACKEND_F_IN_USE, 0);
    assert_eq!(entry.vip_id, vip_id);
}

#[test]
fn a_backend_being_re_resolved_keeps_its_last_mac_and_its_place() {
    let mut s = state();
    apply_vips(&mut s, vec![vip(80, Algo::Rr, [1, 2])]);
    let svc = service(80);
    let resolving = Reach {
        note: Some("MAC address being resolved (interface 2)".into()),
        resolving_on: Some(2),
        ..Default::default()
    };
    s.apply_reach(&HashMap::from([(addr(1), resolving.clone())]))
        .unwrap();
    let b = s.backend(&svc, addr(1)).unwrap();
    assert_eq!(b.l2, reached(1).l2, "the last known MAC is kept");
    assert_eq!(b.state(), "up");
    assert!(
        b.note.as_deref().unwrap().contains("last known MAC"),
        "{:?}",
        b.note
    );
    let entry = s.dataplane().backends[&b.id];
    assert_ne!(entry.flags & BACKEND_F_RESOLVED, 0);
    assert_eq!(ring_addrs(&s, &svc).len(), 2);
    // Looked at again every tick until it is resolved.
    assert_eq!(s.reach_targets(false), vec![addr(1)]);
    s.apply_reach(&HashMap::from([(addr(1), reached(1))]))
        .unwrap();
    assert_eq!(s.backend(&svc, addr(1)).unwrap().note, None);
    assert!(s.reach_targets(false).is_empty());

    // The kernel gave up (no answer), or the route moved: unresolved.
    let failed = Reach {
        note: Some("MAC address not resolved".into()),
        ..Default::default()
    };
    s.apply_reach(&HashMap::from([(addr(1), failed)])).unwrap();
    assert_eq!(s.backend(&svc, addr(1)).unwrap().state(), "unresolved");
    assert_eq!(ring_addrs(&s, &svc), vec![addr(2)]);
}

#[test]
fn an_adopted_backend_being_re_resolved_keeps_the_pinned_mac() {
    let mut old = state();
    let config = Config {
        vips: vec![vip(80, Algo::Rr, [1])],
        ..Default::default()
    };
    old.apply(&config, &reach_all(&config)).unwrap();
    let (dp, pinned) = pinned_of(old);
    let mut new = State::new(dp, None);
    new.prepare_adoption(pinned);
    let resolving = Reach {
        note: Some("MAC address being resolved (interface 2)".into()),
        resolving_on: Some(2),
        ..Default::default()
    };
    new.apply(&config, &HashMap::from([(addr(1), resolving)]))
        .unwrap();
    new.finish_adoption().unwrap();
    let b = new.backend(&service(80), addr(1)).unwrap();
    assert_eq!(b.l2, reached(1).l2);
    assert_eq!(b.state(), "up");
}

/// A backend behind a router: its path's MAC is the gateway's.
fn routed(i: u32) -> Reach {
    let mut r = reached(i);
    if let Some(l2) = &mut r.l2 {
        l2.dst_mac = [2, 0, 0, 0, 0xfe, 1];
        l2.via = Some(IpAddr::from([10, 9, 0, 1]));
    }
    r
}

#[test]
fn a_routed_backend_serves_only_a_vip_whose_mode_takes_routed_backends() {
    let mut s = state();
    let (dsr, routed_vip) = (service(80), service(81));
    for svc in [dsr, routed_vip] {
        add_plain_vip(&mut s, svc, Algo::Rr, []);
    }
    let vi = s.vip_index(&routed_vip).unwrap();
    s.vips[vi].mode = Mode::Tunnel;
    for svc in [dsr, routed_vip] {
        s.add_backend(&svc, &backend(1), routed(1)).unwrap();
    }

    // dsr rewrites MACs only: the gateway's MAC would deliver to the router, not the backend.
    let b = s.backend(&dsr, addr(1)).unwrap();
    assert_eq!((b.state(), b.l2), ("unresolved", None));
    assert!(
        b.note.as_deref().unwrap().contains("routed via 10.9.0.1"),
        "{:?}",
        b.note
    );
    assert_eq!(s.dataplane().backends[&b.id].flags & BACKEND_F_RESOLVED, 0);
    assert!(ring_addrs(&s, &dsr).is_empty());
    // A later pass says the same: still refused.
    s.apply_reach(&HashMap::from([(addr(1), routed(1))]))
        .unwrap();
    assert_eq!(s.backend(&dsr, addr(1)).unwrap().l2, None);

    // The tunnel VIP takes it, with the gateway's MAC as the next hop.
    let b = s.backend(&routed_vip, addr(1)).unwrap();
    assert_eq!((b.state(), b.note.as_deref()), ("up", None));
    let entry = s.dataplane().backends[&b.id];
    assert_ne!(entry.flags & BACKEND_F_RESOLVED, 0);
    assert_eq!(entry.mac, [2, 0, 0, 0, 0xfe, 1]);
    assert_eq!(ring_addrs(&s, &routed_vip), vec![addr(1)]);

    // Back to dsr: the routed path is dropped, and the backend leaves the ring.
    s.set_mode(&routed_vip, Mode::Dsr).unwrap();
    let b = s.backend(&routed_vip, addr(1)).unwrap();
    assert_eq!(b.state(), "unresolved");
    assert_eq!(s.dataplane().backends[&b.id].flags & BACKEND_F_RESOLVED, 0);
    assert!(ring_addrs(&s, &routed_vip).is_empty());
    assert_eq!(s.reach_targets(false), vec![addr(1)]);
}
