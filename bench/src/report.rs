//! Markdown tables of the results, as BENCHMARKS.md quotes them.

use std::fmt::Write as _;

use crate::dataplane;

fn ns(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

pub fn ratio(x: f64) -> String {
    format!("{x:.2}×")
}

pub fn dataplane(r: &dataplane::Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| case | configuration | ns/packet (median) | rounds min–max | × MAC-swap XDP_TX | amortised ns (repeat) | × XDP_TX (amortised) |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
    for row in &r.rows {
        match &row.ns {
            Some(s) => {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {}–{} | {} | {} | {} |",
                    row.case,
                    row.config,
                    ns(s.median),
                    ns(s.min_round),
                    ns(s.max_round),
                    row.ratio_tx.map(ratio).unwrap_or_else(|| "-".into()),
                    row.amortized
                        .map(|a| ns(a.median))
                        .unwrap_or_else(|| "-".into()),
                    row.amortized_ratio_tx
                        .map(ratio)
                        .unwrap_or_else(|| "-".into()),
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | | | | |",
                    row.case,
                    row.config,
                    row.note.as_deref().unwrap_or("n/a")
                );
            }
        }
    }
    for n in &r.notes {
        let _ = writeln!(out, "\n- {n}");
    }
    out
}
