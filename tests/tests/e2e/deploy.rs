//! The deployment files say what the code does: `infra/compose.yaml`, `infra/Dockerfile` and
//! `infra/k8s/` are parsed and checked against the code's settings table, routes, ports and
//! queue topology, for what a person deploying Pictor would check by hand (no Docker engine or
//! cluster is needed).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// Every document of a YAML file, merge keys (`<<`) applied, as JSON values.
fn yaml_documents(path: &str) -> Vec<Value> {
    let text = read(path);
    yaml_serde::Deserializer::from_str(&text)
        .map(|document| {
            let mut value = yaml_serde::Value::deserialize(document)
                .unwrap_or_else(|error| panic!("{path}: {error}"));
            value.apply_merge().unwrap();
            serde_json::to_value(value).unwrap()
        })
        .filter(|value| !value.is_null())
        .collect()
}

fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Number(number) => number.to_string(),
        other => panic!("expected a scalar, got {other}"),
    }
}

/// A variable the process reads: the settings table, plus the few read outside it.
fn assert_known_variable(name: &str, context: &str) {
    let is_setting = shared::config::ENV_VARS.iter().any(|(var, _)| *var == name);
    let read_elsewhere = name == "PICTOR_CONFIG" || name == "RUST_LOG" || name.starts_with("AWS_");
    assert!(
        is_setting || read_elsewhere,
        "{context} sets {name}, which no Pictor process reads (not in shared::config::ENV_VARS)"
    );
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// Each role and the variable of its HTTP listener's address.
const ROLES: [(&str, &str); 3] = [
    ("api", "PICTOR_API_ADDR"),
    ("worker", "PICTOR_WORKER_METRICS_ADDR"),
    ("scheduler", "PICTOR_SCHEDULER_METRICS_ADDR"),
];

/// Each role and the variable of the address Prometheus scrapes (the api's is private, apart
/// from its public port).
const METRICS_LISTENERS: [(&str, &str); 3] = [
    ("api", "PICTOR_API_METRICS_ADDR"),
    ("worker", "PICTOR_WORKER_METRICS_ADDR"),
    ("scheduler", "PICTOR_SCHEDULER_METRICS_ADDR"),
];

fn seconds(duration: &str) -> u64 {
    let duration = duration.trim();
    if let Some(minutes) = duration.strip_suffix('m') {
        return minutes.parse::<u64>().unwrap() * 60;
    }
    duration.trim_end_matches('s').parse().unwrap()
}

#[test]
fn the_compose_file_runs_every_role_against_durable_infrastructure() {
    let compose = yaml_documents("infra/compose.yaml").remove(0);
    let services = &compose["services"];
    for service in [
        "rabbitmq",
        "redis",
        "api",
        "worker",
        "scheduler",
        "prometheus",
        "grafana",
    ] {
        assert!(
            services[service].is_object(),
            "compose lacks the {service} service"
        );
    }

    // Redis persists: AOF on a volume, and never evicts job state.
    let redis = &services["redis"];
    let command = redis["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(text)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(command.contains("--appendonly yes"), "{command}");
    assert!(
        command.contains("--maxmemory-policy noeviction"),
        "{command}"
    );
    assert!(
        redis["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|volume| text(volume).ends_with(":/data")),
        "redis keeps its data on a volume"
    );
    assert!(
        services["rabbitmq"]["image"]
            .as_str()
            .unwrap()
            .contains("management")
    );

    for (role, addr_var) in ROLES {
        let service = &services[role];
        assert_eq!(service["command"][0], role, "{role} runs `pictor {role}`");
        let dockerfile = repo()
            .join("infra")
            .join(service["build"]["context"].as_str().unwrap())
            .join(service["build"]["dockerfile"].as_str().unwrap());
        assert!(
            dockerfile.is_file(),
            "{role} builds {}",
            dockerfile.display()
        );
        for dependency in ["rabbitmq", "redis"] {
            assert_eq!(
                service["depends_on"][dependency]["condition"], "service_healthy",
                "{role} waits for {dependency}"
            );
        }
        let environment = service["environment"].as_object().unwrap();
        for name in environment.keys() {
            assert_known_variable(name, &format!("compose service {role}"));
        }
        assert!(text(&environment["PICTOR_AMQP_URL"]).contains("@rabbitmq:5672/"));
        assert_eq!(text(&environment["PICTOR_REDIS_URL"]), "redis://redis:6379");
        let port = port_of(&text(&environment[addr_var]));
        let check = service["healthcheck"]["test"]
            .as_array()
            .unwrap()
            .iter()
            .map(text)
            .collect::<Vec<_>>();
        assert_eq!(
            check,
            ["CMD", "pictor-healthcheck", &port.to_string()],
            "{role}'s health check asks its own port"
        );
    }
    assert!(
        services["api"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|port| text(port) == "8080:8080")
    );

    // Workers: scaled, and given time to drain (up to two graces, see infra/compose.yaml).
    let worker = &services["worker"];
    assert!(worker["deploy"]["replicas"].as_u64().unwrap() >= 2);
    let grace: u64 = text(&worker["environment"]["PICTOR_WORKER_SHUTDOWN_GRACE_SECS"])
        .parse()
        .unwrap();
    let stop = seconds(worker["stop_grace_period"].as_str().unwrap());
    assert!(
        stop > 2 * grace,
        "stop_grace_period {stop}s for a grace of {grace}s"
    );

    // Files mounted from the repository exist.
    for service in services.as_object().unwrap().values() {
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let volume = text(volume);
            if let Some(path) = volume.strip_prefix("./") {
                let source = path.split(':').next().unwrap();
                assert!(
                    repo().join("infra").join(source).exists(),
                    "compose mounts infra/{source}, which does not exist"
                );
            }
        }
    }
}

#[test]
fn the_compose_monitoring_scrapes_every_role_and_shows_the_dashboard() {
    let compose = yaml_documents("infra/compose.yaml").remove(0);
    let services = &compose["services"];
    let config = yaml_documents("infra/prometheus/prometheus.compose.yml").remove(0);
    assert_eq!(config["rule_files"][0], "alerts.yml");
    let jobs = config["scrape_configs"].as_array().unwrap();
    let job = |name: &str| {
        jobs.iter()
            .find(|job| job["job_name"] == name)
            .unwrap_or_else(|| panic!("no scrape job {name}"))
    };
    for (role, addr_var) in METRICS_LISTENERS {
        let port = port_of(&text(&services[role]["environment"][addr_var]));
        let scrape = job(&format!("pictor-{role}"));
        assert_eq!(scrape["metrics_path"], "/metrics");
        let target = if role == "worker" {
            let discovery = &scrape["dns_sd_configs"][0];
            assert_eq!(discovery["names"][0], role);
            format!("{role}:{}", discovery["port"])
        } else {
            text(&scrape["static_configs"][0]["targets"][0])
        };
        assert_eq!(target, format!("{role}:{port}"), "scrape target of {role}");
    }

    let grafana = &services["grafana"];
    let mounts: Vec<String> = grafana["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(text)
        .collect();
    let dashboard_dir = mounts
        .iter()
        .find_map(|mount| mount.strip_prefix("./grafana/pictor.json:"))
        .map(|target| {
            target
                .trim_end_matches(":ro")
                .trim_end_matches("/pictor.json")
        })
        .expect("grafana mounts infra/grafana/pictor.json");
    let provider = yaml_documents("infra/grafana/provisioning/dashboards/pictor.yml").remove(0);
    assert_eq!(provider["providers"][0]["options"]["path"], dashboard_dir);
    let datasource =
        yaml_documents("infra/grafana/provisioning/datasources/prometheus.yml").remove(0);
    assert_eq!(
        datasource["datasources"][0]["url"],
        "http://prometheus:9090"
    );
    // A provisioned dashboard is not imported, so `${DS_PROMETHEUS}` must be a dashboard
    // variable for its panels to find the data source.
    let dashboard: Value = serde_json::from_str(&read("infra/grafana/pictor.json")).unwrap();
    assert!(
        dashboard["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .any(|variable| variable["name"] == "DS_PROMETHEUS" && variable["type"] == "datasource")
    );
}

#[test]
fn the_image_runs_pictor_as_a_non_root_user_with_known_settings() {
    let dockerfile = read("infra/Dockerfile");
    let runtime = dockerfile
        .rsplit_once("\nFROM ")
        .map(|(_, last)| last)
        .unwrap();
    assert!(runtime.contains("ENTRYPOINT [\"pictor\"]"));
    assert!(runtime.contains("HEALTHCHECK"));
    assert!(runtime.contains("ca-certificates"));
    let user = runtime
        .lines()
        .find_map(|line| line.strip_prefix("USER "))
        .expect("the runtime stage names a user");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "USER {user}"
    );
    // ENV lines (with continuations) set only variables Pictor reads.
    let env_block: String = runtime
        .split("\nENV ")
        .skip(1)
        .map(|block| block.split("\n\n").next().unwrap().replace("\\\n", " "))
        .collect::<Vec<_>>()
        .join(" ");
    let pairs: Vec<(&str, &str)> = env_block
        .split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .collect();
    assert!(pairs.len() >= 4, "{pairs:?}");
    for (name, _) in &pairs {
        assert_known_variable(name, "infra/Dockerfile");
    }
    let exposed: Vec<u16> = runtime
        .lines()
        .filter_map(|line| line.strip_prefix("EXPOSE "))
        .flat_map(|ports| ports.split_whitespace().map(|port| port.parse().unwrap()))
        .collect();
    for (_, addr_var) in ROLES {
        let addr = pairs
            .iter()
            .find(|(name, _)| name == &addr_var)
            .map(|(_, addr)| *addr)
            .unwrap_or_else(|| panic!("the image sets {addr_var}"));
        assert!(
            addr.starts_with("0.0.0.0:"),
            "{addr_var}={addr} listens outside the container"
        );
        assert!(exposed.contains(&port_of(addr)), "the image exposes {addr}");
    }
    for line in dockerfile.lines() {
        if let Some(source) = line.strip_prefix("COPY infra/") {
            let source = source.split_whitespace().next().unwrap();
            assert!(
                repo().join("infra").join(source).is_file(),
                "COPY infra/{source}"
            );
        }
    }
    let ignore = read(".dockerignore");
    for excluded in ["target", ".git", ".env"] {
        assert!(
            ignore.lines().any(|line| line.trim() == excluded),
            "{excluded}"
        );
    }
}

/// All Kubernetes objects of `infra/k8s`, checking the kustomization lists every file.
fn k8s_objects() -> Vec<Value> {
    let kustomization = yaml_documents("infra/k8s/kustomization.yaml").remove(0);
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(text)
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(repo().join("infra/k8s"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "kustomization.yaml lists every manifest");
    listed
        .iter()
        .flat_map(|file| yaml_documents(&format!("infra/k8s/{file}")))
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|object| object["kind"] == kind && object["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in infra/k8s"))
}

#[test]
fn the_kubernetes_manifests_probe_real_routes_and_read_known_settings() {
    let objects = k8s_objects();
    let config = &find(&objects, "ConfigMap", "pictor-config")["data"];
    let secret = &find(&objects, "Secret", "pictor-secrets")["stringData"];
    for (name, _) in config.as_object().unwrap() {
        assert_known_variable(name, "the ConfigMap");
    }
    for (name, _) in secret.as_object().unwrap() {
        if name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            assert_known_variable(name, "the Secret");
        }
    }
    for key in [
        "PICTOR_AMQP_URL",
        "PICTOR_REDIS_URL",
        "OPENAI_API_KEY",
        "GEMINI_API_KEY",
    ] {
        assert!(secret[key].is_string(), "{key} is a Secret");
        assert!(config[key].is_null(), "{key} must not be in the ConfigMap");
    }

    for (role, addr_var) in ROLES {
        let deployment = find(&objects, "Deployment", &format!("pictor-{role}"));
        let pod = &deployment["spec"]["template"];
        let labels = &pod["metadata"]["labels"];
        for (key, value) in deployment["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap()
        {
            assert_eq!(&labels[key], value, "{role}: selector matches the pod");
        }
        let container = &pod["spec"]["containers"][0];
        assert_eq!(container["args"][0], role);
        let env = container["env"].as_array().unwrap();
        for variable in env {
            assert_known_variable(variable["name"].as_str().unwrap(), role);
        }
        let addr = env
            .iter()
            .find(|variable| variable["name"] == addr_var)
            .unwrap_or_else(|| panic!("{role} sets {addr_var}"));
        let port = port_of(addr["value"].as_str().unwrap());
        let sources: Vec<&Value> = container["envFrom"].as_array().unwrap().iter().collect();
        assert!(
            sources
                .iter()
                .any(|s| s["configMapRef"]["name"] == "pictor-config")
        );
        assert!(
            sources
                .iter()
                .any(|s| s["secretRef"]["name"] == "pictor-secrets")
        );
        for probe in ["readinessProbe", "livenessProbe"] {
            let Some(get) = container[probe]["httpGet"].as_object() else {
                assert!(role != "api", "the api has a {probe}");
                continue;
            };
            let named = get["port"].as_str().unwrap();
            let declared = container["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == named)
                .unwrap_or_else(|| panic!("{role}: probe port {named} is not declared"));
            assert_eq!(
                declared["containerPort"], port,
                "{role}: {named} is {addr_var}"
            );
        }
        assert!(container["livenessProbe"]["httpGet"]["path"] == "/healthz");
        for bound in ["requests", "limits"] {
            assert!(
                container["resources"][bound]["memory"].is_string(),
                "{role} has memory {bound}"
            );
        }
        assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
    }
    let api = find(&objects, "Deployment", "pictor-api");
    let api_container = &api["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        api_container["readinessProbe"]["httpGet"]["path"],
        "/readyz"
    );
    let pdb = find(&objects, "PodDisruptionBudget", "pictor-api");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        api["spec"]["selector"]["matchLabels"]
    );
    let service = find(&objects, "Service", "pictor-api");
    assert_eq!(
        service["spec"]["selector"],
        api["spec"]["selector"]["matchLabels"]
    );

    // A worker is killed only after its drain can have ended (up to two graces).
    let worker = find(&objects, "Deployment", "pictor-worker");
    let grace: u64 = text(&config["PICTOR_WORKER_SHUTDOWN_GRACE_SECS"])
        .parse()
        .unwrap();
    let termination = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        termination > 2 * grace,
        "{termination}s for a grace of {grace}s"
    );
    let scheduler = find(&objects, "Deployment", "pictor-scheduler");
    assert_eq!(scheduler["spec"]["replicas"], 1);
}

#[test]
fn keda_scales_the_workers_on_the_real_work_queue() {
    let objects = k8s_objects();
    let config = &find(&objects, "ConfigMap", "pictor-config")["data"];
    let secret = &find(&objects, "Secret", "pictor-secrets")["stringData"];
    let scaled = find(&objects, "ScaledObject", "pictor-worker");
    let target = &scaled["spec"]["scaleTargetRef"];
    assert_eq!(target["kind"], "Deployment");
    find(&objects, "Deployment", target["name"].as_str().unwrap());
    assert!(scaled["spec"]["minReplicaCount"].as_u64().unwrap() >= 2);
    assert!(
        scaled["spec"]["maxReplicaCount"].as_u64().unwrap()
            > scaled["spec"]["minReplicaCount"].as_u64().unwrap()
    );

    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "rabbitmq");
    let mut settings = shared::config::Settings::defaults().unwrap();
    settings.amqp.queue_prefix = text(&config["PICTOR_QUEUE_PREFIX"]);
    let topology = shared::queue::Topology::new(&settings.amqp);
    assert_eq!(
        trigger["metadata"]["queueName"],
        topology.jobs_queue.as_str()
    );
    assert_eq!(trigger["metadata"]["mode"], "QueueLength");
    let value: f64 = text(&trigger["metadata"]["value"]).parse().unwrap();
    assert!(value > 0.0);

    let auth_name = trigger["authenticationRef"]["name"].as_str().unwrap();
    let auth = find(&objects, "TriggerAuthentication", auth_name);
    let reference = &auth["spec"]["secretTargetRef"][0];
    assert_eq!(reference["parameter"], "host");
    assert_eq!(reference["name"], "pictor-secrets");
    assert!(secret[reference["key"].as_str().unwrap()].is_string());
}

/// Every path a deployment file asks of a role: the Kubernetes probes, the Prometheus scrape
/// path and the container health check's `/healthz`.
fn probed_paths() -> Vec<(&'static str, String)> {
    let objects = k8s_objects();
    let mut paths = BTreeSet::new();
    for (role, _) in ROLES {
        let deployment = find(&objects, "Deployment", &format!("pictor-{role}"));
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
            if let Some(path) = container[probe]["httpGet"]["path"].as_str() {
                paths.insert((role, path.to_string()));
            }
        }
        paths.insert((role, "/metrics".to_string()));
    }
    assert!(read("infra/healthcheck.sh").contains("GET /healthz HTTP/1.0"));
    for (role, _) in ROLES {
        paths.insert((role, "/healthz".to_string()));
    }
    paths.into_iter().collect()
}

/// `pictor scheduler` on this app's Redis, serving its metrics on a free port.
struct SchedulerProcess {
    child: std::process::Child,
    outbox: PathBuf,
}

impl Drop for SchedulerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.outbox);
    }
}

#[tokio::test]
async fn every_path_the_deployment_files_probe_answers_200_from_its_role() {
    let app = tests::harness::spawn_app_with(
        tests::harness::Options {
            worker: false,
            mock_providers: false,
            ..tests::harness::Options::default()
        },
        |_| {},
    )
    .await;
    // The api's metrics are scraped on their own listener (PICTOR_API_METRICS_ADDR), apart
    // from its public port.
    let api_metrics = format!("127.0.0.1:{}", tests::harness::free_port());
    let api = app
        .spawn_process("api", &[("PICTOR_API_METRICS_ADDR", api_metrics.clone())])
        .await;
    let api_metrics = format!("http://{api_metrics}");
    let worker = app.spawn_process("worker", &[]).await;
    let port = tests::harness::free_port();
    let outbox = std::env::temp_dir().join(format!("pictor-deploy-{}", uuid::Uuid::new_v4()));
    let _scheduler = SchedulerProcess {
        child: std::process::Command::new(tests::harness::workspace_binary("pictor"))
            .arg("scheduler")
            .envs(app.worker_env())
            .env("PICTOR_SCHEDULER_METRICS_ADDR", format!("127.0.0.1:{port}"))
            .env("PICTOR_OUTBOX_DIR", &outbox)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
        outbox,
    };
    let scheduler_base = format!("http://127.0.0.1:{port}");
    for (role, path) in probed_paths() {
        let base = match role {
            "api" if path == "/metrics" => &api_metrics,
            "api" => &api.base,
            "worker" => &worker.base,
            _ => &scheduler_base,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let answer = app.client.get(format!("{base}{path}")).send().await;
            if let Ok(response) = &answer
                && response.status() == reqwest::StatusCode::OK
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pictor {role} does not answer {path} with 200: {answer:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

/// Compose's variable interpolation (the Compose specification's rules for `${NAME}`,
/// `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}` and `${NAME?error}`; `$$` is a
/// literal `$`), applied to every string of the parsed compose file in `environment`: what
/// `docker compose up` would run with, or the error it would stop with.
fn resolve(value: &Value, environment: &[(&str, &str)]) -> Result<Value, String> {
    Ok(match value {
        Value::String(text) => Value::String(interpolate(text, environment)?),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| resolve(item, environment))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(key, item)| Ok((key.clone(), resolve(item, environment)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

fn interpolate(text: &str, environment: &[(&str, &str)]) -> Result<String, String> {
    let lookup = |name: &str| {
        environment
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| *value)
    };
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
            continue;
        }
        let Some(body) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let end = body.find('}').expect("a closed ${...}");
        let expression = &body[..end];
        rest = &body[end + 1..];
        let split = expression
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(expression.len());
        let (name, modifier) = expression.split_at(split);
        let value = lookup(name);
        let value = if let Some(default) = modifier.strip_prefix(":-") {
            value
                .filter(|v| !v.is_empty())
                .unwrap_or(default)
                .to_string()
        } else if let Some(default) = modifier.strip_prefix('-') {
            value.unwrap_or(default).to_string()
        } else if let Some(message) = modifier.strip_prefix(":?") {
            match value.filter(|v| !v.is_empty()) {
                Some(value) => value.to_string(),
                None => return Err(format!("{name}: {message}")),
            }
        } else if let Some(message) = modifier.strip_prefix('?') {
            value
                .ok_or_else(|| format!("{name}: {message}"))?
                .to_string()
        } else {
            value.unwrap_or_default().to_string()
        };
        out.push_str(&value);
    }
    out.push_str(rest);
    Ok(out)
}

#[test]
fn the_compose_deployment_refuses_to_start_without_the_operators_secrets() {
    let compose = yaml_documents("infra/compose.yaml").remove(0);
    let secrets = [
        ("PICTOR_API_KEYS", "app:user:s3cr3t-app,ops:ops:s3cr3t-ops"),
        ("RABBITMQ_PASSWORD", "s3cr3t-broker"),
        ("GRAFANA_ADMIN_PASSWORD", "s3cr3t-grafana"),
    ];
    // Each secret missing, or set to an empty string (a `.env` line left blank), stops it.
    for (missing, _) in secrets {
        let others: Vec<(&str, &str)> = secrets
            .iter()
            .copied()
            .filter(|(name, _)| *name != missing)
            .collect();
        let error = resolve(&compose, &others).expect_err(missing);
        assert!(error.starts_with(missing), "{error}");
        let mut blank = others.clone();
        blank.push((missing, ""));
        let error = resolve(&compose, &blank).expect_err(missing);
        assert!(error.starts_with(missing), "{error}");
    }
    // With them set, the deployment runs on exactly what the operator gave.
    let document = resolve(&compose, &secrets).unwrap();
    let services = &document["services"];
    assert_eq!(
        text(&services["api"]["environment"]["PICTOR_API_KEYS"]),
        "app:user:s3cr3t-app,ops:ops:s3cr3t-ops"
    );
    assert_eq!(
        text(&services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_PASS"]),
        "s3cr3t-broker"
    );
    assert_eq!(
        text(&services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]),
        "s3cr3t-grafana"
    );
    let text_of_file = read("infra/compose.yaml");
    for known in ["demo-key", "ops-key", "admin/admin", ":-guest", ":-admin"] {
        assert!(!text_of_file.contains(known), "compose ships {known}");
    }

    // Only the api is published beyond this host; everything else on loopback, if at all.
    for (name, service) in services.as_object().unwrap() {
        for port in service["ports"].as_array().into_iter().flatten() {
            let port = text(port);
            if name == "api" {
                continue;
            }
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name} publishes {port} on every interface"
            );
        }
    }
}

/// A command's output, failing the test with its stderr when it fails.
fn run_tool(program: &str, args: &[&str]) -> String {
    let output = std::process::Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|error| {
            panic!("{program} does not run ({error}); scripts/services.sh installs it")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "{program} {}: {text}",
        args.join(" ")
    );
    text
}

#[test]
fn the_compose_alertmanager_gets_prometheus_alerts_and_the_schedulers_channels() {
    let compose = yaml_documents("infra/compose.yaml").remove(0);
    let services = &compose["services"];
    let alertmanager = &services["alertmanager"];
    let command: Vec<String> = alertmanager["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(text)
        .collect();
    let mounted = alertmanager["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(text)
        .find_map(|volume| {
            volume
                .strip_prefix("./alertmanager/alertmanager.yml:")
                .map(|target| target.trim_end_matches(":ro").to_string())
        })
        .expect("compose mounts infra/alertmanager/alertmanager.yml");
    assert!(
        command.contains(&format!("--config.file={mounted}")),
        "{command:?}"
    );
    assert!(command.contains(&"--cluster.listen-address=".to_string()));
    // Prometheus sends its alerts there.
    let prometheus = yaml_documents("infra/prometheus/prometheus.compose.yml").remove(0);
    assert_eq!(
        prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0],
        "alertmanager:9093"
    );
    assert!(
        alertmanager["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|port| text(port).ends_with(":9093"))
    );

    // Every secret file the config reads is a compose secret, made from the variable that
    // holds it for the scheduler (the Slack webhook) or from infra/.env (the SMTP password).
    let config = yaml_documents("infra/alertmanager/alertmanager.yml").remove(0);
    let secrets: Vec<String> = alertmanager["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(text)
        .collect();
    for (key, variable) in [
        ("slack_api_url_file", "PICTOR_SLACK_WEBHOOK_URL"),
        ("smtp_auth_password_file", "ALERTMANAGER_SMTP_PASSWORD"),
    ] {
        let file = text(&config["global"][key]);
        let name = file
            .strip_prefix("/run/secrets/")
            .unwrap_or_else(|| panic!("{key} {file} is not a compose secret"));
        assert!(secrets.iter().any(|secret| secret == name), "{name}");
        assert_eq!(compose["secrets"][name]["environment"], variable);
    }
    assert!(services["scheduler"]["environment"]["PICTOR_SLACK_WEBHOOK_URL"].is_string());
    assert!(read("infra/.env.example").contains("ALERTMANAGER_SMTP_PASSWORD"));

    // The shipped config is one Alertmanager loads, and so is Prometheus's.
    let checked = run_tool(
        "amtool",
        &["check-config", "infra/alertmanager/alertmanager.yml"],
    );
    assert!(checked.contains("SUCCESS"), "{checked}");
    run_tool(
        "promtool",
        &[
            "check",
            "config",
            "--syntax-only",
            "infra/prometheus/prometheus.compose.yml",
        ],
    );
}

#[test]
fn compose_and_kubernetes_trace_jobs_to_openai_exactly_when_a_key_is_set() {
    let secrets = [
        ("PICTOR_API_KEYS", "app:user:s3cr3t-app"),
        ("RABBITMQ_PASSWORD", "s3cr3t-broker"),
        ("GRAFANA_ADMIN_PASSWORD", "s3cr3t-grafana"),
    ];
    let compose = yaml_documents("infra/compose.yaml").remove(0);
    let k8s = k8s_objects();
    let config_map = find(&k8s, "ConfigMap", "pictor-config")["data"].clone();
    for key in ["", "sk-test"] {
        let mut environment = secrets.to_vec();
        environment.push(("OPENAI_API_KEY", key));
        let document = resolve(&compose, &environment).unwrap();
        let worker = document["services"]["worker"]["environment"]
            .as_object()
            .unwrap();
        let env: std::collections::HashMap<String, String> = worker
            .iter()
            .map(|(name, value)| (name.clone(), text(value)))
            .collect();
        let settings = shared::config::Settings::from_layers(None, &env).unwrap();
        assert_eq!(
            settings.traces.openai_enabled,
            !key.is_empty(),
            "compose worker with OPENAI_API_KEY={key:?}"
        );
        assert!(settings.traces.redact, "traces are redacted by default");
        assert!(settings.traces.otlp_endpoint.is_none(), "OTLP is opt-in");

        let mut env: std::collections::HashMap<String, String> = config_map
            .as_object()
            .unwrap()
            .iter()
            .map(|(name, value)| (name.clone(), text(value)))
            .collect();
        env.insert("OPENAI_API_KEY".into(), key.into());
        env.remove("PICTOR_API_KEYS_FILE");
        let settings = shared::config::Settings::from_layers(None, &env).unwrap();
        assert_eq!(
            settings.traces.openai_enabled,
            !key.is_empty(),
            "k8s worker with OPENAI_API_KEY={key:?}"
        );
        assert!(settings.traces.redact);
    }
}

/// Adds `additionalProperties: false` to every object schema that lists its properties and
/// keeps no unknown fields: what the API server's strict field validation (kubectl's default)
/// does with a field the CRD does not know.
fn strict(schema: &mut Value) {
    if let Value::Object(fields) = schema {
        if fields.contains_key("properties")
            && !fields.contains_key("additionalProperties")
            && fields.get("x-kubernetes-preserve-unknown-fields") != Some(&Value::Bool(true))
        {
            fields.insert("additionalProperties".into(), Value::Bool(false));
        }
        for value in fields.values_mut() {
            strict(value);
        }
    } else if let Value::Array(items) = schema {
        items.iter_mut().for_each(strict);
    }
}

/// The vendored CRD schema `tests/fixtures/prometheus-operator/{name}`, made strict.
fn crd_schema(name: &str) -> Value {
    let mut schema =
        yaml_documents(&format!("tests/fixtures/prometheus-operator/{name}")).remove(0);
    strict(&mut schema);
    schema
}

fn assert_valid(schema: &Value, instance: &Value, what: &str) {
    let validator = jsonschema::validator_for(schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|error| format!("{}: {error}", error.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} breaks its CRD schema: {errors:#?}"
    );
}

/// The objects of the optional monitoring kustomization, checking it lists every file.
fn monitoring_objects() -> Vec<Value> {
    let kustomization = yaml_documents("infra/k8s/monitoring/kustomization.yaml").remove(0);
    assert_eq!(kustomization["namespace"], "pictor");
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(text)
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(repo().join("infra/k8s/monitoring"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, present,
        "monitoring/kustomization.yaml lists every file"
    );
    let main = yaml_documents("infra/k8s/kustomization.yaml").remove(0);
    assert!(
        !main["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|resource| text(resource).contains("monitoring")),
        "the operator's resources stay out of `kubectl apply -k infra/k8s`"
    );
    listed
        .iter()
        .flat_map(|file| yaml_documents(&format!("infra/k8s/monitoring/{file}")))
        .collect()
}

#[test]
fn the_monitoring_resources_are_generated_from_the_shipped_configs() {
    use tests::monitoring::{
        ALERTMANAGER_CONFIG, PROMETHEUS_RULE, REGENERATE, alertmanager_config, prometheus_rule,
    };
    let regenerate = std::env::var("PICTOR_REGENERATE").is_ok_and(|value| value == "1");
    let mut stale = Vec::new();
    for ((target, source), generate) in [
        (PROMETHEUS_RULE, prometheus_rule as fn(&str) -> String),
        (ALERTMANAGER_CONFIG, alertmanager_config),
    ] {
        let wanted = generate(&read(source));
        let path = repo().join(target);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed == wanted {
            continue;
        }
        if regenerate {
            std::fs::write(&path, &wanted).unwrap();
        } else {
            stale.push(format!("{target} (from {source})"));
        }
    }
    assert!(
        stale.is_empty(),
        "{} out of date with its source; regenerate with\n  {REGENERATE}\nand commit the result",
        stale.join(", ")
    );
}

#[test]
fn the_prometheus_rule_holds_the_alert_rules_and_passes_promtool_and_its_crd_schema() {
    let objects = monitoring_objects();
    let rule = find(&objects, "PrometheusRule", "pictor");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    let alerts = yaml_documents("infra/prometheus/alerts.yml").remove(0);
    assert_eq!(
        rule["spec"]["groups"], alerts["groups"],
        "the PrometheusRule's groups are alerts.yml's"
    );
    assert_valid(
        &crd_schema("prometheusrules.v1.schema.yaml"),
        rule,
        "prometheus-rule.yaml",
    );
    // What the operator hands Prometheus is the spec as a rule file: promtool checks it.
    let file = std::env::temp_dir().join(format!("pictor-rule-{}.yml", uuid::Uuid::new_v4()));
    std::fs::write(&file, serde_json::to_string(&rule["spec"]).unwrap()).unwrap();
    let checked = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool runs (scripts/services.sh installs it)");
    let _ = std::fs::remove_file(&file);
    let out = String::from_utf8_lossy(&checked.stdout).into_owned()
        + &String::from_utf8_lossy(&checked.stderr);
    assert!(checked.status.success(), "promtool check rules: {out}");
    let count = alerts["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|group| group["rules"].as_array().unwrap().len())
        .sum::<usize>();
    assert!(
        out.contains(&format!("SUCCESS: {count} rules found")),
        "{out}"
    );
}

#[test]
fn the_alertmanager_config_routes_like_the_shipped_one_and_passes_its_crd_schema() {
    let objects = monitoring_objects();
    let resource = find(&objects, "AlertmanagerConfig", "pictor");
    assert_eq!(resource["apiVersion"], "monitoring.coreos.com/v1alpha1");
    let schema = crd_schema("alertmanagerconfigs.v1alpha1.schema.yaml");
    assert_valid(&schema, resource, "alertmanager-config.yaml");
    // Child routes are kept as raw JSON by the CRD and parsed by the operator as routes: each
    // must be a valid route too.
    let route_schema = &schema["properties"]["spec"]["properties"]["route"];
    let spec = &resource["spec"];
    let mut pending = vec![spec["route"].clone()];
    let mut receivers_routed = BTreeSet::new();
    while let Some(route) = pending.pop() {
        assert_valid(route_schema, &route, "a route of alertmanager-config.yaml");
        receivers_routed.insert(text(&route["receiver"]));
        pending.extend(route["routes"].as_array().into_iter().flatten().cloned());
    }
    let receivers: BTreeSet<String> = spec["receivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|receiver| text(&receiver["name"]))
        .collect();
    assert_eq!(receivers_routed, receivers, "every receiver is routed to");

    // The same inhibitions and receivers as the Alertmanager of compose.
    let shipped = yaml_documents("infra/alertmanager/alertmanager.yml").remove(0);
    assert_eq!(
        spec["inhibitRules"].as_array().unwrap().len(),
        shipped["inhibit_rules"].as_array().unwrap().len()
    );
    assert_eq!(
        spec["route"]["groupBy"], shipped["route"]["group_by"],
        "same grouping"
    );
    let inhibits_budget = spec["inhibitRules"].as_array().unwrap().iter().any(|rule| {
        rule["sourceMatch"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "alertname" && m["value"] == "PictorBudgetExhausted")
            && rule["targetMatch"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["name"] == "alertname" && m["value"] == "PictorBudget80Percent")
    });
    assert!(inhibits_budget);

    // Its secrets are keys of the Secret the scheduler reads: the same Slack webhook.
    let k8s = k8s_objects();
    let secret = &find(&k8s, "Secret", tests::monitoring::SECRET)["stringData"];
    for receiver in spec["receivers"].as_array().unwrap() {
        for slack in receiver["slackConfigs"].as_array().into_iter().flatten() {
            assert_eq!(slack["apiURL"]["name"], tests::monitoring::SECRET);
            assert_eq!(slack["apiURL"]["key"], "PICTOR_SLACK_WEBHOOK_URL");
            assert_eq!(slack["sendResolved"], true);
            assert!(text(&slack["text"]).contains("runbook_url"));
        }
        for email in receiver["emailConfigs"].as_array().into_iter().flatten() {
            let key = text(&email["authPassword"]["key"]);
            assert!(secret[&key].is_string(), "secret.yaml lacks {key}");
            assert_eq!(email["sendResolved"], true);
        }
    }
}

#[test]
fn the_compose_file_follows_the_compose_specification() {
    let schema = yaml_documents("tests/fixtures/compose-spec/compose-spec.json").remove(0);
    let compose = yaml_documents("infra/compose.yaml").remove(0);
    let validator = jsonschema::options()
        .should_validate_formats(false)
        .build(&schema)
        .unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&compose)
        .map(|error| format!("{}: {error}", error.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "infra/compose.yaml breaks the Compose Specification: {errors:#?}"
    );
}
