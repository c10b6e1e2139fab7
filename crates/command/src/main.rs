//! `jetsource-command`: parse configuration, start logging, serve commands
//! until SIGINT or SIGTERM.

use std::path::PathBuf;

use clap::Parser;

/// jetsource command worker. Run several copies to scale out: they share the
/// load through a NATS queue group.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML); see jetsource.example.toml.
    #[arg(long, env = "JETSOURCE_CONFIG")]
    config: Option<PathBuf>,
}

// The hot paths allocate many small, short-lived buffers (message headers,
// Redis arguments); glibc malloc took about a third of the projector's CPU
// in a profile. jemalloc: about as fast as mimalloc here, with half its
// resident memory (docs/bench/NOTES.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = jetsource_core::config::Config::load(args.config.as_deref())?;
    jetsource_core::telemetry::init(&config.log);
    jetsource_core::until_stopped(|shutdown| {
        jetsource_command::run(config, jetsource_example::registry(), shutdown)
    })
    .await?;
    Ok(())
}
