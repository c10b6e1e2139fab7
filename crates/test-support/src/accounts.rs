//! The shipped NATS accounts (`nats/accounts.conf`: one user per role,
//! docs/SECURITY.md) with fresh passwords, rendered as `make run` renders
//! them (scripts/dev-lib.sh): the passwords as variables
//! `JETSOURCE_<ROLE>_PASSWORD`, then the shipped file. For
//! `NatsServer::start_configured` and `NatsCluster::start_configured`.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// The roles of `nats/accounts.conf`.
pub const ROLES: [&str; 7] = [
    "client",
    "command",
    "projector",
    "snapshotter",
    "admin",
    "gateway",
    "process",
];

/// A password per role and the server configuration made from them.
#[derive(Debug, Clone)]
pub struct RoleCredentials {
    passwords: Vec<(&'static str, String)>,
}

impl RoleCredentials {
    /// A fresh random password per role.
    pub fn generate() -> Self {
        let passwords = ROLES
            .iter()
            .map(|role| {
                let password: String = (0..2)
                    .map(|_| {
                        let mut h = RandomState::new().build_hasher();
                        h.write(role.as_bytes());
                        format!("{:016x}", h.finish())
                    })
                    .collect();
                (*role, password)
            })
            .collect();
        Self { passwords }
    }

    pub fn password(&self, role: &str) -> &str {
        self.passwords
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, p)| p.as_str())
            .unwrap_or_else(|| panic!("no role {role:?} in nats/accounts.conf"))
    }

    /// What `make run` writes into `.run/nats-accounts.conf`.
    pub fn server_config(&self) -> String {
        let accounts = concat!(env!("CARGO_MANIFEST_DIR"), "/../../nats/accounts.conf");
        let accounts = std::fs::read_to_string(accounts)
            .unwrap_or_else(|e| panic!("cannot read {accounts}: {e}"));
        let mut config = String::from("\n");
        for (role, password) in &self.passwords {
            config += &format!(
                "JETSOURCE_{}_PASSWORD: \"{password}\"\n",
                role.to_uppercase()
            );
        }
        config + &accounts
    }

    /// A process's environment for `role`, as in `.run/<role>.env`.
    pub fn env<'a>(&'a self, role: &'a str) -> [(&'static str, &'a str); 2] {
        [
            ("JETSOURCE__NATS__USER", role),
            ("JETSOURCE__NATS__PASSWORD", self.password(role)),
        ]
    }

    /// Connection options for `role`, with the role's own reply inboxes
    /// (`_INBOX.<role>`, what jetsource processes use: the only inboxes the
    /// shipped accounts let a role subscribe to).
    pub fn options(&self, role: &str) -> async_nats::ConnectOptions {
        async_nats::ConnectOptions::with_user_and_password(
            role.to_owned(),
            self.password(role).to_owned(),
        )
        .custom_inbox_prefix(format!("_INBOX.{role}"))
    }

    /// A client connected as `role`.
    /// A client as `role` at `url` (comma-separated for a cluster).
    pub async fn connect(&self, url: &str, role: &str) -> async_nats::Client {
        let servers: Vec<&str> = url.split(',').collect();
        self.options(role).connect(servers).await.unwrap()
    }
}
