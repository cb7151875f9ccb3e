//! The Prometheus Operator resources of `infra/k8s/monitoring/`, generated from the files that
//! Prometheus and Alertmanager run elsewhere, so there is one source for each:
//!
//! - `prometheus-rule.yaml`, a `PrometheusRule` whose `spec` is `infra/prometheus/alerts.yml`'s
//!   `groups:` verbatim (comments and all, indented under `spec:`);
//! - `alertmanager-config.yaml`, an `AlertmanagerConfig` translated from
//!   `infra/alertmanager/alertmanager.yml`: the same route tree, inhibit rules and receivers, the
//!   global SMTP settings folded into each email receiver, and the secret files replaced by
//!   references to keys of the `pictor-secrets` Secret.
//!
//! `tests/tests/e2e/deploy.rs` fails when the committed files differ from what these functions
//! make of the current sources, and rewrites them with `PICTOR_REGENERATE=1` ([`REGENERATE`]).

use serde_json::{Map, Value, json};

/// The command that rewrites the generated files.
pub const REGENERATE: &str = "PICTOR_REGENERATE=1 cargo test -p tests --test e2e \
     deploy::the_monitoring_resources_are_generated_from_the_shipped_configs";

/// Where each generated file is, and the file it comes from (paths from the repository root).
pub const PROMETHEUS_RULE: (&str, &str) = (
    "infra/k8s/monitoring/prometheus-rule.yaml",
    "infra/prometheus/alerts.yml",
);
pub const ALERTMANAGER_CONFIG: (&str, &str) = (
    "infra/k8s/monitoring/alertmanager-config.yaml",
    "infra/alertmanager/alertmanager.yml",
);

/// The Secret (of the Pictor namespace) and its keys the `AlertmanagerConfig` reads: the same
/// Slack webhook the scheduler posts to, and the SMTP password.
pub const SECRET: &str = "pictor-secrets";
pub const SLACK_WEBHOOK_KEY: &str = "PICTOR_SLACK_WEBHOOK_URL";
pub const SMTP_PASSWORD_KEY: &str = "alertmanager-smtp-password";

fn header(source: &str) -> String {
    format!(
        "# GENERATED from {source} by tests/src/monitoring.rs: do not edit. After changing\n\
         # {source}, regenerate with\n\
         #   {REGENERATE}\n\
         # (the deploy tests fail until this file matches). Needs the Prometheus Operator's CRDs:\n\
         #   kubectl apply -k infra/k8s/monitoring   (see infra/k8s/README.md)\n"
    )
}

/// The `PrometheusRule`: `alerts.yml` from its `groups:` line on, under `spec:`.
pub fn prometheus_rule(alerts_yml: &str) -> String {
    let start = alerts_yml
        .find("\ngroups:")
        .map(|at| at + 1)
        .or_else(|| alerts_yml.starts_with("groups:").then_some(0))
        .expect("alerts.yml has a top-level `groups:` key");
    let mut out = header(PROMETHEUS_RULE.1);
    out.push_str(
        "# Pictor's alert rules for a Prometheus run by the Prometheus Operator: its ruleSelector and\n\
         # ruleNamespaceSelector must select this object (labels below, namespace pictor).\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  name: pictor\n  labels:\n    app.kubernetes.io/part-of: pictor\n\
         spec:\n",
    );
    for line in alerts_yml[start..].lines() {
        if line.is_empty() {
            out.push('\n');
        } else {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// `severity="page"` (Alertmanager's matcher syntax, as the shipped file writes it) as an
/// `AlertmanagerConfig` matcher.
fn matcher(text: &str) -> Value {
    let text = text.trim();
    let (at, operator) = ["=~", "!~", "!=", "="]
        .iter()
        .filter_map(|operator| text.find(operator).map(|at| (at, *operator)))
        .min_by_key(|(at, operator)| (*at, std::cmp::Reverse(operator.len())))
        .unwrap_or_else(|| panic!("matcher {text:?} has no operator"));
    let name = text[..at].trim();
    let value = text[at + operator.len()..].trim();
    let value = value
        .strip_prefix('"')
        .and_then(|value| value.strip_suffix('"'))
        .unwrap_or(value);
    json!({"name": name, "value": value, "matchType": operator})
}

fn matchers(list: &Value) -> Value {
    Value::Array(
        list.as_array()
            .expect("a list of matchers")
            .iter()
            .map(|item| matcher(item.as_str().expect("a matcher string")))
            .collect(),
    )
}

fn route(route: &Value) -> Value {
    let mut out = Map::new();
    for (key, value) in route.as_object().expect("a route") {
        let (name, value) = match key.as_str() {
            "receiver" => ("receiver", value.clone()),
            "group_by" => ("groupBy", value.clone()),
            "group_wait" => ("groupWait", value.clone()),
            "group_interval" => ("groupInterval", value.clone()),
            "repeat_interval" => ("repeatInterval", value.clone()),
            "continue" => ("continue", value.clone()),
            "matchers" => ("matchers", matchers(value)),
            "routes" => (
                "routes",
                Value::Array(
                    value
                        .as_array()
                        .unwrap_or(&Vec::new())
                        .iter()
                        .map(self::route)
                        .collect(),
                ),
            ),
            other => panic!("alertmanager.yml: the route key {other} has no translation here"),
        };
        out.insert(name.to_string(), value);
    }
    Value::Object(out)
}

fn secret(key: &str) -> Value {
    json!({"name": SECRET, "key": key})
}

/// Alertmanager's snake_case keys of the receiver settings Pictor uses, in the CRD's spelling.
fn receiver_key(key: &str) -> &'static str {
    match key {
        "send_resolved" => "sendResolved",
        "username" => "username",
        "channel" => "channel",
        "color" => "color",
        "title" => "title",
        "title_link" => "titleLink",
        "fallback" => "fallback",
        "text" => "text",
        "pretext" => "pretext",
        "footer" => "footer",
        "to" => "to",
        "from" => "from",
        "smarthost" => "smarthost",
        "auth_username" => "authUsername",
        "require_tls" => "requireTLS",
        "headers" => "headers",
        "html" => "html",
        other => panic!("alertmanager.yml: the receiver key {other} has no translation here"),
    }
}

fn receiver(receiver: &Value, global: &Value) -> Value {
    let mut out = Map::new();
    for (key, value) in receiver.as_object().expect("a receiver") {
        match key.as_str() {
            "name" => {
                out.insert("name".into(), value.clone());
            }
            "slack_configs" | "email_configs" => {
                let email = key == "email_configs";
                let configs = value
                    .as_array()
                    .expect("a list of configs")
                    .iter()
                    .map(|config| {
                        let mut translated = Map::new();
                        if email {
                            // The global SMTP settings, unless the receiver sets its own.
                            for (global_key, key) in [
                                ("smtp_from", "from"),
                                ("smtp_smarthost", "smarthost"),
                                ("smtp_auth_username", "authUsername"),
                                ("smtp_require_tls", "requireTLS"),
                            ] {
                                if !global[global_key].is_null() {
                                    translated.insert(key.into(), global[global_key].clone());
                                }
                            }
                            if !global["smtp_auth_password_file"].is_null() {
                                translated.insert("authPassword".into(), secret(SMTP_PASSWORD_KEY));
                            }
                        } else if !global["slack_api_url_file"].is_null()
                            || !global["slack_api_url"].is_null()
                        {
                            translated.insert("apiURL".into(), secret(SLACK_WEBHOOK_KEY));
                        }
                        for (key, value) in config.as_object().expect("a config") {
                            let value = if key == "headers" {
                                Value::Array(
                                    value
                                        .as_object()
                                        .expect("headers are a map")
                                        .iter()
                                        .map(|(key, value)| json!({"key": key, "value": value}))
                                        .collect(),
                                )
                            } else {
                                value.clone()
                            };
                            translated.insert(receiver_key(key).into(), value);
                        }
                        Value::Object(translated)
                    })
                    .collect();
                let name = if email {
                    "emailConfigs"
                } else {
                    "slackConfigs"
                };
                out.insert(name.into(), Value::Array(configs));
            }
            other => panic!("alertmanager.yml: the receiver kind {other} has no translation here"),
        }
    }
    Value::Object(out)
}

/// The `AlertmanagerConfig` equivalent to the shipped Alertmanager configuration (parsed, with
/// YAML anchors resolved).
pub fn alertmanager_config_value(config: &Value) -> Value {
    let global = &config["global"];
    let inhibit: Vec<Value> = config["inhibit_rules"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|rule| {
            let mut out = Map::new();
            for (key, value) in rule.as_object().expect("an inhibit rule") {
                let (name, value) = match key.as_str() {
                    "source_matchers" => ("sourceMatch", matchers(value)),
                    "target_matchers" => ("targetMatch", matchers(value)),
                    "equal" => ("equal", value.clone()),
                    other => panic!("alertmanager.yml: the inhibit key {other} has no translation"),
                };
                out.insert(name.into(), value);
            }
            Value::Object(out)
        })
        .collect();
    let receivers: Vec<Value> = config["receivers"]
        .as_array()
        .expect("receivers")
        .iter()
        .map(|item| receiver(item, global))
        .collect();
    json!({
        "apiVersion": "monitoring.coreos.com/v1alpha1",
        "kind": "AlertmanagerConfig",
        "metadata": {
            "name": "pictor",
            "labels": {"app.kubernetes.io/part-of": "pictor"},
        },
        "spec": {
            "route": route(&config["route"]),
            "inhibitRules": inhibit,
            "receivers": receivers,
        },
    })
}

/// The `AlertmanagerConfig` file made from `alertmanager.yml`'s text.
pub fn alertmanager_config(alertmanager_yml: &str) -> String {
    let mut value: yaml_serde::Value =
        yaml_serde::from_str(alertmanager_yml).expect("alertmanager.yml is YAML");
    value.apply_merge().expect("merge keys apply");
    let config = serde_json::to_value(value).expect("alertmanager.yml as JSON");
    let resource = alertmanager_config_value(&config);
    let mut out = header(ALERTMANAGER_CONFIG.1);
    out.push_str(
        "# The Alertmanager of the Prometheus Operator loads it when its alertmanagerConfigSelector\n\
         # (and alertmanagerConfigNamespaceSelector) select it. The operator adds namespace=\"pictor\"\n\
         # to its route and inhibit rules: see infra/k8s/README.md for the alerts to carry that label.\n\
         # Secrets: keys PICTOR_SLACK_WEBHOOK_URL and alertmanager-smtp-password of pictor-secrets.\n",
    );
    out.push_str(&yaml_serde::to_string(&resource).expect("the resource serializes"));
    out
}
