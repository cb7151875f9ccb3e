//! The documentation a newcomer relies on stays true to the code.

#[test]
fn every_environment_variable_is_in_the_readme_configuration_table() {
    let readme = include_str!("../../../README.md");
    for (variable, setting) in shared::config::ENV_VARS {
        assert!(
            readme.contains(&format!("| `{variable}` |")),
            "README's configuration table lacks {variable} ({setting})"
        );
    }
}

#[test]
fn every_environment_variable_is_in_the_commented_defaults() {
    for (variable, setting) in shared::config::ENV_VARS {
        assert!(
            shared::config::DEFAULT_TOML.contains(&format!("env: {variable}")),
            "config.default.toml does not document {variable} for {setting}"
        );
    }
}

#[test]
fn the_readme_names_the_two_commands_that_ci_runs() {
    let readme = include_str!("../../../README.md");
    let ci = include_str!("../../../.ci/run");
    assert!(readme.contains("./scripts/run.sh"));
    assert!(readme.contains("./scripts/test.sh"));
    assert!(
        ci.contains("./scripts/test.sh"),
        "CI runs the README's test command"
    );
}

#[test]
fn a_bad_setting_stops_the_binary_at_start_naming_the_variable() {
    let output = std::process::Command::new(tests::harness::workspace_binary("pictor-api"))
        .env("PICTOR_API_ADDR", "not-an-address")
        .output()
        .expect("pictor-api runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("PICTOR_API_ADDR"), "{stderr}");
}

/// The (status, code) of each `//! | 404 | `code` |` table row of a source file.
fn table_rows(source: &str) -> Vec<(u16, String)> {
    source
        .lines()
        .filter(|line| line.starts_with("//! |"))
        .filter_map(|line| {
            let mut cells = line.split('|').skip(1);
            let status = cells.next()?.trim().parse().ok()?;
            let code = cells.next()?.split('`').nth(1)?.to_string();
            Some((status, code))
        })
        .collect()
}

#[test]
fn the_error_guide_explains_every_api_error_code_and_every_notice() {
    let guide = include_str!("../../../docs/error-handling.md");
    let codes = api::ErrorCode::ALL.iter().map(|code| code.as_str());
    let failures = shared::codes::FailureCode::ALL
        .iter()
        .map(|code| code.as_str());
    let notices = shared::codes::NoticeKind::ALL
        .iter()
        .map(|kind| kind.as_str());
    for code in codes.chain(failures).chain(notices) {
        assert!(
            guide.contains(&format!("`{code}`")),
            "docs/error-handling.md lacks {code}"
        );
    }
}

#[test]
fn the_error_table_in_the_api_source_lists_every_code_with_its_status() {
    let table = table_rows(include_str!("../../../api/src/error.rs"));
    let listed: Vec<&str> = table.iter().map(|(_, code)| code.as_str()).collect();
    let mut expected: Vec<&str> = api::ErrorCode::ALL
        .iter()
        .map(|code| code.as_str())
        .collect();
    let mut sorted = listed.clone();
    sorted.sort_unstable();
    expected.sort_unstable();
    assert_eq!(sorted, expected);
    for (status, code) in &table {
        let code = api::ErrorCode::ALL
            .iter()
            .find(|known| known.as_str() == code)
            .expect("listed above");
        assert_eq!(*status, code.status().as_u16(), "{code}");
    }
}

/// The metric names (`pictor_…`) a text mentions, a histogram's `_bucket`, `_sum` and `_count`
/// series counted as the histogram itself.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("pictor_"))
        .map(|word| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| word.strip_suffix(suffix))
                .unwrap_or(word)
                .to_string()
        })
        .collect()
}

/// Whether docs/metrics.md's catalogue has a row for `name`.
fn catalogued(name: &str) -> bool {
    include_str!("../../../docs/metrics.md").contains(&format!("| `{name}` |"))
}

/// Every `"expr"` string anywhere in a Grafana dashboard (row panels nest theirs).
fn dashboard_expressions(value: &serde_json::Value, found: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(fields) => {
            for (key, field) in fields {
                match field {
                    serde_json::Value::String(expr) if key == "expr" => found.push(expr.clone()),
                    other => dashboard_expressions(other, found),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                dashboard_expressions(item, found);
            }
        }
        _ => {}
    }
}

#[test]
fn the_grafana_dashboard_is_valid_json_and_queries_only_catalogued_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../../infra/grafana/pictor.json"))
            .expect("infra/grafana/pictor.json is valid JSON");
    let mut expressions = Vec::new();
    dashboard_expressions(&dashboard, &mut expressions);
    assert!(expressions.len() > 20, "{expressions:?}");
    for expr in &expressions {
        let names = metric_names(expr);
        assert!(
            !names.is_empty(),
            "a dashboard query names no Pictor metric: {expr}"
        );
        for name in names {
            assert!(
                catalogued(&name),
                "the dashboard queries {name}, which docs/metrics.md does not catalogue: {expr}"
            );
        }
    }
    // The catalogue's PromQL, with its line breaks folded, is what the dashboard shows; only the
    // alert conditions (a comparison) are left to alerts.yml.
    let metrics = include_str!("../../../docs/metrics.md");
    let promql = metrics
        .split("## PromQL")
        .nth(1)
        .expect("docs/metrics.md has a PromQL section");
    let documented = promql
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|expr| expr.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|expr| expr.contains("pictor_") && !expr.contains(" > "));
    for expr in documented {
        assert!(
            expressions.contains(&expr),
            "the dashboard does not show docs/metrics.md's query as written: {expr}"
        );
    }
}

#[test]
fn the_alert_rules_use_only_catalogued_metrics_and_link_existing_runbooks() {
    let alerts = include_str!("../../../infra/prometheus/alerts.yml");
    let names = metric_names(alerts);
    assert!(names.len() >= 6, "{names:?}");
    for name in names {
        assert!(
            catalogued(&name),
            "alerts.yml uses {name}, which docs/metrics.md does not catalogue"
        );
    }
    let runbooks = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/runbooks");
    let index = std::fs::read_to_string(runbooks.join("README.md"))
        .expect("docs/runbooks/README.md exists");
    let alert_count = alerts.matches("- alert: ").count();
    let links: Vec<&str> = alerts
        .lines()
        .filter_map(|line| line.trim().strip_prefix("runbook_url: "))
        .collect();
    assert_eq!(links.len(), alert_count, "every alert links a runbook");
    for link in links {
        let file = link
            .split_once("/docs/runbooks/")
            .map(|(_, file)| file)
            .unwrap_or_else(|| panic!("{link} is not under docs/runbooks/"));
        assert!(
            runbooks.join(file).is_file(),
            "alerts.yml links docs/runbooks/{file}, which does not exist"
        );
        assert!(
            index.contains(&format!("({file})")),
            "docs/runbooks/README.md does not link {file}"
        );
    }
}

/// Relative markdown link targets (`](path)` or `](path#anchor)`) in a document, without anchors.
fn relative_links(markdown: &str) -> Vec<String> {
    markdown
        .split("](")
        .skip(1)
        .filter_map(|rest| rest.split_once(')').map(|(target, _)| target))
        .map(|target| target.split('#').next().unwrap_or_default().to_string())
        .filter(|target| {
            !target.is_empty() && !target.contains("://") && !target.starts_with("mailto:")
        })
        .collect()
}

#[test]
fn the_readme_links_every_guide_and_no_link_in_the_docs_is_broken() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let mut guides = Vec::new();
    for entry in std::fs::read_dir(root.join("docs")).expect("docs/") {
        let path = entry.expect("a docs entry").path();
        if path.extension().is_some_and(|ext| ext == "md") {
            guides.push(path);
        }
    }
    assert!(guides.len() >= 10, "{guides:?}");
    for guide in &guides {
        let name = guide
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        assert!(
            readme.contains(&format!("](docs/{name})")),
            "README.md does not link docs/{name}"
        );
    }
    let mut documents = vec![root.join("README.md"), root.join("infra/README.md")];
    documents.extend(guides);
    for runbook in std::fs::read_dir(root.join("docs/runbooks")).expect("docs/runbooks/") {
        documents.push(runbook.expect("a runbook").path());
    }
    let mut checked = 0;
    for document in documents {
        let text = std::fs::read_to_string(&document).expect("a document");
        let dir = document.parent().expect("a parent directory");
        for link in relative_links(&text) {
            assert!(
                dir.join(&link).exists(),
                "{} links {link}, which does not exist",
                document.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} relative links found");
}
