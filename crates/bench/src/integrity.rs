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

/// An aggregate's last sequence, version and chain hash.
type Tail = (u64, u64, Option<ChainHash>);

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
        let store = store
            .clone()
            .with_privacy(Privacy::from_bucket(&store, &config));
        for &clients in concurrency {
            let heads: Arc<Vec<Mutex<Tail>>> =
                Arc::new((0..clients * 2).map(|_| Mutex::default()).collect());
            let store = store.clone();
            let stats = measure(
                &format!("{label} c={clients}"),
                clients,
                ops,
                move |c, _, run| {
                    let (store, heads) = (store.clone(), heads.clone());
                    async move {
                        append(
                            &store,
                            &heads[c + run as usize * clients],
                            c,
                            clients,
                            run,
                            label,
                            sealed,
                        )
                        .await
                    }
                },
            )
            .await?;
            out.entry(label.to_owned())
                .or_default()
                .insert(clients, stats);
        }
    }
    Ok(out)
}

/// CPU time per event, in µs, of what the variants add, without I/O:
/// `link` (SHA-256 of one event), `sign` (Ed25519), `verify` (a load's
/// check of one signed link: the hash again and the signature).
pub fn cpu_costs(events: u32) -> anyhow::Result<BTreeMap<String, f64>> {
    use jetsource_core::integrity::{link, Head, Linked, TrustedKeys};
    use std::time::Instant;
    let signer = Signer::generate("cpu")?;
    let data = br#"{"name":"Ada Lovelace","plan":"basic"}"#;
    let linked = |version: u64, id: &'static str| Linked {
        aggregate_type: "integritybench",
        aggregate_id: "cpu",
        aggregate_version: version,
        event_id: id,
        event_type: "UserCreated",
        schema_version: 1,
        command_id: None,
        command_aggregate: None,
        correlation_id: Some("bench"),
        causation_id: Some("bench"),
        data_subject: None,
        sealed: None,
        data,
    };
    let per = |started: Instant| started.elapsed().as_secs_f64() * 1e6 / f64::from(events);
    let started = Instant::now();
    let mut previous = None;
    for version in 1..=u64::from(events) {
        previous = Some(link(previous.as_ref(), &linked(version, "e")));
    }
    let link_us = per(started);
    let hash = previous.ok_or_else(|| anyhow!("no events"))?;
    let started = Instant::now();
    for _ in 0..events {
        std::hint::black_box(signer.sign(&hash));
    }
    let sign_us = per(started);
    // A signed chain, then one load's check of every link.
    let mut chain = Vec::new();
    let mut previous = None;
    for version in 1..=u64::from(events) {
        let h = link(previous.as_ref(), &linked(version, "e"));
        chain.push(jetsource_core::envelope::RecordedEvent {
            sequence: version,
            timestamp: time::OffsetDateTime::UNIX_EPOCH,
            aggregate_type: "integritybench".into(),
            aggregate_id: "cpu".into(),
            aggregate_version: version,
            event_id: "e".into(),
            event_type: "UserCreated".into(),
            schema_version: 1,
            command_id: None,
            correlation_id: Some("bench".into()),
            causation_id: Some("bench".into()),
            hash: Some(h.to_string()),
            signature: Some(signer.sign(&h)),
            signing_key: Some("cpu".into()),
            data: bytes::Bytes::from_static(data),
            ..Default::default()
        });
        previous = Some(h);
    }
    let mut trusted = TrustedKeys::default();
    trusted.add(&signer);
    let started = Instant::now();
    let mut head = Head::default();
    for event in &chain {
        head.advance(event, &trusted)
            .map_err(|e| anyhow!("benchmark chain broken: {e}"))?;
    }
    let verify_us = per(started);
    Ok(BTreeMap::from([
        ("link".to_owned(), link_us),
        ("sign".to_owned(), sign_us),
        ("verify".to_owned(), verify_us),
    ]))
}

/// One event for client `c`'s own aggregate, after its `head`.
async fn append(
    store: &EventStore,
    head: &Mutex<Tail>,
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
