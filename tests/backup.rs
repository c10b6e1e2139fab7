//! Backups as shipped: `jetsource backup` taken while a command load runs,
//! `jetsource restore` onto a fresh single server and onto a fresh 3-node
//! cluster; every acknowledged event up to the backup is back at its
//! sequence, the manifest verifies, and a projector on the restored store
//! builds the read models of the original at the backup's sequence.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jetsource_test_support::requests::{query, send};
use jetsource_test_support::{NatsCluster, NatsServer, RedisServer};
use jetsource_tests::{cli_at, wait_for_service, Process};
use serde_json::{json, Value};

/// Accounts written before the backup and never after: the original's
/// read model of them is the one at the backup's sequence.
const QUIET: [&str; 2] = ["quiet0", "quiet1"];
/// Load clients; each deposits into accounts of its own.
const CLIENTS: usize = 3;
const ACCOUNTS_PER_CLIENT: usize = 2;
const DEPOSITS_PER_CLIENT: usize = 200;

/// What the load recorded: per acknowledged event, its sequence, account
/// and amount (0 for the opening).
type Acked = Arc<Mutex<Vec<(u64, String, u64)>>>;

/// The source store, its load's acknowledgements and a backup taken while
/// the load ran.
struct Backup {
    _server: NatsServer,
    /// A client of the source store, whose projector keeps running.
    source: async_nats::Client,
    _redis: RedisServer,
    _workers: Vec<Process>,
    dir: tempfile::TempDir,
    manifest: Value,
    acked: Vec<(u64, String, u64)>,
}

impl Backup {
    fn path(&self) -> PathBuf {
        self.dir.path().join("backup")
    }

    fn stream(&self, name: &str) -> &Value {
        self.manifest["streams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in the manifest: {}", self.manifest))
    }

    fn last_sequence(&self) -> u64 {
        self.stream("EVENTS")["last_sequence"].as_u64().unwrap()
    }
}

async fn back_up_under_load() -> Backup {
    let server = NatsServer::start();
    let redis = RedisServer::start();
    let client = server.client().await;
    let url = server.url();
    let env = [
        ("JETSOURCE__SNAPSHOT__EVERY", "5"),
        ("JETSOURCE__REDIS__URL", &redis.url()),
    ];
    let workers = vec![
        Process::start_at("jetsource-command", &url, &env, None),
        Process::start_at("jetsource-command", &url, &env, None),
        Process::start_at("jetsource-snapshotter", &url, &env, None),
        Process::start_at("jetsource-projector", &url, &env, None),
    ];
    wait_for_service(&client, "jetsource-command", 2).await;
    wait_for_service(&client, "jetsource-snapshotter", 1).await;
    wait_for_service(&client, "jetsource-projector", 1).await;

    let acked: Acked = Arc::default();
    for (n, id) in QUIET.iter().enumerate() {
        let open = json!({"type": "OpenAccount", "data": {"owner": id}});
        let outcome = send(&client, "account", id, open).await.unwrap();
        acked
            .lock()
            .unwrap()
            .push((outcome.sequence, (*id).to_owned(), 0));
        for amount in 1..=3 + n as u64 {
            let deposit = json!({"type": "Deposit", "data": {"amount": amount}});
            let outcome = send(&client, "account", id, deposit).await.unwrap();
            acked
                .lock()
                .unwrap()
                .push((outcome.sequence, (*id).to_owned(), amount));
        }
    }
    let mut load = Vec::new();
    for c in 0..CLIENTS {
        let (client, acked) = (client.clone(), acked.clone());
        load.push(tokio::spawn(async move {
            let ids: Vec<String> = (0..ACCOUNTS_PER_CLIENT)
                .map(|a| format!("c{c}a{a}"))
                .collect();
            for id in &ids {
                let open = json!({"type": "OpenAccount", "data": {"owner": id}});
                let outcome = send(&client, "account", id, open).await.unwrap();
                acked
                    .lock()
                    .unwrap()
                    .push((outcome.sequence, id.clone(), 0));
            }
            for i in 0..DEPOSITS_PER_CLIENT {
                let id = &ids[i % ids.len()];
                let amount = (i % 7 + 1) as u64;
                let deposit = json!({"type": "Deposit", "data": {"amount": amount}});
                let outcome = send(&client, "account", id, deposit)
                    .await
                    .unwrap_or_else(|e| panic!("deposit {i} to {id}: {e:?}"));
                acked
                    .lock()
                    .unwrap()
                    .push((outcome.sequence, id.clone(), amount));
                // A steady load, not a burst the backup could miss.
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
        }));
    }
    // The backup starts once the load is well under way.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 60 {
        assert!(Instant::now() < deadline, "the load does not progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backup");
    let (code, out, err) = {
        let (url, path) = (url.clone(), path.display().to_string());
        tokio::task::spawn_blocking(move || cli_at(&url, &[], &["--json", "backup", &path]))
            .await
            .unwrap()
    };
    assert_eq!(code, 0, "backup failed: {out} {err}");
    assert!(
        !err.contains("ETA"),
        "no progress bars off a terminal: {err}"
    );
    let manifest: Value = serde_json::from_str(&out).unwrap();
    let on_disk: Value =
        serde_json::from_slice(&std::fs::read(path.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest, on_disk);
    for task in load {
        task.await.unwrap();
    }
    // A backup never overwrites another.
    let (code, _, err) = {
        let (url, path) = (url.clone(), path.display().to_string());
        tokio::task::spawn_blocking(move || cli_at(&url, &[], &["backup", &path]))
            .await
            .unwrap()
    };
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("already holds a backup"), "{err}");
    let backup = Backup {
        _server: server,
        source: client.clone(),
        _redis: redis,
        _workers: workers,
        dir,
        manifest,
        acked: acked.lock().unwrap().clone(),
    };
    let names: Vec<&str> = backup.manifest["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["KV_SNAPSHOTS", "DEADLETTERS", "EVENTS"],
        "what refers to events is taken before them"
    );
    let last = backup.last_sequence();
    let js = async_nats::jetstream::new(client);
    let now = js
        .get_stream("EVENTS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    assert!(
        last > 0 && last < now,
        "the backup (up to {last}) was taken while the load ran (on to {now})"
    );
    assert_eq!(
        backup.stream("EVENTS")["messages"],
        last,
        "every sequence up to the backup's last holds an event"
    );
    assert_eq!(backup.acked.len() as u64, now, "one event per command");
    backup
}

/// Restores `backup` onto the store at `url` and checks it: the events,
/// the manifest, the read models a fresh projector builds.
async fn restore_and_check(backup: &Backup, url: &str, client: async_nats::Client, replicas: &str) {
    let env = [("JETSOURCE__STORE__REPLICAS", replicas)];
    let path = backup.path().display().to_string();
    let (code, out, err) = restore(url, &env, &["--json", "restore", &path]).await;
    assert_eq!(code, 0, "restore failed: {out} {err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["verified"], true, "{report}");
    for stream in report["streams"].as_array().unwrap() {
        let name = stream["name"].as_str().unwrap();
        let saved = backup.stream(name);
        assert_eq!(stream["mismatch"], Value::Null, "{stream}");
        assert_eq!(stream["checksum"], saved["checksum"], "{name}");
        assert_eq!(stream["last_sequence"], saved["last_sequence"], "{name}");
    }

    // Every acknowledged event up to the backup, at its sequence.
    let last = backup.last_sequence();
    let js = async_nats::jetstream::new(client.clone());
    let events = js.get_stream("EVENTS").await.unwrap();
    let info = js
        .get_stream("EVENTS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.num_replicas.to_string(), replicas);
    assert_eq!(info.state.last_sequence, last);
    let before: Vec<_> = backup.acked.iter().filter(|(s, ..)| *s <= last).collect();
    assert_eq!(
        before.len() as u64,
        last,
        "every event up to {last} was acknowledged"
    );
    for (sequence, id, _) in &before {
        let message = events.get_raw_message(*sequence).await.unwrap();
        assert_eq!(message.subject.as_str(), format!("events.account.{id}"));
    }

    // A projector on the restored store, with an empty Redis, builds the
    // read models of the original at the backup's sequence.
    let redis = RedisServer::start();
    let env = [
        ("JETSOURCE__REDIS__URL", redis.url()),
        ("JETSOURCE__STORE__REPLICAS", replicas.to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let _projector = Process::start_at("jetsource-projector", url, &env, None);
    wait_for_service(&client, "jetsource-projector", 1).await;
    let mut expected: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
    for (sequence, id, amount) in &before {
        let e = expected.entry(id.as_str()).or_default();
        *e = (e.0 + amount, e.1 + 1, *sequence);
    }
    let wait = json!({"min_sequence": last, "timeout_ms": 30000});
    for (id, (balance, version, sequence)) in &expected {
        let reply = query(&client, &format!("query.account.{id}"), wait.clone())
            .await
            .unwrap();
        let data = &reply["data"];
        assert_eq!(data["balance"], *balance, "balance of {id}: {data}");
        assert_eq!(data["version"], *version, "version of {id}: {data}");
        assert_eq!(data["sequence"], *sequence, "sequence of {id}: {data}");
    }
    let totals = query(&client, "query.accounts.totals", wait).await.unwrap();
    assert_eq!(
        totals["data"],
        json!({
            "open_accounts": CLIENTS * ACCOUNTS_PER_CLIENT + QUIET.len(),
            "balance_sum": expected.values().map(|e| e.0).sum::<u64>(),
        })
    );

    // Accounts untouched since the backup: the same documents (balance,
    // versions, timestamps, recent transactions) as the original's.
    let js_source = async_nats::jetstream::new(backup.source.clone());
    let source_last = js_source
        .get_stream("EVENTS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    let source_wait = json!({"min_sequence": source_last, "timeout_ms": 30000});
    for id in QUIET {
        let subject = format!("query.account.{id}");
        let original = query(&backup.source, &subject, source_wait.clone())
            .await
            .unwrap();
        let restored = query(&client, &subject, json!({"min_sequence": last}))
            .await
            .unwrap();
        assert_eq!(restored["data"], original["data"], "{id}");
    }

    // Restoring again, onto streams that exist, is refused: nothing changes.
    let (code, _, err) = restore(url, &[], &["restore", &path]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("already exist"), "{err}");
    let now = js
        .get_stream("EVENTS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .clone();
    assert_eq!((now.messages, now.last_sequence), (last, last));
}

async fn restore(url: &str, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let url = url.to_owned();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli_at(&url, &env, &args)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_under_load_restores_onto_a_fresh_server() {
    let backup = back_up_under_load().await;
    let target = NatsServer::start();
    restore_and_check(&backup, &target.url(), target.client().await, "1").await;

    // A backup that does not match what was restored fails the restore.
    let damaged = backup.dir.path().join("damaged");
    copy_dir(&backup.path(), &damaged);
    let manifest_path = damaged.join("manifest.json");
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    for stream in manifest["streams"].as_array_mut().unwrap() {
        if stream["name"] == "EVENTS" {
            stream["checksum"] = json!("0".repeat(64));
        }
    }
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    let path = damaged.display().to_string();
    let (code, _, err) = restore(&target.url(), &[], &["restore", "--force", &path]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("does not match"), "{err}");
    assert!(err.contains("EVENTS: checksum differs"), "{err}");

    // A damaged snapshot file is found before anything is touched.
    std::fs::write(damaged.join("EVENTS.snapshot"), b"not a snapshot").unwrap();
    let (code, _, err) = restore(&target.url(), &[], &["restore", "--force", &path]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("damaged"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_under_load_restores_onto_a_fresh_cluster() {
    let backup = back_up_under_load().await;
    let cluster = NatsCluster::start();
    restore_and_check(&backup, &cluster.urls(), cluster.client().await, "3").await;
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}
