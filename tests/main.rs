//! jetsource's end-to-end tests, one binary: the real binaries as separate
//! processes against real servers (single node and 3-node clusters), the
//! CLI, the benchmark and chaos runs in short form, the guide followed from
//! scratch, and the tidy checks.

mod backup;
mod bench;
mod chaos;
mod cli;
mod cluster;
mod console;
mod deploy;
mod fleet;
mod gateway;
mod guide;
mod health;
mod integrity;
mod metrics;
mod privacy;
mod processes;
mod read_side;
mod redis_outage;
mod security;
mod shutdown;
mod snapshots;
mod tidy;
mod tls;
mod tracing;
mod transfers;
