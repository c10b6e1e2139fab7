//! The projector against real servers: exact read models, read-your-writes,
//! dead letters, several copies, and Redis losing its data.

#![allow(clippy::unwrap_used)]

use crate::common::Env;
use jetsource_core::protocol::ErrorCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_models_match_a_fresh_fold_of_the_stream() {
    let mut env = Env::start().await;
    env.add_projector().await;
    let (accounts, users) = env.mixed_workload("m", 12, 6, 6).await;
    env.assert_read_models_match(&accounts, &users).await;
    let missing = env
        .query("query.account.nobody", json!({}))
        .await
        .unwrap_err();
    assert_eq!(missing.code, ErrorCode::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_query_with_min_sequence_reads_its_own_write() {
    let mut env = Env::start().await;
    env.add_projector().await;
    env.send(
        "account",
        "rw",
        json!({"type": "OpenAccount", "data": {"owner": "o"}}),
    )
    .await
    .unwrap();
    for i in 1..=20u64 {
        let deposit = env
            .send(
                "account",
                "rw",
                json!({"type": "Deposit", "data": {"amount": i}}),
            )
            .await
            .unwrap();
        let reply = env
            .query(
                "query.account.rw",
                json!({"min_sequence": deposit.sequence}),
            )
            .await
            .unwrap();
        assert!(reply["sequence"].as_u64().unwrap() >= deposit.sequence);
        assert_eq!(
            reply["data"]["balance"],
            i * (i + 1) / 2,
            "balance right after deposit {i}"
        );
        assert_eq!(reply["data"]["version"], deposit.version);
    }
    // A sequence that will not come in time: timeout, not a stale answer.
    let err = env
        .query(
            "query.account.rw",
            json!({"min_sequence": 1_000_000, "timeout_ms": 200}),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Timeout);
    assert!(err.message.contains("1000000"), "{}", err.message);
    // Bad queries.
    for (subject, body) in [
        ("query.account.a.b", json!({})),
        ("query.nothing", json!({})),
        ("query.account.rw", json!({"min_seq": 1})),
        ("query.account.bad%id", json!({})),
    ] {
        let err = env.query(subject, body).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Invalid, "{subject}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_event_is_dead_lettered_and_later_events_still_project() {
    let mut env = Env::start().await;
    env.add_projector().await;
    env.send(
        "account",
        "p1",
        json!({"type": "OpenAccount", "data": {"owner": "o"}}),
    )
    .await
    .unwrap();
    // Two events no projection can apply, written around the command path:
    // one without the jetsource envelope, one of an unknown type.
    let js = async_nats::jetstream::new(env.client.clone());
    js.publish("events.account.p1", "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut headers = async_nats::HeaderMap::new();
    for (k, v) in [
        ("Jetsource-Event-Id", "x"),
        ("Jetsource-Event-Type", "Teleported"),
        ("Jetsource-Schema-Version", "1"),
        ("Jetsource-Aggregate-Version", "3"),
    ] {
        headers.insert(k, v);
    }
    js.publish_with_headers("events.account.p1", headers, "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let deposit = env
        .send(
            "account",
            "p1",
            json!({"type": "Deposit", "data": {"amount": 7}}),
        )
        .await;
    // The command path refuses to decide on a history it cannot read.
    assert_eq!(deposit.unwrap_err().code, ErrorCode::Internal);
    env.send(
        "account",
        "p2",
        json!({"type": "OpenAccount", "data": {"owner": "o", "initial_deposit": 9}}),
    )
    .await
    .unwrap();
    let last = env.last_sequence().await;
    let reply = env
        .query("query.account.p2", json!({"min_sequence": last}))
        .await
        .unwrap();
    assert_eq!(reply["data"]["balance"], 9, "later events still project");

    let mut stream = js.get_stream("DEADLETTERS").await.unwrap();
    let letters = jetsource_projector::dlq::list(&mut stream).await.unwrap();
    // Only `accounts` reads account events; `users` passes them over.
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(letters.iter().all(|l| l.projection == "accounts"));
    assert_eq!(letters[0].original_sequence, 2);
    assert!(
        letters[0].reason.contains("not a jetsource event"),
        "{}",
        letters[0].reason
    );
    assert_eq!(letters[1].original_sequence, 3);
    assert!(
        letters[1].reason.contains("Teleported"),
        "{}",
        letters[1].reason
    );
    assert!(
        letters[1].reason.contains("after 3 attempts"),
        "{}",
        letters[1].reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_projectors_at_once_give_the_exact_result_in_order() {
    let mut env = Env::start().await;
    for _ in 0..3 {
        env.add_projector().await;
    }
    let (accounts, users) = env.mixed_workload("t", 10, 4, 8).await;
    env.assert_read_models_match(&accounts, &users).await;
    // The applying copy stops; a standby takes over and applies the rest.
    env.stop_projector(0).await;
    env.stop_projector(0).await;
    let (more, more_users) = env.mixed_workload("u", 6, 2, 4).await;
    let all: Vec<String> = accounts.into_iter().chain(more).collect();
    let all_users: Vec<String> = users.into_iter().chain(more_users).collect();
    env.assert_read_models_match(&all, &all_users).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flushall_under_load_is_noticed_and_rebuilt_exactly() {
    let mut env = Env::start().await;
    env.add_projector().await;
    let (accounts, users) = env.mixed_workload("f", 8, 3, 3).await;
    env.assert_read_models_match(&accounts, &users).await;
    let load = {
        let client = env.client.clone();
        tokio::spawn(async move {
            for i in 0..300u64 {
                let body = json!({"type": "Deposit", "data": {"amount": i % 9 + 1}});
                client
                    .request(
                        format!("cmd.account.fa{}", 2 * (i % 4)),
                        body.to_string().into(),
                    )
                    .await
                    .unwrap();
            }
        })
    };
    let mut redis = redis::Client::open(env.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut redis)
        .await
        .unwrap();
    load.await.unwrap();
    env.assert_read_models_match(&accounts, &users).await;
}

/// Each projection's consumer receives only its own aggregate types; its
/// watermark still moves over the others' events, so read-your-writes works
/// with any sequence the client holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_model_waits_only_for_its_own_types() {
    let mut env = Env::start().await;
    env.add_projector().await;
    let opened = env
        .send(
            "account",
            "own",
            json!({"type": "OpenAccount", "data": {"owner": "o"}}),
        )
        .await
        .unwrap();
    let created = env
        .send(
            "user",
            "other",
            json!({"type": "CreateUser", "data": {"name": "n"}}),
        )
        .await
        .unwrap();
    assert!(created.sequence > opened.sequence);
    // The user event is the stream's newest: the accounts read model
    // reflects it (nothing of its own lies before it) without any new
    // account event.
    let reply = env
        .query(
            "query.account.own",
            json!({"min_sequence": created.sequence, "timeout_ms": 10_000}),
        )
        .await
        .unwrap();
    assert!(reply["sequence"].as_u64().unwrap() >= created.sequence);
    assert_eq!(reply["data"]["owner"], "o");
    let reply = env
        .query(
            "query.user.other",
            json!({"min_sequence": created.sequence, "timeout_ms": 10_000}),
        )
        .await
        .unwrap();
    assert_eq!(reply["data"]["name"], "n");
    // The consumers are filtered by type on the server.
    let store = env.store().await;
    let stream = store.jetstream().get_stream("EVENTS").await.unwrap();
    let mut names = Vec::new();
    let mut list = stream.consumer_names();
    while let Some(name) = futures::StreamExt::next(&mut list).await {
        names.push(name.unwrap());
    }
    for name in names.iter().filter(|n| n.starts_with("users-g")) {
        let mut consumer = stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(name)
            .await
            .unwrap();
        let info = consumer.info().await.unwrap();
        assert_eq!(info.config.filter_subject, "events.user.>");
        assert_eq!(info.delivered.stream_sequence, created.sequence);
    }
    assert!(names.iter().any(|n| n.starts_with("users-g")), "{names:?}");
}

/// The bank's query subjects and bodies, as clients used them before
/// queries were declared by projections: same data, same error codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bank_queries_answer_as_before() {
    let mut env = Env::start().await;
    env.add_projector().await;
    let mut last = 0;
    for (id, amount) in [("q1", 50u64), ("q2", 70)] {
        env.send(
            "account",
            id,
            json!({"type": "OpenAccount", "data": {"owner": "o"}}),
        )
        .await
        .unwrap();
        last = env
            .send(
                "account",
                id,
                json!({"type": "Deposit", "data": {"amount": amount}}),
            )
            .await
            .unwrap()
            .sequence;
    }
    let wait = json!({"min_sequence": last});
    let account = env.query("query.account.q1", wait.clone()).await.unwrap();
    assert_eq!(account["data"]["balance"], 50);
    assert_eq!(account["data"]["id"], "q1");
    let top = env
        .query(
            "query.accounts.top",
            json!({"min_sequence": last, "limit": 1}),
        )
        .await
        .unwrap();
    assert_eq!(top["data"], json!([{"id": "q2", "balance": 70}]));
    // `limit` was accepted (and ignored) by every query; it still is.
    let totals = env
        .query("query.accounts.totals", json!({"limit": 3}))
        .await
        .unwrap();
    assert_eq!(
        totals["data"],
        json!({"open_accounts": 2, "balance_sum": 120})
    );
    let code = |r: Result<serde_json::Value, jetsource_core::protocol::ErrorBody>| {
        r.expect_err("an error reply").code
    };
    use jetsource_core::protocol::ErrorCode;
    assert_eq!(
        code(env.query("query.account.nobody", json!({})).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(env.query("query.user.nobody", json!({})).await),
        ErrorCode::NotFound
    );
    for (subject, body) in [
        ("query.accounts.top", json!({"limit": -1})),
        ("query.accounts.top", json!({"limit": "ten"})),
        ("query.account.q1", json!({"offset": 1})),
        ("query.account.q1", json!([1])),
        ("query.accounts.everything", json!({})),
        ("query.account", json!({})),
    ] {
        let reply = env.query(subject, body.clone()).await;
        assert_eq!(code(reply), ErrorCode::Invalid, "{subject} {body}");
    }
    let unknown = env
        .query("query.nothing.here", json!({}))
        .await
        .expect_err("unknown query");
    assert!(
        unknown.message.contains("query.account.<id>")
            && unknown.message.contains("query.accounts.top"),
        "lists the known queries: {}",
        unknown.message
    );
}
