//! The projector's integration tests, one binary: real nats-server and redis-server, in-process workers.

mod common;
mod apply;
mod projector;
mod redis_connection;
mod replay;
