//! Real nats-server and redis-server, in-process command worker and
//! projector copies.

#![allow(dead_code, clippy::unwrap_used)]

use jetsource_core::config::{Config, NatsConfig, RedisConfig};
use jetsource_core::loader::{Loaded, Until};
use jetsource_core::protocol::{CommandOutcome, ErrorBody};
use jetsource_core::store::EventStore;
use jetsource_test_support::{wait_for_service, NatsServer, RedisServer};
use serde_json::{json, Value};
use tokio::sync::watch;

/// An account appended by [`Env::append_backlog`]: the sequence of its
/// opening, and of each deposit with its amount, in order.
#[derive(Debug, Clone)]
pub struct Backlog {
    pub id: String,
    pub opened: u64,
    pub deposits: Vec<(u64, u64)>,
}

impl Backlog {
    /// The account's events at or below `sequence` (its version there).
    pub fn version_at(&self, sequence: u64) -> u64 {
        if self.opened > sequence {
            return 0;
        }
        1 + self.deposits.iter().filter(|(s, _)| *s <= sequence).count() as u64
    }

    pub fn balance(&self) -> u64 {
        self.deposits.iter().map(|(_, amount)| amount).sum()
    }
}

pub struct Env {
    pub nats: NatsServer,
    pub redis: RedisServer,
    pub client: async_nats::Client,
    workers: Vec<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
    projectors: Vec<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
}

impl Env {
    pub async fn start() -> Self {
        let nats = NatsServer::start();
        let redis = RedisServer::start();
        let client = nats.client().await;
        let mut env = Self {
            nats,
            redis,
            client,
            workers: Vec::new(),
            projectors: Vec::new(),
        };
        env.add_worker().await;
        env
    }

    pub fn config(&self) -> Config {
        let mut config = Config {
            nats: NatsConfig {
                url: self.nats.url(),
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
        config.projector.recent_transactions = 5;
        config
    }

    pub async fn add_worker(&mut self) {
        let (stop, mut rx) = watch::channel(false);
        let config = self.config();
        let task = tokio::spawn(async move {
            jetsource_command::run(config, jetsource_bank::registry(), async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
            .unwrap();
        });
        self.workers.push((stop, task));
        wait_for_service(&self.client, "jetsource-command", self.workers.len()).await;
    }

    pub async fn add_projector(&mut self) {
        let config = self.config();
        let projections = jetsource_bank::projections(&config);
        self.add_projector_with(projections).await;
    }

    pub async fn add_projector_with(
        &mut self,
        projections: Vec<std::sync::Arc<dyn jetsource_projector::projection::Projection>>,
    ) {
        let config = self.config();
        self.add_projector_configured(config, projections).await;
    }

    pub async fn add_projector_configured(
        &mut self,
        config: Config,
        projections: Vec<std::sync::Arc<dyn jetsource_projector::projection::Projection>>,
    ) {
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            jetsource_projector::run(config, projections, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
            .unwrap();
        });
        self.projectors.push((stop, task));
        wait_for_service(&self.client, "jetsource-projector", self.projectors.len()).await;
    }

    /// Stops projector copy `i` gracefully.
    pub async fn stop_projector(&mut self, i: usize) {
        let (stop, task) = self.projectors.remove(i);
        stop.send_replace(true);
        task.await.unwrap();
    }

    pub async fn send(
        &self,
        aggregate_type: &str,
        id: &str,
        body: Value,
    ) -> Result<CommandOutcome, ErrorBody> {
        jetsource_test_support::requests::send(&self.client, aggregate_type, id, body).await
    }

    /// A query reply: `Ok({"sequence", "data"})` or the error.
    pub async fn query(&self, subject: &str, body: Value) -> Result<Value, ErrorBody> {
        jetsource_test_support::requests::query(&self.client, subject, body).await
    }

    /// The event store, reading personal fields as an admin would.
    pub async fn store(&self) -> EventStore {
        let config = self.config();
        let store = EventStore::open(self.client.clone(), &config.nats, &config.store)
            .await
            .unwrap();
        let privacy = jetsource_core::privacy::Privacy::from_bucket(&store, &config);
        store.with_privacy(privacy)
    }

    pub async fn last_sequence(&self) -> u64 {
        self.store().await.info().await.unwrap().state.last_sequence
    }

    /// Appends, straight to the store (many appends at once, faster than
    /// commands), `deposits` deposits to each of `accounts` new accounts
    /// `<prefix><i>`, in rounds: every account's opening, then every
    /// account's first deposit, and so on, so that each stretch of the
    /// stream has events of every account. A backlog for a projector.
    pub async fn append_backlog(
        &self,
        prefix: &str,
        accounts: usize,
        deposits: u64,
    ) -> Vec<Backlog> {
        let store = self.store().await;
        let mut backlog: Vec<Backlog> = (0..accounts)
            .map(|a| Backlog {
                id: format!("{prefix}{a}"),
                opened: 0,
                deposits: Vec::new(),
            })
            .collect();
        for version in 0..=deposits {
            let appends = backlog.iter().enumerate().map(|(a, account)| {
                let store = store.clone();
                let amount = (a as u64 * 7 + version) % 9 + 1;
                let last = account.deposits.last().map_or(account.opened, |d| d.0);
                async move {
                    let (event_type, data) = if version == 0 {
                        ("AccountOpened", json!({"owner": "o"}))
                    } else {
                        ("Deposited", json!({"amount": amount}))
                    };
                    let event = jetsource_core::aggregate::NewEvent {
                        event_type: event_type.into(),
                        data: data.to_string().into_bytes(),
                        sealed: None,
                    };
                    let appended = store
                        .append(&jetsource_core::store::Append {
                            aggregate_type: "account",
                            aggregate_id: &account.id,
                            expected_last_sequence: last,
                            version,
                            events: std::slice::from_ref(&event),
                            schema_version: 1,
                            command_id: None,
                            correlation_id: "backlog",
                            causation_id: "backlog",
                            command_aggregate: None,
                            previous_hash: store.hash_at(last).await.unwrap(),
                        })
                        .await
                        .unwrap();
                    (appended.last_sequence, amount)
                }
            });
            let appended = futures::future::join_all(appends).await;
            for (account, (sequence, amount)) in backlog.iter_mut().zip(appended) {
                if version == 0 {
                    account.opened = sequence;
                } else {
                    account.deposits.push((sequence, amount));
                }
            }
        }
        backlog
    }

    /// The state of an aggregate folded from the event stream.
    pub async fn fold(&self, aggregate_type: &str, id: &str) -> (u64, Value) {
        let registry = jetsource_bank::registry();
        let aggregate = registry.get(aggregate_type).unwrap();
        let loaded = Loaded::load(&self.store().await, aggregate.as_ref(), id, Until::End)
            .await
            .unwrap();
        (loaded.version, aggregate.state_to_json(&loaded.state))
    }

    /// Asserts that the read models of `accounts` and `users` equal a fresh
    /// fold of the stream, once they reflect everything appended so far.
    pub async fn assert_read_models_match(&self, accounts: &[String], users: &[String]) {
        let last = self.last_sequence().await;
        let wait = json!({"min_sequence": last, "timeout_ms": 30000});
        let mut open = 0i64;
        let mut sum = 0i64;
        let mut ranked = Vec::new();
        for id in accounts {
            let (version, state) = self.fold("account", id).await;
            let reply = self
                .query(&format!("query.account.{id}"), wait.clone())
                .await;
            if version == 0 {
                assert_eq!(
                    reply.unwrap_err().code,
                    jetsource_core::protocol::ErrorCode::NotFound
                );
                continue;
            }
            let reply = reply.unwrap_or_else(|e| panic!("account {id}: {e}"));
            let data = &reply["data"];
            assert_eq!(data["balance"], state["balance"], "balance of {id}");
            assert_eq!(data["owner"], state["owner"], "owner of {id}");
            assert_eq!(data["status"], state["status"], "status of {id}");
            assert_eq!(data["version"], version, "version of {id}");
            // Recent transactions newest first: applied in stream order.
            let seqs: Vec<u64> = data["recent_transactions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["sequence"].as_u64().unwrap())
                .collect();
            assert!(
                seqs.windows(2).all(|w| w[0] > w[1]),
                "{id}: transactions out of order {seqs:?}"
            );
            if state["status"] == "open" {
                open += 1;
                ranked.push((id.clone(), state["balance"].as_i64().unwrap()));
            }
            sum += state["balance"].as_i64().unwrap();
        }
        let totals = self
            .query("query.accounts.totals", wait.clone())
            .await
            .unwrap();
        assert_eq!(
            totals["data"],
            json!({"open_accounts": open, "balance_sum": sum})
        );
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        ranked.truncate(5);
        let top = self
            .query(
                "query.accounts.top",
                json!({"limit": 5, "min_sequence": last}),
            )
            .await
            .unwrap();
        let got: Vec<(String, i64)> = top["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["id"].as_str().unwrap().to_owned(),
                    e["balance"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, ranked, "top 5 by balance");
        for id in users {
            let (_, state) = self.fold("user", id).await;
            let reply = self.query(&format!("query.user.{id}"), wait.clone()).await;
            if state["status"] == "active" {
                assert_eq!(reply.unwrap()["data"]["name"], state["name"], "user {id}");
            } else {
                assert_eq!(
                    reply.unwrap_err().code,
                    jetsource_core::protocol::ErrorCode::NotFound,
                    "user {id}"
                );
            }
        }
    }

    /// A deterministic mixed workload over `accounts` accounts and `users`
    /// users; returns their ids.
    pub async fn mixed_workload(
        &self,
        prefix: &str,
        accounts: usize,
        users: usize,
        rounds: usize,
    ) -> (Vec<String>, Vec<String>) {
        let account_ids: Vec<String> = (0..accounts).map(|i| format!("{prefix}a{i}")).collect();
        let user_ids: Vec<String> = (0..users).map(|i| format!("{prefix}u{i}")).collect();
        for (i, id) in account_ids.iter().enumerate() {
            let initial = if i % 2 == 0 { 10 * i as u64 + 5 } else { 0 };
            self.send("account", id, json!({"type": "OpenAccount", "data": {"owner": format!("owner {i}"), "initial_deposit": initial}}))
                .await
                .unwrap();
        }
        for (i, id) in user_ids.iter().enumerate() {
            self.send(
                "user",
                id,
                json!({"type": "CreateUser", "data": {"name": format!("user {i}")}}),
            )
            .await
            .unwrap();
        }
        for round in 0..rounds {
            for (i, id) in account_ids.iter().enumerate() {
                let amount = ((i * 31 + round * 7) % 40 + 1) as u64;
                let kind = if (i + round) % 3 == 0 {
                    "Withdraw"
                } else {
                    "Deposit"
                };
                // Withdrawals beyond the balance are refused: fine, nothing appended.
                let _ = self
                    .send(
                        "account",
                        id,
                        json!({"type": kind, "data": {"amount": amount}}),
                    )
                    .await;
            }
        }
        // Close a few accounts (after emptying them), rename and delete users.
        for id in account_ids.iter().step_by(5) {
            let (_, state) = self.fold("account", id).await;
            let balance = state["balance"].as_u64().unwrap();
            if balance > 0 {
                self.send(
                    "account",
                    id,
                    json!({"type": "Withdraw", "data": {"amount": balance}}),
                )
                .await
                .unwrap();
            }
            self.send("account", id, json!({"type": "CloseAccount"}))
                .await
                .unwrap();
        }
        for (i, id) in user_ids.iter().enumerate() {
            if i % 2 == 0 {
                self.send(
                    "user",
                    id,
                    json!({"type": "RenameUser", "data": {"name": format!("renamed {i}")}}),
                )
                .await
                .unwrap();
            }
            if i % 3 == 0 {
                self.send("user", id, json!({"type": "DeleteUser"}))
                    .await
                    .unwrap();
            }
        }
        (account_ids, user_ids)
    }
}
