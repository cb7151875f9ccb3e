//! Steady load through the api while a test takes infrastructure away: posts jobs at a fixed
//! pace from several clients, records every answer, and tells the longest time without a `202`
//! after a fault.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{ALICE, TestApp};
use crate::mocks::Arrivals;

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

    /// How long after `from` the first `202` came (all of `from`..`until` when none did): the
    /// outage itself, which [`Self::longest_gap`], between `202`s, does not see.
    pub fn outage(&self, from: Instant, until: Instant) -> Duration {
        self.answers
            .iter()
            .filter(|(at, status)| (from..=until).contains(at) && *status == StatusCode::ACCEPTED)
            .map(|(at, _)| *at - from)
            .min()
            .unwrap_or(until.saturating_duration_since(from))
    }

    /// What a fault drill promises of the api: it answered only `202` or `503` (each `503` with
    /// `Retry-After`, checked as it came), and after each fault (named, with when it began) a
    /// `202` came again within 10 s, until the next fault or now. Answers a summary line.
    pub fn assert_recovered(&self, faults: &[(&str, Instant)]) -> String {
        let others = self.unexpected();
        assert!(
            others.is_empty(),
            "answers other than 202 and 503: {others:?}"
        );
        let now = Instant::now();
        let gaps: Vec<String> = faults
            .iter()
            .enumerate()
            .map(|(index, (fault, from))| {
                let until = faults.get(index + 1).map_or(now, |(_, next)| *next);
                let gap = self.longest_gap(*from, until);
                assert!(
                    gap < Duration::from_secs(10),
                    "after {fault}, no job was accepted for {gap:?}"
                );
                let outage = self.outage(*from, until);
                format!("{gap:?} after {fault} (its first 202 after {outage:?})")
            })
            .collect();
        let lasted = match (self.answers.first(), self.answers.last()) {
            (Some((first, _)), Some((last, _))) => (*last - *first).as_secs_f64(),
            _ => 0.0,
        };
        format!(
            "{} answers in {lasted:.0} s ({:.0}/s), {} accepted, {} answered 503; longest time \
             without a 202: {}",
            self.answers.len(),
            self.answers.len() as f64 / lasted.max(1.0),
            self.accepted.len(),
            self.answers.len() - self.accepted.len(),
            gaps.join(", ")
        )
    }

    /// Every accepted job ended `succeeded`, with one image call each: none was lost, none
    /// paid for twice.
    pub async fn assert_each_succeeded_once(&self, app: &TestApp, image_calls: &Arrivals) {
        for id in &self.accepted {
            let job = app.wait_until_terminal(ALICE, id).await;
            assert_eq!(job["status"], "succeeded", "{job:#}");
        }
        assert_eq!(image_calls.times().len(), self.accepted.len());
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

/// Runs `drill` (which takes things away and brings them back) while [`post_jobs`] loads the
/// api, stops the load when the drill ends, and answers what the load saw and the drill's own
/// answer.
pub async fn while_loaded<T>(
    app: &TestApp,
    per_second: u32,
    clients: u32,
    drill: impl std::future::Future<Output = T>,
) -> (Seen, T) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(Mutex::new(false));
    let loader = post_jobs(app, seen.clone(), per_second, clients, stop.clone());
    let drill = async {
        let answer = drill.await;
        *stop.lock().expect("stop flag") = true;
        answer
    };
    let ((), answer) = tokio::join!(loader, drill);
    let seen = Arc::into_inner(seen)
        .expect("the load is over")
        .into_inner()
        .expect("answers");
    (seen, answer)
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

/// A config file (`PICTOR_CONFIG`) for a worker process whose provider limits and monthly
/// budget no test load reaches, deleted on drop: load tests take infrastructure away, not the
/// providers' limits or the budget. An in-process api or worker gets the same from
/// [`unbounded`].
pub struct UnlimitedConfig {
    pub path: std::path::PathBuf,
}

impl UnlimitedConfig {
    pub fn write() -> Self {
        let path = std::env::temp_dir().join(format!("limits-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(
            &path,
            r#"
[rate_limits."openai:gpt-4.1-mini"]
requests_per_minute = 10000000
tokens_per_minute = 1000000000

[rate_limits."openai:gpt-image-2"]
requests_per_minute = 10000000
images_per_minute = 10000000

[budget]
monthly_usd = "1000000.00"
"#,
        )
        .expect("write the limits file");
        Self { path }
    }

    pub fn path(&self) -> &str {
        self.path.to_str().expect("a UTF-8 temp path")
    }
}

impl Drop for UnlimitedConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What [`UnlimitedConfig`] sets, for in-process settings: no provider limits, a budget and a
/// pace no load test reaches.
pub fn unbounded(settings: &mut shared::config::Settings) {
    settings.rate_limits.clear();
    settings.budget.monthly_micros = 1_000_000_000_000;
    settings.api.user_jobs_per_minute = std::num::NonZeroU32::new(100_000).expect("non-zero");
    settings.api.user_burst = std::num::NonZeroU32::new(10_000).expect("non-zero");
    settings.backlog.max_pending_per_user = std::num::NonZeroU32::new(10_000).expect("non-zero");
}
