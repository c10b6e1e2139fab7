//! The shop end to end, against real nats-server and redis-server
//! processes: command worker, projector and snapshotter in-process (the
//! shop's `app()` handed to the framework's `run`s), the shop's own CLI
//! binary for a projection rebuild, and the shop's worker binaries on a
//! 3-node cluster.
//!
//! - orders placed, paid, shipped and cancelled, stock reserved and
//!   released, read back through the queries;
//! - the paged by-customer query: several pages, a cursor that ends in
//!   null, a stable order while new orders arrive, bad parameters `invalid`;
//! - `OrderPlaced` events stored at schema 1 by an older build, read as
//!   schema 2 by commands, the projector, temporal loads and snapshots, and
//!   a rebuild after the upcaster is added repairing a read model built
//!   without it;
//! - concurrent clients on a 3-node R3 cluster: every acknowledged order
//!   once in its customer's index.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jetsource::domain::{Aggregate, DomainError, NewEvent};
use jetsource::serde_json::{self, json, Value};
use jetsource::{App, Config};
use jetsource_core::config::{NatsConfig, RedisConfig};
use jetsource_core::loader::{Loaded, SnapshotUse, Until};
use jetsource_core::protocol::{decode_reply, CommandOutcome, ErrorBody, ErrorCode};
use jetsource_core::snapshot::{Snapshot, SnapshotStore};
use jetsource_core::store::{Append, EventStore};
use jetsource_shop::order::{Order, OrderCommand, OrderEvent, OrderState};
use jetsource_shop::{item, read_models};
use jetsource_test_support::{wait_for_service, NatsCluster, NatsServer, RedisServer};
use tokio::sync::watch;

/// Longest wait for anything the fleet does in the background.
const PATIENCE: Duration = Duration::from_secs(60);

#[allow(dead_code)] // held so the servers stop on drop
enum Nats {
    Single(NatsServer),
    Cluster(NatsCluster),
}

/// A worker running in this process until stopped.
struct Worker {
    role: &'static str,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Real servers and the shop's workers in-process.
struct Fleet {
    _nats: Nats,
    nats_url: String,
    redis: RedisServer,
    client: async_nats::Client,
    workers: Vec<Worker>,
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

impl Fleet {
    /// One nats-server, Redis, no workers yet.
    async fn start() -> Self {
        let nats = NatsServer::start();
        let client = nats.client().await;
        Self {
            nats_url: nats.url(),
            _nats: Nats::Single(nats),
            redis: RedisServer::start(),
            client,
            workers: Vec::new(),
        }
    }

    /// One nats-server, Redis, a command worker and a projector.
    async fn start_with_workers() -> Self {
        let mut fleet = Self::start().await;
        fleet.command_worker().await;
        fleet.projector(&jetsource_shop::app()).await;
        fleet
    }

    fn config(&self) -> Config {
        let mut config = Config {
            nats: NatsConfig {
                url: self.nats_url.clone(),
                ..Default::default()
            },
            redis: RedisConfig {
                url: self.redis.url(),
                ..Default::default()
            },
            ..Default::default()
        };
        config.projector.partitions = 4;
        config.projector.failover_ms = 1_000;
        config.projector.batch_size = 64;
        // An event a projection cannot read is dead-lettered at once.
        config.projector.max_attempts = 1;
        config.snapshot.every_by_type.insert("order".to_owned(), 3);
        config
    }

    fn spawn<F>(&mut self, role: &'static str, run: impl FnOnce(watch::Receiver<bool>) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(run(rx));
        self.workers.push(Worker { role, stop, task });
    }

    fn count(&self, role: &str) -> usize {
        self.workers.iter().filter(|w| w.role == role).count()
    }

    async fn command_worker(&mut self) {
        let config = self.config();
        let registry = jetsource_shop::app().registry().clone();
        self.spawn("command", |rx| async move {
            jetsource_command::run(config, registry, stopped(rx))
                .await
                .unwrap();
        });
        let n = self.count("command");
        wait_for_service(&self.client, "jetsource-command", n).await;
    }

    /// A projector keeping `app`'s projections.
    async fn projector(&mut self, app: &App) {
        let config = self.config();
        let projections = app.projections(&config);
        self.spawn("projector", |rx| async move {
            jetsource_projector::run(config, projections, stopped(rx))
                .await
                .unwrap();
        });
        let n = self.count("projector");
        wait_for_service(&self.client, "jetsource-projector", n).await;
    }

    async fn snapshotter(&mut self) {
        let config = self.config();
        let registry = jetsource_shop::app().registry().clone();
        self.spawn("snapshotter", |rx| async move {
            jetsource_snapshotter::run(config, registry, stopped(rx))
                .await
                .unwrap();
        });
        let n = self.count("snapshotter");
        wait_for_service(&self.client, "jetsource-snapshotter", n).await;
    }

    /// Stops every worker of `role` gracefully.
    async fn stop(&mut self, role: &str) {
        let (stopping, kept) = std::mem::take(&mut self.workers)
            .into_iter()
            .partition(|w| w.role == role);
        self.workers = kept;
        for worker in stopping {
            worker.stop.send_replace(true);
            worker.task.await.unwrap();
        }
    }

    async fn send(
        &self,
        aggregate_type: &str,
        id: &str,
        body: Value,
    ) -> Result<CommandOutcome, ErrorBody> {
        send(&self.client, aggregate_type, id, body).await
    }

    /// Sends a command that must succeed.
    async fn ok(&self, aggregate_type: &str, id: &str, body: Value) -> CommandOutcome {
        self.send(aggregate_type, id, body.clone())
            .await
            .unwrap_or_else(|e| panic!("{aggregate_type} {id} {body}: {e:?}"))
    }

    /// A query's `data`, or its error.
    async fn query(&self, subject: &str, body: Value) -> Result<Value, ErrorBody> {
        query(&self.client, subject, body)
            .await
            .map(|r| r["data"].clone())
    }

    /// A query's `data` once the read model reflects the whole stream.
    async fn read(&self, subject: &str, mut body: Value) -> Value {
        body["min_sequence"] = json!(self.last_sequence().await);
        body["timeout_ms"] = json!(30_000);
        self.query(subject, body.clone())
            .await
            .unwrap_or_else(|e| panic!("{subject} {body}: {e:?}"))
    }

    async fn store(&self) -> EventStore {
        let config = self.config();
        EventStore::open(self.client.clone(), &config.nats, &config.store)
            .await
            .unwrap()
    }

    async fn last_sequence(&self) -> u64 {
        self.store().await.last_sequence().await.unwrap()
    }

    /// Appends `OrderPlaced` as the first build of the shop wrote it:
    /// schema version 1, one line. Returns its stream sequence.
    async fn append_v1_order(
        &self,
        id: &str,
        customer: &str,
        sku: &str,
        quantity: u64,
        price: u64,
    ) -> u64 {
        let data = json!({"customer": customer, "sku": sku, "quantity": quantity, "price": price});
        let events = [NewEvent {
            event_type: "OrderPlaced".into(),
            data: data.to_string().into_bytes(),
            sealed: None,
        }];
        let store = self.store().await;
        let appended = store
            .append(&Append {
                aggregate_type: "order",
                aggregate_id: id,
                expected_last_sequence: 0,
                version: 0,
                events: &events,
                schema_version: 1,
                command_id: None,
                correlation_id: "v1-build",
                causation_id: "v1-build",
                command_aggregate: None,
                previous_hash: None,
            })
            .await
            .unwrap();
        // Stored as the old build stored it: the upgrade happens on reading.
        let stored = store.get(appended.last_sequence).await.unwrap().unwrap();
        assert_eq!(stored.schema_version, 1);
        assert_eq!(serde_json::from_slice::<Value>(&stored.data).unwrap(), data);
        appended.last_sequence
    }

    /// Every dead letter of `projection`: (original sequence, reason).
    async fn dead_letters(&self, projection: &str) -> Vec<(u64, String)> {
        let js = async_nats::jetstream::new(self.client.clone());
        let Ok(mut stream) = js
            .get_stream(&self.config().projector.dead_letter_stream)
            .await
        else {
            return Vec::new();
        };
        jetsource_projector::dlq::list(&mut stream)
            .await
            .unwrap()
            .into_iter()
            .filter(|l| l.projection == projection)
            .map(|l| (l.original_sequence, l.reason))
            .collect()
    }
}

use jetsource_test_support::requests::{query, send};

fn place(customer: &str, lines: Value) -> Value {
    json!({"type": "PlaceOrder", "data": {"customer": customer, "lines": lines}})
}

fn code(result: Result<impl std::fmt::Debug, ErrorBody>) -> (ErrorCode, String) {
    let e = result.expect_err("an error");
    (e.code, e.message)
}

/// Polls `check` until it gives a value, for up to [`PATIENCE`].
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orders_are_placed_paid_shipped_and_cancelled() {
    let fleet = Fleet::start_with_workers().await;
    for (sku, name, stock) in [("tea", "Green tea", 10), ("pot", "Teapot", 1)] {
        fleet
            .ok(
                "item",
                sku,
                json!({"type": "AddItem", "data": {"name": name}}),
            )
            .await;
        fleet
            .ok(
                "item",
                sku,
                json!({"type": "Restock", "data": {"quantity": stock}}),
            )
            .await;
    }

    // o1: placed, its stock reserved, paid (the exact total), shipped.
    let lines = json!([{"sku": "tea", "quantity": 2, "price": 150}, {"sku": "pot", "quantity": 1, "price": 2000}]);
    let placed = fleet.ok("order", "o1", place("ada", lines.clone())).await;
    assert_eq!(placed.version, 1);
    assert_eq!(placed.events[0].event_type, "OrderPlaced");
    for (sku, quantity) in [("tea", 2), ("pot", 1)] {
        fleet
            .ok(
                "item",
                sku,
                json!({"type": "Reserve", "data": {"order": "o1", "quantity": quantity}}),
            )
            .await;
    }
    // Short stock is a recorded refusal, not an error (see item.rs).
    let refused = fleet
        .ok(
            "item",
            "pot",
            json!({"type": "Reserve", "data": {"order": "o2", "quantity": 1}}),
        )
        .await;
    assert_eq!(refused.events[0].event_type, "ReservationRefused");
    assert_eq!(
        refused.events[0].data,
        json!({"order": "o2", "quantity": 1, "available": 0})
    );
    assert_eq!(
        code(fleet.send("order", "o1", json!({"type": "Ship"})).await),
        (ErrorCode::Rejected, "order is not paid yet".into())
    );
    assert_eq!(
        code(
            fleet
                .send(
                    "order",
                    "o1",
                    json!({"type": "Pay", "data": {"amount": 2299}})
                )
                .await
        ),
        (
            ErrorCode::Rejected,
            "amount 2299 does not match the order total 2300".into()
        )
    );
    fleet
        .ok(
            "order",
            "o1",
            json!({"type": "Pay", "data": {"amount": 2300}, "command_id": "pay-o1"}),
        )
        .await;
    let again = fleet
        .ok(
            "order",
            "o1",
            json!({"type": "Pay", "data": {"amount": 2300}, "command_id": "pay-o1"}),
        )
        .await;
    assert!(again.duplicate, "a resent payment is not applied twice");
    let shipped = fleet.ok("order", "o1", json!({"type": "Ship"})).await;
    assert_eq!(shipped.version, 3);
    for sku in ["tea", "pot"] {
        fleet
            .ok(
                "item",
                sku,
                json!({"type": "Fulfil", "data": {"order": "o1"}}),
            )
            .await;
    }
    assert_eq!(
        code(fleet.send("order", "o1", json!({"type": "Cancel"})).await),
        (ErrorCode::Rejected, "order already shipped".into())
    );

    // o2: placed, reserved, cancelled, released.
    fleet
        .ok(
            "order",
            "o2",
            place("ada", json!([{"sku": "tea", "quantity": 3, "price": 150}])),
        )
        .await;
    fleet
        .ok(
            "item",
            "tea",
            json!({"type": "Reserve", "data": {"order": "o2", "quantity": 3}}),
        )
        .await;
    fleet
        .ok(
            "order",
            "o2",
            json!({"type": "Cancel", "data": {"reason": "changed my mind"}}),
        )
        .await;
    fleet
        .ok(
            "item",
            "tea",
            json!({"type": "Release", "data": {"order": "o2"}}),
        )
        .await;
    // o3: placed only.
    fleet
        .ok(
            "order",
            "o3",
            place("bob", json!([{"sku": "tea", "quantity": 1, "price": 150}])),
        )
        .await;

    // Malformed commands are invalid; nothing is appended for them.
    for (id, body, fragment) in [
        ("o4", place("ada lovelace", lines.clone()), "customer"),
        ("o4", place("ada", json!([])), "at least one line"),
        (
            "o4",
            place("ada", json!([{"sku": "tea", "quantity": 1}])),
            "price",
        ),
        (
            "o4",
            json!({"type": "PlaceOrder", "data": {"customer": "ada", "lines": lines, "coupon": "x"}}),
            "unknown field",
        ),
        (
            "o1",
            json!({"type": "Pay", "data": {"amount": 0}}),
            "positive",
        ),
    ] {
        let (code, message) = code(fleet.send("order", id, body).await);
        assert_eq!(code, ErrorCode::Invalid, "{message}");
        assert!(
            message.contains(fragment),
            "{message:?} should mention {fragment:?}"
        );
    }

    let o1 = fleet.read("query.order.o1", json!({})).await;
    assert_eq!(o1["status"], "shipped");
    assert_eq!(o1["customer"], "ada");
    assert_eq!(o1["lines"], lines);
    assert_eq!(
        (o1["total"].clone(), o1["paid"].clone()),
        (json!(2300), json!(2300))
    );
    assert_eq!(o1["version"], 3);
    assert_eq!(o1["placed_sequence"], placed.sequence);
    let o2 = fleet.read("query.order.o2", json!({})).await;
    assert_eq!(
        (o2["status"].clone(), o2["reason"].clone()),
        (json!("cancelled"), json!("changed my mind"))
    );
    assert_eq!(
        code(fleet.query("query.order.o4", json!({})).await).0,
        ErrorCode::NotFound
    );

    let tea = fleet.read("query.item.tea", json!({})).await;
    assert_eq!(
        (
            tea["name"].clone(),
            tea["available"].clone(),
            tea["reserved"].clone(),
            tea["shipped"].clone()
        ),
        (json!("Green tea"), json!(8), json!(0), json!(2))
    );
    let pot = fleet.read("query.item.pot", json!({})).await;
    assert_eq!(
        (pot["available"].clone(), pot["shipped"].clone()),
        (json!(0), json!(1))
    );
    assert_eq!(
        fleet.read("query.items.low_stock", json!({})).await,
        json!([{"sku": "pot", "available": 0}])
    );
    assert_eq!(
        fleet
            .read("query.items.low_stock", json!({"threshold": 8}))
            .await,
        json!([{"sku": "pot", "available": 0}, {"sku": "tea", "available": 8}])
    );
    assert_eq!(
        fleet
            .read("query.items.low_stock", json!({"threshold": 8, "limit": 1}))
            .await,
        json!([{"sku": "pot", "available": 0}])
    );

    let ids = |page: &Value| -> Vec<String> {
        page["orders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["id"].as_str().unwrap().to_owned())
            .collect()
    };
    for (status, expected) in [
        ("placed", vec!["o3"]),
        ("paid", vec![]),
        ("shipped", vec!["o1"]),
        ("cancelled", vec!["o2"]),
    ] {
        let page = fleet
            .read(&format!("query.orders.by_status.{status}"), json!({}))
            .await;
        assert_eq!(ids(&page), expected, "{status}");
        assert_eq!(page["next"], Value::Null);
    }
    let ada = fleet.read("query.orders.by_customer.ada", json!({})).await;
    assert_eq!(ids(&ada), ["o2", "o1"], "newest first");
    assert_eq!(ada["orders"][1], o1, "entries are the orders themselves");
    let (code_, message) = code(fleet.query("query.orders.by_status.lost", json!({})).await);
    assert_eq!(code_, ErrorCode::Invalid);
    assert!(
        message.contains("placed, paid, shipped, cancelled"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orders_by_customer_come_in_stable_pages_newest_first() {
    let fleet = Fleet::start_with_workers().await;
    // 23 orders of ada (spread over the 4 partitions by order id) between
    // 5 of bob's.
    let mut ada = Vec::new();
    for i in 0..28 {
        let (customer, id) = if i % 5 == 4 {
            ("bob", format!("b{i:02}"))
        } else {
            ("ada", format!("a{i:02}"))
        };
        let placed = fleet
            .ok(
                "order",
                &id,
                place(
                    customer,
                    json!([{"sku": "tea", "quantity": 1 + i, "price": 10}]),
                ),
            )
            .await;
        if customer == "ada" {
            ada.push((placed.sequence, id));
        }
    }
    assert_eq!(ada.len(), 23);
    let newest_first: Vec<String> = ada.iter().rev().map(|(_, id)| id.clone()).collect();

    // Pages of 5: 5, 5, 5, 5, 3, then no cursor.
    let subject = "query.orders.by_customer.ada";
    let mut pages = Vec::new();
    let mut cursor = Value::Null;
    loop {
        let mut body = json!({"limit": 5});
        if !cursor.is_null() {
            body["before"] = cursor.clone();
        }
        let page = fleet.read(subject, body).await;
        let orders = page["orders"].as_array().unwrap().clone();
        if !page["next"].is_null() {
            assert_eq!(orders.len(), 5);
            assert_eq!(
                page["next"], orders[4]["placed_sequence"],
                "the cursor is the last entry's"
            );
        }
        pages.push(
            orders
                .iter()
                .map(|o| o["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>(),
        );
        cursor = page["next"].clone();
        if cursor.is_null() {
            break;
        }
        assert!(pages.len() < 10, "the cursor never ends");
    }
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        [5, 5, 5, 5, 3]
    );
    assert_eq!(pages.concat(), newest_first);

    // The default page is 20; a page that holds everything has no cursor.
    let first = fleet.read(subject, json!({})).await;
    assert_eq!(first["orders"].as_array().unwrap().len(), 20);
    assert_eq!(first["next"], ada[3].0);
    let all = fleet.read(subject, json!({"limit": 23})).await;
    assert_eq!(all["next"], Value::Null);

    // Orders placed while a client pages do not shift the pages after its
    // cursor: they are newer than every cursor it holds.
    let page1 = fleet.read(subject, json!({"limit": 5})).await;
    for i in 0..3 {
        fleet
            .ok(
                "order",
                &format!("late{i}"),
                place("ada", json!([{"sku": "tea", "quantity": 1, "price": 10}])),
            )
            .await;
    }
    let page2 = fleet
        .read(subject, json!({"limit": 5, "before": page1["next"]}))
        .await;
    let page2_ids: Vec<&str> = page2["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert_eq!(page2_ids, pages[1]);
    let fresh = fleet.read(subject, json!({"limit": 3})).await;
    assert_eq!(fresh["orders"][0]["id"], "late2");

    // Nobody's orders: an empty page.
    assert_eq!(
        fleet
            .read("query.orders.by_customer.nobody", json!({}))
            .await,
        json!({"orders": [], "next": null})
    );

    // Bad parameters are invalid, whoever finds them: the framework (type,
    // unknown field, key) or the query (range).
    for (subject, body) in [
        (subject, json!({"limit": 0})),
        (subject, json!({"limit": 101})),
        (subject, json!({"limit": "5"})),
        (subject, json!({"before": 0})),
        (subject, json!({"before": -7})),
        (subject, json!({"before": "a05"})),
        (subject, json!({"offset": 5})),
        ("query.orders.by_customer", json!({})),
        ("query.items.low_stock", json!({"threshold": -1})),
        ("query.items.low_stock", json!({"limit": 1001})),
    ] {
        let (code, message) = code(fleet.query(subject, body.clone()).await);
        assert_eq!(code, ErrorCode::Invalid, "{subject} {body}: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orders_stored_at_schema_1_are_read_as_schema_2_everywhere() {
    let mut fleet = Fleet::start_with_workers().await;
    fleet.snapshotter().await;
    let app = jetsource_shop::app();
    let order = app.registry().get("order").unwrap().clone();

    // The first build of the shop wrote these.
    let seq1 = fleet
        .append_v1_order("legacy-1", "old", "tea", 3, 250)
        .await;
    let seq2 = fleet
        .append_v1_order("legacy-2", "old", "pot", 1, 2000)
        .await;
    let v2_line = json!([{"sku": "tea", "quantity": 3, "price": 250}]);

    // (c) Temporal state: as of the v1 event, in the v2 shape.
    let store = fleet.store().await;
    let loaded = Loaded::load(&store, order.as_ref(), "legacy-1", Until::Sequence(seq1))
        .await
        .unwrap();
    assert_eq!(loaded.version, 1);
    let state = order.state_to_json(&loaded.state);
    assert_eq!(
        state,
        json!({"status": "placed", "confirmed": false, "customer": "old", "lines": v2_line, "total": 750})
    );
    let typed: OrderState = serde_json::from_value(state).unwrap();
    assert_eq!(typed.lines[0].quantity, 3);

    // (d) A snapshot the snapshotter takes on request holds the v2 state
    // and loads back.
    let snapshots = SnapshotStore::open(store.jetstream(), &fleet.config().snapshot, 1)
        .await
        .unwrap();
    fleet
        .client
        .publish("jetsource.snapshot.request.order.legacy-1", "".into())
        .await
        .unwrap();
    let snapshot = eventually("snapshot of legacy-1", || async {
        snapshots.get_raw("order", "legacy-1").await.unwrap()
    })
    .await;
    let snapshot = Snapshot::decode(&snapshot, Order::STATE_SCHEMA_VERSION).unwrap();
    assert_eq!((snapshot.version, snapshot.sequence), (1, seq1));
    assert_eq!(snapshot.state["lines"], v2_line);
    let (from_snapshot, used) =
        Loaded::load_with_snapshot(&store, &snapshots, order.as_ref(), "legacy-1", Until::End)
            .await
            .unwrap();
    assert_eq!(used, SnapshotUse::Used { version: 1 });
    assert_eq!(
        order.state_to_json(&from_snapshot.state),
        order.state_to_json(&loaded.state)
    );

    // (a) Commands are decided on the upcast state: the payment is checked
    // against the total of the v1 line, then the order ships; the other is
    // cancelled; placing either again is refused.
    assert_eq!(
        code(
            fleet
                .send(
                    "order",
                    "legacy-1",
                    json!({"type": "Pay", "data": {"amount": 250}})
                )
                .await
        ),
        (
            ErrorCode::Rejected,
            "amount 250 does not match the order total 750".into()
        )
    );
    let paid = fleet
        .ok(
            "order",
            "legacy-1",
            json!({"type": "Pay", "data": {"amount": 750}}),
        )
        .await;
    assert_eq!(paid.version, 2);
    let shipped = fleet.ok("order", "legacy-1", json!({"type": "Ship"})).await;
    assert_eq!(shipped.version, 3);
    fleet
        .ok(
            "order",
            "legacy-2",
            json!({"type": "Cancel", "data": {"reason": "discontinued"}}),
        )
        .await;
    assert_eq!(
        code(
            fleet
                .send("order", "legacy-2", place("old", v2_line.clone()))
                .await
        ),
        (ErrorCode::Rejected, "order already placed".into())
    );

    // The snapshotter followed legacy-1 from its v1 event and snapshots it
    // at version 3 (`snapshot.every_by_type.order = 3`).
    let snapshot = eventually("snapshot of legacy-1 at version 3", || async {
        let bytes = snapshots.get_raw("order", "legacy-1").await.unwrap()?;
        Snapshot::decode(&bytes, Order::STATE_SCHEMA_VERSION)
            .ok()
            .filter(|s| s.version == 3)
    })
    .await;
    assert_eq!(snapshot.state["status"], "shipped");
    assert_eq!(snapshot.state["lines"], v2_line);
    let (latest, used) =
        Loaded::load_with_snapshot(&store, &snapshots, order.as_ref(), "legacy-1", Until::End)
            .await
            .unwrap();
    assert_eq!(used, SnapshotUse::Used { version: 3 });
    let full = Loaded::load(&store, order.as_ref(), "legacy-1", Until::End)
        .await
        .unwrap();
    assert_eq!(
        order.state_to_json(&latest.state),
        order.state_to_json(&full.state)
    );

    // (b) The read model holds the v2 shape.
    let legacy1 = fleet.read("query.order.legacy-1", json!({})).await;
    assert_eq!(legacy1["lines"], v2_line);
    assert_eq!(
        (legacy1["total"].clone(), legacy1["status"].clone()),
        (json!(750), json!("shipped"))
    );
    assert_eq!(legacy1["placed_sequence"], seq1);
    let legacy2 = fleet.read("query.order.legacy-2", json!({})).await;
    assert_eq!(
        legacy2["lines"],
        json!([{"sku": "pot", "quantity": 1, "price": 2000}])
    );
    assert_eq!(legacy2["placed_sequence"], seq2);
    let old = fleet.read("query.orders.by_customer.old", json!({})).await;
    assert_eq!(old["orders"][0]["id"], "legacy-2");
    assert_eq!(old["orders"][1], legacy1);
    assert!(fleet.dead_letters("orders").await.is_empty());
}

/// The order aggregate of a build that bumped the event schema to 2 but
/// forgot the upcaster: same decisions, same state, schema-1 events
/// unreadable.
#[derive(Debug)]
struct OrderWithoutUpcaster;

impl Aggregate for OrderWithoutUpcaster {
    const TYPE: &'static str = Order::TYPE;
    const EVENT_SCHEMA_VERSION: u32 = Order::EVENT_SCHEMA_VERSION;
    const STATE_SCHEMA_VERSION: u32 = Order::STATE_SCHEMA_VERSION;
    type State = OrderState;
    type Command = OrderCommand;
    type Event = OrderEvent;

    fn handle(state: &OrderState, command: OrderCommand) -> Result<Vec<OrderEvent>, DomainError> {
        Order::handle(state, command)
    }

    fn apply(state: OrderState, event: &OrderEvent) -> OrderState {
        Order::apply(state, event)
    }
}

/// The shop as that build declared it.
fn app_without_upcaster() -> App {
    App::new("shop")
        .aggregate::<item::Item>()
        .aggregate::<OrderWithoutUpcaster>()
        .projection(read_models::Orders)
        .projection(read_models::Stock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_after_adding_the_upcaster_repairs_the_read_model() {
    let mut fleet = Fleet::start().await;
    fleet.command_worker().await;
    let legacy = fleet
        .append_v1_order("legacy-1", "old", "tea", 3, 250)
        .await;
    fleet
        .ok(
            "order",
            "new-1",
            place("old", json!([{"sku": "pot", "quantity": 1, "price": 2000}])),
        )
        .await;

    // The build without the upcaster cannot read the schema-1 event: the
    // projection dead-letters it and goes on.
    fleet.projector(&app_without_upcaster()).await;
    let new1 = fleet.read("query.order.new-1", json!({})).await;
    assert_eq!(new1["status"], "placed");
    assert_eq!(
        code(fleet.query("query.order.legacy-1", json!({})).await).0,
        ErrorCode::NotFound
    );
    let letters = eventually("the dead letter", || async {
        Some(fleet.dead_letters("orders").await).filter(|l| !l.is_empty())
    })
    .await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].0, legacy);
    assert!(letters[0].1.contains("lines"), "{}", letters[0].1);

    // The fixed build alone does not revisit what the projection passed.
    fleet.stop("projector").await;
    fleet.projector(&jetsource_shop::app()).await;
    let later = fleet
        .ok(
            "order",
            "legacy-1",
            json!({"type": "Pay", "data": {"amount": 750}}),
        )
        .await;
    assert_eq!(
        later.version, 2,
        "the command worker reads it through the upcaster"
    );
    let stale = fleet.read("query.orders.by_customer.old", json!({})).await;
    let ids: Vec<&str> = stale["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["new-1"], "legacy-1 was never indexed");

    // The operator rebuilds the projection with the shop's CLI.
    let output = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_shop"))
            .args(["--url", &fleet.nats_url, "projection", "rebuild", "orders"])
            .env("JETSOURCE__REDIS__URL", fleet.redis.url())
            .env("JETSOURCE__PROJECTOR__PARTITIONS", "4")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("the rebuild ends")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "shop projection rebuild orders: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("rebuilt orders"), "{stdout}");

    let legacy1 = fleet.read("query.order.legacy-1", json!({})).await;
    assert_eq!(
        legacy1["lines"],
        json!([{"sku": "tea", "quantity": 3, "price": 250}])
    );
    assert_eq!(
        (legacy1["status"].clone(), legacy1["paid"].clone()),
        (json!("paid"), json!(750))
    );
    let rebuilt = fleet.read("query.orders.by_customer.old", json!({})).await;
    assert_eq!(
        rebuilt["orders"][0],
        fleet.read("query.order.new-1", json!({})).await
    );
    assert_eq!(rebuilt["orders"][1], legacy1);
    assert_eq!(
        fleet.read("query.orders.by_status.paid", json!({})).await["orders"][0]["id"],
        "legacy-1"
    );
}

/// Dead-letter replay reads through the upcasters too: an event the old
/// build dead-lettered applies once the application declares the upcaster.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_replays_through_the_upcaster() {
    let mut fleet = Fleet::start().await;
    fleet.command_worker().await;
    let legacy = fleet
        .append_v1_order("legacy-2", "kim", "mug", 2, 900)
        .await;
    fleet.projector(&app_without_upcaster()).await;
    let letters = eventually("the dead letter", || async {
        Some(fleet.dead_letters("orders").await).filter(|l| !l.is_empty())
    })
    .await;
    assert_eq!(letters.iter().map(|l| l.0).collect::<Vec<_>>(), [legacy]);

    fleet.stop("projector").await;
    fleet.projector(&jetsource_shop::app()).await;
    let output = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_shop"))
            .args(["--url", &fleet.nats_url, "dlq", "replay"])
            .env("JETSOURCE__REDIS__URL", fleet.redis.url())
            .env("JETSOURCE__PROJECTOR__PARTITIONS", "4")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("the replay ends")
    .unwrap();
    assert!(
        output.status.success(),
        "shop dlq replay: {} {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let order = fleet.read("query.order.legacy-2", json!({})).await;
    assert_eq!(
        order["lines"],
        json!([{"sku": "mug", "quantity": 2, "price": 900}])
    );
    assert!(fleet.dead_letters("orders").await.is_empty());
}

/// A shop binary running as its own process, killed on drop.
struct Process(Child);

impl Process {
    fn start(binary: &str, env: &[(&str, String)]) -> Self {
        let mut command = Command::new(binary);
        command
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        for (k, v) in env {
            command.env(k, v);
        }
        Self(command.spawn().unwrap())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_concurrent_clients_find_each_order_once_in_its_customers_index() {
    let cluster = NatsCluster::start();
    let client = cluster.client().await;
    let redis = RedisServer::start();
    let env = [
        ("JETSOURCE__NATS__URL", cluster.urls()),
        ("JETSOURCE__REDIS__URL", redis.url()),
        ("JETSOURCE__STORE__REPLICAS", "3".to_owned()),
        ("JETSOURCE__PROJECTOR__PARTITIONS", "4".to_owned()),
        ("JETSOURCE__PROJECTOR__FAILOVER_MS", "1000".to_owned()),
    ];
    let mut workers = Vec::new();
    for _ in 0..2 {
        workers.push(Process::start(env!("CARGO_BIN_EXE_shop-command"), &env));
    }
    wait_for_service(&client, "jetsource-command", 2).await;
    for _ in 0..2 {
        workers.push(Process::start(env!("CARGO_BIN_EXE_shop-projector"), &env));
    }
    wait_for_service(&client, "jetsource-projector", 2).await;

    // 4 clients place 12 orders each for 3 customers, concurrently; an
    // ambiguous outcome is resent with the same command id.
    let customers = ["ada", "bob", "cy"];
    let mut clients = Vec::new();
    for c in 0..4 {
        let client = client.clone();
        clients.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0..12 {
                let id = format!("c{c}-{i}");
                let customer = customers[(c + i) % customers.len()];
                let body = json!({
                    "type": "PlaceOrder",
                    "data": {"customer": customer, "lines": [{"sku": "tea", "quantity": 1 + i, "price": 100}]},
                    "command_id": format!("place-{id}"),
                });
                let deadline = Instant::now() + PATIENCE;
                let outcome = loop {
                    let request = client.request(format!("cmd.order.{id}"), body.to_string().into());
                    // No reply (timed out, no responders) or `unavailable`:
                    // ambiguous, resent with the same command id.
                    let reply = tokio::time::timeout(Duration::from_secs(10), request).await;
                    if let Ok(Ok(reply)) = reply {
                        match decode_reply::<CommandOutcome>(&reply.payload).unwrap() {
                            Err(e) if e.code == ErrorCode::Unavailable => {}
                            other => break other,
                        }
                    }
                    assert!(Instant::now() < deadline, "order {id} never answered");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                let outcome = outcome.unwrap_or_else(|e| panic!("order {id}: {e:?}"));
                assert_eq!(outcome.version, 1, "order {id}");
                acknowledged.push((customer, id, outcome.sequence));
            }
            acknowledged
        }));
    }
    let mut expected: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut last = 0;
    for task in clients {
        for (customer, id, sequence) in task.await.unwrap() {
            assert!(expected.entry(customer).or_default().insert(id));
            last = last.max(sequence);
        }
    }
    assert_eq!(expected.values().map(BTreeSet::len).sum::<usize>(), 48);
    let js = async_nats::jetstream::new(client.clone());
    let info = js
        .get_stream("EVENTS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.num_replicas, 3, "the event stream is R3");

    for (customer, ids) in &expected {
        let mut seen = Vec::new();
        let mut cursor = Value::Null;
        loop {
            let mut body = json!({"limit": 7, "min_sequence": last, "timeout_ms": 30_000});
            if !cursor.is_null() {
                body["before"] = cursor;
            }
            let page = query(
                &client,
                &format!("query.orders.by_customer.{customer}"),
                body,
            )
            .await
            .unwrap();
            for order in page["data"]["orders"].as_array().unwrap() {
                seen.push((
                    order["placed_sequence"].as_u64().unwrap(),
                    order["id"].as_str().unwrap().to_owned(),
                ));
            }
            cursor = page["data"]["next"].clone();
            if cursor.is_null() {
                break;
            }
        }
        assert!(
            seen.windows(2).all(|w| w[0].0 > w[1].0),
            "{customer}: newest first, no entry twice: {seen:?}"
        );
        let found: Vec<String> = seen.into_iter().map(|(_, id)| id).collect();
        let unique: BTreeSet<String> = found.iter().cloned().collect();
        assert_eq!(found.len(), unique.len(), "{customer}: an order twice");
        assert_eq!(&unique, ids, "{customer}: exactly the acknowledged orders");
    }
}
