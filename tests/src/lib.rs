//! Support code for Pictor's end-to-end tests: the `spawn_app` harness, mock providers that
//! speak the real wire formats, a cuttable TCP proxy for outage tests, and a real SMTP server
//! for email tests.

pub mod harness;
pub mod mocks;
pub mod proxy;
pub mod smtp;
