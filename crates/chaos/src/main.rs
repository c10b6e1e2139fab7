//! `jetsource-chaos`: parse the flags, run ([`jetsource_chaos::run`]), print
//! the summary line, exit non-zero unless every check passed.

use std::process::ExitCode;

use clap::Parser;
use jetsource_chaos::{clock_seed, run, Config};

fn main() -> ExitCode {
    let config = Config::parse();
    let seed = config.seed.unwrap_or_else(clock_seed);
    let result = run_to_end(config, seed);
    match result {
        Ok(verdict) => {
            println!("{}", verdict.summary);
            if verdict.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            println!("chaos: FAIL seed={seed} error={e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs on a runtime that is dropped before we exit, so every process the
/// run started is stopped by its drop guard first. SIGINT/SIGTERM abandon
/// the run the same way.
fn run_to_end(config: Config, seed: u64) -> anyhow::Result<jetsource_chaos::Verdict> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        tokio::select! {
            verdict = run(config, seed) => verdict,
            () = jetsource_core::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
        }
    })
}
