//! An order: placed with one or more lines, confirmed once its stock is
//! reserved (the fulfilment process does both, see [`crate::fulfilment`]),
//! paid (the exact total), then shipped; cancelled any time before it
//! ships, and expired when it is not paid within its `pay_within_secs`.
//!
//! **Event schema 2.** The first build of the shop sold one SKU per order:
//! its `OrderPlaced` (schema 1) was `{"customer", "sku", "quantity",
//! "price"}`. Schema 2 holds lines: `{"customer", "lines": [{"sku",
//! "quantity", "price"}]}`. Stored events are never rewritten; the
//! [`order_placed_v1_to_v2`] upcaster turns a schema-1 event into the
//! schema-2 shape whenever one is read (loading for a command, snapshots,
//! projections and their rebuilds, the CLI's history and temporal state),
//! so [`OrderEvent`] only knows schema 2.

use std::collections::BTreeSet;

use jetsource::domain::{Aggregate, DomainError, Upcaster};
use jetsource::serde_json::{json, Map, Value};
use serde::{Deserialize, Serialize};

use crate::{quantity, token, MAX_LINES, MAX_PRICE};

#[derive(Debug)]
pub struct Order;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    /// Not placed yet.
    #[default]
    New,
    Placed,
    Paid,
    Shipped,
    Cancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::New => "new",
            OrderStatus::Placed => "placed",
            OrderStatus::Paid => "paid",
            OrderStatus::Shipped => "shipped",
            OrderStatus::Cancelled => "cancelled",
        }
    }
}

/// `quantity` units of `sku` at `price` minor units each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Line {
    pub sku: String,
    pub quantity: u64,
    pub price: u64,
}

/// The sum of quantity times price over `lines`. Saturates: `handle`
/// bounds lines, quantities and prices so that it never does.
pub fn total(lines: &[Line]) -> u64 {
    lines.iter().fold(0u64, |sum, line| {
        sum.saturating_add(line.quantity.saturating_mul(line.price))
    })
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderState {
    pub status: OrderStatus,
    /// Stock is reserved for every line (`OrderConfirmed`).
    #[serde(default)]
    pub confirmed: bool,
    pub customer: String,
    pub lines: Vec<Line>,
    pub total: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum OrderCommand {
    PlaceOrder(PlaceOrder),
    Pay(Pay),
    Cancel(Cancel),
    Ship(Ship),
    Confirm(Confirm),
    Expire(Expire),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrder {
    /// A token (it keys `query.orders.by_customer.<customer>`).
    pub customer: String,
    pub lines: Vec<Line>,
    /// Seconds the customer has to pay before the order expires (default
    /// [`DEFAULT_PAY_WITHIN_SECS`]).
    #[serde(default)]
    pub pay_within_secs: Option<u64>,
}

/// Fifteen minutes.
pub const DEFAULT_PAY_WITHIN_SECS: u64 = 15 * 60;
/// A week.
pub const MAX_PAY_WITHIN_SECS: u64 = 7 * 24 * 3600;

/// Pays the order; `amount` must be its total.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pay {
    pub amount: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cancel {
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ship {}

/// Stock is reserved for every line (sent by the fulfilment process).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Confirm {}

/// Cancels an order that was not paid in time (sent by the fulfilment
/// process when its payment deadline passes). Refused for a paid order: a
/// payment that won the race keeps the order.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expire {}

/// The reason an expired order is cancelled with.
pub const EXPIRED: &str = "payment not received in time";

/// Schema 2 (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum OrderEvent {
    OrderPlaced {
        customer: String,
        lines: Vec<Line>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pay_within_secs: Option<u64>,
    },
    OrderPaid {
        amount: u64,
    },
    OrderCancelled {
        reason: String,
    },
    OrderShipped {},
    OrderConfirmed {},
}

/// Longest cancellation reason, in characters.
pub const MAX_REASON_CHARS: usize = 200;

/// `OrderPlaced` from schema 1 (`{"customer", "sku", "quantity", "price"}`,
/// one line) to schema 2 (`{"customer", "lines": [{"sku", "quantity",
/// "price"}]}`). Refuses anything it does not fully understand rather than
/// drop a field.
pub fn order_placed_v1_to_v2(data: Value) -> Result<Value, String> {
    let Value::Object(mut v1) = data else {
        return Err(format!("OrderPlaced v1 is an object, not {data}"));
    };
    let mut take = |field: &str| {
        v1.remove(field)
            .ok_or_else(|| format!("OrderPlaced v1 has no {field:?}"))
    };
    let customer = take("customer")?;
    let sku = take("sku")?;
    let quantity = take("quantity")?;
    let price = take("price")?;
    if let Some(extra) = v1.keys().next() {
        return Err(format!("OrderPlaced v1 has an unknown field {extra:?}"));
    }
    let mut line = Map::new();
    line.insert("sku".into(), sku);
    line.insert("quantity".into(), quantity);
    line.insert("price".into(), price);
    Ok(json!({"customer": customer, "lines": [line]}))
}

fn rejected_unless_placed(state: &OrderState, what: &str) -> Result<(), DomainError> {
    match state.status {
        OrderStatus::Placed => Ok(()),
        OrderStatus::New => Err(DomainError::rejected("no such order")),
        status => Err(DomainError::rejected(format!(
            "cannot {what} an order that is {}",
            status.as_str()
        ))),
    }
}

fn check_lines(lines: Vec<Line>) -> Result<Vec<Line>, DomainError> {
    if lines.is_empty() {
        return Err(DomainError::invalid("an order needs at least one line"));
    }
    if lines.len() > MAX_LINES {
        return Err(DomainError::invalid(format!(
            "an order has at most {MAX_LINES} lines, this one has {}",
            lines.len()
        )));
    }
    let mut skus = BTreeSet::new();
    lines
        .into_iter()
        .map(|line| {
            let sku = token("sku", line.sku)?;
            if !skus.insert(sku.clone()) {
                return Err(DomainError::invalid(format!(
                    "sku {sku} is on two lines: put it on one"
                )));
            }
            if line.price > MAX_PRICE {
                return Err(DomainError::invalid(format!(
                    "price of {sku} must be at most {MAX_PRICE}"
                )));
            }
            Ok(Line {
                sku,
                quantity: quantity(line.quantity)?,
                price: line.price,
            })
        })
        .collect()
}

impl Aggregate for Order {
    const TYPE: &'static str = "order";
    const EVENT_SCHEMA_VERSION: u32 = 2;
    const UPCASTERS: &'static [Upcaster] =
        &[Upcaster::new("OrderPlaced", 1, order_placed_v1_to_v2)];
    /// Schema 1's state had one line too: snapshots it took are ignored
    /// (the state is folded from the events instead) until replaced.
    const STATE_SCHEMA_VERSION: u32 = 2;
    type State = OrderState;
    type Command = OrderCommand;
    type Event = OrderEvent;

    fn handle(state: &OrderState, command: OrderCommand) -> Result<Vec<OrderEvent>, DomainError> {
        use OrderEvent::*;
        match command {
            OrderCommand::PlaceOrder(PlaceOrder {
                customer,
                lines,
                pay_within_secs,
            }) => {
                let customer = token("customer", customer)?;
                let lines = check_lines(lines)?;
                if pay_within_secs.is_some_and(|s| s == 0 || s > MAX_PAY_WITHIN_SECS) {
                    return Err(DomainError::invalid(format!(
                        "pay_within_secs must be 1 to {MAX_PAY_WITHIN_SECS}"
                    )));
                }
                if state.status != OrderStatus::New {
                    return Err(DomainError::rejected("order already placed"));
                }
                Ok(vec![OrderPlaced {
                    customer,
                    lines,
                    pay_within_secs,
                }])
            }
            OrderCommand::Confirm(Confirm {}) => match state.status {
                _ if state.confirmed => Ok(vec![]),
                OrderStatus::Placed | OrderStatus::Paid => Ok(vec![OrderConfirmed {}]),
                OrderStatus::New => Err(DomainError::rejected("no such order")),
                status => Err(DomainError::rejected(format!(
                    "cannot confirm an order that is {}",
                    status.as_str()
                ))),
            },
            OrderCommand::Expire(Expire {}) => match state.status {
                OrderStatus::Placed => Ok(vec![OrderCancelled {
                    reason: EXPIRED.to_owned(),
                }]),
                OrderStatus::Cancelled => Ok(vec![]),
                OrderStatus::New => Err(DomainError::rejected("no such order")),
                status => Err(DomainError::rejected(format!(
                    "the order is {}: it does not expire",
                    status.as_str()
                ))),
            },
            OrderCommand::Pay(Pay { amount }) => {
                if amount == 0 {
                    return Err(DomainError::invalid("amount must be a positive integer"));
                }
                rejected_unless_placed(state, "pay")?;
                if amount != state.total {
                    return Err(DomainError::rejected(format!(
                        "amount {amount} does not match the order total {}",
                        state.total
                    )));
                }
                Ok(vec![OrderPaid { amount }])
            }
            OrderCommand::Cancel(Cancel { reason }) => {
                let reason = reason.trim();
                if reason.chars().count() > MAX_REASON_CHARS || reason.chars().any(char::is_control)
                {
                    return Err(DomainError::invalid(format!(
                        "reason must be at most {MAX_REASON_CHARS} printable characters"
                    )));
                }
                match state.status {
                    OrderStatus::Placed | OrderStatus::Paid => Ok(vec![OrderCancelled {
                        reason: reason.to_owned(),
                    }]),
                    OrderStatus::New => Err(DomainError::rejected("no such order")),
                    OrderStatus::Shipped => Err(DomainError::rejected("order already shipped")),
                    OrderStatus::Cancelled => Ok(vec![]),
                }
            }
            OrderCommand::Ship(Ship {}) => match state.status {
                OrderStatus::Paid => Ok(vec![OrderShipped {}]),
                OrderStatus::Placed => Err(DomainError::rejected("order is not paid yet")),
                OrderStatus::New => Err(DomainError::rejected("no such order")),
                OrderStatus::Shipped => Ok(vec![]),
                OrderStatus::Cancelled => Err(DomainError::rejected("order is cancelled")),
            },
        }
    }

    fn apply(mut state: OrderState, event: &OrderEvent) -> OrderState {
        match event {
            OrderEvent::OrderPlaced {
                customer, lines, ..
            } => {
                state.status = OrderStatus::Placed;
                state.customer.clone_from(customer);
                state.total = total(lines);
                state.lines.clone_from(lines);
            }
            OrderEvent::OrderPaid { .. } => state.status = OrderStatus::Paid,
            OrderEvent::OrderCancelled { .. } => state.status = OrderStatus::Cancelled,
            OrderEvent::OrderShipped {} => state.status = OrderStatus::Shipped,
            OrderEvent::OrderConfirmed {} => state.confirmed = true,
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::OrderCommand as C;
    use super::OrderEvent::*;
    use super::*;
    use jetsource::domain::StoredEvent;
    use jetsource::testing::{given, read_stored};

    fn line(sku: &str, quantity: u64, price: u64) -> Line {
        Line {
            sku: sku.into(),
            quantity,
            price,
        }
    }

    fn placed() -> OrderEvent {
        OrderPlaced {
            customer: "ada".into(),
            lines: vec![line("tea", 2, 150), line("pot", 1, 2000)],
            pay_within_secs: None,
        }
    }

    fn place(customer: &str, lines: Vec<Line>) -> OrderCommand {
        C::PlaceOrder(PlaceOrder {
            customer: customer.into(),
            lines,
            pay_within_secs: None,
        })
    }

    #[test]
    fn confirm_once_and_expire_only_unpaid_orders() {
        let state = given::<Order>([placed()])
            .when(C::Confirm(Confirm {}))
            .then_events([OrderConfirmed {}]);
        assert!(state.confirmed);
        given::<Order>([placed(), OrderConfirmed {}])
            .when(C::Confirm(Confirm {}))
            .then_events([]);
        given::<Order>([placed(), OrderCancelled { reason: "x".into() }])
            .when(C::Confirm(Confirm {}))
            .then_rejected("cancelled");
        given::<Order>([placed(), OrderConfirmed {}])
            .when(C::Expire(Expire {}))
            .then_events([OrderCancelled {
                reason: EXPIRED.into(),
            }]);
        given::<Order>([placed(), OrderPaid { amount: 2300 }])
            .when(C::Expire(Expire {}))
            .then_rejected("paid: it does not expire");
        given::<Order>([placed(), OrderCancelled { reason: "x".into() }])
            .when(C::Expire(Expire {}))
            .then_events([]);
        given::<Order>([])
            .when(C::PlaceOrder(PlaceOrder {
                customer: "ada".into(),
                lines: vec![line("tea", 1, 1)],
                pay_within_secs: Some(0),
            }))
            .then_invalid("pay_within_secs");
    }

    #[test]
    fn place_pay_ship() {
        let state = given::<Order>([])
            .when(place(
                "ada",
                vec![line("tea", 2, 150), line("pot", 1, 2000)],
            ))
            .then_events([placed()]);
        assert_eq!((state.status, state.total), (OrderStatus::Placed, 2300));
        given::<Order>([placed()])
            .when(C::Pay(Pay { amount: 2300 }))
            .then_events([OrderPaid { amount: 2300 }]);
        let state = given::<Order>([placed(), OrderPaid { amount: 2300 }])
            .when(C::Ship(Ship {}))
            .then_events([OrderShipped {}]);
        assert_eq!(state.status, OrderStatus::Shipped);
    }

    #[test]
    fn payment_must_match_the_total() {
        given::<Order>([placed()])
            .when(C::Pay(Pay { amount: 2299 }))
            .then_rejected("does not match the order total 2300");
        given::<Order>([placed()])
            .when(C::Pay(Pay { amount: 0 }))
            .then_invalid("positive");
        given::<Order>([])
            .when(C::Pay(Pay { amount: 1 }))
            .then_rejected("no such order");
        given::<Order>([placed(), OrderPaid { amount: 2300 }])
            .when(C::Pay(Pay { amount: 2300 }))
            .then_rejected("cannot pay an order that is paid");
    }

    #[test]
    fn cancel_before_shipping_only() {
        let cancel = || {
            C::Cancel(Cancel {
                reason: " changed my mind ".into(),
            })
        };
        let cancelled = OrderCancelled {
            reason: "changed my mind".into(),
        };
        given::<Order>([placed()])
            .when(cancel())
            .then_events([cancelled.clone()]);
        given::<Order>([placed(), OrderPaid { amount: 2300 }])
            .when(cancel())
            .then_events([cancelled.clone()]);
        given::<Order>([placed(), OrderPaid { amount: 2300 }, OrderShipped {}])
            .when(cancel())
            .then_rejected("already shipped");
        given::<Order>([placed(), cancelled.clone()])
            .when(cancel())
            .then_events([]);
        given::<Order>([])
            .when(cancel())
            .then_rejected("no such order");
        given::<Order>([placed()])
            .when(C::Cancel(Cancel {
                reason: "x".repeat(MAX_REASON_CHARS + 1),
            }))
            .then_invalid("reason");
    }

    #[test]
    fn ship_needs_payment() {
        given::<Order>([placed()])
            .when(C::Ship(Ship {}))
            .then_rejected("not paid");
        given::<Order>([placed(), OrderCancelled { reason: "".into() }])
            .when(C::Ship(Ship {}))
            .then_rejected("cancelled");
    }

    #[test]
    fn malformed_orders_are_invalid() {
        given::<Order>([])
            .when(place("ada", vec![]))
            .then_invalid("at least one line");
        given::<Order>([])
            .when(place("ada lovelace", vec![line("tea", 1, 1)]))
            .then_invalid("customer");
        given::<Order>([])
            .when(place("ada", vec![line("tea", 1, 1), line("tea", 2, 1)]))
            .then_invalid("two lines");
        given::<Order>([])
            .when(place("ada", vec![line("tea", 0, 1)]))
            .then_invalid("quantity");
        given::<Order>([])
            .when(place("ada", vec![line("tea", 1, MAX_PRICE + 1)]))
            .then_invalid("price");
        given::<Order>([])
            .when(place("ada", vec![line("t/a", 1, 1)]))
            .then_invalid("sku");
        let many = (0..=MAX_LINES)
            .map(|i| line(&format!("s{i}"), 1, 1))
            .collect();
        given::<Order>([])
            .when(place("ada", many))
            .then_invalid("at most");
        given::<Order>([placed()])
            .when(place("ada", vec![line("tea", 1, 1)]))
            .then_rejected("already placed");
    }

    #[test]
    fn the_upcaster_turns_one_line_into_lines() {
        let v2 = order_placed_v1_to_v2(
            json!({"customer": "ada", "sku": "tea", "quantity": 3, "price": 250}),
        );
        assert_eq!(
            v2,
            Ok(json!({"customer": "ada", "lines": [{"sku": "tea", "quantity": 3, "price": 250}]}))
        );
        // Read as every jetsource reader reads it: upcast, then decoded.
        assert_eq!(
            read_stored::<Order>(
                "OrderPlaced",
                1,
                json!({"customer": "ada", "sku": "tea", "quantity": 3, "price": 250})
            ),
            Ok(OrderPlaced {
                customer: "ada".into(),
                lines: vec![line("tea", 3, 250)],
                pay_within_secs: None,
            })
        );
        assert_eq!(
            read_stored::<Order>("OrderPaid", 1, json!({"amount": 750})),
            Ok(OrderPaid { amount: 750 })
        );
        for bad in [
            json!({"customer": "ada", "sku": "tea", "quantity": 3}),
            json!({"customer": "ada", "sku": "tea", "quantity": 3, "price": 1, "note": "x"}),
            json!([1, 2]),
        ] {
            assert!(order_placed_v1_to_v2(bad.clone()).is_err(), "{bad}");
        }
    }

    /// Through the registry, as every reader does: a schema-1 event folds
    /// into the same state as its schema-2 twin; schema-2 events and other
    /// types pass untouched.
    #[test]
    fn stored_v1_events_fold_as_v2() {
        let registry = crate::app().registry().clone();
        let order = registry.get("order").expect("registered");
        assert_eq!(order.event_schema_version(), 2);
        let v1 = br#"{"customer":"ada","sku":"tea","quantity":3,"price":250}"#;
        let v2 = br#"{"customer":"ada","lines":[{"sku":"tea","quantity":3,"price":250}]}"#;
        let fold = |version: u32, data: &[u8]| {
            let state = order
                .fold(
                    &order.initial(),
                    &mut [
                        StoredEvent {
                            event_type: "OrderPlaced",
                            schema_version: version,
                            data,
                        },
                        StoredEvent {
                            event_type: "OrderPaid",
                            schema_version: 1,
                            data: br#"{"amount":750}"#,
                        },
                    ]
                    .into_iter(),
                )
                .expect("folds");
            order.state_to_json(&state)
        };
        assert_eq!(fold(1, v1), fold(2, v2));
        assert_eq!(fold(1, v1)["lines"][0]["quantity"], 3);
        assert_eq!(fold(1, v1)["status"], "paid");
        let stored = |version| StoredEvent {
            event_type: "OrderPlaced",
            schema_version: version,
            data: v1,
        };
        let upcast = order.upcast(stored(1)).expect("upcasts");
        let parse = |data: &[u8]| jetsource::serde_json::from_slice::<Value>(data).ok();
        assert_eq!(parse(&upcast), parse(v2));
        assert!(matches!(
            order.upcast(StoredEvent {
                schema_version: 2,
                data: v2,
                ..stored(2)
            }),
            Ok(std::borrow::Cow::Borrowed(_))
        ));
        // A schema-1 event the upcaster cannot read stops the fold.
        let broken = order.fold(
            &order.initial(),
            &mut [StoredEvent {
                event_type: "OrderPlaced",
                schema_version: 1,
                data: br#"{"customer":"ada"}"#,
            }]
            .into_iter(),
        );
        assert!(broken.is_err_and(|e| e.message.contains("sku")));
    }

    #[test]
    fn wire_shapes() {
        let registry = crate::app().registry().clone();
        let order = registry.get("order").expect("registered");
        let decide = |t: &str, data: Value| {
            order
                .parse(t, data)
                .and_then(|c| order.decide(&order.initial(), &c))
        };
        let err = decide(
            "PlaceOrder",
            json!({"customer": "ada", "lines": [{"sku": "tea", "quantity": 1, "price": 1, "discount": 1}]}),
        )
        .expect_err("unknown field in a line");
        assert!(err.to_string().contains("unknown field"), "{err}");
        let decision = decide(
            "PlaceOrder",
            json!({"customer": "ada", "lines": [{"sku": "tea", "quantity": 2, "price": 5}]}),
        )
        .expect("placed");
        assert_eq!(decision.events[0].event_type, "OrderPlaced");
        assert_eq!(
            jetsource::serde_json::from_slice::<Value>(&decision.events[0].data).ok(),
            Some(json!({"customer": "ada", "lines": [{"sku": "tea", "quantity": 2, "price": 5}]}))
        );
    }
}
