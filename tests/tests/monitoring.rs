//! Monitoring end to end: the agent's `/metrics` scraped during real traffic in the
//! namespace test bed (see `xtask::testbed`), its status page loaded in headless Chromium,
//! and `lb stats --watch`.
//!
//! The agent runs in the balancer's namespace with the default `--metrics
//! 127.0.0.1:9180`, which is that namespace's loopback: the tests reach it from inside it
//! (a thread that joins the namespace for the scrape, Chromium under `nsenter --net`).
//!
//! Needs what `tests/e2e.rs` needs, plus `chromium` (Debian's package; `./x.sh test`
//! installs it). A missing prerequisite fails the test, saying what is missing.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use lb_tests::e2e::{Setup, field, run_ok, serial, vip4, vip6, wait_backends};
use serde_json::Value;
use xtask::testbed;

/// Where the agent listens by default: the balancer namespace's loopback.
const METRICS: &str = "127.0.0.1:9180";

/// Monitoring's view of a running [`Setup`].
trait Monitoring {
    fn stats(&self) -> Value;
    fn wait_states(&self, want: &[(&str, &str)]);
    fn with_traffic<T>(&self, to: &[SocketAddr], f: impl FnOnce() -> T) -> T;
    fn http_get(&self, path: &str) -> (String, String);
    fn scrape(&self) -> Metrics;
}

impl Monitoring for Setup {
    /// `lb stats --json`.
    fn stats(&self) -> Value {
        serde_json::from_str(&self.lb(&["stats", "--json"])).expect("lb stats --json")
    }

    /// Waits until every "VIP ADDRESS" named has the state given.
    fn wait_states(&self, want: &[(&str, &str)]) {
        wait_backends(&self.bed, &self.socket, &format!("{want:?}"), |list| {
            let states: BTreeMap<String, String> = list
                .iter()
                .map(|b| {
                    let key = format!("{} {}", field(b, "vip"), field(b, "address"));
                    (key, field(b, "state"))
                })
                .collect();
            want.iter()
                .all(|(k, s)| states.get(*k).map(String::as_str) == Some(*s))
        });
    }

    /// Runs `f` while a client makes new connections to every VIP in `to` in a loop.
    fn with_traffic<T>(&self, to: &[SocketAddr], f: impl FnOnce() -> T) -> T {
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let traffic = scope.spawn(|| {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    for vip in to {
                        let _ = self.bed.requests(*vip, 10);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
            let result = f();
            stop.store(true, Ordering::Relaxed);
            traffic.join().expect("traffic thread");
            result
        })
    }

    /// GET `path` from the agent's listener, from inside the balancer's namespace.
    fn http_get(&self, path: &str) -> (String, String) {
        http_get_in(&self.bed.lb.ns, METRICS, path)
    }

    fn scrape(&self) -> Metrics {
        let (head, body) = self.http_get("/metrics");
        assert_eq!(status_code(&head), 200, "GET /metrics: {head}\n{body}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "GET /metrics content type: {head}"
        );
        assert!(body.ends_with("# EOF\n"), "no # EOF at the end:\n{body}");
        Metrics::parse(&body)
    }
}

/// An HTTP/1.0 GET over a TCP connection opened from a thread that joined namespace `ns`;
/// returns (status line and headers, body).
fn http_get_in(ns: &str, addr: &str, path: &str) -> (String, String) {
    let ns_path = format!("/run/netns/{ns}");
    let addr = addr.to_string();
    let path = path.to_string();
    std::thread::spawn(move || {
        let netns = std::fs::File::open(&ns_path).unwrap_or_else(|e| panic!("{ns_path}: {e}"));
        // SAFETY: plain syscall; only this thread changes namespace, and it ends here.
        let r = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {ns_path}: {}", std::io::Error::last_os_error());
        let addr: SocketAddr = addr.parse().unwrap();
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connecting to {addr} in {ns_path}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .unwrap_or_else(|e| panic!("reading GET {path}: {e}"));
        let raw = String::from_utf8(raw).expect("UTF-8 response");
        let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head and body");
        (head.to_string(), body.to_string())
    })
    .join()
    .expect("HTTP thread")
}

fn status_code(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {head:?}"))
}

/// Parsed exposition: `name{labels}` exactly as written → value.
struct Metrics(BTreeMap<String, f64>, String);

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let mut m = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (key, value) = line.rsplit_once(' ').expect("`name value`");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
            assert!(
                m.insert(key.to_string(), value).is_none(),
                "duplicate {key}"
            );
        }
        Metrics(m, text.to_string())
    }

    fn get(&self, key: &str) -> f64 {
        *self
            .0
            .get(key)
            .unwrap_or_else(|| panic!("no sample {key} in\n{}", self.1))
    }

    fn vip(&self, name: &str, vip: SocketAddr) -> u64 {
        self.get(&format!("{name}{{vip=\"{vip}\",proto=\"tcp\"}}")) as u64
    }

    fn backend(&self, name: &str, vip: SocketAddr, backend: &str) -> u64 {
        self.get(&format!(
            "{name}{{vip=\"{vip}\",proto=\"tcp\",backend=\"{backend}\"}}"
        )) as u64
    }
}

fn counters(v: &Value) -> [u64; 3] {
    ["packets", "bytes", "new_flows"].map(|f| v[f].as_u64().unwrap_or_else(|| panic!("{f} in {v}")))
}

/// `lb stats --json` twice with a scrape between, until the VIP and backend counters stood
/// still across it (the last ACKs of closed connections may still be on their way).
fn settled_scrape(s: &Setup) -> (Value, Metrics, Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = s.stats();
        let metrics = s.scrape();
        let after = s.stats();
        let same = |f: &str| before[f] == after[f];
        if (same("vips")
            && same("backends")
            && before["reasons"]["forwarded"] == after["reasons"]["forwarded"])
            || Instant::now() > deadline
        {
            return (before, metrics, after);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// /metrics counts exactly what went through: new flows equal the connections made, and
/// every VIP, backend and reason counter equals what `lb stats --json` says.
#[test]
fn metrics_match_traffic() {
    let _serial = serial();
    let s = Setup::new(2);
    s.configure(vip4(), &[1, 2]);
    s.configure(vip6(), &[1, 2]);
    s.wait_all_up();
    let m = s.scrape();
    assert_eq!(m.vip("lb_vip_new_flows_total", vip4()), 0);
    assert_eq!(m.get("lb_vips"), 2.0);
    assert_eq!(
        m.get(r#"lb_agent_info{version="0.1.0",attach_mode="native",interfaces="eth0"}"#),
        1.0
    );

    s.requests(vip4(), 60);
    s.requests(vip6(), 40);
    let (stats, m, _) = settled_scrape(&s);

    // New flows are the connections made, split evenly.
    assert_eq!(m.vip("lb_vip_new_flows_total", vip4()), 60);
    assert_eq!(m.vip("lb_vip_new_flows_total", vip6()), 40);
    for (vip, each) in [(vip4(), 30), (vip6(), 20)] {
        for i in [1, 2] {
            let b = s.backend(i, vip.is_ipv6());
            assert_eq!(m.backend("lb_backend_new_flows_total", vip, &b), each);
        }
    }
    // Every counter is the one `lb stats` reads.
    for v in stats["vips"].as_array().unwrap() {
        let vip: SocketAddr = v["vip"].as_str().unwrap().parse().unwrap();
        let got = [
            "lb_vip_packets_total",
            "lb_vip_bytes_total",
            "lb_vip_new_flows_total",
        ]
        .map(|n| m.vip(n, vip));
        assert_eq!(got, counters(v), "VIP {vip}: metrics vs lb stats");
        assert!(
            got[0] >= 5 * got[2],
            "fewer than 5 packets a connection: {got:?}"
        );
    }
    for b in stats["backends"].as_array().unwrap() {
        let vip: SocketAddr = b["vip"].as_str().unwrap().parse().unwrap();
        let addr = b["address"].as_str().unwrap();
        let got = [
            "lb_backend_packets_total",
            "lb_backend_bytes_total",
            "lb_backend_new_flows_total",
        ]
        .map(|n| m.backend(n, vip, addr));
        assert_eq!(
            got,
            counters(b),
            "backend {addr} of {vip}: metrics vs lb stats"
        );
        assert_eq!(m.backend("lb_backend_up", vip, addr), 1);
        assert_eq!(m.backend("lb_backend_in_rotation", vip, addr), 1);
        assert_eq!(m.backend("lb_backend_weight", vip, addr), 1);
        assert_eq!(
            m.get(&format!(
                "lb_backend_state{{vip=\"{vip}\",proto=\"tcp\",backend=\"{addr}\",state=\"up\"}}"
            )),
            1.0
        );
    }
    let forwarded: u64 = stats["vips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| counters(v)[0])
        .sum();
    assert_eq!(
        m.get(r#"lb_packets_total{action="forward",reason="forwarded"}"#) as u64,
        forwarded
    );
    assert_eq!(
        m.get(r#"lb_bytes_total{action="forward",reason="forwarded"}"#) as u64,
        stats["reasons"]["forwarded"]["bytes"].as_u64().unwrap()
    );
    assert_eq!(
        m.get(r#"lb_packets_total{action="drop",reason="drop_no_backend"}"#),
        0.0
    );

    // Flow gauges come from a walk at most 5 s old: every connection left one entry.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let m = s.scrape();
        let per_backend: Vec<u64> = [(vip4(), 1), (vip4(), 2), (vip6(), 1), (vip6(), 2)]
            .into_iter()
            .map(|(vip, i)| m.backend("lb_backend_active_flows", vip, &s.backend(i, vip.is_ipv6())))
            .collect();
        let entries = m.get("lb_flow_table_entries") as u64;
        if per_backend == [30, 30, 20, 20] && entries == 100 {
            assert_eq!(m.vip("lb_vip_active_flows", vip4()), 60);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "flow gauges {per_backend:?}, entries {entries}, want [30, 30, 20, 20] and 100"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // State changes show at once.
    s.lb(&[
        "backend",
        "drain",
        &vip4().to_string(),
        &s.backend(2, false),
    ]);
    let m = s.scrape();
    let b2 = s.backend(2, false);
    assert_eq!(m.backend("lb_backend_draining", vip4(), &b2), 1);
    assert_eq!(m.backend("lb_backend_in_rotation", vip4(), &b2), 0);
    assert_eq!(m.vip("lb_vip_backends_in_rotation", vip4()), 1);
    assert_eq!(
        m.get(&format!(
            "lb_vip_backends{{vip=\"{}\",proto=\"tcp\",state=\"draining\"}}",
            vip4()
        )),
        1.0
    );

    // Unknown paths are 404s; the JSON API answers.
    let (head, _) = s.http_get("/nope");
    assert_eq!(status_code(&head), 404, "{head}");
    let (head, body) = s.http_get("/api/status");
    assert_eq!(status_code(&head), 200, "{head}");
    let status: Value = serde_json::from_str(&body).expect("/api/status is JSON");
    assert_eq!(status["vips"].as_array().map(Vec::len), Some(2), "{status}");
}

/// `lb stats --watch` redraws with rates while traffic flows.
#[test]
fn stats_watch_shows_rates() {
    let _serial = serial();
    let s = Setup::serving(2, &[1, 2]);
    let v = vip4().to_string();
    let out = s.with_traffic(&[vip4()], || {
        std::thread::sleep(Duration::from_millis(500));
        s.lb(&["stats", "--watch", "--count", "3"])
    });
    let frames: Vec<&str> = out.split("lb stats --watch").skip(1).collect();
    assert_eq!(frames.len(), 3, "three redraws:\n{out}");
    let last = frames[2];
    let vip_row: Vec<&str> = last
        .lines()
        .find(|l| l.starts_with(&v))
        .unwrap_or_else(|| panic!("no VIP row in\n{last}"))
        .split_whitespace()
        .collect();
    // VIP PROTO ACTIVE PKT/S BIT/S NEW/S PACKETS NEW_FLOWS
    assert_eq!(vip_row[2], "2/2", "{last}");
    assert_ne!(
        vip_row[3], "0",
        "no packet rate while traffic flows:\n{last}"
    );
    assert_ne!(
        vip_row[5], "0",
        "no new-flow rate while traffic flows:\n{last}"
    );
    for i in [1, 2] {
        let b = s.backend(i, false);
        let row: Vec<&str> = last
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(b.as_str()))
            .unwrap_or_else(|| panic!("no row for backend {b} in\n{last}"))
            .split_whitespace()
            .collect();
        assert_eq!(row[2], "up", "{last}");
        assert_ne!(row[5], "0", "backend {b} has no packet rate:\n{last}");
    }
}

// ---- the status page in Chromium ----------------------------------------------------

fn chromium() -> PathBuf {
    testbed::find_in_path("chromium").unwrap_or_else(|| {
        panic!("the status page test needs `chromium` on PATH (Debian package chromium; `./x.sh setup` installs it)")
    })
}

/// Runs headless Chromium in the balancer's namespace on the status page, with a fresh
/// profile, letting the page run 3 s of (virtual) time; returns its stdout.
fn chromium_on_page(s: &Setup, args: &[&str]) -> String {
    let profile = tempfile_dir(s.bed.dir(), "chromium");
    let mut cmd = s.bed.command_in(&s.bed.lb.ns, chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        "--virtual-time-budget=3000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(format!("http://{METRICS}/"));
    run_ok("chromium", &mut cmd, Duration::from_secs(90))
}

fn tempfile_dir(parent: &Path, prefix: &str) -> PathBuf {
    for n in 0.. {
        let p = parent.join(format!("{prefix}-{n}"));
        if std::fs::create_dir(&p).is_ok() {
            return p;
        }
    }
    unreachable!()
}

/// What the page shows of one backend row.
#[derive(Debug)]
struct Row {
    state: String,
    role: String,
    in_rotation: String,
    pps: f64,
    new_flows_ps: f64,
    packets: u64,
}

/// Value of attribute `name` in the first tag of `html` that has it.
fn attr<'a>(html: &'a str, name: &str) -> Option<&'a str> {
    let start = html.find(&format!(" {name}=\""))? + name.len() + 3;
    let len = html[start..].find('"')?;
    Some(&html[start..start + len])
}

/// `data-value` of the cell with `data-field="field"`.
fn cell(html: &str, name: &str) -> Option<f64> {
    let at = html.find(&format!("data-field=\"{name}\""))?;
    let tag_end = at + html[at..].find('>')?;
    let tag_start = html[..at].rfind('<')?;
    let tag = &html[tag_start..tag_end];
    match attr(tag, "data-value") {
        Some(v) => v.parse().ok(),
        // Cells without data-value hold the number as text.
        None => html[tag_end + 1..]
            .split('<')
            .next()
            .and_then(|t| t.trim().parse().ok()),
    }
}

struct Page {
    dom: String,
}

impl Page {
    /// The section of VIP `vip`.
    fn vip(&self, vip: SocketAddr) -> &str {
        let marker = format!("data-vip=\"{vip}\"");
        let at = self
            .dom
            .find(&marker)
            .unwrap_or_else(|| panic!("no section for VIP {vip} on the page:\n{}", self.dom));
        let rest = &self.dom[at..];
        &rest[..rest.find("</section>").unwrap_or(rest.len())]
    }

    fn backend(&self, vip: SocketAddr, addr: &str) -> Row {
        let section = self.vip(vip);
        let marker = format!("data-address=\"{addr}\"");
        let at = section
            .find(&marker)
            .unwrap_or_else(|| panic!("no row for backend {addr} of {vip}:\n{section}"));
        let start = section[..at].rfind("<tr").expect("row start");
        let row = &section[start..];
        let row = &row[..row.find("</tr>").expect("row end")];
        let a = |n| {
            attr(row, n)
                .unwrap_or_else(|| panic!("no {n} in {row}"))
                .to_string()
        };
        Row {
            state: a("data-state"),
            role: a("data-role"),
            in_rotation: a("data-in-rotation"),
            pps: cell(row, "pps").unwrap_or_else(|| panic!("no pps in {row}")),
            new_flows_ps: cell(row, "new_flows_ps").expect("new_flows_ps"),
            packets: cell(row, "packets").expect("packets") as u64,
        }
    }

    fn updated(&self) -> f64 {
        attr(&self.dom, "data-updated")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("the page never rendered agent data:\n{}", self.dom))
    }
}

fn dump_dom(s: &Setup) -> Page {
    let dom = chromium_on_page(s, &["--dump-dom"]);
    assert!(dom.contains("</html>"), "no DOM from chromium: {dom}");
    Page { dom }
}

/// The status page, in headless Chromium, lists every VIP's backends with their states,
/// roles and rates, and the rates follow the traffic; a screenshot is taken while traffic
/// flows (target/<profile>/status-page.png; with LB_DOCS_SCREENSHOT=1, after longer phases,
/// also docs/status-page.png).
#[test]
fn status_page_in_chromium() {
    let _serial = serial();
    chromium();
    // For the README's picture: longer phases, so the chart has some minutes to show.
    let docs = std::env::var_os("LB_DOCS_SCREENSHOT").is_some();
    let mut s = Setup::new(3);
    let v4 = vip4().to_string();
    s.lb(&[
        "vip",
        "add",
        &v4,
        "--check",
        "http:/health",
        "--interval",
        "500",
        "--rise",
        "1",
    ]);
    s.lb(&["backend", "add", &v4, &s.backend(1, false), "--weight", "2"]);
    s.lb(&["backend", "add", &v4, &s.backend(2, false)]);
    s.lb(&["backend", "add", &v4, &s.backend(3, false), "--backup"]);
    let v6 = vip6().to_string();
    s.lb(&["vip", "add", &v6]);
    for i in [1, 2] {
        s.lb(&["backend", "add", &v6, &s.backend(i, true)]);
    }
    s.wait_all_up();
    let key = |i: usize| format!("{v4} {}", s.bed.backends[i - 1].ipv4);

    // Idle: every backend listed, states and roles right, no traffic.
    let idle = dump_dom(&s);
    for i in [1, 2, 3] {
        let row = idle.backend(vip4(), &s.backend(i, false));
        assert_eq!(row.state, "up", "backend {i}: {row:?}");
        assert_eq!(
            row.pps, 0.0,
            "backend {i} has traffic before any was sent: {row:?}"
        );
    }
    let b3 = idle.backend(vip4(), &s.backend(3, false));
    assert_eq!(
        (b3.role.as_str(), b3.in_rotation.as_str()),
        ("backup", "false")
    );
    assert_eq!(idle.backend(vip6(), &s.backend(2, true)).state, "up");
    assert!(idle.dom.contains("<canvas"), "no chart on the page");

    // Under traffic the rates show, weighted 2:1, and the backup stays idle.
    let busy = s.with_traffic(&[vip4(), vip6()], || {
        std::thread::sleep(Duration::from_secs(if docs { 50 } else { 3 }));
        dump_dom(&s)
    });
    assert!(busy.updated() > idle.updated(), "the page did not update");
    let rows: Vec<Row> = [1, 2, 3]
        .map(|i| busy.backend(vip4(), &s.backend(i, false)))
        .into();
    assert!(
        rows[0].pps > 0.0 && rows[1].pps > 0.0,
        "no rates under traffic: {rows:?}"
    );
    assert!(
        rows[0].new_flows_ps > 0.0 && rows[1].new_flows_ps > 0.0,
        "{rows:?}"
    );
    assert!(rows[0].packets > rows[1].packets, "weight 2 vs 1: {rows:?}");
    assert_eq!(
        (rows[2].pps, rows[2].packets),
        (0.0, 0),
        "the backup got traffic: {rows:?}"
    );
    assert!(busy.backend(vip6(), &s.backend(1, true)).pps > 0.0);

    // Drain backend 2, stop backend 3's server: the page shows draining and down.
    s.lb(&["backend", "drain", &v4, &s.backend(2, false)]);
    s.servers[2].kill();
    s.wait_states(&[(&key(2), "draining"), (&key(3), "down")]);
    let png = s.bed.dir().join("status-page.png");
    let changed = s.with_traffic(&[vip4(), vip6()], || {
        std::thread::sleep(Duration::from_secs(if docs { 40 } else { 2 }));
        let page = dump_dom(&s);
        chromium_on_page(
            &s,
            &[
                &format!("--screenshot={}", png.display()),
                "--window-size=1280,1300",
            ],
        );
        page
    });
    let b2 = changed.backend(vip4(), &s.backend(2, false));
    let b3 = changed.backend(vip4(), &s.backend(3, false));
    assert_eq!(b2.state, "draining", "{b2:?}");
    assert_eq!(
        b2.new_flows_ps, 0.0,
        "a drained backend took new flows: {b2:?}"
    );
    assert_eq!(b3.state, "down", "{b3:?}");
    assert!(changed.backend(vip4(), &s.backend(1, false)).pps > 0.0);

    let image = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
    assert!(
        image.starts_with(b"\x89PNG\r\n\x1a\n") && image.len() > 20_000,
        "{} is not a screenshot of a page ({} bytes)",
        png.display(),
        image.len()
    );
    let target = testbed::bin_dir()
        .expect("target dir")
        .join("status-page.png");
    std::fs::copy(&png, &target).expect("copying the screenshot");
    if docs {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/status-page.png");
        std::fs::copy(&png, &docs).expect("copying the screenshot to docs/");
    }
    eprintln!("screenshot: {}", target.display());
}
