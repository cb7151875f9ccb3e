//! The cost ledger and the budget: every billed provider call becomes one append-only entry in a
//! Redis stream per month, and the month's aggregates, the job's own cost, the budget
//! reservation it settles and any threshold it crosses are all updated by the same Lua script,
//! so they can never disagree. Redis must persist (AOF) for the ledger to be durable.
//!
//! Budget protocol: before a provider call the worker **reserves** the call's estimated maximum
//! cost ([`Ledger::reserve_part`], a step of the store's call gate); a `block` policy refuses the
//! reservation when spent + reserved + estimate would pass the budget, so parallel workers cannot overshoot by more than what is in
//! flight. The call then **settles** ([`Ledger::record`], which also releases the hold) or
//! **releases** ([`Ledger::release`]) if nothing was billed. A hold whose worker died expires on
//! its own after [`HOLD_TTL`].
//!
//! Aggregate fields of `{p}costs:{YYYY-MM}` (all integer micro-dollars unless named `calls`):
//! `total`, `model:{provider}:{model}`, `user:{user}`, `cell:{DD}:{provider}:{agent}` and
//! `cellcalls:{DD}:{provider}:{agent}` (one cell per day × provider × agent, for the daily CSV
//! and charts), and for calls a real provider served, `daymodel:{DD}:{provider}:{model}` (to
//! reconcile with the provider's bill). `calls`, `day:{DD}`, `provider:{provider}` and
//! `agent:{agent}` are sums of the cells, made when the month is read
//! ([`MonthCosts::from_stored`]) rather than written with every call. Calls whose outcome is
//! unknown ([`Billing::PossiblyBilled`]) count in all of those at their estimate, and also in
//! `possibly:total`, `possibly:calls`, `possibly:day:{DD}`, `possibly:daycalls:{DD}` and
//! `cellpossibly:{DD}:{provider}:{agent}`, so every view can show them apart.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::connection::RedisConnection;
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::config::{BudgetPolicyKind, BudgetSettings};
use crate::domain::{JobId, Usage, UserId};
use crate::keys::Keys;
use crate::script::Part;

/// How long an unsettled reservation holds budget before it is presumed dead.
pub const HOLD_TTL: Duration = Duration::from_secs(15 * 60);

/// A calendar month in UTC, `YYYY-MM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    pub year: i32,
    pub month: u32,
}

impl Month {
    pub fn of(at: DateTime<Utc>) -> Self {
        Self {
            year: at.year(),
            month: at.month(),
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        let (year, month) = raw.trim().split_once('-')?;
        let (year, month) = (year.parse().ok()?, month.parse().ok()?);
        NaiveDate::from_ymd_opt(year, month, 1).map(|_| Self { year, month })
    }

    pub fn first_day(&self) -> NaiveDate {
        NaiveDate::from_ymd_opt(self.year, self.month, 1).unwrap_or_default()
    }

    pub fn days(&self) -> u32 {
        let next = if self.month == 12 {
            NaiveDate::from_ymd_opt(self.year + 1, 1, 1)
        } else {
            NaiveDate::from_ymd_opt(self.year, self.month + 1, 1)
        };
        next.map_or(30, |next| {
            u32::try_from((next - self.first_day()).num_days()).unwrap_or(30)
        })
    }
}

impl std::fmt::Display for Month {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// Whether the provider certainly billed a call, or may have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Billing {
    /// The provider answered; the cost is priced from the usage it reported.
    #[default]
    Billed,
    /// The outcome is unknown (a timeout after the request was sent, a connection cut
    /// mid-answer, a worker that died with the call in flight); the cost is the call's
    /// estimate, counted in the totals and the budget so they never run low.
    PossiblyBilled,
}

impl Billing {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Billed => "billed",
            Self::PossiblyBilled => "possibly_billed",
        }
    }

    /// The billing a stored entry names; anything but `possibly_billed` reads as billed, as
    /// entries from before the field existed were.
    fn parse(text: &str) -> Self {
        if text == Self::PossiblyBilled.as_str() {
            Self::PossiblyBilled
        } else {
            Self::Billed
        }
    }
}

/// One billed call, as appended to the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub at: DateTime<Utc>,
    pub job_id: JobId,
    pub user: UserId,
    #[serde(flatten)]
    pub usage: Usage,
    pub cost_micros: i64,
    #[serde(default)]
    pub billing: Billing,
}

/// What settling a call writes besides its ledger entry, in the same atomic step.
#[derive(Debug, Clone, Copy, Default)]
pub struct Settlement<'a> {
    /// The budget hold the call took, given back as its cost lands.
    pub hold: Option<&'a Hold>,
    /// The step's durable answer: (hash field, JSON). If the job already holds that field, the
    /// call was settled before and nothing is written again.
    pub step: Option<(&'a str, &'a str)>,
    /// The call's id: its `call_in_flight` mark is removed.
    pub call_id: Option<&'a str>,
    /// Settle only if the job's `call_in_flight` mark is this call's (a run finding an orphaned
    /// call: another run may have settled it meanwhile).
    pub only_if_in_flight: bool,
    /// Append the entry's usage to the job's `usage` list.
    pub usage_on_job: bool,
}

/// What a settlement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Recorded,
    /// The step already held its answer: this call was settled before (a retried settlement
    /// whose first reply was lost).
    AlreadyKept,
    /// `only_if_in_flight` and the mark was gone.
    NotInFlight,
}

/// The ledger could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("redis is unavailable: {0}")]
    Unavailable(#[from] redis::RedisError),
}

/// Budget settings as the ledger applies them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetPolicy {
    pub monthly_micros: i64,
    /// Percentages of the budget that raise an event once per month each.
    pub thresholds: Vec<u32>,
    /// Refuse work that would pass 100% (instead of only alerting).
    pub block: bool,
}

impl From<&BudgetSettings> for BudgetPolicy {
    fn from(settings: &BudgetSettings) -> Self {
        Self {
            monthly_micros: settings.monthly_micros,
            thresholds: settings.thresholds.clone(),
            block: settings.policy == BudgetPolicyKind::Block,
        }
    }
}

/// A budget threshold crossed, published once per threshold per month on `{p}budget-events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetEvent {
    pub month: String,
    pub threshold: u32,
    pub spent_micros: i64,
    pub budget_micros: i64,
    pub at: DateTime<Utc>,
}

/// Money set aside for one call in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub id: String,
    pub month: Month,
    pub amount: i64,
}

/// What a reservation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    Held(Hold),
    /// A blocking budget has no room for this call.
    Refused {
        spent: i64,
        reserved: i64,
    },
}

/// A month's aggregates, read back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MonthCosts {
    pub fields: BTreeMap<String, i64>,
}

impl MonthCosts {
    /// The month as the costs hash stores it, with the sums the ledger no longer stores per
    /// call made from its cells: `day:{DD}`, `provider:{provider}`, `agent:{agent}` (from
    /// `cell:{DD}:{provider}:{agent}`) and `calls` (from `cellcalls:`). Such fields left by an
    /// earlier version that stored them are replaced, so a month that spans an upgrade adds
    /// up.
    pub fn from_stored(stored: impl IntoIterator<Item = (String, i64)>) -> Self {
        let derived = |field: &str| {
            field == "calls"
                || ["day:", "provider:", "agent:"]
                    .iter()
                    .any(|family| field.starts_with(family))
        };
        let mut fields: BTreeMap<String, i64> = stored
            .into_iter()
            .filter(|(field, _)| !derived(field))
            .collect();
        let mut sums: BTreeMap<String, i64> = BTreeMap::new();
        for (field, value) in &fields {
            if let Some(cell) = field.strip_prefix("cell:") {
                let mut parts = cell.splitn(3, ':');
                if let (Some(day), Some(provider), Some(agent)) =
                    (parts.next(), parts.next(), parts.next())
                {
                    for sum in [
                        format!("day:{day}"),
                        format!("provider:{provider}"),
                        format!("agent:{agent}"),
                    ] {
                        *sums.entry(sum).or_insert(0) += value;
                    }
                }
            } else if field.starts_with("cellcalls:") {
                *sums.entry("calls".to_string()).or_insert(0) += value;
            }
        }
        fields.extend(sums);
        Self { fields }
    }

    pub fn get(&self, field: &str) -> i64 {
        self.fields.get(field).copied().unwrap_or(0)
    }

    pub fn total(&self) -> i64 {
        self.get("total")
    }

    /// Entries of one family (`provider`, `agent`, `model`, `user`, `day`), by name.
    pub fn family(&self, family: &str) -> BTreeMap<String, i64> {
        let prefix = format!("{family}:");
        self.fields
            .iter()
            .filter_map(|(field, value)| {
                field
                    .strip_prefix(&prefix)
                    .map(|name| (name.to_string(), *value))
            })
            .collect()
    }
}

/// Enters one call: the ledger's script ([`RECORD_SCRIPT`]), and a step of the job's final write
/// (`crate::store::finish`), which carries the last call's settlement.
macro_rules! record_body {
    () => {
        r#"
-- KEYS[1] ledger stream, KEYS[2] costs hash, KEYS[3] budget hash, KEYS[4] hold expiry zset,
-- KEYS[5] job hash, KEYS[6] budget events stream
-- ARGV[1] cost (micro-dollars), ARGV[2] day (DD), ARGV[3] hold id ('' for none),
-- ARGV[4] budget micros, ARGV[5] thresholds ('80,100'), ARGV[6] month, ARGV[7] alerted-key prefix,
-- ARGV[8] now (RFC 3339), ARGV[9] step field ('' for none), ARGV[10] step JSON,
-- ARGV[11] call id ('' for none), ARGV[12] '1': only if the job's call_in_flight is this call,
-- ARGV[13] usage JSON to append to the job's usage list ('' for none),
-- ARGV[14] provider, ARGV[15] agent, ARGV[16] model, ARGV[17] user,
-- ARGV[18] '1' if simulated, ARGV[19] '1' if possibly billed,
-- ARGV[20], ARGV[21] the stream entry's one field and its value (`FlatEntry::packed`)
-- Strings throughout, no JSON decoded and no number formatted: the script runs twice a job.
-- What the settlement needs of the job, in one read: every job has a status; the step's field
-- (the status again when there is no step) and the usage list to append to.
local job = redis.call('HMGET', KEYS[5], 'status', 'call_in_flight',
  ARGV[9] ~= '' and ARGV[9] or 'status', 'usage')
local job_exists = job[1] ~= false
if job_exists and ARGV[9] ~= '' and job[3] then
  return 'kept'
end
-- The mark is JSON that Pictor wrote, with the call id (hex) as a string value.
local in_flight = job[2]
local ours = ARGV[11] ~= '' and in_flight ~= false and
  string.find(in_flight, '"call_id":"' .. ARGV[11] .. '"', 1, true) ~= nil
if ARGV[12] == '1' and not ours then return 'not_in_flight' end
local cost = ARGV[1]
local day, provider, agent = ARGV[2], ARGV[14], ARGV[15]
local cell = day .. ':' .. provider .. ':' .. agent
local id = redis.call('XADD', KEYS[1], '*', ARGV[20], ARGV[21])
-- Stored aggregates; `day:`, `provider:`, `agent:` and `calls` are sums of the cells, made
-- when the month is read (`MonthCosts::from_stored`).
local after = redis.call('HINCRBY', KEYS[2], 'total', cost)
redis.call('HINCRBY', KEYS[2], 'model:' .. provider .. ':' .. ARGV[16], cost)
redis.call('HINCRBY', KEYS[2], 'user:' .. ARGV[17], cost)
redis.call('HINCRBY', KEYS[2], 'cell:' .. cell, cost)
redis.call('HINCRBY', KEYS[2], 'cellcalls:' .. cell, 1)
if ARGV[18] ~= '1' then
  redis.call('HINCRBY', KEYS[2], 'daymodel:' .. day .. ':' .. provider .. ':' .. ARGV[16], cost)
end
if ARGV[19] == '1' then
  redis.call('HINCRBY', KEYS[2], 'possibly:total', cost)
  redis.call('HINCRBY', KEYS[2], 'possibly:calls', 1)
  redis.call('HINCRBY', KEYS[2], 'possibly:day:' .. day, cost)
  redis.call('HINCRBY', KEYS[2], 'possibly:daycalls:' .. day, 1)
  redis.call('HINCRBY', KEYS[2], 'cellpossibly:' .. cell, cost)
end
if ARGV[3] ~= '' then
  local held = tonumber(redis.call('HGET', KEYS[3], 'hold:' .. ARGV[3]) or '0')
  if held > 0 then
    redis.call('HDEL', KEYS[3], 'hold:' .. ARGV[3])
    redis.call('HINCRBY', KEYS[3], 'reserved', -held)
  end
  redis.call('ZREM', KEYS[4], ARGV[3])
end
if job_exists then
  redis.call('HINCRBY', KEYS[5], 'cost_micros', cost)
  local writes = {}
  if ARGV[9] ~= '' then
    writes[#writes + 1] = ARGV[9]
    writes[#writes + 1] = ARGV[10]
  end
  if ARGV[13] ~= '' then
    -- The list is a JSON array of objects that Pictor wrote: the new item goes before its
    -- closing bracket; an empty or unreadable list starts again from the item.
    local list = job[4]
    writes[#writes + 1] = 'usage'
    if list and string.sub(list, 1, 2) == '[{' and string.sub(list, -2) == '}]' then
      writes[#writes + 1] = string.sub(list, 1, -2) .. ',' .. ARGV[13] .. ']'
    else
      writes[#writes + 1] = '[' .. ARGV[13] .. ']'
    end
  end
  if #writes > 0 then redis.call('HSET', KEYS[5], unpack(writes)) end
  if ours then redis.call('HDEL', KEYS[5], 'call_in_flight') end
end
if ARGV[5] ~= '' then
  local before = after - tonumber(cost)
  local budget = tonumber(ARGV[4])
  for threshold in string.gmatch(ARGV[5], '%d+') do
    local limit = math.floor(budget * tonumber(threshold) / 100)
    if before < limit and after >= limit then
      if redis.call('SET', ARGV[7] .. threshold, '1', 'NX') then
        redis.call('XADD', KEYS[6], '*', 'month', ARGV[6], 'threshold', threshold,
          'spent_micros', string.format('%.0f', after), 'budget_micros', ARGV[4], 'at', ARGV[8])
      end
    end
  end
end
return id
"#
    };
}
pub(crate) use record_body;

const RECORD_SCRIPT: &str = record_body!();

/// Sets a budget hold aside, or refuses it under a blocking budget with no room: the text of a
/// step of the store's call gate (`crate::store::gate`), where every hold is taken.
macro_rules! reserve_body {
    () => {
        r#"
-- KEYS[1] budget hash, KEYS[2] hold expiry zset, KEYS[3] costs hash
-- ARGV[1] hold id, ARGV[2] amount, ARGV[3] budget micros, ARGV[4] 'block' or 'alert',
-- ARGV[5] now (ms), ARGV[6] hold ttl (ms)
local now = tonumber(ARGV[5])
-- Holds whose worker died stop counting once they expire.
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  local held = tonumber(redis.call('HGET', KEYS[1], 'hold:' .. dead) or '0')
  redis.call('HDEL', KEYS[1], 'hold:' .. dead)
  redis.call('HINCRBY', KEYS[1], 'reserved', -held)
  redis.call('ZREM', KEYS[2], dead)
end
local spent = tonumber(redis.call('HGET', KEYS[3], 'total') or '0')
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
local amount = tonumber(ARGV[2])
if ARGV[4] == 'block' and spent + reserved + amount > tonumber(ARGV[3]) then
  return {0, spent, reserved}
end
redis.call('HSET', KEYS[1], 'hold:' .. ARGV[1], amount)
redis.call('HINCRBY', KEYS[1], 'reserved', amount)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[1])
return {1, spent, reserved + amount}
"#
    };
}
pub(crate) use reserve_body;

/// Whether a blocking budget still has room for new work: a step of the api's intake
/// (`crate::store::intake`), which refuses a job when the month's spend has reached the budget,
/// as [`Ledger::spent`] read beside the budget would.
macro_rules! within_body {
    () => {
        r#"
-- KEYS[1] costs hash; ARGV[1] budget micros. Replies {1 if there is room, else 0; spent}.
local spent = tonumber(redis.call('HGET', KEYS[1], 'total') or '0')
if spent >= tonumber(ARGV[1]) then return {0, spent} end
return {1, spent}
"#
    };
}
pub(crate) use within_body;

/// Gives a budget hold back: the script's text, for [`RELEASE_SCRIPT`] and as a step of the store's call gate
/// (`crate::store::gate`).
macro_rules! release_body {
    () => {
        r#"
-- KEYS[1] budget hash, KEYS[2] hold expiry zset; ARGV[1] hold id
local held = tonumber(redis.call('HGET', KEYS[1], 'hold:' .. ARGV[1]) or '0')
if held > 0 then
  redis.call('HDEL', KEYS[1], 'hold:' .. ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'reserved', -held)
end
redis.call('ZREM', KEYS[2], ARGV[1])
return held
"#
    };
}
pub(crate) use release_body;

const RELEASE_SCRIPT: &str = release_body!();

/// What the reserve script's reply (`{granted, spent, reserved}`) says of `hold`.
pub fn reservation((granted, spent, reserved): (i64, i64, i64), hold: Hold) -> Reservation {
    if granted == 1 {
        Reservation::Held(hold)
    } else {
        Reservation::Refused { spent, reserved }
    }
}

/// The ledger, the aggregates and the budget in Redis.
#[derive(Clone)]
pub struct Ledger {
    connection: RedisConnection,
    keys: Keys,
    policy: BudgetPolicy,
    record: redis::Script,
    release: redis::Script,
}

impl Ledger {
    pub fn new(connection: RedisConnection, keys: Keys, policy: BudgetPolicy) -> Self {
        Self {
            connection,
            keys,
            policy,
            record: redis::Script::new(RECORD_SCRIPT),
            release: redis::Script::new(RELEASE_SCRIPT),
        }
    }

    pub fn policy(&self) -> &BudgetPolicy {
        &self.policy
    }

    /// The keys and arguments of the budget hold for a call about to be made in the current
    /// month (`amount` set aside), a step of the store's call gate (`crate::store::gate`), and
    /// the hold it takes if it is granted (see [`reservation`]).
    pub fn reserve_part(&self, amount: i64) -> (Part, Hold) {
        let now = Utc::now();
        let month = Month::of(now);
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut part = Part::default();
        part.key(self.keys.budget(&month.to_string()))
            .key(self.keys.budget_holds(&month.to_string()))
            .key(self.keys.costs(&month.to_string()))
            .arg(&id)
            .arg(amount)
            .arg(self.policy.monthly_micros)
            .arg(if self.policy.block { "block" } else { "alert" })
            .arg(now.timestamp_millis())
            .arg(u64::try_from(HOLD_TTL.as_millis()).unwrap_or(u64::MAX));
        (part, Hold { id, month, amount })
    }

    /// The keys and arguments of the intake's budget step for a job arriving `now`
    /// (`crate::store::intake`): empty, so the step is skipped, unless the budget blocks.
    pub fn within_part(&self, now: DateTime<Utc>) -> Part {
        let mut part = Part::default();
        if self.policy.block {
            part.key(self.keys.costs(&Month::of(now).to_string()))
                .arg(self.policy.monthly_micros);
        }
        part
    }

    /// Gives a hold back unused (the call failed and was not billed).
    pub async fn release(&self, hold: &Hold) -> Result<(), LedgerError> {
        let mut connection = self.connection.clone();
        self.release
            .key(self.keys.budget(&hold.month.to_string()))
            .key(self.keys.budget_holds(&hold.month.to_string()))
            .arg(&hold.id)
            .invoke_async::<i64>(&mut connection)
            .await?;
        Ok(())
    }

    /// Appends one billed call, updating the aggregates, the job's cost, the budget (settling
    /// `hold`, if any) and the threshold events, atomically.
    pub async fn record(
        &self,
        entry: &LedgerEntry,
        hold: Option<&Hold>,
    ) -> Result<(), LedgerError> {
        self.settle(
            entry,
            Settlement {
                hold,
                ..Settlement::default()
            },
        )
        .await
        .map(|_| ())
    }

    /// Appends one call with everything `settlement` asks for, in one atomic script: the
    /// aggregates, the job's cost, the hold given back, the threshold events, and on the job
    /// the step's durable answer, the end of its `call_in_flight` mark and its usage. Retrying a
    /// settlement whose reply was lost records nothing twice ([`Settled::AlreadyKept`]).
    pub async fn settle(
        &self,
        entry: &LedgerEntry,
        settlement: Settlement<'_>,
    ) -> Result<Settled, LedgerError> {
        let month = Month::of(entry.at);
        // A hold taken last month is released there; the cost lands in the entry's month.
        if let Some(hold) = settlement.hold.filter(|hold| hold.month != month) {
            self.release(hold).await?;
        }
        let invocation = self.record_part(entry, settlement);
        let mut connection = self.connection.pinned();
        let outcome: String = invocation
            .invoke_async(&self.record, &mut connection)
            .await?;
        // A kept answer is what stops a redelivered job paying again: it must survive a
        // failover before the job goes on.
        connection.replicated().await?;
        Ok(match outcome.as_str() {
            "kept" => Settled::AlreadyKept,
            "not_in_flight" => Settled::NotInFlight,
            _ => Settled::Recorded,
        })
    }

    /// The settlement's keys and arguments as a step of another script (the job's final write,
    /// `crate::store::finish`), or `None` when it needs a step of its own first: a hold taken in
    /// an earlier month is given back in that month, by [`Ledger::settle`].
    pub fn settle_part(&self, entry: &LedgerEntry, settlement: Settlement<'_>) -> Option<Part> {
        let month = Month::of(entry.at);
        if settlement.hold.is_some_and(|hold| hold.month != month) {
            return None;
        }
        Some(self.record_part(entry, settlement))
    }

    /// The record script's keys and arguments; a hold from another month is left out (the
    /// caller gives it back there).
    fn record_part(&self, entry: &LedgerEntry, settlement: Settlement<'_>) -> Part {
        let month = Month::of(entry.at);
        let hold_id = settlement
            .hold
            .filter(|hold| hold.month == month)
            .map_or(String::new(), |hold| hold.id.clone());
        let thresholds = self
            .policy
            .thresholds
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let month_text = month.to_string();
        let (step_field, step_json) = settlement.step.unwrap_or(("", ""));
        let usage = if settlement.usage_on_job {
            serde_json::to_string(&entry.usage).unwrap_or_default()
        } else {
            String::new()
        };
        let flat = FlatEntry::from(entry);
        // A `Part`, not a `ScriptInvocation`: about 55 arguments, each copied once rather than
        // five times, twice a job (`crate::script`).
        let mut invocation = Part::default();
        invocation
            .key(self.keys.ledger(&month_text))
            .key(self.keys.costs(&month_text))
            .key(self.keys.budget(&month_text))
            .key(self.keys.budget_holds(&month_text))
            .key(self.keys.job(entry.job_id))
            .key(self.keys.budget_events())
            .arg(entry.cost_micros)
            .arg(format!("{:02}", entry.at.day()))
            .arg(hold_id)
            .arg(self.policy.monthly_micros)
            .arg(thresholds)
            .arg(&month_text)
            .arg(self.keys.budget_alerted(&month_text, ""))
            .arg(Utc::now().to_rfc3339())
            .arg(step_field)
            .arg(step_json)
            .arg(settlement.call_id.unwrap_or_default())
            .arg(if settlement.only_if_in_flight {
                "1"
            } else {
                "0"
            })
            .arg(usage)
            .arg(&flat.provider)
            .arg(&flat.agent)
            .arg(&flat.model)
            .arg(&flat.user)
            .arg(if flat.simulated { "1" } else { "0" })
            .arg(if entry.billing == Billing::PossiblyBilled {
                "1"
            } else {
                "0"
            });
        let (field, value) = flat.packed();
        invocation.arg(field).arg(value);
        invocation
    }

    /// The month's aggregates.
    pub async fn month(&self, month: Month) -> Result<MonthCosts, LedgerError> {
        let mut connection = self.connection.clone();
        let raw: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(self.keys.costs(&month.to_string()))
            .query_async(&mut connection)
            .await?;
        Ok(MonthCosts::from_stored(raw))
    }

    /// What the month has cost so far (settled calls only).
    pub async fn spent(&self, month: Month) -> Result<i64, LedgerError> {
        let mut connection = self.connection.clone();
        let spent: Option<i64> = redis::cmd("HGET")
            .arg(self.keys.costs(&month.to_string()))
            .arg("total")
            .query_async(&mut connection)
            .await?;
        Ok(spent.unwrap_or(0))
    }

    /// Money currently held for calls in flight this month.
    pub async fn reserved(&self, month: Month) -> Result<i64, LedgerError> {
        let mut connection = self.connection.clone();
        let reserved: Option<i64> = redis::cmd("HGET")
            .arg(self.keys.budget(&month.to_string()))
            .arg("reserved")
            .query_async(&mut connection)
            .await?;
        Ok(reserved.unwrap_or(0).max(0))
    }

    /// Reads ledger entries of a month in order, `batch` at a time, starting after `after`
    /// (a stream id; `None` from the start). Returns the entries and the last id read.
    pub async fn entries(
        &self,
        month: Month,
        after: Option<&str>,
        batch: usize,
    ) -> Result<(Vec<LedgerEntry>, Option<String>), LedgerError> {
        let mut connection = self.connection.clone();
        let start = after.map_or_else(|| "-".to_string(), |id| format!("({id}"));
        let reply: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(self.keys.ledger(&month.to_string()))
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(batch)
            .query_async(&mut connection)
            .await?;
        let last = reply.last().map(|(id, _)| id.clone());
        let entries = reply
            .into_iter()
            .filter_map(|(id, fields)| {
                let entry = FlatEntry::from_fields(&fields).and_then(|flat| flat.into_entry());
                if entry.is_none() {
                    tracing::error!(stream_id = %id, "Skipping a malformed ledger entry");
                }
                entry
            })
            .collect();
        Ok((entries, last))
    }

    /// Budget events raised so far (oldest first), for tests and tools.
    pub async fn budget_events(&self) -> Result<Vec<BudgetEvent>, LedgerError> {
        let events = self.budget_events_after(None, usize::MAX).await?;
        Ok(events.into_iter().map(|(_, event)| event).collect())
    }

    /// Up to `count` budget events after the stream id `after` (`None`: from the first), oldest
    /// first, each with its stream id, so a reader (the scheduler) can resume where it stopped.
    /// Malformed entries are skipped.
    pub async fn budget_events_after(
        &self,
        after: Option<&str>,
        count: usize,
    ) -> Result<Vec<(String, BudgetEvent)>, LedgerError> {
        let mut connection = self.connection.clone();
        let start = after.map_or_else(|| "-".to_string(), |id| format!("({id}"));
        let mut command = redis::cmd("XRANGE");
        command.arg(self.keys.budget_events()).arg(start).arg("+");
        if count != usize::MAX {
            command.arg("COUNT").arg(count);
        }
        let reply: Vec<(String, HashMap<String, String>)> =
            command.query_async(&mut connection).await?;
        Ok(reply
            .into_iter()
            .filter_map(|(id, fields)| {
                let event = BudgetEvent {
                    month: fields.get("month")?.clone(),
                    threshold: fields.get("threshold")?.parse().ok()?,
                    spent_micros: fields.get("spent_micros")?.parse().ok()?,
                    budget_micros: fields.get("budget_micros")?.parse().ok()?,
                    at: DateTime::parse_from_rfc3339(fields.get("at")?)
                        .ok()?
                        .with_timezone(&Utc),
                };
                Some((id, event))
            })
            .collect())
    }

    /// Recomputes a month's aggregates from its ledger and swaps them in atomically. Returns
    /// the number of entries read. Budget reservations and threshold markers are left alone.
    pub async fn rebuild(&self, month: Month) -> Result<u64, LedgerError> {
        let mut totals: BTreeMap<String, i64> = BTreeMap::new();
        let mut after: Option<String> = None;
        let mut count = 0u64;
        loop {
            let (entries, last) = self.entries(month, after.as_deref(), 1000).await?;
            if entries.is_empty() && last.is_none() {
                break;
            }
            for entry in &entries {
                count += 1;
                for (field, amount) in aggregate_fields(entry) {
                    *totals.entry(field).or_insert(0) += amount;
                }
            }
            after = last;
        }
        let target = self.keys.costs(&month.to_string());
        let staging = format!("{target}:rebuild");
        let mut connection = self.connection.clone();
        let mut pipe = redis::pipe();
        pipe.atomic().del(&staging).ignore();
        if totals.is_empty() {
            pipe.del(&target).ignore();
        } else {
            let pairs: Vec<(String, i64)> = totals.into_iter().collect();
            pipe.hset_multiple(&staging, &pairs)
                .ignore()
                .rename(&staging, &target)
                .ignore();
        }
        pipe.query_async::<()>(&mut connection).await?;
        Ok(count)
    }
}

/// The aggregate increments one entry contributes (mirrors [`RECORD_SCRIPT`]).
fn aggregate_fields(entry: &LedgerEntry) -> Vec<(String, i64)> {
    let cost = entry.cost_micros;
    let (provider, agent) = (&entry.usage.provider, &entry.usage.agent);
    let day = format!("{:02}", entry.at.day());
    let mut fields = if entry.usage.simulated {
        Vec::new()
    } else {
        vec![(
            format!("daymodel:{day}:{provider}:{}", entry.usage.model),
            cost,
        )]
    };
    fields.extend([
        ("total".to_string(), cost),
        (format!("model:{provider}:{}", entry.usage.model), cost),
        (format!("user:{}", entry.user), cost),
        (format!("cell:{day}:{provider}:{agent}"), cost),
        (format!("cellcalls:{day}:{provider}:{agent}"), 1),
    ]);
    if entry.billing == Billing::PossiblyBilled {
        fields.extend([
            ("possibly:total".to_string(), cost),
            ("possibly:calls".to_string(), 1),
            (format!("possibly:day:{day}"), cost),
            (format!("possibly:daycalls:{day}"), 1),
            (format!("cellpossibly:{day}:{provider}:{agent}"), cost),
        ]);
    }
    fields
}

/// The entry as the stream stores it: packed, its values as one JSON array in the order of
/// these fields ([`Self::packed`]; `serde_tuple` writes a struct as a tuple), or, in entries
/// written before, one stream field per value. Packing saves a settlement 32 arguments and
/// `XADD` 16 fields: about 7 µs of Redis' CPU a settlement, twice a job (docs/benchmarks.md,
/// cut 27). A change of order or meaning needs a new [`PACKED_FIELD`] name, so that the
/// month's earlier entries still read as they were written.
#[derive(Debug, serde_tuple::Serialize_tuple, serde_tuple::Deserialize_tuple)]
struct FlatEntry {
    at: String,
    job_id: String,
    user: String,
    agent: String,
    provider: String,
    model: String,
    simulated: bool,
    input_text_tokens: u64,
    input_image_tokens: u64,
    cached_input_tokens: u64,
    output_text_tokens: u64,
    output_image_tokens: u64,
    images: u32,
    size: Option<String>,
    quality: Option<String>,
    cost_micros: i64,
    billing: Billing,
}

impl From<&LedgerEntry> for FlatEntry {
    fn from(entry: &LedgerEntry) -> Self {
        let usage = &entry.usage;
        Self {
            at: entry
                .at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            job_id: entry.job_id.to_string(),
            user: entry.user.to_string(),
            agent: usage.agent.clone(),
            provider: usage.provider.clone(),
            model: usage.model.clone(),
            simulated: usage.simulated,
            input_text_tokens: usage.input_text_tokens,
            input_image_tokens: usage.input_image_tokens,
            cached_input_tokens: usage.cached_input_tokens,
            output_text_tokens: usage.output_text_tokens,
            output_image_tokens: usage.output_image_tokens,
            images: usage.images,
            size: usage.size.clone(),
            quality: usage.quality.clone(),
            cost_micros: entry.cost_micros,
            billing: entry.billing,
        }
    }
}

/// The field that holds a stream entry written since entries were packed
/// ([`FlatEntry::packed`]); an entry without it is one field per value, as written before.
const PACKED_FIELD: &str = "entry";

impl FlatEntry {
    /// The entry as the stream stores it: [`PACKED_FIELD`] and its values as a JSON array
    /// ([`Self::from_fields`] reads it back).
    fn packed(&self) -> (&'static str, String) {
        // Strings, numbers, flags and options only: serializing cannot fail.
        (
            PACKED_FIELD,
            serde_json::to_string(self).unwrap_or_default(),
        )
    }

    /// An entry as the stream holds it: packed, or (written before entries were packed) one
    /// field per value, flags as `1`/`0` and an absent option as an empty string.
    fn from_fields(fields: &HashMap<String, String>) -> Option<Self> {
        if let Some(json) = fields.get(PACKED_FIELD) {
            return serde_json::from_str(json).ok();
        }
        let text = |name: &str| fields.get(name).cloned().unwrap_or_default();
        let number = |name: &str| {
            fields
                .get(name)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let optional = |name: &str| fields.get(name).filter(|v| !v.is_empty()).cloned();
        Some(Self {
            at: text("at"),
            job_id: text("job_id"),
            user: text("user"),
            agent: text("agent"),
            provider: text("provider"),
            model: text("model"),
            simulated: fields.get("simulated").is_some_and(|v| v == "1"),
            input_text_tokens: number("input_text_tokens"),
            input_image_tokens: number("input_image_tokens"),
            cached_input_tokens: number("cached_input_tokens"),
            output_text_tokens: number("output_text_tokens"),
            output_image_tokens: number("output_image_tokens"),
            images: u32::try_from(number("images")).unwrap_or(0),
            size: optional("size"),
            quality: optional("quality"),
            cost_micros: fields.get("cost_micros")?.parse().ok()?,
            billing: Billing::parse(fields.get("billing").map_or("", String::as_str)),
        })
    }

    fn into_entry(self) -> Option<LedgerEntry> {
        Some(LedgerEntry {
            at: DateTime::parse_from_rfc3339(&self.at)
                .ok()?
                .with_timezone(&Utc),
            job_id: JobId::parse(&self.job_id)?,
            user: UserId::parse(&self.user).ok()?,
            usage: Usage {
                agent: self.agent,
                provider: self.provider,
                model: self.model,
                simulated: self.simulated,
                input_text_tokens: self.input_text_tokens,
                input_image_tokens: self.input_image_tokens,
                cached_input_tokens: self.cached_input_tokens,
                output_text_tokens: self.output_text_tokens,
                output_image_tokens: self.output_image_tokens,
                images: self.images,
                size: self.size,
                quality: self.quality,
            },
            cost_micros: self.cost_micros,
            billing: self.billing,
        })
    }
}

/// Month-end spend projected from the month's daily trend: the average daily spend over the
/// days elapsed (today counted as a whole day) times the days in the month.
pub fn project_month_end(spent: i64, month: Month, today: NaiveDate) -> i64 {
    let first = month.first_day();
    if today < first {
        return 0;
    }
    let days = i64::from(month.days());
    let elapsed = ((today - first).num_days() + 1).clamp(1, days);
    if elapsed >= days {
        return spent;
    }
    // Integer arithmetic rounded up: a projection should not flatter the budget.
    (spent * days + elapsed - 1) / elapsed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_parse_and_know_their_length() {
        let february = Month::parse("2028-02").unwrap();
        assert_eq!(february.days(), 29);
        assert_eq!(Month::parse("2026-11").unwrap().days(), 30);
        assert_eq!(Month::parse("2026-12").unwrap().days(), 31);
        assert!(Month::parse("2026-13").is_none());
        assert!(Month::parse("november").is_none());
        assert_eq!(february.to_string(), "2028-02");
    }

    #[test]
    fn the_projection_extends_the_daily_average_to_the_whole_month() {
        let month = Month::parse("2026-11").unwrap();
        let day = |d| NaiveDate::from_ymd_opt(2026, 11, d).unwrap();
        // $10 in the first 10 days of a 30-day month -> $30.
        assert_eq!(project_month_end(10_000_000, month, day(10)), 30_000_000);
        assert_eq!(project_month_end(7, month, day(3)), 70);
        assert_eq!(project_month_end(5_000_000, month, day(30)), 5_000_000);
    }

    #[test]
    fn a_months_sums_come_from_its_cells_whatever_an_earlier_version_stored() {
        let costs = MonthCosts::from_stored([
            ("total".to_string(), 7_000),
            ("cell:02:openai:router".to_string(), 1_000),
            ("cell:02:openai:create".to_string(), 4_000),
            ("cell:05:gemini:edit".to_string(), 2_000),
            ("cellcalls:02:openai:router".to_string(), 2),
            ("cellcalls:02:openai:create".to_string(), 1),
            ("cellcalls:05:gemini:edit".to_string(), 1),
            ("user:alice".to_string(), 7_000),
            ("daymodel:02:openai:gpt-image-2".to_string(), 4_000),
            // Stored by the version before, and stale: replaced by the cells' sums.
            ("day:02".to_string(), 999),
            ("provider:openai".to_string(), 999),
            ("calls".to_string(), 999),
        ]);
        assert_eq!(costs.get("calls"), 4);
        assert_eq!(costs.get("day:02"), 5_000);
        assert_eq!(costs.get("day:05"), 2_000);
        assert_eq!(
            costs.family("provider"),
            BTreeMap::from([("gemini".to_string(), 2_000), ("openai".to_string(), 5_000)])
        );
        assert_eq!(
            costs.family("agent"),
            BTreeMap::from([
                ("create".to_string(), 4_000),
                ("edit".to_string(), 2_000),
                ("router".to_string(), 1_000)
            ])
        );
        // Stored families pass through; `daymodel:` is not a `day:`.
        assert_eq!(costs.total(), 7_000);
        assert_eq!(costs.get("user:alice"), 7_000);
        assert_eq!(costs.get("daymodel:02:openai:gpt-image-2"), 4_000);
        assert_eq!(costs.family("day").len(), 2);
    }

    #[test]
    fn an_entry_survives_the_stream_round_trip() {
        let entry = LedgerEntry {
            at: Utc::now(),
            job_id: JobId::new(),
            user: UserId::parse("alice").unwrap(),
            usage: Usage {
                agent: "create".into(),
                provider: "openai".into(),
                model: "gpt-image-2".into(),
                simulated: true,
                input_text_tokens: 10,
                output_image_tokens: 1056,
                images: 1,
                size: Some("1024x1024".into()),
                ..Usage::default()
            },
            cost_micros: 31_730,
            billing: Billing::PossiblyBilled,
        };
        let (field, value) = FlatEntry::from(&entry).packed();
        assert_eq!(field, "entry");
        let fields = HashMap::from([(field.to_string(), value)]);
        let back = FlatEntry::from_fields(&fields)
            .unwrap()
            .into_entry()
            .unwrap();
        // Microsecond precision is what the stream keeps.
        assert_eq!(back.at.timestamp_micros(), entry.at.timestamp_micros());
        assert_eq!(back.usage, entry.usage);
        assert_eq!(back.cost_micros, entry.cost_micros);
        assert_eq!(back.billing, Billing::PossiblyBilled);
    }

    #[test]
    fn an_entry_written_one_field_per_value_before_packing_still_reads() {
        let fields: HashMap<String, String> = [
            ("at", "2026-11-30T23:59:59.123456Z"),
            ("job_id", "01a250ae-344c-7624-a0a8-4a567071e3d2"),
            ("user", "bob"),
            ("agent", "router"),
            ("provider", "openai"),
            ("model", "gpt-4.1-mini"),
            ("simulated", "0"),
            ("input_text_tokens", "412"),
            ("input_image_tokens", "0"),
            ("cached_input_tokens", "5"),
            ("output_text_tokens", "38"),
            ("output_image_tokens", "0"),
            ("images", "0"),
            ("size", ""),
            ("quality", ""),
            ("cost_micros", "226"),
            ("billing", "billed"),
        ]
        .into_iter()
        .map(|(field, value)| (field.to_string(), value.to_string()))
        .collect();
        let entry = FlatEntry::from_fields(&fields)
            .unwrap()
            .into_entry()
            .unwrap();
        assert_eq!(entry.at.to_rfc3339(), "2026-11-30T23:59:59.123456+00:00");
        assert_eq!(entry.user.to_string(), "bob");
        assert_eq!(entry.usage.model, "gpt-4.1-mini");
        assert_eq!(entry.usage.input_text_tokens, 412);
        assert_eq!(entry.usage.cached_input_tokens, 5);
        assert_eq!(entry.usage.output_text_tokens, 38);
        assert_eq!(entry.usage.size, None);
        assert_eq!(entry.cost_micros, 226);
        assert_eq!(entry.billing, Billing::Billed);
    }

    #[test]
    fn a_packed_entry_that_is_not_one_is_skipped_not_misread() {
        for json in [
            "",
            "[]",
            "{\"cost_micros\":1}",
            "[\"2026-12-01T00:00:00Z\",1]",
        ] {
            let fields = HashMap::from([("entry".to_string(), json.to_string())]);
            assert!(FlatEntry::from_fields(&fields).is_none(), "{json}");
        }
    }
}
