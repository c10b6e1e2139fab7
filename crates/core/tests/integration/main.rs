//! The core crate's integration tests, one binary: the event store against
//! a real nats-server, and snapshot properties.

mod group;
mod snapshot_props;
mod store;
