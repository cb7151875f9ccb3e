//! A job as its Redis hash holds it: [`JobRecord`], with one hash field per struct field, and
//! the conversions to and from the hash. Fields are written as text or JSON, and read leniently
//! (a missing counter is zero), so records written by the previous and the next schema version
//! still read.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::domain::{
    Clarification, ImageSize, InputImage, Intent, JobId, JobStatus, Notice, StoredImage, Usage,
    UserError, UserId,
};

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
            created_at: now,
            updated_at: now,
            version: 0,
        }
    }

    pub(super) fn to_fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![
            ("id", self.id.to_string()),
            ("user", self.user.to_string()),
            ("status", self.status.as_str().to_string()),
            ("prompt", self.prompt.clone()),
            ("size", self.size.as_str().to_string()),
            ("n", self.n.to_string()),
            ("attempts", self.attempts.to_string()),
            ("notices", json(&self.notices)),
            ("images", json(&self.images)),
            ("usage", json(&self.usage)),
            ("cost_micros", self.cost_micros.to_string()),
            ("accepted", u8::from(self.accepted).to_string()),
            ("created_at", self.created_at.to_rfc3339()),
            ("updated_at", self.updated_at.to_rfc3339()),
            ("version", self.version.to_string()),
        ];
        if let Some(image) = &self.input_image {
            fields.push(("input_image", json(image)));
        }
        if let Some(agent) = &self.next_agent {
            fields.push(("next_agent", agent.clone()));
        }
        if let Some(prompt) = &self.agent_prompt {
            fields.push(("agent_prompt", prompt.clone()));
        }
        fields.push(("step_attempts", self.step_attempts.to_string()));
        fields.push(("requeues", self.requeues.to_string()));
        fields
    }

    pub(super) fn from_fields(mut map: HashMap<String, String>) -> Result<Self, StoreError> {
        let id_text = map.get("id").cloned().unwrap_or_default();
        let corrupt = |field| StoreError::Corrupt {
            id: id_text.clone(),
            field,
        };
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
