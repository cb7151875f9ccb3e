//! Changes to a job after it was created: [`JobUpdate`], what one change sets, appends and
//! counts, and [`UPDATE_SCRIPT`], the one Lua script every change goes through, atomic with its
//! guard, its version bump, its TTL refresh, its event and, when the job ends, the schedule of
//! its images' deletion (see `retention`).

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::record::{CALL_IN_FLIGHT_FIELD, CallInFlight, json};
use crate::domain::{
    Clarification, InputImage, Intent, JobStatus, Notice, StoredImage, Usage, UserError,
};

/// A change to a job, applied atomically by [`super::JobStore::update`].
#[derive(Debug, Default, Clone)]
pub struct JobUpdate {
    pub status: Option<JobStatus>,
    pub intent: Option<Intent>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub images: Option<Vec<StoredImage>>,
    pub error: Option<UserError>,
    pub error_detail: Option<String>,
    pub clarification: Option<Clarification>,
    pub add_notices: Vec<Notice>,
    pub add_usage: Vec<Usage>,
    pub add_attempts: u32,
    pub add_cost_micros: i64,
    /// Counts deferrals (the job went back to a delay queue because of a rate limit).
    pub add_deferrals: u32,
    /// Marks the job accepted (the worker does this too, in case the api could not).
    pub accept: bool,
    pub input_image: Option<InputImage>,
    /// `Some(None)` clears the field.
    pub next_agent: Option<Option<String>>,
    pub agent_prompt: Option<Option<String>>,
    pub step_attempts: Option<u32>,
    pub requeues: Option<u32>,
    /// Removes the clarification (when the user answered it).
    pub clear_clarification: bool,
    /// Removes a previous error (when ops replay a dead-lettered job).
    pub clear_error: bool,
    /// Marks a provider call as started (`Some(Some(..))`) or settled without a bill
    /// (`Some(None)`).
    pub call_in_flight: Option<Option<CallInFlight>>,
    /// Starts the job's count of infrastructure failures afresh (ops replaying it after
    /// fixing what failed).
    pub reset_infra_attempts: bool,
}

impl JobUpdate {
    pub fn status(status: JobStatus) -> Self {
        Self {
            status: Some(status),
            ..Self::default()
        }
    }

    /// This update followed by `later`, as one: what applying both in turn would leave on the
    /// job (later values win, lists and counters add up), with one version bump and one event.
    #[must_use]
    pub fn then(self, later: JobUpdate) -> JobUpdate {
        // Destructured, so a new field cannot be forgotten here.
        let JobUpdate {
            status,
            intent,
            provider,
            model,
            prompt,
            images,
            error,
            error_detail,
            clarification,
            mut add_notices,
            mut add_usage,
            add_attempts,
            add_cost_micros,
            add_deferrals,
            accept,
            input_image,
            next_agent,
            agent_prompt,
            step_attempts,
            requeues,
            clear_clarification,
            clear_error,
            call_in_flight,
            reset_infra_attempts,
        } = later;
        let mut notices = self.add_notices;
        notices.append(&mut add_notices);
        let mut usage = self.add_usage;
        usage.append(&mut add_usage);
        // A later clear wipes what came before it; a later value undoes an earlier clear.
        let (clarification, clear_clarification) = if clear_clarification {
            (clarification, true)
        } else {
            match clarification {
                Some(value) => (Some(value), false),
                None => (self.clarification, self.clear_clarification),
            }
        };
        let (error, error_detail, clear_error) = if clear_error {
            (error, error_detail, true)
        } else if error.is_some() || error_detail.is_some() {
            (
                error.or(self.error),
                error_detail.or(self.error_detail),
                false,
            )
        } else {
            (self.error, self.error_detail, self.clear_error)
        };
        JobUpdate {
            status: status.or(self.status),
            intent: intent.or(self.intent),
            provider: provider.or(self.provider),
            model: model.or(self.model),
            prompt: prompt.or(self.prompt),
            images: images.or(self.images),
            error,
            error_detail,
            clarification,
            add_notices: notices,
            add_usage: usage,
            add_attempts: self.add_attempts + add_attempts,
            add_cost_micros: self.add_cost_micros + add_cost_micros,
            add_deferrals: self.add_deferrals + add_deferrals,
            accept: self.accept || accept,
            input_image: input_image.or(self.input_image),
            next_agent: next_agent.or(self.next_agent),
            agent_prompt: agent_prompt.or(self.agent_prompt),
            step_attempts: step_attempts.or(self.step_attempts),
            requeues: requeues.or(self.requeues),
            clear_clarification,
            clear_error,
            call_in_flight: call_in_flight.or(self.call_in_flight),
            reset_infra_attempts: self.reset_infra_attempts || reset_infra_attempts,
        }
    }

    pub(super) fn fields(&self, now: DateTime<Utc>) -> HashMap<&'static str, String> {
        let mut fields = HashMap::new();
        fields.insert("updated_at", now.to_rfc3339());
        if let Some(status) = self.status {
            fields.insert("status", status.as_str().to_string());
        }
        if self.accept {
            fields.insert("accepted", "1".to_string());
        }
        if let Some(intent) = self.intent {
            fields.insert("intent", json(&intent));
        }
        if let Some(provider) = &self.provider {
            fields.insert("provider", provider.clone());
        }
        if let Some(model) = &self.model {
            fields.insert("model", model.clone());
        }
        if let Some(prompt) = &self.prompt {
            fields.insert("prompt", prompt.clone());
        }
        if let Some(images) = &self.images {
            fields.insert("images", json(images));
        }
        if let Some(error) = &self.error {
            fields.insert("error", json(error));
        }
        if let Some(detail) = &self.error_detail {
            fields.insert("error_detail", detail.clone());
        }
        if let Some(clarification) = &self.clarification {
            fields.insert("clarification", json(clarification));
        }
        if self.clear_clarification {
            fields.insert("clarification", String::new());
        }
        if self.clear_error {
            fields.insert("error", String::new());
            fields.insert("error_detail", String::new());
        }
        if let Some(image) = &self.input_image {
            fields.insert("input_image", json(image));
        }
        if self.reset_infra_attempts {
            fields.insert("infra_attempts", "0".to_string());
        }
        if let Some(call) = &self.call_in_flight {
            fields.insert(
                CALL_IN_FLIGHT_FIELD,
                call.as_ref().map(json).unwrap_or_default(),
            );
        }
        if let Some(agent) = &self.next_agent {
            fields.insert("next_agent", agent.clone().unwrap_or_default());
        }
        if let Some(prompt) = &self.agent_prompt {
            fields.insert("agent_prompt", prompt.clone().unwrap_or_default());
        }
        if let Some(attempts) = self.step_attempts {
            fields.insert("step_attempts", attempts.to_string());
        }
        if let Some(requeues) = self.requeues {
            fields.insert("requeues", requeues.to_string());
        }
        fields
    }
}

/// The text of [`UPDATE_SCRIPT`], also run as a step of the call gate (`super::gate`).
macro_rules! update_body {
    () => {
        concat!(
    crate::fair::backlog_remove_fn!(),
    r#"
-- KEYS[1] job hash, KEYS[2] image expiry schedule (zset), KEYS[3..5] the backlog's users with
-- pending work, total and recent completions (`crate::fair`)
-- ARGV[1] events channel, ARGV[2] guard, ARGV[3] ttl seconds, ARGV[4] the new status ('' when
-- it does not change), ARGV[5] notices to append (JSON array, '' for none), ARGV[6] usage to
-- append (JSON array, '' for none), ARGV[7] attempts increment, ARGV[8] cost increment
-- (micro-dollars), ARGV[9] image retention (ms), ARGV[10] deferrals increment,
-- ARGV[11] the backlog's pending-set key without the user, ARGV[12] completions kept,
-- ARGV[13..] the fields to set, name and value in turn (the status among them)
-- Flat strings, not JSON to decode: every job runs this three times or more.
local key = KEYS[1]
-- The status before this change, and who the job is (neither is changed by an update).
local head = redis.call('HMGET', key, 'status', 'id', 'user')
local status = head[1]
if not status then return false end
local terminal = {succeeded = true, failed = true, needs_clarification = true, canceled = true}
-- Refused: {status, -1, ''} (the reply's shape is always three values).
if ARGV[2] == 'active' and terminal[status] then return {status, -1, ''} end
if string.sub(ARGV[2], 1, 3) == 'is:' and string.sub(ARGV[2], 4) ~= status then return {status, -1, ''} end
-- Every field in one HSET (a job's update sets about ten).
if #ARGV >= 14 then redis.call('HSET', key, unpack(ARGV, 13)) end
-- An item with a `count` (a notice kept in place) replaces the list's item of the same `code`,
-- its count one more, where there is one: a job deferred 50 times carries one notice, not 50.
local function append(field, extra_json)
  if extra_json == '' then return end
  local extra = cjson.decode(extra_json)
  if #extra == 0 then return end
  local current = cjson.decode(redis.call('HGET', key, field) or '[]')
  for _, item in ipairs(extra) do
    local replaced = false
    if item.count then
      for i, existing in ipairs(current) do
        if existing.code == item.code then
          item.count = (tonumber(existing.count) or 1) + 1
          current[i] = item
          replaced = true
          break
        end
      end
    end
    if not replaced then table.insert(current, item) end
  end
  redis.call('HSET', key, field, cjson.encode(current))
end
append('notices', ARGV[5])
append('usage', ARGV[6])
if tonumber(ARGV[7]) ~= 0 then redis.call('HINCRBY', key, 'attempts', ARGV[7]) end
if tonumber(ARGV[8]) ~= 0 then redis.call('HINCRBY', key, 'cost_micros', ARGV[8]) end
if tonumber(ARGV[10]) ~= 0 then redis.call('HINCRBY', key, 'deferrals', ARGV[10]) end
local version = redis.call('HINCRBY', key, 'version', 1)
redis.call('EXPIRE', key, ARGV[3])
-- The status is the one just written, if any: no need to read it back.
local new_status = ARGV[4] ~= '' and ARGV[4] or status
local id = head[2]
-- A job that ends has its images deleted once the retention has passed (from now, Redis's
-- clock). GT: a schedule is only ever pushed later, never brought forward.
if terminal[new_status] then
  local now = redis.call('TIME')
  local at = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[9])
  redis.call('ZADD', KEYS[2], 'GT', string.format('%d', at), id)
end
-- A job that ends leaves the backlog in the same write (same slot: the prefix's hash tag).
local user = head[3]
if user and not terminal[status] and terminal[new_status] then
  backlog_remove(ARGV[11] .. user, KEYS[3], KEYS[4], KEYS[5], id, user,
    new_status ~= 'canceled' and '1' or '0', ARGV[12])
end
-- The id is a UUID and the status one of a fixed set of words: nothing to escape.
redis.call('PUBLISH', ARGV[1],
  '{"job_id":"' .. (id or '') .. '","status":"' .. new_status .. '","version":' .. version .. '}')
return {status, version, user}
"#
)
    };
}
pub(crate) use update_body;

/// The Lua script behind [`super::JobStore::update`]. Arguments are documented inline.
pub const UPDATE_SCRIPT: &str = update_body!();

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash fields `updates` leave, written one after another.
    fn written_in_turn(
        updates: &[&JobUpdate],
        now: DateTime<Utc>,
    ) -> HashMap<&'static str, String> {
        let mut fields = HashMap::new();
        for update in updates {
            fields.extend(update.fields(now));
        }
        fields
    }

    fn clarification(question: &str) -> Clarification {
        Clarification {
            question: question.to_string(),
            options: vec!["create".to_string(), "edit".to_string()],
        }
    }

    #[test]
    fn a_handoff_then_a_provider_call_writes_what_the_two_writes_would() {
        let handoff = JobUpdate {
            intent: Some(Intent::Create),
            next_agent: Some(Some("create".to_string())),
            agent_prompt: Some(Some("a fox, watercolour".to_string())),
            step_attempts: Some(0),
            ..JobUpdate::default()
        };
        let call = JobUpdate {
            status: Some(JobStatus::Running),
            provider: Some("openai".to_string()),
            model: Some("gpt-image-1".to_string()),
            add_attempts: 1,
            step_attempts: Some(1),
            ..JobUpdate::default()
        };
        let now = Utc::now();
        let merged = handoff.clone().then(call.clone());
        assert_eq!(merged.fields(now), written_in_turn(&[&handoff, &call], now));
        assert_eq!(merged.add_attempts, 1);
        assert_eq!(merged.step_attempts, Some(1), "the later count wins");
    }

    #[test]
    fn notices_usage_and_counters_add_up_in_order() {
        let first = JobUpdate {
            add_notices: vec![Notice::now(
                crate::codes::NoticeKind::FallbackProvider,
                "Gemini is down",
            )],
            add_attempts: 2,
            add_cost_micros: 40_000,
            accept: true,
            ..JobUpdate::default()
        };
        let second = JobUpdate {
            add_notices: vec![Notice::now(
                crate::codes::NoticeKind::Retrying,
                "Attempt 1 of 3",
            )],
            add_attempts: 1,
            add_cost_micros: 2_500,
            ..JobUpdate::default()
        };
        let merged = first.then(second);
        let codes: Vec<&str> = merged.add_notices.iter().map(|n| n.code.as_str()).collect();
        assert_eq!(codes, ["fallback_provider", "retrying"]);
        assert_eq!(merged.add_attempts, 3);
        assert_eq!(merged.add_cost_micros, 42_500);
        assert!(merged.accept, "an earlier accept is kept");
    }

    /// Merges `first` and `second` in both orders, checks that each merge writes what the two
    /// writes in turn would, and returns the fields of (first then second, second then first).
    fn merged_both_ways(
        first: &JobUpdate,
        second: &JobUpdate,
    ) -> (HashMap<&'static str, String>, HashMap<&'static str, String>) {
        let now = Utc::now();
        let forward = first.clone().then(second.clone()).fields(now);
        assert_eq!(forward, written_in_turn(&[first, second], now));
        let backward = second.clone().then(first.clone()).fields(now);
        assert_eq!(backward, written_in_turn(&[second, first], now));
        (forward, backward)
    }

    #[test]
    fn a_clear_and_a_value_keep_their_order_when_merged() {
        let asked = JobUpdate {
            clarification: Some(clarification("Create or edit?")),
            ..JobUpdate::default()
        };
        let answered = JobUpdate {
            clear_clarification: true,
            ..JobUpdate::default()
        };
        let (cleared, asked_again) = merged_both_ways(&asked, &answered);
        assert_eq!(cleared["clarification"], "");
        assert!(asked_again["clarification"].contains("Create or edit?"));

        let failed = JobUpdate {
            error: Some(UserError {
                code: "processing_failed".to_string(),
                message: "Please submit it again.".to_string(),
            }),
            error_detail: Some("stuck".to_string()),
            ..JobUpdate::default()
        };
        let replayed = JobUpdate {
            clear_error: true,
            ..JobUpdate::default()
        };
        let (cleared, failed_again) = merged_both_ways(&failed, &replayed);
        assert_eq!(cleared["error"], "");
        assert_eq!(cleared["error_detail"], "");
        assert!(failed_again["error"].contains("processing_failed"));
    }
}
