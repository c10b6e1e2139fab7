//! What tamper evidence and crypto-shredding cost an append: the same
//! one-event appends through the event store with the hash chain off, on,
//! on and signed, and signed with a personal field sealed (AES-256-GCM,
//! the subject's key cached as in a command worker).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::anyhow;
use jetsource_core::aggregate::personal::{PersonalData, Subject};
use jetsource_core::aggregate::NewEvent;
use jetsource_core::config::{Config, NatsConfig, StoreConfig};
use jetsource_core::integrity::{ChainHash, Signer};
use jetsource_core::privacy::Privacy;
use jetsource_core::store::{Append, EventStore};

use crate::work::{connect, measure, Stats};

/// The variants measured, in order: label, chain, signed, sealed.
pub const VARIANTS: [(&str, bool, bool, bool); 4] = [
    ("plain", false, false, false),
    ("chain", true, false, false),
    ("chain+sign", true, true, false),
    ("chain+sign+seal", true, true, true),
];

const RULE: PersonalData = PersonalData {
    event_type: "UserCreated",
    subject: Subject::AggregateId { prefix: "bench-" },
    fields: &["/name"],
};

/// One store per variant on the server(s) at `nats_url`; appends/s at
/// each of `concurrency`, `ops` appends each.
pub async fn costs(
    nats_url: &str,
    replicas: usize,
    concurrency: &[usize],
    ops: usize,
) -> anyhow::Result<BTreeMap<String, BTreeMap<usize, Stats>>> {
    let keys = tempfile::tempdir()?;
    Signer::generate("bench")?.write(keys.path())?;
    let mut out: BTreeMap<String, BTreeMap<usize, Stats>> = BTreeMap::new();
    for (label, chain, signed, sealed) in VARIANTS {
        let config = Config {
            nats: NatsConfig {
                url: nats_url.to_owned(),
                ..Default::default()
            },
            store: StoreConfig {
                replicas,
                group_commit: false,
                chain,
                signing_key: signed.then(|| keys.path().join("bench.key")),
                ..Default::default()
            },
            ..Default::default()
        };
        let client = connect(nats_url).await?;
        let store = EventStore::open(client, &config.nats, &config.store).await?;
        let store = store.clone().with_privacy(Privacy::from_bucket(&store, &config));
        for &clients in concurrency {
            let heads: Arc<Vec<Mutex<(u64, u64, Option<ChainHash>)>>> =
                Arc::new((0..clients * 2).map(|_| Mutex::default()).collect());
            let store = store.clone();
            let stats = measure(
                &format!("{label} c={clients}"),
                clients,
                ops,
                move |c, _, run| {
                    let (store, heads) = (store.clone(), heads.clone());
                    async move { append(&store, &heads[c + run as usize * clients], c, clients, run, label, sealed).await }
                },
            )
            .await?;
            out.entry(label.to_owned()).or_default().insert(clients, stats);
        }
    }
    Ok(out)
}

/// One event for client `c`'s own aggregate, after its `head`.
async fn append(
    store: &EventStore,
    head: &Mutex<(u64, u64, Option<ChainHash>)>,
    c: usize,
    clients: usize,
    run: u64,
    label: &str,
    sealed: bool,
) -> anyhow::Result<()> {
    let (expected, version, previous) = *head.lock().map_err(|_| anyhow!("poisoned"))?;
    let id = format!("{}c{clients}r{run}n{c}", label.replace('+', "-"));
    let mut event = NewEvent {
        event_type: "UserCreated".into(),
        data: br#"{"name":"Ada Lovelace","plan":"basic"}"#.to_vec(),
        sealed: None,
    };
    if sealed {
        store
            .privacy()
            .seal("integritybench", &id, &mut event, &RULE)
            .await?;
    }
    let appended = store
        .append(&Append {
            aggregate_type: "integritybench",
            aggregate_id: &id,
            expected_last_sequence: expected,
            version,
            events: std::slice::from_ref(&event),
            schema_version: 1,
            command_id: None,
            correlation_id: "bench",
            causation_id: "bench",
            command_aggregate: None,
            previous_hash: previous,
        })
        .await?;
    *head.lock().map_err(|_| anyhow!("poisoned"))? =
        (appended.last_sequence, version + 1, appended.last_hash);
    Ok(())
}
