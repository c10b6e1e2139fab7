//! The shipped binaries as separate processes: `jetsource-command` copies
//! and the `jetsource` CLI against a real nats-server.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jetsource_core::protocol::{decode_reply, CommandOutcome, ErrorBody};
use jetsource_test_support::NatsServer;
use jetsource_tests::{cli, wait_for_service, Process};
use serde_json::{json, Value};

async fn stream_messages(client: &async_nats::Client) -> u64 {
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream("EVENTS").await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test]
async fn cli_against_two_worker_processes() {
    let server = NatsServer::start();
    let client = server.client().await;
    let _a = Process::start("jetsource-command", &server, &[]);
    let _b = Process::start("jetsource-command", &server, &[]);
    wait_for_service(&client, "jetsource-command", 2).await;

    let (code, out, err) = cli(
        &server,
        &[
            "send",
            "account",
            "acc-1",
            "OpenAccount",
            r#"{"owner":"ada"}"#,
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("version 1, sequence 1"), "{out}");
    assert!(out.contains("AccountOpened"), "{out}");
    for amount in [100, 50] {
        let data = format!(r#"{{"amount":{amount}}}"#);
        let (code, _, err) = cli(&server, &["send", "account", "acc-1", "Deposit", &data]);
        assert_eq!(code, 0, "{err}");
    }
    let (code, out, _) = cli(
        &server,
        &[
            "--json",
            "send",
            "account",
            "acc-1",
            "Withdraw",
            r#"{"amount":30}"#,
            "--command-id",
            "w1",
        ],
    );
    assert_eq!(code, 0);
    let reply: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply["sequence"], 4);
    // Resent through the CLI: same answer, marked as a duplicate, nothing
    // appended.
    let (_, again, _) = cli(
        &server,
        &[
            "--json",
            "send",
            "account",
            "acc-1",
            "Withdraw",
            r#"{"amount":30}"#,
            "--command-id",
            "w1",
        ],
    );
    let mut again: Value = serde_json::from_str(&again).unwrap();
    assert_eq!(again["duplicate"], true, "{again}");
    again.as_object_mut().unwrap().remove("duplicate");
    assert_eq!(again, reply);

    // Refusals: non-zero exit and one line naming the code.
    let (code, out, err) = cli(
        &server,
        &["send", "account", "acc-1", "Withdraw", r#"{"amount":1000}"#],
    );
    assert_ne!(code, 0);
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: rejected: insufficient funds"),
        "{err}"
    );
    let (code, _, err) = cli(
        &server,
        &["send", "account", "acc-1", "Deposit", "{not json"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("not valid JSON"), "{err}");

    // The audit trail.
    let (code, out, _) = cli(&server, &["history", "account", "acc-1"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "header and 4 events:\n{out}");
    assert!(lines[0].starts_with("SEQ"));
    assert!(
        lines[4].contains("Withdrawn") && lines[4].contains("w1"),
        "{out}"
    );
    let (_, out, _) = cli(&server, &["--json", "history", "account", "acc-1"]);
    let events: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(events.len(), 4);
    assert_eq!(events[1]["data"], json!({"amount": 100}));
    assert_eq!(events[3]["command_id"], "w1");
    let at_time = events[1]["timestamp"].as_str().unwrap().to_owned();

    // Temporal state.
    let (_, out, _) = cli(&server, &["--json", "state", "account", "acc-1"]);
    let now: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(now["state"]["balance"], 120);
    assert_eq!(now["version"], 4);
    let (_, out, _) = cli(
        &server,
        &["--json", "state", "account", "acc-1", "--at-seq", "2"],
    );
    let then: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (then["state"]["balance"].clone(), then["version"].clone()),
        (json!(100), json!(2))
    );
    let (_, out, _) = cli(
        &server,
        &["--json", "state", "account", "acc-1", "--at-time", &at_time],
    );
    let then: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(then["state"]["balance"], 100);
    let (code, _, err) = cli(
        &server,
        &["state", "account", "acc-1", "--at-time", "yesterday"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("RFC 3339"), "{err}");
    let (code, _, err) = cli(&server, &["state", "account", "nobody"]);
    assert_ne!(code, 0);
    assert!(err.contains("has no events"), "{err}");

    let (code, out, _) = cli(&server, &["--json", "stream"]);
    assert_eq!(code, 0);
    let info: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["messages"], 4);
    assert_eq!(info["deny_delete"], true);
    assert_eq!(info["deny_purge"], true);
    assert_eq!(info["allow_atomic"], true);
}

#[tokio::test]
async fn sigterm_finishes_requests_in_flight_and_exits_zero() {
    let server = NatsServer::start();
    let client = server.client().await;
    let worker = Process::start("jetsource-command", &server, &[]);
    wait_for_service(&client, "jetsource-command", 1).await;
    let open = client
        .request(
            "cmd.account.a1",
            r#"{"type":"OpenAccount","data":{"owner":"o"}}"#.into(),
        )
        .await
        .unwrap();
    assert!(decode_reply::<CommandOutcome>(&open.payload)
        .unwrap()
        .is_ok());

    // Many deposits in flight, then SIGTERM once the worker is busy with them.
    let answered = Arc::new(AtomicUsize::new(0));
    let mut requests = Vec::new();
    for i in 0..2000 {
        let client = client.clone();
        let answered = answered.clone();
        requests.push(tokio::spawn(async move {
            let body =
                json!({"type": "Deposit", "data": {"amount": 1}, "command_id": format!("d{i}")});
            let request = client.request("cmd.account.a1", body.to_string().into());
            let result = tokio::time::timeout(Duration::from_secs(10), request).await;
            answered.fetch_add(1, Ordering::SeqCst);
            result
        }));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while answered.load(Ordering::SeqCst) < 50 {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker answers nothing"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    worker.signal("TERM");
    let mut ok = 0;
    let mut refused = 0;
    for request in requests {
        match request.await.unwrap() {
            Ok(Ok(reply)) => match decode_reply::<CommandOutcome>(&reply.payload).unwrap() {
                Ok(_) => ok += 1,
                Err(ErrorBody { .. }) => refused += 1,
            },
            // Sent after the worker unsubscribed: nobody took it.
            Ok(Err(e)) => assert_eq!(
                e.kind(),
                async_nats::client::RequestErrorKind::NoResponders,
                "a request was taken and never answered: {e}"
            ),
            Err(_) => panic!("a request timed out: taken and dropped during shutdown"),
        }
    }
    println!("{ok} deposits answered, {refused} refused during shutdown");
    assert_eq!(refused, 0, "deposits on an open account are never refused");
    assert!(ok >= 50);
    // Every event in the stream was answered; nothing was appended silently.
    assert_eq!(stream_messages(&client).await, 1 + ok);
}

#[tokio::test]
async fn json_logs_and_service_stats() {
    let server = NatsServer::start();
    let client = server.client().await;
    let dir = std::env::temp_dir().join(format!("jetsource-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("worker.log");
    let worker = Process::start_with_log(
        "jetsource-command",
        &server,
        &[("JETSOURCE__LOG__FORMAT", "json"), ("RUST_LOG", "debug")],
        Some(&log),
    );
    wait_for_service(&client, "jetsource-command", 1).await;
    let body = json!({"type": "OpenAccount", "data": {"owner": "o"}, "command_id": "open-7"});
    client
        .request("cmd.account.a7", body.to_string().into())
        .await
        .unwrap();
    client
        .request(
            "cmd.account.a7",
            r#"{"type":"Withdraw","data":{"amount":5}}"#.into(),
        )
        .await
        .unwrap();

    // $SRV.STATS counts requests; a business refusal is not an error.
    let stats = client
        .request("$SRV.STATS.jetsource-command", "".into())
        .await
        .unwrap();
    let stats: Value = serde_json::from_slice(&stats.payload).unwrap();
    assert_eq!(stats["type"], "io.nats.micro.v1.stats_response");
    let endpoint = &stats["endpoints"][0];
    assert_eq!(endpoint["name"], "commands");
    assert_eq!(endpoint["subject"], "cmd.>");
    assert_eq!(endpoint["queue_group"], "jetsource-command");
    assert_eq!(endpoint["num_requests"], 2);
    assert_eq!(endpoint["num_errors"], 0);
    assert_eq!(endpoint["last_error"], "");
    assert_eq!(endpoint["data"]["num_rejections"], 1, "{endpoint}");
    assert!(endpoint["data"]["last_rejection"]
        .as_str()
        .unwrap()
        .starts_with("rejected:"));

    worker.signal("TERM");
    let mut worker = worker;
    let status = tokio::task::spawn_blocking(move || worker.wait(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    let accepted = lines
        .iter()
        .find(|l| l["fields"]["message"] == "accepted")
        .unwrap_or_else(|| panic!("no 'accepted' line in {text}"));
    assert_eq!(accepted["span"]["aggregate"], "account.a7");
    assert_eq!(accepted["span"]["command"], "OpenAccount");
    assert_eq!(accepted["span"]["command_id"], "open-7");
    assert_eq!(accepted["span"]["sequence"], 1);
}
