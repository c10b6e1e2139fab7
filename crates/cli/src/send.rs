//! `jetsource send`: one command, checked here first (names, JSON, ids) so
//! a typo is told as such instead of as a missing worker.

use std::time::Duration;

use jetsource_core::protocol::{
    check_client_id, command_subject, decode_reply, CommandOutcome, CommandRequest,
};
use serde_json::Value;

use crate::args::SendArgs;
use crate::context::Context;
use crate::exit::Failure;
use crate::nats::{request, Server};
use crate::output::Out;
use crate::table::Table;

pub async fn run(ctx: &Context, args: SendArgs, out: &mut Out<'_>) -> anyhow::Result<()> {
    let body = serde_json::to_vec(&checked_request(ctx, &args)?)?;
    let client = ctx.client().await?;
    let subject = command_subject(&args.aggregate_type, &args.aggregate_id);
    let wait = Duration::from_millis(args.timeout_ms);
    let reply = request(&client, &subject, body, wait, Server::CommandWorker).await?;
    let outcome = decode_reply::<CommandOutcome>(&reply.payload).map_err(|e| {
        Failure::new(
            jetsource_core::protocol::ErrorCode::Internal,
            format!("the reply on {subject} is not a jetsource reply: {e}"),
        )
    })?;
    let outcome = outcome?;
    if out.json {
        return out.raw(&reply.payload);
    }
    print_outcome(&args, &outcome, duplicate(&reply.payload), out)
}

/// The request, or why it cannot be sent.
fn checked_request(ctx: &Context, args: &SendArgs) -> Result<CommandRequest, Failure> {
    ctx.command_target(&args.aggregate_type)?;
    crate::check_token("aggregate id", &args.aggregate_id)?;
    if let Some(id) = &args.command_id {
        check_client_id("--command-id", id).map_err(|e| Failure::invalid(e.message))?;
    }
    let data = match &args.data {
        None => Value::Null,
        Some(text) => serde_json::from_str(text).map_err(|e| {
            Failure::invalid(format!("command data {text:?} is not valid JSON: {e}"))
        })?,
    };
    if !(data.is_object() || data.is_null()) {
        return Err(Failure::invalid(format!(
            "command data must be a JSON object like '{{\"amount\":100}}', not {data}"
        )));
    }
    Ok(CommandRequest {
        command_type: args.command_type.clone(),
        data,
        command_id: args.command_id.clone(),
        expected_version: args.expected_version,
        correlation_id: None,
    })
}

/// The worker answered from history: the command id had been handled.
fn duplicate(payload: &[u8]) -> bool {
    serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|v| v.get("duplicate").and_then(Value::as_bool))
        .unwrap_or(false)
}

fn print_outcome(
    args: &SendArgs,
    outcome: &CommandOutcome,
    duplicate: bool,
    out: &mut Out<'_>,
) -> anyhow::Result<()> {
    let (t, id) = (&args.aggregate_type, &args.aggregate_id);
    let (version, sequence) = (outcome.version, outcome.sequence);
    if duplicate {
        out.line("already applied: this command id was handled before; nothing new appended")?;
        out.line(format_args!(
            "its outcome then: {t} {id} at version {version}, sequence {sequence}"
        ))?;
    } else {
        out.line(format_args!(
            "ok: {t} {id} now at version {version}, sequence {sequence}"
        ))?;
    }
    if outcome.events.is_empty() {
        return out.line("(no events: nothing to change)");
    }
    if outcome.others.is_empty() {
        let mut table = Table::new(["TYPE", "DATA"]);
        for event in &outcome.events {
            table.row([event.event_type.clone(), event.data.to_string()]);
        }
        return out.table(&table);
    }
    // A command over several aggregates: every side, one atomic append.
    let mut table = Table::new(["AGGREGATE", "VERSION", "TYPE", "DATA"]);
    let own = (format!("{t}.{id}"), version, &outcome.events);
    let others = outcome.others.iter().map(|o| {
        let name = format!("{}.{}", o.aggregate_type, o.aggregate_id);
        (name, o.version, &o.events)
    });
    for (name, version, events) in std::iter::once(own).chain(others) {
        for event in events {
            table.row([
                name.clone(),
                version.to_string(),
                event.event_type.clone(),
                event.data.to_string(),
            ]);
        }
    }
    out.table(&table)
}
