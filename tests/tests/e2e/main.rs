//! Pictor end to end: the api and worker against the real Redis and RabbitMQ, with local mock
//! servers for the model providers. One test binary; each test gets its own queues, Redis
//! prefix and image directory (see `tests::harness`).

#![expect(
    clippy::unwrap_used,
    reason = "a test should fail loudly on an unexpected value"
)]

mod alertmanager;
mod alerts;
mod backlog;
mod budget;
mod cluster;
mod compat;
mod costs;
mod dashboard;
mod deferrals;
mod deploy;
mod dlq;
mod docs;
mod failures;
mod faults;
mod hostile_clients;
mod hostile_upstreams;
mod intake;
mod jobs;
mod legacy;
mod lifecycle;
mod metrics;
mod money;
mod notify;
mod openapi;
mod playground;
mod redis_cluster;
mod resilience;
mod retention;
mod rules;
mod s3;
mod scaling;
mod scheduler;
mod sentinel;
mod stats;
mod traces;
mod uploads;
mod upscale;
