//! The gate a provider call passes before its request leaves, in one script and one round
//! trip: the model's rate limits and fair share ([`crate::fair`]), the budget hold
//! ([`crate::ledger`]) and the attempt's guarded write on the job ([`JobStore::update`]).
//! Each step is the script that runs it alone, as a Lua function ([`crate::script`]); the gate
//! only chains them, so a step behaves the same whichever way it runs:
//!
//! 1. the limits say no: nothing else happens;
//! 2. the budget has no room: the limits' units stay taken (as when the two ran side by side),
//!    nothing is held or written;
//! 3. the job ended or is gone: the hold is given back in the same script, nothing is written;
//! 4. otherwise the hold is taken and the attempt written, atomically.

use redis::{FromRedisValue, Value};

use super::{JobStore, JobUpdate, StoreError, UpdateOutcome, update_outcome};
use crate::domain::JobId;
use crate::fair::Grant;
use crate::ledger::{Hold, Reservation};
use crate::script::{Part, lua_function, split_parts};
use crate::store::Guard;

/// The gate's script. KEYS and ARGV: [`Part::compose`] of the acquire (empty for a model
/// without limits), the reserve and the update.
const GATE_SCRIPT: &str = concat!(
    lua_function!("fair_acquire", crate::fair::acquire_body!()),
    lua_function!("ledger_reserve", crate::ledger::reserve_body!()),
    lua_function!("ledger_release", crate::ledger::release_body!()),
    lua_function!("job_update", super::update::update_body!()),
    split_parts!(),
    r#"
local acquire, reserve, update = PARTS[1], PARTS[2], PARTS[3]
if #acquire[1] > 0 then
  local granted = fair_acquire(acquire[1], acquire[2])
  if granted[1] ~= 1 then return {'denied', granted} end
end
local held = ledger_reserve(reserve[1], reserve[2])
if held[1] ~= 1 then return {'refused', held} end
local written = job_update(update[1], update[2])
if not written or written[2] == -1 then
  -- The release's KEYS are the reserve's first two, its ARGV the hold id.
  ledger_release({reserve[1][1], reserve[1][2]}, {reserve[2][1]})
  return {'ended', written}
end
return {'passed', written}
"#
);

/// What the gate said to one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// The limits or the fair share said no; nothing was held or written.
    Denied(Grant),
    /// A blocking budget has no room for the hold; nothing was held or written.
    Refused { spent: i64, reserved: i64 },
    /// The job ended (or is gone); the hold was given back and nothing was written.
    Ended(UpdateOutcome),
    /// The hold is taken and the attempt written.
    Passed { hold: Hold, outcome: UpdateOutcome },
}

/// The gate's steps for one call: from [`crate::fair::Fairness::acquire_part`] (none for a
/// model without limits), [`crate::ledger::Ledger::reserve_part`] and the attempt's update.
pub struct GateSteps<'a> {
    pub acquire: Option<Part>,
    pub reserve: (Part, Hold),
    pub update: &'a JobUpdate,
}

impl JobStore {
    /// Runs the gate for a call of job `id` (the update is guarded by [`Guard::Active`]).
    pub async fn pass_gate(&self, id: JobId, steps: GateSteps<'_>) -> Result<Gate, StoreError> {
        let (reserve, hold) = steps.reserve;
        let acquire = steps.acquire.unwrap_or_default();
        let update = self.update_part(id, Guard::Active, steps.update);
        let mut connection = self.connection.clone();
        let (kind, reply): (String, Value) = Part::compose([acquire, reserve, update])
            .invoke_async(&self.gate_script, &mut connection)
            .await?;
        let parsed = |reply: Value| -> Result<_, StoreError> {
            let (outcome, _) = update_outcome(id, read(reply)?)?;
            Ok(outcome)
        };
        Ok(match kind.as_str() {
            "denied" => Gate::Denied(crate::fair::grant(&read::<Vec<Value>>(reply)?)),
            "refused" => match crate::ledger::reservation(read(reply)?, hold) {
                Reservation::Refused { spent, reserved } => Gate::Refused { spent, reserved },
                Reservation::Held(_) => unreachable_reply(&kind)?,
            },
            "ended" => Gate::Ended(parsed(reply)?),
            "passed" => Gate::Passed {
                hold,
                outcome: parsed(reply)?,
            },
            _ => unreachable_reply(&kind)?,
        })
    }

    pub(super) fn gate_script() -> redis::Script {
        redis::Script::new(GATE_SCRIPT)
    }
}

/// One step's reply, as its script alone would have given it.
fn read<T: FromRedisValue>(reply: Value) -> Result<T, StoreError> {
    T::from_redis_value(reply).map_err(|error| StoreError::Unavailable(error.into()))
}

/// A reply the gate's script does not give.
fn unreachable_reply(kind: &str) -> Result<Gate, StoreError> {
    Err(StoreError::Unavailable(redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "the call gate answered what it never answers",
        kind.to_string(),
    ))))
}
