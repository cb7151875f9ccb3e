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

/// Codes in backticks on the `//! |` table rows of a source file.
fn table_codes(source: &str) -> Vec<String> {
    source
        .lines()
        .filter(|line| line.starts_with("//! |"))
        .filter_map(|line| line.split('`').nth(1).map(str::to_string))
        .filter(|code| code.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect()
}

#[test]
fn the_error_guide_explains_every_api_error_code_and_every_notice() {
    let guide = include_str!("../../../docs/error-handling.md");
    let api_codes = table_codes(include_str!("../../../api/src/error.rs"));
    assert!(api_codes.len() > 20, "{api_codes:?}");
    for code in api_codes {
        assert!(
            guide.contains(&format!("`{code}`")),
            "docs/error-handling.md lacks {code}"
        );
    }
    let sources = [
        include_str!("../../../worker/src/agents/mod.rs"),
        include_str!("../../../worker/src/agents/edit.rs"),
        include_str!("../../../worker/src/pipeline.rs"),
        include_str!("../../../worker/src/watchdog.rs"),
        include_str!("../../../api/src/jobs.rs"),
        include_str!("../../../shared/src/dlq.rs"),
    ];
    for source in sources {
        for piece in source.split("Notice::now(").skip(1) {
            let code = piece
                .trim_start()
                .trim_start_matches('"')
                .split('"')
                .next()
                .unwrap();
            assert!(
                guide.contains(&format!("`{code}`")),
                "docs/error-handling.md lacks the notice {code}"
            );
        }
    }
}
