//! Markdown tables of the results, as BENCHMARKS.md quotes them.

use std::fmt::Write as _;

use crate::{control, dataplane, e2e, stats};

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

fn ms(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 1.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

pub fn control(r: &control::Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| how | backends | applied | seconds | ms/backend, first tenth | ms/backend, last tenth |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    for b in &r.bulk {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} | {} | {} |",
            b.how,
            b.backends,
            b.applied,
            b.secs,
            ms(b.first_ms),
            ms(b.last_ms)
        );
    }
    if !r.scaled.is_empty() {
        let _ = writeln!(
            out,
            "\n| at scale | trials | median ms | max ms | baseline (same run) | baseline median ms | ratio |\n|---|---:|---:|---:|---|---:|---:|"
        );
        for s in &r.scaled {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {:.2}× |",
                s.what,
                s.trials,
                ms(s.median_ms),
                ms(s.max_ms),
                s.baseline,
                ms(s.baseline_median_ms),
                s.median_ms / s.baseline_median_ms
            );
        }
    }
    let _ = writeln!(out, "\n| Maglev | ms |\n|---|---:|");
    for t in &r.maglev {
        let _ = writeln!(out, "| {} | {} |", t.what, ms(t.ms));
    }
    if !r.reaction_first_flow_ms.is_empty() {
        let (a, f) = (&r.reaction_answer_ms, &r.reaction_first_flow_ms);
        let (alo, ahi) = stats::range(a);
        let (flo, fhi) = stats::range(f);
        let _ = writeln!(
            out,
            "\n| backend change to data plane ({} trials) | median ms | min–max ms |\n|---|---:|---:|\n\
             | `backend add` issued → answered | {} | {}–{} |\n\
             | `backend add` issued → first new flow forwarded to it | {} | {}–{} |",
            f.len(),
            ms(stats::median(a)),
            ms(alo),
            ms(ahi),
            ms(stats::median(f)),
            ms(flo),
            ms(fhi)
        );
    }
    for n in &r.notes {
        let _ = writeln!(out, "\n- {n}");
    }
    out
}

fn rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn rates(out: &mut String, unit: &str, rows: &[e2e::Rate]) {
    let _ = writeln!(out, "| run | path | {unit} (median) | runs | ratio |");
    let _ = writeln!(out, "|---|---|---:|---|---:|");
    for r in rows {
        let runs: Vec<String> = r.samples.iter().map(|s| rate(*s)).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.group,
            r.what,
            rate(r.value),
            runs.join(", "),
            r.versus
                .as_ref()
                .map(|(v, x)| format!("{} of {v}", ratio(*x)))
                .unwrap_or_default()
        );
    }
}

pub fn e2e(r: &e2e::Report) -> String {
    let mut out = String::new();
    rates(&mut out, "packets/s at the backend", &r.packets);
    out.push('\n');
    rates(&mut out, "requests/s", &r.http);
    for n in &r.notes {
        let _ = writeln!(out, "\n- {n}");
    }
    out
}
