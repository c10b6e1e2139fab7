//! The projector's integration tests, one binary: real nats-server and redis-server, in-process workers.

mod apply;
mod common;
mod in_flight;
mod projector;
mod redis_connection;
mod replay;
