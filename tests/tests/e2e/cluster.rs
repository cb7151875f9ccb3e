//! A real three-node RabbitMQ cluster (`scripts/rabbitmq-cluster.sh`) under steady load: the
//! fleet (an api and two workers, ~50 jobs/s) is given every node's URL and quorum queues of
//! three members, then loses a node, and later the node leading the jobs queue. Every `202` job
//! ends `succeeded`, none is paid for twice, the api answers only `202` or `503` with
//! `Retry-After`, and it is back within 10 s of each fault (`docs/scaling.md`, "RabbitMQ nodes").

use std::time::{Duration, Instant};

use tests::harness::{Options, spawn_app_with};
use tests::load::{UnlimitedConfig, unbounded, while_loaded};
use tests::scripted::Scripted;

struct Cluster {
    setup: Scripted,
    urls: Vec<String>,
}

impl Cluster {
    async fn start() -> Self {
        // Three AMQP ports and their distribution ports (20,000 above), all free.
        let (setup, printed) = Scripted::start(
            "rabbitmq-cluster.sh",
            21_000,
            9_000,
            &[0, 1, 2, 20_000, 20_001, 20_002],
        )
        .await;
        let urls: Vec<String> = printed.lines().map(str::to_string).collect();
        assert_eq!(urls.len(), 3, "{printed}");
        Self { setup, urls }
    }

    async fn run(&self, args: &[&str]) -> String {
        self.setup.run(args).await
    }

    async fn leader(&self, queue: &str) -> usize {
        self.run(&["leader", queue]).await.parse().unwrap()
    }

    /// The node a connection named `name` is on.
    async fn node_of(&self, name: &str) -> usize {
        self.run(&["node-of", name]).await.parse().unwrap()
    }
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

    let drill = async {
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
        (lost_node, lost_leader, leader, api_node)
    };
    let (seen, (lost_node, lost_leader, leader, api_node)) =
        while_loaded(&app, 50, 20, drill).await;
    let summary = seen.assert_recovered(&[
        ("losing a node", lost_node),
        ("losing the queue's leader", lost_leader),
    ]);
    eprintln!("cluster: {summary}; the api was on node {api_node}, the leader on node {leader}");
    seen.assert_each_succeeded_once(&app, &images).await;
}
