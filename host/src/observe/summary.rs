//! `host status` for people: a running job's status, or a group's members and partitions, as
//! a few aligned lines (`--json` prints the data itself).

use std::fmt::Write as _;

use chrono::DateTime;

use crate::source::GroupView;

/// A running job's `/status` answer, readable.
pub fn job(status: &serde_json::Value) -> String {
    let text = |value: &serde_json::Value| value.as_str().unwrap_or("?").to_string();
    let plugin = &status["plugin"];
    let digest = text(&plugin["digest"]);
    let mut out = String::new();
    let mut line = |label: &str, value: String| {
        let _ = writeln!(out, "{label:<13}{value}");
    };
    line(
        "plugin",
        format!(
            "{} {} ({} plugin, state schema {})",
            text(&plugin["name"]),
            text(&plugin["version"]),
            text(&plugin["kind"]),
            plugin["state_schema_version"]
        ),
    );
    line("build", format!("sha256 {}", &digest[..digest.len().min(12)]));
    if let Some(probation) = status["probation"].as_str() {
        line("on probation", probation.to_string());
    }
    line("member", text(&status["member"]));
    let partitions: Vec<String> = status["partitions"].as_array().into_iter().flatten().map(text).collect();
    line("partitions", if partitions.is_empty() { "none".into() } else { partitions.join(", ") });
    line(
        "last batch",
        match status["last_batch"].as_i64() {
            Some(time) => batch_time(time),
            None => "none yet".into(),
        },
    );
    line(
        "lag",
        match status["lag"].as_i64() {
            Some(lag) => format!("{} records", thousands(lag)),
            None => "unknown (no batch planned yet)".into(),
        },
    );
    line(
        "input rate",
        match status["input_rate"].as_f64() {
            Some(rate) => format!("{} records/s over the last batches", thousands(rate.round() as i64)),
            None => "unknown (no batch yet)".into(),
        },
    );
    out
}

/// A group's view from its commits, readable: members, then partitions.
pub fn group(view: &GroupView) -> String {
    let mut out = String::new();
    let state = view.state.as_deref().map(|state| format!(" ({state})")).unwrap_or_default();
    let _ = writeln!(out, "group {}{state}: {} members by their commits", view.group, view.members.len());
    let mut members = vec![["member", "builds", "partitions", "last batch", "lag"].map(String::from)];
    for member in &view.members {
        members.push([
            member.member.clone(),
            member.builds.join(" "),
            member.partitions.join(" "),
            batch_time(member.last_batch),
            thousands(member.lag),
        ]);
    }
    table(&mut out, &members);
    if let Some(live) = &view.live {
        let _ = writeln!(out, "\nlive members (the coordinator's view):");
        let mut rows = vec![["member", "client host", "partitions"].map(String::from)];
        rows.extend(live.iter().map(|m| [m.member.clone(), m.client_host.clone(), m.partitions.join(" ")]));
        table(&mut out, &rows);
    }
    let _ = writeln!(out);
    let mut partitions = vec![["partition", "committed", "end", "lag", "member"].map(String::from)];
    for partition in &view.partitions {
        let or_dash = |value: Option<i64>| value.map_or("-".into(), thousands);
        partitions.push([
            partition.partition.clone(),
            or_dash(partition.committed),
            thousands(partition.end),
            or_dash(partition.lag),
            partition.last_commit.as_ref().map_or("-".into(), |commit| commit.member.clone()),
        ]);
    }
    table(&mut out, &partitions);
    out
}

/// Rows in columns as wide as their widest cell.
fn table<const N: usize>(out: &mut String, rows: &[[String; N]]) {
    let mut widths = [0; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in rows {
        let cells: Vec<String> = row.iter().zip(widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
}

/// A batch time in UTC, with milliseconds.
fn batch_time(ms: i64) -> String {
    match DateTime::from_timestamp_millis(ms) {
        Some(time) => format!("{} UTC ({ms} ms)", time.format("%Y-%m-%d %H:%M:%S%.3f")),
        None => format!("{ms} ms"),
    }
}

/// 1234567 as "1,234,567".
fn thousands(value: i64) -> String {
    let digits = value.unsigned_abs().to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    if value < 0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_status_reads_as_lines() {
        let status = serde_json::json!({
            "plugin": {"name": "wordcount", "version": "1.0.0", "state_schema_version": 1,
                       "digest": "0123456789abcdef", "kind": "stateful"},
            "member": "host-1", "partitions": ["lines:0", "lines:1"], "last_batch": null,
            "lag": 12345, "input_rate": 1500.4, "probation": null,
        });
        let text = job(&status);
        assert!(text.contains("plugin       wordcount 1.0.0 (stateful plugin, state schema 1)\n"), "{text}");
        assert!(text.contains("build        sha256 0123456789ab\n"), "{text}");
        assert!(text.contains("partitions   lines:0, lines:1\n"), "{text}");
        assert!(text.contains("last batch   none yet\n"), "{text}");
        assert!(text.contains("lag          12,345 records\n"), "{text}");
        assert!(text.contains("input rate   1,500 records/s"), "{text}");
        assert!(!text.contains("probation"), "{text}");
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(-1_234_567), "-1,234,567");
    }
}
