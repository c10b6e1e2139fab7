//! Group commit against real servers: appends submitted together are
//! committed as shared atomic batches, and every member still gets exactly
//! the answer it would get alone (docs/ARCHITECTURE.md, "Group commit").
//!
//! Each round seeds aggregates, then submits a shuffled mix of members at
//! once (fine single- and multi-event appends, stale guards, resent command
//! ids, two appends racing on one aggregate, appends too big to share a
//! batch) to a store that groups whatever waits (`group_commit_after = 0`),
//! and checks every answer against what the member's own history implies,
//! the stream's contents, and that groups did form.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ops::ControlFlow;

use jetsource_aggregate::NewEvent;
use jetsource_core::config::{NatsConfig, StoreConfig};
use jetsource_core::integrity::{ChainHash, Head, TrustedKeys};
use jetsource_core::store::{Append, Appended, EventStore, StoreError, StoreErrorKind};
use jetsource_test_support::{NatsCluster, NatsServer};

fn events(event_type: &str, n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| NewEvent {
            event_type: event_type.into(),
            data: format!(r#"{{"amount":{}}}"#, i + 1).into_bytes(),
            sealed: None,
        })
        .collect()
}

/// What a member is, and so what it must hear back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Guard holds: stored.
    Fine,
    /// Guard older than the aggregate's last event: wrong last sequence.
    Stale,
    /// Its command id is the aggregate's last command, one event: the
    /// original's position, marked duplicate.
    ResentOne,
    /// Its command id is the aggregate's last command, several events:
    /// refused as already stored.
    ResentMany,
    /// Two appends on one aggregate with the same guard: one of them wins.
    Twin,
    /// 600 events: never fits in a batch beside another of its size.
    Big,
}

struct Member {
    id: String,
    kind: Kind,
    expected: u64,
    version: u64,
    events: Vec<NewEvent>,
    command_id: Option<String>,
    /// Chain head at `expected`.
    previous: Option<ChainHash>,
}

impl Member {
    fn append(&self) -> Append<'_> {
        Append {
            aggregate_type: "account",
            aggregate_id: &self.id,
            expected_last_sequence: self.expected,
            version: self.version,
            events: &self.events,
            schema_version: 1,
            command_id: self.command_id.as_deref(),
            correlation_id: "corr",
            causation_id: "cause",
            command_aggregate: None,
            previous_hash: self.previous,
        }
    }
}

/// Deterministic shuffling without a dependency: xorshift.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

async fn grouping_store(url: &str, replicas: usize) -> EventStore {
    let nats = NatsConfig {
        url: url.to_owned(),
        ..Default::default()
    };
    let config = StoreConfig {
        replicas,
        group_commit_after: Some(0),
        ..Default::default()
    };
    let client = async_nats::connect(
        url.split(',')
            .map(|u| u.parse().unwrap())
            .collect::<Vec<async_nats::ServerAddr>>(),
    )
    .await
    .unwrap();
    EventStore::open(client, &nats, &config).await.unwrap()
}

/// Seeds the aggregate of a member: an opening event, then (for resent
/// kinds) the command it resends. Returns (last sequence, version, the
/// resent command's first sequence, the chain head).
async fn seed(
    store: &EventStore,
    id: &str,
    kind: Kind,
    command_id: &str,
) -> (u64, u64, u64, Option<ChainHash>) {
    let opened = events("AccountOpened", 1);
    let mut first = Append {
        aggregate_type: "account",
        aggregate_id: id,
        expected_last_sequence: 0,
        version: 0,
        events: &opened,
        schema_version: 1,
        command_id: None,
        correlation_id: "corr",
        causation_id: "cause",
        command_aggregate: None,
        previous_hash: None,
    };
    let opened_at = store.append(&first).await.unwrap();
    let resent = match kind {
        Kind::ResentOne => events("Deposited", 1),
        Kind::ResentMany => events("Deposited", 2),
        _ => events("Deposited", 1),
    };
    first.expected_last_sequence = opened_at.last_sequence;
    first.version = 1;
    first.events = &resent;
    first.command_id = Some(command_id);
    first.previous_hash = opened_at.last_hash;
    let second = store.append(&first).await.unwrap();
    (
        second.last_sequence,
        1 + resent.len() as u64,
        second.first_sequence,
        second.last_hash,
    )
}

async fn round(store: &EventStore, round: u64) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (round + 1));
    // Mostly fine members, as in real traffic, and a few of each other kind.
    let kinds = [
        Kind::Stale,
        Kind::ResentOne,
        Kind::ResentMany,
        Kind::Twin,
        Kind::Fine,
        Kind::Fine,
        Kind::Fine,
        Kind::Fine,
        Kind::Fine,
        Kind::Fine,
    ];
    let mut members = Vec::new();
    let mut originals = BTreeMap::new();
    for k in 0..40 {
        let kind = kinds[(rng.next() % kinds.len() as u64) as usize];
        let id = format!("r{round}a{k}");
        let command = format!("cmd-{k}");
        let (last, version, original, previous) = seed(store, &id, kind, &command).await;
        let n = 1 + (rng.next() % 3) as usize;
        let member = |kind, expected, events, command_id| Member {
            id: id.clone(),
            kind,
            expected,
            version,
            events,
            command_id,
            previous,
        };
        match kind {
            Kind::Fine => members.push(member(
                kind,
                last,
                events("Deposited", n),
                Some(format!("new-{k}")),
            )),
            Kind::Stale => members.push(member(kind, last - 1, events("Deposited", n), None)),
            Kind::ResentOne => {
                originals.insert(id.clone(), original);
                members.push(member(kind, last, events("Deposited", 1), Some(command)));
            }
            Kind::ResentMany => {
                members.push(member(kind, last, events("Deposited", 2), Some(command)))
            }
            Kind::Twin => {
                members.push(member(kind, last, events("Deposited", n), None));
                members.push(member(kind, last, events("Withdrawn", 1), None));
            }
            Kind::Big => unreachable!("added below"),
        }
    }
    for k in 0..2 {
        let id = format!("r{round}big{k}");
        let (last, version, _, previous) = seed(store, &id, Kind::Big, "seed").await;
        members.push(Member {
            id,
            kind: Kind::Big,
            expected: last,
            version,
            events: events("Deposited", 600),
            command_id: None,
            previous,
        });
    }
    for i in (1..members.len()).rev() {
        members.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let before = store.last_sequence().await.unwrap();

    // All at once: the committer finds them queued together.
    let answers: Vec<Result<Appended, StoreError>> = futures::future::join_all(
        members
            .iter()
            .map(|m| async { store.append(&m.append()).await }),
    )
    .await;

    let mut twins_won: BTreeMap<&str, usize> = BTreeMap::new();
    let mut stored = 0;
    let mut expected_at: BTreeMap<u64, (&str, u64)> = BTreeMap::new();
    for (member, answer) in members.iter().zip(&answers) {
        let what = format!(
            "round {round}, {:?} member on {}: {answer:?}",
            member.kind, member.id
        );
        match member.kind {
            Kind::Fine | Kind::Big | Kind::Twin if answer.is_ok() => {
                let appended = answer.as_ref().unwrap();
                assert!(!appended.duplicate, "{what}");
                assert_eq!(
                    appended.last_sequence - appended.first_sequence + 1,
                    member.events.len() as u64,
                    "{what}"
                );
                assert!(appended.first_sequence > before, "{what}");
                for (i, seq) in (appended.first_sequence..=appended.last_sequence).enumerate() {
                    expected_at.insert(seq, (&member.id, member.version + i as u64 + 1));
                }
                stored += member.events.len() as u64;
                if member.kind == Kind::Twin {
                    *twins_won.entry(&member.id).or_default() += 1;
                }
            }
            Kind::Twin | Kind::Stale => {
                let e = answer.as_ref().unwrap_err();
                assert_eq!(e.kind(), StoreErrorKind::WrongLastSequence, "{what}");
                if member.kind == Kind::Twin {
                    twins_won.entry(&member.id).or_default();
                }
            }
            Kind::ResentOne => {
                let appended = answer.as_ref().unwrap();
                assert!(appended.duplicate, "{what}");
                assert_eq!(appended.first_sequence, originals[&member.id], "{what}");
            }
            Kind::ResentMany => {
                let e = answer.as_ref().unwrap_err();
                assert_eq!(e.kind(), StoreErrorKind::DuplicateCommand, "{what}");
            }
            Kind::Fine | Kind::Big => panic!("{what}: a fine append was refused"),
        }
    }
    for (id, won) in &twins_won {
        assert_eq!(*won, 1, "round {round}: exactly one twin on {id} is stored");
    }

    // The stream holds exactly the stored members' events where their
    // answers say, and groups did form.
    let mut batches: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    let mut found = 0;
    store
        .read_all(before + 1, |chunk| {
            for message in chunk {
                let headers = message.headers.clone().unwrap();
                if let Some(batch) = headers.get("Nats-Batch-Id") {
                    batches
                        .entry(batch.as_str().to_owned())
                        .or_default()
                        .insert(message.subject.clone());
                }
                let event = message.into_event().unwrap();
                let (id, version) = expected_at
                    .get(&event.sequence)
                    .unwrap_or_else(|| panic!("round {round}: unexpected event {event:?}"));
                assert_eq!(event.aggregate_id, *id);
                assert_eq!(event.aggregate_version, *version);
                found += 1;
            }
            ControlFlow::Continue(())
        })
        .await
        .unwrap();
    assert_eq!(found, stored, "round {round}: stored events");
    assert!(
        batches.values().any(|subjects| subjects.len() >= 3),
        "round {round}: no batch held the appends of several aggregates: {batches:?}"
    );
    // Every aggregate's hash chain holds across the groups it was
    // written in, link by link.
    let ids: BTreeSet<&str> = members.iter().map(|m| m.id.as_str()).collect();
    for id in ids {
        let mut head = Head::default();
        for event in store.read_confirmed("account", id, 1).await.unwrap() {
            head.advance(&event, &TrustedKeys::default())
                .unwrap_or_else(|e| panic!("round {round}: {id} at {}: {e}", event.sequence));
        }
        assert!(head.hash.is_some(), "round {round}: {id} unchained");
    }
}

#[tokio::test]
async fn grouped_appends_are_answered_as_if_alone() {
    let server = NatsServer::start();
    let store = grouping_store(&server.url(), 1).await;
    for r in 0..4 {
        round(&store, r).await;
    }
}

#[tokio::test]
async fn grouped_appends_are_answered_as_if_alone_on_a_cluster() {
    let cluster = NatsCluster::start();
    let _ready = cluster.client().await;
    let store = grouping_store(&cluster.urls(), 3).await;
    for r in 0..2 {
        round(&store, r).await;
    }
}
