//! The peer of scenario 8: the same service built on Fastify + BullMQ (`bench/peer/`, a few
//! small `.js` files and an exactly pinned `package-lock.json`), installed with `npm ci` into
//! `target/bench-peer/` and run as two `node` processes, api and worker, against the same Redis
//! and mock as Pictor, on a Redis prefix and image directory of their own, deleted afterwards.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;

use crate::fleet::{KEY, Process, free_port};

/// Where `npm ci` put the peer: the directory holding its `.js` files and `node_modules`.
pub struct PeerInstall {
    dir: PathBuf,
}

/// Copies `bench/peer/` into `target/bench-peer/` and runs `npm ci` there unless the lock file
/// it last installed is the same as the source's (so a second run does not reach the
/// registry). The `.js` files are copied every time.
pub fn install() -> anyhow::Result<PeerInstall> {
    let root = crate::workspace_root();
    let source = root.join("bench").join("peer");
    let dir = root.join("target").join("bench-peer");
    std::fs::create_dir_all(&dir)?;
    for entry in
        std::fs::read_dir(&source).with_context(|| format!("cannot read {}", source.display()))?
    {
        let path = entry?.path();
        if path
            .extension()
            .is_some_and(|ext| ext == "js" || ext == "json")
        {
            std::fs::copy(&path, dir.join(path.file_name().unwrap_or_default()))?;
        }
    }
    let lock = std::fs::read(source.join("package-lock.json"))?;
    let stamp = dir.join(".installed-package-lock.json");
    let up_to_date = std::fs::read(&stamp).is_ok_and(|installed| installed == lock)
        && dir.join("node_modules").is_dir();
    if !up_to_date {
        println!("installing the peer (npm ci in {})…", dir.display());
        let status = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--omit=dev"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .status()
            .context("cannot run npm (Node.js 20.18 or later and npm are needed for the peer)")?;
        anyhow::ensure!(status.success(), "npm ci for the peer failed");
        std::fs::write(&stamp, lock)?;
    }
    Ok(PeerInstall { dir })
}

/// `node --version`, for the report.
pub fn node_version() -> String {
    std::process::Command::new("node")
        .arg("--version")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map_or_else(
            || "unknown".into(),
            |output| String::from_utf8_lossy(&output.stdout).trim().to_string(),
        )
}

/// One throwaway deployment of the peer.
pub struct Peer {
    install: PathBuf,
    dir: PathBuf,
    images: PathBuf,
    prefix: String,
    redis_url: String,
    env: Vec<(String, String)>,
    pub api_port: u16,
}

impl Peer {
    /// A deployment whose provider is the mock at `openai_base`, keeping its images on a tmpfs
    /// (`/dev/shm`) where there is one, as Pictor's does in this scenario.
    pub fn new(install: &PeerInstall, openai_base: &str) -> anyhow::Result<Self> {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let id = format!("pictor-bench-peer-{}", &unique[..10]);
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir)?;
        let shm = Path::new("/dev/shm");
        let images = if shm.is_dir() {
            shm.join(&id)
        } else {
            dir.join("images")
        };
        std::fs::create_dir_all(&images)?;
        let redis_url =
            std::env::var("PICTOR_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let api_port = free_port()?;
        let env = [
            ("NODE_ENV", "production".to_string()),
            ("LOG_LEVEL", "info".into()),
            ("PEER_REDIS_URL", redis_url.clone()),
            ("PEER_PREFIX", id.clone()),
            ("PEER_API_PORT", api_port.to_string()),
            ("PEER_API_KEY", KEY.into()),
            ("PEER_IMAGE_DIR", images.to_string_lossy().into_owned()),
            ("OPENAI_BASE_URL", openai_base.to_string()),
            ("OPENAI_API_KEY", "sk-bench-not-a-real-key".into()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
        Ok(Self {
            install: install.dir.clone(),
            dir,
            images,
            prefix: id,
            redis_url,
            env,
            api_port,
        })
    }

    pub fn api_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.api_port)
    }

    async fn spawn(
        &self,
        role: &str,
        extra: &[(&str, String)],
        ready_url: String,
    ) -> anyhow::Result<Process> {
        let script = self
            .install
            .join(format!("{role}.js"))
            .to_string_lossy()
            .into_owned();
        let mut env = self.env.clone();
        env.extend(
            extra
                .iter()
                .map(|(name, value)| ((*name).to_string(), value.clone())),
        );
        Process::start(
            Path::new("node"),
            &[script.as_str()],
            &env,
            role,
            &self.dir,
            Some(ready_url),
        )
        .await
    }

    pub async fn start_api(&self) -> anyhow::Result<Process> {
        self.spawn("api", &[], self.api_url("/readyz")).await
    }

    /// Starts the worker at `concurrency`; answers it and its metrics URL.
    pub async fn start_worker(&self, concurrency: usize) -> anyhow::Result<(Process, String)> {
        let port = free_port()?;
        let worker = self
            .spawn(
                "worker",
                &[
                    ("PEER_CONCURRENCY", concurrency.to_string()),
                    ("PEER_METRICS_PORT", port.to_string()),
                ],
                format!("http://127.0.0.1:{port}/healthz"),
            )
            .await?;
        Ok((worker, format!("http://127.0.0.1:{port}/metrics")))
    }

    /// Deletes every Redis key under the deployment's prefix and the image directory; the
    /// processes' logs are kept under `target/bench-logs/{id}/`, as Pictor's are.
    pub async fn cleanup(&self) {
        let logs = crate::workspace_root()
            .join("target")
            .join("bench-logs")
            .join(&self.prefix);
        if std::fs::create_dir_all(&logs).is_ok()
            && let Ok(entries) = std::fs::read_dir(&self.dir)
        {
            for entry in entries.flatten() {
                let _ = std::fs::copy(entry.path(), logs.join(entry.file_name()));
            }
        }
        let deleted = tokio::time::timeout(Duration::from_secs(60), self.delete_keys()).await;
        if !matches!(deleted, Ok(Ok(()))) {
            eprintln!(
                "could not delete the peer's Redis keys under {}:*",
                self.prefix
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.images);
    }

    async fn delete_keys(&self) -> anyhow::Result<()> {
        let client = redis::Client::open(self.redis_url.as_str())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}:*", self.prefix))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await?;
            if !keys.is_empty() {
                redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async::<()>(&mut connection)
                    .await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}
