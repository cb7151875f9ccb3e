//! Scenario 7: the fair backlog at scale (`docs/architecture.md`, "A fair backlog").
//!
//! Ten users share one image model limited to `RATE_PER_MINUTE` images a minute. One of them
//! posts 5,000 jobs at once; two seconds later each of the nine others posts 20. The same load
//! runs twice, interleaved on fresh deployments: with fair sharing (the default,
//! `PICTOR_FAIR_SLACK=1`) and first come, first served (`PICTOR_FAIR_SLACK=0`). Reported per
//! user group: the time from `202` to `succeeded` (p50, p95), and the model's utilisation (image
//! calls granted per second over the configured rate, while work was waiting).
//!
//! Then the cost of a waiting job's place in line (`Fairness::place`, the one script behind
//! `queue` in `GET /v1/jobs/{id}`) with 10,000 jobs pending, spread three ways, measured from
//! the client (round trip) and inside Redis (`INFO commandstats`).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use serde_json::{Value, json};
use shared::domain::{JobId, UserId};
use shared::fair::FairPolicy;

use crate::fleet::{Deployment, Images, fetch_metrics, metric_sum};
use crate::mock::{Mock, MockSpec};

/// The image model's limit, in images (and requests) a minute: 100 a second.
const RATE_PER_MINUTE: u32 = 6_000;
const HEAVY_JOBS: usize = 5_000;
const LIGHT_USERS: usize = 9;
const LIGHT_JOBS: usize = 20;
/// How long after the heavy user's first job the light users post theirs.
const LIGHT_AFTER: Duration = Duration::from_secs(2);
/// Provider latency of the mock, per call.
const PROVIDER_DELAY: Duration = Duration::from_millis(100);

/// One run of the load, fair or first come first served.
pub struct FairRun {
    pub fair: bool,
    /// Seconds from `202` to `succeeded`: (p50, p95) of the heavy user's jobs.
    pub heavy: (f64, f64),
    /// Likewise for the light users' jobs, all together.
    pub light: (f64, f64),
    /// The light user whose jobs waited longest: their p95.
    pub worst_light_p95: f64,
    /// Heavy jobs that succeeded between the light users' first post and their last success.
    pub heavy_done_meanwhile: usize,
    /// Image calls per second over the busy period, divided by the configured rate.
    pub utilisation: f64,
    /// The lowest utilisation of any full 5-second window while work waited.
    pub worst_window: f64,
    /// The busy period: first to last success, in seconds.
    pub busy_seconds: f64,
}

/// `place()` at 10,000 pending jobs, one way of spreading them.
pub struct PlaceCost {
    pub users: usize,
    pub pending: usize,
    /// Client-side round trip, microseconds per call (median of the calls).
    pub round_trip_us: f64,
    /// Inside Redis, microseconds per script run (`cmdstat_evalsha`).
    pub redis_us: f64,
}

pub struct Fairness {
    pub runs: Vec<FairRun>,
    pub place: Vec<PlaceCost>,
}

pub async fn fairness(binary: &Path, rounds: usize) -> anyhow::Result<Fairness> {
    let mut runs = Vec::new();
    for _ in 0..rounds {
        for fair in [true, false] {
            println!(
                "   {} …",
                if fair {
                    "fair sharing"
                } else {
                    "first come, first served"
                }
            );
            runs.push(one_run(binary, fair).await?);
        }
    }
    let place = place_costs().await?;
    Ok(Fairness { runs, place })
}

fn keys() -> Vec<(String, String)> {
    (0..=LIGHT_USERS)
        .map(|index| (format!("user{index}"), format!("bench-user-{index}")))
        .collect()
}

async fn one_run(binary: &Path, fair: bool) -> anyhow::Result<FairRun> {
    let mock = Mock::start(MockSpec {
        delay: PROVIDER_DELAY,
        image_side: 64,
    })
    .await?;
    let api_keys = keys()
        .iter()
        .map(|(user, key)| format!("{user}:user:{key}"))
        .collect::<Vec<_>>()
        .join(",");
    let deployment = Deployment::new(
        binary,
        &mock.base_url(),
        &[
            ("PICTOR_API_KEYS", api_keys),
            (
                "PICTOR_FAIR_SLACK",
                if fair { "1" } else { "0" }.to_string(),
            ),
        ],
        Images::Tmpfs,
    )?;
    deployment.limit_image_model(RATE_PER_MINUTE)?;
    let result = run_in(&deployment, &mock).await;
    deployment.cleanup().await;
    result.map(|mut run| {
        run.fair = fair;
        run
    })
}

/// A job as the bench saw it: who, when accepted (client clock), its id.
struct Posted {
    user: usize,
    id: String,
}

async fn run_in(deployment: &Deployment, mock: &Mock) -> anyhow::Result<FairRun> {
    let api = deployment
        .spawn("api", &[], Some(deployment.api_url("/readyz")))
        .await?;
    let metrics_port = crate::fleet::free_port()?;
    let worker = deployment
        .spawn(
            "worker",
            &[
                ("PICTOR_WORKER_CONCURRENCY", "256".to_string()),
                (
                    "PICTOR_WORKER_METRICS_ADDR",
                    format!("127.0.0.1:{metrics_port}"),
                ),
            ],
            Some(format!("http://127.0.0.1:{metrics_port}/healthz")),
        )
        .await?;
    let metrics = format!("http://127.0.0.1:{metrics_port}/metrics");
    let client = crate::load::http_client(64);
    let keys = keys();
    let url = deployment.api_url("/v1/jobs");

    let heavy = {
        let (client, url, key) = (client.clone(), url.clone(), keys[0].1.clone());
        tokio::spawn(async move { post_many(&client, &url, &key, 0, HEAVY_JOBS, 32).await })
    };
    tokio::time::sleep(LIGHT_AFTER).await;
    let light_started = chrono::Utc::now();
    let mut light = Vec::new();
    for (index, (_, key)) in keys.iter().enumerate().skip(1) {
        let (client, url, key) = (client.clone(), url.clone(), key.clone());
        light.push(tokio::spawn(async move {
            post_many(&client, &url, &key, index, LIGHT_JOBS, 4).await
        }));
    }
    let mut posted = heavy.await??;
    for task in light {
        posted.extend(task.await??);
    }
    let total = posted.len();

    // Wait for every job to end.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let page = fetch_metrics(&client, &metrics).await.unwrap_or_default();
        let finished = metric_sum(&page, "pictor_jobs_finished_total", "");
        if finished as usize >= total {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {finished} of {total} jobs finished in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let image_calls = mock.calls().1;

    // Read every job's times back through the api.
    let views: Vec<(usize, Value)> = futures::stream::iter(posted)
        .map(|job| {
            let client = client.clone();
            let key = keys[job.user].1.clone();
            let url = deployment.api_url(&format!("/v1/jobs/{}", job.id));
            async move {
                let view: Value = client
                    .get(url)
                    .bearer_auth(key)
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                anyhow::Ok((job.user, view))
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    worker.stop(Duration::from_secs(10)).await;
    api.stop(Duration::from_secs(10)).await;

    let time = |view: &Value, field: &str| -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
        let raw = view[field]
            .as_str()
            .context("a job view without its times")?;
        Ok(raw.parse()?)
    };
    let mut waits: HashMap<usize, Vec<f64>> = HashMap::new();
    let mut done = Vec::new();
    for (user, view) in &views {
        anyhow::ensure!(
            view["status"] == "succeeded",
            "a job did not succeed: {view}"
        );
        let accepted = time(view, "created_at")?;
        let finished = time(view, "updated_at")?;
        waits
            .entry(*user)
            .or_default()
            .push((finished - accepted).num_milliseconds() as f64 / 1000.0);
        done.push((*user, finished));
    }
    done.sort_by_key(|(_, at)| *at);
    let light_last = done
        .iter()
        .filter(|(user, _)| *user != 0)
        .map(|(_, at)| *at)
        .max()
        .context("no light job")?;
    let heavy_done_meanwhile = done
        .iter()
        .filter(|(user, at)| *user == 0 && *at >= light_started && *at <= light_last)
        .count();
    let first = done.first().map(|(_, at)| *at).context("no job")?;
    let last = done.last().map(|(_, at)| *at).context("no job")?;
    let busy_seconds = (last - first).num_milliseconds() as f64 / 1000.0;
    let rate_per_second = f64::from(RATE_PER_MINUTE) / 60.0;
    // Each job makes one image call (n = 1); the burst lets the first seconds run faster.
    let utilisation = image_calls as f64 / busy_seconds / rate_per_second;
    let worst_window = done
        .chunk_by(|(_, a), (_, b)| (*a - first).num_seconds() / 5 == (*b - first).num_seconds() / 5)
        .map(|window| window.len())
        .collect::<Vec<_>>();
    // Full windows only: not the last one, which the backlog ran out in.
    let worst_window = worst_window[..worst_window.len().saturating_sub(1)]
        .iter()
        .map(|count| *count as f64 / 5.0 / rate_per_second)
        .fold(f64::INFINITY, f64::min);
    let heavy_waits = waits.remove(&0).unwrap_or_default();
    let worst_light_p95 = waits
        .values()
        .map(|w| percentile(w, 0.95))
        .fold(0.0, f64::max);
    let light_waits: Vec<f64> = waits.into_values().flatten().collect();
    Ok(FairRun {
        fair: true,
        heavy: (
            percentile(&heavy_waits, 0.5),
            percentile(&heavy_waits, 0.95),
        ),
        light: (
            percentile(&light_waits, 0.5),
            percentile(&light_waits, 0.95),
        ),
        worst_light_p95,
        heavy_done_meanwhile,
        utilisation,
        worst_window,
        busy_seconds,
    })
}

/// Posts `count` small jobs as `key`, `parallel` at a time; answers them in posting order.
async fn post_many(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    user: usize,
    count: usize,
    parallel: usize,
) -> anyhow::Result<Vec<Posted>> {
    futures::stream::iter(0..count)
        .map(|index| async move {
            let response = client
                .post(url)
                .bearer_auth(key)
                .json(&json!({"prompt": format!("job {index} of user {user}")}))
                .send()
                .await?;
            anyhow::ensure!(
                response.status() == reqwest::StatusCode::ACCEPTED,
                "POST answered {}",
                response.status()
            );
            let body: Value = response.json().await?;
            let id = body["id"].as_str().context("a 202 without an id")?;
            Ok(Posted {
                user,
                id: id.to_string(),
            })
        })
        .buffered(parallel)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank]
}

// ---------------------------------------------------------------------------------------------
// The cost of a place in line at 10,000 pending jobs
// ---------------------------------------------------------------------------------------------

const PENDING: usize = 10_000;
const PLACE_CALLS: usize = 2_000;

async fn place_costs() -> anyhow::Result<Vec<PlaceCost>> {
    let mut costs = Vec::new();
    for users in [1, 10, 1_000] {
        costs.push(place_cost(users).await?);
    }
    Ok(costs)
}

async fn place_cost(users: usize) -> anyhow::Result<PlaceCost> {
    let mut settings = shared::config::Settings::defaults()?;
    if let Ok(url) = std::env::var("PICTOR_REDIS_URL") {
        settings.redis.url = url.into();
    }
    let unique = uuid::Uuid::new_v4().simple().to_string();
    settings.redis.prefix = format!("pictor-bench-{}:", &unique[..10]);
    let redis = shared::connection::Redis::connect(&settings.redis).await?;
    let fair = redis.fairness(FairPolicy::default());
    let users: Vec<UserId> = (0..users)
        .map(|index| UserId::parse(&format!("place-user-{index}")))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    let start = chrono::Utc::now();
    let mut jobs = Vec::with_capacity(PENDING);
    let filled: Vec<(UserId, JobId)> = futures::stream::iter(0..PENDING)
        .map(|index| {
            let fair = fair.clone();
            let user = users[index % users.len()].clone();
            async move {
                let id = JobId::new();
                let at = start + chrono::Duration::milliseconds(index as i64);
                fair.add(&user, id, at).await?;
                anyhow::Ok((user, id))
            }
        })
        .buffered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    jobs.extend(filled);
    let mut connection = redis.connection();
    let before = evalsha_stats(&mut connection).await?;
    let mut took = Vec::with_capacity(PLACE_CALLS);
    for call in 0..PLACE_CALLS {
        // Jobs from all over the backlog, the last ones (the deepest) included.
        let (user, id) = &jobs[(call * 7_919) % jobs.len()];
        let started = Instant::now();
        let place = fair.place(user, *id).await?;
        took.push(started.elapsed().as_secs_f64() * 1e6);
        anyhow::ensure!(place.is_some(), "a pending job without a place");
    }
    let after = evalsha_stats(&mut connection).await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", settings.redis.prefix))
        .query_async(&mut connection)
        .await?;
    if !keys.is_empty() {
        redis::cmd("DEL")
            .arg(&keys)
            .query_async::<()>(&mut connection)
            .await?;
    }
    let calls = (after.0 - before.0).max(1.0);
    Ok(PlaceCost {
        users: users.len(),
        pending: PENDING,
        round_trip_us: percentile(&took, 0.5),
        redis_us: (after.1 - before.1) / calls,
    })
}

/// `cmdstat_evalsha`'s calls and microseconds so far.
async fn evalsha_stats(
    connection: &mut shared::connection::RedisConnection,
) -> anyhow::Result<(f64, f64)> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(connection)
        .await?;
    let line = info
        .lines()
        .find(|line| line.starts_with("cmdstat_evalsha:"))
        .unwrap_or("cmdstat_evalsha:calls=0,usec=0");
    let field = |name: &str| -> f64 {
        line.split([':', ','])
            .find_map(|part| part.strip_prefix(&format!("{name}=")))
            .and_then(|value| value.parse().ok())
            .unwrap_or(0.0)
    };
    Ok((field("calls"), field("usec")))
}
