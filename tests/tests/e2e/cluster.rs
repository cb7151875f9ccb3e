//! A real three-node RabbitMQ cluster (`scripts/rabbitmq-cluster.sh`) under steady load: the
//! fleet (an api and two workers, ~50 jobs/s) is given every node's URL and quorum queues of
//! three members, then loses a node, and later the node leading the jobs queue. Every `202` job
//! ends `succeeded`, none is paid for twice, the api answers only `202` or `503` with
//! `Retry-After`, and it is back within 10 s of each fault (`docs/scaling.md`, "RabbitMQ nodes").

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tests::harness::{ALICE, Options, spawn_app_with};
use tests::load::{Seen, UnlimitedConfig, post_jobs, unbounded};

struct Cluster {
    dir: PathBuf,
    urls: Vec<String>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join("rabbitmq-cluster.sh")
}

/// Whether `port` can be bound on loopback now.
fn free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

impl Cluster {
    async fn start() -> Self {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("pc{}", &unique[..8]));
        // Three AMQP ports and their distribution ports (20,000 above), all free.
        let base = (0..200)
            .map(|_| 21_000 + (rand_u16() % 9_000))
            .find(|base| (0..3).all(|n| free(base + n) && free(base + n + 20_000)))
            .expect("three free ports");
        let output = Self::run_in(&dir, &["start", &base.to_string()]).await;
        let urls: Vec<String> = output.lines().map(str::to_string).collect();
        assert_eq!(urls.len(), 3, "{output}");
        Self { dir, urls }
    }

    async fn run_in(dir: &Path, args: &[&str]) -> String {
        let mut command = tokio::process::Command::new("bash");
        command.arg(script()).arg(args[0]).arg(dir).args(&args[1..]);
        let output = command.output().await.expect("the cluster script runs");
        assert!(
            output.status.success(),
            "rabbitmq-cluster.sh {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    async fn run(&self, args: &[&str]) -> String {
        Self::run_in(&self.dir, args).await
    }

    async fn leader(&self, queue: &str) -> usize {
        self.run(&["leader", queue]).await.trim().parse().unwrap()
    }

    /// The node a connection named `name` is on.
    async fn node_of(&self, name: &str) -> usize {
        self.run(&["node-of", name]).await.trim().parse().unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

fn rand_u16() -> u16 {
    let bytes = uuid::Uuid::new_v4();
    u16::from_le_bytes([bytes.as_bytes()[0], bytes.as_bytes()[1]])
}

#[tokio::test]
async fn a_cluster_that_loses_a_node_and_then_the_queue_leader_under_load_loses_no_job_and_pays_none_twice()
 {
    let cluster = Cluster::start().await;
    let urls = cluster.urls.join(",");
    let app = spawn_app_with(Options::default(), |s| {
        s.amqp.url = urls.into();
        s.amqp.quorum_initial_group_size = 3;
        unbounded(s);
    })
    .await;
    // A second worker, a process of its own on the same node list.
    let limits = UnlimitedConfig::write();
    let _second_worker = app.worker_process(&[
        ("PICTOR_AMQP_URL", &cluster.urls.join(",")),
        ("PICTOR_QUORUM_INITIAL_GROUP_SIZE", "3"),
        ("PICTOR_CONFIG", limits.path()),
    ]);
    let openai = app.openai.as_ref().unwrap();
    openai
        .router_answers("create", 0.9, "a harbour", None)
        .await;
    let images = openai.images_generate_ok_after(Duration::ZERO).await;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(Mutex::new(false));
    let loader = {
        let (seen, stop) = (seen.clone(), stop.clone());
        let app = &app;
        async move { post_jobs(app, seen, 50, 20, stop).await }
    };
    let faults = async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        // 1. The node the api publishes through goes.
        let api_node = cluster.node_of("pictor-publisher").await.to_string();
        let lost_node = Instant::now();
        cluster.run(&["stop-node", &api_node]).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        cluster.run(&["start-node", &api_node]).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        // 2. The node leading the jobs queue goes.
        let leader = cluster.leader(&app.topology.jobs_queue).await;
        let lost_leader = Instant::now();
        cluster.run(&["stop-node", &leader.to_string()]).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        cluster.run(&["start-node", &leader.to_string()]).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        *stop.lock().unwrap() = true;
        (lost_node, lost_leader, leader, api_node)
    };
    let ((), (lost_node, lost_leader, leader, api_node)) = tokio::join!(loader, faults);

    let seen = Arc::into_inner(seen).unwrap().into_inner().unwrap();
    let others = seen.unexpected();
    assert!(
        others.is_empty(),
        "answers other than 202 and 503: {others:?}"
    );
    let end = Instant::now();
    for (fault, from, until) in [
        ("a node", lost_node, lost_leader),
        ("the queue's leader", lost_leader, end),
    ] {
        let gap = seen.longest_gap(from, until);
        assert!(
            gap < Duration::from_secs(10),
            "after losing {fault}, no job was accepted for {gap:?}"
        );
    }
    let refused = seen.answers.len() - seen.accepted.len();
    eprintln!(
        "cluster: {} answers, {} accepted, {refused} answered 503; the api was on node \
         {api_node}, the leader on node {leader}; longest gaps {:?} (node) and {:?} (leader)",
        seen.answers.len(),
        seen.accepted.len(),
        seen.longest_gap(lost_node, lost_leader),
        seen.longest_gap(lost_leader, end)
    );

    for id in &seen.accepted {
        let job = app.wait_until_terminal(ALICE, id).await;
        assert_eq!(job["status"], "succeeded", "{job:#}");
    }
    // One image call per accepted job: none was paid for twice, none was lost.
    assert_eq!(images.times().len(), seen.accepted.len());
}
