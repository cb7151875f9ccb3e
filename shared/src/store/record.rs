//! A job as its Redis hash holds it: [`JobRecord`], with one hash field per struct field, and
//! the conversions to and from the hash. Fields are written as text or JSON, and read leniently
//! (a missing counter is zero), so records written by the previous and the next schema version
//! still read.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::domain::{
    Clarification, ImageSize, InputImage, Intent, JobId, JobStatus, Notice, StoredImage, Usage,
    UserError, UserId,
};

/// The hash field that marks a provider call as started and not yet settled.
pub const CALL_IN_FLIGHT_FIELD: &str = "call_in_flight";

/// The hash field that keeps the paid answer of an agent's step.
pub fn step_field(agent: &str) -> String {
    format!("step:{agent}")
}

/// A paid step's durable answer (field `step:{agent}`): written in the same atomic step as its
/// ledger entry, read by every later run of the step instead of calling the provider again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The call that paid for it.
    pub call_id: String,
    /// What the agent got back (the classification, or where the images are), as JSON.
    pub answer: serde_json::Value,
    pub usage: Usage,
    pub cost_micros: i64,
    pub at: DateTime<Utc>,
}

/// A provider call that was started and has not been settled (field `call_in_flight`). Written
/// before the request is sent, so a run that finds it knows the previous one died with the call
/// in flight, and records the call as possibly billed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallInFlight {
    pub call_id: String,
    /// The agent whose step it is.
    pub agent: String,
    /// What the call could cost at most (its budget hold), as usage to price.
    pub estimate: Usage,
    pub estimate_micros: i64,
    /// The budget hold taken for it, to give back when the call is settled.
    pub hold_id: String,
    pub hold_month: String,
    pub started_at: DateTime<Utc>,
}

/// A job as stored. Field names match the hash fields one to one.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: JobId,
    pub user: UserId,
    pub status: JobStatus,
    pub prompt: String,
    pub size: ImageSize,
    pub n: u32,
    pub input_image: Option<InputImage>,
    pub intent: Option<Intent>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub attempts: u32,
    pub notices: Vec<Notice>,
    pub images: Vec<StoredImage>,
    pub error: Option<UserError>,
    /// Technical detail of a failure, for logs and ops; never shown to the user.
    pub error_detail: Option<String>,
    pub clarification: Option<Clarification>,
    pub usage: Vec<Usage>,
    pub cost_micros: i64,
    pub accepted: bool,
    /// The agent to run next when the job (re)starts; none means the entry agent. Set on
    /// handoff, so a deferred or redelivered job resumes where it was instead of paying for the
    /// router again, and by a clarification.
    pub next_agent: Option<String>,
    /// The prompt handed to `next_agent` (the router's cleaned prompt).
    pub agent_prompt: Option<String>,
    /// Provider attempts already made in the current step, kept across deferrals.
    pub step_attempts: u32,
    /// How often the watchdog has requeued this job.
    pub requeues: u32,
    /// Infrastructure failures (Redis, object store, broker) met while running it, counted
    /// across deliveries; past `worker.max_infra_attempts` the job ends failed.
    pub infra_attempts: u32,
    /// How often a rate limit sent the job back to a delay queue (its one `rate_limited`
    /// notice counts the same, the api's pacing included).
    pub deferrals: u32,
    /// The paid answer of each agent step, by agent name.
    pub steps: BTreeMap<String, StepRecord>,
    pub call_in_flight: Option<CallInFlight>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub version: u64,
}

impl JobRecord {
    /// A freshly accepted job, not yet confirmed by the broker.
    pub fn new(
        id: JobId,
        user: UserId,
        prompt: String,
        size: ImageSize,
        n: u32,
        input_image: Option<InputImage>,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            id,
            user,
            status: JobStatus::Queued,
            prompt,
            size,
            n,
            input_image,
            intent: None,
            provider: None,
            model: None,
            attempts: 0,
            notices: Vec::new(),
            images: Vec::new(),
            error: None,
            error_detail: None,
            clarification: None,
            usage: Vec::new(),
            cost_micros: 0,
            accepted: false,
            next_agent: None,
            agent_prompt: None,
            step_attempts: 0,
            requeues: 0,
            infra_attempts: 0,
            deferrals: 0,
            steps: BTreeMap::new(),
            call_in_flight: None,
            created_at: now,
            updated_at: now,
            version: 0,
        }
    }

    /// The fields of a new hash. A field still at its default (a zero count, an empty list,
    /// not yet accepted) is left out, and [`Self::from_fields`] (of this release and every
    /// one before it) reads its absence as that default: nine fewer of the intake's arguments
    /// and a smaller hash for every read of the job (docs/benchmarks.md, cut 27).
    /// Only ever written where no hash of the job exists, so a field left out cannot leave an
    /// older value standing.
    pub(super) fn to_fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![
            ("id", self.id.to_string()),
            ("user", self.user.to_string()),
            ("status", self.status.as_str().to_string()),
            ("prompt", self.prompt.clone()),
            ("size", self.size.as_str().to_string()),
            ("n", self.n.to_string()),
            ("created_at", self.created_at.to_rfc3339()),
            // Read as required by releases before this one, so always written.
            ("updated_at", self.updated_at.to_rfc3339()),
        ];
        let mut count = |field, value: u64| {
            if value != 0 {
                fields.push((field, value.to_string()));
            }
        };
        count("attempts", u64::from(self.attempts));
        count("version", self.version);
        count("step_attempts", u64::from(self.step_attempts));
        count("requeues", u64::from(self.requeues));
        count("deferrals", u64::from(self.deferrals));
        count("infra_attempts", u64::from(self.infra_attempts));
        if self.cost_micros != 0 {
            fields.push(("cost_micros", self.cost_micros.to_string()));
        }
        if self.accepted {
            fields.push(("accepted", "1".to_string()));
        }
        if !self.notices.is_empty() {
            fields.push(("notices", json(&self.notices)));
        }
        if !self.images.is_empty() {
            fields.push(("images", json(&self.images)));
        }
        if !self.usage.is_empty() {
            fields.push(("usage", json(&self.usage)));
        }
        if let Some(image) = &self.input_image {
            fields.push(("input_image", json(image)));
        }
        if let Some(agent) = &self.next_agent {
            fields.push(("next_agent", agent.clone()));
        }
        if let Some(prompt) = &self.agent_prompt {
            fields.push(("agent_prompt", prompt.clone()));
        }
        if let Some(call) = &self.call_in_flight {
            fields.push((CALL_IN_FLIGHT_FIELD, json(call)));
        }
        // Steps are written by the ledger's settle script only; a new record has none.
        fields
    }

    pub(super) fn from_fields(mut map: HashMap<String, String>) -> Result<Self, StoreError> {
        let id_text = map.get("id").cloned().unwrap_or_default();
        let corrupt = |field| StoreError::Corrupt {
            id: id_text.clone(),
            field,
        };
        // A step that does not read is left out: its agent then runs it again, which is what
        // the record was for, so it is logged loudly.
        let steps: BTreeMap<String, StepRecord> = map
            .iter()
            .filter_map(|(field, value)| {
                let agent = field.strip_prefix("step:")?;
                match serde_json::from_str(value) {
                    Ok(step) => Some((agent.to_string(), step)),
                    Err(error) => {
                        tracing::error!(%error, field, "A step record of a job does not read");
                        None
                    }
                }
            })
            .collect();
        let mut take = |field: &'static str| map.remove(field);
        let id = take("id")
            .as_deref()
            .and_then(JobId::parse)
            .ok_or_else(|| corrupt("id"))?;
        let user = take("user")
            .and_then(|u| UserId::parse(&u).ok())
            .ok_or_else(|| corrupt("user"))?;
        let status = take("status")
            .as_deref()
            .and_then(JobStatus::parse)
            .ok_or_else(|| corrupt("status"))?;
        let size = take("size")
            .as_deref()
            .and_then(ImageSize::parse)
            .ok_or_else(|| corrupt("size"))?;
        let time = |raw: Option<String>, field| {
            raw.and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc))
                .ok_or_else(|| corrupt(field))
        };
        let created_at = time(take("created_at"), "created_at")?;
        let updated_at = time(take("updated_at"), "updated_at")?;
        fn parse_json<T: for<'de> Deserialize<'de>>(raw: Option<String>) -> Option<Option<T>> {
            match raw.as_deref() {
                None | Some("") => Some(None),
                Some(text) => serde_json::from_str(text).ok().map(Some),
            }
        }
        macro_rules! json_field {
            ($name:literal) => {
                parse_json(take($name)).ok_or_else(|| corrupt($name))?
            };
        }
        let input_image: Option<InputImage> = json_field!("input_image");
        let notices: Option<Vec<Notice>> = json_field!("notices");
        let images: Option<Vec<StoredImage>> = json_field!("images");
        let usage: Option<Vec<Usage>> = json_field!("usage");
        let error: Option<UserError> = json_field!("error");
        let clarification: Option<Clarification> = json_field!("clarification");
        let intent: Option<Intent> = json_field!("intent");
        let call_in_flight: Option<CallInFlight> = json_field!("call_in_flight");
        let number = |raw: Option<String>| raw.and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        Ok(Self {
            id,
            user,
            status,
            prompt: take("prompt").unwrap_or_default(),
            size,
            n: u32::try_from(number(take("n"))).unwrap_or(1),
            input_image,
            intent,
            provider: take("provider").filter(|v| !v.is_empty()),
            model: take("model").filter(|v| !v.is_empty()),
            attempts: u32::try_from(number(take("attempts"))).unwrap_or(0),
            notices: notices.unwrap_or_default(),
            images: images.unwrap_or_default(),
            error,
            error_detail: take("error_detail").filter(|v| !v.is_empty()),
            clarification,
            usage: usage.unwrap_or_default(),
            cost_micros: number(take("cost_micros")),
            accepted: take("accepted").as_deref() == Some("1"),
            next_agent: take("next_agent").filter(|v| !v.is_empty()),
            agent_prompt: take("agent_prompt").filter(|v| !v.is_empty()),
            step_attempts: u32::try_from(number(take("step_attempts"))).unwrap_or(0),
            requeues: u32::try_from(number(take("requeues"))).unwrap_or(0),
            infra_attempts: u32::try_from(number(take("infra_attempts"))).unwrap_or(0),
            deferrals: u32::try_from(number(take("deferrals"))).unwrap_or(0),
            steps,
            call_in_flight,
            created_at,
            updated_at,
            version: u64::try_from(number(take("version"))).unwrap_or(0),
        })
    }
}

pub(super) fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_the_round_trip_through_hash_fields() {
        let mut job = JobRecord::new(
            JobId::new(),
            UserId::parse("alice").unwrap(),
            "a red fox".into(),
            ImageSize::Portrait,
            2,
            Some(InputImage {
                mime_type: crate::domain::ImageMime::Jpeg,
                bytes_len: 10,
                name: None,
            }),
            Utc::now(),
        );
        job.accepted = true;
        let map = job
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let back = JobRecord::from_fields(map).unwrap();
        // RFC 3339 keeps sub-second precision, so the whole record compares equal.
        assert_eq!(back, job);
    }
}
