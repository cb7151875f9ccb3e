//! Support code for Pictor's end-to-end tests: the `spawn_app` harness, mock providers that
//! speak the real wire formats, and a cuttable TCP proxy for outage tests.

pub mod harness;
pub mod mocks;
pub mod proxy;
