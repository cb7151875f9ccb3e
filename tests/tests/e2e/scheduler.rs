//! The scheduler end to end: real Redis (an isolated prefix per test), a real SMTP server
//! (aiosmtpd, `tests::smtp`), a wiremock answering like Slack's incoming webhooks, and a manual
//! clock. Each test seeds the ledger and the job statistics, moves the clock, and calls
//! `Scheduler::tick` (or runs the loop) to see what arrives where, and how often.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use scheduler::deliver::{Delivery, Outcome};
use scheduler::{Job, Manual, ManualClock, Ran, Scheduler};
use secrecy::SecretString;
use serde_json::Value;
use shared::config::Settings;
use shared::domain::{Intent, JobId, JobStatus, Usage, UserId};
use shared::ledger::{Billing, BudgetPolicy, Ledger, LedgerEntry, Month};
use shared::retry::RetryPolicy;
use shared::stats::Stats;
use shared::store::JobStore;
use tests::harness::test_settings;
use tests::smtp::SmtpSink;
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const SLACK_PATH: &str = "/services/T000/B000/XXXX";

pub(crate) fn at(raw: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(raw)
        .unwrap()
        .with_timezone(&Utc)
}

fn date(raw: &str) -> NaiveDate {
    NaiveDate::parse_from_str(raw, "%Y-%m-%d").unwrap()
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        base: Duration::from_millis(10),
        cap: Duration::from_millis(50),
        max_server_delay: Duration::from_secs(5),
    }
}

/// A Slack webhook answer as Slack writes it: a short text body.
fn slack_answer(status: u16, body: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(body.as_bytes().to_vec(), "text/plain")
}

/// One test's world: settings with an isolated Redis prefix and image folder, an SMTP server,
/// a Slack mock, a manual clock, and the ledger and statistics to seed.
pub(crate) struct World {
    pub(crate) settings: Settings,
    pub(crate) clock: ManualClock,
    ledger: Ledger,
    stats: Stats,
    smtp: SmtpSink,
    slack: MockServer,
    _cleanup: Cleanup,
}

impl World {
    /// A world at `now`; Slack answers nothing until the test mounts its answers.
    pub(crate) async fn start(now: &str, tweak: impl FnOnce(&mut Settings)) -> Self {
        let smtp = SmtpSink::start().await;
        let slack = MockServer::start().await;
        let mut settings = test_settings();
        settings.scheduler.smtp_url = Some(SecretString::from(smtp.url()));
        settings.scheduler.email_from = "Pictor <pictor@localhost>".to_string();
        settings.scheduler.email_to = vec!["ops@example.com".to_string()];
        settings.scheduler.slack_webhook_url =
            Some(SecretString::from(format!("{}{SLACK_PATH}", slack.uri())));
        settings.scheduler.metrics_addr = None;
        settings.scheduler.runbook_base_url = "https://runbooks.example.com/docs/runbooks".into();
        tweak(&mut settings);
        let store = JobStore::connect(&settings.redis, settings.jobs.ttl)
            .await
            .expect("redis reachable");
        Self {
            clock: ManualClock::new(at(now)),
            ledger: store.redis().ledger(BudgetPolicy::from(&settings.budget)),
            stats: store.redis().stats(),
            _cleanup: Cleanup {
                settings: settings.clone(),
            },
            settings,
            smtp,
            slack,
        }
    }

    /// Slack answers `ok` to everything not answered otherwise.
    pub(crate) async fn slack_ok(&self) {
        Mock::given(method("POST"))
            .and(path(SLACK_PATH))
            .respond_with(slack_answer(200, "ok"))
            .mount(&self.slack)
            .await;
    }

    /// A scheduler replica on this world's clock, delivering with fast retries.
    pub(crate) async fn scheduler(&self) -> Scheduler {
        let delivery = Delivery::from_settings(&self.settings.scheduler)
            .unwrap()
            .with_retry(fast_retry());
        Scheduler::build_with(
            self.settings.clone(),
            Arc::new(self.clock.clone()),
            delivery,
        )
        .await
        .unwrap()
        .with_tick_interval(Duration::from_millis(20))
    }

    fn emails(&self) -> Vec<Email> {
        self.smtp
            .messages()
            .iter()
            .map(|raw| Email::parse(raw))
            .collect()
    }

    pub(crate) fn subjects(&self) -> Vec<String> {
        self.emails()
            .into_iter()
            .map(|email| email.subject)
            .collect()
    }

    /// The emails whose subject contains `needle`. (A scheduler's first tick also sends the
    /// latest export and report due, so tests look at the messages they are about.)
    pub(crate) fn emails_about(&self, needle: &str) -> Vec<Email> {
        self.emails()
            .into_iter()
            .filter(|email| email.subject.contains(needle))
            .collect()
    }

    /// The Slack posts whose text contains `needle`.
    pub(crate) async fn slack_about(&self, needle: &str) -> Vec<Value> {
        self.slack_posts()
            .await
            .into_iter()
            .filter(|post| slack_text(post).contains(needle))
            .collect()
    }

    /// The JSON bodies Slack received, oldest first.
    async fn slack_posts(&self) -> Vec<Value> {
        self.slack
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|request| request.url.path() == SLACK_PATH)
            .map(|request| serde_json::from_slice(&request.body).unwrap())
            .collect()
    }

    pub(crate) async fn spend(
        &self,
        when: &str,
        user: &str,
        agent: &str,
        provider: &str,
        micros: i64,
    ) {
        let model = match (provider, agent) {
            ("gemini", _) => "gemini-3.1-flash-image",
            (_, "router") => "gpt-4.1-mini",
            _ => "gpt-image-2",
        };
        let entry = LedgerEntry {
            at: at(when),
            job_id: JobId::new(),
            user: UserId::parse(user).unwrap(),
            usage: Usage {
                agent: agent.into(),
                provider: provider.into(),
                model: model.into(),
                input_text_tokens: 12,
                output_image_tokens: if agent == "router" { 0 } else { 1056 },
                images: u32::from(agent != "router"),
                ..Usage::default()
            },
            cost_micros: micros,
            billing: Billing::Billed,
        };
        self.ledger.record(&entry, None).await.unwrap();
    }

    async fn finish(&self, when: &str, status: JobStatus, intent: Option<Intent>, secs: f64) {
        self.stats
            .job_finished(at(when), status, intent, Duration::from_secs_f64(secs))
            .await
            .unwrap();
    }

    /// The seeded day 2026-11-05 and the day before it, figures chosen so every line of the
    /// report has a known value (see the first test).
    pub(crate) async fn seed_november_fifth(&self) {
        use Intent::{Create, Edit, Unclear};
        use JobStatus::{Canceled, Failed, NeedsClarification, Succeeded};
        let day = "2026-11-05T09:00:00Z";
        for secs in [0.8, 0.8, 0.8, 2.0, 2.0] {
            self.finish(day, Succeeded, Some(Create), secs).await;
        }
        for _ in 0..2 {
            self.finish(day, Succeeded, Some(Edit), 4.0).await;
        }
        self.finish(day, Failed, Some(Create), 25.0).await;
        self.finish(day, NeedsClarification, Some(Unclear), 0.3)
            .await;
        self.finish(day, Canceled, None, 0.04).await;
        for _ in 0..2 {
            self.stats.fallback(at(day)).await.unwrap();
        }
        for _ in 0..3 {
            self.stats.deferral(at(day)).await.unwrap();
        }
        let before = "2026-11-04T15:00:00Z";
        for _ in 0..4 {
            self.finish(before, Succeeded, Some(Create), 0.9).await;
        }
        self.finish(before, Failed, Some(Create), 10.0).await;
        self.stats.deferral(at(before)).await.unwrap();

        self.spend("2026-11-04T15:00:00Z", "alice", "create", "openai", 63_410)
            .await;
        self.spend("2026-11-05T09:00:00Z", "alice", "router", "openai", 1_250)
            .await;
        self.spend("2026-11-05T09:00:05Z", "alice", "create", "openai", 63_410)
            .await;
        self.spend("2026-11-05T10:00:00Z", "bob", "router", "openai", 1_250)
            .await;
        self.spend("2026-11-05T10:00:09Z", "bob", "edit", "gemini", 39_000)
            .await;
        self.spend("2026-11-05T11:00:00Z", "carol", "create", "openai", 63_410)
            .await;
        for user in ["dave", "erin", "frank"] {
            self.spend("2026-11-05T23:59:59Z", user, "router", "openai", 1_250)
                .await;
        }
        // The next day's spend is in the month's ledger but not in the report of the 5th.
        self.spend("2026-11-06T00:00:01Z", "bob", "router", "openai", 1_250)
            .await;
    }
}

/// Deletes the test's Redis keys and folders, even when the test panicked.
struct Cleanup {
    settings: Settings,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let settings = self.settings.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async move {
                if let Ok(store) = JobStore::connect(&settings.redis, settings.jobs.ttl).await {
                    let _ = store.delete_everything().await;
                }
            });
            let _ = std::fs::remove_dir_all(&settings.images.store);
            let _ = std::fs::remove_dir_all(&settings.scheduler.outbox_dir);
        });
        let _ = cleanup.join();
    }
}

/// A received email: its subject, decoded text and HTML parts, and attachments.
#[derive(Debug)]
pub(crate) struct Email {
    pub(crate) subject: String,
    pub(crate) text: String,
    html: String,
    attachments: Vec<(String, Vec<u8>)>,
}

impl Email {
    /// Just enough MIME for what lettre writes: folded headers, nested multiparts, and 7bit,
    /// quoted-printable or base64 bodies.
    fn parse(raw: &str) -> Self {
        let raw = raw.replace("\r\n", "\n");
        let unfold = |headers: &str| headers.replace("\n ", " ").replace("\n\t", " ");
        let (head, _) = raw.split_once("\n\n").unwrap_or((&raw, ""));
        let head = unfold(head);
        let subject = header(&head, "subject").unwrap_or_default();
        let boundaries: Vec<String> = raw
            .split("boundary=")
            .skip(1)
            .map(|rest| {
                rest.trim_start_matches('"')
                    .split(['"', '\n', ';'])
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        let mut parts: Vec<Vec<&str>> = Vec::new();
        let mut current: Option<Vec<&str>> = None;
        for line in raw.lines() {
            let opens = boundaries.iter().any(|b| line == format!("--{b}"));
            let closes = boundaries.iter().any(|b| line == format!("--{b}--"));
            if opens || closes {
                parts.extend(current.take());
                if opens {
                    current = Some(Vec::new());
                }
            } else if let Some(part) = current.as_mut() {
                part.push(line);
            }
        }
        let mut email = Self {
            subject,
            text: String::new(),
            html: String::new(),
            attachments: Vec::new(),
        };
        for part in parts {
            let joined = part.join("\n");
            let (part_head, body) = joined.split_once("\n\n").unwrap_or((&joined, ""));
            let part_head = unfold(part_head);
            let content_type = header(&part_head, "content-type").unwrap_or_default();
            if content_type.starts_with("multipart/") {
                continue;
            }
            let encoding = header(&part_head, "content-transfer-encoding").unwrap_or_default();
            let bytes = decode(body, &encoding.to_ascii_lowercase());
            let disposition = header(&part_head, "content-disposition").unwrap_or_default();
            if disposition.starts_with("attachment") {
                let name = disposition
                    .split("filename=")
                    .nth(1)
                    .unwrap_or_default()
                    .trim_matches('"')
                    .to_string();
                email.attachments.push((name, bytes));
            } else if content_type.starts_with("text/plain") {
                email.text = String::from_utf8(bytes).unwrap();
            } else if content_type.starts_with("text/html") {
                email.html = String::from_utf8(bytes).unwrap();
            }
        }
        email
    }
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name)
            .then(|| value.trim().to_string())
    })
}

fn decode(body: &str, encoding: &str) -> Vec<u8> {
    match encoding {
        "base64" => {
            let compact: String = body.chars().filter(|c| !c.is_whitespace()).collect();
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, compact).unwrap()
        }
        "quoted-printable" => {
            let text = body.replace("=\n", "");
            let bytes = text.as_bytes();
            let mut out = Vec::new();
            let mut index = 0;
            while index < bytes.len() {
                let escaped = (bytes[index] == b'=')
                    .then(|| bytes.get(index + 1..index + 3))
                    .flatten()
                    .and_then(|hex| std::str::from_utf8(hex).ok())
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok());
                match escaped {
                    Some(byte) => {
                        out.push(byte);
                        index += 3;
                    }
                    None => {
                        out.push(bytes[index]);
                        index += 1;
                    }
                }
            }
            out
        }
        _ => body.as_bytes().to_vec(),
    }
}

pub(crate) fn daily_runs(ran: &[Ran]) -> Vec<String> {
    ran.iter()
        .filter(|run| run.job == Job::DailyReport)
        .map(|run| run.period.clone())
        .collect()
}

pub(crate) fn slack_text(post: &Value) -> String {
    post["text"].as_str().unwrap_or_default().to_string()
}

// ---------------------------------------------------------------------------------------------
// The daily report
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_daily_report_holds_the_seeded_days_figures_number_by_number() {
    let world = World::start("2026-11-06T08:00:00Z", |_| {}).await;
    world.seed_november_fifth().await;
    let scheduler = world.scheduler().await;

    let sent = scheduler
        .run_now(Manual::DailyReport(date("2026-11-05")), true)
        .await
        .unwrap();

    assert_eq!(sent.len(), 1);
    assert!(sent[0].report.is_none(), "a dry run sends nothing");
    let message = &sent[0].message;
    assert_eq!(
        message.subject,
        "[Pictor] Daily report 2026-11-05: 10 jobs, 70.0% succeeded, $0.172070 spent"
    );
    let text = &message.text;
    for line in [
        "Pictor daily report for Thursday 2026-11-05 (UTC)",
        // 10 jobs: 7 succeeded, 1 failed, 1 clarification, 1 canceled; the day before 4 + 1.
        "  Finished: 10 (day before: 5, +5)",
        "  Success rate: 70.0% (day before: 80.0%, -10.0 pts)",
        "  Error rate: 10.0% (day before: 20.0%, -10.0 pts)",
        // Durations 0.04, 0.3, 0.8 x3, 2 x2, 4 x2, 25 s: the 5th is within 1 s, the 10th 30 s.
        "  Response time p50: 1 s (day before: 1 s)",
        "  Response time p95: 30 s (day before: 10 s)",
        "  Clarifications asked: 1 (day before: 0, +1)",
        "  Fallbacks: 2 (day before: 0, +2)",
        "  Rate-limit deferrals: 3 (day before: 1, +2)",
        "  intent   succeeded  failed  needs clarification  canceled  total",
        "  create           5       1                    0         0      6",
        "  edit             2       0                    0         0      2",
        "  none             0       0                    0         1      1",
        "  unclear          0       0                    1         0      1",
        // 5 router calls of $0.00125, 2 creates of $0.06341, 1 edit of $0.039.
        "  Spent: $0.172070 in 8 calls (day before: $0.063410, +$0.108660)",
        "  Cost per finished job: $0.017207",
        "  provider  calls       cost",
        "  gemini        1  $0.039000",
        "  openai        7  $0.133070",
        "  agent   calls       cost",
        "  create      2  $0.126820",
        "  edit        1  $0.039000",
        "  router      5  $0.006250",
        "Top users (6 with billed calls)",
        "  user   calls       cost",
        "  alice      2  $0.064660",
        "  carol      1  $0.063410",
        "  bob        2  $0.040250",
        "  dave       1  $0.001250",
        "  erin       1  $0.001250",
        "Budget 2026-11",
        // $0.06341 on the 4th and $0.17207 on the 5th; the 6th's call is not counted.
        "  Month to date: $0.235480 of $70.00 (0.3%)",
        // 235,480 over 5 of 30 days, times 30: 1,412,880.
        "  Projected month-end: $1.412880 (2.0% of the budget)",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(!text.contains("frank"), "only the top five users are named");

    let html = &message.html;
    assert!(html.contains("<h3"), "{html}");
    assert!(html.contains(">$0.172070 in 8 calls"), "{html}");
    let blocks = message.slack_blocks.as_array().unwrap();
    assert_eq!(blocks[0]["type"], "header");
    assert_eq!(
        blocks[0]["text"]["text"],
        "Pictor daily report for Thursday 2026-11-05 (UTC)"
    );
    assert!(
        blocks.iter().any(
            |block| block["fields"]
                .as_array()
                .is_some_and(|fields| fields
                    .iter()
                    .any(|field| field["text"]
                        == "*Success rate*\n70.0% (day before: 80.0%, -10.0 pts)"))
        ),
        "{blocks:#?}"
    );
    assert_eq!(blocks.last().unwrap()["type"], "context");
    assert!(world.smtp.messages().is_empty());

    // docs/reports.md shows this very report as its sample.
    let docs = include_str!("../../../docs/reports.md");
    assert!(
        docs.contains(&format!("```text\n{text}```")),
        "docs/reports.md's sample text is not what the scheduler renders:\n{text}"
    );
    let slack = serde_json::to_string_pretty(&message.slack_blocks).unwrap();
    assert!(
        docs.contains(&format!("```json\n{slack}\n```")),
        "docs/reports.md's sample Slack blocks are not what the scheduler renders:\n{slack}"
    );
    assert!(docs.contains(&format!("`{}`", message.subject)));
}

#[tokio::test]
async fn the_daily_report_arrives_once_by_email_and_once_on_slack_at_the_report_time() {
    let world = World::start("2026-11-05T12:00:00Z", |_| {}).await;
    world.slack_ok().await;
    world.seed_november_fifth().await;
    let scheduler = world.scheduler().await;

    // A new deployment sends the latest report due: the 4th's.
    assert_eq!(daily_runs(&scheduler.tick().await), ["2026-11-04"]);
    world.clock.set(at("2026-11-06T07:59:30Z"));
    assert!(
        daily_runs(&scheduler.tick().await).is_empty(),
        "not before 08:00"
    );
    world.clock.set(at("2026-11-06T08:00:10Z"));
    assert_eq!(daily_runs(&scheduler.tick().await), ["2026-11-05"]);
    for minutes in [1, 60, 600] {
        world
            .clock
            .set(at("2026-11-06T08:00:10Z") + chrono::Duration::minutes(minutes));
        assert!(daily_runs(&scheduler.tick().await).is_empty());
    }

    let fifth = world.emails_about("Daily report 2026-11-05");
    assert_eq!(fifth.len(), 1, "{:?}", world.subjects());
    assert_eq!(
        world.emails_about("Daily report").len(),
        2,
        "{:?}",
        world.subjects()
    );
    let email = &fifth[0];
    assert!(
        email.text.contains("  Finished: 10 (day before: 5, +5)"),
        "{}",
        email.text
    );
    assert!(email.html.contains("<table"), "{}", email.html);
    assert!(email.attachments.is_empty());

    let fifth = world
        .slack_about("Pictor daily report for Thursday 2026-11-05")
        .await;
    assert_eq!(fifth.len(), 1, "{fifth:#?}");
    assert_eq!(world.slack_about("Pictor daily report").await.len(), 2);
    assert!(slack_text(&fifth[0]).contains("Finished: 10 (day before: 5, +5)"));
    assert_eq!(fifth[0]["blocks"][0]["type"], "header");
}

#[tokio::test]
async fn a_slack_rate_limit_is_waited_out_and_the_report_still_arrives_once() {
    let world = World::start("2026-11-06T08:00:10Z", |_| {}).await;
    Mock::given(method("POST"))
        .and(path(SLACK_PATH))
        .and(body_string_contains("Pictor daily report"))
        .respond_with(slack_answer(429, "rate_limited").insert_header("retry-after", "1"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&world.slack)
        .await;
    world.slack_ok().await;
    world.seed_november_fifth().await;
    let scheduler = world.scheduler().await;

    let started = Instant::now();
    assert_eq!(daily_runs(&scheduler.tick().await), ["2026-11-05"]);

    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was honoured"
    );
    let requests = world.slack_about("Pictor daily report").await;
    assert_eq!(requests.len(), 2, "one 429, then ok");
    assert_eq!(
        requests[0], requests[1],
        "the same message was posted again"
    );
    assert_eq!(world.emails_about("Daily report").len(), 1);
    assert!(daily_runs(&scheduler.tick().await).is_empty());
    assert_eq!(world.slack_about("Pictor daily report").await.len(), 2);
}

#[tokio::test]
async fn an_invalid_slack_payload_is_given_up_while_the_email_still_goes_out() {
    let world = World::start("2026-11-06T08:00:10Z", |_| {}).await;
    Mock::given(method("POST"))
        .and(path(SLACK_PATH))
        .respond_with(slack_answer(400, "invalid_payload"))
        .mount(&world.slack)
        .await;
    world.seed_november_fifth().await;
    let scheduler = world.scheduler().await;

    assert_eq!(daily_runs(&scheduler.tick().await), ["2026-11-05"]);
    let daily = "Pictor daily report";
    assert_eq!(
        world.slack_about(daily).await.len(),
        1,
        "a 400 is not retried"
    );
    assert_eq!(world.emails_about("Daily report").len(), 1);
    // The run is done: the next ticks neither resend the email nor retry Slack.
    world.clock.advance(chrono::Duration::minutes(5));
    assert!(daily_runs(&scheduler.tick().await).is_empty());
    assert_eq!(world.slack_about(daily).await.len(), 1);
    assert_eq!(world.emails_about("Daily report").len(), 1);

    // By hand, the same report shows each channel's outcome.
    let sent = scheduler
        .run_now(Manual::DailyReport(date("2026-11-05")), false)
        .await
        .unwrap();
    let report = sent[0].report.as_ref().unwrap();
    assert_eq!(report.email, Outcome::Sent);
    assert_eq!(
        report.slack,
        Outcome::Failed {
            permanent: true,
            error: "400 invalid_payload".to_string()
        }
    );
    assert_eq!(world.emails_about("Daily report").len(), 2);
}

#[tokio::test]
async fn two_schedulers_racing_over_the_same_report_time_send_it_once() {
    let world = World::start("2026-11-06T08:00:00Z", |_| {}).await;
    world.slack_ok().await;
    world.seed_november_fifth().await;
    let first = world.scheduler().await;
    let second = world.scheduler().await;

    let mut runs = Vec::new();
    for round in 0..5 {
        world
            .clock
            .set(at("2026-11-06T08:00:00Z") + chrono::Duration::seconds(round * 20));
        let (a, b) = tokio::join!(first.tick(), second.tick());
        runs.extend(daily_runs(&a));
        runs.extend(daily_runs(&b));
    }

    assert_eq!(runs, ["2026-11-05"]);
    assert_eq!(
        world.emails_about("Daily report").len(),
        1,
        "{:?}",
        world.subjects()
    );
    assert_eq!(world.slack_about("Pictor daily report").await.len(), 1);
    assert_eq!(
        world.emails_about("Costs of 2026-10").len(),
        1,
        "the first tick's export is sent once too"
    );
}

#[tokio::test]
async fn a_scheduler_down_over_two_report_times_catches_up_once_each_oldest_first() {
    let world = World::start("2026-11-04T12:00:00Z", |_| {}).await;
    world.slack_ok().await;
    world.seed_november_fifth().await;
    let before = world.scheduler().await;
    assert_eq!(daily_runs(&before.tick().await), ["2026-11-03"]);
    drop(before);

    // Down from the 4th at noon until the 6th at nine: the reports of the 4th and 5th are due.
    world.clock.set(at("2026-11-06T09:00:00Z"));
    let after = world.scheduler().await;
    let another = world.scheduler().await;
    assert_eq!(
        daily_runs(&after.tick().await),
        ["2026-11-04", "2026-11-05"]
    );
    assert!(daily_runs(&after.tick().await).is_empty());
    assert!(daily_runs(&another.tick().await).is_empty());

    let subjects: Vec<String> = world
        .subjects()
        .into_iter()
        .filter(|subject| subject.contains("Daily report"))
        .collect();
    assert_eq!(subjects.len(), 3, "{subjects:?}");
    for (subject, day) in subjects
        .iter()
        .zip(["2026-11-03", "2026-11-04", "2026-11-05"])
    {
        assert!(subject.contains(day), "{subjects:?}");
    }
    let slack: Vec<String> = world
        .slack_about("Pictor daily report")
        .await
        .iter()
        .map(slack_text)
        .collect();
    assert_eq!(slack.len(), 3);
    assert!(
        slack[1].contains("2026-11-04") && slack[2].contains("2026-11-05"),
        "{slack:?}"
    );
}

#[tokio::test]
async fn the_scheduler_loop_sends_the_report_once_its_clock_reaches_the_report_time() {
    let world = World::start("2026-11-06T07:59:00Z", |_| {}).await;
    world.slack_ok().await;
    world.seed_november_fifth().await;
    // Skip the new-deployment report of the 4th: the 4th is recorded as done by hand.
    let warm_up = world.scheduler().await;
    warm_up.tick().await;
    let baseline = world.emails_about("Daily report").len();

    let scheduler = world.scheduler().await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(scheduler.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    world.clock.set(at("2026-11-06T08:00:01Z"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while world.emails_about("Daily report").len() == baseline {
        assert!(Instant::now() < deadline, "the report never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    running.await.unwrap();

    let subjects: Vec<String> = world
        .emails_about("Daily report")
        .into_iter()
        .map(|email| email.subject)
        .collect();
    assert_eq!(subjects.len(), baseline + 1, "{subjects:?}");
    assert!(subjects.last().unwrap().contains("Daily report 2026-11-05"));
}

// ---------------------------------------------------------------------------------------------
// Budget alerts
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn budget_thresholds_from_the_workers_events_are_delivered_once_with_two_schedulers() {
    let world = World::start("2026-11-20T10:00:00Z", |settings| {
        settings.budget.monthly_micros = 1_000_000;
    })
    .await;
    world.slack_ok().await;
    // $0.85 crosses 80% of $1.00; $0.20 more crosses 100%. Each raises one event.
    world
        .spend("2026-11-20T09:00:00Z", "alice", "create", "openai", 850_000)
        .await;
    world
        .spend("2026-11-20T09:30:00Z", "bob", "edit", "gemini", 200_000)
        .await;
    assert_eq!(world.ledger.budget_events().await.unwrap().len(), 2);
    let first = world.scheduler().await;
    let second = world.scheduler().await;

    for minute in 0..3 {
        world
            .clock
            .set(at("2026-11-20T10:00:00Z") + chrono::Duration::minutes(minute));
        tokio::join!(first.tick(), second.tick());
    }

    let budget: Vec<Email> = world
        .emails()
        .into_iter()
        .filter(|email| email.subject.contains("Budget"))
        .collect();
    let subjects: Vec<&str> = budget.iter().map(|email| email.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "[Pictor] Budget 2026-11: 80% reached, $0.85 of $1.00 (85.0%)",
            "[Pictor] Budget 2026-11: 100% reached, $1.05 of $1.00 (105.0%)",
        ]
    );
    assert!(
        budget[0].text.contains("  Raised: by a worker at"),
        "{}",
        budget[0].text
    );
    assert!(
        budget[0]
            .text
            .contains("Runbook: https://runbooks.example.com/docs/runbooks/budget-80-percent.md")
    );
    assert!(budget[1].text.contains("budget-exhausted.md"));
    assert_eq!(world.slack_about("Budget 2026-11:").await.len(), 2);
}

#[tokio::test]
async fn a_month_projected_over_budget_is_announced_once_by_the_schedulers_own_check() {
    let world = World::start("2026-11-03T12:00:00Z", |settings| {
        settings.budget.monthly_micros = 1_000_000;
    })
    .await;
    world.slack_ok().await;
    // $0.20 in three days of thirty: $2.00 projected, twice the budget; no threshold crossed.
    world
        .spend("2026-11-02T09:00:00Z", "alice", "create", "openai", 200_000)
        .await;
    assert!(world.ledger.budget_events().await.unwrap().is_empty());
    let scheduler = world.scheduler().await;

    for minute in 0..3 {
        world
            .clock
            .set(at("2026-11-03T12:00:00Z") + chrono::Duration::minutes(minute));
        scheduler.tick().await;
    }

    let emails: Vec<Email> = world
        .emails()
        .into_iter()
        .filter(|email| email.subject.contains("Budget"))
        .collect();
    assert_eq!(emails.len(), 1, "{:?}", world.subjects());
    assert_eq!(
        emails[0].subject,
        "[Pictor] Budget 2026-11: projected month-end $2.00 is over the $1.00 budget"
    );
    assert!(
        emails[0]
            .text
            .contains("  Raised: by the scheduler's budget check")
    );
}

// ---------------------------------------------------------------------------------------------
// The monthly export
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_monthly_csv_arrives_as_an_attachment_whose_total_matches_the_ledger() {
    let world = World::start("2026-11-01T08:00:30Z", |_| {}).await;
    world.slack_ok().await;
    let calls = [
        ("2026-10-01T00:00:00Z", "alice", "router", "openai", 1_250),
        ("2026-10-01T00:00:03Z", "alice", "create", "openai", 63_410),
        ("2026-10-15T12:00:00Z", "bob", "edit", "gemini", 39_001),
        ("2026-10-31T23:59:59Z", "carol", "create", "openai", 31_730),
    ];
    for (when, user, agent, provider, micros) in calls {
        world.spend(when, user, agent, provider, micros).await;
    }
    world
        .spend("2026-11-01T00:00:00Z", "alice", "router", "openai", 1_250)
        .await;
    let october = Month::parse("2026-10").unwrap();
    let ledger_total = world.ledger.spent(october).await.unwrap();
    assert_eq!(ledger_total, 135_391);
    let scheduler = world.scheduler().await;

    let ran = scheduler.tick().await;

    assert!(
        ran.iter()
            .any(|run| run.job == Job::MonthlyExport && run.period == "2026-10"),
        "{ran:?}"
    );
    let emails: Vec<Email> = world
        .emails()
        .into_iter()
        .filter(|email| email.subject.contains("Costs of 2026-10"))
        .collect();
    assert_eq!(emails.len(), 1, "{:?}", world.subjects());
    let email = &emails[0];
    assert_eq!(
        email.subject,
        "[Pictor] Costs of 2026-10: $0.135391 in 4 calls"
    );
    assert_eq!(email.attachments.len(), 1);
    let (name, bytes) = &email.attachments[0];
    assert_eq!(name, "pictor-costs-2026-10.csv");
    let mut reader = csv::Reader::from_reader(bytes.as_slice());
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(header, shared::costs::CALL_COLUMNS);
    let billed = header.iter().position(|c| c == "BilledCost").unwrap();
    let exact = header.iter().position(|c| c == "x_CostMicros").unwrap();
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 4, "November's call is not in October's file");
    let billed_total: i64 = rows
        .iter()
        .map(|row| shared::pricing::parse_usd_micros(&row[billed]).unwrap())
        .sum();
    let exact_total: i64 = rows
        .iter()
        .map(|row| row[exact].parse::<i64>().unwrap())
        .sum();
    assert_eq!(billed_total, ledger_total);
    assert_eq!(exact_total, ledger_total);

    let stored =
        std::path::Path::new(&world.settings.images.store).join("exports/pictor-costs-2026-10.csv");
    // The attachment went as 7bit text, whose line ends the parser folds to LF.
    let stored = String::from_utf8(std::fs::read(&stored).unwrap()).unwrap();
    assert_eq!(
        stored.replace("\r\n", "\n"),
        String::from_utf8(bytes.clone()).unwrap(),
        "the stored file is the attached one"
    );
    assert!(
        stored.ends_with("\r\n"),
        "RFC 4180 line ends in the stored file"
    );

    let posts = world.slack_posts().await;
    let export = posts
        .iter()
        .map(slack_text)
        .find(|text| text.contains("Pictor costs of 2026-10"))
        .unwrap();
    assert!(export.contains("Total (BilledCost): $0.135391"), "{export}");
    assert!(export.contains("Billed calls: 4"), "{export}");
    assert!(export.contains("pictor-costs-2026-10.csv"), "{export}");

    world.clock.advance(chrono::Duration::hours(1));
    assert!(
        !scheduler
            .tick()
            .await
            .iter()
            .any(|run| run.job == Job::MonthlyExport)
    );
}

// ---------------------------------------------------------------------------------------------
// Health alerts
// ---------------------------------------------------------------------------------------------

impl World {
    /// `total` jobs ending in the minute of `when`, `failed` of them failed, each after `secs`.
    async fn traffic(&self, when: DateTime<Utc>, total: u32, failed: u32, secs: f64) {
        for index in 0..total {
            let status = if index < failed {
                JobStatus::Failed
            } else {
                JobStatus::Succeeded
            };
            self.stats
                .job_finished(
                    when,
                    status,
                    Some(Intent::Create),
                    Duration::from_secs_f64(secs),
                )
                .await
                .unwrap();
        }
    }

    async fn health_subjects(&self) -> Vec<String> {
        let emails: Vec<String> = self
            .subjects()
            .into_iter()
            .filter(|subject| subject.contains("FIRING") || subject.contains("RESOLVED"))
            .collect();
        let slack: Vec<String> = self
            .slack_posts()
            .await
            .iter()
            .map(slack_text)
            .filter(|text| text.contains("FIRING") || text.contains("RESOLVED"))
            .collect();
        assert_eq!(emails.len(), slack.len(), "{emails:?} vs {slack:?}");
        emails
    }
}

fn health_settings(settings: &mut Settings) {
    settings.scheduler.health_window_minutes = NonZeroU32::new(10).unwrap();
    settings.scheduler.health_min_jobs = 20;
    settings.scheduler.error_rate_threshold = 0.05;
    settings.scheduler.alert_repeat_minutes = NonZeroU32::new(30).unwrap();
}

#[tokio::test]
async fn an_error_rate_alert_fires_once_repeats_after_the_interval_and_resolves() {
    let world = World::start("2026-11-06T10:00:30Z", health_settings).await;
    world.slack_ok().await;
    let scheduler = world.scheduler().await;
    // 40 jobs in the window, 4 failed: 10% > 5%.
    world.traffic(at("2026-11-06T09:58:00Z"), 40, 4, 1.0).await;

    scheduler.tick().await;
    assert_eq!(
        world.health_subjects().await,
        ["[Pictor] FIRING: agent error rate 10.0% over the last 10 minutes (threshold 5.0%)"]
    );
    let firing = world.emails_about("FIRING").remove(0);
    assert!(
        firing.text.contains(
            "Runbook: https://runbooks.example.com/docs/runbooks/agent-error-rate-high.md"
        ),
        "{}",
        firing.text
    );
    assert!(
        firing
            .text
            .contains("  Failed jobs: 4 of 40 finished in the last 10 minutes")
    );

    // Still failing twenty minutes on: within the repeat interval, nothing is sent.
    world.clock.set(at("2026-11-06T10:01:30Z"));
    scheduler.tick().await;
    world.clock.set(at("2026-11-06T10:20:30Z"));
    world.traffic(at("2026-11-06T10:20:00Z"), 40, 4, 1.0).await;
    scheduler.tick().await;
    assert_eq!(world.health_subjects().await.len(), 1);

    // Thirty minutes after the first message it is repeated.
    world.clock.set(at("2026-11-06T10:30:30Z"));
    world.traffic(at("2026-11-06T10:30:00Z"), 40, 4, 1.0).await;
    scheduler.tick().await;
    let subjects = world.health_subjects().await;
    assert_eq!(subjects.len(), 2, "{subjects:?}");
    assert_eq!(
        subjects[1],
        "[Pictor] STILL FIRING: agent error rate 10.0% over the last 10 minutes (threshold 5.0%)"
    );

    // 40 good jobs bring the window to 4 of 80, 5.0%: not over the threshold any more.
    world.clock.set(at("2026-11-06T10:31:30Z"));
    world.traffic(at("2026-11-06T10:31:00Z"), 40, 0, 1.0).await;
    scheduler.tick().await;
    let subjects = world.health_subjects().await;
    assert_eq!(subjects.len(), 3, "{subjects:?}");
    assert_eq!(
        subjects[2],
        "[Pictor] RESOLVED: agent error rate back to 5.0% (threshold 5.0%)"
    );
    let resolved = world.emails_about("RESOLVED").remove(0);
    assert!(
        resolved
            .text
            .contains("  Fired: from 2026-11-06 10:00 to 10:31 UTC (31 minutes)"),
        "{}",
        resolved.text
    );

    world.clock.set(at("2026-11-06T10:32:30Z"));
    scheduler.tick().await;
    assert_eq!(world.health_subjects().await.len(), 3);
}

#[tokio::test]
async fn slow_jobs_fire_the_response_time_alert() {
    let world = World::start("2026-11-06T10:00:30Z", health_settings).await;
    world.slack_ok().await;
    let scheduler = world.scheduler().await;
    world.traffic(at("2026-11-06T10:00:00Z"), 30, 0, 25.0).await;

    scheduler.tick().await;

    let subjects = world.health_subjects().await;
    assert_eq!(
        subjects,
        ["[Pictor] FIRING: p95 response time 30 s over the last 10 minutes (threshold 20 s)"]
    );
    let email = &world.emails_about("FIRING")[0];
    assert!(
        email.text.contains("response-time-high.md"),
        "{}",
        email.text
    );
}

#[tokio::test]
async fn too_little_traffic_never_fires_a_health_alert() {
    let world = World::start("2026-11-06T10:00:30Z", health_settings).await;
    world.slack_ok().await;
    let scheduler = world.scheduler().await;
    // Every job failed and every one was slow, but 19 jobs are under the minimum of 20.
    world
        .traffic(at("2026-11-06T10:00:00Z"), 19, 19, 60.0)
        .await;

    for minute in 0..3 {
        world
            .clock
            .set(at("2026-11-06T10:00:30Z") + chrono::Duration::minutes(minute));
        scheduler.tick().await;
    }

    assert!(world.health_subjects().await.is_empty());
}

// ---------------------------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_dry_run_from_the_command_line_prints_the_report_and_sends_nothing() {
    let world = World::start("2026-11-06T08:00:00Z", |_| {}).await;
    world.slack_ok().await;
    world.seed_november_fifth().await;
    use secrecy::ExposeSecret;
    let settings = &world.settings;

    let output = tokio::process::Command::new(tests::harness::workspace_binary("pictor-scheduler"))
        .args(["run", "daily-report", "--date", "2026-11-05", "--dry-run"])
        .env("PICTOR_REDIS_URL", settings.redis.url.expose_secret())
        .env("PICTOR_REDIS_PREFIX", &settings.redis.prefix)
        .env("PICTOR_IMAGE_STORE", &settings.images.store)
        .env("PICTOR_SMTP_URL", world.smtp.url())
        .env("PICTOR_EMAIL_TO", "ops@example.com")
        .env(
            "PICTOR_SLACK_WEBHOOK_URL",
            format!("{}{SLACK_PATH}", world.slack.uri()),
        )
        .env("PICTOR_SCHEDULER_METRICS_ADDR", "")
        .output()
        .await
        .unwrap();

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("Pictor daily report for Thursday 2026-11-05 (UTC)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  Finished: 10 (day before: 5, +5)"),
        "{stdout}"
    );
    assert!(stdout.contains("--- Slack blocks ---"), "{stdout}");
    assert!(stdout.contains("\"type\": \"header\""), "{stdout}");
    assert!(world.smtp.messages().is_empty());
    assert!(world.slack_posts().await.is_empty());
}
