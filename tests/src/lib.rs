//! Support code for Pictor's end-to-end tests: the `spawn_app` harness, mock providers that
//! speak the real wire formats, a cuttable TCP proxy for outage tests, a real SMTP server
//! for email tests, and a headless Chromium for the pages the api serves.

pub mod browser;
pub mod harness;
pub mod load;
pub mod mocks;
pub mod proxy;
pub mod scripted;
pub mod smtp;
