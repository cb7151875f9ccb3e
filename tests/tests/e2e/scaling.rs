//! Scaling out: two api processes and two worker processes on one broker and one Redis share
//! the work, and a provider's rate limit holds for the fleet as a whole (see `docs/scaling.md`).
//! The limit is checked where it matters, at the provider: the mock records when each image
//! request arrived, and no window of those arrivals may hold more than the GCRA limiter in Redis
//! (`shared::ratelimit`) lets through.

use std::time::{Duration, Instant};

use serde_json::json;
use tests::harness::{ALICE, Options, TestApp, spawn_app_with};

/// Jobs submitted, alternately to each api.
const JOBS: usize = 24;
/// The image model's fleet-wide limit, requests and images per minute.
const IMAGES_PER_MINUTE: u32 = 120;
/// The burst the worker derives from it (`AgentContext::admit`: a tenth of a minute's budget).
const BURST: u32 = IMAGES_PER_MINUTE / 10;
/// How long the mock takes to answer an image request, so calls overlap.
const IMAGE_ANSWER_DELAY: Duration = Duration::from_millis(250);
/// Jobs one worker process runs at once (and its prefetch).
const CONCURRENCY: &str = "4";
/// Allowance for the time between the limiter's grant in Redis and the request's arrival at the
/// mock (a ledger hold, a lease, a job update and the HTTP send), which on a loaded machine
/// can bunch arrivals closer together than the grants were.
const GRANT_TO_ARRIVAL: Duration = Duration::from_secs(1);

/// The most arrivals the limiter allows within a window of `span` seen at the provider: GCRA
/// grants at most `burst + T / interval` units in any window of length `T`, and arrivals within
/// `span` were granted within `span + GRANT_TO_ARRIVAL`.
fn allowed_within(span: Duration) -> f64 {
    let interval = 60.0 / f64::from(IMAGES_PER_MINUTE);
    f64::from(BURST) + (span + GRANT_TO_ARRIVAL).as_secs_f64() / interval
}

/// The largest number of `times` (sorted) within any window of length `window`.
fn most_within(times: &[Instant], window: Duration) -> usize {
    (0..times.len())
        .map(|first| {
            times[first..]
                .iter()
                .take_while(|time| time.duration_since(times[first]) <= window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// The sum of the samples of metric `name` whose labels include every one of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|line| {
            labels
                .iter()
                .all(|(label, value)| line.contains(&format!("{label}=\"{value}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `/metrics` at `base`, read with the ops key (an api's public port shows them to ops only).
async fn scrape(app: &TestApp, base: &str) -> String {
    let response = app
        .client
        .get(format!("{base}/metrics"))
        .bearer_auth(tests::harness::OPS)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "GET {base}/metrics");
    response.text().await.unwrap()
}

/// An app whose workers are processes of the test's own (none in-process), for one user who
/// submits everything (the per-user limit is not what these tests are about), with the router
/// answering `create`.
async fn app_for_processes() -> TestApp {
    let app = spawn_app_with(
        Options {
            worker: false,
            ..Options::default()
        },
        |settings| {
            settings.api.user_jobs_per_minute = std::num::NonZeroU32::new(6000).unwrap();
            settings.api.user_burst = std::num::NonZeroU32::new(1000).unwrap();
        },
    )
    .await;
    app.openai
        .as_ref()
        .unwrap()
        .router_answers("create", 0.9, "a lighthouse", None)
        .await;
    app
}

#[tokio::test]
async fn two_apis_and_two_workers_share_the_work_and_the_provider_limit_holds_in_sum() {
    let started = Instant::now();
    let app = app_for_processes().await;
    let openai = app.openai.as_ref().unwrap();
    let arrivals = openai.images_generate_ok_after(IMAGE_ANSWER_DELAY).await;

    // The limit is a `[rate_limits]` table, which only a config file can set. The file lives in
    // the test's image directory, which the harness deletes.
    let store = std::path::Path::new(&app.settings.images.store);
    std::fs::create_dir_all(store).unwrap();
    let config = store.join("scaling.toml");
    std::fs::write(
        &config,
        format!(
            "[rate_limits.\"openai:{model}\"]\nrequests_per_minute = {IMAGES_PER_MINUTE}\n\
             images_per_minute = {IMAGES_PER_MINUTE}\n",
            model = app.settings.openai.image_model
        ),
    )
    .unwrap();
    let worker_extra = [
        ("PICTOR_CONFIG", config.to_string_lossy().into_owned()),
        ("PICTOR_WORKER_CONCURRENCY", CONCURRENCY.to_string()),
    ];
    // Declared after the app, so they are killed before the app's clean-up runs.
    let workers = app.spawn_workers(2, &worker_extra).await;
    let second_api = app.spawn_process("api", &[]).await;

    let mut ids = Vec::with_capacity(JOBS);
    for index in 0..JOBS {
        let base = if index % 2 == 0 {
            &app.base
        } else {
            &second_api.base
        };
        let prompt = format!("a lighthouse, take {index}");
        ids.push(
            app.submit_at(base, ALICE, json!({ "prompt": prompt }))
                .await,
        );
    }
    let mut deferred_jobs = 0;
    let mut rate_limited_notices = 0;
    for id in &ids {
        let job = app.wait_until_terminal(ALICE, id).await;
        assert_eq!(job["status"], "succeeded", "{job:#}");
        // One rate-limit notice per job, however often it was deferred: its count says how
        // often.
        let limited: Vec<&serde_json::Value> = job["notices"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|notice| notice["code"] == "rate_limited")
            .collect();
        assert!(limited.len() <= 1, "one rate-limit notice per job: {job:#}");
        let deferred = limited
            .first()
            .map_or(0, |notice| notice["count"].as_u64().unwrap() as usize);
        rate_limited_notices += deferred;
        deferred_jobs += usize::from(deferred > 0);
    }

    // Both workers did work, and together they finished every job. Counters move just after
    // the terminal write, so wait for them to add up.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (finished, deferrals) = loop {
        let mut finished = Vec::new();
        let mut deferrals = 0.0;
        for worker in &workers {
            let text = scrape(&app, &worker.base).await;
            finished.push(metric_sum(
                &text,
                "pictor_jobs_finished_total",
                &[("outcome", "succeeded")],
            ));
            deferrals += metric_sum(&text, "pictor_deferrals_total", &[]);
        }
        if finished.iter().sum::<f64>() >= JOBS as f64 {
            break (finished, deferrals);
        }
        assert!(
            Instant::now() < deadline,
            "workers' finished counters stayed at {finished:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(finished.iter().sum::<f64>(), JOBS as f64, "{finished:?}");
    assert!(
        finished.iter().all(|count| *count > 0.0),
        "every worker finished jobs: {finished:?}"
    );
    // Both apis accepted jobs: the in-process one answered 202 above, and the process says so.
    let second_api_metrics = scrape(&app, &second_api.base).await;
    assert_eq!(
        metric_sum(&second_api_metrics, "pictor_jobs_accepted_total", &[]),
        (JOBS / 2) as f64
    );

    // The limit held in sum: one image request per job reached the provider, and no window of
    // their arrivals holds more than the limiter allows, though two workers with four slots
    // each could have sent all of them within a second or two.
    let times = arrivals.times();
    assert_eq!(times.len(), JOBS, "one image request per job");
    for (first, start) in times.iter().enumerate() {
        for (offset, end) in times[first..].iter().enumerate() {
            let span = end.duration_since(*start);
            let count = offset + 1;
            assert!(
                count as f64 <= allowed_within(span),
                "{count} image requests within {span:?}, more than the limit of \
                 {IMAGES_PER_MINUTE}/min with a burst of {BURST} allows"
            );
        }
    }
    // The limiter was binding: jobs were deferred (not held in a worker slot), each deferral
    // counted on its job's notice, and both workers' counters agree with the notices.
    assert!(
        deferred_jobs > 0,
        "the limit never made a job wait; the test shows nothing"
    );
    assert_eq!(deferrals, rate_limited_notices as f64);

    let first_to_last = times[JOBS - 1].duration_since(times[0]);
    eprintln!(
        "scaling: {JOBS} jobs in {:.1} s; finished per worker {finished:?}; {deferred_jobs} jobs \
         deferred {rate_limited_notices} times; image requests: at most {} in any 1 s and {} in \
         any 5 s (limit {IMAGES_PER_MINUTE}/min, burst {BURST}); {JOBS} over {:.1} s",
        started.elapsed().as_secs_f64(),
        most_within(&times, Duration::from_secs(1)),
        most_within(&times, Duration::from_secs(5)),
        first_to_last.as_secs_f64(),
    );
}

/// `PICTOR_THREADS=1` runs a process on one thread (a current-thread runtime: its main loop and
/// its tasks together, `docs/scaling.md` "Threads"): an api and a worker started so take jobs in
/// and run them to the end, side by side, and stop cleanly on `SIGTERM`.
#[tokio::test]
async fn processes_on_one_thread_run_jobs_to_the_end_and_stop_cleanly() {
    let app = app_for_processes().await;
    let openai = app.openai.as_ref().unwrap();
    openai.images_generate_ok().await;
    let one_thread = [("PICTOR_THREADS", "1".to_string())];
    let mut api = app.spawn_process("api", &one_thread).await;
    let mut worker = app
        .spawn_process_logged(
            "worker",
            &[
                ("PICTOR_THREADS", "1".to_string()),
                ("PICTOR_WORKER_CONCURRENCY", "8".to_string()),
            ],
        )
        .await;
    for process in [&api, &worker] {
        let names = process.thread_names();
        assert!(
            !names.iter().any(|name| name.starts_with("tokio-rt-worker")),
            "the main thread runs the tasks, no runtime worker beside it: {names:?}"
        );
    }

    let ids = futures::future::join_all((0..16).map(|n| {
        app.submit_at(
            &api.base,
            ALICE,
            json!({"prompt": format!("a lighthouse, take {n}")}),
        )
    }))
    .await;
    for id in &ids {
        let job = app.wait_until_terminal(ALICE, id).await;
        assert_eq!(
            job["status"],
            "succeeded",
            "job {id}: {job}\nworker: {}",
            worker.output().await
        );
    }

    for (role, process) in [("worker", &mut worker), ("api", &mut api)] {
        process.signal("TERM");
        let status = process.exit_within(Duration::from_secs(20)).await;
        assert!(
            status.is_some_and(|status| status.success()),
            "pictor {role} on one thread stops cleanly on SIGTERM: {status:?}"
        );
    }
    // Every finished job's ack reached the broker (acks go in batches, `worker::acks`): an ack
    // never sent would have put its message back in the queue when the worker left.
    assert_eq!(app.queue_depth(&app.topology.jobs_queue).await, 0);
}
