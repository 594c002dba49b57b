//! The flow-sharing harness itself, not its timings: a tiny run must give every figure,
//! and B must have installed every pin A made (nothing lost at this rate). Needs root.

use lb_bench::flowsync::{self, Options};

#[test]
fn a_short_flow_sharing_run_yields_every_figure() {
    let opts = Options::smoke();
    let r = flowsync::run(&opts, &mut |_| {})
        .unwrap_or_else(|e| panic!("{e:#} (run the tests as root)"));
    assert_eq!(r.cost.len(), 3, "{:?}", r.cost);
    for row in &r.cost {
        assert!(
            row.ns.median > 0.0 && row.ratio_tx.is_finite(),
            "{}: {row:?}",
            row.case
        );
    }
    assert!(!r.throughput.is_empty());
    for t in &r.throughput {
        assert_eq!(t.installed, u64::from(opts.flows), "{t:?}");
        assert!(t.shared_per_s > 0.0 && t.made_per_s > 0.0, "{t:?}");
        assert_eq!(t.ring_drops + t.datagrams_rejected, 0, "{t:?}");
    }
    for d in [&r.delay, &r.udp_delay] {
        assert_eq!(d.samples, opts.delays as usize);
        assert!(d.median_us > 0.0 && d.p99_us >= d.median_us, "{d:?}");
    }
}
