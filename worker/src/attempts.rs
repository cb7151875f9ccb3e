//! Infrastructure attempts: how often one job may meet trouble with Redis, the object store or
//! the broker before it ends `failed`. The count lives on the job in Redis, so it survives
//! redeliveries and restarts and does not depend on what the broker counts (RabbitMQ 4.3 and
//! later no longer count a `basic.nack(requeue)` as a delivery). The consumer's retries of a
//! whole run and the call path's retries of keeping a paid answer share it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use shared::domain::JobId;
use shared::store::JobStore;

/// The first pause after a failure; each further failure doubles it.
const FIRST_PAUSE: Duration = Duration::from_millis(250);

/// The longest pause between two attempts.
const LONGEST_PAUSE: Duration = Duration::from_secs(30);

/// The job's budget of infrastructure failures.
#[derive(Debug, Clone, Copy)]
pub struct InfraAttempts {
    pub limit: u32,
}

/// What to do after one more infrastructure failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Try again after this pause.
    RetryAfter(Duration),
    /// The budget is used up after this many failures: end the job.
    Exhausted(u32),
}

impl InfraAttempts {
    /// Counts one failure of `job` on the job and says what to do. `seen` is what this
    /// process counted so far: while Redis itself is failing the count cannot be stored, and
    /// the local one stands in for it.
    pub async fn count(&self, store: &JobStore, job: JobId, seen: &AtomicU32) -> Verdict {
        let local = seen.fetch_add(1, Ordering::SeqCst) + 1;
        let counted = match store.add_infra_attempt(job).await {
            Ok(Some(stored)) => stored.max(local),
            Ok(None) | Err(_) => local,
        };
        seen.fetch_max(counted, Ordering::SeqCst);
        self.verdict(counted)
    }

    /// The verdict after `failures` failures.
    pub fn verdict(&self, failures: u32) -> Verdict {
        if failures >= self.limit {
            return Verdict::Exhausted(failures);
        }
        let doublings = failures.saturating_sub(1).min(16);
        Verdict::RetryAfter((FIRST_PAUSE * 2u32.pow(doublings)).min(LONGEST_PAUSE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_half_a_minute_and_the_limit_ends_the_job() {
        let attempts = InfraAttempts { limit: 10 };
        assert_eq!(
            attempts.verdict(1),
            Verdict::RetryAfter(Duration::from_millis(250))
        );
        assert_eq!(
            attempts.verdict(3),
            Verdict::RetryAfter(Duration::from_secs(1))
        );
        assert_eq!(
            attempts.verdict(9),
            Verdict::RetryAfter(Duration::from_secs(30))
        );
        assert_eq!(attempts.verdict(10), Verdict::Exhausted(10));
        assert_eq!(attempts.verdict(40), Verdict::Exhausted(40));
    }
}
