//! Read models of the shop and the queries they answer: lists and indexes.
//!
//! | subject | parameters | data |
//! |---|---|---|
//! | `query.order.<id>` | | the order |
//! | `query.orders.by_customer.<customer>` | `limit` (1..=100, default 20), `before` (cursor) | `{"orders": [order, ...], "next": cursor or null}`, newest first |
//! | `query.orders.by_status.<status>` | `limit`, `before` | the same, for `placed`, `paid`, `shipped` or `cancelled`, most recently changed first |
//! | `query.item.<sku>` | | the item's stock |
//! | `query.items.low_stock` | `threshold` (default 5), `limit` (1..=1000, default 20) | `[{"sku", "available"}, ...]` with at most `threshold` available, fewest first |
//!
//! `orders` keys, in the partition of the order:
//! - `order:<id>` hash: `customer`, `status`, `lines` (JSON), `total`,
//!   `paid`, `reason`, `placed_sequence`, `placed_at`, `version`,
//!   `sequence`, `updated_at`
//! - `customer:<customer>:orders` sorted set of order ids, score = stream
//!   sequence of `OrderPlaced`
//! - `orders:by_status:<status>` sorted set of order ids, score = stream
//!   sequence of the event that gave the order its status
//!
//! A customer's orders are spread over the partitions of their orders, so
//! the paged queries merge the partitions' indexes: each partition gives
//! its first `limit + 1` entries below the cursor, the merge keeps `limit`
//! and says whether more exist. Cursors are stream sequences, unique per
//! entry, so a page never repeats or skips an entry however the pages
//! interleave with new orders.
//!
//! `stock` keys, in the partition of the item:
//! - `item:<sku>` hash: `name`, `available`, `reserved`, `shipped`,
//!   `version`, `sequence`, `updated_at`
//! - `items:by_available` sorted set of SKUs, score = available units

use std::collections::HashMap;

use jetsource::futures::future::BoxFuture;
use jetsource::redis;
use jetsource::serde_json::{self, json, Value};
use jetsource::{
    decode, KeySpace, Op, Param, ParamKind, Projection, ProjectionError, QueryCall, QueryError,
    QuerySpec, ReadView, RecordedEvent,
};
use time::format_description::well_known::Rfc3339;

use crate::item::ItemEvent;
use crate::order::{total, OrderEvent, OrderStatus};
use crate::MAX_STOCK;

fn at(event: &RecordedEvent) -> String {
    event.timestamp.format(&Rfc3339).unwrap_or_default()
}

/// Adds the fields every write of an entity carries.
fn stamp(op: Op, event: &RecordedEvent) -> Op {
    op.arg("version")
        .arg(event.aggregate_version)
        .arg("sequence")
        .arg(event.sequence)
        .arg("updated_at")
        .arg(at(event))
}

fn number(fields: &HashMap<String, String>, name: &str) -> Value {
    fields
        .get(name)
        .and_then(|v| v.parse::<i64>().ok())
        .map_or(Value::Null, Value::from)
}

/// The order statuses that have an index.
const STATUSES: [OrderStatus; 4] = [
    OrderStatus::Placed,
    OrderStatus::Paid,
    OrderStatus::Shipped,
    OrderStatus::Cancelled,
];

fn status_index(status: OrderStatus) -> String {
    format!("orders:by_status:{}", status.as_str())
}

#[derive(Debug)]
pub struct Orders;

impl Projection for Orders {
    fn name(&self) -> &'static str {
        "orders"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["order"]
    }

    fn project(
        &self,
        event: &RecordedEvent,
        keys: &KeySpace,
        ops: &mut Vec<Op>,
    ) -> Result<(), ProjectionError> {
        if event.aggregate_type != "order" {
            return Ok(());
        }
        let id = &event.aggregate_id;
        let order = keys.key(&format!("order:{id}"));
        // Moves the order into `to`'s index, out of those it may be in.
        let status = |ops: &mut Vec<Op>, from: &[OrderStatus], to: OrderStatus| {
            for from in from {
                ops.push(Op::new("ZREM", keys.key(&status_index(*from))).arg(id));
            }
            ops.push(
                Op::new("ZADD", keys.key(&status_index(to)))
                    .arg(event.sequence)
                    .arg(id),
            );
        };
        let (fields, to) = match decode::<OrderEvent>(event)? {
            OrderEvent::OrderPlaced {
                customer, lines, ..
            } => {
                let lines_json = serde_json::to_string(&lines)
                    .map_err(|e| ProjectionError(format!("lines: {e}")))?;
                status(ops, &[], OrderStatus::Placed);
                ops.push(
                    Op::new("ZADD", keys.key(&format!("customer:{customer}:orders")))
                        .arg(event.sequence)
                        .arg(id),
                );
                let placed = Op::new("HSET", order.clone())
                    .arg("customer")
                    .arg(customer)
                    .arg("lines")
                    .arg(lines_json)
                    .arg("total")
                    .arg(total(&lines))
                    .arg("placed_sequence")
                    .arg(event.sequence)
                    .arg("placed_at")
                    .arg(at(event));
                (placed, OrderStatus::Placed)
            }
            OrderEvent::OrderPaid { amount } => {
                status(ops, &[OrderStatus::Placed], OrderStatus::Paid);
                (
                    Op::new("HSET", order.clone()).arg("paid").arg(amount),
                    OrderStatus::Paid,
                )
            }
            OrderEvent::OrderCancelled { reason } => {
                status(
                    ops,
                    &[OrderStatus::Placed, OrderStatus::Paid],
                    OrderStatus::Cancelled,
                );
                (
                    Op::new("HSET", order.clone()).arg("reason").arg(reason),
                    OrderStatus::Cancelled,
                )
            }
            OrderEvent::OrderShipped {} => {
                status(ops, &[OrderStatus::Paid], OrderStatus::Shipped);
                (Op::new("HSET", order.clone()), OrderStatus::Shipped)
            }
            OrderEvent::OrderConfirmed {} => {
                // The status stays (placed or paid); the flag says the
                // stock is reserved.
                let confirmed = Op::new("HSET", order.clone()).arg("confirmed").arg(1);
                ops.push(stamp(confirmed, event));
                return Ok(());
            }
        };
        ops.push(stamp(fields.arg("status").arg(to.as_str()), event));
        Ok(())
    }

    fn queries(&self) -> &'static [QuerySpec] {
        ORDER_QUERIES
    }

    fn answer<'a>(
        &'a self,
        call: &'a QueryCall,
        view: &'a ReadView,
    ) -> BoxFuture<'a, Result<Value, QueryError>> {
        Box::pin(async move {
            match call.name {
                "order" => {
                    let id = call.key();
                    let mut found = orders(view, &[id.to_owned()]).await?;
                    match found.pop() {
                        Some(Some(order)) => Ok(order),
                        _ => Err(QueryError::NotFound(format!("order {id} not found"))),
                    }
                }
                "orders.by_customer" => {
                    let index = format!("customer:{}:orders", call.key());
                    paged_orders(view, &index, call).await
                }
                _ => {
                    let status = STATUSES
                        .into_iter()
                        .find(|s| s.as_str() == call.key())
                        .ok_or_else(|| {
                            QueryError::Invalid(format!(
                                "status {:?} is not one of placed, paid, shipped, cancelled",
                                call.key()
                            ))
                        })?;
                    paged_orders(view, &status_index(status), call).await
                }
            }
        })
    }
}

const PAGING: &[Param] = &[
    Param {
        name: "limit",
        kind: ParamKind::Integer { default: Some(20) },
        about: "orders per page, 1 to 100",
    },
    Param {
        name: "before",
        kind: ParamKind::Integer { default: None },
        about: "cursor: the `next` of the previous page; omit for the first page",
    },
];

const ORDER_QUERIES: &[QuerySpec] = &[
    QuerySpec {
        name: "order",
        key: Some("id"),
        params: &[],
        about: "an order with its lines",
    },
    QuerySpec {
        name: "orders.by_customer",
        key: Some("customer"),
        params: PAGING,
        about: "a customer's orders, newest first, a page at a time",
    },
    QuerySpec {
        name: "orders.by_status",
        key: Some("status"),
        params: PAGING,
        about: "orders with a status (placed, paid, shipped, cancelled), most recently changed first, a page at a time",
    },
];

/// `limit` and `before` of a paged query, checked.
fn paging(call: &QueryCall) -> Result<(usize, Option<u64>), QueryError> {
    let limit = call.integer("limit").unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(QueryError::Invalid(format!(
            "limit must be 1 to 100, not {limit}"
        )));
    }
    let before = match call.integer("before") {
        None => None,
        Some(before) if before >= 1 => Some(before as u64),
        Some(before) => {
            return Err(QueryError::Invalid(format!(
                "before must be a cursor from a previous page (a positive integer), not {before}"
            )))
        }
    };
    Ok((limit as usize, before))
}

/// One page of the per-partition sorted sets `index` (highest score
/// first) merged: up to `limit` members with a score below `before`, and
/// the cursor of the next page if there is one.
async fn page(
    view: &ReadView,
    index: &str,
    limit: usize,
    before: Option<u64>,
) -> Result<(Vec<String>, Option<u64>), QueryError> {
    let max = before.map_or_else(|| "+inf".to_owned(), |b| format!("({b}"));
    let mut pipe = redis::pipe();
    for keys in view.partitions() {
        pipe.cmd("ZREVRANGEBYSCORE")
            .arg(keys.key(index))
            .arg(&max)
            .arg("-inf")
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(limit + 1);
    }
    let pages: Vec<Vec<(String, f64)>> = pipe.query_async(&mut view.connection()).await?;
    let mut all: Vec<(String, u64)> = pages
        .into_iter()
        .flatten()
        .map(|(member, score)| (member, score as u64))
        .collect();
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let next = (all.len() > limit).then(|| all[limit - 1].1);
    all.truncate(limit);
    Ok((all.into_iter().map(|(member, _)| member).collect(), next))
}

async fn paged_orders(view: &ReadView, index: &str, call: &QueryCall) -> Result<Value, QueryError> {
    let (limit, before) = paging(call)?;
    let (ids, next) = page(view, index, limit, before).await?;
    let orders: Vec<Value> = orders(view, &ids).await?.into_iter().flatten().collect();
    Ok(json!({"orders": orders, "next": next}))
}

/// The orders `ids`, `None` for one that has no read model.
async fn orders(view: &ReadView, ids: &[String]) -> Result<Vec<Option<Value>>, QueryError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("HGETALL")
            .arg(view.keys_for("order", id).key(&format!("order:{id}")));
    }
    let rows: Vec<HashMap<String, String>> = pipe.query_async(&mut view.connection()).await?;
    Ok(ids
        .iter()
        .zip(rows)
        .map(|(id, fields)| {
            // A hash without `placed_sequence` holds only writes of events
            // after an `OrderPlaced` this generation could not apply.
            fields.contains_key("placed_sequence").then(|| {
                let lines = fields
                    .get("lines")
                    .and_then(|l| serde_json::from_str::<Value>(l).ok())
                    .unwrap_or(Value::Null);
                json!({
                    "id": id,
                    "customer": fields.get("customer"),
                    "status": fields.get("status"),
                    "lines": lines,
                    "total": number(&fields, "total"),
                    "paid": number(&fields, "paid"),
                    "confirmed": fields.contains_key("confirmed"),
                    "reason": fields.get("reason"),
                    "placed_sequence": number(&fields, "placed_sequence"),
                    "placed_at": fields.get("placed_at"),
                    "version": number(&fields, "version"),
                    "sequence": number(&fields, "sequence"),
                    "updated_at": fields.get("updated_at"),
                })
            })
        })
        .collect())
}

#[derive(Debug)]
pub struct Stock;

fn units(quantity: u64) -> Result<i64, ProjectionError> {
    if quantity == 0 || quantity > MAX_STOCK {
        return Err(ProjectionError(format!(
            "quantity {quantity} is outside 1..={MAX_STOCK}"
        )));
    }
    Ok(quantity as i64)
}

impl Projection for Stock {
    fn name(&self) -> &'static str {
        "stock"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["item"]
    }

    fn project(
        &self,
        event: &RecordedEvent,
        keys: &KeySpace,
        ops: &mut Vec<Op>,
    ) -> Result<(), ProjectionError> {
        if event.aggregate_type != "item" {
            return Ok(());
        }
        let sku = &event.aggregate_id;
        let item = keys.key(&format!("item:{sku}"));
        let ranking = keys.key("items:by_available");
        // (available, reserved, shipped) changes.
        let (available, reserved, shipped) = match decode::<ItemEvent>(event)? {
            ItemEvent::ItemAdded { name } => {
                ops.push(
                    Op::new("HSET", item.clone())
                        .arg("name")
                        .arg(name)
                        .arg("available")
                        .arg(0)
                        .arg("reserved")
                        .arg(0)
                        .arg("shipped")
                        .arg(0),
                );
                ops.push(Op::new("ZADD", ranking.clone()).arg(0).arg(sku));
                (0, 0, 0)
            }
            ItemEvent::Restocked { quantity } => (units(quantity)?, 0, 0),
            ItemEvent::StockReserved { quantity, .. } => {
                let q = units(quantity)?;
                (-q, q, 0)
            }
            ItemEvent::ReservationReleased { quantity, .. } => {
                let q = units(quantity)?;
                (q, -q, 0)
            }
            ItemEvent::ReservationFulfilled { quantity, .. } => {
                let q = units(quantity)?;
                (0, -q, q)
            }
            ItemEvent::ReservationRefused { .. } => (0, 0, 0),
        };
        for (field, change) in [
            ("available", available),
            ("reserved", reserved),
            ("shipped", shipped),
        ] {
            if change != 0 {
                ops.push(Op::new("HINCRBY", item.clone()).arg(field).arg(change));
            }
        }
        if available != 0 {
            ops.push(Op::new("ZINCRBY", ranking).arg(available).arg(sku));
        }
        ops.push(stamp(Op::new("HSET", item), event));
        Ok(())
    }

    fn queries(&self) -> &'static [QuerySpec] {
        &[
            QuerySpec {
                name: "item",
                key: Some("sku"),
                params: &[],
                about: "an item's stock: available, reserved, shipped",
            },
            QuerySpec {
                name: "items.low_stock",
                key: None,
                params: &[
                    Param {
                        name: "threshold",
                        kind: ParamKind::Integer { default: Some(5) },
                        about: "at most this many available units",
                    },
                    Param {
                        name: "limit",
                        kind: ParamKind::Integer { default: Some(20) },
                        about: "how many items, 1 to 1000",
                    },
                ],
                about: "items low on stock, fewest available first",
            },
        ]
    }

    fn answer<'a>(
        &'a self,
        call: &'a QueryCall,
        view: &'a ReadView,
    ) -> BoxFuture<'a, Result<Value, QueryError>> {
        Box::pin(async move {
            match call.name {
                "item" => {
                    let sku = call.key();
                    let fields: HashMap<String, String> = redis::cmd("HGETALL")
                        .arg(view.keys_for("item", sku).key(&format!("item:{sku}")))
                        .query_async(&mut view.connection())
                        .await?;
                    if !fields.contains_key("name") {
                        return Err(QueryError::NotFound(format!("item {sku} not found")));
                    }
                    Ok(json!({
                        "sku": sku,
                        "name": fields.get("name"),
                        "available": number(&fields, "available"),
                        "reserved": number(&fields, "reserved"),
                        "shipped": number(&fields, "shipped"),
                        "version": number(&fields, "version"),
                        "sequence": number(&fields, "sequence"),
                        "updated_at": fields.get("updated_at"),
                    }))
                }
                _ => {
                    let threshold = call.integer("threshold").unwrap_or(5);
                    let limit = call.integer("limit").unwrap_or(20);
                    if threshold < 0 {
                        return Err(QueryError::Invalid(format!(
                            "threshold must be 0 or more, not {threshold}"
                        )));
                    }
                    if !(1..=1000).contains(&limit) {
                        return Err(QueryError::Invalid(format!(
                            "limit must be 1 to 1000, not {limit}"
                        )));
                    }
                    low_stock(view, threshold, limit as usize).await
                }
            }
        })
    }
}

/// Merges each partition's items with at most `threshold` available.
async fn low_stock(view: &ReadView, threshold: i64, limit: usize) -> Result<Value, QueryError> {
    let mut pipe = redis::pipe();
    for keys in view.partitions() {
        pipe.cmd("ZRANGEBYSCORE")
            .arg(keys.key("items:by_available"))
            .arg("-inf")
            .arg(threshold)
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(limit);
    }
    let pages: Vec<Vec<(String, i64)>> = pipe.query_async(&mut view.connection()).await?;
    let mut all: Vec<(String, i64)> = pages.into_iter().flatten().collect();
    all.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(limit);
    Ok(Value::from(
        all.into_iter()
            .map(|(sku, available)| json!({"sku": sku, "available": available}))
            .collect::<Vec<_>>(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(aggregate_type: &str, id: &str, event_type: &str, data: Value) -> RecordedEvent {
        RecordedEvent {
            sequence: 7,
            timestamp: time::OffsetDateTime::UNIX_EPOCH,
            aggregate_type: aggregate_type.into(),
            aggregate_id: id.into(),
            aggregate_version: 1,
            event_id: "e".into(),
            event_type: event_type.into(),
            schema_version: 2,
            data: data.to_string().into_bytes().into(),
            ..Default::default()
        }
    }

    fn ops(projection: &dyn Projection, event: &RecordedEvent) -> Vec<Vec<String>> {
        let keys = KeySpace::new(projection.name(), 1, 0);
        let mut ops = Vec::new();
        projection
            .project(event, &keys, &mut ops)
            .expect("projects");
        ops.into_iter().map(|op| op.0).collect()
    }

    #[test]
    fn a_placed_order_is_indexed_by_customer_and_status() {
        let placed = event(
            "order",
            "o1",
            "OrderPlaced",
            json!({"customer": "ada", "lines": [{"sku": "tea", "quantity": 2, "price": 5}]}),
        );
        let ops = ops(&Orders, &placed);
        let commands: Vec<(&str, &str)> = ops
            .iter()
            .map(|op| (op[0].as_str(), op[1].as_str()))
            .collect();
        let key = |rest: &str| KeySpace::new("orders", 1, 0).key(rest);
        assert!(commands.contains(&("ZADD", &key("customer:ada:orders"))));
        assert!(commands.contains(&("ZADD", &key("orders:by_status:placed"))));
        let hset = ops.iter().find(|op| op[0] == "HSET").expect("hash");
        let total = hset.iter().position(|a| a == "total").expect("total");
        assert_eq!(hset[total + 1], "10");
    }

    #[test]
    fn events_of_other_types_and_bad_data() {
        assert!(ops(
            &Orders,
            &event("item", "tea", "ItemAdded", json!({"name": "t"}))
        )
        .is_empty());
        let mut out = Vec::new();
        let bad = event("order", "o1", "OrderPlaced", json!({"customer": "ada"}));
        assert!(Orders
            .project(&bad, &KeySpace::new("orders", 1, 0), &mut out)
            .is_err());
        let huge = event(
            "item",
            "tea",
            "Restocked",
            json!({"quantity": MAX_STOCK + 1}),
        );
        assert!(Stock
            .project(&huge, &KeySpace::new("stock", 1, 0), &mut out)
            .is_err());
    }
}
