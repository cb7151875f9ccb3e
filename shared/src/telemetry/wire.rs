//! The objects OpenAI's traces ingest endpoint takes (`docs/providers.md`, section 5), and the
//! counter of items that never reached it. The traces layer (`super::traces`) builds them and
//! the exporter (`super::ingest`) posts them; both depend on this module and not on each other.
//!
//! The endpoint rejects any key it does not know (400 `unknown_parameter`), so these are closed
//! structs that serialize exactly the documented keys.

use serde::Serialize;
use serde_json::{Map, Value};

/// Largest JSON size of a span's `input` or `output`, as the SDK cuts them.
pub const MAX_FIELD_BYTES: usize = 100_000;
/// What a cut string ends with.
pub const TRUNCATION_SUFFIX: &str = "... [truncated]";

/// Counts items that never reached the endpoint, by why: `queue_full`, `rejected` (a 4xx) or
/// `export_failed` (retries used up).
pub fn count_dropped(reason: &'static str, items: u64) {
    metrics::counter!("pictor_trace_items_dropped_total", "reason" => reason).increment(items);
}

/// One element of an ingest request's `data` array.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "object")]
pub enum Item {
    #[serde(rename = "trace")]
    Trace(TraceObject),
    #[serde(rename = "trace.span")]
    Span(SpanObject),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceObject {
    pub id: String,
    pub workflow_name: String,
    pub group_id: Option<String>,
    pub metadata: Option<TraceMetadata>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceMetadata {
    pub job_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpanObject {
    pub id: String,
    pub trace_id: String,
    pub parent_id: Option<String>,
    pub started_at: String,
    pub ended_at: String,
    pub span_data: SpanData,
    pub error: Option<SpanError>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SpanData {
    Agent {
        name: String,
        handoffs: Vec<String>,
        tools: Vec<String>,
        output_type: String,
    },
    Generation {
        input: Vec<Message>,
        output: Vec<Message>,
        model: String,
        model_config: Map<String, Value>,
        usage: TokenUsage,
    },
    Handoff {
        from_agent: String,
        to_agent: String,
    },
    Custom {
        name: String,
        data: Map<String, Value>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Only these two keys: the endpoint rejects `total_tokens` and the like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TokenUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpanError {
    pub message: String,
    pub data: Option<Value>,
}
