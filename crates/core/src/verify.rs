//! Verifying stored history: every aggregate's hash chain and signatures
//! recomputed from the events as stored, and the stream's sequence checked
//! for holes. Used by `jetsource verify` and the chaos run.
//!
//! Reads go through [`EventStore::read_confirmed`] (one aggregate) or the
//! whole stream up to the last sequence the stream leader reports, so a
//! replica that lags can never make an event look missing.

use std::collections::HashMap;
use std::ops::ControlFlow;

use serde::Serialize;

use crate::envelope::RecordedEvent;
use crate::integrity::{Broken, Head, TrustedKeys};
use crate::store::{EventStore, StoreError, StoredMessage};

/// The first broken link of one aggregate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// `<type>.<id>`.
    pub aggregate: String,
    /// Stream sequence of the event where the chain breaks.
    pub sequence: u64,
    /// The version that event claims.
    pub version: u64,
    /// Short name: altered, missing, reordered, unhashed, unsigned,
    /// unknown-key, bad-signature, unreadable.
    pub problem: &'static str,
    pub detail: String,
}

/// What a verification found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub events: u64,
    pub aggregates: u64,
    /// Events with a valid signature checked against a trusted key.
    pub signatures_checked: u64,
    /// Events written before hashing was on (nothing to check).
    pub unchained: u64,
    /// At most one per aggregate, in stream order.
    pub findings: Vec<Finding>,
    /// Stream sequences missing from the stream (`--all` only): an
    /// append-only stream has none, so each is a removed message.
    pub missing_sequences: Vec<u64>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty() && self.missing_sequences.is_empty()
    }
}

#[derive(Debug, Default)]
struct Chain {
    head: Head,
    /// Index of this aggregate's finding in the report.
    finding: Option<usize>,
    /// The version a "missing" finding waits for: if it shows up later,
    /// it was moved, not removed.
    awaiting: Option<u64>,
}

/// Checks events one at a time, in stream order, keeping one chain head
/// per aggregate.
#[derive(Debug)]
pub struct Verifier<'k> {
    trusted: &'k TrustedKeys,
    chains: HashMap<String, Chain>,
    report: Report,
    /// The next stream sequence expected, when checking a whole stream.
    next_sequence: Option<u64>,
}

/// Stream holes listed one by one up to this many; a bigger hole is
/// listed by its ends.
const MAX_LISTED_HOLE: u64 = 1000;

impl<'k> Verifier<'k> {
    pub fn new(trusted: &'k TrustedKeys) -> Self {
        Self {
            trusted,
            chains: HashMap::new(),
            report: Report::default(),
            next_sequence: None,
        }
    }

    /// Takes the next stored message of the stream (or of one aggregate).
    pub fn message(&mut self, message: StoredMessage) {
        if let Some(next) = self.next_sequence {
            self.hole(next, message.sequence);
        }
        if self.next_sequence.is_some() {
            self.next_sequence = Some(message.sequence + 1);
        }
        let (sequence, subject) = (message.sequence, message.subject.clone());
        match message.into_event() {
            Ok(event) => self.event(&event),
            Err(e) => {
                let aggregate = subject
                    .strip_prefix("events.")
                    .unwrap_or(&subject)
                    .to_owned();
                self.report.events += 1;
                let chain = self.chains.entry(aggregate.clone()).or_default();
                if chain.finding.is_none() {
                    chain.finding = Some(self.report.findings.len());
                    self.report.findings.push(Finding {
                        aggregate,
                        sequence,
                        version: 0,
                        problem: "unreadable",
                        detail: e.reason,
                    });
                }
            }
        }
    }

    fn hole(&mut self, expected: u64, found: u64) {
        if found <= expected {
            return;
        }
        let missing = &mut self.report.missing_sequences;
        if found - expected <= MAX_LISTED_HOLE {
            missing.extend(expected..found);
        } else {
            missing.extend([expected, found - 1]);
        }
    }

    /// Takes the next event.
    pub fn event(&mut self, event: &RecordedEvent) {
        self.report.events += 1;
        let key = format!("{}.{}", event.aggregate_type, event.aggregate_id);
        let chain = self.chains.entry(key.clone()).or_default();
        if let Some(index) = chain.finding {
            if chain.awaiting == Some(event.aggregate_version) {
                let finding = &mut self.report.findings[index];
                let broken = Broken::Reordered {
                    expected: event.aggregate_version,
                    found: finding.version,
                };
                finding.problem = broken.code();
                finding.detail = broken.to_string();
                chain.awaiting = None;
            }
            return;
        }
        match chain.head.advance(event, self.trusted) {
            Ok(()) => {
                if chain.head.hash.is_none() {
                    self.report.unchained += 1;
                }
                if event.signature.is_some() && !self.trusted.is_empty() {
                    self.report.signatures_checked += 1;
                }
            }
            Err(broken) => {
                if let Broken::Missing { expected, .. } = broken {
                    chain.awaiting = Some(expected);
                }
                chain.finding = Some(self.report.findings.len());
                self.report.findings.push(Finding {
                    aggregate: key,
                    sequence: event.sequence,
                    version: event.aggregate_version,
                    problem: broken.code(),
                    detail: broken.to_string(),
                });
            }
        }
    }

    pub fn events_seen(&self) -> u64 {
        self.report.events
    }

    pub fn finish(mut self) -> Report {
        self.report.aggregates = self.chains.len() as u64;
        self.report
    }
}

/// Verifies one aggregate's whole history.
pub async fn aggregate(
    store: &EventStore,
    trusted: &TrustedKeys,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Report, StoreError> {
    let mut verifier = Verifier::new(trusted);
    let subject = crate::envelope::event_subject(aggregate_type, aggregate_id);
    let last = store.leader_last_sequence(&subject).await?;
    for message in store.read_through(&subject, 1, last).await? {
        verifier.message(message);
    }
    Ok(verifier.finish())
}

/// Verifies every aggregate of the stream, and that no stream sequence is
/// missing, up to the last sequence the stream leader has now.
/// `progress` is called with the number of messages read so far.
pub async fn all(
    store: &EventStore,
    trusted: &TrustedKeys,
    mut progress: impl FnMut(u64),
) -> Result<Report, StoreError> {
    let info = store.info().await?;
    let last = info.state.last_sequence;
    let mut verifier = Verifier::new(trusted);
    verifier.next_sequence = Some(1);
    let mut seen = 0;
    store
        .read_all(1, |chunk| {
            for message in chunk {
                if message.sequence > last {
                    return ControlFlow::Break(());
                }
                seen = message.sequence;
                verifier.message(message);
            }
            progress(verifier.events_seen());
            ControlFlow::Continue(())
        })
        .await?;
    if seen < last {
        // A replica that lags answered the bulk: the leader has the rest.
        for message in store
            .read_through(
                &format!("{}.>", crate::envelope::EVENT_SUBJECT_PREFIX),
                seen + 1,
                last,
            )
            .await?
        {
            verifier.message(message);
        }
        progress(verifier.events_seen());
    }
    if let Some(next) = verifier.next_sequence {
        verifier.hole(next, last + 1);
    }
    Ok(verifier.finish())
}
