//! Failure points for the end-to-end tests: named places in the worker and the api where a test
//! makes a *process* abort, hang, pause or fail, to show what a crash or an outage at exactly
//! that moment does (`docs/costs.md`, "How it is tested"). They are set only through the
//! environment of a process, `PICTOR_FAILPOINTS="name=action,…"`, with the actions `abort` (the
//! process dies at once, as under SIGKILL), `hang` (the job's task never goes on), `panic` (the
//! job's task panics, as a bug would make it), `sleep(ms)` and `fail(n)` (the next n passes
//! report a failure). Unset, as in production, a check is one
//! read of an empty list.
//!
//! The points (a worker's `after_*` points may name an agent, `after_answer:create`):
//! `after_answer` (a provider answered; nothing is kept yet), `after_step_kept` (the answer and
//! its ledger entry are durable), `settle_step` (a `fail` makes the step's ledger write fail),
//! `before_final_write` (a `fail` makes the job's final write fail as if Redis refused it), and
//! in the api `store_input` (before a job's input image is written: `sleep` makes a slow
//! object store) and `mark_accepted` (a `fail` is Redis failing between the broker's confirm
//! and the accept).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

#[derive(Debug)]
enum Action {
    Abort,
    Hang,
    Panic,
    Sleep(Duration),
    Fail(AtomicU32),
}

static POINTS: OnceLock<Vec<(String, Action)>> = OnceLock::new();

fn points() -> &'static [(String, Action)] {
    POINTS.get_or_init(|| {
        std::env::var("PICTOR_FAILPOINTS")
            .map(|raw| parse(&raw))
            .unwrap_or_default()
    })
}

fn parse(raw: &str) -> Vec<(String, Action)> {
    raw.split(',')
        .filter_map(|entry| {
            let (name, action) = entry.trim().split_once('=')?;
            let number = |text: &str| {
                text.strip_suffix(')')
                    .and_then(|inner| inner.parse::<u64>().ok())
            };
            let action = match action.trim() {
                "abort" => Action::Abort,
                "hang" => Action::Hang,
                "panic" => Action::Panic,
                other => {
                    if let Some(ms) = other.strip_prefix("sleep(").and_then(number) {
                        Action::Sleep(Duration::from_millis(ms))
                    } else if let Some(times) = other.strip_prefix("fail(").and_then(number) {
                        Action::Fail(AtomicU32::new(u32::try_from(times).unwrap_or(u32::MAX)))
                    } else {
                        tracing::error!(entry, "Unknown failpoint action; ignored");
                        return None;
                    }
                }
            };
            tracing::warn!(name, ?action, "Failpoint armed (PICTOR_FAILPOINTS)");
            Some((name.trim().to_string(), action))
        })
        .collect()
}

fn action(name: &str) -> Option<&'static Action> {
    points()
        .iter()
        .find(|(point, _)| point == name)
        .map(|(_, action)| action)
}

/// Passes the point `name`, or `name:scope` when a test armed that: aborts, hangs, panics or
/// pauses if a test asked for it.
pub async fn hit(name: &str, scope: &str) {
    if points().is_empty() {
        return;
    }
    let scoped = format!("{name}:{scope}");
    match action(&scoped).or_else(|| action(name)) {
        Some(Action::Abort) => {
            tracing::error!(name, "Failpoint: aborting the process");
            std::process::abort();
        }
        Some(Action::Hang) => {
            tracing::error!(name, "Failpoint: hanging this job");
            std::future::pending::<()>().await;
        }
        Some(Action::Panic) => panic!("failpoint {name}: panicking as asked"),
        Some(Action::Sleep(pause)) => tokio::time::sleep(*pause).await,
        Some(Action::Fail(_)) | None => {}
    }
}

/// Whether the point `name` should fail this time (`fail(n)`: the next n times).
pub fn fails(name: &str) -> bool {
    if points().is_empty() {
        return false;
    }
    let Some(Action::Fail(left)) = action(name) else {
        return false;
    };
    left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
        left.checked_sub(1)
    })
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_name_a_point_and_an_action() {
        let parsed =
            parse("after_answer=abort, before_final_write=fail(2),x=sleep(5),y=nope,z=panic");
        let names: Vec<&str> = parsed.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["after_answer", "before_final_write", "x", "z"]);
        assert!(matches!(parsed[3].1, Action::Panic));
        assert!(matches!(parsed[0].1, Action::Abort));
        assert!(matches!(&parsed[1].1, Action::Fail(left) if left.load(Ordering::SeqCst) == 2));
        assert!(matches!(parsed[2].1, Action::Sleep(pause) if pause == Duration::from_millis(5)));
    }
}
