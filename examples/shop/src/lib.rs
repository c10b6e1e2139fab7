//! The shop: jetsource's second example application, built only on its
//! public API, and shaped differently from the bank. Stock [`item`]s and
//! [`order`]s with lines (an aggregate whose event schema moved to version
//! 2, read through an upcaster), and [`read_models`] that are lists and
//! indexes (orders per customer and per status, paged with a cursor; items
//! low on stock) rather than counters. All declared once in [`app`]; the
//! binaries in src/bin each call one jetsource entry point with it.

pub mod fulfilment;
pub mod item;
pub mod order;
pub mod read_models;

use jetsource::domain::{is_valid_token, DomainError};
use jetsource::App;

/// The whole application: what `shop-command`, `shop-projector`,
/// `shop-snapshotter` and `shop` serve.
pub fn app() -> App {
    App::new("shop")
        .aggregate::<item::Item>()
        .aggregate::<order::Order>()
        .process::<fulfilment::Fulfilment>()
        .projection(read_models::Orders)
        .projection(read_models::Stock)
}

/// Largest quantity of one command (a restock, a reservation, an order
/// line).
pub const MAX_QUANTITY: u64 = 1_000_000;
/// Most units of one item on hand.
pub const MAX_STOCK: u64 = 1_000_000_000;
/// Largest unit price, in minor units.
pub const MAX_PRICE: u64 = 1_000_000_000;
/// Most lines of one order. With the bounds above an order's total stays
/// far inside the read models' 64-bit integers.
pub const MAX_LINES: usize = 100;
/// Longest item name, in characters.
pub const MAX_NAME_CHARS: usize = 128;

/// Trims a human name and checks it is printable and not too long.
fn clean_name(field: &str, name: &str) -> Result<String, DomainError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(DomainError::invalid(format!("{field} must not be empty")));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(DomainError::invalid(format!(
            "{field} must be at most {MAX_NAME_CHARS} characters"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(DomainError::invalid(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(name.to_owned())
}

/// An identifier that keys read models and queries (a customer, a SKU, an
/// order id): one subject token.
fn token(field: &str, value: String) -> Result<String, DomainError> {
    if is_valid_token(&value) {
        Ok(value)
    } else {
        Err(DomainError::invalid(format!(
            "{field} {value:?} is invalid: use 1 to 64 characters of A-Z a-z 0-9 _ -"
        )))
    }
}

fn quantity(quantity: u64) -> Result<u64, DomainError> {
    if quantity == 0 || quantity > MAX_QUANTITY {
        return Err(DomainError::invalid(format!(
            "quantity must be 1 to {MAX_QUANTITY}, not {quantity}"
        )));
    }
    Ok(quantity)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_app_declares_its_queries_without_overlap() {
        let app = super::app();
        assert_eq!(app.name(), "shop");
        assert_eq!(
            app.registry().types().collect::<Vec<_>>(),
            ["fulfilment", "item", "order"]
        );
        let processes: Vec<_> = app.registry().processes().map(|p| p.follows()).collect();
        assert_eq!(processes, ["order"]);
        let projections = app.projections(&jetsource::Config::default());
        let names: Vec<_> = projections.iter().map(|p| p.name()).collect();
        assert_eq!(names, ["orders", "stock"]);
        let router = jetsource::Router::new(&projections).expect("no overlap");
        let mut subjects: Vec<_> = router
            .queries()
            .map(|(spec, _)| spec.subject_pattern())
            .collect();
        subjects.sort();
        assert_eq!(
            subjects,
            [
                "query.item.<sku>",
                "query.items.low_stock",
                "query.order.<id>",
                "query.orders.by_customer.<customer>",
                "query.orders.by_status.<status>",
            ]
        );
    }
}
