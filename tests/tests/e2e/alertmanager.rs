//! The shipped Alertmanager configuration (`infra/alertmanager/alertmanager.yml`) run by the real
//! Alertmanager binary (Debian's `prometheus-alertmanager`, installed by `scripts/services.sh`):
//! the same routes, grouping and inhibit rules, with only the receivers' endpoints swapped for a
//! local Slack mock (wiremock) and a local SMTP server, and shorter waits. Alerts are posted to
//! its `/api/v2/alerts` as Prometheus would post them, with the labels and annotations of the
//! real rules in `infra/prometheus/alerts.yml`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::smtp::SmtpSink;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// YAML as JSON, merge keys and anchors applied.
fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    let mut value: yaml_serde::Value = yaml_serde::from_str(&text).unwrap();
    value.apply_merge().unwrap();
    serde_json::to_value(value).unwrap()
}

/// Upstream names the server `alertmanager`; Debian `prometheus-alertmanager`.
fn binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["alertmanager", "prometheus-alertmanager"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!("no alertmanager binary on PATH: run scripts/services.sh (prometheus-alertmanager)");
}

/// The shipped configuration, its receivers pointed at `slack` and the SMTP server on
/// `smtp_port` (no login, no TLS), and every wait cut to a second.
fn test_config(slack: &str, smtp_port: u16) -> Value {
    let mut config = yaml("infra/alertmanager/alertmanager.yml");
    let global = config["global"].as_object_mut().unwrap();
    assert!(global.remove("slack_api_url_file").is_some());
    global.insert("slack_api_url".into(), json!(slack));
    global.insert(
        "smtp_smarthost".into(),
        json!(format!("127.0.0.1:{smtp_port}")),
    );
    global.remove("smtp_auth_username");
    global.remove("smtp_auth_password_file");
    global.insert("smtp_require_tls".into(), json!(false));
    fn shorten(route: &mut Value) {
        let route = route.as_object_mut().unwrap();
        route.insert("group_wait".into(), json!("1s"));
        route.insert("group_interval".into(), json!("1s"));
        if let Some(Value::Array(children)) = route.get_mut("routes") {
            children.iter_mut().for_each(shorten);
        }
    }
    shorten(&mut config["route"]);
    config
}

/// A running Alertmanager on a free port, with its own storage directory; killed, reaped and
/// deleted on drop.
struct Alertmanager {
    child: Child,
    dir: PathBuf,
    base: String,
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Alertmanager {
    async fn start(config: &Value) -> Self {
        let dir = std::env::temp_dir().join(format!("pictor-am-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let config_file = dir.join("alertmanager.yml");
        // JSON is YAML.
        std::fs::write(&config_file, serde_json::to_string_pretty(config).unwrap()).unwrap();
        let port = tests::harness::free_port();
        let log = std::fs::File::create(dir.join("alertmanager.log")).unwrap();
        let child = Command::new(binary())
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .arg("--log.level=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("alertmanager starts");
        let manager = Self {
            child,
            dir,
            base: format!("http://127.0.0.1:{port}"),
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = client.get(format!("{}/-/ready", manager.base)).send().await;
            if ready.is_ok_and(|response| response.status().is_success()) {
                return manager;
            }
            assert!(
                Instant::now() < deadline,
                "alertmanager is not ready: {}",
                manager.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("alertmanager.log")).unwrap_or_default()
    }

    /// Posts alerts as Prometheus does.
    async fn post(&self, alerts: &[Value]) {
        let response = reqwest::Client::new()
            .post(format!("{}/api/v2/alerts", self.base))
            .json(alerts)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{response:?}");
    }

    /// The alerts it holds with this alert name.
    async fn alerts(&self, alertname: &str) -> Vec<Value> {
        let url = url::Url::parse_with_params(
            &format!("{}/api/v2/alerts", self.base),
            [("filter", format!("alertname=\"{alertname}\""))],
        )
        .unwrap();
        let alerts: Value = reqwest::Client::new()
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        alerts.as_array().unwrap().clone()
    }
}

/// An alert of `infra/prometheus/alerts.yml` as Prometheus sends it: the rule's labels and its
/// annotations (the description's templates left out), firing or, with `resolved`, ended.
fn alert(name: &str, extra_labels: &[(&str, &str)], resolved: bool) -> Value {
    let rules = yaml("infra/prometheus/alerts.yml");
    let rule = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap())
        .find(|rule| rule["alert"] == name)
        .unwrap_or_else(|| panic!("no rule {name} in alerts.yml"));
    let mut labels = rule["labels"].clone();
    labels["alertname"] = json!(name);
    for (key, value) in extra_labels {
        labels[*key] = json!(value);
    }
    let mut annotations = rule["annotations"].clone();
    annotations["description"] = json!(format!("{name} test description"));
    let now = chrono::Utc::now();
    let starts = now - chrono::Duration::minutes(5);
    let ends = if resolved {
        now - chrono::Duration::seconds(1)
    } else {
        now + chrono::Duration::hours(1)
    };
    json!({
        "labels": labels,
        "annotations": annotations,
        "startsAt": starts.to_rfc3339(),
        "endsAt": ends.to_rfc3339(),
        "generatorURL": "http://prometheus.test/graph",
    })
}

/// The Slack messages received so far (the attachment Alertmanager posts).
async fn slack_messages(slack: &MockServer) -> Vec<Value> {
    slack
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .map(|request| {
            let body: Value = serde_json::from_slice(&request.body).unwrap();
            body["attachments"][0].clone()
        })
        .collect()
}

/// Waits for a Slack message whose title contains every one of `needles`.
async fn slack_message(slack: &MockServer, manager: &Alertmanager, needles: &[&str]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let messages = slack_messages(slack).await;
        if let Some(message) = messages.iter().find(|message| {
            let title = message["title"].as_str().unwrap_or("");
            needles.iter().all(|needle| title.contains(needle))
        }) {
            return message.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no Slack message titled with {needles:?}; got {messages:#?}; alertmanager log:\n{}",
            manager.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn slack_mock() -> MockServer {
    let slack = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(ResponseTemplate::new(200).set_body_string("ok"))
        .mount(&slack)
        .await;
    slack
}

#[tokio::test]
async fn a_page_reaches_slack_and_email_with_its_summary_and_runbook_then_its_resolution() {
    let slack = slack_mock().await;
    let smtp = SmtpSink::start().await;
    let manager =
        Alertmanager::start(&test_config(&format!("{}/hook", slack.uri()), smtp.port)).await;
    let rules = yaml("infra/prometheus/alerts.yml");
    let rule = rules["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|rule| rule["alert"] == "PictorBudgetExhausted")
        .unwrap()
        .clone();
    let summary = rule["annotations"]["summary"].as_str().unwrap();
    let runbook = rule["annotations"]["runbook_url"].as_str().unwrap();

    manager
        .post(&[alert("PictorBudgetExhausted", &[], false)])
        .await;
    let firing = slack_message(&slack, &manager, &["[FIRING", "PictorBudgetExhausted"]).await;
    assert_eq!(firing["title"], "[FIRING] PictorBudgetExhausted (page)");
    assert_eq!(firing["title_link"], runbook, "the title opens the runbook");
    assert_eq!(firing["color"], "danger");
    let text = firing["text"].as_str().unwrap();
    assert!(text.contains(&format!("*{summary}*")), "{text}");
    assert!(
        text.contains("PictorBudgetExhausted test description"),
        "{text}"
    );
    assert!(text.contains(&format!("Runbook: {runbook}")), "{text}");

    // The same alert by email, to the configured recipient.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mail = loop {
        // Quoted-printable bodies: soft line breaks removed.
        if let Some(mail) = smtp
            .messages()
            .into_iter()
            .map(|mail| mail.replace("=\r\n", "").replace("=\n", ""))
            .find(|mail| mail.contains("[FIRING] PictorBudgetExhausted"))
        {
            break mail;
        }
        assert!(
            Instant::now() < deadline,
            "no email arrived; alertmanager log:\n{}",
            manager.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(mail.contains("ops@example.com"), "{mail}");
    assert!(mail.contains(runbook), "{mail}");

    // Prometheus reports the end: a resolved message follows.
    manager
        .post(&[alert("PictorBudgetExhausted", &[], true)])
        .await;
    let resolved = slack_message(&slack, &manager, &["[RESOLVED]", "PictorBudgetExhausted"]).await;
    assert_eq!(resolved["color"], "good");
    let text = resolved["text"].as_str().unwrap();
    assert!(text.contains("Resolved."), "{text}");
    assert!(text.contains(runbook), "{text}");
}

#[tokio::test]
async fn a_firing_page_holds_back_the_ticket_it_explains_and_no_other() {
    let slack = slack_mock().await;
    let smtp = SmtpSink::start().await;
    let manager =
        Alertmanager::start(&test_config(&format!("{}/hook", slack.uri()), smtp.port)).await;

    manager
        .post(&[alert("PictorBudgetExhausted", &[], false)])
        .await;
    manager
        .post(&[
            alert("PictorBudget80Percent", &[], false),
            alert("PictorDeadLetters", &[("queue", "dead")], false),
        ])
        .await;

    // An unrelated ticket still goes out, and after it (same waits) the 80% ticket would have.
    slack_message(
        &slack,
        &manager,
        &["[FIRING]", "PictorBudgetExhausted (page)"],
    )
    .await;
    slack_message(
        &slack,
        &manager,
        &["[FIRING]", "PictorDeadLetters (ticket)"],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let titles: Vec<String> = slack_messages(&slack)
        .await
        .iter()
        .map(|message| message["title"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        !titles
            .iter()
            .any(|title| title.contains("PictorBudget80Percent")),
        "the page inhibits the 80% ticket: {titles:?}"
    );
    let held = manager.alerts("PictorBudget80Percent").await;
    assert_eq!(held.len(), 1, "{held:#?}");
    assert_eq!(held[0]["status"]["state"], "suppressed", "{held:#?}");
    assert_eq!(
        held[0]["status"]["inhibitedBy"].as_array().unwrap().len(),
        1,
        "{held:#?}"
    );

    // Once the budget is no longer exhausted, the 80% ticket is news again.
    manager
        .post(&[alert("PictorBudgetExhausted", &[], true)])
        .await;
    slack_message(
        &slack,
        &manager,
        &["[FIRING]", "PictorBudget80Percent (ticket)"],
    )
    .await;
}
