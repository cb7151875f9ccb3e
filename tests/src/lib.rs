//! Support code for Pictor's end-to-end tests: the `spawn_app` harness, mock providers that
//! speak the real wire formats, a cuttable TCP proxy for outage tests, a real SMTP server
//! for email tests, a headless Chromium for the pages the api serves, and the generator of the
//! Prometheus Operator resources in `infra/k8s/monitoring/`.

pub mod browser;
pub mod harness;
pub mod load;
pub mod mocks;
pub mod monitoring;
pub mod proxy;
pub mod scripted;
pub mod smtp;
