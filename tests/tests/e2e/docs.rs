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
