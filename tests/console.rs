//! The gateway's web console (`/console`, docs/GATEWAY.md) in a real
//! headless Chromium against the real fleet: the page finds an aggregate,
//! lists its history, shows its state at a chosen event (the temporal
//! query), and the projections' checkpoints and the stream, for the bank
//! application without knowing anything about it.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use jetsource_test_support::requests::query;
use jetsource_test_support::{free_port, NatsServer, RedisServer};
use jetsource_tests::{wait_for_service, Process};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Chromium, which `make setup` installs (Debian package `chromium`).
fn chromium() -> String {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .unwrap();
        if found.status.success() {
            return String::from_utf8_lossy(&found.stdout).trim().to_owned();
        }
    }
    panic!("chromium not found: run `make setup` (installs it with apt)");
}

/// The DOM of `url` once its scripts ran (and their requests answered).
fn rendered(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let output = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=15000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_history_state_at_a_point_projections_and_stream() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let client = nats.client().await;
    let redis_url = redis.url();
    let redis_env = [("JETSOURCE__REDIS__URL", redis_url.as_str())];
    let _command = Process::start("jetsource-command", &nats, &[]);
    let _projector = Process::start("jetsource-projector", &nats, &redis_env);
    let addr = format!("127.0.0.1:{}", free_port());
    let key = "console-test-key-0123";
    let hash: String = Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let admin_key = "console-admin-key-0123";
    let admin_hash: String = Sha256::digest(admin_key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let keys = format!("read={hash},admin={admin_hash}");
    let _gateway = Process::start(
        "jetsource-gateway",
        &nats,
        &[
            ("JETSOURCE__GATEWAY__LISTEN", addr.as_str()),
            ("JETSOURCE__GATEWAY__API_KEYS", keys.as_str()),
            ("JETSOURCE__REDIS__URL", redis_url.as_str()),
        ],
    );
    wait_for_service(&client, "jetsource-command", 1).await;
    wait_for_service(&client, "jetsource-projector", 1).await;
    for body in [
        json!({"type": "OpenAccount", "data": {"owner": "grace"}}),
        json!({"type": "Deposit", "data": {"amount": 70}}),
        json!({"type": "Deposit", "data": {"amount": 5}}),
    ] {
        let reply = client
            .request("cmd.account.c-1", body.to_string().into())
            .await
            .unwrap();
        let _: jetsource_core::protocol::CommandOutcome =
            jetsource_core::protocol::decode_reply(&reply.payload)
                .unwrap()
                .unwrap();
    }
    // An event the accounts read model refuses: a dead letter.
    let store = jetsource_tests::open_store(&client, &nats.url()).await;
    let poisoned =
        jetsource_tests::append_behind(&store, "c-bad", (0, 0), "Deposited", br#"{"amount":0}"#)
            .await;
    let last = poisoned.last_sequence;
    query(
        &client,
        "query.account.c-1",
        json!({"min_sequence": last, "timeout_ms": 10_000}),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "the gateway does not listen");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The state after the second event: 70, not yet 75.
    let url = format!("http://{addr}/console#key={key}&type=account&id=c-1&at=2");
    let dom = tokio::task::spawn_blocking(move || rendered(&url))
        .await
        .unwrap();
    for expected in ["AccountOpened", "Deposited", "grace", "2 of 3"] {
        assert!(
            dom.contains(expected),
            "{expected:?} not in the page:\n{dom}"
        );
    }
    let state = dom
        .split("id=\"state\"")
        .nth(1)
        .and_then(|s| s.split("</pre>").next())
        .unwrap_or_else(|| panic!("no state shown:\n{dom}"));
    assert!(state.contains("data-version=\"2\""), "{state}");
    assert!(state.contains("\"balance\": 70"), "{state}");
    // The projections with their checkpoint, and the stream.
    let projections = dom.split("id=\"projections\"").nth(1).unwrap();
    assert!(projections.contains("<td>accounts</td>"), "{projections}");
    assert!(
        projections.contains(&format!("<td>{last}</td>")),
        "{projections}"
    );
    let stream = dom.split("id=\"stream\"").nth(1).unwrap();
    assert!(stream.contains("<td>EVENTS</td>"), "{stream}");
    // The dead letter, its reason, and a replay button.
    let letters = dom.split("id=\"dead-letters\"").nth(1).unwrap();
    let letters = letters.split("</tbody>").next().unwrap();
    assert!(letters.contains("is outside"), "{letters}");
    assert!(
        letters.contains(&format!("events.account.c-bad #{last}")),
        "{letters}"
    );
    assert!(letters.contains("Replay</button>"), "{letters}");

    // Replaying needs an admin key; this one still fails, and is kept.
    let sequence = letters
        .split("<td>")
        .nth(1)
        .and_then(|s| s.split("</td>").next())
        .unwrap()
        .to_owned();
    let replay = |key: &str| {
        let path = format!("/v1/dead-letters/{sequence}/replay");
        let mut socket = std::net::TcpStream::connect(&addr).unwrap();
        use std::io::{Read, Write};
        write!(socket, "POST {path} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: 0\r\n\r\n").unwrap();
        let mut response = String::new();
        socket.read_to_string(&mut response).unwrap();
        response
    };
    assert!(replay(key).contains(" 403 "), "a read key replayed");
    let kept = replay(admin_key);
    assert!(
        kept.contains(" 200 ") && kept.contains("\"result\":\"kept\""),
        "{kept}"
    );

    // Without a key the page says so and shows nothing.
    let url = format!("http://{addr}/console");
    let dom = tokio::task::spawn_blocking(move || rendered(&url))
        .await
        .unwrap();
    assert!(dom.contains("unauthorized"), "{dom}");
    assert!(!dom.contains("AccountOpened"));
}
