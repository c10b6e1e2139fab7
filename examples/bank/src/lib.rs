//! The bank: jetsource's example application, built only on its public
//! API. Bank [`account`]s and [`user`]s (pure functions over plain data),
//! the [`loyalty`] process, their [`read_models`] and queries, all declared
//! once in [`app`]; the binaries in src/bin each call one jetsource entry
//! point with it.

pub mod account;
pub mod loyalty;
pub mod read_models;
pub mod user;

use jetsource::domain::{DomainError, Registry};
use jetsource::App;

/// The whole application: what `jetsource-command`, `jetsource-projector`,
/// `jetsource-snapshotter` and `jetsource` serve.
pub fn app() -> App {
    App::new("jetsource")
        .aggregate::<account::Account>()
        .aggregate::<user::User>()
        .process::<loyalty::Loyalty>()
        .projection_with(|config| read_models::Accounts {
            recent_transactions: config.projector.recent_transactions,
        })
        .projection(read_models::Users)
}

/// Every aggregate type of the bank.
pub fn registry() -> Registry {
    app().registry().clone()
}

/// The bank's projections for a configuration, reading events through the
/// upcasters, as the projector runs them.
pub fn projections(config: &jetsource::Config) -> Vec<std::sync::Arc<dyn jetsource::Projection>> {
    app().projections(config)
}

/// Longest owner or user name accepted, in characters.
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
