//! Tamper evidence end to end: command workers sign and chain events (with
//! a key rotation in between), someone with the server's disk changes,
//! removes and reorders stored messages while it is down, and `jetsource
//! verify` names each aggregate and event; untouched aggregates verify
//! clean, a worker refuses to decide on a broken history, and the chain
//! holds under concurrent load, group commit, transfers and snapshots on a
//! 3-node cluster.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jetsource_core::integrity::{link, ChainHash, Linked};
use jetsource_core::protocol::{decode_reply, CommandOutcome, ErrorBody, ErrorCode};
use jetsource_test_support::filestore::{replace_everywhere, StoredStream};
use jetsource_test_support::{NatsCluster, NatsServer};
use jetsource_tests::{cli_at, wait_for_service, Process};
use serde_json::{json, Value};

/// `jetsource keygen <id>` into `dir`.
fn keygen(dir: &Path, id: &str) {
    let (code, out, err) = cli_at(
        "nats://127.0.0.1:1",
        &[],
        &["keygen", id, "--dir", dir.to_str().unwrap()],
    );
    assert_eq!(code, 0, "keygen {id}: {out}{err}");
}

/// A command worker signing with `<keys>/<id>.key`.
fn signing_worker(url: &str, keys: &Path, id: &str) -> Process {
    let key = keys.join(format!("{id}.key"));
    Process::start_at(
        "jetsource-command",
        url,
        &[
            ("JETSOURCE__STORE__SIGNING_KEY", key.to_str().unwrap()),
            ("JETSOURCE__STORE__TRUSTED_KEYS", keys.to_str().unwrap()),
        ],
        None,
    )
}

/// Sends until the answer is definite; panics on an error.
async fn command(client: &async_nats::Client, id: &str, body: Value) -> CommandOutcome {
    try_command(client, id, body).await.unwrap()
}

async fn try_command(
    client: &async_nats::Client,
    id: &str,
    body: Value,
) -> Result<CommandOutcome, ErrorBody> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let request = client.request(format!("cmd.account.{id}"), body.to_string().into());
        // No reply (a node died with the request) or `unavailable`: the
        // same command id again.
        if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(10), request).await {
            match decode_reply::<CommandOutcome>(&reply.payload).unwrap() {
                Err(e) if e.code == ErrorCode::Unavailable => {}
                other => return other,
            }
        }
        assert!(Instant::now() < deadline, "{id} {body}: no definite answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn open(owner: &str) -> Value {
    json!({"type": "OpenAccount", "data": {"owner": owner, "initial_deposit": 100}, "command_id": "open"})
}

fn deposit(amount: u64, command_id: &str) -> Value {
    json!({"type": "Deposit", "data": {"amount": amount}, "command_id": command_id})
}

/// `jetsource verify <args> --json`: (exit code, report).
fn verify(url: &str, keys: &Path, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["--json", "verify", "--trusted-keys", keys.to_str().unwrap()];
    all.extend_from_slice(args);
    let (code, out, err) = cli_at(url, &[], &all);
    let report = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    (code, report)
}

/// The findings of a report, by aggregate: (sequence, version, problem).
fn findings(report: &Value) -> BTreeMap<String, (u64, u64, String)> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["aggregate"].as_str().unwrap().to_owned(),
                (
                    f["sequence"].as_u64().unwrap(),
                    f["version"].as_u64().unwrap(),
                    f["problem"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect()
}

/// Stream sequence of each event of `account.<id>`, by version (1-based
/// index 0 = version 1).
fn sequences(url: &str, id: &str) -> Vec<u64> {
    history(url, id)
        .iter()
        .map(|e| e["sequence"].as_u64().unwrap())
        .collect()
}

/// `jetsource history account <id> --json`.
fn history(url: &str, id: &str) -> Vec<Value> {
    let (code, out, err) = cli_at(url, &[], &["--json", "history", "account", id]);
    assert_eq!(code, 0, "history {id}: {err}");
    serde_json::from_str(&out).unwrap()
}

/// The chain hash `event` would have with body `data` after `previous`,
/// computed as anyone can from the published algorithm.
fn relink(event: &Value, previous: &Value, data: &[u8]) -> String {
    let text = |key: &str| event[key].as_str().map(str::to_owned);
    let previous = ChainHash::parse(previous["hash"].as_str().unwrap()).unwrap();
    let (id, event_id, event_type) = (text("aggregate_id"), text("event_id"), text("event_type"));
    let (command, correlation, causation) = (
        text("command_id"),
        text("correlation_id"),
        text("causation_id"),
    );
    link(
        Some(&previous),
        &Linked {
            aggregate_type: "account",
            aggregate_id: id.as_deref().unwrap(),
            aggregate_version: event["aggregate_version"].as_u64().unwrap(),
            event_id: event_id.as_deref().unwrap(),
            event_type: event_type.as_deref().unwrap(),
            schema_version: 1,
            command_id: command.as_deref(),
            command_aggregate: None,
            correlation_id: correlation.as_deref(),
            causation_id: causation.as_deref(),
            data_subject: None,
            sealed: None,
            data,
        },
    )
    .to_string()
}

/// A directory holding only the public keys `ids` of `keys`.
fn trusting(keys: &Path, ids: &[&str], into: &Path) -> PathBuf {
    std::fs::create_dir_all(into).unwrap();
    for id in ids {
        let name = format!("{id}.pub");
        std::fs::copy(keys.join(&name), into.join(&name)).unwrap();
    }
    into.to_owned()
}

#[tokio::test]
async fn tampering_behind_the_servers_back_is_named_at_its_aggregate_and_event() {
    let mut server = NatsServer::start();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    keygen(&keys, "2026-11");
    keygen(&keys, "2026-12");
    let client = server.client().await;

    // Written under the first key, then under the rotated one.
    let mut worker = signing_worker(&url, &keys, "2026-11");
    wait_for_service(&client, "jetsource-command", 1).await;
    let ids = ["t1", "t2", "t3", "t4", "t5", "t6"];
    for id in ids {
        command(&client, id, open(&format!("owner of {id}"))).await;
        command(&client, id, deposit(10, "d1")).await;
    }
    drop(worker);
    worker = signing_worker(&url, &keys, "2026-12");
    wait_for_service(&client, "jetsource-command", 1).await;
    for id in ids {
        command(&client, id, deposit(20, "d2")).await;
        command(&client, id, deposit(30, "d3")).await;
    }
    // A multi-aggregate command: one atomic batch over two chains.
    let transfer =
        json!({"type": "Transfer", "data": {"to": "t6", "amount": 5}, "command_id": "x1"});
    command(&client, "t5", transfer).await;

    // Per account: opened, initial deposit, d1, d2, d3; and the transfer.
    let (code, clean) = verify(&url, &keys, &["--all"]);
    assert_eq!(code, 0, "untouched history verifies: {clean}");
    assert_eq!(clean["events"], 6 * 5 + 2);
    assert_eq!(clean["signatures_checked"], 6 * 5 + 2);
    let (code, strict) = verify(&url, &keys, &["--all", "--require-signatures"]);
    assert_eq!(code, 0, "every event is signed: {strict}");
    // Rotation: the old key's events need the old public key.
    let only_new = trusting(&keys, &["2026-12"], &dir.path().join("new-only"));
    let (code, report) = verify(&url, &only_new, &["account", "t4"]);
    assert_eq!(code, 7, "{report}");
    assert_eq!(
        findings(&report)["account.t4"],
        (sequences(&url, "t4")[0], 1, "unknown-key".to_owned())
    );

    let seq: BTreeMap<&str, Vec<u64>> = ids.iter().map(|id| (*id, sequences(&url, id))).collect();
    let t4 = history(&url, "t4");
    drop(worker);
    server.kill();
    let stream = StoredStream::find(&server.store_dir(), "EVENTS");
    // t1: an amount changed (version 4).
    stream.alter(seq["t1"][3], |r| {
        let text = String::from_utf8(r.payload.clone()).unwrap();
        assert!(text.contains("20"), "{text}");
        r.payload = text.replace("20", "90").into_bytes();
    });
    // t2: version 3 removed.
    stream.remove(seq["t2"][2]);
    // t3: versions 3 and 4 swapped.
    stream.swap(seq["t3"][2], seq["t3"][3]);
    // t4: version 5 changed with its hash recomputed, as anyone can (the
    // chain alone proves nothing to someone who rewrites it): only the
    // signature, which needs the private key, gives it away.
    let forged = br#"{"amount":31}"#;
    let rehashed = relink(&t4[4], &t4[3], forged);
    stream.alter(seq["t4"][4], |r| {
        r.payload = forged.to_vec();
        r.set_header("Jetsource-Hash", &rehashed);
    });
    server.restart();
    let client = server.client().await;

    let (code, report) = verify(&url, &keys, &["--all"]);
    assert_eq!(code, 7, "{report}");
    let found = findings(&report);
    assert_eq!(
        found.keys().collect::<Vec<_>>(),
        ["account.t1", "account.t2", "account.t3", "account.t4"],
        "exactly the touched aggregates: {report}"
    );
    assert_eq!(found["account.t1"], (seq["t1"][3], 4, "altered".into()));
    assert_eq!(found["account.t2"], (seq["t2"][3], 4, "missing".into()));
    assert_eq!(found["account.t3"], (seq["t3"][2], 4, "reordered".into()));
    assert_eq!(
        found["account.t4"],
        (seq["t4"][4], 5, "bad-signature".into())
    );
    assert_eq!(report["missing_sequences"], json!([seq["t2"][2]]));
    // Without trusted keys the rehashed event passes: what signatures add.
    let none = trusting(&keys, &[], &dir.path().join("none"));
    let (_, unsigned) = verify(&url, &none, &["account", "t4"]);
    assert_eq!(findings(&unsigned).len(), 0, "{unsigned}");

    // One aggregate at a time: the same answers.
    let (code, report) = verify(&url, &keys, &["account", "t1"]);
    assert_eq!((code, findings(&report).len()), (7, 1), "{report}");
    for id in ["t5", "t6"] {
        let (code, report) = verify(&url, &keys, &["account", id]);
        assert_eq!(code, 0, "{id} untouched: {report}");
    }

    // Loading checks the chain: a worker that has not seen t1 before
    // refuses to decide on it, and the CLI refuses to show its state.
    let _worker = signing_worker(&url, &keys, "2026-12");
    wait_for_service(&client, "jetsource-command", 1).await;
    let refused = try_command(&client, "t1", deposit(1, "after"))
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::Tampered, "{}", refused.message);
    assert!(
        refused.message.contains("jetsource verify"),
        "{}",
        refused.message
    );
    let (code, _, err) = cli_at(&url, &[], &["state", "account", "t2"]);
    assert_eq!(code, 7, "{err}");
    // Untouched aggregates go on as before.
    command(&client, "t5", deposit(1, "after")).await;
}

#[tokio::test]
async fn the_chain_holds_under_concurrent_load_snapshots_and_a_tampered_cluster_is_caught() {
    let mut cluster = NatsCluster::start();
    let url = cluster.urls();
    let client = cluster.client().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    keygen(&keys, "k1");
    let env = [("JETSOURCE__STORE__REPLICAS", "3")];
    let workers: Vec<Process> = (0..2)
        .map(|_| {
            let key = keys.join("k1.key");
            Process::start_at(
                "jetsource-command",
                &url,
                &[
                    env[0],
                    ("JETSOURCE__STORE__SIGNING_KEY", key.to_str().unwrap()),
                ],
                None,
            )
        })
        .collect();
    let _snapshotter = Process::start_at(
        "jetsource-snapshotter",
        &url,
        &[env[0], ("JETSOURCE__SNAPSHOT__EVERY", "4")],
        None,
    );
    wait_for_service(&client, "jetsource-command", 2).await;
    const ACCOUNTS: usize = 8;
    for a in 0..ACCOUNTS {
        command(&client, &format!("c{a}"), open("o")).await;
    }
    // Clients racing on the same accounts: group commits, conflicts,
    // transfers (atomic batches over two chains).
    let done = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|c| {
            let client = client.clone();
            let done = done.clone();
            tokio::spawn(async move {
                for k in 0..12 {
                    let id = format!("c{}", (c + k) % ACCOUNTS);
                    let body = if k % 3 == 0 {
                        let to = format!("c{}", (c + k + 1) % ACCOUNTS);
                        json!({"type": "Transfer", "data": {"to": to, "amount": 1}, "command_id": format!("x{c}-{k}")})
                    } else {
                        deposit(1 + k as u64, &format!("d{c}-{k}"))
                    };
                    match try_command(&client, &id, body).await {
                        Ok(_) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => assert!(
                            matches!(e.code, ErrorCode::Rejected | ErrorCode::Conflict),
                            "{e:?}"
                        ),
                    }
                }
            })
        })
        .collect();
    // A node dies under the load and comes back.
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::Relaxed) < 40 {
        assert!(Instant::now() < deadline, "no progress before the fault");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.kill_node(1);
    for task in tasks {
        task.await.unwrap();
    }
    cluster.start_node(1);
    // New workers load from the snapshots and keep the chains going.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, out, err) = cli_at(&url, &env, &["--json", "snapshot", "status"]);
        assert_eq!(code, 0, "{err}");
        let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
        let taken = rows
            .iter()
            .find(|r| r["aggregate_type"] == "account")
            .map_or(0, |r| {
                r["snapshots"].as_u64().unwrap() - r["unusable"].as_u64().unwrap()
            });
        if taken == ACCOUNTS as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "snapshots: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(workers);
    let key = keys.join("k1.key");
    let _worker = Process::start_at(
        "jetsource-command",
        &url,
        &[
            env[0],
            ("JETSOURCE__STORE__SIGNING_KEY", key.to_str().unwrap()),
        ],
        None,
    );
    wait_for_service(&client, "jetsource-command", 1).await;
    for a in 0..ACCOUNTS {
        command(&client, &format!("c{a}"), deposit(7, "after-snapshot")).await;
    }
    let (code, clean) = verify(&url, &keys, &["--all"]);
    assert_eq!(code, 0, "{clean}");
    assert_eq!(clean["events"], clean["signatures_checked"], "{clean}");

    // Someone with every node's disk changes one event on all three, in
    // the stream and in its Raft log.
    let c3 = history(&url, "c3");
    let victim = c3
        .iter()
        .skip(2)
        .find(|e| e["event_type"] == "Deposited")
        .unwrap();
    let (target, version, event_id) = (
        victim["sequence"].as_u64().unwrap(),
        victim["aggregate_version"].as_u64().unwrap(),
        victim["event_id"].as_str().unwrap().to_owned(),
    );
    // `{"amount":N}`, byte for byte as stored.
    let body = victim["data"].to_string();
    let forged = body.replace(|c: char| c.is_ascii_digit(), "9");
    assert_ne!(body, forged);
    for i in 0..cluster.len() {
        cluster.kill_node(i);
    }
    for i in 0..cluster.len() {
        let changed = replace_everywhere(
            &cluster.store_dir(i),
            event_id.as_bytes(),
            body.as_bytes(),
            forged.as_bytes(),
        );
        assert!(changed >= 1, "node {i}: nothing changed");
    }
    for i in 0..cluster.len() {
        cluster.start_node(i);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let report = loop {
        let (code, report) = verify(&url, &keys, &["--all"]);
        if code == 7 || Instant::now() > deadline {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let found = findings(&report);
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        [(
            "account.c3".to_owned(),
            (target, version, "altered".to_owned())
        )],
        "{report}"
    );
    assert_eq!(report["missing_sequences"], json!([]));
}
