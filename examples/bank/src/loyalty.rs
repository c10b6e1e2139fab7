//! Loyalty: a process that rewards an account's loyalty. Every
//! [`MILESTONE`]th event of an account that is a deposit earns a reward of
//! [`REWARD`], credited [`COOLING_OFF_MS`] later (a deadline) unless the
//! account was closed meanwhile. One instance per account, driven by the
//! bank's process worker, `jetsource-process`.
//!
//! Small, but it has what a process needs in production: inputs in order,
//! a durable deadline per reward, a command per reward sent under its own
//! key (`reward-<version>`: never credited twice however often it is sent),
//! and a refusal (a closed account) recorded rather than retried.

use std::collections::BTreeMap;

use jetsource::domain::process::{Answer, Deadline, Input, Outgoing, Process};
use jetsource::serde_json::json;
use serde::{Deserialize, Serialize};

use crate::account::{Account, AccountEvent};

/// Every this many events of an account, if that event is a deposit.
pub const MILESTONE: u64 = 25;
/// The reward, in minor units.
pub const REWARD: u64 = 1;
/// How long after the milestone deposit the reward is credited.
pub const COOLING_OFF_MS: u64 = 2_000;

#[derive(Debug)]
pub struct Loyalty;

/// Where one reward stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Earned; credited once `due_ms` passes.
    CoolingOff {
        due_ms: u64,
    },
    /// Due: `Reward` sent (or to be sent) until answered.
    Crediting,
    Paid,
    /// The account was closed first, or refused it.
    Forfeited,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoyaltyState {
    /// Rewards by the version of the deposit that earned them.
    pub rewards: BTreeMap<u64, Stage>,
    pub closed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum LoyaltyEvent {
    RewardEarned { milestone: u64, due_ms: u64 },
    RewardDue { milestone: u64 },
    RewardPaid { milestone: u64 },
    RewardForfeited { milestone: u64, reason: String },
    AccountClosedSeen {},
}

fn name(milestone: u64) -> String {
    format!("reward-{milestone}")
}

fn milestone_of(key: &str) -> Option<u64> {
    key.strip_prefix("reward-")?.parse().ok()
}

impl Process for Loyalty {
    const TYPE: &'static str = "loyalty";
    type Follows = Account;
    type State = LoyaltyState;
    type Event = LoyaltyEvent;

    fn handle(state: &LoyaltyState, input: Input<'_, Account>) -> Vec<LoyaltyEvent> {
        use LoyaltyEvent::*;
        match input {
            Input::Event {
                event: AccountEvent::Deposited { .. },
                version,
                at_ms,
            } if version % MILESTONE == 0 && !state.closed => vec![RewardEarned {
                milestone: version,
                due_ms: at_ms + COOLING_OFF_MS,
            }],
            Input::Event {
                event: AccountEvent::AccountClosed {},
                ..
            } if !state.closed => {
                let mut events = vec![AccountClosedSeen {}];
                for (&milestone, stage) in &state.rewards {
                    if matches!(stage, Stage::CoolingOff { .. }) {
                        events.push(RewardForfeited {
                            milestone,
                            reason: "account closed".into(),
                        });
                    }
                }
                events
            }
            Input::Event { .. } => vec![],
            Input::Deadline { name } => match milestone_of(name) {
                Some(milestone)
                    if matches!(
                        state.rewards.get(&milestone),
                        Some(Stage::CoolingOff { .. })
                    ) =>
                {
                    vec![RewardDue { milestone }]
                }
                _ => vec![],
            },
            Input::Answered { key, answer } => match milestone_of(key) {
                Some(milestone) if state.rewards.get(&milestone) == Some(&Stage::Crediting) => {
                    vec![match answer {
                        Answer::Done { .. } => RewardPaid { milestone },
                        Answer::Refused { message, .. } => RewardForfeited {
                            milestone,
                            reason: message.clone(),
                        },
                    }]
                }
                _ => vec![],
            },
        }
    }

    fn apply(mut state: LoyaltyState, event: &LoyaltyEvent) -> LoyaltyState {
        use LoyaltyEvent::*;
        match event {
            RewardEarned { milestone, due_ms } => {
                let stage = Stage::CoolingOff { due_ms: *due_ms };
                state.rewards.insert(*milestone, stage);
            }
            RewardDue { milestone } => {
                state.rewards.insert(*milestone, Stage::Crediting);
            }
            RewardPaid { milestone } => {
                state.rewards.insert(*milestone, Stage::Paid);
            }
            RewardForfeited { milestone, .. } => {
                state.rewards.insert(*milestone, Stage::Forfeited);
            }
            AccountClosedSeen {} => state.closed = true,
        }
        state
    }

    fn pending(account: &str, state: &LoyaltyState) -> Vec<Outgoing> {
        state
            .rewards
            .iter()
            .filter(|(_, stage)| **stage == Stage::Crediting)
            .map(|(&milestone, _)| {
                let data = json!({ "amount": REWARD });
                Outgoing::to::<Account>(name(milestone), account, "Reward", data)
            })
            .collect()
    }

    fn deadlines(state: &LoyaltyState) -> Vec<Deadline> {
        state
            .rewards
            .iter()
            .filter_map(|(&milestone, stage)| match stage {
                Stage::CoolingOff { due_ms } => Some(Deadline {
                    name: name(milestone),
                    at_ms: *due_ms,
                }),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::LoyaltyEvent::*;
    use super::*;

    fn feed(state: LoyaltyState, input: Input<'_, Account>) -> LoyaltyState {
        Loyalty::handle(&state, input)
            .iter()
            .fold(state, Loyalty::apply)
    }

    fn deposit(state: LoyaltyState, version: u64) -> LoyaltyState {
        let event = AccountEvent::Deposited { amount: 5 };
        feed(
            state,
            Input::Event {
                event: &event,
                version,
                at_ms: 1_000,
            },
        )
    }

    #[test]
    fn a_milestone_deposit_is_rewarded_once_after_cooling_off() {
        let state = deposit(LoyaltyState::default(), MILESTONE - 1);
        assert!(state.rewards.is_empty());
        let state = deposit(state, MILESTONE);
        let due = Deadline {
            name: "reward-25".into(),
            at_ms: 1_000 + COOLING_OFF_MS,
        };
        assert_eq!(Loyalty::deadlines(&state), [due]);
        assert!(Loyalty::pending("a", &state).is_empty());
        let state = feed(state, Input::Deadline { name: "reward-25" });
        let pending = Loyalty::pending("a", &state);
        assert_eq!(pending.len(), 1);
        assert_eq!(
            (pending[0].key.as_str(), pending[0].command_type.as_str()),
            ("reward-25", "Reward")
        );
        // The same deadline again (a doubled firing) changes nothing.
        assert!(Loyalty::handle(&state, Input::Deadline { name: "reward-25" }).is_empty());
        let done = Answer::Done { events: vec![] };
        let answered = Input::Answered {
            key: "reward-25",
            answer: &done,
        };
        assert_eq!(
            Loyalty::handle(&state, answered),
            [RewardPaid { milestone: 25 }]
        );
    }

    #[test]
    fn closing_the_account_forfeits_rewards_still_cooling_off() {
        let state = deposit(LoyaltyState::default(), MILESTONE);
        let closed = AccountEvent::AccountClosed {};
        let input = Input::Event {
            event: &closed,
            version: 30,
            at_ms: 2_000,
        };
        let state = feed(state, input);
        assert!(state.closed);
        assert_eq!(state.rewards[&25], Stage::Forfeited);
        assert!(Loyalty::deadlines(&state).is_empty());
        assert!(!deposit(state, 50).rewards.contains_key(&50));
    }
}
