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
        }),
        note: None,
    }
}

fn backend(i: u32) -> BackendConfig {
    BackendConfig {
        address: addr(i),
        weight: 1,
        backup: false,
        drain: false,
        check: None,
    }
}

fn vip(port: u16, algo: Algo, backends: impl IntoIterator<Item = u32>) -> VipConfig {
    VipConfig {
        address: service(port).addr,
        proto: Proto::Tcp,
        algo,
        check: CheckSpec::default(),
        rate_limit: 0,
        burst: 0,
        persist: 0,
        persist_prefix6: 64,
        backends: backends.into_iter().map(backend).collect(),
    }
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
    s.add_vip(svc, Algo::Rr, CheckSpec::default(), RateLimit::default())
        .unwrap();
    s.add_backend(&svc, &backend(1), reached(1)).unwrap();
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
    let svc = service(80);
    let check = CheckSpec {
        check: crate::health::CheckKind::Tcp,
        rise: 1,
        fall: 1,
        ..Default::default()
    };
    s.add_vip(svc, Algo::Rr, check, RateLimit::default())
        .unwrap();
    for i in 1..=3 {
        s.add_backend(&svc, &backend(i), reached(i)).unwrap();
    }
    let b2 = s.backend(&svc, addr(2)).unwrap();
    let (id, generation) = (b2.id, b2.generation);
    let failed = Report {
        backend_id: id,
        generation,
        outcome: Outcome {
            ok: false,
            latency_us: 5,
            detail: "refused".into(),
        },
    };
    assert!(s.on_report(failed).unwrap());
    assert_eq!(ring_addrs(&s, &svc), vec![addr(1), addr(3)]);
    let entry = s.dataplane().backends[&id];
    assert_eq!(entry.flags & BACKEND_F_KEEP_FLOWS, 0, "its flows move");
    assert_ne!(entry.flags & BACKEND_F_IN_USE, 0);
    // A result for an older generation of the id changes nothing.
    let stale = Report {
        backend_id: id,
        generation: generation + 1,
        outcome: Outcome {
            ok: true,
            latency_us: 5,
            detail: String::new(),
        },
    };
    assert!(!s.on_report(stale).unwrap());
}

#[test]
fn backups_take_over_only_when_no_primary_can() {
    let mut s = state();
    let svc = service(80);
    s.add_vip(svc, Algo::Rr, CheckSpec::default(), RateLimit::default())
        .unwrap();
    s.add_backend(&svc, &backend(1), reached(1)).unwrap();
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
    s.add_vip(svc, Algo::Rr, CheckSpec::default(), RateLimit::default())
        .unwrap();
    s.add_backend(&svc, &backend(1), reached(1)).unwrap();
    s.add_backend(&svc, &backend(2), reached(2)).unwrap();
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
    let config = Config {
        vips: vec![vip(80, Algo::Maglev, 0..1000)],
        ..Default::default()
    };
    s.apply(&config, &reach_all(&config)).unwrap();
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
    let config = Config {
        vips: vec![vip(80, Algo::Rr, 1..3), vip(81, Algo::Rr, [])],
        ..Default::default()
    };
    old.apply(&config, &reach_all(&config)).unwrap();
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
    let config = Config {
        vips: vec![vip(80, Algo::Rr, [2])],
        ..Default::default()
    };
    new.apply(&config, &reach_all(&config)).unwrap();
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
    s.add_vip(
        svc,
        Algo::Leastconn,
        CheckSpec::default(),
        RateLimit::default(),
    )
    .unwrap();
    s.add_backend(&svc, &backend(1), reached(1)).unwrap();
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
    s.set_vip(&svc, Some(Algo::Rr), &CheckPatch::default(), None, None)
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
    s.add_vip(svc, Algo::Rr, CheckSpec::default(), RateLimit::default())
        .unwrap();
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
