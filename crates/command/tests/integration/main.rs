//! The command worker's integration tests, one binary: in-process workers against a real nats-server.

mod common;
mod concurrency;
mod deadline;
mod multi;
mod resilience;
mod worker;
