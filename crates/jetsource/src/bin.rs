//! The binaries of an application, one function each: parse the
//! command line and configuration, start logging, run until SIGINT or
//! SIGTERM. Flags and environment variables are the same for every
//! application (docs/PROTOCOL.md, jetsource.example.toml).

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use jetsource_core::config::Config;

use crate::App;

/// A worker's command line.
#[derive(Debug, Parser)]
struct Args {
    /// Configuration file (TOML); see jetsource.example.toml.
    #[arg(long, env = "JETSOURCE_CONFIG")]
    config: Option<PathBuf>,
}

/// The command worker: serves `cmd.<type>.<id>` for the app's aggregates.
/// Run several copies: they share the load through a NATS queue group.
pub fn command(app: App) -> ExitCode {
    worker(
        &app,
        "command",
        "command worker: decides commands and appends their events",
        |config| {
            let registry = app.registry().clone();
            async move {
                jetsource_core::until_stopped(|shutdown| {
                    jetsource_command::run(config, registry, shutdown)
                })
                .await
                .map_err(anyhow::Error::from)
            }
        },
    )
}

/// The projector: keeps the app's read models in Redis and serves their
/// queries. Run several copies: one applies each projection at a time, the
/// others stand by; all serve queries.
pub fn projector(app: App) -> ExitCode {
    worker(
        &app,
        "projector",
        "projector: Redis read models and queries",
        |config| {
            let projections = app.projections(&config);
            async move {
                jetsource_core::until_stopped(|shutdown| {
                    jetsource_projector::run(config, projections, shutdown)
                })
                .await
                .map_err(anyhow::Error::from)
            }
        },
    )
}

/// The snapshotter: writes snapshots of the app's aggregates. Several
/// copies share the work.
pub fn snapshotter(app: App) -> ExitCode {
    worker(
        &app,
        "snapshotter",
        "snapshotter: aggregate snapshots",
        |config| {
            let registry = app.registry().clone();
            async move {
                jetsource_core::until_stopped(|shutdown| {
                    jetsource_snapshotter::run(config, registry, shutdown)
                })
                .await
                .map_err(anyhow::Error::from)
            }
        },
    )
}

/// The process worker: drives the app's process managers
/// ([`App::process`]). Several copies share the work.
pub fn process(app: App) -> ExitCode {
    worker(
        &app,
        "process",
        "process worker: process managers",
        |config| {
            let registry = app.registry().clone();
            async move {
                jetsource_core::until_stopped(|shutdown| {
                    jetsource_process::run(config, registry, shutdown)
                })
                .await
                .map_err(anyhow::Error::from)
            }
        },
    )
}

/// The HTTP API gateway: commands, queries, histories, state at a point
/// and live events over HTTP (docs/GATEWAY.md). Stateless: run copies
/// behind any HTTP load balancer.
pub fn gateway(app: App) -> ExitCode {
    worker(&app, "gateway", "HTTP API gateway", |config| {
        let registry = app.registry().clone();
        let projections = app.projections(&config);
        async move {
            jetsource_core::until_stopped(|shutdown| {
                jetsource_gateway::run(config, registry, projections, shutdown)
            })
            .await
            .map_err(anyhow::Error::from)
        }
    })
}

/// The CLI: send commands, history, temporal state, queries, operations.
pub fn cli(app: App) -> ExitCode {
    let registry = app.registry().clone();
    jetsource_cli::main(app.name(), registry, move |config| app.projections(config))
}

fn worker<F, Fut>(app: &App, role: &str, about: &str, run: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let name = format!("{}-{role}", app.name());
    let command = <Args as clap::CommandFactory>::command()
        .name(name.clone())
        .about(format!("{name}: {about}"))
        .version(env!("CARGO_PKG_VERSION"));
    let args = match command.try_get_matches() {
        Ok(matches) => match <Args as clap::FromArgMatches>::from_arg_matches(&matches) {
            Ok(args) => args,
            Err(e) => e.exit(),
        },
        Err(e) => e.exit(),
    };
    let result = (|| {
        let config = Config::load(args.config.as_deref())?;
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(async {
                // Inside the runtime: the span exporter runs on it.
                let telemetry = jetsource_core::telemetry::init(&config.log, &config.trace, &name);
                let result = run(config).await;
                telemetry
                    .shutdown(std::time::Duration::from_millis(1500))
                    .await;
                result
            })
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {}", jetsource_core::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
