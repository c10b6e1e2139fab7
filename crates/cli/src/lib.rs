//! The CLI of a jetsource application: the operator's and developer's view
//! of the event store. An application's CLI binary calls [`main`] with its
//! aggregates and projections; [`run`] does the same with given arguments
//! and output (tests, embedding).

mod args;
mod backup;
mod context;
mod exit;
mod forget;
mod nats;
mod output;
mod projection;
mod query;
mod read;
mod send;
mod snapshot;
mod table;
mod verify;

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches};
use jetsource_core::aggregate::Registry;
use jetsource_core::config::Config;
use jetsource_core::protocol::{encode_reply, ErrorBody, ErrorCode};
use jetsource_projector::projection::Projection;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use args::{Cli, Command};
use context::Context;
pub use exit::EXIT_CODES_HELP;
use output::Out;

/// Runs the CLI of the application `name` (used in help), with its
/// aggregates and the projections it keeps for a configuration, on the
/// process's arguments; returns the exit status (see [`EXIT_CODES_HELP`]).
/// The application's name: its worker binaries are `<name>-command`,
/// `<name>-projector`, ..., which messages name.
static APP_NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The binary of a worker role of this application, e.g. `shop-command`.
pub(crate) fn worker_binary(role: &str) -> String {
    format!(
        "{}-{role}",
        APP_NAME.get().map_or("jetsource", String::as_str)
    )
}

pub fn main(
    name: &str,
    registry: Registry,
    projections: impl FnOnce(&Config) -> Vec<Arc<dyn Projection>>,
) -> ExitCode {
    let terminal = std::io::stdout().is_terminal();
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    let app = App {
        name,
        registry,
        projections,
    };
    ExitCode::from(run_on(
        app,
        std::env::args_os(),
        Out::new(false, terminal, &mut stdout, &mut stderr),
    ))
}

/// [`main`] on `args` (the first is the program name), writing to `stdout`
/// and `stderr` (never a terminal: no progress bars); returns the exit
/// status.
pub fn run<I, T>(
    name: &str,
    registry: Registry,
    projections: impl FnOnce(&Config) -> Vec<Arc<dyn Projection>>,
    args: I,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let app = App {
        name,
        registry,
        projections,
    };
    run_on(app, args, Out::new(false, false, stdout, stderr))
}

/// What the CLI knows of the application it belongs to.
struct App<'n, P> {
    name: &'n str,
    registry: Registry,
    projections: P,
}

fn run_on<P, I, T>(app: App<'_, P>, args: I, mut out: Out<'_>) -> u8
where
    P: FnOnce(&Config) -> Vec<Arc<dyn Projection>>,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let _ = APP_NAME.set(app.name.to_owned());
    let cli = match parse(app.name, &args, &mut out) {
        Ok(cli) => cli,
        Err(status) => return status,
    };
    out.json = cli.json;
    if let Command::Completions { shell } = cli.command {
        let mut command = Cli::command().name(app.name.to_owned());
        clap_complete::generate(shell, &mut command, app.name, out.stdout());
        return 0;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return report(&anyhow::anyhow!("cannot start the runtime: {e}"), &mut out),
    };
    match runtime.block_on(dispatch(cli, app, &mut out)) {
        Ok(()) => 0,
        Err(e) => report(&e, &mut out),
    }
}

/// The arguments, or the status to exit with after clap's message (help
/// and version: 0; a usage error: 2, as JSON with `--json`).
fn parse(name: &str, args: &[OsString], out: &mut Out<'_>) -> Result<Cli, u8> {
    let command = Cli::command().name(name.to_owned());
    let error = match command
        .try_get_matches_from(args)
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => return Ok(cli),
        Err(error) => error,
    };
    let status = u8::try_from(error.exit_code()).unwrap_or(2);
    let json = args.iter().skip(1).any(|a| a == "--json");
    if !error.use_stderr() {
        let _ = out.line(error.render());
    } else if json {
        out.json = true;
        let message = error.render().to_string();
        let message = message.trim().trim_start_matches("error: ");
        let _ = out.raw(&encode_reply::<()>(&Err(ErrorBody::invalid(message))));
    } else {
        out.warn(error.render().to_string().trim_end());
    }
    Err(status)
}

/// Prints `error` (stdout with `--json`, stderr otherwise) and returns the
/// exit status for it.
fn report(error: &anyhow::Error, out: &mut Out<'_>) -> u8 {
    let (code, message) = exit::describe(error);
    if out.json && !exit::printed(error) {
        let body = ErrorBody::new(code, message);
        let _ = out.raw(&encode_reply::<()>(&Err(body)));
    } else {
        out.warn(format_args!(
            "error: {}",
            jetsource_core::error_chain(error.as_ref())
        ));
    }
    exit::status(code)
}

async fn dispatch<P>(cli: Cli, app: App<'_, P>, out: &mut Out<'_>) -> anyhow::Result<()>
where
    P: FnOnce(&Config) -> Vec<Arc<dyn Projection>>,
{
    let ctx = Context::load(&cli, app.registry, app.projections)?;
    match cli.command {
        Command::Send(args) => send::run(&ctx, args, out).await,
        Command::Query(args) => query::run(&ctx, args, out).await,
        Command::History(args) => read::history(&ctx, args, out).await,
        Command::State(args) => read::state(&ctx, args, out).await,
        Command::Stream => read::stream(&ctx, out).await,
        Command::Projection { command } => projection::run(&ctx, command, out).await,
        Command::Dlq { command } => projection::dlq(&ctx, command, out).await,
        Command::Snapshot { command } => snapshot::run(&ctx, command, out).await,
        Command::Backup(args) => backup::backup(&ctx, args, out).await,
        Command::Restore(args) => backup::restore(&ctx, args, out).await,
        Command::Verify(args) => verify::verify(&ctx, args, out).await,
        Command::Keygen(args) => verify::keygen(args, out),
        Command::Forget { subject } => forget::forget(&ctx, &subject, out).await,
        Command::Completions { .. } => Ok(()),
    }
}

pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// `what` ("aggregate id") is a token, or the input is invalid.
pub(crate) fn check_token(what: &str, value: &str) -> Result<(), exit::Failure> {
    if jetsource_core::aggregate::is_valid_token(value) {
        return Ok(());
    }
    Err(exit::Failure::new(
        ErrorCode::Invalid,
        format!("{what} {value:?} is not valid: use 1 to 64 characters of A-Z a-z 0-9 _ -"),
    ))
}
