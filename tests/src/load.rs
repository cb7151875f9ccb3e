//! Steady load through the api while a test takes infrastructure away: posts jobs at a fixed
//! pace from several clients, records every answer, and tells the longest time without a `202`
//! after a fault.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{ALICE, TestApp};

/// What the load saw: when each answer came, its status, and the accepted jobs.
#[derive(Default)]
pub struct Seen {
    pub answers: Vec<(Instant, StatusCode)>,
    pub accepted: Vec<String>,
}

impl Seen {
    /// The longest time between two `202`s from `from` to `until`.
    pub fn longest_gap(&self, from: Instant, until: Instant) -> Duration {
        let accepted: Vec<Instant> = self
            .answers
            .iter()
            .filter(|(at, status)| (from..=until).contains(at) && *status == StatusCode::ACCEPTED)
            .map(|(at, _)| *at)
            .collect();
        accepted
            .windows(2)
            .map(|pair| pair[1] - pair[0])
            .max()
            .unwrap_or_default()
    }

    /// Answers other than `202` and `503`.
    pub fn unexpected(&self) -> Vec<(Instant, StatusCode)> {
        self.answers
            .iter()
            .filter(|(_, status)| {
                *status != StatusCode::ACCEPTED && *status != StatusCode::SERVICE_UNAVAILABLE
            })
            .copied()
            .collect()
    }
}

/// Posts about `per_second` jobs a second from `clients` clients until `stop` says so,
/// recording every answer in `seen`. Every `503` must carry `Retry-After`.
pub async fn post_jobs(
    app: &TestApp,
    seen: Arc<Mutex<Seen>>,
    per_second: u32,
    clients: u32,
    stop: Arc<Mutex<bool>>,
) {
    let every = Duration::from_secs(1) * clients / per_second;
    let posters = (0..clients).map(|client| {
        let (seen, stop) = (seen.clone(), stop.clone());
        async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut index = 0;
            while !*stop.lock().expect("stop flag") {
                ticks.tick().await;
                let response = app
                    .post_job(ALICE, json!({"prompt": format!("load {client}.{index}")}))
                    .await;
                index += 1;
                let status = response.status();
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    assert!(
                        response.headers().contains_key("retry-after"),
                        "a 503 without Retry-After"
                    );
                }
                let id = if status == StatusCode::ACCEPTED {
                    let body: Value = response.json().await.expect("a 202 has a JSON body");
                    Some(
                        body["id"]
                            .as_str()
                            .expect("a 202 names its job")
                            .to_string(),
                    )
                } else {
                    None
                };
                let mut seen = seen.lock().expect("answers");
                seen.answers.push((Instant::now(), status));
                seen.accepted.extend(id);
            }
        }
    });
    futures::future::join_all(posters).await;
}
