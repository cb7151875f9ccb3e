//! The `pictor` command line's library: the operator tools that only the command line uses, kept
//! here rather than in `shared` so that the api, worker and scheduler do not carry them. The
//! end-to-end tests drive them through this library too.

pub mod dlq;
pub mod legacy;
