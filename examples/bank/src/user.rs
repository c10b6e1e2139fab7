//! A user with a display name. A deleted user does not exist any more:
//! renaming or deleting it is rejected, and its id may be created afresh.
//!
//! The name is personal data of data subject `user-<id>`: stored
//! encrypted, and erased everywhere by `jetsource forget user-<id>`, after
//! which it reads as `[erased]`.

use jetsource::domain::personal::{erased_text, PersonalData, Subject};
use jetsource::domain::{Aggregate, DomainError};
use serde::{Deserialize, Serialize};

#[derive(Debug)]
pub struct User;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserStatus {
    #[default]
    New,
    Active,
    Deleted,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserState {
    pub status: UserStatus,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum UserCommand {
    CreateUser(CreateUser),
    RenameUser(RenameUser),
    DeleteUser(DeleteUser),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenameUser {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteUser {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum UserEvent {
    UserCreated {
        #[serde(deserialize_with = "erased_text")]
        name: String,
    },
    UserNameUpdated {
        #[serde(deserialize_with = "erased_text")]
        name: String,
    },
    UserDeleted {},
}

/// Whose the personal fields are: the user's own.
const SUBJECT: Subject = Subject::AggregateId { prefix: "user-" };

fn must_exist(state: &UserState) -> Result<(), DomainError> {
    if state.status == UserStatus::Active {
        Ok(())
    } else {
        Err(DomainError::rejected("user does not exist"))
    }
}

impl Aggregate for User {
    const TYPE: &'static str = "user";
    const PERSONAL_DATA: &'static [PersonalData] = &[
        PersonalData {
            event_type: "UserCreated",
            subject: SUBJECT,
            fields: &["/name"],
        },
        PersonalData {
            event_type: "UserNameUpdated",
            subject: SUBJECT,
            fields: &["/name"],
        },
    ];
    type State = UserState;
    type Command = UserCommand;
    type Event = UserEvent;

    fn handle(state: &UserState, command: UserCommand) -> Result<Vec<UserEvent>, DomainError> {
        match command {
            UserCommand::CreateUser(CreateUser { name }) => {
                let name = crate::clean_name("name", &name)?;
                if state.status == UserStatus::Active {
                    return Err(DomainError::rejected("user already exists"));
                }
                Ok(vec![UserEvent::UserCreated { name }])
            }
            UserCommand::RenameUser(RenameUser { name }) => {
                let name = crate::clean_name("name", &name)?;
                must_exist(state)?;
                if name == state.name {
                    return Ok(vec![]);
                }
                Ok(vec![UserEvent::UserNameUpdated { name }])
            }
            UserCommand::DeleteUser(DeleteUser {}) => {
                must_exist(state)?;
                Ok(vec![UserEvent::UserDeleted {}])
            }
        }
    }

    fn apply(mut state: UserState, event: &UserEvent) -> UserState {
        match event {
            UserEvent::UserCreated { name } | UserEvent::UserNameUpdated { name } => {
                state.status = UserStatus::Active;
                state.name.clone_from(name);
            }
            UserEvent::UserDeleted {} => {
                state = UserState {
                    status: UserStatus::Deleted,
                    name: String::new(),
                };
            }
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::UserCommand as C;
    use super::UserEvent::*;
    use super::*;
    use jetsource::domain::testing::given;

    fn created() -> UserEvent {
        UserCreated { name: "Ada".into() }
    }

    #[test]
    fn create_rename_delete() {
        given::<User>([])
            .when(C::CreateUser(CreateUser { name: "Ada".into() }))
            .then_events([created()]);
        let state = given::<User>([created()])
            .when(C::RenameUser(RenameUser {
                name: "Ada L.".into(),
            }))
            .then_events([UserNameUpdated {
                name: "Ada L.".into(),
            }]);
        assert_eq!(state.name, "Ada L.");
        let state = given::<User>([created()])
            .when(C::DeleteUser(DeleteUser {}))
            .then_events([UserDeleted {}]);
        assert_eq!(state.status, UserStatus::Deleted);
        assert!(state.name.is_empty());
    }

    #[test]
    fn creating_an_existing_user_is_rejected() {
        given::<User>([created()])
            .when(C::CreateUser(CreateUser { name: "Bob".into() }))
            .then_rejected("already exists");
    }

    #[test]
    fn renaming_to_the_same_name_decides_nothing() {
        given::<User>([created()])
            .when(C::RenameUser(RenameUser {
                name: " Ada ".into(),
            }))
            .then_events([]);
    }

    #[test]
    fn a_deleted_user_does_not_exist() {
        let past = || vec![created(), UserDeleted {}];
        given::<User>(past())
            .when(C::RenameUser(RenameUser { name: "X".into() }))
            .then_rejected("does not exist");
        given::<User>(past())
            .when(C::DeleteUser(DeleteUser {}))
            .then_rejected("does not exist");
        given::<User>([])
            .when(C::DeleteUser(DeleteUser {}))
            .then_rejected("does not exist");
        // The id is free again.
        given::<User>(past())
            .when(C::CreateUser(CreateUser { name: "Eve".into() }))
            .then_events([UserCreated { name: "Eve".into() }]);
    }

    #[test]
    fn empty_names_are_invalid() {
        given::<User>([])
            .when(C::CreateUser(CreateUser { name: " ".into() }))
            .then_invalid("name must not be empty");
        given::<User>([created()])
            .when(C::RenameUser(RenameUser { name: "".into() }))
            .then_invalid("name must not be empty");
    }
}
