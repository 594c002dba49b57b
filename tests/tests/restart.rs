//! End to end, the agent across restarts (issue 10): adopted ids whatever the order of the
//! config, one agent per pin directory, pinned state that holds only drop rules, a pinned
//! layout from an older binary, neighbour entries of backends in use, and one unreachable
//! backend beside good ones. Real TCP connections from the client namespace through the
//! VIP, in the namespace test bed of `xtask::testbed` (see `tests/e2e.rs` for the basics).
//!
//! Needs root, `ip`, `nsenter`, `ethtool`, and the binaries `target/<profile>/{lb,xtask}`
//! (`cargo xtask test` builds them first). Every wait has a bound, every loop a count.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::programs::{
    Xdp,
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
};

use lb_tests::e2e::*;
use serde_json::Value;
use xtask::{
    testbed::{HTTP_PORT, VIP4, run_with_timeout},
    traffic::Answer,
};

/// The pin directory the agent of `s` uses by default: one per network namespace.
fn pin_dir(s: &Setup) -> PathBuf {
    let out = s
        .bed
        .run_in_ok(
            &s.bed.lb.ns,
            "stat",
            ["-L", "-c", "%i", "/proc/self/ns/net"],
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    PathBuf::from(format!("/sys/fs/bpf/lb/netns-{}", out.trim()))
}

/// The XDP object of commit 4fe7cc3, the last layout without a version record (see
/// tests/fixtures/README.md).
const PREVIOUS_LAYOUT: &[u8] = include_bytes!("../fixtures/lb-ebpf-4fe7cc3.o");

/// Maps whose shape changed since commit 4fe7cc3: VIPS (its value, `VipMeta`, was 32
/// bytes: the fields since are appended) and REASON_STATS (one reason fewer). The previous
/// program gets maps of its own shapes for these; the map added since is not pinned.
const CHANGED_SINCE_PREVIOUS: [&str; 2] = [lb_common::maps::VIPS, lb_common::maps::REASON_STATS];
const ADDED_SINCE_PREVIOUS: [&str; 14] = [
    lb_common::maps::NAT_SNAT,
    lb_common::maps::NAT_FWD,
    lb_common::maps::NAT_REV,
    lb_common::maps::NAT_STATS,
    lb_common::maps::VIP_NEW_FLOW_TAT,
    lb_common::maps::PERSIST,
    lb_common::maps::PERSIST_STATS,
    lb_common::maps::ACTIVE_FLOWS,
    lb_common::maps::BACKEND_ACTIVE,
    lb_common::maps::FLOW_EVENTS,
    lb_common::maps::FLOW_SHARE,
    lb_common::maps::FLOW_SHARE_DROPS,
    lb_common::maps::RX_IFACES,
    lb_common::maps::TUNNEL,
];
const PREVIOUS_VIP_META_LEN: usize = 32;

/// What an agent of commit 4fe7cc3 leaves in `pins` after `kill -9`: its program forwarding
/// over the pinned maps (switched onto the pinned attachment, as that agent would have
/// attached it), maps of its own shapes where they differ from today's (VIP entries as
/// that agent wrote them: today's without the fields added since), and no layout record.
fn become_previous_layout(pins: &Path) {
    use aya::maps::{HashMap, Map, MapData};
    use lb_common::{VipKey, VipMeta};
    let maps = pins.join("maps");
    let mut loader = aya::EbpfLoader::new();
    for name in lb_common::maps::ALL.iter().copied() {
        if !CHANGED_SINCE_PREVIOUS.contains(&name) && !ADDED_SINCE_PREVIOUS.contains(&name) {
            loader.map_pin_path(name, maps.join(name));
        }
    }
    let mut ebpf = loader
        .load(PREVIOUS_LAYOUT)
        .unwrap_or_else(|e| panic!("the fixture no longer loads on the pinned maps: {e:#}"));
    // Loaded (its maps' fds in its instructions) before VIPS is taken out of `ebpf` below,
    // whose fd closes once pinned; attached once every map is in place.
    let program: &mut Xdp = ebpf.program_mut("lb_xdp").unwrap().try_into().unwrap();
    program.load().unwrap();
    let current: HashMap<MapData, VipKey, VipMeta> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(maps.join("VIPS")).unwrap())).unwrap();
    let mut previous: HashMap<MapData, VipKey, [u8; PREVIOUS_VIP_META_LEN]> =
        HashMap::try_from(ebpf.take_map("VIPS").unwrap()).unwrap();
    for entry in current.iter() {
        let (key, meta) = entry.unwrap();
        let bytes = bytemuck::bytes_of(&meta)[..PREVIOUS_VIP_META_LEN]
            .try_into()
            .unwrap();
        previous.insert(&key, &bytes, 0).unwrap();
    }
    for name in CHANGED_SINCE_PREVIOUS {
        std::fs::remove_file(maps.join(name)).unwrap();
    }
    previous.pin(maps.join("VIPS")).unwrap();
    ebpf.map_mut(lb_common::maps::REASON_STATS)
        .unwrap()
        .pin(maps.join(lb_common::maps::REASON_STATS))
        .unwrap();
    for name in ADDED_SINCE_PREVIOUS {
        std::fs::remove_file(maps.join(name)).unwrap();
    }
    let program: &mut Xdp = ebpf.program_mut("lb_xdp").unwrap().try_into().unwrap();
    let link = PinnedLink::from_pin(pins.join("links").join("eth0")).unwrap();
    program
        .attach_to_link(XdpLink::try_from(FdLink::from(link)).unwrap())
        .unwrap();
    for entry in std::fs::read_dir(pins).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with("layout-") {
            std::fs::remove_dir(entry.path()).unwrap();
        }
    }
}

/// `lb run` on the test bed's balancer with config file `config`, socket `socket` (in the
/// test bed's directory) and `extra` arguments, expected to fail at once with one line.
fn run_fails(s: &Setup, config: &Path, socket: &str, extra: &[&str]) -> String {
    let mut cmd = s.bed.command_in(&s.bed.lb.ns, s.bed.bin("lb").unwrap());
    cmd.args([
        "run",
        "--iface",
        &s.bed.lb.ifname,
        "--metrics",
        "off",
        "--config",
    ])
    .arg(config)
    .arg("--socket")
    .arg(s.bed.dir().join(socket))
    .args(extra);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(20)).unwrap();
    one_line_error("lb run", &out)
}

/// `kill -9` of the agent, a new config file, and a new agent on the same pins.
fn restart_with(s: &mut Setup, config: &str) {
    s.agent.proc.kill();
    std::fs::write(&s.config, config).unwrap();
    s.agent = s
        .bed
        .start_agent(&s.config, &s.socket)
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// At least five answers of a keep-alive connection, every one from `backend`.
fn assert_kept(answers: &[Answer], backend: &str, what: &str) {
    assert!(answers.len() >= 5, "{what}: too few answers: {answers:?}");
    assert_all_from(answers, backend, what);
}

fn vip_toml(vip: SocketAddr, backends: &[String]) -> String {
    let mut out = format!("[[vip]]\naddress = \"{vip}\"\nproto = \"tcp\"\nalgo = \"rr\"\n");
    for b in backends {
        out += &format!("\n[[vip.backend]]\naddress = \"{b}\"\n");
    }
    out + "\n"
}

/// A restarted agent whose config puts a new VIP with a new backend before the adopted
/// ones keeps the adopted VIP's and backends' ids: established round-robin connections
/// keep their backend (a new id would fail their generation check and re-balance them).
#[test]
fn adopted_ids_survive_a_reordered_config() {
    let _serial = serial();
    let mut s = Setup::new(3);
    s.configure(vip4(), &[1, 2]);
    let (keepalive, backend) =
        s.pinned_keepalive(vip4(), Duration::from_millis(50), Duration::from_secs(30));

    let other = SocketAddr::new(VIP4.into(), HTTP_PORT + 1);
    let config = vip_toml(other, &[s.backend(3, false)])
        + &vip_toml(vip4(), &[s.backend(1, false), s.backend(2, false)]);
    restart_with(&mut s, &config);
    let seen = keepalive.answers().len();
    keepalive
        .wait_answers(seen + 10, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_kept(&keepalive.stop(), &backend, "across the restart");
    // Both VIPs balance as configured.
    let tally = s.requests_from(vip4(), 10, 21_000);
    assert_split(&tally, &[(1, 5), (2, 5)]);
}

/// A second `lb run` on the same pin directory (another control socket) exits at once with
/// one line naming the first agent's PID, and the first one goes on undisturbed.
#[test]
fn a_second_agent_on_the_same_pins_is_refused() {
    let _serial = serial();
    let s = Setup::new(1);
    s.configure(vip4(), &[1]);
    let line = run_fails(&s, &s.bed.dir().join("second.toml"), "second.sock", &[]);
    let pid = s.agent.proc.pid().to_string();
    assert!(
        line.contains(&format!("PID {pid}")),
        "the error should name the running agent (PID {pid}): {line}"
    );
    assert_eq!(s.backend_set().len(), 1);
    s.requests(vip4(), 5);
}

/// Pinned state holding only drop rules (no VIP) is taken over like any other: a rule the
/// restarted agent's config no longer has stops dropping, and `lb firewall list` shows what
/// the data plane does.
#[test]
fn pinned_drop_rules_alone_are_adopted_or_cleared() {
    let _serial = serial();
    let mut s = Setup::new(1);
    let client = format!("{}/32", s.bed.client.ipv4);
    s.lb(&["firewall", "add", &client]);
    s.lb(&["firewall", "add", "198.51.100.0/24"]);

    restart_with(&mut s, "[firewall]\ndrop = [\"198.51.100.0/24\"]\n");
    let list = s.lb(&["firewall", "list"]);
    assert!(
        list.contains("198.51.100.0/24"),
        "kept rule not listed:\n{list}"
    );
    assert!(
        !list.contains(&client),
        "removed rule still listed:\n{list}"
    );
    s.configure(vip4(), &[1]);
    s.requests(vip4(), 5);
}

/// XDP never confirms a neighbour entry: the agent makes the entries of backends in use
/// kernel-managed, and while one is deleted (again and again, as garbage collection or a
/// flush would) an established connection keeps going to the last known MAC and the
/// backend never shows as unresolved.
#[test]
fn a_flushed_neighbour_entry_breaks_no_connection() {
    let _serial = serial();
    let s = Setup::new(2);
    s.configure(vip4(), &[1, 2]);
    let neigh = |args: &[&str]| {
        s.bed
            .run_in_ok(&s.bed.lb.ns, "ip", args)
            .unwrap_or_else(|e| panic!("{e:#}"))
    };
    for i in [1, 2] {
        let b = s.backend(i, false);
        let shown = neigh(&["neigh", "show", &b, "dev", "eth0"]);
        assert!(
            shown.contains("managed"),
            "backend {b} not managed: {shown}"
        );
    }
    let (keepalive, backend) =
        s.pinned_keepalive(vip4(), Duration::from_millis(50), Duration::from_secs(30));
    let addr = s
        .bed
        .backends
        .iter()
        .zip(1..)
        .find(|(_, i)| name(*i) == backend)
        .map(|(h, _)| h.ipv4.to_string())
        .expect("the backend answering is one of ours");
    // Longer than a full refresh of every backend (5 s); deleted every 100 ms.
    let until = Instant::now() + Duration::from_secs(7);
    let mut states = Vec::new();
    for _ in 0..200 {
        if Instant::now() >= until {
            break;
        }
        let _ = s
            .bed
            .run_in(&s.bed.lb.ns, "ip", ["neigh", "del", &addr, "dev", "eth0"]);
        let list: Vec<Value> = s.backend_list();
        states.extend(
            list.iter()
                .filter(|b| field(b, "address") == addr)
                .map(|b| field(b, "state")),
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let answers = keepalive.stop();
    assert_kept(&answers, &backend, "while its neighbour entry was deleted");
    assert!(
        states.iter().all(|st| st == "up"),
        "backend {addr} was not always up: {states:?}"
    );
}

/// A blackhole route to one backend is that backend's note (state unresolved, the reason
/// in `lb backend list`), not a failure of the change, of the periodic refresh or of the
/// next start: the other backend serves.
#[test]
fn a_blackholed_backend_is_its_own_problem() {
    let _serial = serial();
    let mut s = Setup::new(2);
    let bad = s.backend(2, false);
    s.bed
        .ip(
            &s.bed.lb.ns,
            &["route", "add", "blackhole", &format!("{bad}/32")],
        )
        .unwrap();
    s.configure(vip4(), &[1, 2]);
    let check = |s: &Setup| {
        wait_backends(&s.bed, &s.socket, "backend 2 unresolved, 1 up", |list| {
            list.iter().any(|b| {
                field(b, "address") == bad
                    && field(b, "state") == "unresolved"
                    && b.to_string().contains("blackhole")
            }) && list.iter().any(|b| field(b, "state") == "up")
        });
        let tally = s.requests_from(vip4(), 6, 22_000 + s.agent.proc.pid() as u16 % 1000);
        assert_split(&tally, &[(1, 6)]);
    };
    check(&s);
    // Removing the good backend retires its id and ring space: the pass that frees them
    // runs despite the bad one, and adding it back works.
    let good = s.backend(1, false);
    let v = vip4().to_string();
    s.lb(&["backend", "del", &v, &good, "--now"]);
    s.lb(&["backend", "add", &v, &good]);
    check(&s);
    // And a restart with it in the config starts.
    let config = std::fs::read_to_string(&s.config).unwrap();
    restart_with(&mut s, &config);
    check(&s);
}

/// An upgrade from the previous layout: the program of commit 4fe7cc3 forwards over pins
/// without a layout record. A record of an unknown (newer) layout is refused with one line
/// while that program keeps forwarding; then the new agent, with another flow-table size
/// (`--max-flows`), copies the pinned maps into new ones, switches the attachment over
/// and records the layout, and an established connection keeps its backend throughout.
#[test]
fn an_upgrade_from_the_previous_layout_keeps_connections() {
    let _serial = serial();
    let mut s = Setup::new(2);
    s.configure(vip4(), &[1, 2]);
    let (keepalive, backend) =
        s.pinned_keepalive(vip4(), Duration::from_millis(50), Duration::from_secs(30));
    let pins = pin_dir(&s);
    s.agent.proc.kill();
    become_previous_layout(&pins);
    let wait_more = |n: usize| {
        let seen = keepalive.answers().len();
        keepalive
            .wait_answers(seen + n, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{e:#}"));
    };
    wait_more(5);

    std::fs::create_dir(pins.join("layout-v99")).unwrap();
    let line = run_fails(&s, &s.config, "refused.sock", &[]);
    assert!(line.contains("layout version 99"), "{line}");
    wait_more(5);
    std::fs::remove_dir(pins.join("layout-v99")).unwrap();

    s.agent = s
        .bed
        .start_agent_on(&s.bed.lb, &s.config, &s.socket, &["--max-flows", "65536"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    wait_more(10);
    assert_kept(&keepalive.stop(), &backend, "across the upgrade");
    let flows = aya::maps::MapInfo::from_pin(pins.join("maps").join(lb_common::maps::FLOWS))
        .unwrap()
        .max_entries();
    assert_eq!(flows, 65536, "the flow table has the size asked for");
    let version = lb_common::LAYOUT_VERSION;
    assert!(
        pins.join(format!("layout-v{version}")).exists(),
        "no layout record after the upgrade"
    );
    let tally = s.requests_from(vip4(), 10, 23_000);
    assert_split(&tally, &[(1, 5), (2, 5)]);
}
