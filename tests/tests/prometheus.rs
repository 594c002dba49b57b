//! The agent's metrics in the real Prometheus (Debian's `prometheus` and `promtool`,
//! installed by `./x.sh test`): a Prometheus server scrapes the agent's `/metrics` through
//! an ordinary scrape config and answers queries about what went through, and every alert
//! in `monitoring/alerts.yml` has a `promtool test rules` unit test that passes.
//!
//! Prometheus runs in the balancer's namespace (the agent listens on that namespace's
//! loopback, 127.0.0.1:9180, its default) and listens there on 127.0.0.1:9090, so it
//! shares nothing with the host.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use lb_tests::e2e::{Setup, run_ok, serial, vip4};
use serde_json::Value;
use xtask::testbed::{find_in_path, wait_until};

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("monitoring")
}

fn tool(name: &str) -> PathBuf {
    find_in_path(name).unwrap_or_else(|| {
        panic!("{name} not found: install Debian's prometheus (./x.sh test does)")
    })
}

/// An instant query through Prometheus' HTTP API, from inside the balancer's namespace;
/// returns the result vector.
fn query(s: &Setup, promql: &str) -> Vec<Value> {
    let out = s
        .bed
        .run_in_ok(
            &s.bed.lb.ns,
            "curl",
            [
                "-sS",
                "--max-time",
                "5",
                "--get",
                "--data-urlencode",
                &format!("query={promql}"),
                "http://127.0.0.1:9090/api/v1/query",
            ],
        )
        .unwrap_or_else(|e| panic!("querying {promql}: {e:#}"));
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["status"], "success", "query {promql}: {out}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The single value of a query whose result is one series.
fn value(series: &Value) -> f64 {
    series["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no value in {series}"))
}

/// Prometheus, scraping the agent every second with a real scrape config, answers with the
/// agent's own series: the target is up, the VIP's new flows equal the connections made,
/// split over both backends, and both backends are up.
#[test]
fn prometheus_scrapes_the_agent() {
    let _serial = serial();
    let prometheus = tool("prometheus");
    let s = Setup::new(2);
    s.configure(vip4(), &[1, 2]);
    let tally = s.requests(vip4(), 10);
    assert_eq!(tally.sequence.len(), 10, "{tally:?}");

    let dir = s.bed.dir().join("prometheus");
    std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: lb\n    static_configs:\n      - targets: [\"127.0.0.1:9180\"]\n\
         rule_files:\n  - ",
    )
    .and_then(|()| {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new().append(true).open(&config)?;
        writeln!(f, "{}", monitoring_dir().join("alerts.yml").display())
    })
    .expect("writing prometheus.yml");
    let mut server = s
        .bed
        .spawn_in(
            &s.bed.lb.ns,
            &prometheus,
            [
                format!("--config.file={}", config.display()),
                format!("--storage.tsdb.path={}", dir.join("data").display()),
                "--web.listen-address=127.0.0.1:9090".into(),
            ],
        )
        .expect("starting prometheus");

    let vip = vip4().to_string();
    wait_until(Duration::from_secs(30), || {
        if let Some(status) = server.try_wait() {
            anyhow::bail!("prometheus exited with {status}:\n{}", server.log());
        }
        let up = s.bed.run_in(
            &s.bed.lb.ns,
            "curl",
            [
                "-sS",
                "--max-time",
                "2",
                "--get",
                "--data-urlencode",
                "query=lb_vip_new_flows_total",
                "http://127.0.0.1:9090/api/v1/query",
            ],
        )?;
        Ok(String::from_utf8_lossy(&up.stdout).contains(&vip))
    })
    .unwrap_or_else(|e| {
        panic!(
            "waiting for Prometheus to scrape the agent: {e:#}\n{}",
            server.log()
        )
    });

    let up = query(&s, r#"up{job="lb"}"#);
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(value(&up[0]), 1.0, "{up:?}");

    let flows = query(
        &s,
        &format!(r#"lb_vip_new_flows_total{{vip="{vip}",proto="tcp"}}"#),
    );
    assert_eq!(flows.len(), 1, "{flows:?}");
    assert_eq!(value(&flows[0]), 10.0, "{flows:?}");

    let per_backend = query(&s, &format!(r#"lb_backend_new_flows_total{{vip="{vip}"}}"#));
    let backends: BTreeSet<String> = per_backend
        .iter()
        .map(|b| b["metric"]["backend"].as_str().unwrap_or("").to_string())
        .collect();
    let want: BTreeSet<String> = [s.backend(1, false), s.backend(2, false)].into();
    assert_eq!(backends, want, "{per_backend:?}");
    let total: f64 = per_backend.iter().map(value).sum();
    assert_eq!(total, 10.0, "{per_backend:?}");

    let healthy = query(&s, &format!(r#"sum(lb_backend_up{{vip="{vip}"}})"#));
    assert_eq!(value(&healthy[0]), 2.0, "{healthy:?}");

    // The rules loaded and evaluate: with everything healthy, nothing fires.
    let firing = query(&s, r#"ALERTS{alertstate="firing"}"#);
    assert!(
        firing.is_empty(),
        "alerts firing on a healthy balancer: {firing:?}"
    );
    server.kill();
}

/// Every alert in alerts.yml has a unit test that shows it firing and one that shows it
/// quiet, and `promtool test rules` passes them all.
#[test]
fn every_alert_rule_has_a_passing_promtool_test() {
    let promtool = tool("promtool");
    let dir = monitoring_dir();
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).expect("alerts.yml");
    let tests = std::fs::read_to_string(dir.join("alerts.test.yml")).expect("alerts.test.yml");

    let alerts: BTreeSet<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    assert!(alerts.len() >= 12, "alerts found in alerts.yml: {alerts:?}");
    // Each `exp_alerts:` belongs to the `alertname:` above it: `[]` is a quiet case,
    // anything else a firing one.
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    let mut current = None;
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname:") {
            current = Some(name.trim());
        } else if let Some(rest) = line.strip_prefix("exp_alerts:") {
            let name = current.expect("exp_alerts before any alertname");
            if rest.trim() == "[]" {
                quiet.insert(name);
            } else {
                fires.insert(name);
            }
        }
    }
    let untested_fire: Vec<_> = alerts.difference(&fires).collect();
    let untested_quiet: Vec<_> = alerts.difference(&quiet).collect();
    assert!(
        untested_fire.is_empty(),
        "alerts never shown firing: {untested_fire:?}"
    );
    assert!(
        untested_quiet.is_empty(),
        "alerts never shown quiet: {untested_quiet:?}"
    );

    run_ok(
        "promtool test rules",
        Command::new(&promtool)
            .args(["test", "rules", "alerts.test.yml"])
            .current_dir(&dir),
        Duration::from_secs(120),
    );
}
