//! The harness itself, not the timings: one tiny data-plane run must produce a number for
//! every case (timings are never asserted; they live in BENCHMARKS.md). Needs root, like the
//! data-plane fixture tests.

use lb_bench::dataplane::{self, CONFIG_1, CONFIG_1M, CONFIG_1000, Options};

#[test]
fn a_short_data_plane_round_yields_a_figure_for_every_case() {
    let report = dataplane::run(&Options::smoke(), &mut |_| {})
        .unwrap_or_else(|e| panic!("{e:#} (run the tests as root)"));
    let cases = [
        dataplane::CASE_NEW_TCP4,
        dataplane::CASE_EST_TCP4,
        dataplane::CASE_EST_TCP6,
        dataplane::CASE_EST_UDP4,
        dataplane::CASE_NON_VIP,
        dataplane::CASE_FIREWALL,
    ];
    let mut rows: Vec<(&str, &str)> = [CONFIG_1, CONFIG_1000, CONFIG_1M]
        .into_iter()
        .flat_map(|config| cases.map(|case| (case, config)))
        .collect();
    for case in [dataplane::CASE_NEW_RR, dataplane::CASE_NEW_HASH] {
        for config in [dataplane::CONFIG_ONE_CPU, dataplane::CONFIG_TWO_CPUS] {
            rows.push((case, config));
        }
    }
    for case in [
        dataplane::CASE_DSR_EST,
        dataplane::CASE_NAT_FWD,
        dataplane::CASE_NAT_FWD6,
        dataplane::CASE_NAT_REPLY,
        dataplane::CASE_NAT_REPLY6,
    ] {
        rows.push((case, dataplane::CONFIG_NAT));
    }
    for (case, config) in rows {
        let row = report
            .rows
            .iter()
            .find(|r| r.case == case && r.config == config)
            .unwrap_or_else(|| panic!("no row for {case} with {config}"));
        let ns = row.ns.expect("a figure").median;
        let ratio = row.ratio_tx.expect("a ratio");
        assert!(ns > 0.0 && ns.is_finite(), "{case} ({config}): {ns} ns");
        assert!(
            ratio > 0.0 && ratio.is_finite(),
            "{case} ({config}): {ratio}"
        );
    }
    for baseline in [
        dataplane::CASE_PASS,
        dataplane::CASE_DROP,
        dataplane::CASE_TX,
    ] {
        assert!(
            report
                .rows
                .iter()
                .any(|r| r.case == baseline && r.ns.is_some()),
            "no figure for {baseline}"
        );
    }
}
