//! The bank's loyalty process under the run's faults: waiting for it to
//! settle after the load, and the check that every milestone deposit was
//! rewarded exactly once (no reward credited twice however often the
//! process workers died, no milestone forgotten, none made up).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use jetsource_bank::loyalty::MILESTONE;
use jetsource_core::envelope::RecordedEvent;
use tokio::time::Instant;

use crate::checks::{check, Check};

/// The process's command ids start with this (`<process>:<id>:<key>`).
pub const COMMAND_PREFIX: &str = "loyalty:";

/// Waits until the loyalty process has nothing left to do: its consumers
/// on the event and deadline streams have nothing pending or unacknowledged,
/// and no deadline is waiting. `Err` says what was still busy at the end.
pub async fn settle(admin: &async_nats::Client, within: Duration) -> Result<Duration, String> {
    let js = jetstream::new(admin.clone());
    let started = Instant::now();
    loop {
        let busy = busy(&js).await;
        match busy {
            None => return Ok(started.elapsed()),
            Some(why) if started.elapsed() >= within => {
                return Err(format!("not settled after {within:?}: {why}"))
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// What keeps the process busy, if anything.
async fn busy(js: &jetstream::Context) -> Option<String> {
    for stream in ["EVENTS", "DEADLINES"] {
        let info = async {
            let stream = js.get_stream(stream).await.ok()?;
            let mut consumer: jetstream::consumer::PullConsumer =
                stream.get_consumer("process-loyalty").await.ok()?;
            let info = consumer.info().await.ok()?;
            Some((info.num_pending, info.num_ack_pending))
        };
        match info.await {
            Some((0, 0)) => {}
            Some((pending, unacked)) => {
                return Some(format!(
                    "{stream}: {pending} pending, {unacked} unacknowledged"
                ))
            }
            None => return Some(format!("cannot read the process's consumer on {stream}")),
        }
    }
    let deadlines = js.get_stream("DEADLINES").await.ok()?;
    match deadlines.info_with_subjects("deadline.>").await {
        Ok(mut info) => {
            let mut left = Vec::new();
            while let Some(Ok((subject, n))) = info.next().await {
                left.push(format!("{subject} ({n})"));
            }
            (!left.is_empty()).then(|| format!("deadline messages left: {}", left.join(", ")))
        }
        Err(e) => Some(format!("cannot read DEADLINES: {e}")),
    }
}

/// Every deposit at a milestone version has exactly one reward credited by
/// the process (command id `loyalty:<account>:reward-<version>`), and every
/// reward stored has its milestone.
pub fn rewards(events: &[RecordedEvent], settled: &Result<Duration, String>) -> Check {
    let mut due: HashMap<(String, String), usize> = HashMap::new();
    for e in events {
        if e.event_type == "Deposited" && e.aggregate_version % MILESTONE == 0 {
            let id = format!(
                "{COMMAND_PREFIX}{}:reward-{}",
                e.aggregate_id, e.aggregate_version
            );
            due.insert((e.aggregate_id.clone(), id), 0);
        }
    }
    let mut problems = Vec::new();
    for e in events.iter().filter(|e| e.event_type == "Rewarded") {
        let id = e.command_id.clone().unwrap_or_default();
        match due.get_mut(&(e.aggregate_id.clone(), id.clone())) {
            Some(n) => *n += 1,
            None => problems.push(format!(
                "#{} {}: reward {id:?} for no milestone",
                e.sequence, e.aggregate_id
            )),
        }
    }
    let milestones = due.len();
    for ((account, id), n) in &due {
        match n {
            1 => {}
            0 if settled.is_err() => {}
            0 => problems.push(format!("{account}: {id} never credited")),
            n => problems.push(format!("{account}: {id} credited {n} times")),
        }
    }
    if let Err(why) = settled {
        problems.push(why.clone());
    }
    problems.sort();
    let passed = problems.is_empty();
    let detail = match settled {
        Ok(took) if passed => format!(
            "{milestones} milestone deposits, each rewarded exactly once; the process settled {:.1} s after the load",
            took.as_secs_f64()
        ),
        _ => format!(
            "{milestones} milestone deposits: {} problems, e.g. {}",
            problems.len(),
            problems.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
        ),
    };
    check("process-rewards", passed, detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fold::tests::event;
    use serde_json::json;

    fn reward(seq: u64, account: &str, milestone: u64) -> RecordedEvent {
        let id = format!("{COMMAND_PREFIX}{account}:reward-{milestone}");
        event(
            seq,
            account,
            100 + seq,
            &id,
            "Rewarded",
            json!({"amount": 1}),
        )
    }

    #[test]
    fn each_milestone_is_rewarded_exactly_once() {
        let mut events = vec![event(
            1,
            "a",
            MILESTONE,
            "d",
            "Deposited",
            json!({"amount": 5}),
        )];
        let settled = Ok(Duration::from_secs(1));
        let missing = rewards(&events, &settled);
        assert!(
            !missing.passed && missing.detail.contains("never credited"),
            "{}",
            missing.detail
        );
        events.push(reward(2, "a", MILESTONE));
        let once = rewards(&events, &settled);
        assert!(once.passed, "{}", once.detail);
        events.push(reward(3, "a", MILESTONE));
        events.push(reward(4, "a", 2 * MILESTONE));
        let twice = rewards(&events, &settled);
        assert!(
            twice.detail.contains("credited 2 times"),
            "{}",
            twice.detail
        );
        assert!(
            twice.detail.contains("for no milestone"),
            "{}",
            twice.detail
        );
        let unsettled = rewards(&events[..2], &Err("not settled".into()));
        assert!(!unsettled.passed);
    }
}
