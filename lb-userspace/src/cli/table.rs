//! Human-readable tables for the CLI, rendered from the same typed views `--json` prints,
//! so the two can never disagree.

use crate::api::views::{BackendView, RuleView, StatsView, VipView};

/// `-` for nothing.
fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".into(), ToString::to_string)
}

pub(crate) fn render(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out += &line(row);
    }
    out
}

/// The VIP's ceiling on new flows per second, with its burst when that is not one
/// second's worth; `-` for none.
fn ceiling(v: &VipView) -> String {
    match (v.max_new_flows, v.new_flow_burst) {
        (0, _) => "-".into(),
        (max, burst) if burst == max => max.to_string(),
        (max, burst) => format!("{max} (burst {burst})"),
    }
}

pub fn vips(vips: &[VipView]) -> String {
    let rows = vips
        .iter()
        .map(|v| {
            vec![
                v.vip.to_string(),
                v.proto.to_string(),
                v.algo.to_string(),
                v.mode.to_string(),
                if v.persist == 0 {
                    "-".into()
                } else {
                    format!("{}s", v.persist)
                },
                v.backends.to_string(),
                v.active_backends.to_string(),
                v.packets.to_string(),
                v.bytes.to_string(),
                v.new_flows.to_string(),
                ceiling(v),
            ]
        })
        .collect();
    render(
        &[
            "VIP",
            "PROTO",
            "ALGO",
            "MODE",
            "PERSIST",
            "BACKENDS",
            "ACTIVE",
            "PACKETS",
            "BYTES",
            "NEW FLOWS",
            "MAX NEW/S",
        ],
        rows,
    )
}

pub fn backends(list: &[BackendView]) -> String {
    let rows = list
        .iter()
        .map(|b| {
            vec![
                b.vip.to_string(),
                b.proto.to_string(),
                b.address.to_string(),
                b.state.clone(),
                b.role.clone(),
                b.weight.to_string(),
                b.check.to_string(),
                opt(&b.last_check),
                opt(&b.check_latency_us),
                b.packets.to_string(),
                b.bytes.to_string(),
                b.new_flows.to_string(),
                b.flows.to_string(),
                b.active.to_string(),
                opt(&b.note),
            ]
        })
        .collect();
    render(
        &[
            "VIP",
            "PROTO",
            "BACKEND",
            "STATE",
            "ROLE",
            "WEIGHT",
            "CHECK",
            "LAST",
            "LATENCY_US",
            "PACKETS",
            "BYTES",
            "NEW FLOWS",
            "FLOWS",
            "LC_ACTIVE",
            "NOTE",
        ],
        rows,
    )
}

pub fn stats(stats: &StatsView) -> String {
    let mut out = vips(&stats.vips);
    out += "\n";
    out += &backends(&stats.backends);
    out += "\n";
    if !stats.firewall.is_empty() {
        out += &firewall(&stats.firewall);
        out += "\n";
    }
    if let Some(sync) = &stats.flow_sync {
        out += &sync.summary();
        out += "\n\n";
    }
    if let Some(nat) = &stats.nat {
        out += &nat.summary();
        out += "\n\n";
    }
    // In the data plane's order, not the map's.
    let rows = lb_common::Reason::ALL
        .iter()
        .map(|r| {
            let c = stats.reasons.get(r.name()).copied().unwrap_or_default();
            vec![
                r.name().to_string(),
                c.packets.to_string(),
                c.bytes.to_string(),
            ]
        })
        .collect();
    out += &render(&["REASON", "PACKETS", "BYTES"], rows);
    out
}

pub fn firewall(rules: &[RuleView]) -> String {
    let rows = rules
        .iter()
        .map(|r| {
            vec![
                r.cidr.to_string(),
                r.packets.to_string(),
                r.bytes.to_string(),
            ]
        })
        .collect();
    render(&["DROP FROM", "PACKETS", "BYTES"], rows)
}
