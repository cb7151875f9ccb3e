//! Every alert reaches a person: the scheduler evaluates the queue, backlog, provider and
//! missed-run alerts itself, against real RabbitMQ and Redis (this test's own queues and
//! prefix), and delivers them through the real SMTP server and the Slack mock of the scheduler
//! tests' `World`, on a manual clock. Each alert fires once after its `for`, says its figure,
//! threshold and runbook, and resolves. Also: the Prometheus rules agree with the scheduler's
//! table, and a scheduler with no channel says so (`/readyz`, the dashboard's status in Redis).

use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::options::{BasicConsumeOptions, BasicGetOptions};
use lapin::types::FieldTable;
use scheduler::Scheduler;
use scheduler::alerts::{Coverage, RULES};
use secrecy::SecretString;
use shared::config::Settings;
use shared::delivery::DeliveryStatus;
use shared::domain::JobId;
use shared::queue::{JobMessage, Publisher, Topology};
use shared::store::JobStore;
use yaml_serde::Value;

use crate::scheduler::{World, at, slack_text};

const BASE: &str = "https://runbooks.example.com/docs/runbooks";

/// The alert messages (firing, still firing, resolved) whose subject contains `needle`, checked
/// to have gone to Slack too.
async fn alert_subjects(world: &World, needle: &str) -> Vec<String> {
    let subjects: Vec<String> = world
        .subjects()
        .into_iter()
        .filter(|subject| {
            (subject.contains("FIRING") || subject.contains("RESOLVED")) && subject.contains(needle)
        })
        .collect();
    let slack: Vec<String> = world
        .slack_about(needle)
        .await
        .iter()
        .map(slack_text)
        .filter(|text| text.contains("FIRING") || text.contains("RESOLVED"))
        .collect();
    assert_eq!(subjects.len(), slack.len(), "{subjects:?} vs {slack:?}");
    subjects
}

/// The text of the one email whose subject is `subject`.
fn email_text(world: &World, subject: &str) -> String {
    let emails: Vec<_> = world
        .emails_about(subject)
        .into_iter()
        .filter(|email| email.subject == subject)
        .collect();
    assert_eq!(emails.len(), 1, "{:?}", world.subjects());
    emails[0].text.clone()
}

/// Sets the clock to `when` and ticks every replica together.
async fn tick_at(world: &World, replicas: &[&Scheduler], when: DateTime<Utc>) {
    world.clock.set(when);
    futures::future::join_all(replicas.iter().map(|replica| replica.tick())).await;
}

fn minute(start: &str, minutes: i64) -> DateTime<Utc> {
    at(start) + chrono::Duration::minutes(minutes)
}

fn quick_repeat(settings: &mut Settings) {
    settings.scheduler.alert_repeat_minutes = std::num::NonZeroU32::new(10).unwrap();
}

/// This test's queues, deleted at the end even when it panicked.
struct Queues {
    settings: Settings,
    publisher: Publisher,
}

impl Queues {
    async fn declare(settings: &Settings) -> Self {
        let publisher = Publisher::new(settings.amqp.clone(), Duration::from_secs(5));
        publisher
            .ensure_connected()
            .await
            .expect("rabbitmq reachable");
        Self {
            settings: settings.clone(),
            publisher,
        }
    }

    fn topology(&self) -> Topology {
        Topology::new(&self.settings.amqp)
    }

    async fn publish_to(&self, queue: &str) {
        self.publisher
            .publish_to(queue, &JobMessage::run(JobId::new()), FieldTable::default())
            .await
            .unwrap();
    }
}

impl Drop for Queues {
    fn drop(&mut self) {
        let settings = self.settings.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async move {
                if let Ok(connection) = shared::queue::connect(&settings.amqp, "test-cleanup").await
                    && let Ok(channel) = connection.create_channel().await
                {
                    let _ = Topology::new(&settings.amqp).delete(&channel).await;
                    let _ = connection.close(200, "done".into()).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

// ---------------------------------------------------------------------------------------------
// One definition of each alert
// ---------------------------------------------------------------------------------------------

#[test]
fn the_prometheus_rules_match_the_scheduler_table() {
    let text = include_str!("../../../infra/prometheus/alerts.yml");
    let file: Value = yaml_serde::from_str(text).unwrap();
    let rules = file["groups"][0]["rules"].as_sequence().unwrap();
    let names: Vec<&str> = rules
        .iter()
        .map(|rule| rule["alert"].as_str().unwrap())
        .collect();
    let table: Vec<&str> = RULES.iter().map(|rule| rule.name).collect();
    assert_eq!(
        names, table,
        "alerts.yml and scheduler::alerts::RULES list the same alerts"
    );
    let defaults = Settings::defaults().unwrap();
    let base = defaults.scheduler.runbook_base_url.trim_end_matches('/');
    for (yaml, rule) in rules.iter().zip(RULES) {
        let name = rule.name;
        let hold = yaml["for"].as_str().unwrap_or("0m");
        let minutes: u64 = hold.trim_end_matches('m').parse().unwrap();
        assert!(hold.ends_with('m'), "{name}: write `for` in minutes");
        assert_eq!(
            Duration::from_secs(minutes * 60),
            rule.hold,
            "{name}: `for` differs"
        );
        assert_eq!(
            yaml["labels"]["severity"].as_str(),
            Some(rule.severity.as_str()),
            "{name}: severity differs"
        );
        assert_eq!(
            yaml["annotations"]["runbook_url"].as_str().unwrap(),
            format!("{base}/{}.md", rule.runbook),
            "{name}: the runbook differs from the scheduler's link (PICTOR_RUNBOOK_BASE_URL)"
        );
        let expr = yaml["expr"].as_str().unwrap();
        let condition = format!("{} {}", rule.comparison, rule.threshold);
        assert!(
            expr.contains(&condition),
            "{name}: the expression {expr:?} lacks the threshold `{condition}`"
        );
        match rule.scheduler {
            Coverage::Setting("error_rate_threshold") => {
                assert_eq!(defaults.scheduler.error_rate_threshold, rule.threshold);
            }
            Coverage::Setting("latency_p95_threshold_secs") => {
                assert_eq!(
                    defaults.scheduler.latency_p95_threshold_secs,
                    rule.threshold
                );
            }
            Coverage::Setting(other) => panic!("{name}: unknown setting {other}"),
            Coverage::Budget => assert!(
                defaults
                    .budget
                    .thresholds
                    .contains(&((rule.threshold * 100.0).round() as u32)),
                "{name}: budget.thresholds lacks {}",
                rule.threshold
            ),
            Coverage::Evaluated | Coverage::PrometheusOnly => {}
        }
        if let Coverage::Setting(_) = rule.scheduler {
            // The scheduler judges a window of this length at once where Prometheus waits `for`.
            assert_eq!(
                Duration::from_secs(u64::from(defaults.scheduler.health_window_minutes.get()) * 60),
                rule.hold,
                "{name}: the health window's default differs from `for`"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PictorNoConsumers
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn messages_with_no_consumer_fire_after_five_minutes_repeat_and_resolve_when_consumed() {
    let start = "2026-11-06T10:00:30Z";
    let world = World::start(start, quick_repeat).await;
    world.slack_ok().await;
    let queues = Queues::declare(&world.settings).await;
    let topology = queues.topology();
    queues.publish_to(&topology.jobs_queue).await;
    let scheduler = world.scheduler().await;

    for minutes in 0..5 {
        tick_at(&world, &[&scheduler], minute(start, minutes)).await;
    }
    assert!(
        alert_subjects(&world, "consume").await.is_empty(),
        "pending for less than 5 minutes"
    );
    tick_at(&world, &[&scheduler], minute(start, 5)).await;
    let firing = "[Pictor] FIRING: no worker consumes the jobs queue, 1 message waiting \
                  (threshold: no consumer while messages wait, for 5 minutes)";
    assert_eq!(alert_subjects(&world, "consume").await, [firing]);
    let text = email_text(&world, firing);
    for line in [
        format!("  Queue: {}", topology.jobs_queue),
        "  Messages ready: 1".to_string(),
        "  Consumers: 0".to_string(),
        "  Threshold: no consumer while messages wait, for 5 minutes".to_string(),
        "  Severity: page".to_string(),
        "  Holding since: 2026-11-06 10:00 UTC".to_string(),
        format!("Runbook: {BASE}/no-consumers.md"),
    ] {
        assert!(text.contains(&line), "{line:?} not in:\n{text}");
    }

    // Still no consumer: quiet until the repeat interval (10 minutes here), then repeated.
    for minutes in 6..16 {
        tick_at(&world, &[&scheduler], minute(start, minutes)).await;
    }
    let subjects = alert_subjects(&world, "consume").await;
    assert_eq!(subjects.len(), 2, "{subjects:?}");
    assert!(
        subjects[1].starts_with("[Pictor] STILL FIRING: no worker consumes the jobs queue"),
        "{subjects:?}"
    );

    // A worker attaches: the message is delivered to it, nothing is ready any more.
    let (connection, channel) = {
        let connection = shared::queue::connect(&world.settings.amqp, "test-consumer")
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        (connection, channel)
    };
    let _consumer = channel
        .basic_consume(
            topology.jobs_queue.as_str().into(),
            "test-worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    tick_at(&world, &[&scheduler], minute(start, 16)).await;
    let subjects = alert_subjects(&world, "consume").await;
    assert_eq!(subjects.len(), 3, "{subjects:?}");
    // The message may still be on its way to the consumer: "0 messages" or "1 message" waiting.
    assert!(
        subjects[2].starts_with("[Pictor] RESOLVED: the jobs queue has 1 consumer again, "),
        "{subjects:?}"
    );
    let resolved = email_text(&world, subjects.last().unwrap());
    assert!(
        resolved.contains("  Fired: from 2026-11-06 10:00 to 10:16 UTC (16 minutes)"),
        "{resolved}"
    );
    tick_at(&world, &[&scheduler], minute(start, 17)).await;
    assert_eq!(alert_subjects(&world, "consume").await.len(), 3);
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test]
async fn an_unreachable_broker_fires_the_no_consumers_alert_naming_it() {
    let start = "2026-11-06T10:00:30Z";
    let port = tests::harness::free_port();
    let world = World::start(start, |settings| {
        settings.amqp.url = SecretString::from(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"));
    })
    .await;
    world.slack_ok().await;
    let scheduler = world.scheduler().await;

    for minutes in 0..=5 {
        tick_at(&world, &[&scheduler], minute(start, minutes)).await;
    }

    let firing = "[Pictor] FIRING: RabbitMQ unreachable from the scheduler, no consumer of the \
                  jobs queue can be seen (threshold: no consumer while messages wait, for 5 \
                  minutes)";
    assert_eq!(alert_subjects(&world, "RabbitMQ").await, [firing]);
    let text = email_text(&world, firing);
    assert!(
        text.contains("  RabbitMQ: unreachable: rabbitmq is unavailable"),
        "{text}"
    );
    assert!(text.contains(&format!("Runbook: {BASE}/no-consumers.md")));
    assert!(
        alert_subjects(&world, "dead-letter").await.is_empty(),
        "dead letters unknown: neither fired nor resolved"
    );
}

// ---------------------------------------------------------------------------------------------
// PictorDeadLetters
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn dead_letters_fire_once_with_two_replicas_and_resolve_when_the_queue_is_emptied() {
    let start = "2026-11-06T10:00:30Z";
    let world = World::start(start, |_| {}).await;
    world.slack_ok().await;
    let queues = Queues::declare(&world.settings).await;
    let topology = queues.topology();
    for _ in 0..3 {
        queues.publish_to(&topology.dead_letter_queue).await;
    }
    let first = world.scheduler().await;
    let second = world.scheduler().await;

    for minutes in 0..=7 {
        tick_at(&world, &[&first, &second], minute(start, minutes)).await;
    }
    let firing = "[Pictor] FIRING: 3 messages in the dead-letter queue (threshold: more than 0 \
                  for 5 minutes)";
    assert_eq!(alert_subjects(&world, "dead-letter").await, [firing]);
    let text = email_text(&world, firing);
    for line in [
        format!("  Queue: {}", topology.dead_letter_queue),
        "  Messages: 3".to_string(),
        "  Severity: ticket".to_string(),
        format!("Runbook: {BASE}/dead-letters.md"),
    ] {
        assert!(text.contains(&line), "{line:?} not in:\n{text}");
    }

    // Someone replays or drops them.
    let connection = shared::queue::connect(&world.settings.amqp, "test-dlq")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    while channel
        .basic_get(
            topology.dead_letter_queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .is_some()
    {}
    for minutes in 8..=9 {
        tick_at(&world, &[&first, &second], minute(start, minutes)).await;
    }
    assert_eq!(
        alert_subjects(&world, "dead-letter").await,
        [firing, "[Pictor] RESOLVED: the dead-letter queue is empty"]
    );
    let _ = connection.close(200, "done".into()).await;
}

// ---------------------------------------------------------------------------------------------
// PictorQueueBacklogGrowing
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_backlog_growing_over_100_fires_after_fifteen_minutes_and_resolves_when_it_drains() {
    let start = "2026-11-06T10:00:30Z";
    let world = World::start(start, |_| {}).await;
    world.slack_ok().await;
    let store = JobStore::connect(&world.settings.redis, world.settings.jobs.ttl)
        .await
        .unwrap();
    let mut redis = store.redis().connection();
    let total = store.keys().fair_total();
    let scheduler = world.scheduler().await;
    // The fair backlog's total: what workers export as pictor_jobs_pending.
    let set_pending = |value: u64| {
        let total = total.clone();
        let mut redis = redis.clone();
        async move {
            redis::cmd("SET")
                .arg(total)
                .arg(value)
                .query_async::<()>(&mut redis)
                .await
                .unwrap();
        }
    };

    // 150 jobs, 10 more every minute: growing from the second sample on (minute 1).
    for minutes in 0..16 {
        set_pending(150 + 10 * minutes as u64).await;
        tick_at(&world, &[&scheduler], minute(start, minutes)).await;
    }
    assert!(alert_subjects(&world, "backlog").await.is_empty());
    set_pending(310).await;
    tick_at(&world, &[&scheduler], minute(start, 16)).await;
    let firing = "[Pictor] FIRING: backlog growing, 310 jobs pending (+10.0 a minute) \
                  (threshold: over 100 pending and growing, for 15 minutes)";
    assert_eq!(alert_subjects(&world, "backlog").await, [firing]);
    let text = email_text(&world, firing);
    for line in [
        "  Pending jobs: 310 (queued, delayed or running)".to_string(),
        "  Trend: +10.0 jobs a minute over the last 10 minutes".to_string(),
        "  Holding since: 2026-11-06 10:01 UTC".to_string(),
        format!("Runbook: {BASE}/queue-backlog-growing.md"),
    ] {
        assert!(text.contains(&line), "{line:?} not in:\n{text}");
    }

    set_pending(50).await;
    tick_at(&world, &[&scheduler], minute(start, 17)).await;
    assert_eq!(
        alert_subjects(&world, "backlog").await,
        [firing, "[Pictor] RESOLVED: backlog down to 50 jobs pending"]
    );
    redis::cmd("DEL")
        .arg(store.keys().fair_total())
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// PictorProviderInCooldown
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_provider_in_cooldown_for_five_minutes_fires_and_resolves_when_its_breaker_closes() {
    let start = "2026-11-06T10:00:30Z";
    let world = World::start(start, |_| {}).await;
    world.slack_ok().await;
    let store = JobStore::connect(&world.settings.redis, world.settings.jobs.ttl)
        .await
        .unwrap();
    // The workers' own breaker, on this test's prefix: one failure opens it for 10 minutes.
    let breaker = worker::breaker::CircuitBreaker::on(
        store.redis(),
        worker::breaker::BreakerPolicy {
            failure_threshold: 1,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(600),
            probe_timeout: Duration::from_secs(60),
        },
    );
    assert!(breaker.record_failure("gemini").await.unwrap());
    let scheduler = world.scheduler().await;

    for minutes in 0..=5 {
        tick_at(&world, &[&scheduler], minute(start, minutes)).await;
    }
    let firing = "[Pictor] FIRING: provider gemini in cooldown, its circuit breaker is open \
                  (threshold: in cooldown for 5 minutes)";
    assert_eq!(alert_subjects(&world, "provider").await, [firing]);
    let text = email_text(&world, firing);
    assert!(text.contains("  Provider: gemini"), "{text}");
    assert!(text.contains(&format!("Runbook: {BASE}/provider-in-cooldown.md")));

    breaker.record_success("gemini").await.unwrap();
    tick_at(&world, &[&scheduler], minute(start, 6)).await;
    assert_eq!(
        alert_subjects(&world, "provider").await,
        [
            firing,
            "[Pictor] RESOLVED: provider gemini out of cooldown, its circuit breaker closed"
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// PictorSchedulerMissedRun
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_daily_report_not_done_an_hour_after_it_was_due_fires_and_resolves_once_sent() {
    let world = World::start("2026-11-06T07:00:30Z", |_| {}).await;
    world.slack_ok().await;
    let store = JobStore::connect(&world.settings.redis, world.settings.jobs.ttl)
        .await
        .unwrap();
    let mut redis = store.redis().connection();
    let scheduler = world.scheduler().await;
    // The report of the 4th goes out now; a stalled replica holds the run of the 5th (due at
    // 08:00) for three hours.
    scheduler.tick().await;
    let lock = store.keys().scheduler_lock("daily-report", "2026-11-05");
    redis::cmd("SET")
        .arg(&lock)
        .arg("999999")
        .arg("PX")
        .arg(3 * 3600 * 1000)
        .query_async::<()>(&mut redis)
        .await
        .unwrap();

    for minutes in 0..5 {
        tick_at(
            &world,
            &[&scheduler],
            minute("2026-11-06T09:00:30Z", minutes),
        )
        .await;
    }
    assert!(alert_subjects(&world, "daily-report").await.is_empty());
    tick_at(&world, &[&scheduler], at("2026-11-06T09:05:30Z")).await;
    let firing = "[Pictor] FIRING: daily-report of 2026-11-05 not done, 65 minutes after it was \
                  due (threshold: 60 minutes late, for 5 minutes)";
    assert_eq!(alert_subjects(&world, "daily-report").await, [firing]);
    let text = email_text(&world, firing);
    for line in [
        "  Run: daily-report of 2026-11-05".to_string(),
        "  Due: 2026-11-06 08:00 UTC".to_string(),
        "  Holding since: 2026-11-06 09:00 UTC".to_string(),
        format!("Runbook: {BASE}/scheduler-missed-run.md"),
    ] {
        assert!(text.contains(&line), "{line:?} not in:\n{text}");
    }

    // The stalled replica lets go: the report goes out, then the alert resolves.
    redis::cmd("DEL")
        .arg(&lock)
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
    for minutes in 6..=7 {
        tick_at(
            &world,
            &[&scheduler],
            minute("2026-11-06T09:00:30Z", minutes),
        )
        .await;
    }
    assert_eq!(world.emails_about("Daily report 2026-11-05").len(), 1);
    assert_eq!(
        alert_subjects(&world, "daily-report").await,
        [
            firing,
            "[Pictor] RESOLVED: daily-report caught up, its latest due run is done"
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// No silent outbox
// ---------------------------------------------------------------------------------------------

/// Runs `scheduler` with its metrics on a free port and returns the `/readyz` status and body.
async fn readyz(scheduler: Scheduler, port: u16) -> (u16, serde_json::Value) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(scheduler.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let url = format!("http://127.0.0.1:{port}/readyz");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let answer = loop {
        if let Ok(response) = reqwest::get(&url).await {
            break response;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let status = answer.status().as_u16();
    let body = answer.json().await.unwrap();
    let _ = stop.send(());
    running.await.unwrap();
    (status, body)
}

fn no_channel(settings: &mut Settings) {
    settings.scheduler.smtp_url = None;
    settings.scheduler.slack_webhook_url = None;
    // The outbox in the test's own folder (deleted with it).
    settings.scheduler.outbox_dir = std::path::Path::new(&settings.images.store).join("outbox");
}

#[tokio::test]
async fn a_scheduler_without_email_or_slack_says_outbox_only_in_readyz_and_in_redis() {
    let port = tests::harness::free_port();
    let world = World::start("2026-11-06T10:00:30Z", |settings| {
        no_channel(settings);
        settings.scheduler.metrics_addr = Some(format!("127.0.0.1:{port}").parse().unwrap());
    })
    .await;
    let (status, body) = readyz(world.scheduler().await, port).await;
    assert_eq!(status, 200, "ready: the scheduler serves no traffic");
    assert_eq!(body["delivery"], "outbox_only", "{body}");
    assert_eq!(body["channels"], 0);
    let message = body["message"].as_str().unwrap();
    for setting in [
        "PICTOR_SMTP_URL",
        "PICTOR_EMAIL_TO",
        "PICTOR_SLACK_WEBHOOK_URL",
    ] {
        assert!(message.contains(setting), "{message}");
    }

    let store = JobStore::connect(&world.settings.redis, world.settings.jobs.ttl)
        .await
        .unwrap();
    let connection = store.redis().connection();
    let status = DeliveryStatus::read(&connection, store.keys())
        .await
        .unwrap()
        .expect("each tick publishes the status");
    assert!(!status.email && !status.slack && !status.dev);
    assert!(status.silent());

    // The same settings inside `pictor dev`: the outbox is expected there.
    let dev = world.scheduler().await.dev(true);
    dev.tick().await;
    let status = DeliveryStatus::read(&connection, store.keys())
        .await
        .unwrap()
        .unwrap();
    assert!(status.dev && !status.silent(), "{status:?}");
    assert_eq!(dev.channels().readiness()["delivery"], "outbox_dev");
}

#[tokio::test]
async fn a_scheduler_with_email_and_slack_names_them_in_readyz() {
    let port = tests::harness::free_port();
    let world = World::start("2026-11-06T10:00:30Z", |settings| {
        settings.scheduler.metrics_addr = Some(format!("127.0.0.1:{port}").parse().unwrap());
    })
    .await;
    world.slack_ok().await;
    let (status, body) = readyz(world.scheduler().await, port).await;
    assert_eq!(status, 200);
    assert_eq!(body["delivery"], "email+slack", "{body}");
    assert_eq!(body["channels"], 2);
    assert!(body.get("message").is_none(), "{body}");
    let store = JobStore::connect(&world.settings.redis, world.settings.jobs.ttl)
        .await
        .unwrap();
    let status = DeliveryStatus::read(&store.redis().connection(), store.keys())
        .await
        .unwrap()
        .unwrap();
    assert!(status.email && status.slack && !status.dev && !status.silent());
}

// ---------------------------------------------------------------------------------------------
// PICTOR_ALERTS_VIA=alertmanager: no alert reaches a person twice
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn with_alerts_left_to_alertmanager_the_scheduler_sends_no_rule_alert_but_still_the_projection()
 {
    let start = "2026-11-03T12:00:30Z";
    let world = World::start(start, |settings| {
        settings.scheduler.alerts_via = shared::config::AlertsVia::Alertmanager;
        settings.budget.monthly_micros = 1_000_000;
    })
    .await;
    world.slack_ok().await;
    let queues = Queues::declare(&world.settings).await;
    let topology = queues.topology();
    for _ in 0..3 {
        queues.publish_to(&topology.dead_letter_queue).await;
    }
    // $0.85 in three days of thirty: 80% crossed (a worker's event) and $8.50 projected.
    world
        .spend("2026-11-03T09:00:00Z", "alice", "create", "openai", 850_000)
        .await;
    let scheduler = world.scheduler().await;

    for minutes in 0..=7 {
        tick_at(&world, &[&scheduler], minute(start, minutes)).await;
    }

    // Alertmanager announces the dead letters and the 80% (PictorDeadLetters,
    // PictorBudget80Percent); the projection has no rule, so the scheduler still sends it.
    assert!(
        alert_subjects(&world, "dead-letter").await.is_empty(),
        "{:?}",
        world.subjects()
    );
    let budget: Vec<String> = world
        .subjects()
        .into_iter()
        .filter(|subject| subject.contains("Budget"))
        .collect();
    assert_eq!(
        budget,
        ["[Pictor] Budget 2026-11: projected month-end $8.50 is over the $1.00 budget"]
    );
}
