//! The `jetsource` CLI as a new user meets it: the bank's binary against
//! real nats-server and redis-server processes (and, for upcasting, the CLI
//! library run in-process with an application of the test's own). Exit
//! codes, error messages said once and by what they mean, `--json` as one
//! document, timeouts that are the caller's, generic queries, completions.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use jetsource_aggregate::{Aggregate, DomainError, Registry, Upcaster};
use jetsource_core::config::Config;
use jetsource_test_support::{free_port, workspace_binary, NatsServer, RedisServer};
use jetsource_tests::{cli_at, wait_for_service, Process};
use serde_json::{json, Value};

/// The documented exit codes (`jetsource --help`, docs/PROTOCOL.md).
const USAGE: i32 = 2;
const REJECTED: i32 = 3;
const CONFLICT: i32 = 4;
const NOT_FOUND: i32 = 5;
const UNAVAILABLE: i32 = 6;

/// NATS, Redis and the bank's workers, each a process of its own.
struct Bank {
    nats: NatsServer,
    redis: RedisServer,
    client: async_nats::Client,
    _workers: Vec<Process>,
}

impl Bank {
    /// NATS and Redis, plus a command worker and a projector if `workers`.
    async fn start(workers: bool) -> Self {
        let nats = NatsServer::start();
        let redis = RedisServer::start();
        let client = nats.client().await;
        let mut bank = Self {
            nats,
            redis,
            client,
            _workers: Vec::new(),
        };
        if workers {
            let env = [("JETSOURCE__REDIS__URL", bank.redis.url())];
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            bank._workers = vec![
                Process::start("jetsource-command", &bank.nats, &[]),
                Process::start("jetsource-projector", &bank.nats, &env),
            ];
            wait_for_service(&bank.client, "jetsource-command", 1).await;
            wait_for_service(&bank.client, "jetsource-projector", 1).await;
        }
        bank
    }

    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        self.cli_env(&[], args)
    }

    fn cli_env(&self, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
        let redis = self.redis.url();
        let mut all = vec![("JETSOURCE__REDIS__URL", redis.as_str())];
        all.extend_from_slice(env);
        cli_at(&self.nats.url(), &all, args)
    }

    /// The CLI on a thread of its own, while the test's runtime serves.
    async fn cli_async(&self, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
        let url = self.nats.url();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cli_at(&url, &env, &args)
        })
        .await
        .unwrap()
    }

    /// Sends through the CLI, expecting success; returns the JSON reply.
    fn send(&self, id: &str, command: &str, data: &str) -> Value {
        let (code, out, err) = self.cli(&["--json", "send", "account", id, command, data]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    }
}

/// A NATS URL where nothing listens.
fn nowhere() -> String {
    format!("nats://127.0.0.1:{}", free_port())
}

/// The JSON error document of `--json` mode.
fn json_error(out: &str) -> (String, String) {
    let value: Value = serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(value["ok"], false, "{out}");
    let code = value["error"]["code"].as_str().unwrap().to_owned();
    (code, value["error"]["message"].as_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_waits_as_long_as_timeout_ms_says() {
    let bank = Bank::start(false).await;
    // A worker that answers after 1 s, and one that never answers.
    let mut slow = bank.client.subscribe("cmd.account.slow").await.unwrap();
    let client = bank.client.clone();
    tokio::spawn(async move {
        while let Some(request) = slow.next().await {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let reply = r#"{"ok":true,"version":7,"sequence":9,"events":[]}"#;
            let _ = client.publish(request.reply.unwrap(), reply.into()).await;
        }
    });
    let _mute = bank.client.subscribe("cmd.account.mute").await.unwrap();
    bank.client.flush().await.unwrap();

    // The client's own request timeout (200 ms here) no longer cuts it.
    let short_default = [("JETSOURCE__NATS__REQUEST_TIMEOUT_MS", "200")];
    let (code, out, err) = bank
        .cli_async(
            &short_default,
            &[
                "send",
                "account",
                "slow",
                "Deposit",
                r#"{"amount":1}"#,
                "--timeout-ms",
                "10000",
            ],
        )
        .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("version 7, sequence 9"), "{out}");

    let began = Instant::now();
    let (code, _, err) = bank
        .cli_async(
            &[],
            &[
                "send",
                "account",
                "mute",
                "CloseAccount",
                "--timeout-ms",
                "300",
            ],
        )
        .await;
    assert_eq!(code, UNAVAILABLE, "{err}");
    assert!(
        began.elapsed() < Duration::from_secs(4),
        "{:?}",
        began.elapsed()
    );
    assert!(
        err.contains("no reply on cmd.account.mute within 300 ms"),
        "{err}"
    );
    assert!(err.contains("same --command-id"), "{err}");
    assert!(!err.contains("running?"), "somebody is subscribed: {err}");
}

#[tokio::test]
async fn query_timeout_is_the_projectors_answer() {
    let bank = Bank::start(true).await;
    let began = Instant::now();
    let args = [
        "query",
        "account",
        "acc-1",
        "--min-sequence",
        "1000000",
        "--timeout-ms",
        "300",
    ];
    let (code, out, err) = bank.cli(&args);
    assert_eq!(code, UNAVAILABLE, "{out}{err}");
    // Before: the CLI gave up at 5 s, as long as the projector waits by
    // default, and blamed a projector that was running.
    assert!(
        began.elapsed() < Duration::from_secs(4),
        "{:?}",
        began.elapsed()
    );
    assert!(
        err.starts_with("error: timeout: read model accounts"),
        "{err}"
    );
    assert!(err.contains("not yet 1000000, after 300 ms"), "{err}");
    assert!(!err.contains("running?"), "{err}");

    let (code, out, _) = bank.cli(&[&["--json"], &args[..]].concat());
    assert_eq!(code, UNAVAILABLE);
    assert_eq!(json_error(&out).0, "timeout");
}

#[test]
fn typos_are_told_locally_not_as_missing_workers() {
    // Nothing listens at the URL: each of these is refused before any
    // connection is tried.
    let url = nowhere();
    let cases: &[(&[&str], &str)] = &[
        (
            &["send", "account", "acc 3", "Deposit", "{}"],
            "aggregate id \"acc 3\" is not valid",
        ),
        (
            &["send", "account", "", "Deposit", "{}"],
            "aggregate id \"\" is not valid",
        ),
        (
            &["send", "acount", "a1", "Deposit", "{}"],
            "unknown aggregate type \"acount\"; known types: account, user",
        ),
        (
            &["send", "loyalty", "a1", "Deposit", "{}"],
            "loyalty is a process: its instances take no commands",
        ),
        (
            &[
                "send",
                "account",
                "a1",
                "Deposit",
                "{}",
                "--command-id",
                "a b",
            ],
            "--command-id must be",
        ),
        (
            &["send", "account", "a1", "Deposit", "{not json"],
            "is not valid JSON",
        ),
        (
            &["send", "account", "a1", "Deposit", "[1]"],
            "must be a JSON object",
        ),
        (
            &["history", "account", "a.b"],
            "aggregate id \"a.b\" is not valid",
        ),
        (&["state", "acount", "a1"], "unknown aggregate type"),
        (
            &["query", "acount", "a1"],
            "unknown query \"acount\"; known: account <id>, accounts.top",
        ),
        (&["query", "account"], "query account needs its id"),
        (&["query", "accounts.top", "x"], "takes no key"),
        (
            &["query", "accounts.top", "--param", "limit=ten"],
            "limit must be an integer",
        ),
        (
            &["query", "accounts.top", "--limit", "ten"],
            "limit must be an integer",
        ),
        (
            &["query", "accounts.top", "--param", "offset=1"],
            "has no parameter \"offset\"",
        ),
        (
            &["query", "accounts.top", "--param", "limit"],
            "expected NAME=VALUE",
        ),
    ];
    for (args, expected) in cases {
        let began = Instant::now();
        let (code, out, err) = cli_at(&url, &[], args);
        assert_eq!(code, USAGE, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!err.contains("running?"), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            began.elapsed() < Duration::from_secs(3),
            "{args:?} tried to connect"
        );
    }
}

#[tokio::test]
async fn nobody_subscribed_is_said_as_such() {
    let bank = Bank::start(false).await;
    let (code, _, err) = bank.cli(&["send", "account", "a1", "Deposit", r#"{"amount":1}"#]);
    assert_eq!(code, UNAVAILABLE, "{err}");
    assert!(
        err.contains("no command worker is subscribed to cmd.account.a1")
            && err.contains("is jetsource-command running?"),
        "{err}"
    );
    let (code, _, err) = bank.cli(&["query", "account", "a1"]);
    assert_eq!(code, UNAVAILABLE, "{err}");
    assert!(
        err.contains("no projector is subscribed to query.account.a1")
            && err.contains("is jetsource-projector running?"),
        "{err}"
    );
}

#[test]
fn a_bad_nats_url_fails_at_once_and_is_said_once() {
    let began = Instant::now();
    let output = Command::new(workspace_binary("jetsource"))
        .args(["stream"])
        .env("JETSOURCE__NATS__URL", "garbage")
        .env_remove("NATS_URL")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(USAGE), "{err}");
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(err.matches("JETSOURCE__NATS__URL").count(), 1, "{err}");
    assert_eq!(err.matches("garbage").count(), 1, "{err}");
    assert!(
        !err.contains("reachable") && !err.contains("running?"),
        "{err}"
    );

    let began = Instant::now();
    let (code, _, err) = cli_at("garbage", &[], &["stream"]);
    assert_eq!(code, USAGE, "{err}");
    assert!(began.elapsed() < Duration::from_secs(3));
    assert!(
        err.starts_with("error: --url: \"garbage\" is not a NATS server URL"),
        "{err}"
    );
    assert_eq!(err.matches("garbage").count(), 1, "{err}");
}

#[tokio::test]
async fn causes_are_printed_once() {
    let (code, _, err) = cli_at(
        &nowhere(),
        &[],
        &["--config", "/nonexistent.toml", "stream"],
    );
    assert_eq!(code, USAGE, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(err.matches("/nonexistent.toml").count(), 1, "{err}");
    assert_eq!(err.matches("not found").count(), 1, "{err}");

    let bank = Bank::start(false).await;
    let refused = format!("redis://127.0.0.1:{}", free_port());
    let env = [("JETSOURCE__REDIS__URL", refused.as_str())];
    let (code, _, err) = bank.cli_env(&env, &["projection", "status"]);
    assert_eq!(code, UNAVAILABLE, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(err.matches("Connection refused").count(), 1, "{err}");
    assert!(err.contains(&refused), "{err}");
}

#[tokio::test]
async fn exit_codes_by_class() {
    let bank = Bank::start(true).await;
    let opened = bank.send(
        "acc-1",
        "OpenAccount",
        r#"{"owner":"ada","initial_deposit":10}"#,
    );

    let (code, _, err) = bank.cli(&["send", "account", "acc-1", "Withdraw", r#"{"amount":50}"#]);
    assert_eq!(code, REJECTED, "{err}");
    assert!(
        err.starts_with("error: rejected: insufficient funds"),
        "{err}"
    );

    let (code, _, err) = bank.cli(&[
        "send",
        "account",
        "acc-1",
        "Deposit",
        r#"{"amount":5}"#,
        "--expected-version",
        "1",
    ]);
    assert_eq!(code, CONFLICT, "{err}");
    assert!(err.starts_with("error: conflict:"), "{err}");

    let seen = opened["sequence"].to_string();
    let (code, _, err) = bank.cli(&["query", "account", "nobody", "--min-sequence", &seen]);
    assert_eq!(code, NOT_FOUND, "{err}");
    assert!(err.starts_with("error: not_found:"), "{err}");
    let (code, _, err) = bank.cli(&["history", "account", "nobody"]);
    assert_eq!(code, NOT_FOUND, "{err}");
    let (code, _, err) = bank.cli(&["state", "account", "nobody"]);
    assert_eq!(code, NOT_FOUND, "{err}");
    assert!(err.contains("has no events"), "{err}");

    let (code, _, err) = bank.cli(&["send", "account", "acc-1", "Deposit", "{not json"]);
    assert_eq!(code, USAGE, "{err}");
    // Refused by the worker: the same class.
    let (code, _, err) = bank.cli(&["send", "account", "acc-1", "Deposit", r#"{"amount":0}"#]);
    assert_eq!(code, USAGE, "{err}");
    assert!(err.starts_with("error: invalid:"), "{err}");

    let (code, _, err) = cli_at(&nowhere(), &[], &["stream"]);
    assert_eq!(code, UNAVAILABLE, "{err}");
    assert!(err.contains("not reachable"), "{err}");
}

#[tokio::test]
async fn json_mode_prints_one_document_also_for_errors() {
    let bank = Bank::start(true).await;
    bank.send("acc-1", "OpenAccount", r#"{"owner":"ada"}"#);

    // A missing aggregate is not found in both modes.
    let (code, out, err) = bank.cli(&["history", "account", "nobody"]);
    assert_eq!((code, out.as_str()), (NOT_FOUND, ""), "{err}");
    assert!(err.contains("account nobody has no events"), "{err}");
    let (code, out, err) = bank.cli(&["--json", "history", "account", "nobody"]);
    assert_eq!(code, NOT_FOUND);
    assert!(err.is_empty(), "{err}");
    assert_eq!(json_error(&out).0, "not_found");

    // The server's error as it sent it.
    let (code, out, _) = bank.cli(&[
        "--json",
        "send",
        "account",
        "acc-1",
        "Withdraw",
        r#"{"amount":5}"#,
    ]);
    assert_eq!(code, REJECTED);
    let (code_text, message) = json_error(&out);
    assert_eq!(code_text, "rejected");
    assert!(message.starts_with("insufficient funds"), "{message}");

    // Usage errors too.
    let (code, out, _) = bank.cli(&["--json", "send", "account"]);
    assert_eq!(code, USAGE);
    assert_eq!(json_error(&out).0, "invalid");
    let (code, out, _) = bank.cli(&["--json", "send", "account", "a 1", "Deposit"]);
    assert_eq!(code, USAGE);
    assert_eq!(json_error(&out).0, "invalid");

    // State: the snapshot is JSON, not a Rust debug string.
    let (code, out, err) = bank.cli(&["--json", "state", "account", "acc-1"]);
    assert_eq!(code, 0, "{err}");
    let state: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(state["snapshot"], Value::Null);
    assert_eq!(state["state"]["owner"], "ada");

    // Rebuilds: one document, no progress lines.
    let (code, out, err) = bank.cli(&["--json", "snapshot", "rebuild"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "{err}");
    let rebuilt: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rebuilt["snapshots"], 1);
    let (code, out, err) = bank.cli(&["--json", "state", "account", "acc-1"]);
    assert_eq!(code, 0, "{err}");
    let state: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(state["snapshot"], json!({"version": 1}));
    let (code, out, err) = bank.cli(&["--json", "projection", "rebuild", "accounts"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "{err}");
    let rebuilt: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rebuilt["events"], 1);
}

#[tokio::test]
async fn a_resend_answered_from_history_says_so() {
    let bank = Bank::start(true).await;
    bank.send("acc-1", "OpenAccount", r#"{"owner":"ada"}"#);
    let deposit = [
        "send",
        "account",
        "acc-1",
        "Deposit",
        r#"{"amount":5}"#,
        "--command-id",
        "dep-1",
    ];
    let (code, out, err) = bank.cli(&deposit);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("ok: account acc-1 now at version 2"),
        "{out}"
    );
    assert!(!out.contains("already applied"), "{out}");
    let (code, out, err) = bank.cli(&deposit);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(
            "already applied: this command id was handled before; nothing new appended"
        ),
        "{out}"
    );
    assert!(out.contains("version 2, sequence 2"), "{out}");
    let (_, out, _) = bank.cli(&["--json", "history", "account", "acc-1"]);
    assert_eq!(serde_json::from_str::<Vec<Value>>(&out).unwrap().len(), 2);
}

#[tokio::test]
async fn query_is_generic_over_the_declared_queries() {
    let bank = Bank::start(true).await;
    bank.send("a", "OpenAccount", r#"{"owner":"a","initial_deposit":10}"#);
    let last = bank.send("b", "OpenAccount", r#"{"owner":"b","initial_deposit":20}"#);
    let seen = last["sequence"].to_string();

    let (code, out, err) = bank.cli(&["query", "--list"]);
    assert_eq!(code, 0, "{err}");
    for expected in [
        "query.account.<id>",
        "query.accounts.top",
        "query.user.<id>",
        "limit (integer, default 10)",
    ] {
        assert!(out.contains(expected), "{expected}: {out}");
    }
    let (_, out, _) = bank.cli(&["--json", "query", "--list"]);
    let list: Vec<Value> = serde_json::from_str(&out).unwrap();
    let account = list.iter().find(|q| q["name"] == "account").unwrap();
    assert_eq!(account["key"], "id");
    assert_eq!(account["projection"], "accounts");

    // Integers go as JSON numbers (the projector refuses "1").
    for limit in [&["--param", "limit=1"][..], &["--limit", "1"][..]] {
        let args = [
            &["--json", "query", "accounts.top", "--min-sequence", &seen][..],
            limit,
        ]
        .concat();
        let (code, out, err) = bank.cli(&args);
        assert_eq!(code, 0, "{args:?}: {err}");
        let reply: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            reply["data"],
            json!([{"id": "b", "balance": 20}]),
            "{args:?}"
        );
    }
    let (code, out, err) = bank.cli(&["query", "account", "a", "--min-sequence", &seen]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"balance\": 10"), "{out}");
}

#[test]
fn completions_for_bash_name_the_subcommands() {
    let (code, out, err) = cli_at(&nowhere(), &[], &["completions", "bash"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("jetsource"), "{out}");
    for subcommand in ["send", "query", "history", "completions"] {
        assert!(out.contains(subcommand), "{subcommand}");
    }
    let (code, out, _) = cli_at(&nowhere(), &[], &["--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("Exit codes:") && out.contains("6  unavailable"),
        "{out}"
    );
}

/// An aggregate whose `Named` event was `{"nm"}` at schema 1 and is
/// `{"name"}` since 2; its state is its last event's data.
struct Gadget;

fn nm_to_name(data: Value) -> Result<Value, String> {
    Ok(json!({"name": data["nm"]}))
}

impl Aggregate for Gadget {
    const TYPE: &'static str = "gadget";
    const EVENT_SCHEMA_VERSION: u32 = 2;
    const UPCASTERS: &'static [Upcaster] = &[Upcaster::new("Named", 1, nm_to_name)];
    type State = Value;
    type Command = Value;
    type Event = Value;

    fn handle(_: &Value, _: Value) -> Result<Vec<Value>, DomainError> {
        Ok(Vec::new())
    }

    fn apply(_: Value, event: &Value) -> Value {
        event["data"].clone()
    }
}

/// Appends `Named` with `data` as stored under `schema`.
async fn append_named(js: &async_nats::jetstream::Context, version: u64, schema: u32, data: Value) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Jetsource-Event-Id", format!("e{version}").as_str());
    headers.insert("Jetsource-Event-Type", "Named");
    headers.insert("Jetsource-Schema-Version", schema.to_string().as_str());
    headers.insert("Jetsource-Aggregate-Version", version.to_string().as_str());
    js.publish_with_headers("events.gadget.g1", headers, data.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// The CLI library with the gadget application, in-process.
fn gadget_cli(url: &str, args: &[&str]) -> (u8, String, String) {
    let args: Vec<String> = ["gadget-cli", "--url", url]
        .iter()
        .chain(args)
        .map(|a| (*a).to_owned())
        .collect();
    // Its own thread: the CLI runs its own runtime.
    std::thread::spawn(move || {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let registry = Registry::new().register::<Gadget>();
        let code = jetsource_cli::run(
            "gadget-cli",
            registry,
            |_: &Config| Vec::new(),
            args,
            &mut out,
            &mut err,
        );
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    })
    .join()
    .unwrap()
}

#[tokio::test]
async fn history_and_state_show_events_in_the_current_schema() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let store = jetsource_tests::open_store(&client, &nats.url()).await;
    append_named(store.jetstream(), 1, 1, json!({"nm": "old"})).await;
    append_named(store.jetstream(), 2, 2, json!({"name": "new"})).await;

    let url = nats.url();
    let (code, out, err) = gadget_cli(&url, &["--json", "history", "gadget", "g1"]);
    assert_eq!(code, 0, "{err}");
    let events: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        events[0]["data"],
        json!({"name": "old"}),
        "upcast from schema 1"
    );
    assert_eq!(
        (
            events[0]["schema_version"].clone(),
            events[0]["data_schema_version"].clone()
        ),
        (json!(1), json!(2))
    );
    assert_eq!(events[1]["data"], json!({"name": "new"}));

    let (code, out, err) = gadget_cli(&url, &["history", "gadget", "g1"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[1].contains("1->2") && lines[1].contains(r#"{"name":"old"}"#),
        "{out}"
    );
    assert!(!out.contains("\"nm\""), "{out}");

    let (code, out, err) = gadget_cli(&url, &["--json", "state", "gadget", "g1", "--at-seq", "1"]);
    assert_eq!(code, 0, "{err}");
    let state: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(state["state"], json!({"name": "old"}));
}

/// A command over two aggregates shows both sides, and `min_sequence` with
/// its sequence reads the side it was not sent to.
#[tokio::test]
async fn a_transfer_is_shown_and_readable_on_both_sides() {
    let bank = Bank::start(true).await;
    bank.send(
        "acc-1",
        "OpenAccount",
        r#"{"owner":"ada","initial_deposit":10}"#,
    );
    bank.send("acc-2", "OpenAccount", r#"{"owner":"bob"}"#);
    let (code, out, err) = bank.cli(&[
        "send",
        "account",
        "acc-1",
        "Transfer",
        r#"{"to":"acc-2","amount":4}"#,
    ]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().collect();
    assert!(
        rows[0].starts_with("ok: account acc-1 now at version 3"),
        "{out}"
    );
    let sent = rows
        .iter()
        .find(|r| r.contains("TransferSent"))
        .expect(&out);
    assert!(
        sent.contains("account.acc-1") && sent.contains(r#""to":"acc-2""#),
        "{out}"
    );
    let received = rows
        .iter()
        .find(|r| r.contains("TransferReceived"))
        .expect(&out);
    assert!(
        received.contains("account.acc-2") && received.contains(r#""from":"acc-1""#),
        "{out}"
    );

    let reply = bank.send("acc-2", "Deposit", r#"{"amount":1}"#);
    let seen = reply["sequence"].to_string();
    let (code, out, err) = bank.cli(&[
        "--json",
        "query",
        "account",
        "acc-2",
        "--min-sequence",
        &seen,
    ]);
    assert_eq!(code, 0, "{err}");
    let reply: Value = serde_json::from_str(&out).unwrap();
    let account = &reply["data"];
    assert_eq!(account["balance"], 5, "{out}");
    let kinds: Vec<&str> = account["recent_transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["Deposited", "TransferReceived"], "{out}");
}
