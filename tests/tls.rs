//! TLS for NATS and Redis, and Redis ACL users (docs/TLS.md): the bank's
//! workers as processes against servers that require TLS, with throw-away
//! certificates from `jetsource_test_support::certs`; and the servers
//! refusing what they should.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use jetsource_test_support::certs::{nats_tls_block, redis_tls_args, write_test_pki, Pki};
use jetsource_test_support::requests::send;
use jetsource_test_support::{NatsServer, RedisServer, Sync};
use jetsource_tests::{cli_at, project_and_query, wait_for_service, Process};
use serde_json::{json, Value};

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A client of a TLS-only NATS server, trusting `pki`'s CA, with the client
/// certificate if `with_cert`.
async fn tls_client(url: &str, pki: &Pki, with_cert: bool) -> Result<async_nats::Client, String> {
    let mut options = async_nats::ConnectOptions::new()
        .add_root_certificates(pki.ca.clone())
        .require_tls(true);
    if with_cert {
        options = options.add_client_certificate(pki.client_cert.clone(), pki.client_key.clone());
    }
    options.connect(url).await.map_err(|e| e.to_string())
}

/// Opens an account and deposits into it through the CLI; the last reply.
fn send_through_cli(url: &str, env: &[(&str, &str)], id: &str, deposits: u64) -> Value {
    let (code, out, err) = cli_at(
        url,
        env,
        &[
            "--json",
            "send",
            "account",
            id,
            "OpenAccount",
            r#"{"owner":"ada"}"#,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let mut last: Value = serde_json::from_str(&out).unwrap();
    for _ in 0..deposits {
        let (code, out, err) = cli_at(
            url,
            env,
            &[
                "--json",
                "send",
                "account",
                id,
                "Deposit",
                r#"{"amount":10}"#,
            ],
        );
        assert_eq!(code, 0, "{out}{err}");
        last = serde_json::from_str(&out).unwrap();
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_runs_over_nats_tls() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = write_test_pki(pki_dir.path());
    let nats = NatsServer::start_configured(Sync::default(), |_| nats_tls_block(&pki, false));
    let redis = RedisServer::start();
    let url = format!("tls://127.0.0.1:{}", nats.port());
    let client = tls_client(&url, &pki, false).await.unwrap();

    let redis_url = redis.url();
    let env = [
        ("JETSOURCE__NATS__TLS_CA_FILE", path(&pki.ca)),
        ("JETSOURCE__REDIS__URL", redis_url.as_str()),
        ("JETSOURCE__SNAPSHOT__EVERY", "3"),
    ];
    let _command = Process::start_at("jetsource-command", &url, &env, None);
    let _projector = Process::start_at("jetsource-projector", &url, &env, None);
    let _snapshotter = Process::start_at("jetsource-snapshotter", &url, &env, None);
    wait_for_service(&client, "jetsource-command", 1).await;
    wait_for_service(&client, "jetsource-projector", 1).await;
    wait_for_service(&client, "jetsource-snapshotter", 1).await;

    // Commands through the CLI, over TLS.
    let last = send_through_cli(&url, &env, "tls-1", 4);
    assert_eq!(last["version"], 5, "{last}");
    let seen = last["sequence"].to_string();

    // A query that waits for what was just written.
    let (code, out, err) = cli_at(
        &url,
        &env,
        &[
            "--json",
            "query",
            "account",
            "tls-1",
            "--min-sequence",
            &seen,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let reply: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply["data"]["balance"], 40, "{reply}");
    assert!(reply["sequence"].as_u64().unwrap() >= last["sequence"].as_u64().unwrap());

    // The snapshotter, over TLS too, took the snapshot at version 3.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, err) = cli_at(&url, &env, &["--json", "snapshot", "status"]);
        assert_eq!(code, 0, "{out}{err}");
        let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
        if rows.first().is_some_and(|r| r["snapshots"] == 1) {
            assert_eq!(rows[0]["aggregate_type"], "account");
            break;
        }
        assert!(Instant::now() < deadline, "no snapshot over TLS: {out}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Without the CA, the server's certificate is not trusted: no
    // connection, for a plain client and for the CLI alike.
    let plain = format!("nats://127.0.0.1:{}", nats.port());
    let refused = async_nats::connect(&plain)
        .await
        .expect_err("connected without trusting the CA")
        .to_string();
    assert!(
        refused.contains("certificate"),
        "not a TLS error: {refused}"
    );
    let (code, out, err) = cli_at(&plain, &[], &["stream"]);
    assert_eq!(code, UNAVAILABLE, "{out}{err}");
    assert!(err.contains("not reachable"), "{err}");
    // It says why: the server's certificate, not a server that is down.
    assert!(err.contains("certificate"), "{err}");
}

/// The CLI's exit code for `unavailable`.
const UNAVAILABLE: i32 = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_verify_refuses_clients_without_a_certificate() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = write_test_pki(pki_dir.path());
    let nats = NatsServer::start_configured(Sync::default(), |_| nats_tls_block(&pki, true));
    let url = format!("tls://127.0.0.1:{}", nats.port());

    // Trusting the server is not enough: the server wants a certificate.
    let refused = tls_client(&url, &pki, false).await;
    assert!(refused.is_err(), "connected without a client certificate");

    // With one, clients connect; a worker configured with it serves.
    let client = tls_client(&url, &pki, true).await.unwrap();
    let env = [
        ("JETSOURCE__NATS__TLS_CA_FILE", path(&pki.ca)),
        ("JETSOURCE__NATS__TLS_CERT_FILE", path(&pki.client_cert)),
        ("JETSOURCE__NATS__TLS_KEY_FILE", path(&pki.client_key)),
    ];
    let _command = Process::start_at("jetsource-command", &url, &env, None);
    wait_for_service(&client, "jetsource-command", 1).await;
    let outcome = send(
        &client,
        "account",
        "mtls-1",
        json!({"type": "OpenAccount", "data": {"owner": "ada"}}),
    )
    .await
    .unwrap();
    assert_eq!(outcome.version, 1);

    // The CLI with the CA but without the certificate is refused.
    let (code, out, err) = cli_at(&url, &env[..1], &["stream"]);
    assert_ne!(code, 0, "{out}{err}");
    let (code, out, err) = cli_at(&url, &env, &["stream"]);
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_over_rediss_with_client_certificate() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = write_test_pki(pki_dir.path());
    let redis = RedisServer::start_configured(|_, port| redis_tls_args(&pki, port, "yes"));
    let url = format!("rediss://127.0.0.1:{}/", redis.port());

    // Without the CA, the server's certificate is not trusted.
    let client = redis::Client::open(url.as_str()).unwrap();
    let untrusted = tokio::time::timeout(
        Duration::from_secs(10),
        client.get_multiplexed_async_connection(),
    )
    .await
    .unwrap();
    assert!(untrusted.is_err(), "connected without trusting the CA");

    let (reply, _fleet) = project_and_query(&[
        ("JETSOURCE__REDIS__URL", url.as_str()),
        ("JETSOURCE__REDIS__TLS_CA_FILE", path(&pki.ca)),
        ("JETSOURCE__REDIS__TLS_CERT_FILE", path(&pki.client_cert)),
        ("JETSOURCE__REDIS__TLS_KEY_FILE", path(&pki.client_key)),
    ])
    .await;
    assert_eq!(reply["data"]["balance"], 42, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_over_rediss_and_query_user() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = write_test_pki(pki_dir.path());
    let redis = RedisServer::start_configured(|_, port| {
        let mut args = redis_tls_args(&pki, port, "no");
        args.extend(acl_users());
        args
    });
    let at = |user: &str| format!("rediss://{user}@127.0.0.1:{}/", redis.port());
    let (url, query_url) = (at("projector:wpw"), at("reader:rpw"));
    let (reply, _fleet) = project_and_query(&[
        ("JETSOURCE__REDIS__URL", url.as_str()),
        ("JETSOURCE__REDIS__QUERY_URL", query_url.as_str()),
        ("JETSOURCE__REDIS__TLS_CA_FILE", path(&pki.ca)),
    ])
    .await;
    assert_eq!(reply["data"]["balance"], 42, "{reply}");
}

/// `default` off; `projector` may write jetsource's keys (no dangerous
/// commands); `reader` may only read; `admin` for the test's checks.
fn acl_users() -> Vec<String> {
    "--user default off \
     --user projector on >wpw ~jetsource:* ~{jetsource:* +@all -@dangerous \
     --user reader on >rpw ~* +@read +@transaction +ping \
     --user admin on >apw ~* &* +@all"
        .split_whitespace()
        .map(String::from)
        .collect()
}

async fn redis_as(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_query_user_reads_and_cannot_write() {
    let redis = RedisServer::start_configured(|_, _| acl_users());
    let at = |user: &str| format!("redis://{user}@127.0.0.1:{}/", redis.port());
    let (url, query_url) = (at("projector:wpw"), at("reader:rpw"));
    let (reply, _fleet) = project_and_query(&[
        ("JETSOURCE__REDIS__URL", url.as_str()),
        ("JETSOURCE__REDIS__QUERY_URL", query_url.as_str()),
    ])
    .await;
    assert_eq!(reply["data"]["balance"], 42, "{reply}");

    // The projector's queries ran as `reader`: its connection is there,
    // and the last thing it did was a read.
    let mut admin = redis_as(&at("admin:apw")).await;
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut admin)
        .await
        .unwrap();
    let readers: Vec<&str> = clients
        .lines()
        .filter(|l| l.contains(" user=reader "))
        .collect();
    assert!(!readers.is_empty(), "no connection as reader: {clients}");
    for line in &readers {
        assert!(
            [
                "cmd=hgetall",
                "cmd=get",
                "cmd=hmget",
                "cmd=ping",
                "cmd=lrange",
                "cmd=zrevrange"
            ]
            .iter()
            .any(|c| line.contains(&format!(" {c} "))),
            "{line}"
        );
    }
    assert!(
        clients.contains(" user=projector "),
        "no connection as projector: {clients}"
    );

    // The query user may read, and nothing else.
    let mut reader = redis_as(&query_url).await;
    let meta: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg("jetsource:accounts:meta")
        .query_async(&mut reader)
        .await
        .unwrap();
    assert!(!meta.is_empty(), "reader cannot read the metadata");
    let writes = [
        redis::cmd("SET").arg("x").arg("1").clone(),
        redis::cmd("HSET")
            .arg("jetsource:accounts:meta")
            .arg("active")
            .arg("9")
            .clone(),
        redis::cmd("EVAL")
            .arg("return redis.call('SET', KEYS[1], '1')")
            .arg(1)
            .arg("jetsource:x")
            .clone(),
        redis::cmd("DEL").arg("jetsource:accounts:meta").clone(),
    ];
    for write in writes {
        let refused = write.query_async::<redis::Value>(&mut reader).await;
        let error = refused.expect_err("the query user wrote");
        assert_eq!(error.code(), Some("NOPERM"), "{error}");
    }

    // The projector's user may not touch other keys or run dangerous
    // commands.
    let mut projector = redis_as(&url).await;
    for command in [
        redis::cmd("SET").arg("other:key").arg("1").clone(),
        redis::cmd("FLUSHALL").clone(),
    ] {
        let error = command
            .query_async::<redis::Value>(&mut projector)
            .await
            .expect_err("the projector's user did what it may not");
        assert_eq!(error.code(), Some("NOPERM"), "{error}");
    }

    // Anonymous connections are refused.
    let anonymous = redis::Client::open(format!("redis://127.0.0.1:{}/", redis.port())).unwrap();
    let refused = match anonymous.get_multiplexed_async_connection().await {
        Err(e) => e,
        Ok(mut con) => redis::cmd("GET")
            .arg("jetsource:accounts:meta")
            .query_async::<redis::Value>(&mut con)
            .await
            .expect_err("an anonymous connection read"),
    };
    assert!(
        refused.to_string().contains("NOAUTH") || refused.code() == Some("NOAUTH"),
        "{refused}"
    );
}
