//! Prometheus metrics (docs/METRICS.md): the names every worker records
//! under, the process-wide recorder, and its text rendering for
//! `GET /metrics` on the health listener.
//!
//! Recording goes through the `metrics` facade, so a library records
//! without knowing whether anything collects; the workers install the
//! Prometheus recorder at start ([`install`]). Labels only ever take values
//! from bounded sets: registered aggregate and command types, declared
//! projections and queries, error codes; anything a request made up is
//! recorded as `unknown`, so a hostile client cannot grow the series.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Commands answered, by `aggregate_type`, `command_type` and `outcome`
/// (`ok`, or the error code: `invalid`, `rejected`, `conflict`,
/// `unavailable`, `timeout`, `internal`, ...).
pub const COMMANDS: &str = "jetsource_commands_total";
/// Time from a command's arrival to its reply, by `aggregate_type`.
pub const COMMAND_DURATION: &str = "jetsource_command_duration_seconds";
/// One append (a command's events, one atomic write) to the event store.
pub const APPEND_DURATION: &str = "jetsource_append_duration_seconds";
/// Appends committed together as one atomic batch (group commit).
pub const APPEND_GROUP_SIZE: &str = "jetsource_append_group_size";
/// Groups the server refused because of one member (its guard or command
/// id); their members were sorted out and written again.
pub const APPEND_GROUPS_REFUSED: &str = "jetsource_append_groups_refused_total";
/// Decisions taken again after another writer appended first (optimistic
/// concurrency), by `aggregate_type`.
pub const COMMAND_CONFLICTS: &str = "jetsource_command_conflicts_total";
/// Aggregate state found in the command worker's cache (`hit`) or loaded
/// from the store (`miss`), by `result`.
pub const CACHE_LOOKUPS: &str = "jetsource_aggregate_cache_lookups_total";
/// Events read after the snapshot when loading an aggregate (the
/// snapshot's age in events), by `aggregate_type`.
pub const SNAPSHOT_TAIL: &str = "jetsource_snapshot_tail_events";

/// Inputs a process instance handled, by `process` and `kind` (`event`,
/// `answer`, `deadline`).
pub const PROCESS_INPUTS: &str = "jetsource_process_inputs_total";
/// Commands a process sent, by `process` and `outcome` (`done`,
/// `refused`, `unanswered`: no definite answer yet, sent again later).
pub const PROCESS_COMMANDS: &str = "jetsource_process_commands_total";

/// Events applied to a read model, by `projection`.
pub const PROJECTOR_EVENTS: &str = "jetsource_projector_events_applied_total";
/// Events per batch written to Redis, by `projection`.
pub const PROJECTOR_BATCH: &str = "jetsource_projector_batch_events";
/// Events the projection's consumer still has to deliver, by `projection`.
pub const PROJECTOR_LAG_EVENTS: &str = "jetsource_projector_lag_events";
/// Age of the newest applied event when it was applied (0 when caught
/// up), by `projection`.
pub const PROJECTOR_LAG_SECONDS: &str = "jetsource_projector_lag_seconds";
/// Events a projection could not apply, parked in the dead-letter stream,
/// by `projection`.
pub const DEAD_LETTERS: &str = "jetsource_dead_letters_total";
/// Queries answered, by `query` (its declared name) and `outcome`.
pub const QUERIES: &str = "jetsource_queries_total";
/// Time from a query's arrival to its reply, by `query`.
pub const QUERY_DURATION: &str = "jetsource_query_duration_seconds";

/// Snapshots written, by `aggregate_type`.
pub const SNAPSHOTS_WRITTEN: &str = "jetsource_snapshots_written_total";
/// Events the snapshotter's consumer still has to deliver.
pub const SNAPSHOTTER_LAG_EVENTS: &str = "jetsource_snapshotter_lag_events";

/// Gateway requests, by `route` (the matched pattern, e.g.
/// `/v1/commands/{aggregate_type}/{aggregate_id}`), `method` and `status`.
pub const HTTP_REQUESTS: &str = "jetsource_http_requests_total";
/// Gateway request latency, by `route`.
pub const HTTP_DURATION: &str = "jetsource_http_request_duration_seconds";

/// The label value for anything outside a bounded set.
pub const UNKNOWN: &str = "unknown";

/// Latency buckets, in seconds: 0.5 ms to 10 s (the command deadline).
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Size buckets, in events.
const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder for this process (the first call; later
/// calls, e.g. several workers in one test process, share it) and returns
/// its handle; `None` if another recorder was installed first.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let built = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_events".into()), SIZE_BUCKETS))
                .and_then(PrometheusBuilder::install_recorder);
            match built {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics stays empty");
                    None
                }
            }
        })
        .clone()
}

/// Help texts, as `# HELP` lines.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        COMMANDS,
        "Commands answered, by aggregate type, command type and outcome."
    );
    describe_histogram!(
        COMMAND_DURATION,
        Unit::Seconds,
        "Time from a command's arrival to its reply."
    );
    describe_histogram!(
        APPEND_DURATION,
        Unit::Seconds,
        "One append of a command's events to the event store."
    );
    describe_histogram!(
        APPEND_GROUP_SIZE,
        Unit::Count,
        "Appends of concurrent commands committed together as one atomic batch."
    );
    describe_counter!(
        APPEND_GROUPS_REFUSED,
        "Groups of appends refused because of one member, then sorted out."
    );
    describe_counter!(
        COMMAND_CONFLICTS,
        "Decisions taken again after another writer appended first."
    );
    describe_counter!(
        CACHE_LOOKUPS,
        "Aggregate states found in the cache (hit) or loaded (miss)."
    );
    describe_histogram!(
        SNAPSHOT_TAIL,
        "Events read after the snapshot when loading an aggregate."
    );
    describe_counter!(PROJECTOR_EVENTS, "Events applied to a read model.");
    describe_histogram!(PROJECTOR_BATCH, "Events per batch written to Redis.");
    describe_gauge!(
        PROJECTOR_LAG_EVENTS,
        "Events the projection's consumer still has to deliver."
    );
    describe_gauge!(
        PROJECTOR_LAG_SECONDS,
        Unit::Seconds,
        "Age of the newest applied event when applied; 0 when caught up."
    );
    describe_counter!(
        DEAD_LETTERS,
        "Events a projection could not apply, parked as dead letters."
    );
    describe_counter!(QUERIES, "Queries answered, by query and outcome.");
    describe_histogram!(
        QUERY_DURATION,
        Unit::Seconds,
        "Time from a query's arrival to its reply."
    );
    describe_counter!(SNAPSHOTS_WRITTEN, "Snapshots written.");
    describe_gauge!(
        SNAPSHOTTER_LAG_EVENTS,
        "Events the snapshotter's consumer still has to deliver."
    );
    describe_counter!(
        HTTP_REQUESTS,
        "Gateway requests, by route pattern, method and status."
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "Gateway request latency, to the response head."
    );
}

/// The `outcome` label of a reply: `ok` or the error code.
pub fn outcome<T>(reply: &Result<T, crate::protocol::ErrorBody>) -> &'static str {
    match reply {
        Ok(_) => "ok",
        Err(e) => e.code.as_str(),
    }
}
