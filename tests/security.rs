//! Access control enforced by nats-server: the fleet runs with the shipped
//! users of `nats/accounts.conf` (one per role, as `make run` starts it),
//! and the server refuses what a role may not do: a client publishing into
//! the event stream, deleting or purging it, reading the snapshot bucket,
//! creating a consumer, listening on other roles' subjects; anonymous
//! connections; a worker deleting the stream.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use jetsource_test_support::requests::{query, send};
use jetsource_test_support::{NatsServer, RedisServer, Sync};
use jetsource_tests::{cli_at, wait_for_service, Process, RoleCredentials};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// A server with the shipped accounts and fresh passwords.
struct Secured {
    server: NatsServer,
    credentials: RoleCredentials,
    log: PathBuf,
}

impl Secured {
    fn start() -> Self {
        let credentials = RoleCredentials::generate();
        let mut log = PathBuf::new();
        let server = NatsServer::start_configured(Sync::Default, |dir| {
            log = dir.join("nats-server.log");
            credentials.server_config()
        });
        Self {
            server,
            credentials,
            log,
        }
    }

    fn url(&self) -> String {
        self.server.url()
    }

    /// `binary` running as `role`, with extra environment.
    fn worker(&self, binary: &str, role: &str, extra: &[(&str, &str)]) -> Process {
        let mut env = self.credentials.env(role).to_vec();
        env.extend_from_slice(extra);
        Process::start_at(binary, &self.url(), &env, None)
    }

    async fn connect(&self, role: &str) -> async_nats::Client {
        self.credentials.connect(&self.url(), role).await
    }

    /// A client as `role` whose server errors (permission violations) arrive
    /// on the returned channel.
    async fn watched(&self, role: &str) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let client = self
            .credentials
            .options(role)
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        let _ = tx.send(e.to_string());
                    }
                }
            })
            .connect(self.url())
            .await
            .unwrap();
        (client, rx)
    }

    /// The permission violations in the server's log so far.
    fn logged_violations(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("Permissions Violation"))
            .map(str::to_owned)
            .collect()
    }
}

/// Waits for the server to report a permission violation naming `what`
/// (e.g. `Publish to "events.account.x"`).
async fn expect_violation(errors: &mut mpsc::UnboundedReceiver<String>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, errors.recv()).await {
            Ok(Some(error)) if error.contains("Permissions Violation") && error.contains(what) => {
                return
            }
            Ok(Some(error)) => seen.push(error),
            _ => panic!("no permission violation for {what} within 10 s; server errors: {seen:?}"),
        }
    }
}

/// A JetStream API request the server must refuse: it reports the
/// violation, and no answer comes back.
async fn refused_request(
    client: &async_nats::Client,
    errors: &mut mpsc::UnboundedReceiver<String>,
    subject: &str,
    body: Value,
) {
    use futures::StreamExt;
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(subject.to_owned(), inbox, body.to_string().into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    expect_violation(errors, &format!("Publish to \"{subject}\"")).await;
    if let Ok(Some(answer)) = tokio::time::timeout(Duration::from_millis(200), answers.next()).await
    {
        panic!(
            "{subject} was answered: {}",
            String::from_utf8_lossy(&answer.payload)
        );
    }
}

async fn event_count(admin: &async_nats::Client) -> u64 {
    let js = jetstream::new(admin.clone());
    let mut stream = js.get_stream("EVENTS").await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// Opens account `id` and deposits 1..=n through `client`; the last
/// sequence.
async fn open_and_deposit(client: &async_nats::Client, id: &str, n: u64) -> u64 {
    let mut last = send(
        client,
        "account",
        id,
        json!({"type": "OpenAccount", "data": {"owner": "ada"}}),
    )
    .await
    .unwrap()
    .sequence;
    for amount in 1..=n {
        last = send(
            client,
            "account",
            id,
            json!({"type": "Deposit", "data": {"amount": amount}}),
        )
        .await
        .unwrap()
        .sequence;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_runs_with_a_user_per_role() {
    let secured = Secured::start();
    let redis = RedisServer::start();
    let redis_url = redis.url();
    let every = [("JETSOURCE__SNAPSHOT__EVERY", "3")];
    let read_models = [("JETSOURCE__REDIS__URL", redis_url.as_str())];
    let _command = secured.worker("jetsource-command", "command", &every);
    let _projector = secured.worker("jetsource-projector", "projector", &read_models);
    let _snapshotter = secured.worker("jetsource-snapshotter", "snapshotter", &every);
    let admin = secured.connect("admin").await;
    for service in [
        "jetsource-command",
        "jetsource-projector",
        "jetsource-snapshotter",
    ] {
        wait_for_service(&admin, service, 1).await;
    }

    // The client role sends and queries.
    let client = secured.connect("client").await;
    let last = open_and_deposit(&client, "acc-1", 6).await;
    let answer = query(
        &client,
        "query.account.acc-1",
        json!({"min_sequence": last, "timeout_ms": 30000}),
    )
    .await
    .unwrap();
    assert!(answer["sequence"].as_u64().unwrap() >= last, "{answer}");
    assert_eq!(answer["data"]["balance"], 21, "{answer}");

    // The snapshotter wrote a snapshot into the bucket.
    let js = jetstream::new(admin.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(kv) = js.get_key_value("SNAPSHOTS").await {
            if kv.status().await.unwrap().values() > 0 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no snapshot written within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The command worker loads from it: a command after the snapshot.
    let more = send(
        &client,
        "account",
        "acc-1",
        json!({"type": "Deposit", "data": {"amount": 100}}),
    )
    .await
    .unwrap();
    assert_eq!(more.version, 8);

    // Every worker did all of that within its permissions.
    assert_eq!(
        secured.logged_violations(),
        Vec::<String>::new(),
        "a worker needed something its role may not do"
    );

    // The CLI: send and query as client, the operator commands as admin.
    let url = secured.url();
    let as_client = secured.credentials.env("client");
    let as_admin = secured.credentials.env("admin");
    let (code, out, err) = cli_at(
        &url,
        &as_client,
        &[
            "send",
            "account",
            "acc-2",
            "OpenAccount",
            r#"{"owner":"bob"}"#,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cli_at(
        &url,
        &as_client,
        &[
            "query",
            "account",
            "acc-1",
            "--min-sequence",
            &more.sequence.to_string(),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("121"), "{out}");
    let (code, out, err) = cli_at(&url, &as_admin, &["history", "account", "acc-1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("Deposited"), "{out}");
    let (code, out, err) = cli_at(&url, &as_admin, &["snapshot", "status"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = cli_at(&url, &as_client, &["history", "account", "acc-1"]);
    assert_ne!(code, 0, "the client role read the event stream: {out}");
    let (code, out, _) = cli_at(
        &url,
        &[],
        &["send", "account", "acc-3", "OpenAccount", "{}"],
    );
    assert_ne!(code, 0, "an anonymous CLI sent a command: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_refuses_the_client_role_everything_but_send_and_query() {
    let secured = Secured::start();
    let _command = secured.worker("jetsource-command", "command", &[]);
    let _snapshotter = secured.worker("jetsource-snapshotter", "snapshotter", &[]);
    let admin = secured.connect("admin").await;
    wait_for_service(&admin, "jetsource-command", 1).await;
    wait_for_service(&admin, "jetsource-snapshotter", 1).await;
    let admin_js = jetstream::new(admin.clone());
    // What the client must not reach exists.
    admin_js.get_key_value("SNAPSHOTS").await.unwrap();

    let (client, mut errors) = secured.watched("client").await;
    open_and_deposit(&client, "acc-1", 2).await;
    let events = event_count(&admin).await;
    assert_eq!(events, 3);

    // Publishing into the event stream.
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client.clone());
    let forged = match js.publish("events.account.acc-1", "{}".into()).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    assert!(!forged, "the client role appended to the event stream");
    expect_violation(&mut errors, "Publish to \"events.account.acc-1\"").await;
    // A plain publish is dropped by the server too.
    client
        .publish("events.account.acc-1", "{}".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    expect_violation(&mut errors, "Publish to \"events.account.acc-1\"").await;

    // Deleting, purging, reconfiguring the stream, or reading its settings.
    assert!(js.delete_stream("EVENTS").await.is_err());
    expect_violation(&mut errors, "Publish to \"$JS.API.STREAM.DELETE.EVENTS\"").await;
    refused_request(
        &client,
        &mut errors,
        "$JS.API.STREAM.PURGE.EVENTS",
        json!({}),
    )
    .await;
    refused_request(
        &client,
        &mut errors,
        "$JS.API.STREAM.UPDATE.EVENTS",
        json!({"name": "EVENTS", "subjects": ["events.>"], "deny_delete": false}),
    )
    .await;
    refused_request(
        &client,
        &mut errors,
        "$JS.API.STREAM.INFO.EVENTS",
        json!({}),
    )
    .await;

    // Reading the event stream or the snapshot bucket.
    refused_request(
        &client,
        &mut errors,
        "$JS.API.DIRECT.GET.EVENTS",
        json!({"seq": 1}),
    )
    .await;
    refused_request(
        &client,
        &mut errors,
        "$JS.API.STREAM.MSG.GET.EVENTS",
        json!({"seq": 1}),
    )
    .await;
    assert!(js.get_key_value("SNAPSHOTS").await.is_err());
    expect_violation(
        &mut errors,
        "Publish to \"$JS.API.STREAM.INFO.KV_SNAPSHOTS\"",
    )
    .await;
    refused_request(
        &client,
        &mut errors,
        "$JS.API.DIRECT.GET.KV_SNAPSHOTS.$KV.SNAPSHOTS.account.acc-1",
        json!(null),
    )
    .await;

    // Consuming the event stream.
    refused_request(
        &client,
        &mut errors,
        "$JS.API.CONSUMER.CREATE.EVENTS.spy",
        json!({"stream_name": "EVENTS", "config": {"name": "spy", "ack_policy": "explicit"}}),
    )
    .await;
    let stream = admin_js.get_stream("EVENTS").await.unwrap();
    assert!(stream.consumer_info("spy").await.is_err());

    // Listening on other roles' subjects.
    for subject in [
        "cmd.>",
        "query.>",
        "events.>",
        "jetsource.snapshot.request.>",
        "jetsource.progress.>",
        "$KV.SNAPSHOTS.>",
        "$SRV.>",
        // Replies meant for the workers, or for anyone.
        "_INBOX.>",
        "_INBOX.command.>",
        "_INBOX.projector.>",
    ] {
        let _subscription = client.subscribe(subject).await.unwrap();
        client.flush().await.unwrap();
        expect_violation(&mut errors, &format!("Subscription to \"{subject}\"")).await;
    }

    // A worker answers requests, but cannot write into a client's inbox
    // unasked (allow_responses, not a publish right on _INBOX.>).
    let (projector, mut projector_errors) = secured.watched("projector").await;
    projector
        .publish("_INBOX.client.forged", "{}".into())
        .await
        .unwrap();
    projector.flush().await.unwrap();
    expect_violation(&mut projector_errors, "Publish to \"_INBOX.client.forged\"").await;

    // Nothing changed; the client still works.
    assert_eq!(event_count(&admin).await, events);
    let info = admin_js
        .get_stream("EVENTS")
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert!(info.config.deny_delete && info.config.deny_purge);
    send(
        &client,
        "account",
        "acc-1",
        json!({"type": "Deposit", "data": {"amount": 1}}),
    )
    .await
    .unwrap();
    assert_eq!(event_count(&admin).await, events + 1);
}

#[tokio::test]
async fn server_refuses_anonymous_and_wrong_credentials() {
    let secured = Secured::start();
    let url = secured.url();
    let wait = Duration::from_secs(10);
    let anonymous = tokio::time::timeout(wait, async_nats::connect(&url)).await;
    assert!(
        matches!(anonymous, Ok(Err(_))),
        "an anonymous connection was accepted"
    );
    let wrong = async_nats::ConnectOptions::with_user_and_password("admin".into(), "guess".into())
        .connect(&url);
    assert!(
        matches!(tokio::time::timeout(wait, wrong).await, Ok(Err(_))),
        "a wrong password was accepted"
    );
    let token =
        async_nats::ConnectOptions::with_token(secured.credentials.password("admin").into())
            .connect(&url);
    assert!(
        matches!(tokio::time::timeout(wait, token).await, Ok(Err(_))),
        "a password was accepted as a token without its user"
    );
    // The CLI says why it could not connect, not merely that it could not.
    let (code, out, err) = cli_at(
        &url,
        &[
            ("JETSOURCE__NATS__USER", "admin"),
            ("JETSOURCE__NATS__PASSWORD", "guess"),
            ("JETSOURCE__NATS__CONNECT_TIMEOUT_MS", "1000"),
        ],
        &["stream"],
    );
    assert_eq!(code, 6, "{out}{err}");
    assert!(err.contains("authorization violation"), "{err}");
    // The right ones are.
    secured.connect("admin").await.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_admin_may_delete_purge_or_reconfigure_a_stream() {
    let secured = Secured::start();
    let redis = RedisServer::start();
    let redis_url = redis.url();
    let _command = secured.worker("jetsource-command", "command", &[]);
    let _projector = secured.worker(
        "jetsource-projector",
        "projector",
        &[("JETSOURCE__REDIS__URL", redis_url.as_str())],
    );
    let _snapshotter = secured.worker("jetsource-snapshotter", "snapshotter", &[]);
    let admin = secured.connect("admin").await;
    for service in [
        "jetsource-command",
        "jetsource-projector",
        "jetsource-snapshotter",
    ] {
        wait_for_service(&admin, service, 1).await;
    }
    let client = secured.connect("client").await;
    open_and_deposit(&client, "acc-1", 1).await;
    let events = event_count(&admin).await;
    let admin_js = jetstream::new(admin.clone());
    admin_js.get_key_value("SNAPSHOTS").await.unwrap();

    for role in ["command", "projector", "snapshotter"] {
        let (worker, mut errors) = secured.watched(role).await;
        for stream in ["EVENTS", "KV_SNAPSHOTS", "DEADLETTERS"] {
            for verb in ["DELETE", "PURGE"] {
                let subject = format!("$JS.API.STREAM.{verb}.{stream}");
                refused_request(&worker, &mut errors, &subject, json!({})).await;
            }
            let subject = format!("$JS.API.STREAM.UPDATE.{stream}");
            let config = json!({"name": stream, "subjects": ["events.>"], "deny_delete": false});
            refused_request(&worker, &mut errors, &subject, config).await;
        }
        // Its own way in refuses too.
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(worker.clone());
        assert!(js.delete_stream("EVENTS").await.is_err(), "{role} deleted");
    }
    assert_eq!(event_count(&admin).await, events);
    admin_js.get_key_value("SNAPSHOTS").await.unwrap();

    // Admin may: here on a scratch stream (EVENTS denies deletes to all).
    admin_js
        .create_stream(jetstream::stream::Config {
            name: "SCRATCH".into(),
            subjects: vec!["scratch.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    admin_js.delete_stream("SCRATCH").await.unwrap();
}

/// What `make run` and `make cluster` do first (scripts/dev-lib.sh
/// `ensure_certificates`, `ensure_credentials`), in a scratch copy of the
/// repository's `nats/`: a private development CA and server certificate,
/// private per-role env files (URL, CA, credentials), kept across runs, and
/// a server configuration the shipped files include and that accepts
/// exactly those credentials, over TLS only.
#[tokio::test]
async fn make_run_generates_credentials_the_server_accepts() {
    use std::os::unix::fs::PermissionsExt;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let scratch = tempfile::tempdir().unwrap();
    let copy = std::process::Command::new("cp")
        .arg("-r")
        .arg(root.join("nats"))
        .arg(root.join("scripts"))
        .arg(scratch.path())
        .status()
        .unwrap();
    assert!(copy.success());
    let ensure = || {
        let out = std::process::Command::new("bash")
            .args([
                "-euo",
                "pipefail",
                "-c",
                "source scripts/dev-lib.sh; ensure_certificates; \
                 ensure_credentials tls://127.0.0.1:4222 1",
            ])
            .current_dir(scratch.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ensure();
    let run = scratch.path().join(".run");
    let read = |name: &str| std::fs::read_to_string(run.join(name)).unwrap();
    let mut passwords = Vec::new();
    for role in jetsource_tests::ROLES {
        let file = format!("{role}.env");
        let mode = std::fs::metadata(run.join(&file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{file} is readable by others: {mode:o}");
        let env = read(&file);
        assert!(
            env.contains(&format!("export JETSOURCE__NATS__USER={role}\n")),
            "{env}"
        );
        let password = env
            .lines()
            .find_map(|l| l.strip_prefix("export JETSOURCE__NATS__PASSWORD="))
            .unwrap()
            .to_owned();
        assert_eq!(password.len(), 32, "{env}");
        let ca = run.join("tls/ca.pem");
        for line in [
            "export JETSOURCE__NATS__URL=tls://127.0.0.1:4222\n".to_owned(),
            format!("export JETSOURCE__NATS__TLS_CA_FILE={}\n", ca.display()),
        ] {
            assert!(env.contains(&line), "{file} lacks {line}{env}");
        }
        // Redis users: the projector writes, queries read, admin operates.
        let redis = env
            .lines()
            .find_map(|l| l.strip_prefix("export JETSOURCE__REDIS__URL="));
        match role {
            "projector" | "admin" => {
                let url = redis.unwrap_or_else(|| panic!("{file}: no Redis URL"));
                assert!(url.starts_with(&format!("rediss://{role}:")), "{url}");
            }
            // The gateway replays dead letters as admin; its API key is
            // configured as a hash only.
            "gateway" => {
                let url = redis.unwrap_or_else(|| panic!("{file}: no Redis URL"));
                assert!(url.starts_with("rediss://admin:"), "{url}");
                let key = std::fs::read_to_string(run.join("gateway-key.secret")).unwrap();
                assert!(!env.contains(&key), "{file} holds the API key itself");
                assert!(env.contains("JETSOURCE__GATEWAY__API_KEYS=admin="), "{env}");
            }
            _ => assert!(redis.is_none(), "{file} names Redis"),
        }
        // Only the writers sign; everyone verifies against the dev key.
        let signs = env.contains("export JETSOURCE__STORE__SIGNING_KEY=");
        assert_eq!(
            signs,
            matches!(role, "command" | "process"),
            "{file}: {env}"
        );
        assert!(
            env.contains("export JETSOURCE__STORE__TRUSTED_KEYS="),
            "{env}"
        );
        passwords.push((role, password));
    }
    // The development signing key is private, and loads.
    let key = run.join("keys/dev-1.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "dev-1.key: {mode:o}");
    jetsource_core::integrity::Signer::load(&key).unwrap();
    jetsource_core::integrity::TrustedKeys::load(&run.join("keys")).unwrap();
    // The development certificates are private, and signed by the CA.
    for key in ["ca-key.pem", "server-key.pem"] {
        let mode = std::fs::metadata(run.join("tls").join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{key}: {mode:o}");
    }
    let rendered = read("nats-accounts.conf");
    let mode = std::fs::metadata(run.join("nats-accounts.conf"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "nats-accounts.conf: {mode:o}");
    // A second start keeps the passwords.
    ensure();
    assert_eq!(read("nats-accounts.conf"), rendered);
    assert_ne!(passwords[0].1, passwords[1].1);

    // The shipped single-node and cluster configurations include it and
    // are valid with it.
    for config in [
        "nats/dev.conf",
        "nats/cluster/n1.conf",
        "nats/cluster/n3.conf",
    ] {
        let out = std::process::Command::new(jetsource_test_support::nats_server_binary())
            .args(["-t", "-c", config])
            .current_dir(scratch.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{config}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A server with them (TLS as nats/dev.conf sets it) takes each role's
    // generated password over TLS with the generated CA, nothing else.
    let tls = run.join("tls");
    let server = NatsServer::start_configured(Sync::Default, |_| {
        format!(
            "\ntls {{\n  cert_file: {:?}\n  key_file: {:?}\n}}\n{rendered}",
            tls.join("server.pem"),
            tls.join("server-key.pem")
        )
    });
    let url = format!("tls://127.0.0.1:{}", server.port());
    let as_role = |role: &str, password: &str| {
        async_nats::ConnectOptions::with_user_and_password(role.into(), password.into())
            .add_root_certificates(tls.join("ca.pem"))
            .require_tls(true)
            .connect(url.clone())
    };
    for (role, password) in &passwords {
        as_role(role, password)
            .await
            .unwrap_or_else(|e| panic!("{role} refused: {e}"));
    }
    let swapped = as_role("admin", &passwords[0].1);
    assert!(
        matches!(
            tokio::time::timeout(Duration::from_secs(10), swapped).await,
            Ok(Err(_))
        ),
        "admin logged in with the client's password"
    );
    // Neither anonymous nor without TLS.
    let anonymous = async_nats::ConnectOptions::new()
        .add_root_certificates(tls.join("ca.pem"))
        .require_tls(true)
        .connect(url.clone());
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(10), anonymous).await,
        Ok(Err(_))
    ));
    let plain =
        async_nats::ConnectOptions::with_user_and_password("admin".into(), passwords[4].1.clone())
            .connect(server.url());
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(10), plain).await,
        Ok(Err(_))
    ));
}

/// A long history is read through a consumer of the command worker's own
/// (store::read_streamed): the `command` role has exactly the rights that
/// takes, so the fast path is taken and nothing is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_command_role_reads_long_histories_through_a_consumer() {
    use jetsource_core::envelope;
    let secured = Secured::start();
    let _command = secured.worker("jetsource-command", "command", &[]);
    let admin = secured.connect("admin").await;
    wait_for_service(&admin, "jetsource-command", 1).await;
    // The stream exists once the worker is up; the history is written
    // directly, as if by earlier commands.
    let js = jetstream::new(admin.clone());
    let events = 6_000u64;
    let mut acks = Vec::new();
    for version in 1..=events {
        let mut h = async_nats::HeaderMap::new();
        h.insert(envelope::EVENT_ID, format!("long-{version}").as_str());
        let (kind, data) = if version == 1 {
            ("AccountOpened", r#"{"owner":"ada"}"#)
        } else {
            ("Deposited", r#"{"amount":1}"#)
        };
        h.insert(envelope::EVENT_TYPE, kind);
        h.insert(envelope::SCHEMA_VERSION, "1");
        h.insert(envelope::AGGREGATE_VERSION, version.to_string().as_str());
        let subject = "events.account.acc-long";
        acks.push(
            js.publish_with_headers(subject, h, data.into())
                .await
                .unwrap(),
        );
        if acks.len() == 1_000 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let mut stream = js.get_stream("EVENTS").await.unwrap();
    let consumers_before = stream.info().await.unwrap().state.consumer_count;

    let client = secured.connect("client").await;
    let outcome = send(
        &client,
        "account",
        "acc-long",
        json!({"type": "Deposit", "data": {"amount": 1}}),
    )
    .await
    .unwrap();
    assert_eq!(outcome.version, events + 1);
    assert!(
        stream.info().await.unwrap().state.consumer_count > consumers_before,
        "the worker did not read through a consumer"
    );
    assert_eq!(
        secured.logged_violations(),
        Vec::<String>::new(),
        "the command worker needed something its role may not do"
    );
}

/// The shop's process worker runs as the `process` role: it follows the
/// orders, sends the items and orders its commands, appends the
/// fulfilment's events, and schedules, receives and purges deadlines,
/// with no permission violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_process_role_drives_a_process_with_deadlines() {
    let secured = Secured::start();
    let _command = secured.worker("shop-command", "command", &[]);
    let _process = secured.worker("shop-process", "process", &[]);
    let admin = secured.connect("admin").await;
    wait_for_service(&admin, "jetsource-command", 1).await;
    wait_for_service(&admin, "jetsource-process", 1).await;
    let client = secured.connect("client").await;
    let ok = |target: &'static str, body: serde_json::Value| {
        let client = client.clone();
        async move {
            let (t, id) = target.split_once('.').unwrap();
            send(&client, t, id, body).await.unwrap()
        }
    };
    ok(
        "item.tea",
        json!({"type": "AddItem", "data": {"name": "tea"}}),
    )
    .await;
    ok(
        "item.tea",
        json!({"type": "Restock", "data": {"quantity": 5}}),
    )
    .await;
    // One order is paid and stays; the other is never paid and expires
    // after a second (a deadline scheduled, fired and purged).
    for (order, pay) in [("o-paid", true), ("o-late", false)] {
        let line = json!([{"sku": "tea", "quantity": 2, "price": 10}]);
        let body = json!({"type": "PlaceOrder", "data": {"customer": "ada", "lines": line, "pay_within_secs": 1}});
        let _ = send(&client, "order", order, body).await.unwrap();
        if pay {
            let _ = send(
                &client,
                "order",
                order,
                json!({"type": "Pay", "data": {"amount": 20}}),
            )
            .await
            .unwrap();
        }
    }
    let js = jetstream::new(admin.clone());
    let store = jetsource_tests::open_store(&admin, &secured.url()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let types = |id: &'static str| {
            let store = store.clone();
            async move {
                let events = store.read_confirmed("order", id, 1).await.unwrap();
                events.into_iter().map(|e| e.event_type).collect::<Vec<_>>()
            }
        };
        let (paid, late) = (types("o-paid").await, types("o-late").await);
        let confirmed = paid.contains(&"OrderConfirmed".to_owned());
        if confirmed && late.contains(&"OrderCancelled".to_owned()) {
            assert!(!paid.contains(&"OrderCancelled".to_owned()), "{paid:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "o-paid {paid:?}, o-late {late:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut deadlines = js.get_stream("DEADLINES").await.unwrap();
    assert!(
        deadlines
            .info()
            .await
            .unwrap()
            .config
            .allow_message_schedules
    );
    assert_eq!(
        secured.logged_violations(),
        Vec::<String>::new(),
        "the process worker needed something its role may not do"
    );
}
