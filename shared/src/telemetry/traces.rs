//! Jobs as OpenAI Agents traces: a `tracing` layer that watches the worker's `job`, `agent` and
//! `provider_call` spans and its `trace_event` events, and turns each job delivery into the
//! objects the traces ingest endpoint takes (`docs/providers.md`, section 5).
//!
//! | tracing                                   | OpenAI trace object                         |
//! |-------------------------------------------|---------------------------------------------|
//! | span `job{job_id, trace_id}`              | the trace (`trace_id` is its id)            |
//! | span `agent{agent}`                       | span `agent` (its `handoffs` filled in)     |
//! | span `provider_call{provider, model, ..}` | span `generation` (error unless `ok`)       |
//! | event `trace_event = "handoff"`           | span `handoff`, under the agent handing off |
//! | event `trace_event = "fallback"`          | span `custom` named `fallback`              |
//! | event "Job failed" `{code}` in the job    | error on the job's last agent span          |
//!
//! Everything of one delivery is kept on the job span and emitted when it closes: a handoff is
//! logged after its agent span closed, so the agent's `handoffs` are only known then. The
//! layer never blocks, and its own filter ([`wants`]) keeps ordinary log lines away from it: it
//! hands finished items to a bounded channel with `try_send` and drops (and counts) what does
//! not fit, so a slow or dead ingest endpoint costs a job nothing. The exporter on the other end is `super::ingest`.
//!
//! The objects it builds are the closed wire types of `super::wire`.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Map;
use tokio::sync::{Notify, mpsc};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use super::wire::{
    Item, MAX_FIELD_BYTES, Message, SpanData, SpanError, SpanObject, TRUNCATION_SUFFIX, TokenUsage,
    TraceMetadata, TraceObject,
};

/// Names of the spans this layer turns into trace objects.
const JOB: &str = "job";
const AGENT: &str = "agent";
const PROVIDER_CALL: &str = "provider_call";

/// Whether the layer needs to see a callsite: its three spans, the `trace_event` events, and
/// events carrying a failure `code` (for "Job failed"). Used as the layer's own filter, so the
/// traces work whatever `RUST_LOG` says and other callsites cost nothing.
pub fn wants(metadata: &Metadata<'_>) -> bool {
    if metadata.is_span() {
        return matches!(metadata.name(), JOB | AGENT | PROVIDER_CALL);
    }
    let fields = metadata.fields();
    fields.field("trace_event").is_some() || fields.field("code").is_some()
}

// ---------------------------------------------------------------------------------------------
// The layer
// ---------------------------------------------------------------------------------------------

/// What the layer emits, besides the items themselves.
#[derive(Debug, Clone)]
pub struct TracesConfig {
    pub workflow_name: String,
    /// Send no prompt and no output.
    pub redact: bool,
}

/// The `tracing` layer. Build it with [`OpenAiTracesLayer::new`], which also returns the
/// receiving end of its channel and the notifier it rings after each job.
pub struct OpenAiTracesLayer {
    config: TracesConfig,
    sender: mpsc::Sender<Item>,
    flush: Arc<Notify>,
}

impl OpenAiTracesLayer {
    /// The layer and the other end of its bounded queue (`queue_size` items).
    pub fn new(
        config: TracesConfig,
        queue_size: usize,
    ) -> (Self, mpsc::Receiver<Item>, Arc<Notify>) {
        let (sender, receiver) = mpsc::channel(queue_size.max(1));
        let flush = Arc::new(Notify::new());
        let layer = Self {
            config,
            sender,
            flush: flush.clone(),
        };
        (layer, receiver, flush)
    }

    /// Queues one job delivery's items, dropping (and counting) what does not fit.
    fn emit(&self, job: JobState) {
        let trace = Item::Trace(TraceObject {
            id: job.trace_id.clone(),
            workflow_name: self.config.workflow_name.clone(),
            group_id: None,
            metadata: Some(TraceMetadata { job_id: job.job_id }),
        });
        let mut dropped = 0u64;
        for item in std::iter::once(trace).chain(job.spans.into_iter().map(Item::Span)) {
            if self.sender.try_send(item).is_err() {
                dropped += 1;
            }
        }
        if dropped > 0 {
            super::wire::count_dropped("queue_full", dropped);
        }
        // Flushed after each job: a trace shows up in the dashboard as soon as its job ends.
        self.flush.notify_one();
    }
}

/// Kept in the `job` span's extensions: the delivery's finished spans, in closing order.
struct JobState {
    trace_id: String,
    job_id: String,
    spans: Vec<SpanObject>,
}

/// Kept in an `agent` or `provider_call` span's extensions while it is open.
struct OpenSpan {
    id: String,
    parent_id: Option<String>,
    /// The enclosing `job` span, where the finished span goes.
    job: Id,
    started_at: DateTime<Utc>,
    kind: OpenKind,
}

enum OpenKind {
    Agent {
        name: String,
        handoffs: Vec<String>,
    },
    /// Boxed: a call's fields are several times an agent's, and an enum is as big as its
    /// largest variant.
    Generation(Box<Fields>),
}

/// The fields of the spans and events the layer reads.
#[derive(Default)]
struct Fields {
    job_id: Option<String>,
    trace_id: Option<String>,
    agent: Option<String>,
    model: Option<String>,
    prompt: Option<String>,
    outcome: Option<String>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    images: Option<u64>,
    trace_event: Option<String>,
    from: Option<String>,
    to: Option<String>,
    code: Option<String>,
    message: Option<String>,
}

impl Fields {
    fn set(&mut self, field: &Field, value: String) {
        let slot = match field.name() {
            "job_id" => &mut self.job_id,
            "trace_id" => &mut self.trace_id,
            "agent" => &mut self.agent,
            "model" => &mut self.model,
            "prompt" => &mut self.prompt,
            "outcome" => &mut self.outcome,
            "trace_event" => &mut self.trace_event,
            "from" => &mut self.from,
            "to" => &mut self.to,
            "code" => &mut self.code,
            "message" => &mut self.message,
            _ => return,
        };
        *slot = Some(value);
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field, value.to_string());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "input_tokens" => self.input_tokens = Some(value),
            "output_tokens" => self.output_tokens = Some(value),
            "images" => self.images = Some(value),
            _ => {}
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if let Ok(value) = u64::try_from(value) {
            self.record_u64(field, value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `%value` fields (job ids, error codes) and messages arrive here.
        if matches!(
            field.name(),
            "job_id"
                | "trace_id"
                | "agent"
                | "model"
                | "prompt"
                | "outcome"
                | "trace_event"
                | "from"
                | "to"
                | "code"
                | "message"
        ) {
            self.set(field, format!("{value:?}"));
        }
    }
}

/// `span_` + 24 hex digits, like the SDK's `gen_span_id`.
fn span_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes: [u8; 12] = rand::random();
    let mut id = String::with_capacity(29);
    id.push_str("span_");
    for byte in bytes {
        id.push(char::from(HEX[usize::from(byte >> 4)]));
        id.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    id
}

/// Python's `datetime.isoformat()` for a UTC time, as the SDK sends it.
/// chrono's RFC 3339 writer gives exactly that (`+00:00`, six digits) without parsing a format
/// string on every call, about a quarter of the layer's own time in a profile of the worker.
fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
}

/// `trace_` + 32 lowercase hex digits.
fn is_trace_id(id: &str) -> bool {
    id.strip_prefix("trace_")
        .is_some_and(|hex| hex.len() == 32 && is_lower_hex(hex))
}

/// Only the digits `0-9a-f`, as the SDK's ids are written.
fn is_lower_hex(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Where an event or a new span sits: its nearest traced span (if any comes before the job)
/// and the job span itself.
struct Place {
    nearest: Option<Id>,
    job: Id,
}

fn place<'a, S>(
    scope: impl Iterator<Item = tracing_subscriber::registry::SpanRef<'a, S>>,
) -> Option<Place>
where
    S: Subscriber + for<'l> LookupSpan<'l>,
{
    let mut nearest = None;
    for span in scope {
        let extensions = span.extensions();
        if nearest.is_none() && extensions.get::<OpenSpan>().is_some() {
            nearest = Some(span.id());
        }
        if extensions.get::<JobState>().is_some() {
            return Some(Place {
                nearest,
                job: span.id(),
            });
        }
    }
    None
}

impl<S> Layer<S> for OpenAiTracesLayer
where
    S: Subscriber + for<'l> LookupSpan<'l>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        match attrs.metadata().name() {
            JOB => {
                let (Some(trace_id), Some(job_id)) = (fields.trace_id, fields.job_id) else {
                    return;
                };
                if !is_trace_id(&trace_id) {
                    return;
                }
                span.extensions_mut().insert(JobState {
                    trace_id,
                    job_id,
                    spans: Vec::new(),
                });
            }
            name @ (AGENT | PROVIDER_CALL) => {
                let Some(place) = place(span.scope().skip(1)) else {
                    return;
                };
                let parent_id = place.nearest.and_then(|parent| {
                    ctx.span(&parent)?
                        .extensions()
                        .get::<OpenSpan>()
                        .map(|open| open.id.clone())
                });
                let kind = if name == AGENT {
                    OpenKind::Agent {
                        name: fields.agent.unwrap_or_default(),
                        handoffs: Vec::new(),
                    }
                } else {
                    OpenKind::Generation(Box::new(fields))
                };
                span.extensions_mut().insert(OpenSpan {
                    id: span_id(),
                    parent_id,
                    job: place.job,
                    started_at: Utc::now(),
                    kind,
                });
            }
            _ => {}
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(OpenSpan {
            kind: OpenKind::Generation(fields),
            ..
        }) = extensions.get_mut::<OpenSpan>()
        {
            values.record(fields.as_mut());
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let Some(place) = ctx.event_scope(event).and_then(|scope| place(scope)) else {
            return;
        };
        let now = Utc::now();
        match fields.trace_event.as_deref() {
            Some("handoff") => self.handoff(&ctx, &place, fields, now),
            Some("fallback") => {
                let parent_id = place.nearest.as_ref().and_then(|nearest| {
                    ctx.span(nearest)?
                        .extensions()
                        .get::<OpenSpan>()
                        .map(|open| open.id.clone())
                });
                let mut data = Map::new();
                data.insert("from".into(), fields.from.unwrap_or_default().into());
                data.insert("to".into(), fields.to.unwrap_or_default().into());
                let span = SpanData::Custom {
                    name: "fallback".to_string(),
                    data,
                };
                push(&ctx, &place.job, parent_id, now, span);
            }
            Some(_) => {}
            None => {
                // The job failed after its agents ran: the failure belongs to the last one.
                if place.nearest.is_some() || fields.message.as_deref() != Some("Job failed") {
                    return;
                }
                let Some(code) = fields.code else { return };
                let Some(job) = ctx.span(&place.job) else {
                    return;
                };
                let mut extensions = job.extensions_mut();
                let Some(state) = extensions.get_mut::<JobState>() else {
                    return;
                };
                if let Some(agent) = state
                    .spans
                    .iter_mut()
                    .rev()
                    .find(|span| matches!(span.span_data, SpanData::Agent { .. }))
                {
                    agent.error.get_or_insert(SpanError {
                        message: code,
                        data: None,
                    });
                }
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        if span.name() == JOB {
            if let Some(job) = span.extensions_mut().remove::<JobState>() {
                self.emit(job);
            }
            return;
        }
        let Some(open) = span.extensions_mut().remove::<OpenSpan>() else {
            return;
        };
        let (span_data, error) = match open.kind {
            OpenKind::Agent { name, handoffs } => (
                SpanData::Agent {
                    name,
                    handoffs,
                    tools: Vec::new(),
                    output_type: "str".to_string(),
                },
                None,
            ),
            OpenKind::Generation(fields) => self.generation(*fields),
        };
        let finished = SpanObject {
            id: open.id,
            trace_id: String::new(),
            parent_id: open.parent_id,
            started_at: timestamp(open.started_at),
            ended_at: timestamp(Utc::now()),
            span_data,
            error,
        };
        add_to_job(&ctx, &open.job, finished);
    }
}

impl OpenAiTracesLayer {
    /// A `generation` span from a finished `provider_call`; an error unless its outcome is ok.
    fn generation(&self, fields: Fields) -> (SpanData, Option<SpanError>) {
        let images = fields.images.unwrap_or(0);
        let (input, output) = if self.config.redact {
            (Vec::new(), Vec::new())
        } else {
            let input = fields
                .prompt
                .map(|prompt| {
                    vec![Message {
                        role: "user".to_string(),
                        content: prompt,
                    }]
                })
                .unwrap_or_default();
            let output = if images > 0 {
                let noun = if images == 1 { "image" } else { "images" };
                vec![Message {
                    role: "assistant".to_string(),
                    content: format!("{images} {noun}"),
                }]
            } else {
                Vec::new()
            };
            (truncate_messages(input), truncate_messages(output))
        };
        let error = match fields.outcome.as_deref() {
            Some("ok") => None,
            // A call whose future was dropped (shutdown) never recorded an outcome.
            other => Some(SpanError {
                message: other.unwrap_or("interrupted").to_string(),
                data: None,
            }),
        };
        let data = SpanData::Generation {
            input,
            output,
            model: fields.model.unwrap_or_default(),
            model_config: Map::new(),
            usage: TokenUsage {
                input_tokens: fields.input_tokens.unwrap_or(0),
                output_tokens: fields.output_tokens.unwrap_or(0),
            },
        };
        (data, error)
    }

    /// A `handoff` span under the agent handing off, whose `handoffs` gains the target. The
    /// pipeline logs the handoff after the agent's span closed, so the agent is usually the
    /// job's last finished agent of that name; inside an open agent span, it is that agent.
    fn handoff<S>(&self, ctx: &Context<'_, S>, place: &Place, fields: Fields, now: DateTime<Utc>)
    where
        S: Subscriber + for<'l> LookupSpan<'l>,
    {
        let from = fields.from.unwrap_or_default();
        let to = fields.to.unwrap_or_default();
        let mut parent_id = None;
        if let Some(nearest) = place.nearest.as_ref().and_then(|id| ctx.span(id)) {
            let mut extensions = nearest.extensions_mut();
            if let Some(open) = extensions.get_mut::<OpenSpan>() {
                if let OpenKind::Agent { handoffs, .. } = &mut open.kind {
                    handoffs.push(to.clone());
                }
                parent_id = Some(open.id.clone());
            }
        } else if let Some(job) = ctx.span(&place.job) {
            let mut extensions = job.extensions_mut();
            if let Some(state) = extensions.get_mut::<JobState>() {
                let agent = state.spans.iter_mut().rev().find(
                    |span| matches!(&span.span_data, SpanData::Agent { name, .. } if *name == from),
                );
                if let Some(agent) = agent {
                    if let SpanData::Agent { handoffs, .. } = &mut agent.span_data {
                        handoffs.push(to.clone());
                    }
                    parent_id = Some(agent.id.clone());
                }
            }
        }
        let span = SpanData::Handoff {
            from_agent: from,
            to_agent: to,
        };
        push(ctx, &place.job, parent_id, now, span);
    }
}

/// Adds an instant span (an event) to its job.
fn push<S>(
    ctx: &Context<'_, S>,
    job: &Id,
    parent_id: Option<String>,
    at: DateTime<Utc>,
    span_data: SpanData,
) where
    S: Subscriber + for<'l> LookupSpan<'l>,
{
    let at = timestamp(at);
    let span = SpanObject {
        id: span_id(),
        trace_id: String::new(),
        parent_id,
        started_at: at.clone(),
        ended_at: at,
        span_data,
        error: None,
    };
    add_to_job(ctx, job, span);
}

/// Stores a finished span on its job, stamped with the job's trace id.
fn add_to_job<S>(ctx: &Context<'_, S>, job: &Id, mut span: SpanObject)
where
    S: Subscriber + for<'l> LookupSpan<'l>,
{
    let Some(job) = ctx.span(job) else { return };
    let mut extensions = job.extensions_mut();
    if let Some(state) = extensions.get_mut::<JobState>() {
        span.trace_id.clone_from(&state.trace_id);
        state.spans.push(span);
    }
}

// ---------------------------------------------------------------------------------------------
// Truncation
// ---------------------------------------------------------------------------------------------

/// Size of a value as compact JSON, the way the SDK measures a field.
fn json_size<T: Serialize + ?Sized>(value: &T) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |bytes| bytes.len())
}

/// Bytes a character takes inside a JSON string (serde_json escapes only `"`, `\` and
/// control characters).
fn escaped_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{08}' | '\u{0c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// Cuts `text` so that, as a JSON string, it takes at most `max_json_bytes`, ending with
/// [`TRUNCATION_SUFFIX`]. Unchanged if it already fits.
pub fn truncate_string(text: &str, max_json_bytes: usize) -> String {
    if json_size(text) <= max_json_bytes {
        return text.to_string();
    }
    let overhead = 2 + TRUNCATION_SUFFIX.len();
    let Some(mut budget) = max_json_bytes.checked_sub(overhead) else {
        return String::new();
    };
    let mut end = 0;
    for (index, c) in text.char_indices() {
        let cost = escaped_len(c);
        if cost > budget {
            break;
        }
        budget -= cost;
        end = index + c.len_utf8();
    }
    format!("{}{TRUNCATION_SUFFIX}", &text[..end])
}

/// Keeps a message list within [`MAX_FIELD_BYTES`] of JSON by cutting its longest contents
/// (and, if that is not enough, dropping messages), as the SDK's exporter does.
pub fn truncate_messages(mut messages: Vec<Message>) -> Vec<Message> {
    loop {
        let size = json_size(&messages);
        if size <= MAX_FIELD_BYTES {
            return messages;
        }
        let Some((index, _)) = messages
            .iter()
            .enumerate()
            .max_by_key(|(_, message)| message.content.len())
        else {
            return messages;
        };
        let content_size = json_size(&messages[index].content);
        let budget = MAX_FIELD_BYTES.saturating_sub(size - content_size);
        let cut = truncate_string(&messages[index].content, budget);
        if cut.len() >= messages[index].content.len() {
            messages.remove(index);
        } else {
            messages[index].content = cut;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;
    use serde_json::Value;

    fn keys(value: &Value) -> BTreeSet<&str> {
        value
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect()
    }

    fn set<'a>(keys: &[&'a str]) -> BTreeSet<&'a str> {
        keys.iter().copied().collect()
    }

    const TRACE_ID: &str = "trace_0123456789abcdef0123456789abcdef";

    /// Runs `body` under a subscriber holding only the layer, and returns what it queued.
    fn capture(redact: bool, queue_size: usize, body: impl FnOnce()) -> Vec<Value> {
        let config = TracesConfig {
            workflow_name: "Pictor job".to_string(),
            redact,
        };
        let (layer, mut receiver, _flush) = OpenAiTracesLayer::new(config, queue_size);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, body);
        let mut items = Vec::new();
        while let Ok(item) = receiver.try_recv() {
            items.push(serde_json::to_value(&item).expect("items serialize"));
        }
        items
    }

    /// The worker's spans and events for a create job, as the pipeline emits them.
    fn create_job(prompt: &str) {
        let job = tracing::info_span!(
            "job",
            job_id = "0190f0d5-7c1e-7000-8000-000000000001",
            trace_id = TRACE_ID,
            delivery = 1
        );
        let _job = job.enter();
        {
            let _router = tracing::info_span!("agent", agent = "router").entered();
            let call = tracing::info_span!(
                "provider_call",
                provider = "openai",
                model = "gpt-4.1-mini",
                attempt = 1u32,
                prompt,
                outcome = tracing::field::Empty,
                input_tokens = tracing::field::Empty,
                output_tokens = tracing::field::Empty,
                images = tracing::field::Empty,
            );
            call.record("outcome", "ok");
            call.record("input_tokens", 120u64);
            call.record("output_tokens", 24u64);
            call.record("images", 0u32);
        }
        tracing::info!(
            trace_event = "handoff",
            from = "router",
            to = "create",
            "Handoff"
        );
        {
            let _create = tracing::info_span!("agent", agent = "create").entered();
            let call = tracing::info_span!(
                "provider_call",
                provider = "openai",
                model = "gpt-image-2",
                attempt = 1u32,
                prompt,
                outcome = tracing::field::Empty,
                input_tokens = tracing::field::Empty,
                output_tokens = tracing::field::Empty,
                images = tracing::field::Empty,
            );
            call.record("outcome", "ok");
            call.record("input_tokens", 10u64);
            call.record("output_tokens", 2112u64);
            call.record("images", 2u32);
        }
        tracing::info!(status = "succeeded", "Job finished");
    }

    fn spans_of<'a>(items: &'a [Value], kind: &str) -> Vec<&'a Value> {
        items
            .iter()
            .filter(|item| item["object"] == "trace.span" && item["span_data"]["type"] == kind)
            .collect()
    }

    #[test]
    fn timestamps_are_python_isoformat_in_utc_and_span_ids_lowercase_hex() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-08-22T10:15:30.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(timestamp(at), "2026-08-22T10:15:30.123456+00:00");
        let whole = chrono::DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(timestamp(whole), "2026-01-02T03:04:05.000000+00:00");
        let ids: BTreeSet<String> = (0..100).map(|_| span_id()).collect();
        assert_eq!(ids.len(), 100, "random ids do not repeat");
        for id in &ids {
            assert_eq!(id.len(), 29, "{id}");
            assert!(is_lower_hex(id.strip_prefix("span_").unwrap()), "{id}");
        }
    }

    #[test]
    fn a_job_becomes_one_trace_with_agent_generation_and_handoff_spans() {
        let items = capture(false, 64, || create_job("a lighthouse at dawn"));

        let traces: Vec<&Value> = items.iter().filter(|i| i["object"] == "trace").collect();
        assert_eq!(traces.len(), 1, "{items:#?}");
        let trace = traces[0];
        assert_eq!(
            keys(trace),
            set(&["object", "id", "workflow_name", "group_id", "metadata"])
        );
        assert_eq!(trace["id"], TRACE_ID);
        assert_eq!(trace["workflow_name"], "Pictor job");
        assert_eq!(trace["group_id"], Value::Null);
        assert_eq!(
            trace["metadata"],
            serde_json::json!({"job_id": "0190f0d5-7c1e-7000-8000-000000000001"})
        );

        let span_keys = set(&[
            "object",
            "id",
            "trace_id",
            "parent_id",
            "started_at",
            "ended_at",
            "span_data",
            "error",
        ]);
        let spans: Vec<&Value> = items
            .iter()
            .filter(|i| i["object"] == "trace.span")
            .collect();
        assert_eq!(spans.len(), 5, "two agents, two generations, one handoff");
        for span in &spans {
            assert_eq!(keys(span), span_keys, "{span:#}");
            assert_eq!(span["trace_id"], TRACE_ID);
            let id = span["id"].as_str().unwrap();
            assert_eq!(id.len(), 29, "{id}");
            assert!(id.starts_with("span_"), "{id}");
            assert!(id[5..].bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
            for stamp in ["started_at", "ended_at"] {
                let stamp = span[stamp].as_str().unwrap();
                assert!(stamp.ends_with("+00:00"), "{stamp}");
                chrono::DateTime::parse_from_rfc3339(stamp).unwrap();
                assert_eq!(stamp.len(), "2026-08-22T10:15:30.123456+00:00".len());
            }
            assert!(span["started_at"].as_str() <= span["ended_at"].as_str());
        }

        let agents = spans_of(&items, "agent");
        assert_eq!(agents.len(), 2);
        let router = agents
            .iter()
            .find(|a| a["span_data"]["name"] == "router")
            .unwrap();
        let create = agents
            .iter()
            .find(|a| a["span_data"]["name"] == "create")
            .unwrap();
        for agent in [router, create] {
            assert_eq!(
                keys(&agent["span_data"]),
                set(&["type", "name", "handoffs", "tools", "output_type"])
            );
            assert_eq!(agent["parent_id"], Value::Null, "agents hang off the trace");
            assert_eq!(agent["span_data"]["tools"], serde_json::json!([]));
            assert_eq!(agent["span_data"]["output_type"], "str");
            assert_eq!(agent["error"], Value::Null);
        }
        assert_eq!(
            router["span_data"]["handoffs"],
            serde_json::json!(["create"])
        );
        assert_eq!(create["span_data"]["handoffs"], serde_json::json!([]));

        let generations = spans_of(&items, "generation");
        assert_eq!(generations.len(), 2);
        for generation in &generations {
            assert_eq!(
                keys(&generation["span_data"]),
                set(&["type", "input", "output", "model", "model_config", "usage"])
            );
            assert_eq!(
                keys(&generation["span_data"]["usage"]),
                set(&["input_tokens", "output_tokens"])
            );
            assert_eq!(
                generation["span_data"]["model_config"],
                serde_json::json!({})
            );
            assert_eq!(generation["error"], Value::Null);
        }
        let routing = generations
            .iter()
            .find(|g| g["span_data"]["model"] == "gpt-4.1-mini")
            .unwrap();
        assert_eq!(routing["parent_id"], router["id"]);
        assert_eq!(
            routing["span_data"]["usage"],
            serde_json::json!({"input_tokens": 120, "output_tokens": 24})
        );
        assert_eq!(routing["span_data"]["output"], serde_json::json!([]));
        let drawing = generations
            .iter()
            .find(|g| g["span_data"]["model"] == "gpt-image-2")
            .unwrap();
        assert_eq!(drawing["parent_id"], create["id"]);
        assert_eq!(
            drawing["span_data"]["input"],
            serde_json::json!([{"role": "user", "content": "a lighthouse at dawn"}])
        );
        assert_eq!(
            drawing["span_data"]["output"],
            serde_json::json!([{"role": "assistant", "content": "2 images"}])
        );

        let handoffs = spans_of(&items, "handoff");
        assert_eq!(handoffs.len(), 1);
        assert_eq!(
            keys(&handoffs[0]["span_data"]),
            set(&["type", "from_agent", "to_agent"])
        );
        assert_eq!(handoffs[0]["span_data"]["from_agent"], "router");
        assert_eq!(handoffs[0]["span_data"]["to_agent"], "create");
        assert_eq!(handoffs[0]["parent_id"], router["id"]);
    }

    #[test]
    fn redaction_sends_no_prompt_and_no_output() {
        let items = capture(true, 64, || create_job("my secret prompt"));
        let generations = spans_of(&items, "generation");
        assert_eq!(generations.len(), 2);
        for generation in generations {
            assert_eq!(generation["span_data"]["input"], serde_json::json!([]));
            assert_eq!(generation["span_data"]["output"], serde_json::json!([]));
        }
        let text = serde_json::to_string(&items).unwrap();
        assert!(!text.contains("my secret prompt"));
    }

    #[test]
    fn a_huge_prompt_is_cut_to_the_field_limit_with_the_marker() {
        let prompt = "é".repeat(80_000);
        let items = capture(false, 64, || create_job(&prompt));
        let generations = spans_of(&items, "generation");
        for generation in generations {
            let input = &generation["span_data"]["input"];
            let size = serde_json::to_vec(input).unwrap().len();
            assert!(size <= MAX_FIELD_BYTES, "{size}");
            assert!(
                size > MAX_FIELD_BYTES - 10,
                "cut no more than needed: {size}"
            );
            let content = input[0]["content"].as_str().unwrap();
            assert!(content.ends_with(TRUNCATION_SUFFIX));
            assert!(content.starts_with("éé"));
        }
    }

    #[test]
    fn truncation_leaves_fitting_text_alone_and_counts_escapes() {
        assert_eq!(truncate_string("short", 100), "short");
        let quotes = "\"".repeat(100);
        let cut = truncate_string(&quotes, 50);
        assert!(json_size(&cut) <= 50, "{}", json_size(&cut));
        assert!(cut.ends_with(TRUNCATION_SUFFIX));
        let exact = "a".repeat(MAX_FIELD_BYTES - 2);
        assert_eq!(truncate_string(&exact, MAX_FIELD_BYTES), exact);
        let over = "a".repeat(MAX_FIELD_BYTES - 1);
        let cut = truncate_string(&over, MAX_FIELD_BYTES);
        assert_eq!(json_size(&cut), MAX_FIELD_BYTES);
    }

    #[test]
    fn a_fallback_becomes_a_custom_span_and_a_failed_call_an_error() {
        let items = capture(false, 64, || {
            let _job = tracing::info_span!("job", job_id = "j", trace_id = TRACE_ID).entered();
            let _edit = tracing::info_span!("agent", agent = "edit").entered();
            {
                let call = tracing::info_span!(
                    "provider_call",
                    provider = "gemini",
                    model = "gemini-3.1-flash-image",
                    attempt = 1u32,
                    prompt = "make it blue",
                    outcome = tracing::field::Empty,
                    input_tokens = tracing::field::Empty,
                    output_tokens = tracing::field::Empty,
                    images = tracing::field::Empty,
                );
                call.record("outcome", "provider_unavailable");
            }
            tracing::info!(
                trace_event = "fallback",
                from = "gemini",
                to = "openai",
                "Falling back"
            );
        });
        let edit = spans_of(&items, "agent")[0];
        let custom = spans_of(&items, "custom");
        assert_eq!(custom.len(), 1);
        assert_eq!(
            keys(&custom[0]["span_data"]),
            set(&["type", "name", "data"])
        );
        assert_eq!(custom[0]["span_data"]["name"], "fallback");
        assert_eq!(
            custom[0]["span_data"]["data"],
            serde_json::json!({"from": "gemini", "to": "openai"})
        );
        assert_eq!(custom[0]["parent_id"], edit["id"]);
        let failed = spans_of(&items, "generation")[0];
        assert_eq!(
            failed["error"],
            serde_json::json!({"message": "provider_unavailable", "data": null})
        );
        assert_eq!(
            failed["span_data"]["usage"],
            serde_json::json!({"input_tokens": 0, "output_tokens": 0})
        );
    }

    #[test]
    fn a_failed_job_marks_its_last_agent() {
        let items = capture(true, 64, || {
            let _job = tracing::info_span!("job", job_id = "j", trace_id = TRACE_ID).entered();
            drop(tracing::info_span!("agent", agent = "router").entered());
            drop(tracing::info_span!("agent", agent = "create").entered());
            tracing::warn!(code = %"moderation_blocked", detail = %"x", "Job failed");
        });
        let agents = spans_of(&items, "agent");
        let create = agents
            .iter()
            .find(|a| a["span_data"]["name"] == "create")
            .unwrap();
        let router = agents
            .iter()
            .find(|a| a["span_data"]["name"] == "router")
            .unwrap();
        assert_eq!(
            create["error"],
            serde_json::json!({"message": "moderation_blocked", "data": null})
        );
        assert_eq!(router["error"], Value::Null);
    }

    #[test]
    fn spans_outside_a_job_and_jobs_without_a_trace_id_are_ignored() {
        let items = capture(false, 64, || {
            drop(tracing::info_span!("agent", agent = "router").entered());
            drop(tracing::info_span!("job", job_id = "j").entered());
            tracing::info!(trace_event = "handoff", from = "a", to = "b", "Handoff");
        });
        assert!(items.is_empty(), "{items:#?}");
    }

    #[test]
    fn a_full_queue_drops_items_instead_of_blocking() {
        let items = capture(false, 2, || create_job("p"));
        assert_eq!(items.len(), 2, "only what fits is queued");
        assert_eq!(items[0]["object"], "trace");
    }

    #[test]
    fn each_delivery_of_a_job_is_its_own_set_of_spans_under_the_same_trace() {
        let items = capture(true, 64, || {
            create_job("p");
            create_job("p");
        });
        let traces: Vec<&Value> = items.iter().filter(|i| i["object"] == "trace").collect();
        assert_eq!(traces.len(), 2);
        assert!(traces.iter().all(|t| t["id"] == TRACE_ID));
        let ids: BTreeSet<&str> = items
            .iter()
            .filter_map(|i| i.get("span_data").and(i["id"].as_str()))
            .collect();
        assert_eq!(ids.len(), 10, "span ids are never reused");
    }
}
