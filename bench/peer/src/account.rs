//! The bank account of jetsource's example (examples/bank/src/account.rs)
//! as a cqrs-es aggregate: the same commands, events and rules, so that both
//! systems run the same domain logic and the comparison is about the store.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// The state a command is decided on.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Account {
    pub opened: bool,
    pub balance: u64,
}

#[derive(Debug)]
pub enum AccountCommand {
    OpenAccount { owner: String },
    Deposit { amount: u64 },
    Withdraw { amount: u64 },
}

/// Serialized by serde's default (externally tagged) representation, which
/// is what postgres-es stores in `events.payload`: `{"Deposited":{"amount":1}}`.
/// The seeding of the load workloads writes the same JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AccountEvent {
    AccountOpened { owner: String },
    Deposited { amount: u64 },
    Withdrawn { amount: u64 },
}

/// `events.event_version` of every event; nothing is upcast.
pub const EVENT_VERSION: &str = "1.0";

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> String {
        match self {
            Self::AccountOpened { .. } => "AccountOpened",
            Self::Deposited { .. } => "Deposited",
            Self::Withdrawn { .. } => "Withdrawn",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        EVENT_VERSION.to_owned()
    }
}

/// A command the account refuses (the same refusals as jetsource's example).
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("account already opened")]
    AlreadyOpened,
    #[error("account not opened")]
    NotOpened,
    #[error("amount must be a positive integer")]
    ZeroAmount,
    #[error("balance would overflow")]
    Overflow,
    #[error("insufficient funds: balance is {balance}, withdrawal is {amount}")]
    InsufficientFunds { balance: u64, amount: u64 },
}

fn positive(amount: u64) -> Result<u64, AccountError> {
    if amount == 0 {
        return Err(AccountError::ZeroAmount);
    }
    Ok(amount)
}

impl Aggregate for Account {
    /// `events.aggregate_type` of its rows.
    const TYPE: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;
    type Services = ();

    async fn handle(
        &mut self,
        command: AccountCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), AccountError> {
        let event = match command {
            AccountCommand::OpenAccount { owner } => {
                if self.opened {
                    return Err(AccountError::AlreadyOpened);
                }
                AccountEvent::AccountOpened { owner }
            }
            AccountCommand::Deposit { amount } => {
                let amount = positive(amount)?;
                if !self.opened {
                    return Err(AccountError::NotOpened);
                }
                self.balance
                    .checked_add(amount)
                    .ok_or(AccountError::Overflow)?;
                AccountEvent::Deposited { amount }
            }
            AccountCommand::Withdraw { amount } => {
                let amount = positive(amount)?;
                if !self.opened {
                    return Err(AccountError::NotOpened);
                }
                if amount > self.balance {
                    return Err(AccountError::InsufficientFunds {
                        balance: self.balance,
                        amount,
                    });
                }
                AccountEvent::Withdrawn { amount }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: AccountEvent) {
        match event {
            AccountEvent::AccountOpened { .. } => self.opened = true,
            AccountEvent::Deposited { amount } => {
                self.balance = self.balance.saturating_add(amount);
            }
            AccountEvent::Withdrawn { amount } => {
                self.balance = self.balance.saturating_sub(amount);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn decide(state: &mut Account, command: AccountCommand) -> Result<(), AccountError> {
        let sink = EventSink::default();
        state.handle(command, &(), &sink).await
    }

    #[tokio::test]
    async fn overdraft_is_refused_and_deposits_add_up() {
        let mut account = Account::default();
        assert!(matches!(
            decide(&mut account, AccountCommand::Deposit { amount: 1 }).await,
            Err(AccountError::NotOpened)
        ));
        decide(
            &mut account,
            AccountCommand::OpenAccount {
                owner: "bench".into(),
            },
        )
        .await
        .expect("open");
        decide(&mut account, AccountCommand::Deposit { amount: 10 })
            .await
            .expect("deposit");
        assert!(matches!(
            decide(&mut account, AccountCommand::Withdraw { amount: 11 }).await,
            Err(AccountError::InsufficientFunds {
                balance: 10,
                amount: 11
            })
        ));
        decide(&mut account, AccountCommand::Withdraw { amount: 10 })
            .await
            .expect("withdraw");
        assert_eq!(account.balance, 0);
    }

    #[test]
    fn payload_is_what_the_seeding_writes() {
        let json = serde_json::to_string(&AccountEvent::Deposited { amount: 1 }).expect("json");
        assert_eq!(json, r#"{"Deposited":{"amount":1}}"#);
    }
}
