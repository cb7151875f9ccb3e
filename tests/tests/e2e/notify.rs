//! Report delivery against real counterparts: a real SMTP server (aiosmtpd, see `tests::smtp`)
//! for email and a wiremock answering like Slack's incoming webhooks, driven through
//! `scheduler::deliver::Delivery` exactly as the scheduler uses it.

use std::time::Duration;

use scheduler::deliver::{Attachment, Delivery, Message, Outcome};
use secrecy::SecretString;
use shared::config::SchedulerSettings;
use shared::retry::RetryPolicy;
use tests::harness::test_settings;
use tests::smtp::SmtpSink;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const CSV: &[u8] = b"day,jobs,failed\n2026-11-24,42,2\n";

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        base: Duration::from_millis(10),
        cap: Duration::from_millis(50),
        max_server_delay: Duration::from_secs(5),
    }
}

fn settings_for(sink: &SmtpSink) -> SchedulerSettings {
    let mut settings = test_settings().scheduler;
    settings.smtp_url = Some(SecretString::from(sink.url()));
    settings.email_from = "Pictor <pictor@localhost>".to_string();
    settings.email_to = vec![
        "ops@example.com".to_string(),
        "finance@example.com".to_string(),
    ];
    settings.slack_webhook_url = None;
    settings
}

fn daily_report() -> Message {
    Message {
        subject: "Pictor daily report 2026-11-24".to_string(),
        text: "42 jobs yesterday, 2 failed.".to_string(),
        html: "<p><strong>42</strong> jobs yesterday, 2 failed.</p>".to_string(),
        slack_blocks: serde_json::json!([
            {"type": "section", "text": {"type": "mrkdwn", "text": "*42* jobs yesterday, 2 failed."}}
        ]),
        attachments: vec![Attachment {
            filename: "jobs-2026-11-24.csv".to_string(),
            content_type: "text/csv".to_string(),
            bytes: CSV.to_vec().into(),
        }],
    }
}

#[tokio::test]
async fn a_report_with_an_attachment_reaches_a_real_smtp_server_once() {
    let sink = SmtpSink::start().await;
    let delivery = Delivery::from_settings(&settings_for(&sink))
        .unwrap()
        .with_retry(fast_retry());

    let report = delivery.send(&daily_report()).await;

    assert_eq!(report.email, Outcome::Sent);
    assert_eq!(report.slack, Outcome::NotConfigured);
    assert_eq!(report.outbox, Outcome::NotConfigured);
    assert!(report.delivered());
    let messages = sink.messages();
    assert_eq!(messages.len(), 1, "{messages:#?}");
    let raw = &messages[0];
    assert!(
        raw.contains("Subject: Pictor daily report 2026-11-24"),
        "{raw}"
    );
    assert!(raw.contains("From: Pictor <pictor@localhost>"), "{raw}");
    assert!(
        raw.contains("X-RcptTo: ops@example.com, finance@example.com"),
        "both recipients are in the envelope: {raw}"
    );
    assert!(raw.contains("multipart/mixed"), "{raw}");
    assert!(raw.contains("multipart/alternative"), "{raw}");
    assert!(raw.contains("Content-Type: text/plain"), "{raw}");
    assert!(raw.contains("42 jobs yesterday, 2 failed."), "{raw}");
    assert!(raw.contains("Content-Type: text/html"), "{raw}");
    assert!(
        raw.contains("<p><strong>42</strong> jobs yesterday, 2 failed.</p>"),
        "{raw}"
    );
    assert!(raw.contains("filename=\"jobs-2026-11-24.csv\""), "{raw}");
    assert!(
        raw.replace("\r\n", "\n")
            .contains(std::str::from_utf8(CSV).unwrap()),
        "the attachment's bytes arrive intact: {raw}"
    );
}

#[tokio::test]
async fn a_failing_slack_does_not_keep_email_from_being_delivered() {
    let sink = SmtpSink::start().await;
    let slack = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(500).set_body_raw(b"rollup_error".to_vec(), "text/plain"),
        )
        .expect(3)
        .mount(&slack)
        .await;
    let mut settings = settings_for(&sink);
    settings.slack_webhook_url = Some(SecretString::from(format!(
        "{}/services/T000/B000/XXXX",
        slack.uri()
    )));
    let delivery = Delivery::from_settings(&settings)
        .unwrap()
        .with_retry(fast_retry());

    let report = delivery.send(&daily_report()).await;

    assert_eq!(report.email, Outcome::Sent);
    let Outcome::Failed { permanent, error } = &report.slack else {
        panic!("expected Slack to fail, got {:?}", report.slack);
    };
    assert!(!permanent);
    assert!(error.starts_with("500 rollup_error"), "{error}");
    assert_eq!(report.outbox, Outcome::NotConfigured);
    assert!(report.delivered());
    assert_eq!(sink.messages().len(), 1);
}
