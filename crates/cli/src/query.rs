//! `jetsource query`: any query the application's projections declare,
//! checked against the declaration (name, key, parameters and their types)
//! before it is sent; `--list` prints them all.

use std::time::Duration;

use jetsource_core::protocol::decode_reply;
use jetsource_projector::read::{ParamKind, QuerySpec, RESERVED_PARAMS};
use serde_json::{json, Map, Value};

use crate::args::QueryArgs;
use crate::context::Context;
use crate::exit::Failure;
use crate::nats::{request, Server};
use crate::output::Out;
use crate::table::Table;

/// How much longer than the projector's wait (`timeout_ms`) the CLI waits
/// for the reply, so the projector's own `timeout` answer arrives first.
const REPLY_MARGIN: Duration = Duration::from_secs(2);

pub async fn run(ctx: &Context, args: QueryArgs, out: &mut Out<'_>) -> anyhow::Result<()> {
    let specs = declared(ctx);
    if args.list {
        return list(&specs, out);
    }
    let name = args.name.as_deref().unwrap_or_default();
    let spec = find(&specs, name)?;
    let subject = subject(spec, args.key.as_deref())?;
    let body = body(spec, &args)?;
    let client = ctx.client().await?;
    let wait = Duration::from_millis(args.timeout_ms) + REPLY_MARGIN;
    let reply = request(&client, &subject, body, wait, Server::Projector).await?;
    let answer = decode_reply::<Value>(&reply.payload).map_err(|e| {
        Failure::new(
            jetsource_core::protocol::ErrorCode::Internal,
            format!("the reply on {subject} is not a jetsource reply: {e}"),
        )
    })??;
    if out.json {
        return out.raw(&reply.payload);
    }
    out.line(format_args!("as of sequence {}", answer["sequence"]))?;
    out.line(serde_json::to_string_pretty(&answer["data"])?)
}

/// Every query of the application, with the projection answering it.
fn declared(ctx: &Context) -> Vec<(QuerySpec, &'static str)> {
    ctx.projections
        .iter()
        .flat_map(|p| p.queries().iter().map(move |q| (*q, p.name())))
        .collect()
}

fn usage(spec: &QuerySpec) -> String {
    match spec.key {
        Some(key) => format!("{} <{key}>", spec.name),
        None => spec.name.to_owned(),
    }
}

fn find<'s>(specs: &'s [(QuerySpec, &'static str)], name: &str) -> Result<&'s QuerySpec, Failure> {
    specs
        .iter()
        .map(|(spec, _)| spec)
        .find(|spec| spec.name == name)
        .ok_or_else(|| {
            let known: Vec<String> = specs.iter().map(|(s, _)| usage(s)).collect();
            Failure::invalid(format!(
                "unknown query {name:?}; known: {} (see `query --list`)",
                known.join(", ")
            ))
        })
}

fn subject(spec: &QuerySpec, key: Option<&str>) -> Result<String, Failure> {
    match (spec.key, key) {
        (Some(what), None) => Err(Failure::invalid(format!(
            "query {} needs its {what}: query {}",
            spec.name,
            usage(spec)
        ))),
        (None, Some(key)) => Err(Failure::invalid(format!(
            "query {} takes no key, got {key:?}",
            spec.name
        ))),
        (Some(what), Some(key)) => {
            crate::check_token(what, key)?;
            Ok(spec.subject(Some(key)))
        }
        (None, None) => Ok(spec.subject(None)),
    }
}

/// `{"min_sequence", "timeout_ms", ...parameters}`, parameters typed as
/// the query declares them.
fn body(spec: &QuerySpec, args: &QueryArgs) -> Result<Vec<u8>, Failure> {
    let mut body = Map::new();
    if let Some(min) = args.min_sequence {
        body.insert("min_sequence".into(), min.into());
    }
    body.insert("timeout_ms".into(), args.timeout_ms.into());
    let limit = args.limit.iter().map(|n| format!("limit={n}"));
    for param in args.params.iter().cloned().chain(limit) {
        let (name, value) = param
            .split_once('=')
            .ok_or_else(|| Failure::invalid(format!("--param {param:?}: expected NAME=VALUE")))?;
        body.insert(name.to_owned(), param_value(spec, name, value)?);
    }
    Ok(Value::Object(body).to_string().into_bytes())
}

fn param_value(spec: &QuerySpec, name: &str, value: &str) -> Result<Value, Failure> {
    if RESERVED_PARAMS.contains(&name) {
        let flag = name.replace('_', "-");
        return Err(Failure::invalid(format!("use --{flag} for {name}")));
    }
    spec.param_from_text(name, value).map_err(Failure::invalid)
}

fn list(specs: &[(QuerySpec, &'static str)], out: &mut Out<'_>) -> anyhow::Result<()> {
    if out.json {
        let all: Vec<Value> = specs.iter().map(|(s, p)| spec_json(s, p)).collect();
        return out.doc(&all);
    }
    let mut table = Table::new(["QUERY", "SUBJECT", "PROJECTION", "PARAMETERS", "ABOUT"]);
    for (spec, projection) in specs {
        let params: Vec<String> = spec.params.iter().map(param_text).collect();
        table.row([
            usage(spec),
            spec.subject_pattern(),
            (*projection).to_owned(),
            if params.is_empty() {
                "-".to_owned()
            } else {
                params.join(", ")
            },
            spec.about.to_owned(),
        ]);
    }
    out.table(&table)
}

fn kind(kind: ParamKind) -> (&'static str, Value) {
    match kind {
        ParamKind::Integer { default } => ("integer", json!(default)),
        ParamKind::Text { default } => ("text", json!(default)),
    }
}

/// `limit (integer, default 10): how many`.
fn param_text(param: &jetsource_projector::read::Param) -> String {
    let (kind, default) = kind(param.kind);
    let default = match default {
        Value::Null => String::new(),
        d => format!(", default {d}"),
    };
    format!("{} ({kind}{default}): {}", param.name, param.about)
}

fn spec_json(spec: &QuerySpec, projection: &str) -> Value {
    let params: Vec<Value> = spec
        .params
        .iter()
        .map(|p| {
            let (kind, default) = kind(p.kind);
            json!({"name": p.name, "type": kind, "default": default, "about": p.about})
        })
        .collect();
    json!({
        "name": spec.name,
        "subject": spec.subject_pattern(),
        "key": spec.key,
        "projection": projection,
        "params": params,
        "about": spec.about,
    })
}
