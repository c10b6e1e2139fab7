//! A stock item, identified by its SKU (the aggregate id). Units on hand
//! are either available or reserved for an order; a reservation is either
//! released (the order was cancelled: the units are available again) or
//! fulfilled (the order shipped: the units leave the warehouse).
//!
//! A reservation the stock cannot cover is recorded as
//! `ReservationRefused`, not answered with an error: the fulfilment process
//! acts on the refusal, so it must be a fact that a resend of the same
//! command (same id) reads back, rather than a decision taken again on
//! newer stock, which could go the other way.

use std::collections::BTreeMap;

use jetsource::domain::{Aggregate, DomainError};
use serde::{Deserialize, Serialize};

use crate::{clean_name, quantity, token, MAX_STOCK};

#[derive(Debug)]
pub struct Item;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemState {
    /// `ItemAdded` happened.
    pub exists: bool,
    pub name: String,
    /// Units on hand that no order holds.
    pub available: u64,
    /// Units held, by order id.
    pub reservations: BTreeMap<String, u64>,
}

impl ItemState {
    /// Units on hand: available plus reserved.
    pub fn on_hand(&self) -> u64 {
        self.available
            .saturating_add(self.reservations.values().sum::<u64>())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum ItemCommand {
    AddItem(AddItem),
    Restock(Restock),
    Reserve(Reserve),
    Release(Release),
    Fulfil(Fulfil),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddItem {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restock {
    pub quantity: u64,
}

/// Holds `quantity` available units for `order`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reserve {
    pub order: String,
    pub quantity: u64,
}

/// Makes the units `order` holds available again.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub order: String,
}

/// The units `order` holds leave the warehouse.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fulfil {
    pub order: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum ItemEvent {
    ItemAdded {
        name: String,
    },
    Restocked {
        quantity: u64,
    },
    StockReserved {
        order: String,
        quantity: u64,
    },
    ReservationReleased {
        order: String,
        quantity: u64,
    },
    ReservationFulfilled {
        order: String,
        quantity: u64,
    },
    /// Not enough units were available for the order: nothing is held.
    ReservationRefused {
        order: String,
        quantity: u64,
        available: u64,
    },
}

fn must_exist(state: &ItemState) -> Result<(), DomainError> {
    if state.exists {
        Ok(())
    } else {
        Err(DomainError::rejected("no such item: add it first"))
    }
}

fn held(state: &ItemState, order: &str) -> Result<u64, DomainError> {
    must_exist(state)?;
    state
        .reservations
        .get(order)
        .copied()
        .ok_or_else(|| DomainError::rejected(format!("order {order} holds no units of this item")))
}

impl Aggregate for Item {
    const TYPE: &'static str = "item";
    type State = ItemState;
    type Command = ItemCommand;
    type Event = ItemEvent;

    fn handle(state: &ItemState, command: ItemCommand) -> Result<Vec<ItemEvent>, DomainError> {
        use ItemEvent::*;
        match command {
            ItemCommand::AddItem(AddItem { name }) => {
                let name = clean_name("name", &name)?;
                if state.exists {
                    return Err(DomainError::rejected("item already exists"));
                }
                Ok(vec![ItemAdded { name }])
            }
            ItemCommand::Restock(Restock { quantity: q }) => {
                let q = quantity(q)?;
                must_exist(state)?;
                if state.on_hand() + q > MAX_STOCK {
                    return Err(DomainError::rejected(format!(
                        "restocking {q} would hold more than {MAX_STOCK} units (on hand: {})",
                        state.on_hand()
                    )));
                }
                Ok(vec![Restocked { quantity: q }])
            }
            ItemCommand::Reserve(Reserve { order, quantity: q }) => {
                let order = token("order", order)?;
                let q = quantity(q)?;
                must_exist(state)?;
                match state.reservations.get(&order) {
                    // Asked again: already done.
                    Some(&held) if held == q => return Ok(vec![]),
                    Some(held) => {
                        return Err(DomainError::rejected(format!(
                            "order {order} already holds {held} units; release them first"
                        )))
                    }
                    None => {}
                }
                if q > state.available {
                    return Ok(vec![ReservationRefused {
                        order,
                        quantity: q,
                        available: state.available,
                    }]);
                }
                Ok(vec![StockReserved { order, quantity: q }])
            }
            ItemCommand::Release(Release { order }) => {
                let order = token("order", order)?;
                let q = held(state, &order)?;
                Ok(vec![ReservationReleased { order, quantity: q }])
            }
            ItemCommand::Fulfil(Fulfil { order }) => {
                let order = token("order", order)?;
                let q = held(state, &order)?;
                Ok(vec![ReservationFulfilled { order, quantity: q }])
            }
        }
    }

    fn apply(mut state: ItemState, event: &ItemEvent) -> ItemState {
        match event {
            ItemEvent::ItemAdded { name } => {
                state.exists = true;
                state.name.clone_from(name);
            }
            ItemEvent::Restocked { quantity } => {
                state.available = state.available.saturating_add(*quantity)
            }
            ItemEvent::StockReserved { order, quantity } => {
                state.available = state.available.saturating_sub(*quantity);
                state.reservations.insert(order.clone(), *quantity);
            }
            ItemEvent::ReservationReleased { order, quantity } => {
                state.reservations.remove(order);
                state.available = state.available.saturating_add(*quantity);
            }
            ItemEvent::ReservationFulfilled { order, .. } => {
                state.reservations.remove(order);
            }
            ItemEvent::ReservationRefused { .. } => {}
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::ItemCommand as C;
    use super::ItemEvent::*;
    use super::*;
    use jetsource::testing::given;

    fn added() -> ItemEvent {
        ItemAdded {
            name: "teapot".into(),
        }
    }

    fn reserve(order: &str, quantity: u64) -> ItemCommand {
        C::Reserve(Reserve {
            order: order.into(),
            quantity,
        })
    }

    #[test]
    fn add_restock_reserve_fulfil() {
        given::<Item>([])
            .when(C::AddItem(AddItem {
                name: " teapot ".into(),
            }))
            .then_events([added()]);
        given::<Item>([added()])
            .when(C::Restock(Restock { quantity: 10 }))
            .then_events([Restocked { quantity: 10 }]);
        let state = given::<Item>([added(), Restocked { quantity: 10 }])
            .when(reserve("o1", 4))
            .then_events([StockReserved {
                order: "o1".into(),
                quantity: 4,
            }]);
        assert_eq!((state.available, state.on_hand()), (6, 10));
        let state = given::<Item>([
            added(),
            Restocked { quantity: 10 },
            StockReserved {
                order: "o1".into(),
                quantity: 4,
            },
        ])
        .when(C::Fulfil(Fulfil { order: "o1".into() }))
        .then_events([ReservationFulfilled {
            order: "o1".into(),
            quantity: 4,
        }]);
        assert_eq!((state.available, state.on_hand()), (6, 6));
    }

    #[test]
    fn release_makes_units_available_again() {
        let state = given::<Item>([
            added(),
            Restocked { quantity: 3 },
            StockReserved {
                order: "o1".into(),
                quantity: 3,
            },
        ])
        .when(C::Release(Release { order: "o1".into() }))
        .then_events([ReservationReleased {
            order: "o1".into(),
            quantity: 3,
        }]);
        assert_eq!(state.available, 3);
        assert!(state.reservations.is_empty());
    }

    #[test]
    fn reservations_need_stock_and_are_one_per_order() {
        let past = || {
            vec![
                added(),
                Restocked { quantity: 5 },
                StockReserved {
                    order: "o1".into(),
                    quantity: 2,
                },
            ]
        };
        let state =
            given::<Item>(past())
                .when(reserve("o2", 4))
                .then_events([ReservationRefused {
                    order: "o2".into(),
                    quantity: 4,
                    available: 3,
                }]);
        assert_eq!((state.available, state.reservations.len()), (3, 1));
        given::<Item>(past()).when(reserve("o1", 2)).then_events([]);
        given::<Item>(past())
            .when(reserve("o1", 3))
            .then_rejected("already holds 2");
        given::<Item>(past())
            .when(C::Release(Release { order: "o9".into() }))
            .then_rejected("holds no units");
    }

    #[test]
    fn commands_on_a_missing_item_are_rejected() {
        given::<Item>([])
            .when(C::Restock(Restock { quantity: 1 }))
            .then_rejected("no such item");
        given::<Item>([])
            .when(reserve("o1", 1))
            .then_rejected("no such item");
        given::<Item>([added()])
            .when(C::AddItem(AddItem { name: "x".into() }))
            .then_rejected("already exists");
    }

    #[test]
    fn malformed_commands_are_invalid() {
        given::<Item>([added()])
            .when(C::Restock(Restock { quantity: 0 }))
            .then_invalid("quantity");
        given::<Item>([added()])
            .when(C::Restock(Restock {
                quantity: crate::MAX_QUANTITY + 1,
            }))
            .then_invalid("quantity");
        given::<Item>([added()])
            .when(reserve("o.1", 1))
            .then_invalid("order");
        given::<Item>([])
            .when(C::AddItem(AddItem { name: " ".into() }))
            .then_invalid("name");
    }

    #[test]
    fn stock_is_bounded() {
        let mut past = vec![added()];
        past.extend((0..MAX_STOCK / crate::MAX_QUANTITY).map(|_| Restocked {
            quantity: crate::MAX_QUANTITY,
        }));
        given::<Item>(past)
            .when(C::Restock(Restock { quantity: 1 }))
            .then_rejected("more than");
    }
}
