//! Human-readable tables for the CLI, rendered from the same JSON `--json` prints, so the
//! two views can never disagree.

use serde_json::Value;

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
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

fn rows(data: &Value, fields: &[&str]) -> Vec<Vec<String>> {
    data.as_array()
        .map(|a| {
            a.iter()
                .map(|item| fields.iter().map(|f| s(&item[*f])).collect())
                .collect()
        })
        .unwrap_or_default()
}

pub fn vips(data: &Value) -> String {
    let fields = [
        "vip",
        "proto",
        "backends",
        "active_backends",
        "packets",
        "bytes",
        "new_flows",
    ];
    render(
        &[
            "VIP",
            "PROTO",
            "BACKENDS",
            "ACTIVE",
            "PACKETS",
            "BYTES",
            "NEW FLOWS",
        ],
        rows(data, &fields),
    )
}

pub fn backends(data: &Value) -> String {
    let fields = [
        "vip",
        "proto",
        "address",
        "state",
        "role",
        "weight",
        "check",
        "last_check",
        "check_latency_us",
        "packets",
        "bytes",
        "new_flows",
        "flows",
        "note",
    ];
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
            "NOTE",
        ],
        rows(data, &fields),
    )
}

pub fn stats(data: &Value) -> String {
    let mut out = vips(&data["vips"]);
    out += "\n";
    out += &backends(&data["backends"]);
    out += "\n";
    if data["firewall"].as_array().is_some_and(|a| !a.is_empty()) {
        out += &firewall(&data["firewall"]);
        out += "\n";
    }
    // In the data plane's order, not the JSON object's.
    let rows = lb_common::Reason::ALL
        .iter()
        .map(|r| {
            let c = &data["reasons"][r.name()];
            vec![r.name().to_string(), s(&c["packets"]), s(&c["bytes"])]
        })
        .collect();
    out += &render(&["REASON", "PACKETS", "BYTES"], rows);
    out
}

pub fn firewall(data: &Value) -> String {
    render(
        &["DROP FROM", "PACKETS", "BYTES"],
        rows(data, &["cidr", "packets", "bytes"]),
    )
}
