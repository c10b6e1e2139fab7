//! The report: one Markdown table per section (readable in a terminal,
//! pasteable into docs), then the one-line summary.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use comfy_table::{presets, Table};

use crate::checks::Check;
use crate::client::Outcome;
use crate::Findings;

/// Read-model differences shown in the report; all are in the run
/// directory's `read-model-differences.txt`.
const SHOWN_MISMATCHES: usize = 30;

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::ASCII_MARKDOWN)
        .set_header(header.to_vec());
    table
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64()))
}

/// Every section, in order.
pub fn render(f: &Findings) -> String {
    let mut out = String::from("# jetsource chaos run\n");
    for (title, table) in [
        ("Run", run(f)),
        ("Load", load(f)),
        ("Faults", faults(f)),
        ("Checks", checks(&f.checks)),
    ] {
        let _ = write!(out, "\n## {title}\n\n{table}\n");
    }
    if !f.mismatches.is_empty() {
        let _ = write!(
            out,
            "\n## Read-model differences (first {} of {}; all in {})\n\n{}\n",
            SHOWN_MISMATCHES.min(f.mismatches.len()),
            f.mismatches.len(),
            f.run_dir.join("read-model-differences.txt").display(),
            mismatches(f, SHOWN_MISMATCHES)
        );
    }
    let _ = write!(out, "\n## Replicas\n\n{}\n", replicas(f));
    let _ = write!(
        out,
        "\n## Shutdown (SIGTERM to every worker at once)\n\n{}\n",
        shutdown(f)
    );
    out
}

fn run(f: &Findings) -> Table {
    let c = &f.config;
    let mut t = table(&["setting", "value"]);
    let rows = [
        ("seed", f.seed.to_string()),
        ("load", format!("{:.0} s (asked {} s)", f.load_time.as_secs_f64(), c.duration_secs)),
        ("clients / accounts", format!("{} / {}", c.clients, c.accounts)),
        ("fault interval / node down", format!("{} s / {} s", c.fault_interval_secs, c.node_down_secs)),
        ("recovery bound", format!("{} s", c.recovery_bound_secs)),
        ("topology", "3 nats-server nodes (sync_interval: always), stream EVENTS R3; 2 jetsource-command, 2 jetsource-projector, 1 jetsource-snapshotter; redis-server; a NATS user per role (nats/accounts.conf), TLS to NATS and Redis".into()),
        ("run directory (logs)", f.run_dir.display().to_string()),
    ];
    for (k, v) in rows {
        t.add_row(vec![k.to_owned(), v]);
    }
    t
}

fn load(f: &Findings) -> Table {
    let s = &f.stats;
    let acked = s.acked.load(Relaxed);
    let mut refused: std::collections::BTreeMap<&str, usize> = Default::default();
    for r in &f.records {
        if let Outcome::Refused { code, .. } = &r.outcome {
            *refused.entry(code.as_str()).or_default() += 1;
        }
    }
    let ambiguous = s.ambiguous_by_kind();
    let join = |items: Vec<String>| {
        if items.is_empty() {
            "none".into()
        } else {
            items.join(", ")
        }
    };
    let mut t = table(&["metric", "value"]);
    let rows = [
        ("commands (distinct ids)", f.records.len().to_string()),
        (
            "acknowledged",
            format!(
                "{acked} ({:.0}/s)",
                acked as f64 / f.load_time.as_secs_f64().max(0.001)
            ),
        ),
        (
            "refused",
            join(refused.iter().map(|(c, n)| format!("{n} {c}")).collect()),
        ),
        (
            "undecided at the deadline",
            s.undecided.load(Relaxed).to_string(),
        ),
        (
            "resends (same command id)",
            s.resends.load(Relaxed).to_string(),
        ),
        (
            "ambiguous outcomes",
            join(ambiguous.iter().map(|(k, n)| format!("{n} {k}")).collect()),
        ),
        (
            "events in the stream",
            format!(
                "{} (last sequence {})",
                f.stream.events.len(),
                f.stream.last_sequence
            ),
        ),
    ];
    for (k, v) in rows {
        t.add_row(vec![k.to_owned(), v]);
    }
    t
}

fn faults(f: &Findings) -> Table {
    let mut t = table(&[
        "#",
        "at",
        "fault",
        "target",
        "commands ok after",
        "queries ok after",
        "resends",
        "notes",
    ]);
    for (i, r) in f.faults.iter().enumerate() {
        t.add_row(vec![
            (i + 1).to_string(),
            format!("{:.1} s", r.at.as_secs_f64()),
            r.fault.describe().to_owned(),
            r.target.clone(),
            secs(r.commands),
            secs(r.queries),
            r.resends.to_string(),
            r.notes.join("; "),
        ]);
    }
    t
}

fn checks(checks: &[Check]) -> Table {
    let mut t = table(&["check", "result", "detail"]);
    for c in checks {
        let result = if c.passed { "PASS" } else { "FAIL" };
        t.add_row(vec![c.name.to_owned(), result.to_owned(), c.detail.clone()]);
    }
    t
}

/// The first `n` differences, by account.
pub fn mismatches(f: &Findings, n: usize) -> Table {
    let mut t = table(&[
        "account",
        "field",
        "expected (fold of its events)",
        "read model",
    ]);
    for m in f.mismatches.iter().take(n) {
        t.add_row(vec![
            m.account.clone(),
            m.field.to_owned(),
            m.expected.clone(),
            m.actual.clone(),
        ]);
    }
    t
}

fn replicas(f: &Findings) -> Table {
    let mut t = table(&["node", "role", "messages", "bytes", "first seq", "last seq"]);
    match &f.replicas {
        Ok(replicas) => {
            for r in replicas {
                let role = if r.leader { "leader" } else { "follower" };
                t.add_row(vec![
                    r.node.clone(),
                    role.to_owned(),
                    r.messages.to_string(),
                    r.bytes.to_string(),
                    r.first_seq.to_string(),
                    r.last_seq.to_string(),
                ]);
            }
        }
        Err(e) => {
            t.add_row(vec!["?".to_owned(), e.clone()]);
        }
    }
    t
}

fn shutdown(f: &Findings) -> Table {
    let mut t = table(&["worker", "pid", "exited after", "status"]);
    for s in &f.stopped {
        t.add_row(vec![
            s.name.clone(),
            s.pid.to_string(),
            secs(s.after),
            s.status.clone(),
        ]);
    }
    t
}

/// The one summary line.
pub fn summary(f: &Findings) -> String {
    let passed = f.checks.iter().filter(|c| c.passed).count();
    let failed: Vec<&str> = f
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.name)
        .collect();
    let injected = f.faults.iter().filter(|r| r.target != "-").count();
    let mut line = format!(
        "chaos: {} seed={} commands={} acked={} resends={} faults={injected} checks={passed}/{}",
        if failed.is_empty() { "PASS" } else { "FAIL" },
        f.seed,
        f.records.len(),
        f.stats.acked.load(Relaxed),
        f.stats.resends.load(Relaxed),
        f.checks.len(),
    );
    if !failed.is_empty() {
        let _ = write!(line, " failed={}", failed.join(","));
    }
    line
}
