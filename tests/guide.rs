//! docs/GUIDE.md followed from scratch: every file the guide shows is
//! written into a new crate in a temporary directory, as a newcomer would,
//! its given/when/then tests run, its binaries built, and the fleet run
//! end to end against real servers: a command decided, its event
//! projected, both queries answered (with read-your-writes), an old event
//! upcast. If the guide's code stops compiling or working, this fails.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use jetsource_test_support::{workspace_binary, NatsServer, RedisServer};
use jetsource_tests::{wait_for_service, Process};
use serde_json::{json, Value};

fn root() -> PathBuf {
    jetsource_tests::workspace_root()
}

/// `(path, contents)` of every `<!-- file: path -->` block of the guide.
fn guide_files(guide: &str) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut lines = guide.lines();
    while let Some(line) = lines.next() {
        let Some(path) = line
            .strip_prefix("<!-- file: ")
            .and_then(|l| l.strip_suffix(" -->"))
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert!(fence.starts_with("```"), "{path}: a fenced block follows");
        let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        files.push((path.to_owned(), body.join("\n") + "\n"));
    }
    files
}

/// Writes the guide's crate into `dir`, pointing its jetsource dependency
/// at this checkout.
fn write_crate(dir: &Path) {
    let guide = std::fs::read_to_string(root().join("docs/GUIDE.md")).unwrap();
    let files = guide_files(&guide);
    let names: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    for want in [
        "Cargo.toml",
        "src/lib.rs",
        "src/ticket.rs",
        "src/bin/tickets.rs",
    ] {
        assert!(names.contains(&want), "the guide shows {want}: {names:?}");
    }
    for (path, contents) in files {
        let contents = contents.replace("/path/to/jetsource", root().to_str().unwrap());
        let target = dir.join(&path);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, contents).unwrap();
    }
    // Not part of the guide: build with this workspace's versions and
    // profile, into its target directory, so the build reuses what
    // `make test` already compiled.
    let mut manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    let workspace = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let profiles = &workspace[workspace.find("[profile.dev]").unwrap()..];
    manifest.push_str("\n[workspace]\n\n");
    manifest.push_str(profiles);
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
    std::fs::copy(root().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
}

fn cargo(dir: &Path, args: &[&str]) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = workspace_binary("jetsource")
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let out = Command::new(cargo)
        .args(args)
        .arg("--offline")
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target)
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "cargo {args:?} failed:\n{text}");
    text
}

/// Runs the guide's CLI (`tickets`) with `--json`; returns its reply.
fn tickets(nats: &str, args: &[&str]) -> Value {
    let out = Command::new(workspace_binary("tickets"))
        .args(["--url", nats, "--json"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tickets {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Appends a `TicketOpened` as the first build of the application wrote
/// it: schema version 1, no priority.
async fn append_version_1(client: &async_nats::Client, id: &str) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Jetsource-Event-Id", uuid_like(id).as_str());
    headers.insert("Jetsource-Event-Type", "TicketOpened");
    headers.insert("Jetsource-Schema-Version", "1");
    headers.insert("Jetsource-Aggregate-Version", "1");
    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
    let js = async_nats::jetstream::new(client.clone());
    js.publish_with_headers(
        format!("events.ticket.{id}"),
        headers,
        json!({"title": "from the first release"})
            .to_string()
            .into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

fn uuid_like(id: &str) -> String {
    format!("00000000-0000-7000-8000-{:0>12}", id.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guide_builds_a_working_application_from_scratch() {
    let dir = tempfile::tempdir().unwrap();
    write_crate(dir.path());
    let tested = cargo(dir.path(), &["test"]);
    assert!(tested.contains("test result: ok. 4 passed"), "{tested}");
    cargo(dir.path(), &["build", "--bins"]);

    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let client = nats.client().await;
    let env = [("JETSOURCE__REDIS__URL", redis.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let _command = Process::start("tickets-command", &nats, &env);
    let _projector = Process::start("tickets-projector", &nats, &env);
    let _snapshotter = Process::start("tickets-snapshotter", &nats, &env);
    wait_for_service(&client, "jetsource-command", 1).await;
    wait_for_service(&client, "jetsource-projector", 1).await;

    let url = nats.url();
    let opened = tickets(
        &url,
        &[
            "send",
            "ticket",
            "t-1",
            "Open",
            r#"{"title":"printer on fire","priority":"high"}"#,
        ],
    );
    assert_eq!(opened["version"], 1, "{opened}");
    let assigned = tickets(
        &url,
        &["send", "ticket", "t-1", "Assign", r#"{"to":"ada"}"#],
    );
    let seq = assigned["sequence"].as_u64().unwrap().to_string();
    let ticket = tickets(&url, &["query", "ticket", "t-1", "--min-sequence", &seq]);
    assert_eq!(ticket["data"]["ticket"]["assignee"], "ada", "{ticket}");
    assert_eq!(ticket["data"]["ticket"]["priority"], "high", "{ticket}");

    // A ticket stored by the first release reads as version 2 everywhere.
    append_version_1(&client, "t-0").await;
    let closed = tickets(&url, &["send", "ticket", "t-0", "Close", "{}"]);
    let seq = closed["sequence"].as_u64().unwrap().to_string();
    let state = tickets(&url, &["state", "ticket", "t-0", "--at-seq", "3"]);
    assert_eq!(state["state"]["priority"], "normal", "{state}");
    let old = tickets(&url, &["query", "ticket", "t-0", "--min-sequence", &seq]);
    assert_eq!(old["data"]["ticket"]["priority"], "normal", "{old}");
    assert_eq!(old["data"]["ticket"]["status"], "closed", "{old}");
    let open = tickets(&url, &["query", "tickets.open", "--min-sequence", &seq]);
    assert_eq!(open["data"], json!(["t-1"]), "{open}");
    wait_until_stopped_cleanly(_command);
}

/// The guide's worker stops on SIGTERM like every jetsource worker.
fn wait_until_stopped_cleanly(mut worker: Process) {
    worker.signal("TERM");
    let started = Instant::now();
    let status = worker.wait(Duration::from_secs(10));
    assert!(
        status.success(),
        "exit {status:?} after {:?}",
        started.elapsed()
    );
}
