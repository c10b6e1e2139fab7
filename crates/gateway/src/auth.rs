//! API keys and the roles they carry (docs/GATEWAY.md). Only SHA-256
//! hashes of the keys are configured, so a leaked configuration does not
//! leak a key; a request sends the key itself as `Authorization: Bearer
//! <key>` (or `X-Api-Key: <key>`).

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// What a key may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Queries, histories, state, live events.
    Read,
    /// And commands.
    Write,
    /// And the operator's views.
    Admin,
}

impl Role {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "read" => Some(Role::Read),
            "write" => Some(Role::Write),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }
}

/// The configured keys: (SHA-256 of the key, role).
#[derive(Clone, Default)]
pub struct Keys(Vec<([u8; 32], Role)>);

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({} configured)", self.0.len())
    }
}

impl Keys {
    /// Parses `gateway.api_keys`: `role=<64 hex digits>` entries separated
    /// by commas (whitespace ignored).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (role, hash) = entry.split_once('=').ok_or_else(|| {
                "gateway.api_keys: expected role=<sha256 hex>, e.g. read=9f86d0...".to_owned()
            })?;
            let role = Role::parse(role.trim()).ok_or_else(|| {
                format!("gateway.api_keys: unknown role {role:?}; roles are read, write, admin")
            })?;
            let hash = decode_hex(hash.trim()).ok_or_else(|| {
                format!("gateway.api_keys: the {} key's hash is not 64 hex digits (sha256sum of the key)", role.as_str())
            })?;
            keys.push((hash, role));
        }
        Ok(Self(keys))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The role of the request's key, or why there is none.
    pub fn role(&self, headers: &HeaderMap) -> Result<Role, ApiError> {
        let bearer = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let key = bearer.or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
        let Some(key) = key else {
            return Err(ApiError::Unauthorized(
                "an API key is required: Authorization: Bearer <key> (or X-Api-Key)".into(),
            ));
        };
        let hash: [u8; 32] = Sha256::digest(key.trim().as_bytes()).into();
        // Compared in full for every configured key: no early exit that
        // would time how much of a hash matched.
        let mut found = None;
        for (known, role) in &self.0 {
            let same = known.iter().zip(&hash).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0;
            if same {
                found = Some(*role);
            }
        }
        found.ok_or_else(|| ApiError::Unauthorized("unknown API key".into()))
    }

    /// The request's role if it is at least `needed`.
    pub fn require(&self, headers: &HeaderMap, needed: Role) -> Result<Role, ApiError> {
        let role = self.role(headers)?;
        if role < needed {
            return Err(ApiError::Forbidden(format!(
                "this API key has role {}; this needs {}",
                role.as_str(),
                needed.as_str()
            )));
        }
        Ok(role)
    }
}

fn decode_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn hex(key: &str) -> String {
        Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn headers(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {key}").parse().unwrap());
        h
    }

    #[test]
    fn keys_map_to_roles_and_roles_include_lesser_ones() {
        let keys = Keys::parse(&format!("read={}, write={}", hex("r-key"), hex("w-key"))).unwrap();
        assert_eq!(keys.role(&headers("r-key")).unwrap(), Role::Read);
        assert!(keys.require(&headers("w-key"), Role::Read).is_ok());
        assert!(matches!(
            keys.require(&headers("r-key"), Role::Write),
            Err(ApiError::Forbidden(_))
        ));
        assert!(matches!(
            keys.role(&headers("nope")),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            keys.role(&HeaderMap::new()),
            Err(ApiError::Unauthorized(_))
        ));
    }

    #[test]
    fn malformed_configuration_is_refused_with_the_reason() {
        assert!(Keys::parse("read")
            .unwrap_err()
            .contains("role=<sha256 hex>"));
        assert!(Keys::parse("boss=00").unwrap_err().contains("unknown role"));
        assert!(Keys::parse("read=abc").unwrap_err().contains("64 hex"));
        assert!(Keys::parse("").unwrap().is_empty());
    }
}
