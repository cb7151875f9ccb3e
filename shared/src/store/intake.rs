//! The api's intake of a new job, in one script and one round trip: a blocking budget's room
//! ([`crate::ledger`]), its place in the fair backlog within the caps ([`crate::fair`]), its
//! user's pace ([`crate::ratelimit`]) and its short-lived record
//! ([`JobStore::insert_pending`]). Each step is the script that runs it alone, as a Lua
//! function ([`crate::script`]):
//!
//! 0. a blocking budget is used up: nothing else happens;
//! 1. the backlog is full for the user or the fleet: nothing else happens;
//! 2. the job takes a unit of its user's pace; if it must wait for it (at least
//!    [`Intake::paced_after`]), the record is not written here: it needs a notice saying when
//!    the job starts, which the caller writes with [`JobStore::insert_pending`];
//! 3. otherwise the record is written.

use std::time::Duration;

use redis::Value;

use super::{JobRecord, JobStore, StoreError};
use crate::fair::Reservation;
use crate::script::{Part, lua_function, split_parts};

/// The intake's script. KEYS and ARGV: [`Part::compose`] of the budget step (empty unless the
/// budget blocks), the backlog reservation, the pace, the record's insert and a part of one
/// argument, the wait (µs) from which a job is paced.
const INTAKE_SCRIPT: &str = concat!(
    lua_function!("budget_within", crate::ledger::within_body!()),
    lua_function!("backlog_reserve", crate::fair::reserve_body!()),
    lua_function!("pace_schedule", crate::ratelimit::schedule_body!()),
    lua_function!("job_insert", super::insert_body!()),
    split_parts!(),
    r#"
local budget, reserve, pace, insert = PARTS[1], PARTS[2], PARTS[3], PARTS[4]
local paced_after = PARTS[5][2][1]
if #budget[1] > 0 then
  local within = budget_within(budget[1], budget[2])
  if within[1] ~= 1 then return {'exhausted', within[2]} end
end
local reserved = backlog_reserve(reserve[1], reserve[2])
if reserved[1] ~= 1 then return {'full', reserved} end
local wait = pace_schedule(pace[1], pace[2])
if wait >= tonumber(paced_after) then return {'paced', wait} end
job_insert(insert[1], insert[2])
return {'inserted', wait}
"#
);

/// A new job's intake: its steps, from [`crate::ledger::Ledger::within_part`],
/// [`crate::fair::Fairness::reserve_part`], [`crate::ratelimit::RateLimiter::schedule_part`]
/// and the record.
pub struct Intake<'a> {
    pub budget: Part,
    pub reserve: Part,
    pub pace: Part,
    pub record: &'a JobRecord,
    /// A wait for the user's pace from which the job is paced (its record written by the
    /// caller, with a notice).
    pub paced_after: Duration,
}

/// What the intake did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// A blocking budget is used up (the month's spend so far): nothing was taken or written.
    Exhausted { spent: i64 },
    /// The backlog is full: nothing was taken or written.
    Full(Reservation),
    /// The job has its backlog place and its unit of pace, and waits this long for it; its
    /// record is not written.
    Paced(Duration),
    /// The job has its place and its unit of pace, and its record is written (and, under
    /// Sentinel, on the replicas).
    Inserted,
}

impl JobStore {
    /// Runs the intake of `intake.record`.
    pub async fn take_in(&self, intake: Intake<'_>) -> Result<Taken, StoreError> {
        let insert = self.insert_part(intake.record);
        let mut threshold = Part::default();
        threshold.arg(u64::try_from(intake.paced_after.as_micros()).unwrap_or(u64::MAX));
        let mut connection = self.connection.pinned();
        let (kind, reply): (String, Value) = Part::compose([
            intake.budget,
            intake.reserve,
            intake.pace,
            insert,
            threshold,
        ])
        .invoke_async(&self.intake_script, &mut connection)
        .await?;
        let micros = |reply: Value| -> Result<Duration, StoreError> {
            let micros: i64 = redis::FromRedisValue::from_redis_value(reply)
                .map_err(|error| StoreError::Unavailable(error.into()))?;
            Ok(Duration::from_micros(u64::try_from(micros).unwrap_or(0)))
        };
        match kind.as_str() {
            "exhausted" => {
                let spent = redis::FromRedisValue::from_redis_value(reply)
                    .map_err(|error| StoreError::Unavailable(error.into()))?;
                Ok(Taken::Exhausted { spent })
            }
            "full" => {
                let reply = redis::FromRedisValue::from_redis_value(reply)
                    .map_err(|error| StoreError::Unavailable(error.into()))?;
                Ok(Taken::Full(crate::fair::reservation(reply)))
            }
            "paced" => Ok(Taken::Paced(micros(reply)?)),
            "inserted" => {
                // The broker gets the job (and the client its `202`) only once a failover
                // keeps it.
                connection.replicated().await?;
                Ok(Taken::Inserted)
            }
            _ => Err(StoreError::Unavailable(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "the intake answered what it never answers",
                kind,
            )))),
        }
    }

    pub(super) fn intake_script() -> redis::Script {
        redis::Script::new(INTAKE_SCRIPT)
    }
}
