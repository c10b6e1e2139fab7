//! The event store against a real nats-server.

#![allow(clippy::unwrap_used)]

use std::ops::ControlFlow;

use jetsource_aggregate::{DynAggregate, NewEvent};
use jetsource_core::config::{NatsConfig, StoreConfig};
use jetsource_core::loader::{Loaded, Until};
use jetsource_core::store::{Append, Appended, EventStore, StoreError, StoreErrorKind};
use jetsource_core::ErrorClass;
use jetsource_test_support::NatsServer;

async fn store_with(server: &NatsServer, config: StoreConfig) -> EventStore {
    let nats = NatsConfig {
        url: server.url(),
        ..Default::default()
    };
    EventStore::open(server.client().await, &nats, &config)
        .await
        .unwrap()
}

async fn store(server: &NatsServer) -> EventStore {
    store_with(server, StoreConfig::default()).await
}

fn ev(event_type: &str, data: &str) -> NewEvent {
    NewEvent {
        event_type: event_type.into(),
        data: data.as_bytes().to_vec(),
        sealed: None,
    }
}

fn append<'a>(id: &'a str, expected: u64, version: u64, events: &'a [NewEvent]) -> Append<'a> {
    Append {
        aggregate_type: "account",
        aggregate_id: id,
        expected_last_sequence: expected,
        version,
        events,
        schema_version: 1,
        command_id: None,
        correlation_id: "corr",
        causation_id: "cause",
        command_aggregate: None,
        previous_hash: None,
    }
}

/// Appends `a`, linked to the chain head at its expected sequence, as a
/// worker that loaded the aggregate would.
async fn put(store: &EventStore, mut a: Append<'_>) -> Result<Appended, StoreError> {
    a.previous_hash = store.hash_at(a.expected_last_sequence).await?;
    store.append(&a).await
}

fn account() -> std::sync::Arc<dyn DynAggregate> {
    jetsource_bank::registry().get("account").unwrap().clone()
}

async fn balance(store: &EventStore, id: &str) -> (u64, u64, serde_json::Value) {
    let account = account();
    let loaded = Loaded::load(store, account.as_ref(), id, Until::End)
        .await
        .unwrap();
    (
        loaded.version,
        loaded.last_sequence,
        account.state_to_json(&loaded.state),
    )
}

async fn stream_messages(store: &EventStore) -> u64 {
    store.info().await.unwrap().state.messages
}

#[tokio::test]
async fn append_then_load_with_envelope() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let opened = [ev("AccountOpened", r#"{"owner":"ada"}"#)];
    let mut first = append("a1", 0, 0, &opened);
    first.command_id = Some("c-1");
    let appended = put(&store, first).await.unwrap();
    assert_eq!(appended.first_sequence, 1);
    assert!(!appended.duplicate);
    let deposit = [ev("Deposited", r#"{"amount":40}"#)];
    put(&store, append("a1", 1, 1, &deposit)).await.unwrap();
    // Another aggregate in between must not disturb a1's sequence checks.
    put(&store, append("other", 0, 0, &opened)).await.unwrap();

    let (version, last, state) = balance(&store, "a1").await;
    assert_eq!((version, last), (2, 2));
    assert_eq!(state["balance"], 40);
    assert_eq!(state["owner"], "ada");

    let mut events = Vec::new();
    store
        .read("account", "a1", 1, |chunk| {
            events.extend(chunk);
            ControlFlow::Continue(())
        })
        .await
        .unwrap();
    assert_eq!(events.len(), 2);
    let e = &events[0];
    assert_eq!(e.event_type, "AccountOpened");
    assert_eq!(e.aggregate_type, "account");
    assert_eq!(e.aggregate_id, "a1");
    assert_eq!(e.aggregate_version, 1);
    assert_eq!(e.schema_version, 1);
    assert_eq!(e.command_id.as_deref(), Some("c-1"));
    assert_eq!(e.correlation_id.as_deref(), Some("corr"));
    assert_eq!(e.causation_id.as_deref(), Some("cause"));
    assert_eq!(e.event_id.len(), 36, "a UUID");
    assert_ne!(e.event_id, events[1].event_id);
    assert_eq!(events[1].aggregate_version, 2);
    assert!(events[1].timestamp >= e.timestamp);
}

#[tokio::test]
async fn a_stale_expected_sequence_is_a_conflict() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let opened = [ev("AccountOpened", r#"{"owner":"ada"}"#)];
    put(&store, append("a1", 0, 0, &opened)).await.unwrap();
    let err = put(&store, append("a1", 0, 0, &opened)).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::WrongLastSequence);
    assert_eq!(err.class(), ErrorClass::Conflict);
    assert_eq!(stream_messages(&store).await, 1, "the loser stored nothing");
}

#[tokio::test]
async fn a_multi_event_append_is_atomic() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let events = [
        ev("AccountOpened", r#"{"owner":"ada"}"#),
        ev("Deposited", r#"{"amount":5}"#),
        ev("Deposited", r#"{"amount":6}"#),
    ];
    let appended = put(&store, append("a1", 0, 0, &events)).await.unwrap();
    assert_eq!((appended.first_sequence, appended.last_sequence), (1, 3));
    let (version, last, state) = balance(&store, "a1").await;
    assert_eq!((version, last), (3, 3));
    assert_eq!(state["balance"], 11);

    // A batch whose check fails at commit leaves nothing behind, not even
    // the messages before the failing check.
    let more = [
        ev("Deposited", r#"{"amount":1}"#),
        ev("Deposited", r#"{"amount":2}"#),
    ];
    let err = put(&store, append("a1", 1, 1, &more)).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::WrongLastSequence, "{err}");
    assert_eq!(stream_messages(&store).await, 3);
    let (version, _, state) = balance(&store, "a1").await;
    assert_eq!(version, 3);
    assert_eq!(state["balance"], 11);

    // The same batch with the right sequence goes through.
    let appended = put(&store, append("a1", 3, 3, &more)).await.unwrap();
    assert_eq!((appended.first_sequence, appended.last_sequence), (4, 5));
}

#[tokio::test]
async fn a_resent_command_id_is_not_stored_twice() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let one = [ev("AccountOpened", r#"{"owner":"ada"}"#)];
    let mut first = append("a1", 0, 0, &one);
    first.command_id = Some("open-1");
    let original = put(&store, first).await.unwrap();
    // The resend is decided against newer state, but dedup comes first.
    let mut again = first;
    again.expected_last_sequence = 1;
    again.version = 1;
    let resent = put(&store, again).await.unwrap();
    assert!(resent.duplicate);
    assert_eq!(resent.first_sequence, original.first_sequence);
    assert_eq!(stream_messages(&store).await, 1);

    // Same for a batch.
    let two = [
        ev("Deposited", r#"{"amount":1}"#),
        ev("Deposited", r#"{"amount":2}"#),
    ];
    let mut batch = append("a1", 1, 1, &two);
    batch.command_id = Some("twice");
    let original = put(&store, batch).await.unwrap();
    assert!(!original.duplicate);
    let mut again = batch;
    again.expected_last_sequence = 3;
    again.version = 3;
    let err = put(&store, again).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::DuplicateCommand, "{err}");
    assert_eq!(
        stream_messages(&store).await,
        3,
        "resent batch stored nothing"
    );
    let found = store
        .find_command("account", "a1", "twice")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.iter().map(|e| e.sequence).collect::<Vec<_>>(), [2, 3]);
    assert!(store
        .find_command("account", "a1", "never")
        .await
        .unwrap()
        .is_none());

    let events = store
        .read_command("account", "a1", original.first_sequence, "twice")
        .await
        .unwrap();
    assert_eq!(
        events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [2, 3]
    );

    // The same command id on another aggregate is another command.
    let mut elsewhere = append("a2", 0, 0, &one);
    elsewhere.command_id = Some("open-1");
    assert!(!put(&store, elsewhere).await.unwrap().duplicate);
}

#[tokio::test]
async fn the_server_refuses_to_delete_or_purge_history() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let one = [ev("AccountOpened", r#"{"owner":"ada"}"#)];
    put(&store, append("a1", 0, 0, &one)).await.unwrap();
    let stream = store.jetstream().get_stream("EVENTS").await.unwrap();
    assert!(
        stream.delete_message(1).await.is_err(),
        "delete must be refused"
    );
    assert!(stream.purge().await.is_err(), "purge must be refused");
    assert!(stream.purge().filter("events.account.a1").await.is_err());
    assert_eq!(stream_messages(&store).await, 1);
}

#[tokio::test]
async fn an_incompatible_existing_stream_is_named_not_rewritten() {
    let server = NatsServer::start();
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let mut loose = jetsource_core::store::desired_stream(&StoreConfig::default());
    loose.deny_delete = false;
    loose.max_age = std::time::Duration::from_secs(3600);
    js.create_stream(loose).await.unwrap();
    let nats = NatsConfig {
        url: server.url(),
        ..Default::default()
    };
    let err = EventStore::open(client, &nats, &StoreConfig::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::IncompatibleStream);
    let message = err.to_string();
    assert!(message.contains("deny_delete"), "{message}");
    assert!(message.contains("max_age"), "{message}");
    let info = js
        .get_stream("EVENTS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert!(!info.config.deny_delete, "the stream was left as it was");

    // Opening twice with the same settings is fine.
    let other = NatsServer::start();
    store(&other).await;
    store(&other).await;
}

#[tokio::test]
async fn long_histories_are_read_in_batches_and_up_to_a_point() {
    let server = NatsServer::start();
    let store = store_with(
        &server,
        StoreConfig {
            read_batch: 7,
            ..Default::default()
        },
    )
    .await;
    let opened = [ev("AccountOpened", r#"{"owner":"ada"}"#)];
    put(&store, append("a1", 0, 0, &opened)).await.unwrap();
    let deposit = [ev("Deposited", r#"{"amount":1}"#)];
    let mut last = 1;
    for version in 1..50 {
        // Interleave another aggregate so a1's sequences have gaps.
        put(
            &store,
            append(
                "noise",
                if version == 1 { 0 } else { last + 1 - 2 },
                0,
                &opened,
            ),
        )
        .await
        .ok();
        last = put(&store, append("a1", last, version, &deposit))
            .await
            .unwrap()
            .last_sequence;
    }
    let (version, seq, state) = balance(&store, "a1").await;
    assert_eq!((version, seq), (50, last));
    assert_eq!(state["balance"], 49);

    let account = account();
    let at = Loaded::load(&store, account.as_ref(), "a1", Until::Sequence(20))
        .await
        .unwrap();
    assert!(at.last_sequence <= 20);
    let mut count = 0;
    store
        .read("account", "a1", 1, |chunk| {
            count += chunk.iter().filter(|e| e.sequence <= 20).count() as u64;
            ControlFlow::Continue(())
        })
        .await
        .unwrap();
    assert_eq!(at.version, count);
    assert_eq!(account.state_to_json(&at.state)["balance"], count - 1);

    let before_all = Loaded::load(
        &store,
        account.as_ref(),
        "a1",
        Until::Time(time::OffsetDateTime::UNIX_EPOCH),
    )
    .await
    .unwrap();
    assert_eq!(before_all.version, 0);

    // Catching up a loaded aggregate reads only the tail.
    let mut partial = at.clone();
    let applied = partial
        .catch_up(&store, account.as_ref(), "a1", Until::End)
        .await
        .unwrap();
    assert_eq!(applied, 50 - at.version);
    assert_eq!(partial.version, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_batches_stay_under_the_server_limit() {
    // The server allows 50 open atomic batches per stream; 120 at once from
    // one process must all succeed, not fail with error 10210.
    let server = NatsServer::start();
    let store = std::sync::Arc::new(store(&server).await);
    let mut tasks = Vec::new();
    for i in 0..120 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let events = [
                ev("AccountOpened", r#"{"owner":"ada"}"#),
                ev("Deposited", r#"{"amount":1}"#),
            ];
            let id = format!("b{i}");
            put(&store, append(&id, 0, 0, &events)).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(stream_messages(&store).await, 240);
}

/// Writes `count` events of `account.<id>`, each after an event of another
/// aggregate so the history has gaps, as fast as the server takes them.
async fn publish_long_history(js: &async_nats::jetstream::Context, id: &str, count: u64) {
    use jetsource_core::envelope;
    let mut acks = Vec::new();
    for version in 1..=count {
        for (subject, v) in [
            (format!("events.account.noise{}", version % 7), 1),
            (format!("events.account.{id}"), version),
        ] {
            let mut h = async_nats::HeaderMap::new();
            h.insert(
                envelope::EVENT_ID,
                format!("e-{subject}-{version}").as_str(),
            );
            let kind = if v == 1 { "AccountOpened" } else { "Deposited" };
            h.insert(envelope::EVENT_TYPE, kind);
            h.insert(envelope::SCHEMA_VERSION, "1");
            h.insert(envelope::AGGREGATE_VERSION, v.to_string().as_str());
            let data = if v == 1 {
                r#"{"owner":"ada"}"#
            } else {
                r#"{"amount":1}"#
            };
            acks.push(
                js.publish_with_headers(subject, h, data.into())
                    .await
                    .unwrap(),
            );
        }
        if acks.len() >= 2_000 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

/// Past a few thousand events a read goes on through a consumer of its
/// own (much faster than direct gets); it must hand over exactly what
/// direct gets would: every event once, in order, stopping where asked.
#[tokio::test]
async fn long_reads_go_through_a_consumer_and_lose_nothing() {
    let server = NatsServer::start();
    let store = store(&server).await;
    let count = 12_345;
    publish_long_history(store.jetstream(), "long", count).await;

    let mut versions = Vec::new();
    let mut sequences = Vec::new();
    store
        .read("account", "long", 1, |chunk| {
            versions.extend(chunk.iter().map(|e| e.aggregate_version));
            sequences.extend(chunk.iter().map(|e| e.sequence));
            ControlFlow::Continue(())
        })
        .await
        .unwrap();
    assert_eq!(versions, (1..=count).collect::<Vec<_>>());
    assert!(sequences.windows(2).all(|w| w[0] < w[1]));
    let mut stream = store.jetstream().get_stream("EVENTS").await.unwrap();
    let consumers = stream.info().await.unwrap().state.consumer_count;
    assert!(consumers >= 1, "the long read did not use a consumer");

    // Stopping inside the consumer's part, at a sequence and by the visitor.
    let account = account();
    let cut = sequences[9_000];
    let at = Loaded::load(&store, account.as_ref(), "long", Until::Sequence(cut))
        .await
        .unwrap();
    assert_eq!((at.version, at.last_sequence), (9_001, cut));
    assert_eq!(account.state_to_json(&at.state)["balance"], 9_000);
    let mut chunks = 0;
    let mut seen = 0;
    store
        .read("account", "long", 1, |chunk| {
            chunks += 1;
            seen += chunk.len();
            if chunks == 6 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .await
        .unwrap();
    assert_eq!((chunks, seen), (6, 6_000));

    // Confirmed reads (histories) take the same path.
    let history = store.read_confirmed("account", "long", 1).await.unwrap();
    assert_eq!(history.len() as u64, count);
    assert_eq!(history.last().unwrap().sequence, *sequences.last().unwrap());
}

/// The consumer only speeds a read up: a user who may not create one
/// still reads everything, through direct gets.
#[tokio::test]
async fn long_reads_fall_back_to_direct_gets_without_the_right_to_a_consumer() {
    let server = NatsServer::start_configured(jetsource_test_support::Sync::Default, |_| {
        r#"
authorization {
  users: [
    { user: writer, password: writer }
    { user: reader, password: reader,
      permissions: { publish: { allow: [">"], deny: ["$JS.API.CONSUMER.>"] } } }
  ]
}
"#
        .into()
    });
    let connect = |user: &'static str| {
        let url = server.url();
        async move {
            async_nats::ConnectOptions::with_user_and_password(user.into(), user.into())
                .connect(url)
                .await
                .unwrap()
        }
    };
    let nats = NatsConfig {
        url: server.url(),
        ..Default::default()
    };
    let writer = EventStore::open(connect("writer").await, &nats, &StoreConfig::default())
        .await
        .unwrap();
    let count = 6_000;
    publish_long_history(writer.jetstream(), "long", count).await;
    let reader = EventStore::open(connect("reader").await, &nats, &StoreConfig::default())
        .await
        .unwrap();
    let loaded = Loaded::load(&reader, account().as_ref(), "long", Until::End)
        .await
        .unwrap();
    assert_eq!(loaded.version, count);
    let mut stream = writer.jetstream().get_stream("EVENTS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.consumer_count, 0);
}

/// Where users run it: on a 3-node R3 stream the reading consumer may sit
/// on any replica, and a confirmed read still misses nothing.
#[tokio::test]
async fn long_reads_through_a_consumer_miss_nothing_on_a_cluster() {
    let cluster = jetsource_test_support::NatsCluster::start();
    let client = cluster.client().await;
    let nats = NatsConfig {
        url: cluster.urls(),
        ..Default::default()
    };
    let config = StoreConfig {
        replicas: 3,
        ..Default::default()
    };
    let store = EventStore::open(client, &nats, &config).await.unwrap();
    let count = 9_000;
    publish_long_history(store.jetstream(), "long", count).await;
    let history = store.read_confirmed("account", "long", 1).await.unwrap();
    let versions: Vec<u64> = history.iter().map(|e| e.aggregate_version).collect();
    assert_eq!(versions, (1..=count).collect::<Vec<_>>());
    let mut stream = store.jetstream().get_stream("EVENTS").await.unwrap();
    assert!(stream.info().await.unwrap().state.consumer_count >= 1);
    // An unconfirmed read may see a lagging replica's prefix, never a gap
    // or a double.
    let mut read = Vec::new();
    store
        .read("account", "long", 1, |chunk| {
            read.extend(chunk.iter().map(|e| e.aggregate_version));
            ControlFlow::Continue(())
        })
        .await
        .unwrap();
    assert!(read.len() as u64 > 4_000, "only {} read", read.len());
    assert_eq!(read, (1..=read.len() as u64).collect::<Vec<_>>());
}
