//! Multi-process setups that a script under `scripts/` starts and stops (a RabbitMQ cluster,
//! Redis with Sentinel, a Redis Cluster): each in a directory of its own under the temp dir, on
//! ports found free, and stopped (`SCRIPT stop DIR`) when dropped.

use std::path::{Path, PathBuf};

/// One running setup of `scripts/{script}`.
pub struct Scripted {
    script: PathBuf,
    dir: PathBuf,
}

impl Scripted {
    /// Runs `scripts/{script} start DIR BASE_PORT`, with a base port in `from..from + span`
    /// whose `base + offset` ports are all free, and answers the setup and what it printed.
    pub async fn start(script: &str, from: u16, span: u16, offsets: &[u16]) -> (Self, String) {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let setup = Self {
            script: Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("scripts")
                .join(script),
            dir: std::env::temp_dir().join(format!("{}{}", &script[..2], &unique[..8])),
        };
        let base = (0..200)
            .map(|_| {
                let bytes = uuid::Uuid::new_v4();
                from + u16::from_le_bytes([bytes.as_bytes()[0], bytes.as_bytes()[1]]) % span
            })
            .find(|base| offsets.iter().all(|offset| free(base + offset)))
            .expect("free ports");
        let printed = setup.run(&["start", &base.to_string()]).await;
        (setup, printed)
    }

    /// Runs `SCRIPT COMMAND DIR ARGS…` (`args[0]` is the command) and answers its trimmed output.
    pub async fn run(&self, args: &[&str]) -> String {
        let output = tokio::process::Command::new("bash")
            .args(self.command(args))
            .output()
            .await
            .expect("the script runs");
        self.printed(args, output)
    }

    /// [`Scripted::run`], blocking: for settings tweaks, which are not async.
    pub fn run_blocking(&self, args: &[&str]) -> String {
        let output = std::process::Command::new("bash")
            .args(self.command(args))
            .output()
            .expect("the script runs");
        self.printed(args, output)
    }

    fn command(&self, args: &[&str]) -> Vec<std::ffi::OsString> {
        let mut command = vec![
            self.script.clone().into(),
            args[0].into(),
            self.dir.clone().into(),
        ];
        command.extend(args[1..].iter().map(Into::into));
        command
    }

    fn printed(&self, args: &[&str], output: std::process::Output) -> String {
        assert!(
            output.status.success(),
            "{} {args:?}: {}",
            self.script.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout)
            .expect("the script prints text")
            .trim()
            .to_string()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// Whether `port` can be bound on loopback now.
fn free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}
