//! Fulfilment: the process that takes an order from placed to confirmed or
//! cancelled, over the items it names. One instance per order (same id),
//! driven by the shop's process worker, `shop-process`.
//!
//! 1. `OrderPlaced`: reserve each line's stock (`Reserve` on `item.<sku>`),
//!    and wait for payment until `pay_within_secs` after the order was
//!    placed (default 15 minutes).
//! 2. Every line reserved: `Confirm` the order.
//! 3. A line refused (not enough stock, no such item): `Cancel` the order,
//!    then release what was reserved.
//! 4. The payment deadline passes unpaid: `Expire` the order (refused if a
//!    payment won the race: then nothing changes), then release.
//! 5. The customer cancels: release.
//! 6. The order ships: `Fulfil` each reservation.
//!
//! The order is told before any stock is released, so a paid order never
//! loses stock it keeps. A reservation sent but not answered is sent again
//! even while cancelling (under its original id, so it is never made
//! twice), then released: no unit stays held for a cancelled order.

use std::collections::BTreeMap;

use jetsource::domain::process::{Answer, Deadline, Input, Outgoing, Process};
use jetsource::serde_json::json;
use serde::{Deserialize, Serialize};

use crate::item::Item;
use crate::order::{Order, OrderEvent, DEFAULT_PAY_WITHIN_SECS};

#[derive(Debug)]
pub struct Fulfilment;

/// Where one line's stock stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stock {
    /// `Reserve` sent (or to be sent), not answered yet.
    Requested,
    Reserved,
    /// The item refused: nothing is held.
    Refused,
    Released,
    Fulfilled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub quantity: u64,
    pub stock: Stock,
}

/// Why the order is being cancelled, and how it is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cancelling {
    /// A line was refused: `Cancel`.
    OutOfStock,
    /// Not paid in time: `Expire`.
    Unpaid,
    /// The customer cancelled: nothing to tell.
    ByCustomer,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FulfilmentState {
    /// Lines by SKU.
    pub lines: BTreeMap<String, Line>,
    /// When the payment deadline passes, Unix milliseconds.
    pub pay_by_ms: Option<u64>,
    pub paid: bool,
    /// `Confirm` was answered (stored, or refused because the order moved
    /// on).
    pub confirm_answered: bool,
    pub cancelling: Option<Cancelling>,
    /// The order is cancelled (seen, or our `Cancel`/`Expire` stored).
    pub order_cancelled: bool,
    pub shipped: bool,
    /// Why the order was cancelled, for people reading the history.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum FulfilmentEvent {
    FulfilmentStarted {
        lines: BTreeMap<String, u64>,
        pay_by_ms: u64,
    },
    StockReserved {
        sku: String,
    },
    StockRefused {
        sku: String,
        reason: String,
    },
    OrderConfirmationAnswered {
        confirmed: bool,
    },
    PaymentReceived {},
    CancellationStarted {
        cause: Cancelling,
        reason: String,
    },
    /// An expiry lost to a payment: the order stays.
    CancellationWithdrawn {},
    OrderCancellationSeen {},
    StockReleased {
        sku: String,
    },
    ShipmentSeen {},
    StockFulfilled {
        sku: String,
    },
}

/// The deadline's name.
pub const PAYMENT: &str = "payment";

fn key(what: &str, sku: &str) -> String {
    format!("{what}-{sku}")
}

impl Fulfilment {
    fn on_order(state: &FulfilmentState, event: &OrderEvent, at_ms: u64) -> Vec<FulfilmentEvent> {
        use FulfilmentEvent::*;
        match event {
            OrderEvent::OrderPlaced {
                lines,
                pay_within_secs,
                ..
            } if state.lines.is_empty() => {
                let within = pay_within_secs.unwrap_or(DEFAULT_PAY_WITHIN_SECS);
                vec![FulfilmentStarted {
                    lines: lines.iter().map(|l| (l.sku.clone(), l.quantity)).collect(),
                    pay_by_ms: at_ms + within * 1000,
                }]
            }
            OrderEvent::OrderPaid { .. } if !state.paid => vec![PaymentReceived {}],
            OrderEvent::OrderCancelled { reason } if !state.order_cancelled => {
                let mut events = vec![OrderCancellationSeen {}];
                if state.cancelling.is_none() {
                    events.push(CancellationStarted {
                        cause: Cancelling::ByCustomer,
                        reason: reason.clone(),
                    });
                }
                events
            }
            OrderEvent::OrderShipped {} if !state.shipped => vec![ShipmentSeen {}],
            _ => vec![],
        }
    }

    fn on_answer(state: &FulfilmentState, key: &str, answer: &Answer) -> Vec<FulfilmentEvent> {
        use FulfilmentEvent::*;
        let (done, refusal) = match answer {
            Answer::Done { events } => {
                // A short stock is recorded by the item, as a fact.
                let refused = events.iter().find(|e| e.event_type == "ReservationRefused");
                match refused {
                    Some(e) => (false, format!("insufficient stock: {}", e.data)),
                    None => (true, String::new()),
                }
            }
            Answer::Refused { message, .. } => (false, message.clone()),
        };
        if key == "confirm" {
            return vec![OrderConfirmationAnswered { confirmed: done }];
        }
        if key == "cancel" || key == "expire" {
            return vec![if done {
                OrderCancellationSeen {}
            } else {
                CancellationWithdrawn {}
            }];
        }
        let Some((what, sku)) = key.split_once('-') else {
            return vec![];
        };
        let sku = sku.to_owned();
        match what {
            "reserve" if done => vec![StockReserved { sku }],
            "reserve" => {
                let mut events = vec![StockRefused {
                    sku: sku.clone(),
                    reason: refusal.clone(),
                }];
                if state.cancelling.is_none() {
                    events.push(CancellationStarted {
                        cause: Cancelling::OutOfStock,
                        reason: format!("{sku}: {refusal}"),
                    });
                }
                events
            }
            // Refused: the item holds nothing for the order any more.
            "release" => vec![StockReleased { sku }],
            "fulfil" => vec![StockFulfilled { sku }],
            _ => vec![],
        }
    }
}

impl Process for Fulfilment {
    const TYPE: &'static str = "fulfilment";
    type Follows = Order;
    type State = FulfilmentState;
    type Event = FulfilmentEvent;

    fn handle(state: &FulfilmentState, input: Input<'_, Order>) -> Vec<FulfilmentEvent> {
        match input {
            Input::Event { event, at_ms, .. } => Self::on_order(state, event, at_ms),
            Input::Answered { key, answer } => Self::on_answer(state, key, answer),
            Input::Deadline { name } if name == PAYMENT && !state.paid => {
                vec![FulfilmentEvent::CancellationStarted {
                    cause: Cancelling::Unpaid,
                    reason: crate::order::EXPIRED.to_owned(),
                }]
            }
            Input::Deadline { .. } => vec![],
        }
    }

    fn apply(mut state: FulfilmentState, event: &FulfilmentEvent) -> FulfilmentState {
        use FulfilmentEvent::*;
        let mut set = |sku: &str, stock: Stock| {
            if let Some(line) = state.lines.get_mut(sku) {
                line.stock = stock;
            }
        };
        match event {
            StockReserved { sku } => set(sku, Stock::Reserved),
            StockRefused { sku, .. } => set(sku, Stock::Refused),
            StockReleased { sku } => set(sku, Stock::Released),
            StockFulfilled { sku } => set(sku, Stock::Fulfilled),
            FulfilmentStarted { lines, pay_by_ms } => {
                state.lines = lines
                    .iter()
                    .map(|(sku, &quantity)| {
                        let line = Line {
                            quantity,
                            stock: Stock::Requested,
                        };
                        (sku.clone(), line)
                    })
                    .collect();
                state.pay_by_ms = Some(*pay_by_ms);
            }
            OrderConfirmationAnswered { .. } => state.confirm_answered = true,
            PaymentReceived {} => state.paid = true,
            CancellationStarted { cause, reason } => {
                state.cancelling = Some(*cause);
                state.reason = Some(reason.clone());
            }
            CancellationWithdrawn {} => {
                state.cancelling = None;
                state.reason = None;
            }
            OrderCancellationSeen {} => state.order_cancelled = true,
            ShipmentSeen {} => state.shipped = true,
        }
        state
    }

    fn pending(order: &str, state: &FulfilmentState) -> Vec<Outgoing> {
        let mut out = Vec::new();
        let to_item = |what: &str, command: &str, sku: &str, data| {
            Outgoing::to::<Item>(key(what, sku), sku, command, data)
        };
        // Sent whatever else happens: a reservation that may be stored must
        // become known before it can be released.
        for (sku, line) in &state.lines {
            if line.stock == Stock::Requested {
                let data = json!({"order": order, "quantity": line.quantity});
                out.push(to_item("reserve", "Reserve", sku, data));
            }
        }
        let release_now = match state.cancelling {
            None => false,
            Some(_) if state.order_cancelled => true,
            Some(cause) => {
                // The order is told first; the stock waits for its answer.
                let (key, command, data) = match cause {
                    Cancelling::Unpaid => ("expire", "Expire", json!({})),
                    _ => (
                        "cancel",
                        "Cancel",
                        json!({"reason": state.reason.clone().unwrap_or_default()}),
                    ),
                };
                out.push(Outgoing::to::<Order>(key, order, command, data));
                false
            }
        };
        let settled = state.lines.values().all(|l| l.stock != Stock::Requested);
        for (sku, line) in &state.lines {
            let data = json!({"order": order});
            match line.stock {
                Stock::Reserved if release_now => {
                    out.push(to_item("release", "Release", sku, data));
                }
                Stock::Reserved if state.shipped && state.cancelling.is_none() => {
                    out.push(to_item("fulfil", "Fulfil", sku, data));
                }
                _ => {}
            }
        }
        let all_reserved = state.lines.values().all(|l| l.stock == Stock::Reserved);
        if settled
            && all_reserved
            && !state.lines.is_empty()
            && state.cancelling.is_none()
            && !state.confirm_answered
        {
            out.push(Outgoing::to::<Order>(
                "confirm",
                order,
                "Confirm",
                json!({}),
            ));
        }
        out
    }

    fn deadlines(state: &FulfilmentState) -> Vec<Deadline> {
        let waiting = !state.paid && state.cancelling.is_none() && !state.order_cancelled;
        match state.pay_by_ms {
            Some(at_ms) if waiting => vec![Deadline {
                name: PAYMENT.to_owned(),
                at_ms,
            }],
            _ => vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::FulfilmentEvent::*;
    use super::*;
    use crate::order::{Line as OrderLine, EXPIRED};
    use jetsource::domain::process::AnsweredEvent;

    /// A scenario: the state after feeding inputs in order, as the
    /// process worker would.
    struct Run(FulfilmentState);

    impl Run {
        fn new() -> Self {
            Self(FulfilmentState::default())
        }

        fn take(&mut self, events: Vec<FulfilmentEvent>) -> Vec<FulfilmentEvent> {
            for event in &events {
                self.0 = Fulfilment::apply(std::mem::take(&mut self.0), event);
            }
            events
        }

        fn event(&mut self, event: OrderEvent, at_ms: u64) -> Vec<FulfilmentEvent> {
            let input = Input::Event {
                event: &event,
                version: 0,
                at_ms,
            };
            let events = Fulfilment::handle(&self.0, input);
            self.take(events)
        }

        fn answer(&mut self, key: &str, answer: Answer) -> Vec<FulfilmentEvent> {
            let input = Input::Answered {
                key,
                answer: &answer,
            };
            let events = Fulfilment::handle(&self.0, input);
            self.take(events)
        }

        fn deadline(&mut self) -> Vec<FulfilmentEvent> {
            let events = Fulfilment::handle(&self.0, Input::Deadline { name: PAYMENT });
            self.take(events)
        }

        /// `(key, target, command)` of every pending command.
        fn pending(&self) -> Vec<(String, String, String)> {
            Fulfilment::pending("o1", &self.0)
                .into_iter()
                .map(|o| {
                    let target = format!("{}.{}", o.aggregate_type, o.aggregate_id);
                    (o.key, target, o.command_type)
                })
                .collect()
        }
    }

    fn refused() -> Answer {
        Answer::Refused {
            code: "rejected".into(),
            message: "the order is paid: it does not expire".into(),
        }
    }

    fn done() -> Answer {
        Answer::Done { events: vec![] }
    }

    fn short() -> Answer {
        Answer::Done {
            events: vec![AnsweredEvent {
                event_type: "ReservationRefused".into(),
                data: json!({"order": "o1", "quantity": 2, "available": 0}),
            }],
        }
    }

    fn placed() -> OrderEvent {
        let line = |sku: &str| OrderLine {
            sku: sku.into(),
            quantity: 2,
            price: 10,
        };
        OrderEvent::OrderPlaced {
            customer: "ada".into(),
            lines: vec![line("pot"), line("tea")],
            pay_within_secs: Some(60),
        }
    }

    fn cmd(key: &str, target: &str, command: &str) -> (String, String, String) {
        (key.into(), target.into(), command.into())
    }

    #[test]
    fn reserves_every_line_then_confirms_and_waits_for_payment() {
        let mut run = Run::new();
        run.event(placed(), 1_000);
        assert_eq!(
            run.pending(),
            [
                cmd("reserve-pot", "item.pot", "Reserve"),
                cmd("reserve-tea", "item.tea", "Reserve")
            ]
        );
        assert_eq!(
            Fulfilment::deadlines(&run.0),
            [Deadline {
                name: PAYMENT.into(),
                at_ms: 61_000
            }]
        );
        run.answer("reserve-pot", done());
        run.answer("reserve-tea", done());
        assert_eq!(run.pending(), [cmd("confirm", "order.o1", "Confirm")]);
        run.answer("confirm", done());
        assert!(run.pending().is_empty());
        run.event(OrderEvent::OrderPaid { amount: 40 }, 2_000);
        assert!(
            Fulfilment::deadlines(&run.0).is_empty(),
            "paid: no deadline"
        );
        // The deadline firing late changes nothing.
        assert!(run.deadline().is_empty());
        run.event(OrderEvent::OrderShipped {}, 3_000);
        assert_eq!(
            run.pending(),
            [
                cmd("fulfil-pot", "item.pot", "Fulfil"),
                cmd("fulfil-tea", "item.tea", "Fulfil")
            ]
        );
    }

    #[test]
    fn a_refused_line_cancels_the_order_before_releasing_the_others() {
        let mut run = Run::new();
        run.event(placed(), 0);
        run.answer("reserve-pot", done());
        let events = run.answer("reserve-tea", short());
        assert!(matches!(
            events[1],
            CancellationStarted {
                cause: Cancelling::OutOfStock,
                ..
            }
        ));
        assert_eq!(run.pending(), [cmd("cancel", "order.o1", "Cancel")]);
        assert!(Fulfilment::deadlines(&run.0).is_empty());
        run.answer("cancel", done());
        assert_eq!(run.pending(), [cmd("release-pot", "item.pot", "Release")]);
        run.answer("release-pot", done());
        assert!(run.pending().is_empty());
        // The order's own cancellation event, seen later, changes nothing.
        assert!(run
            .event(OrderEvent::OrderCancelled { reason: "x".into() }, 5)
            .is_empty());
    }

    #[test]
    fn an_unpaid_order_expires_unless_a_payment_wins() {
        let mut run = Run::new();
        run.event(placed(), 0);
        run.answer("reserve-pot", done());
        run.answer("reserve-tea", done());
        run.answer("confirm", done());
        run.deadline();
        assert_eq!(run.pending(), [cmd("expire", "order.o1", "Expire")]);
        // Paid meanwhile: the order refuses to expire, nothing is released.
        run.answer("expire", refused());
        assert!(run.pending().is_empty());
        assert_eq!(run.0.cancelling, None);
        run.event(OrderEvent::OrderPaid { amount: 40 }, 9);
        assert!(run.0.paid);

        let mut run = Run::new();
        run.event(placed(), 0);
        run.answer("reserve-pot", done());
        run.deadline();
        // tea's reservation is still open: it is sent again before anything
        // is released.
        assert_eq!(
            run.pending(),
            [
                cmd("reserve-tea", "item.tea", "Reserve"),
                cmd("expire", "order.o1", "Expire")
            ]
        );
        run.answer("reserve-tea", done());
        run.answer("expire", done());
        assert_eq!(
            run.pending(),
            [
                cmd("release-pot", "item.pot", "Release"),
                cmd("release-tea", "item.tea", "Release")
            ]
        );
        assert_eq!(run.0.reason.as_deref(), Some(EXPIRED));
    }

    #[test]
    fn a_customer_cancellation_releases_at_once() {
        let mut run = Run::new();
        run.event(placed(), 0);
        run.answer("reserve-pot", done());
        run.answer("reserve-tea", done());
        run.event(
            OrderEvent::OrderCancelled {
                reason: "no".into(),
            },
            1,
        );
        assert_eq!(
            run.pending(),
            [
                cmd("release-pot", "item.pot", "Release"),
                cmd("release-tea", "item.tea", "Release")
            ]
        );
    }
}
