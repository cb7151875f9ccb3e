//! Where the scheduler's reports and alerts go, as the scheduler last said it: so the dashboard
//! (served by the api, which holds no SMTP or Slack secret) can warn that nobody is told.
//!
//! Every scheduler replica writes a [`DeliveryStatus`] at each tick to `{p}sched:delivery` (a JSON
//! string that expires after [`DeliveryStatus::ttl`]); a missing key means no scheduler has
//! ticked lately, which is worse than an outbox: then nothing is delivered at all.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::connection::RedisConnection;
use crate::keys::Keys;

/// What a scheduler replica delivers through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryStatus {
    /// SMTP is configured with at least one recipient.
    pub email: bool,
    /// A Slack webhook is configured.
    pub slack: bool,
    /// The replica runs inside `pictor dev`, where an outbox is the expected place.
    pub dev: bool,
    /// When the replica wrote this.
    pub at: DateTime<Utc>,
}

impl DeliveryStatus {
    /// Reports and alerts reach no person: neither email nor Slack is configured, outside
    /// `pictor dev` (they only land in the outbox folder).
    pub fn silent(&self) -> bool {
        !self.email && !self.slack && !self.dev
    }

    /// How long a written status counts: a few ticks, so a stopped scheduler shows.
    pub fn ttl(tick: Duration) -> Duration {
        (tick * 4).max(Duration::from_secs(60))
    }

    /// Writes this status for `ttl`.
    pub async fn publish(
        &self,
        connection: &RedisConnection,
        keys: &Keys,
        ttl: Duration,
    ) -> Result<(), redis::RedisError> {
        let mut connection = connection.clone();
        let json = serde_json::to_string(self).expect("a status always serializes");
        redis::cmd("SET")
            .arg(keys.scheduler_delivery())
            .arg(json)
            .arg("PX")
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
            .query_async::<()>(&mut connection)
            .await
    }

    /// The latest status any replica wrote, or `None` when none did within its ttl (or it is
    /// unreadable, which is treated the same: no scheduler is known to deliver anything).
    pub async fn read(
        connection: &RedisConnection,
        keys: &Keys,
    ) -> Result<Option<Self>, redis::RedisError> {
        let mut connection = connection.clone();
        let json: Option<String> = redis::cmd("GET")
            .arg(keys.scheduler_delivery())
            .query_async(&mut connection)
            .await?;
        Ok(json.and_then(|json| serde_json::from_str(&json).ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(email: bool, slack: bool, dev: bool) -> DeliveryStatus {
        DeliveryStatus {
            email,
            slack,
            dev,
            at: Utc::now(),
        }
    }

    #[test]
    fn only_no_channel_outside_dev_is_silent() {
        assert!(status(false, false, false).silent());
        assert!(!status(true, false, false).silent());
        assert!(!status(false, true, false).silent());
        assert!(!status(false, false, true).silent());
    }

    #[test]
    fn the_status_outlives_a_few_ticks() {
        assert_eq!(
            DeliveryStatus::ttl(Duration::from_secs(15)),
            Duration::from_secs(60)
        );
        assert_eq!(
            DeliveryStatus::ttl(Duration::from_secs(60)),
            Duration::from_secs(240)
        );
    }
}
