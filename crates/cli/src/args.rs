//! The command line: subcommands, arguments and their help.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::exit::EXIT_CODES_HELP;

#[derive(Debug, Parser)]
#[command(
    name = "jetsource",
    version,
    about = "Send commands to and read the history of a jetsource event store",
    after_help = EXIT_CODES_HELP
)]
pub struct Cli {
    /// Configuration file (TOML); see jetsource.example.toml.
    #[arg(long, global = true, env = "JETSOURCE_CONFIG")]
    pub config: Option<PathBuf>,
    /// NATS server URL (overrides the configuration).
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// Print one JSON document on stdout instead of text, for scripts.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send a command: `jetsource send account a1 Deposit '{"amount":100}'`.
    Send(SendArgs),
    /// Ask a read model: `jetsource query account acc-1 --min-sequence 42`;
    /// `jetsource query --list` shows every query.
    Query(QueryArgs),
    /// The audit trail of one aggregate: every event with sequence, time,
    /// type and data (in the current schema).
    History(AggregateArgs),
    /// An aggregate's state now, or as it was at a sequence or an instant.
    State(StateArgs),
    /// The event stream's configuration and size.
    Stream,
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
    /// Back up the event store into a new directory: the event stream, the
    /// dead-letter stream and the snapshot bucket (JetStream snapshots),
    /// with manifest.json (per stream: configuration, message count,
    /// first/last sequence, checksum). Read models are not backed up: they
    /// rebuild from the events. See docs/RUNBOOK.md.
    Backup(BackupArgs),
    /// Restore a backup onto a server that has none of its streams (refused
    /// otherwise, unless --force), then verify every stream against the
    /// manifest; exit 1 on a mismatch. See docs/RUNBOOK.md.
    Restore(RestoreArgs),
    /// Check stored history for tampering: recompute every hash chain link
    /// (and signature, with trusted keys) of one aggregate or of all, and
    /// name the first broken link of each aggregate. Exit 7 if any.
    Verify(VerifyArgs),
    /// Make an Ed25519 signing key pair for `store.signing_key`:
    /// `<dir>/<id>.key` (private, 0600) and `<dir>/<id>.pub` (for every
    /// verifier's `store.trusted_keys`).
    Keygen(KeygenArgs),
    /// Crypto-shredding: erase a data subject's personal data for good.
    /// Destroys the subject's key (its fields then read as erased
    /// everywhere, history intact and verifiable), records
    /// `DataSubjectForgotten`, deletes the snapshots built from its data
    /// and rebuilds the read models that hold it.
    Forget {
        /// The data subject, e.g. `user-u1` (as the application names it).
        subject: String,
    },
    /// Print a shell completion script: `jetsource completions bash >
    /// ~/.local/share/bash-completion/completions/jetsource`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct SendArgs {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub command_type: String,
    /// Command data as a JSON object (default `{}`).
    pub data: Option<String>,
    /// Idempotency key: resending with the same id appends nothing.
    #[arg(long)]
    pub command_id: Option<String>,
    /// Refuse unless the aggregate is at exactly this version.
    #[arg(long)]
    pub expected_version: Option<u64>,
    /// How long to wait for the reply.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The query, e.g. `account` or `accounts.top` (see --list).
    #[arg(required_unless_present = "list")]
    pub name: Option<String>,
    /// The key, for a query that takes one (e.g. an account id).
    pub key: Option<String>,
    /// Wait until the read model reflects this stream sequence.
    #[arg(long)]
    pub min_sequence: Option<u64>,
    /// How long the projector may wait for --min-sequence; the CLI waits a
    /// little longer for its answer.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    /// A parameter of the query, NAME=VALUE (repeatable; see --list).
    #[arg(long = "param", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// Shorthand for --param limit=N.
    #[arg(long)]
    pub limit: Option<String>,
    /// Print every query of this application: subject, parameters, what
    /// it answers.
    #[arg(long, conflicts_with_all = ["name", "key", "min_sequence", "params", "limit"])]
    pub list: bool,
}

#[derive(Debug, Args)]
pub struct AggregateArgs {
    pub aggregate_type: String,
    pub aggregate_id: String,
}

#[derive(Debug, Args)]
pub struct StateArgs {
    #[command(flatten)]
    pub aggregate: AggregateArgs,
    /// Fold events up to and including this stream sequence.
    #[arg(long, conflicts_with = "at_time")]
    pub at_seq: Option<u64>,
    /// Fold events stored at or before this RFC 3339 instant.
    #[arg(long)]
    pub at_time: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// How many snapshots, how old, how far behind their aggregates.
    Status,
    /// Recompute the snapshots of every aggregate (of one type) from a full
    /// replay, replacing what is stored.
    Rebuild { aggregate_type: Option<String> },
}

#[derive(Debug, Subcommand)]
pub enum ProjectionCommand {
    /// Per projection: generation, checkpoint, the stream's last sequence,
    /// lag in events and in time, rebuild in progress.
    Status,
    /// Build a projection afresh from sequence 1 into a new key space while
    /// the current one keeps serving, then switch atomically and delete the
    /// old keys.
    Rebuild { name: String },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
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

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Aggregate type and id; with --all, none.
    #[arg(num_args = 2, value_names = ["TYPE", "ID"], required_unless_present = "all", conflicts_with = "all")]
    pub aggregate: Vec<String>,
    /// Every aggregate of the stream, and the stream's sequence for holes.
    #[arg(long)]
    pub all: bool,
    /// Directory of trusted public keys (`<key id>.pub`) instead of
    /// `store.trusted_keys`.
    #[arg(long)]
    pub trusted_keys: Option<PathBuf>,
    /// Every event must carry a hash and a trusted signature (as
    /// `store.require_signatures`): a history rewritten whole without
    /// signatures fails too.
    #[arg(long)]
    pub require_signatures: bool,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Key id: letters, digits, '-' and '_' (e.g. the month it starts).
    pub id: String,
    /// Where to write the two files (created if missing).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Directory for the backup (created; must not hold one already).
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Directory of a backup (with manifest.json).
    pub dir: PathBuf,
    /// Delete the streams of the backup that exist on the server first,
    /// with everything in them. Without it, restore refuses if any exists.
    #[arg(long)]
    pub force: bool,
    /// Replicas of the restored streams (default: store.replicas of the
    /// configuration), whatever the backed-up streams had.
    #[arg(long)]
    pub replicas: Option<usize>,
}
