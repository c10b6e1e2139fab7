//! Process managers under load and faults: the shop's fulfilment process
//! driven by two `shop-process` workers that are SIGKILLed and replaced
//! again and again while clients place, pay and cancel orders (and leave
//! some unpaid until their payment deadline passes), on one node and on a
//! 3-node R3 cluster that also loses a node. At the end every order is
//! either confirmed and paid with all its stock reserved exactly once, or
//! cancelled with nothing left reserved; no reservation or release was
//! stored twice; and every item's units add up.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use jetsource_core::aggregate::Registry;
use jetsource_core::protocol::{decode_reply, CommandOutcome, ErrorCode};
use jetsource_core::store::EventStore;
use jetsource_test_support::{NatsCluster, NatsServer, Sync};
use jetsource_tests::{wait_for_service, Process};
use serde_json::{json, Value};

const ITEMS: [(&str, u64); 4] = [("pot", 24), ("tea", 40), ("cup", 30), ("jar", 12)];
const CLIENTS: usize = 6;
const ORDERS_PER_CLIENT: usize = 10;
/// Unpaid orders expire after this.
const PAY_WITHIN_SECS: u64 = 3;
/// Process workers killed (and replaced) during the run.
const KILLS: usize = 6;

/// Sends a command until a definite answer (`unavailable`, timeouts and
/// no responders are retried with the same command id).
async fn send(
    client: &async_nats::Client,
    target: &str,
    body: Value,
) -> Result<CommandOutcome, ErrorCode> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let request = client.request(format!("cmd.{target}"), body.to_string().into());
        if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(12), request).await {
            match decode_reply::<CommandOutcome>(&reply.payload).unwrap() {
                Ok(outcome) => return Ok(outcome),
                Err(e) if matches!(e.code, ErrorCode::Unavailable | ErrorCode::Timeout) => {}
                Err(e) => {
                    assert_ne!(
                        e.code,
                        ErrorCode::Internal,
                        "{target} {body}: {}",
                        e.message
                    );
                    return Err(e.code);
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{target} {body}: no definite answer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An order's lines: (sku, quantity).
type Lines = Vec<(String, u64)>;

/// Places every client's orders; pays about half at once and cancels
/// about one in six; the rest stay unpaid until they expire.
async fn place_orders(client: &async_nats::Client) -> BTreeMap<String, Lines> {
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut placed = Vec::new();
            for k in 0..ORDERS_PER_CLIENT {
                let id = format!("o{c}-{k}");
                let n = 1 + (c + k) % 3;
                let lines: Lines = (0..n)
                    .map(|i| {
                        let (sku, _) = ITEMS[(c * 3 + k + i) % ITEMS.len()];
                        (sku.to_owned(), 1 + ((c * 7 + k * 5 + i) % 4) as u64)
                    })
                    .collect();
                let body_lines: Vec<Value> = lines
                    .iter()
                    .map(|(sku, q)| json!({"sku": sku, "quantity": q, "price": 10}))
                    .collect();
                let total: u64 = lines.iter().map(|(_, q)| q * 10).sum();
                let place = json!({"type": "PlaceOrder", "command_id": "place", "data": {
                    "customer": format!("c{c}"), "lines": body_lines, "pay_within_secs": PAY_WITHIN_SECS}});
                send(&client, &format!("order.{id}"), place).await.unwrap();
                match k % 6 {
                    0 | 2 | 4 => {
                        let pay = json!({"type": "Pay", "command_id": "pay", "data": {"amount": total}});
                        let _ = send(&client, &format!("order.{id}"), pay).await;
                    }
                    1 => {
                        let cancel = json!({"type": "Cancel", "command_id": "cancel", "data": {"reason": "changed my mind"}});
                        let _ = send(&client, &format!("order.{id}"), cancel).await;
                    }
                    _ => {}
                }
                placed.push((id, lines));
            }
            placed
        }));
    }
    let mut orders = BTreeMap::new();
    for task in tasks {
        orders.extend(task.await.unwrap());
    }
    orders
}

/// The state of `<aggregate_type>.<id>` as the stream leader has it.
async fn state(store: &EventStore, registry: &Registry, aggregate_type: &str, id: &str) -> Value {
    let aggregate = registry.get(aggregate_type).unwrap();
    let events = store.read_confirmed(aggregate_type, id, 1).await.unwrap();
    let folded = aggregate
        .fold(&aggregate.initial(), &mut events.iter().map(|e| e.stored()))
        .unwrap();
    aggregate.state_to_json(&folded)
}

/// What is wrong with `order` now (`None`: settled as it must be).
fn unsettled(
    order: &Value,
    lines: &Lines,
    items: &HashMap<String, Value>,
    id: &str,
) -> Option<String> {
    let held = |sku: &str| items[sku]["reservations"][id].as_u64();
    match order["status"].as_str().unwrap() {
        "cancelled" => lines
            .iter()
            .find(|(sku, _)| held(sku).is_some())
            .map(|(sku, _)| format!("cancelled but {sku} still holds units")),
        "paid" if order["confirmed"] == true => lines
            .iter()
            .find(|(sku, q)| held(sku) != Some(*q))
            .map(|(sku, q)| format!("confirmed but {sku} holds {:?}, not {q}", held(sku))),
        status => Some(format!("{status}, confirmed {}", order["confirmed"])),
    }
}

/// Waits until every order is settled, then checks the stream.
async fn check(client: &async_nats::Client, url: &str, orders: &BTreeMap<String, Lines>) {
    let store = jetsource_tests::open_store(client, url).await;
    let registry = jetsource_shop::app().registry().clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut items = HashMap::new();
        for (sku, _) in ITEMS {
            items.insert(sku.to_owned(), state(&store, &registry, "item", sku).await);
        }
        let mut problems = Vec::new();
        for (id, lines) in orders {
            let order = state(&store, &registry, "order", id).await;
            if let Some(problem) = unsettled(&order, lines, &items, id) {
                problems.push(format!("{id}: {problem}"));
            }
        }
        if problems.is_empty() {
            for (sku, stock) in ITEMS {
                let item = &items[sku];
                let held: u64 = item["reservations"]
                    .as_object()
                    .unwrap()
                    .values()
                    .map(|v| v.as_u64().unwrap())
                    .sum();
                assert_eq!(
                    item["available"].as_u64().unwrap() + held,
                    stock,
                    "{sku}: units add up"
                );
            }
            break;
        }
        if Instant::now() >= deadline {
            let id = problems[0].split(':').next().unwrap();
            let mut history = Vec::new();
            for (t, i) in [("order", id), ("fulfilment", id)] {
                for e in store.read_confirmed(t, i, 1).await.unwrap() {
                    let data = String::from_utf8_lossy(&e.data).into_owned();
                    history.push(format!("#{} {t} {} {data}", e.sequence, e.event_type));
                }
            }
            for (sku, _) in ITEMS {
                for e in store.read_confirmed("item", sku, 1).await.unwrap() {
                    let data = String::from_utf8_lossy(&e.data).into_owned();
                    if data.contains(&format!("\"{id}\"")) {
                        history.push(format!(
                            "#{} item {sku} {} {data}",
                            e.sequence, e.event_type
                        ));
                    }
                }
            }
            history.sort_by_key(|l| l[1..].split(' ').next().unwrap().parse::<u64>().unwrap());
            panic!(
                "not settled: {problems:#?}\nhistory of {id}:\n{}",
                history.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // No reservation or release stored twice for one order.
    let mut seen: HashMap<(String, String, String), usize> = HashMap::new();
    let mut cancelled_by_deadline = 0;
    for (sku, _) in ITEMS {
        for event in store.read_confirmed("item", sku, 1).await.unwrap() {
            let data: Value = serde_json::from_slice(&event.data).unwrap();
            if let Some(order) = data["order"].as_str() {
                *seen
                    .entry((sku.to_owned(), order.to_owned(), event.event_type.clone()))
                    .or_default() += 1;
                assert!(
                    event.correlation_id.as_deref() == Some(format!("fulfilment.{order}").as_str()),
                    "{sku}: {} of {order} not sent by its fulfilment",
                    event.event_type
                );
            }
        }
    }
    for (key, n) in &seen {
        assert_eq!(*n, 1, "{key:?} stored {n} times");
    }
    for id in orders.keys() {
        let events = store.read_confirmed("order", id, 1).await.unwrap();
        if events.iter().any(|e| {
            e.event_type == "OrderCancelled"
                && e.data.as_ref() == br#"{"reason":"payment not received in time"}"#
        }) {
            cancelled_by_deadline += 1;
        }
    }
    assert!(
        cancelled_by_deadline > 0,
        "some orders expired by their deadline"
    );
    // A process instance reads like any aggregate.
    let (id, _) = orders.iter().next().unwrap();
    let instance = state(&store, &registry, "fulfilment", id).await;
    assert!(instance["state"]["lines"].is_object(), "{instance}");
}

/// Adds and stocks the items.
async fn stock_items(client: &async_nats::Client) {
    for (sku, stock) in ITEMS {
        send(
            client,
            &format!("item.{sku}"),
            json!({"type": "AddItem", "command_id": "add", "data": {"name": sku}}),
        )
        .await
        .unwrap();
        send(
            client,
            &format!("item.{sku}"),
            json!({"type": "Restock", "command_id": "stock", "data": {"quantity": stock}}),
        )
        .await
        .unwrap();
    }
}

/// Runs the orders while killing a process worker every so often and
/// starting a replacement (`start` starts one); returns the orders and the
/// workers left running, which settle what is left.
async fn run_with_kills(
    client: &async_nats::Client,
    start: impl Fn() -> Process,
) -> (BTreeMap<String, Lines>, Vec<Process>) {
    let mut workers = vec![start(), start()];
    wait_for_service(client, "jetsource-process", 2).await;
    let orders = tokio::spawn({
        let client = client.clone();
        async move { place_orders(&client).await }
    });
    for kill in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let victim = workers.remove(kill % workers.len());
        victim.signal("KILL");
        drop(victim);
        workers.push(start());
    }
    (orders.await.unwrap(), workers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_settle_while_process_workers_are_killed_on_one_node() {
    let server = NatsServer::start_with(Sync::Always);
    let client = server.client().await;
    let _commands: Vec<Process> = (0..2)
        .map(|_| Process::start("shop-command", &server, &[]))
        .collect();
    wait_for_service(&client, "jetsource-command", 2).await;
    stock_items(&client).await;
    let (orders, _workers) =
        run_with_kills(&client, || Process::start("shop-process", &server, &[])).await;
    check(&client, &server.url(), &orders).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_settle_while_process_workers_and_a_node_are_killed_on_a_cluster() {
    let mut cluster = NatsCluster::start_with(Sync::Always);
    let client = cluster.client().await;
    let urls = cluster.urls();
    let env = [("JETSOURCE__STORE__REPLICAS", "3")];
    let _commands: Vec<Process> = (0..2)
        .map(|_| Process::start_at("shop-command", &urls, &env, None))
        .collect();
    wait_for_service(&client, "jetsource-command", 2).await;
    stock_items(&client).await;
    cluster.kill_node(2);
    let (orders, _workers) = run_with_kills(&client, || {
        Process::start_at("shop-process", &urls, &env, None)
    })
    .await;
    cluster.start_node(2);
    check(&client, &urls, &orders).await;
}

/// A deadline outlives everything that could forget it: the order is
/// placed, the process worker schedules its payment deadline and dies;
/// nats-server is killed and started again after the deadline has passed;
/// a new process worker then expires the order and releases its stock.
/// The CLI shows the instance like any aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_fires_after_the_worker_and_the_server_restarted() {
    let mut server = NatsServer::start_with(Sync::Always);
    let client = server.client().await;
    let command = Process::start("shop-command", &server, &[]);
    let process = Process::start("shop-process", &server, &[]);
    wait_for_service(&client, "jetsource-command", 1).await;
    wait_for_service(&client, "jetsource-process", 1).await;
    stock_items(&client).await;
    let line = json!([{"sku": "tea", "quantity": 3, "price": 10}]);
    let place = json!({"type": "PlaceOrder", "command_id": "place", "data": {
        "customer": "ada", "lines": line, "pay_within_secs": 2}});
    send(&client, "order.late", place).await.unwrap();
    // Wait until the stock is reserved (the deadline is scheduled in the
    // same drive, before its wake-up is acknowledged).
    let store = jetsource_tests::open_store(&client, &server.url()).await;
    let registry = jetsource_shop::app().registry().clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while state(&store, &registry, "order", "late").await["confirmed"] != true {
        assert!(Instant::now() < deadline, "the order was not confirmed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let placed_at = Instant::now();
    process.signal("KILL");
    drop(process);
    drop(command);
    server.kill();
    // Down past the deadline.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(placed_at.elapsed())).await;
    server.restart();
    let client = server.client().await;
    let _command = Process::start("shop-command", &server, &[]);
    let _process = Process::start("shop-process", &server, &[]);
    wait_for_service(&client, "jetsource-process", 1).await;
    let store = jetsource_tests::open_store(&client, &server.url()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let order = state(&store, &registry, "order", "late").await;
        let tea = state(&store, &registry, "item", "tea").await;
        if order["status"] == "cancelled" && tea["reservations"].get("late").is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "not expired: {order} {tea}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, out, err) = jetsource_tests::cli_bin_at(
        "shop",
        &server.url(),
        &[],
        &["--json", "state", "fulfilment", "late"],
    );
    assert_eq!(code, 0, "{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        shown["state"]["state"]["reason"], "payment not received in time",
        "{out}"
    );
    assert_eq!(
        shown["state"]["state"]["lines"]["tea"]["stock"], "released",
        "{out}"
    );
}
