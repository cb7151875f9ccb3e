//! Pictor's scheduler: daily usage, cost and performance reports, budget and health alerts, and
//! the monthly CSV export (see issue "Scheduler"). It is a library so that tests can drive it
//! with an injectable clock; the `pictor-scheduler` binary arrives with that work.
//!
//! Nothing is scheduled yet: the foundation needs no periodic work, because every accepted job
//! reaches a terminal state through the worker (redelivery and the poison-message rule), not
//! through a sweeper.
