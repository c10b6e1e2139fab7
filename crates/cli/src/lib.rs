//! The CLI of a jetsource application: the operator's and developer's view
//! of the event store. An application's CLI binary calls [`main`] with its
//! aggregates and projections.

mod ops;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use jetsource_core::aggregate::Registry;
use jetsource_core::config::Config;
use jetsource_core::envelope::RecordedEvent;
use jetsource_core::loader::{Loaded, Until};
use jetsource_core::protocol::{command_subject, decode_reply, CommandOutcome, CommandRequest};
use jetsource_core::store::EventStore;
use jetsource_projector::projection::Projection;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use table::Table;

#[derive(Debug, Parser)]
#[command(
    name = "jetsource",
    version,
    about = "Send commands to and read the history of a jetsource event store"
)]
struct Cli {
    /// Configuration file (TOML); see jetsource.example.toml.
    #[arg(long, global = true, env = "JETSOURCE_CONFIG")]
    config: Option<PathBuf>,
    /// NATS server URL (overrides the configuration).
    #[arg(long, global = true, env = "NATS_URL")]
    url: Option<String>,
    /// Print JSON instead of tables, for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send a command: `jetsource send account a1 Deposit '{"amount":100}'`.
    Send {
        aggregate_type: String,
        aggregate_id: String,
        command_type: String,
        /// Command data as a JSON object (default `{}`).
        data: Option<String>,
        /// Idempotency key: resending with the same id appends nothing.
        #[arg(long)]
        command_id: Option<String>,
        /// Refuse unless the aggregate is at exactly this version.
        #[arg(long)]
        expected_version: Option<u64>,
        /// How long to wait for the reply.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// The audit trail of one aggregate: every event with sequence, time,
    /// type and data.
    History {
        aggregate_type: String,
        aggregate_id: String,
    },
    /// An aggregate's state now, or as it was at a sequence or an instant.
    State {
        aggregate_type: String,
        aggregate_id: String,
        /// Fold events up to and including this stream sequence.
        #[arg(long, conflicts_with = "at_time")]
        at_seq: Option<u64>,
        /// Fold events stored at or before this RFC 3339 instant.
        #[arg(long)]
        at_time: Option<String>,
    },
    /// The event stream's configuration and size.
    Stream,
    /// Query a read model: `jetsource query account acc-1 --min-sequence 42`.
    Query {
        /// `account`, `accounts.top`, `accounts.totals` or `user`.
        what: String,
        id: Option<String>,
        /// Wait until the read model reflects this stream sequence.
        #[arg(long)]
        min_sequence: Option<u64>,
        /// Number of entries for `accounts.top`.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Read models: status, rebuild.
    Projection {
        #[command(subcommand)]
        command: ProjectionCommand,
    },
    /// Dead letters: events a projection could not apply.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Aggregate snapshots: status, rebuild.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// How many snapshots, how old, how far behind their aggregates.
    Status,
    /// Recompute the snapshots of every aggregate (of one type) from a full
    /// replay, replacing what is stored.
    Rebuild { aggregate_type: Option<String> },
}

#[derive(Debug, Subcommand)]
enum ProjectionCommand {
    /// Per projection: generation, checkpoint, the stream's last sequence,
    /// lag in events and in time, rebuild in progress.
    Status,
    /// Build a projection afresh from sequence 1 into a new key space while
    /// the current one keeps serving, then switch atomically and delete the
    /// old keys.
    Rebuild { name: String },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Every dead letter with its reason.
    List,
    /// Apply dead letters again with the current projection code; those
    /// that succeed leave the dead-letter stream.
    Replay {
        /// Only this dead letter (its sequence in the dead-letter stream).
        #[arg(long)]
        seq: Option<u64>,
    },
}

/// What the CLI knows of the application it belongs to.
pub(crate) struct Domain {
    pub registry: Registry,
    pub projections: Vec<Arc<dyn Projection>>,
}

/// Runs the CLI of the application `name` (used in help), with its
/// aggregates and the projections it keeps for a configuration.
pub fn main(
    name: &str,
    registry: Registry,
    projections: impl FnOnce(&Config) -> Vec<Arc<dyn Projection>>,
) -> ExitCode {
    let matches = Cli::command().name(name.to_owned()).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, registry, projections)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", jetsource_core::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

async fn run(
    cli: Cli,
    registry: Registry,
    projections: impl FnOnce(&Config) -> Vec<Arc<dyn Projection>>,
) -> anyhow::Result<()> {
    let mut config = Config::load(cli.config.as_deref())?;
    let domain = Domain {
        projections: projections(&config),
        registry,
    };
    if let Some(url) = cli.url {
        config.nats.url = url;
    }
    config.nats.connect_timeout_ms = config.nats.connect_timeout_ms.min(5000);
    let client = jetsource_core::connect(&config.nats, "jetsource-cli").await?;
    match cli.command {
        Command::Send {
            aggregate_type,
            aggregate_id,
            command_type,
            data,
            command_id,
            expected_version,
            timeout_ms,
        } => {
            let data: Value = match data {
                Some(text) => serde_json::from_str(&text)
                    .with_context(|| format!("command data {text:?} is not valid JSON"))?,
                None => json!({}),
            };
            let request = CommandRequest {
                command_type,
                data,
                command_id,
                expected_version,
                correlation_id: None,
            };
            let subject = command_subject(&aggregate_type, &aggregate_id);
            let reply = tokio::time::timeout(
                Duration::from_millis(timeout_ms),
                client.request(subject.clone(), serde_json::to_vec(&request)?.into()),
            )
            .await
            .map_err(|_| {
                anyhow!(
                    "no reply on {subject} within {timeout_ms} ms; is jetsource-command running?"
                )
            })?
            .map_err(|e| {
                anyhow!("request on {subject} failed: {e}; is jetsource-command running?")
            })?;
            let outcome = decode_reply::<CommandOutcome>(&reply.payload)
                .context("the reply is not a jetsource reply")?;
            if cli.json {
                println!("{}", String::from_utf8_lossy(&reply.payload));
            }
            let outcome = outcome.map_err(|e| anyhow!("{}: {}", e.code, e.message))?;
            if !cli.json {
                println!(
                    "ok: {aggregate_type} {aggregate_id} now at version {}, sequence {}",
                    outcome.version, outcome.sequence
                );
                let mut table = Table::new(["TYPE", "DATA"]);
                for event in &outcome.events {
                    table.row([event.event_type.clone(), event.data.to_string()]);
                }
                if outcome.events.is_empty() {
                    println!("(no events: nothing to change)");
                } else {
                    print!("{table}");
                }
            }
        }
        Command::History {
            aggregate_type,
            aggregate_id,
        } => {
            let store = EventStore::open(client, &config.nats, &config.store).await?;
            let events: Vec<RecordedEvent> = store
                .read_confirmed(&aggregate_type, &aggregate_id, 1)
                .await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&events)?);
            } else if events.is_empty() {
                bail!("{aggregate_type} {aggregate_id} has no events");
            } else {
                let mut table = Table::new(["SEQ", "TIME", "VERSION", "TYPE", "DATA", "COMMAND"]);
                for e in &events {
                    table.row([
                        e.sequence.to_string(),
                        rfc3339(e.timestamp),
                        e.aggregate_version.to_string(),
                        e.event_type.clone(),
                        String::from_utf8_lossy(&e.data).into_owned(),
                        e.command_id.clone().unwrap_or_default(),
                    ]);
                }
                print!("{table}");
            }
        }
        Command::State {
            aggregate_type,
            aggregate_id,
            at_seq,
            at_time,
        } => {
            let registry = &domain.registry;
            let aggregate = registry.get(&aggregate_type).ok_or_else(|| {
                anyhow!(
                    "unknown aggregate type {aggregate_type:?}; known types: {}",
                    registry.types().collect::<Vec<_>>().join(", ")
                )
            })?;
            let until = match (at_seq, at_time) {
                (Some(seq), _) => Until::Sequence(seq),
                (None, Some(t)) => {
                    Until::Time(OffsetDateTime::parse(&t, &Rfc3339).with_context(|| {
                        format!("--at-time {t:?} is not an RFC 3339 time like 2026-01-31T12:00:00Z")
                    })?)
                }
                (None, None) => Until::End,
            };
            let store = EventStore::open(client, &config.nats, &config.store).await?;
            let snapshots = jetsource_core::snapshot::SnapshotStore::open(
                store.jetstream(),
                &config.snapshot,
                config.store.replicas,
            )
            .await?;
            // From the latest snapshot that does not go past the point.
            let (mut loaded, used) = Loaded::load_with_snapshot(
                &store,
                &snapshots,
                aggregate.as_ref(),
                &aggregate_id,
                until,
            )
            .await?;
            // "No events" and the state shown must not depend on a replica
            // that lags.
            loaded
                .catch_up_confirmed(&store, aggregate.as_ref(), &aggregate_id, until)
                .await?;
            if loaded.version == 0 {
                let point = match until {
                    Until::End => String::new(),
                    Until::Sequence(s) => format!(" at or before sequence {s}"),
                    Until::Time(t) => format!(" at or before {}", rfc3339(t)),
                };
                bail!("{aggregate_type} {aggregate_id} has no events{point}");
            }
            let state = aggregate.state_to_json(&loaded.state);
            let timestamp = loaded.last_timestamp.map(rfc3339);
            if cli.json {
                let out = json!({
                    "snapshot": format!("{used:?}"),
                    "aggregate_type": aggregate_type,
                    "aggregate_id": aggregate_id,
                    "version": loaded.version,
                    "sequence": loaded.last_sequence,
                    "timestamp": timestamp,
                    "state": state,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "{aggregate_type} {aggregate_id} at version {} (sequence {}, {})",
                    loaded.version,
                    loaded.last_sequence,
                    timestamp.unwrap_or_default()
                );
                println!("{}", serde_json::to_string_pretty(&state)?);
            }
        }
        Command::Query {
            what,
            id,
            min_sequence,
            limit,
        } => ops::query(&client, cli.json, &what, id.as_deref(), min_sequence, limit).await?,
        Command::Projection {
            command: ProjectionCommand::Status,
        } => ops::projection_status(&client, &config, &domain, cli.json).await?,
        Command::Projection {
            command: ProjectionCommand::Rebuild { name },
        } => ops::projection_rebuild(&client, &config, &domain, &name, cli.json).await?,
        Command::Dlq {
            command: DlqCommand::List,
        } => ops::dlq_list(&client, &config, cli.json).await?,
        Command::Dlq {
            command: DlqCommand::Replay { seq },
        } => ops::dlq_replay(&client, &config, &domain, seq, cli.json).await?,
        Command::Snapshot {
            command: SnapshotCommand::Status,
        } => ops::snapshot_status(&client, &config, &domain, cli.json).await?,
        Command::Snapshot {
            command: SnapshotCommand::Rebuild { aggregate_type },
        } => {
            ops::snapshot_rebuild(
                &client,
                &config,
                &domain,
                aggregate_type.as_deref(),
                cli.json,
            )
            .await?
        }
        Command::Stream => {
            let store = EventStore::open(client, &config.nats, &config.store).await?;
            let info = store.info().await?;
            let c = &info.config;
            let s = &info.state;
            let leader = info
                .cluster
                .as_ref()
                .and_then(|cl| cl.leader.clone())
                .unwrap_or_else(|| "-".into());
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "name": c.name,
                        "subjects": c.subjects,
                        "replicas": c.num_replicas,
                        "leader": leader,
                        "messages": s.messages,
                        "bytes": s.bytes,
                        "first_sequence": s.first_sequence,
                        "last_sequence": s.last_sequence,
                        "first_time": rfc3339(s.first_timestamp),
                        "last_time": rfc3339(s.last_timestamp),
                        "subjects_count": s.subjects_count,
                        "deny_delete": c.deny_delete,
                        "deny_purge": c.deny_purge,
                        "allow_atomic": c.allow_atomic_publish,
                        "allow_direct": c.allow_direct,
                        "duplicate_window_secs": c.duplicate_window.as_secs(),
                    }))?
                );
            } else {
                let mut table = Table::new(["SETTING", "VALUE"]);
                for (k, v) in [
                    ("name", c.name.clone()),
                    ("subjects", c.subjects.join(", ")),
                    ("storage", format!("{:?}", c.storage)),
                    ("replicas", c.num_replicas.to_string()),
                    ("leader", leader),
                    ("events", s.messages.to_string()),
                    ("bytes", s.bytes.to_string()),
                    ("aggregates", s.subjects_count.to_string()),
                    ("first sequence", s.first_sequence.to_string()),
                    ("last sequence", s.last_sequence.to_string()),
                    ("last event at", rfc3339(s.last_timestamp)),
                    (
                        "deny delete / purge",
                        format!("{} / {}", c.deny_delete, c.deny_purge),
                    ),
                    ("atomic batches", c.allow_atomic_publish.to_string()),
                    ("duplicate window", format!("{:?}", c.duplicate_window)),
                ] {
                    table.row([k.to_owned(), v]);
                }
                print!("{table}");
            }
        }
    }
    Ok(())
}
