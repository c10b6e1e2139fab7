//! The example domain that ships with jetsource: bank [`account`]s and
//! [`user`]s. Pure functions over plain data; the workers serve it through
//! [`registry`].

pub mod account;
pub mod user;

use jetsource_aggregate::{DomainError, Registry};

/// Every aggregate type of the example domain.
pub fn registry() -> Registry {
    Registry::new()
        .register::<account::Account>()
        .register::<user::User>()
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
