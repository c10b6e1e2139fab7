//! `verify`: is stored history as it was written? `keygen`: signing keys.

use jetsource_core::integrity::{Integrity, Signer, TrustedKeys};
use jetsource_core::protocol::ErrorCode;
use jetsource_core::verify::{self, Report};

use crate::args::{KeygenArgs, VerifyArgs};
use crate::check_token;
use crate::context::Context;
use crate::exit::Failure;
use crate::output::Out;
use crate::table::Table;

pub async fn verify(ctx: &Context, args: VerifyArgs, out: &mut Out<'_>) -> anyhow::Result<()> {
    for (what, value) in ["aggregate type", "aggregate id"]
        .iter()
        .zip(&args.aggregate)
    {
        check_token(what, value)?;
    }
    let mut trusted = match &args.trusted_keys {
        Some(dir) => TrustedKeys::load(dir).map_err(|e| Failure::invalid(e.to_string()))?,
        None => {
            let integrity = Integrity::from_config(&ctx.config.store)
                .map_err(|e| Failure::invalid(e.to_string()))?;
            (*integrity.trusted).clone()
        }
    };
    trusted.required |= args.require_signatures || ctx.config.store.require_signatures;
    if trusted.required && trusted.is_empty() {
        return Err(Failure::invalid(
            "signatures are required but no key is trusted: pass --trusted-keys or set store.trusted_keys",
        )
        .into());
    }
    let store = ctx.store().await?;
    let report = match args.aggregate.as_slice() {
        [t, id] => verify::aggregate(&store, &trusted, t, id).await?,
        _ => {
            let total = store.last_sequence().await?;
            let bar = out.progress(total, "events");
            bar.set_message("verifying");
            let report = verify::all(&store, &trusted, |n| bar.set_position(n)).await;
            out.finish(&bar);
            report?
        }
    };
    if report.events == 0 && !args.all {
        return Err(
            Failure::not_found(format!("{} has no events", args.aggregate.join(" "))).into(),
        );
    }
    print(&report, &trusted, out)?;
    if report.is_clean() {
        return Ok(());
    }
    let mut failure = Failure::new(
        ErrorCode::Tampered,
        format!(
            "history failed verification: {} aggregate(s) with a broken chain, {} stream sequence(s) missing",
            report.findings.len(),
            report.missing_sequences.len()
        ),
    );
    failure.printed = out.json;
    Err(failure.into())
}

fn print(report: &Report, trusted: &TrustedKeys, out: &mut Out<'_>) -> anyhow::Result<()> {
    if out.json {
        return out.doc(report);
    }
    if !report.findings.is_empty() {
        let mut table = Table::new(["AGGREGATE", "SEQ", "VERSION", "PROBLEM", "DETAIL"]);
        for f in &report.findings {
            table.row([
                f.aggregate.clone(),
                f.sequence.to_string(),
                f.version.to_string(),
                f.problem.to_owned(),
                f.detail.clone(),
            ]);
        }
        out.table(&table)?;
    }
    if !report.missing_sequences.is_empty() {
        out.line(format_args!(
            "stream sequences missing (removed behind the server's back): {:?}",
            report.missing_sequences
        ))?;
    }
    let signatures = if trusted.is_empty() {
        "signatures not checked (no trusted keys)".to_owned()
    } else {
        format!("{} signatures checked", report.signatures_checked)
    };
    out.line(format_args!(
        "{} events of {} aggregates verified: {} broken, {signatures}, {} written before hashing",
        report.events,
        report.aggregates,
        report.findings.len(),
        report.unchained
    ))
}

pub fn keygen(args: KeygenArgs, out: &mut Out<'_>) -> anyhow::Result<()> {
    let signer = Signer::generate(&args.id).map_err(|e| Failure::invalid(e.to_string()))?;
    std::fs::create_dir_all(&args.dir)?;
    signer
        .write(&args.dir)
        .map_err(|e| Failure::invalid(format!("{e} (a key is never overwritten)")))?;
    let private = args.dir.join(format!("{}.key", args.id));
    let public = args.dir.join(format!("{}.pub", args.id));
    if out.json {
        return out.doc(&serde_json::json!({
            "key_id": args.id,
            "private": private,
            "public": public,
        }));
    }
    out.line(format_args!(
        "key {}: private {} (set store.signing_key to it on command workers), public {} (copy into every verifier's store.trusted_keys)",
        args.id,
        private.display(),
        public.display()
    ))
}
