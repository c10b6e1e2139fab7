//! Tidy: the promises of docs/ARCHITECTURE.md that a machine can check.
//!
//! - the framework knows nothing about any application: no framework crate
//!   depends, directly or through another crate, on a package under
//!   `examples/` (their integration tests may use the bank as a fixture:
//!   dev-dependencies are allowed);
//! - every Rust file says what it is for in a `//!` comment on its first
//!   line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The framework: what an application builds on. Everything else in the
/// workspace is an application, a tool of one (the benchmark and the chaos
/// run measure the bank) or tests.
const FRAMEWORK: &[&str] = &[
    "jetsource",
    "jetsource-aggregate",
    "jetsource-core",
    "jetsource-command",
    "jetsource-projector",
    "jetsource-snapshotter",
    "jetsource-gateway",
    "jetsource-cli",
    "jetsource-test-support",
];

fn root() -> PathBuf {
    jetsource_tests::workspace_root()
}

fn metadata() -> Value {
    jetsource_tests::cargo_metadata()
}

/// Workspace package -> its normal and build dependencies inside the
/// workspace.
fn workspace_graph(metadata: &Value) -> BTreeMap<String, (PathBuf, BTreeSet<String>)> {
    let packages = metadata["packages"].as_array().cloned().unwrap_or_default();
    let names: BTreeSet<String> = packages
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect();
    packages
        .iter()
        .map(|p| {
            let name = p["name"].as_str().unwrap_or_default().to_owned();
            let manifest = PathBuf::from(p["manifest_path"].as_str().unwrap_or_default());
            let deps = p["dependencies"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| d["kind"].as_str() != Some("dev"))
                .filter_map(|d| d["name"].as_str().map(str::to_owned))
                .filter(|d| names.contains(d))
                .collect();
            (name, (manifest, deps))
        })
        .collect()
}

#[test]
fn the_framework_depends_on_no_application() {
    let graph = workspace_graph(&metadata());
    let examples = root().join("examples");
    let applications: BTreeSet<&String> = graph
        .iter()
        .filter(|(_, (manifest, _))| manifest.starts_with(&examples))
        .map(|(name, _)| name)
        .collect();
    assert!(
        applications.contains(&"jetsource-bank".to_owned()),
        "the bank application lives under examples/: {applications:?}"
    );
    for crate_name in FRAMEWORK {
        assert!(
            graph.contains_key(*crate_name),
            "{crate_name} is in the workspace"
        );
        let mut seen = BTreeSet::new();
        let mut path = vec![vec![crate_name.to_string()]];
        while let Some(chain) = path.pop() {
            let last = chain.last().cloned().unwrap_or_default();
            assert!(
                !applications.contains(&last),
                "framework crate {crate_name} depends on application {last}: {}",
                chain.join(" -> ")
            );
            if !seen.insert(last.clone()) {
                continue;
            }
            for dep in graph.get(&last).map(|(_, d)| d.clone()).unwrap_or_default() {
                let mut next = chain.clone();
                next.push(dep);
                path.push(next);
            }
        }
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() && name != "target" && !name.to_string_lossy().starts_with('.') {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_starts_with_a_module_comment() {
    let mut files = Vec::new();
    for dir in ["crates", "examples", "tests"] {
        rust_files(&root().join(dir), &mut files);
    }
    assert!(files.len() > 50, "found the sources: {}", files.len());
    let missing: Vec<_> = files
        .iter()
        .filter(|f| {
            !std::fs::read_to_string(f)
                .unwrap_or_default()
                .starts_with("//!")
        })
        .map(|f| f.strip_prefix(root()).unwrap_or(f).display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "files without a //! comment on the first line: {missing:?}"
    );
}

/// Library and application sources outside `core::store`: what must not be
/// there. The event stream is reached through `EventStore` only: nobody
/// else opens or manages it by name or publishes onto its subjects.
#[test]
fn only_core_store_touches_the_event_stream() {
    let mut files = Vec::new();
    for dir in ["crates", "examples"] {
        rust_files(&root().join(dir), &mut files);
    }
    let store = root().join("crates/core/src/store");
    // Tools and the test harness set up and inspect servers directly.
    let exempt = ["crates/bench", "crates/chaos", "crates/test-support"].map(|d| root().join(d));
    let stream_calls = [
        "get_stream(",
        "create_stream(",
        "get_or_create_stream(",
        "delete_stream(",
        "update_stream(",
    ];
    let mut found = Vec::new();
    for file in files.iter().filter(|f| {
        f.components().any(|c| c.as_os_str() == "src")
            && !f.starts_with(&store)
            && !exempt.iter().any(|e| f.starts_with(e))
    }) {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for (n, line) in text.lines().enumerate() {
            let names_events = line.contains("store.stream") || line.contains("\"EVENTS\"");
            let stream_call = stream_calls.iter().any(|c| line.contains(c));
            let publishes_events = line.contains("publish")
                && (line.contains("\"events.") || line.contains("events.{"));
            if (names_events && stream_call) || publishes_events {
                let path = file.strip_prefix(root()).unwrap_or(file);
                found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "only core::store may open, manage or publish to the event stream:\n{}",
        found.join("\n")
    );
}
