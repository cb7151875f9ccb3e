//! A real SMTP server for tests: Debian's `aiosmtpd` (package `python3-aiosmtpd`, installed by
//! `scripts/services.sh`) on a free local port, storing every message it accepts in a Maildir
//! of its own. The server process is killed and the folder deleted when the [`SmtpSink`] is
//! dropped, even if the test panicked.
//!
//! It runs under `/usr/bin/python3` on purpose: the `python3` first on PATH may be another
//! interpreter (pyenv's here) that does not see Debian's packages.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

const PYTHON: &str = "/usr/bin/python3";

/// How long the server may take to accept connections.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Ports are picked by binding port 0 and releasing it, so another process can take one in
/// between; starting again on a fresh port settles that race.
const START_ATTEMPTS: u32 = 3;

pub struct SmtpSink {
    pub port: u16,
    /// Holds `maildir/` (the messages) and `aiosmtpd.log` (the server's stderr).
    dir: PathBuf,
    child: Child,
}

impl SmtpSink {
    /// Starts the server and returns once it accepts connections.
    pub async fn start() -> Self {
        let dir =
            std::env::temp_dir().join(format!("pictor-smtp-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the SMTP sink's folder");
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(&dir).await {
                Ok((port, child)) => return Self { port, dir, child },
                Err(failure) => failures.push(failure),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!(
            "aiosmtpd did not start ({}); install it with scripts/services.sh \
             (apt-get install python3-aiosmtpd)",
            failures.join("; ")
        );
    }

    async fn try_start(dir: &Path) -> Result<(u16, Child), String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|error| format!("no free port: {error}"))?
            .port();
        let log = std::fs::File::create(dir.join("aiosmtpd.log"))
            .map_err(|error| format!("cannot create the log: {error}"))?;
        let mut child = Command::new(PYTHON)
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(dir.join("maildir"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| format!("cannot run {PYTHON}: {error}"))?;
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.join("aiosmtpd.log")).unwrap_or_default();
                return Err(format!("it exited with {status}: {}", log.trim()));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok((port, child));
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                return Err(format!(
                    "port {port} did not open within {STARTUP_TIMEOUT:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A plain (no TLS, no login) SMTP URL for `scheduler.smtp_url`.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message received so far, as raw RFC 5322 text (aiosmtpd adds `X-Peer`,
    /// `X-MailFrom` and `X-RcptTo` headers), oldest first. A message is in the Maildir before
    /// the server acknowledges its data, so anything sent successfully is here.
    pub fn messages(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("maildir").join("new")) else {
            return Vec::new();
        };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(Result::ok)
            .map(|entry| {
                let modified = entry
                    .metadata()
                    .and_then(|metadata| metadata.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                (modified, entry.path())
            })
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|(_, path)| std::fs::read_to_string(&path).expect("read a received message"))
            .collect()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
