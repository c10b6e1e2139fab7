//! A bank account. Amounts are positive integers in minor units (cents);
//! the balance never goes negative and never overflows.

use jetsource::domain::{Aggregate, AggregateRef, Decided, DomainError, Others};
use serde::{Deserialize, Serialize};

#[derive(Debug)]
pub struct Account;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountStatus {
    /// No `AccountOpened` yet.
    #[default]
    New,
    Open,
    Closed,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountState {
    pub status: AccountStatus,
    pub owner: String,
    pub balance: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum AccountCommand {
    OpenAccount(OpenAccount),
    Deposit(Deposit),
    Withdraw(Withdraw),
    CloseAccount(CloseAccount),
    Transfer(Transfer),
    Reward(Reward),
}

/// Opens the account. A positive `initial_deposit` also deposits it, in the
/// same atomic append: the domain's one multi-event command.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAccount {
    pub owner: String,
    #[serde(default)]
    pub initial_deposit: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deposit {
    pub amount: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Withdraw {
    pub amount: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloseAccount {}

/// Credits a loyalty reward (sent by the loyalty process,
/// [`crate::loyalty`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reward {
    pub amount: u64,
}

/// Moves `amount` from this account to account `to`, both sides in one
/// atomic append: a multi-aggregate command (it `involves` `to`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transfer {
    pub to: String,
    pub amount: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum AccountEvent {
    AccountOpened {
        owner: String,
    },
    Deposited {
        amount: u64,
    },
    Withdrawn {
        amount: u64,
    },
    AccountClosed {},
    /// This account's side of a transfer: `amount` left for `to`.
    TransferSent {
        to: String,
        amount: u64,
    },
    /// The other side: `amount` arrived from `from`.
    TransferReceived {
        from: String,
        amount: u64,
    },
    /// A loyalty reward was credited.
    Rewarded {
        amount: u64,
    },
}

/// A change of balance: its name in transaction lists, its size, and
/// whether it adds to the balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Movement {
    pub kind: &'static str,
    pub amount: u64,
    pub credit: bool,
}

impl AccountEvent {
    /// The balance change this event makes, if any.
    pub fn movement(&self) -> Option<Movement> {
        let (kind, amount, credit) = match self {
            AccountEvent::Deposited { amount } => ("Deposited", *amount, true),
            AccountEvent::Withdrawn { amount } => ("Withdrawn", *amount, false),
            AccountEvent::TransferSent { amount, .. } => ("TransferSent", *amount, false),
            AccountEvent::TransferReceived { amount, .. } => ("TransferReceived", *amount, true),
            AccountEvent::Rewarded { amount } => ("Rewarded", *amount, true),
            AccountEvent::AccountOpened { .. } | AccountEvent::AccountClosed {} => return None,
        };
        Some(Movement {
            kind,
            amount,
            credit,
        })
    }
}

fn positive(amount: u64) -> Result<u64, DomainError> {
    if amount == 0 {
        return Err(DomainError::invalid("amount must be a positive integer"));
    }
    Ok(amount)
}

fn must_be_open(state: &AccountState) -> Result<(), DomainError> {
    match state.status {
        AccountStatus::Open => Ok(()),
        AccountStatus::New => Err(DomainError::rejected("account is not open")),
        AccountStatus::Closed => Err(DomainError::rejected("account is closed")),
    }
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type State = AccountState;
    type Command = AccountCommand;
    type Event = AccountEvent;

    fn handle(
        state: &AccountState,
        command: AccountCommand,
    ) -> Result<Vec<AccountEvent>, DomainError> {
        use AccountEvent::*;
        match command {
            AccountCommand::OpenAccount(open) => {
                let owner = crate::clean_name("owner", &open.owner)?;
                match state.status {
                    AccountStatus::New => {}
                    AccountStatus::Open => {
                        return Err(DomainError::rejected("account already exists"))
                    }
                    AccountStatus::Closed => {
                        return Err(DomainError::rejected(
                            "account is closed and cannot be reopened",
                        ))
                    }
                }
                let mut events = vec![AccountOpened { owner }];
                if open.initial_deposit > 0 {
                    events.push(Deposited {
                        amount: open.initial_deposit,
                    });
                }
                Ok(events)
            }
            AccountCommand::Deposit(Deposit { amount }) => {
                let amount = positive(amount)?;
                must_be_open(state)?;
                state
                    .balance
                    .checked_add(amount)
                    .ok_or_else(|| DomainError::rejected("deposit would overflow the balance"))?;
                Ok(vec![Deposited { amount }])
            }
            AccountCommand::Withdraw(Withdraw { amount }) => {
                let amount = positive(amount)?;
                must_be_open(state)?;
                if amount > state.balance {
                    return Err(DomainError::rejected(format!(
                        "insufficient funds: balance is {}, withdrawal is {amount}",
                        state.balance
                    )));
                }
                Ok(vec![Withdrawn { amount }])
            }
            AccountCommand::CloseAccount(CloseAccount {}) => {
                must_be_open(state)?;
                if state.balance != 0 {
                    return Err(DomainError::rejected(format!(
                        "balance must be zero to close the account, it is {}",
                        state.balance
                    )));
                }
                Ok(vec![AccountClosed {}])
            }
            AccountCommand::Reward(Reward { amount }) => {
                let amount = positive(amount)?;
                must_be_open(state)?;
                state
                    .balance
                    .checked_add(amount)
                    .ok_or_else(|| DomainError::rejected("reward would overflow the balance"))?;
                Ok(vec![Rewarded { amount }])
            }
            AccountCommand::Transfer(_) => Err(DomainError::invalid(
                "Transfer decides over two accounts and is decided by handle_with",
            )),
        }
    }

    fn involves(command: &AccountCommand) -> Vec<AggregateRef> {
        match command {
            AccountCommand::Transfer(t) => vec![AggregateRef::of::<Account>(&t.to)],
            _ => Vec::new(),
        }
    }

    fn handle_with(
        state: &AccountState,
        others: &Others,
        command: AccountCommand,
    ) -> Result<Decided<AccountEvent>, DomainError> {
        let AccountCommand::Transfer(Transfer { to, amount }) = command else {
            return Self::handle(state, command).map(Decided::new);
        };
        let amount = positive(amount)?;
        must_be_open(state)?;
        let target = others
            .get::<Account>(&to)
            .ok_or_else(|| DomainError::invalid(format!("account {to} was not loaded")))?;
        match target.status {
            AccountStatus::Open => {}
            AccountStatus::New => {
                return Err(DomainError::rejected(format!("account {to} is not open")))
            }
            AccountStatus::Closed => {
                return Err(DomainError::rejected(format!("account {to} is closed")))
            }
        }
        if amount > state.balance {
            return Err(DomainError::rejected(format!(
                "insufficient funds: balance is {}, transfer is {amount}",
                state.balance
            )));
        }
        if target.balance.checked_add(amount).is_none() {
            return Err(DomainError::rejected(format!(
                "transfer would overflow the balance of account {to}"
            )));
        }
        Ok(Decided::new(vec![AccountEvent::TransferSent {
            to: to.clone(),
            amount,
        }])
        .and::<Account>(
            to,
            [AccountEvent::TransferReceived {
                from: others.own_id().to_owned(),
                amount,
            }],
        ))
    }

    fn apply(mut state: AccountState, event: &AccountEvent) -> AccountState {
        // `handle` guarantees these never saturate; saturating keeps `apply`
        // total for any history, even one written by a buggy older version.
        match event {
            AccountEvent::AccountOpened { owner } => {
                state.status = AccountStatus::Open;
                state.owner.clone_from(owner);
            }
            AccountEvent::AccountClosed {} => state.status = AccountStatus::Closed,
            moved => {
                if let Some(m) = moved.movement() {
                    state.balance = if m.credit {
                        state.balance.saturating_add(m.amount)
                    } else {
                        state.balance.saturating_sub(m.amount)
                    };
                }
            }
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::AccountCommand as C;
    use super::AccountEvent::*;
    use super::*;
    use jetsource::domain::testing::given;

    fn opened() -> AccountEvent {
        AccountOpened {
            owner: "ada".into(),
        }
    }

    #[test]
    fn open_then_deposit_then_withdraw() {
        given::<Account>([])
            .when(C::OpenAccount(OpenAccount {
                owner: "  ada ".into(),
                initial_deposit: 0,
            }))
            .then_events([opened()]);
        given::<Account>([opened()])
            .when(C::Deposit(Deposit { amount: 100 }))
            .then_events([Deposited { amount: 100 }]);
        let state = given::<Account>([opened(), Deposited { amount: 100 }])
            .when(C::Withdraw(Withdraw { amount: 100 }))
            .then_events([Withdrawn { amount: 100 }]);
        assert_eq!(state.balance, 0);
    }

    #[test]
    fn open_with_initial_deposit_is_two_events() {
        let state = given::<Account>([])
            .when(C::OpenAccount(OpenAccount {
                owner: "ada".into(),
                initial_deposit: 50,
            }))
            .then_events([opened(), Deposited { amount: 50 }]);
        assert_eq!(state.balance, 50);
        assert_eq!(state.status, AccountStatus::Open);
    }

    #[test]
    fn opening_twice_or_reopening_is_rejected() {
        let open = || {
            C::OpenAccount(OpenAccount {
                owner: "bob".into(),
                initial_deposit: 0,
            })
        };
        given::<Account>([opened()])
            .when(open())
            .then_rejected("already exists");
        given::<Account>([opened(), AccountClosed {}])
            .when(open())
            .then_rejected("cannot be reopened");
    }

    #[test]
    fn bad_owner_is_invalid() {
        for owner in ["", "   ", "a\u{7}b"] {
            given::<Account>([])
                .when(C::OpenAccount(OpenAccount {
                    owner: owner.into(),
                    initial_deposit: 0,
                }))
                .then_invalid("owner");
        }
        given::<Account>([])
            .when(C::OpenAccount(OpenAccount {
                owner: "x".repeat(crate::MAX_NAME_CHARS + 1),
                initial_deposit: 0,
            }))
            .then_invalid("at most");
    }

    #[test]
    fn zero_amounts_are_invalid() {
        given::<Account>([opened()])
            .when(C::Deposit(Deposit { amount: 0 }))
            .then_invalid("positive");
        given::<Account>([opened()])
            .when(C::Withdraw(Withdraw { amount: 0 }))
            .then_invalid("positive");
    }

    #[test]
    fn balance_never_goes_negative() {
        given::<Account>([opened(), Deposited { amount: 10 }])
            .when(C::Withdraw(Withdraw { amount: 11 }))
            .then_rejected("insufficient funds: balance is 10");
    }

    #[test]
    fn deposit_overflow_is_rejected() {
        given::<Account>([opened(), Deposited { amount: u64::MAX }])
            .when(C::Deposit(Deposit { amount: 1 }))
            .then_rejected("overflow");
    }

    #[test]
    fn commands_on_an_account_that_is_not_open_are_rejected() {
        for past in [vec![], vec![opened(), AccountClosed {}]] {
            let not_open = if past.is_empty() {
                "not open"
            } else {
                "closed"
            };
            given::<Account>(past.clone())
                .when(C::Deposit(Deposit { amount: 1 }))
                .then_rejected(not_open);
            given::<Account>(past.clone())
                .when(C::Withdraw(Withdraw { amount: 1 }))
                .then_rejected(not_open);
            given::<Account>(past)
                .when(C::CloseAccount(CloseAccount {}))
                .then_rejected(not_open);
        }
    }

    #[test]
    fn closing_requires_zero_balance() {
        given::<Account>([opened(), Deposited { amount: 1 }])
            .when(C::CloseAccount(CloseAccount {}))
            .then_rejected("balance must be zero");
        let state = given::<Account>([opened(), Deposited { amount: 1 }, Withdrawn { amount: 1 }])
            .when(C::CloseAccount(CloseAccount {}))
            .then_events([AccountClosed {}]);
        assert_eq!(state.status, AccountStatus::Closed);
    }

    fn account(events: Vec<AccountEvent>) -> AccountState {
        given::<Account>(events).state().clone()
    }

    fn transfer(to: &str, amount: u64) -> AccountCommand {
        C::Transfer(Transfer {
            to: to.into(),
            amount,
        })
    }

    #[test]
    fn a_transfer_debits_this_account_and_credits_the_other() {
        let from = account(vec![opened(), Deposited { amount: 10 }]);
        let others = Others::sent_to("a").with::<Account>("b", account(vec![opened()]));
        assert_eq!(
            Account::involves(&transfer("b", 4)),
            [AggregateRef::of::<Account>("b")]
        );
        let decided = Account::handle_with(&from, &others, transfer("b", 4)).expect("decided");
        assert_eq!(
            decided.events,
            [TransferSent {
                to: "b".into(),
                amount: 4
            }]
        );
        assert_eq!(
            decided.events_for::<Account>("b").expect("decodes"),
            [TransferReceived {
                from: "a".into(),
                amount: 4
            }]
        );
        let after = decided.events.iter().fold(from, Account::apply);
        assert_eq!(after.balance, 6);
    }

    #[test]
    fn a_transfer_needs_funds_and_two_open_accounts() {
        let rich = account(vec![opened(), Deposited { amount: 10 }]);
        let open = account(vec![opened()]);
        let decide = |from: &AccountState, to: AccountState, amount: u64| {
            let others = Others::sent_to("a").with::<Account>("b", to);
            Account::handle_with(from, &others, transfer("b", amount))
                .map(|_| ())
                .expect_err("refused")
        };
        let short = decide(&rich, open.clone(), 11);
        assert!(
            short.message.contains("insufficient funds: balance is 10"),
            "{short}"
        );
        let zero = decide(&rich, open.clone(), 0);
        assert_eq!(zero.kind, jetsource::domain::DomainErrorKind::Invalid);
        let closed = decide(&rich, account(vec![opened(), AccountClosed {}]), 1);
        assert!(closed.message.contains("account b is closed"), "{closed}");
        let new = decide(&rich, AccountState::default(), 1);
        assert!(new.message.contains("account b is not open"), "{new}");
        let sender_closed = decide(&account(vec![opened(), AccountClosed {}]), open.clone(), 1);
        assert!(
            sender_closed.message.contains("account is closed"),
            "{sender_closed}"
        );
        let full = decide(
            &rich,
            account(vec![opened(), Deposited { amount: u64::MAX }]),
            1,
        );
        assert!(full.message.contains("overflow"), "{full}");
        // Without the other's state (a runtime that did not load it) it is
        // never decided blind.
        let blind = Account::handle_with(&rich, &Others::sent_to("a"), transfer("b", 1));
        assert!(blind.is_err());
    }

    #[test]
    fn wire_shapes() {
        let registry = crate::registry();
        let account = registry.get("account").expect("registered");
        let state = account.initial();
        let decide = |state: &jetsource::domain::State, t: &str, data: serde_json::Value| {
            account
                .parse(t, data)
                .and_then(|c| account.decide(state, &c))
        };
        let err = decide(
            &state,
            "Deposit",
            serde_json::json!({"amount": 1, "extra": true}),
        )
        .expect_err("unknown field");
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = decide(&state, "Teleport", serde_json::json!({})).expect_err("unknown command");
        assert!(err.to_string().contains("unknown variant"), "{err}");
        let err =
            decide(&state, "Deposit", serde_json::json!({"amount": -5})).expect_err("negative");
        assert!(err.to_string().contains("Deposit"), "{err}");
        let decision = decide(
            &state,
            "OpenAccount",
            serde_json::json!({"owner": "ada", "initial_deposit": 7}),
        )
        .expect("opens");
        let types: Vec<_> = decision
            .events
            .iter()
            .map(|e| e.event_type.as_str())
            .collect();
        assert_eq!(types, ["AccountOpened", "Deposited"]);
        assert_eq!(decision.events[1].data, br#"{"amount":7}"#);
        let closed = decide(
            &decision.state,
            "Withdraw",
            serde_json::json!({"amount": 7}),
        )
        .expect("withdraw");
        let closed = decide(&closed.state, "CloseAccount", serde_json::Value::Null)
            .expect("close with no data");
        assert_eq!(closed.events[0].data, b"{}");
        // Stored events fold back into the same state.
        let replayed = account
            .fold(
                &account.initial(),
                &mut decision
                    .events
                    .iter()
                    .map(|e| jetsource::domain::StoredEvent {
                        event_type: &e.event_type,
                        schema_version: 1,
                        data: &e.data,
                    }),
            )
            .expect("fold");
        assert_eq!(
            account.state_to_json(&replayed),
            account.state_to_json(&decision.state)
        );
    }
}
