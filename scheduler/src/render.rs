//! One small document model for every report and alert, rendered three ways: plain text (the
//! email's text part and Slack's notification fallback), HTML with inline styles (mail clients
//! ignore style sheets), and Slack Block Kit blocks. Writing a report once as a [`Doc`] keeps the
//! three renderings from drifting apart, and every piece of text is escaped for its target here,
//! so a user id can never inject HTML or Slack markup.
//!
//! Also the number formats all reports share: money, percentages, deltas and durations.

use serde_json::{Value, json};
use shared::pricing::format_usd;

use crate::deliver::{Attachment, Message};

/// A report or alert before rendering.
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    pub title: String,
    pub blocks: Vec<Block>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    /// A section title.
    Heading(String),
    /// `label: value` lines.
    Facts(Vec<(String, String)>),
    /// A table; the first column is left-aligned, the others (numbers) right-aligned.
    Table {
        columns: Vec<String>,
        rows: Vec<Vec<String>>,
    },
    /// A paragraph.
    Text(String),
    /// A link on a line of its own.
    Link { label: String, url: String },
    /// Small print.
    Note(String),
}

/// Slack allows 10 fields per section and 3,000 characters per text.
const SLACK_FIELDS_PER_SECTION: usize = 10;
const SLACK_TEXT_LIMIT: usize = 2900;
const SLACK_HEADER_LIMIT: usize = 150;

impl Doc {
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            blocks: Vec::new(),
        }
    }

    pub fn push(&mut self, block: Block) -> &mut Self {
        self.blocks.push(block);
        self
    }

    /// The message for every channel.
    pub fn into_message(self, subject: String, attachments: Vec<Attachment>) -> Message {
        Message {
            subject,
            text: self.text(),
            html: self.html(),
            slack_blocks: self.slack(),
            attachments,
        }
    }

    pub fn text(&self) -> String {
        let mut out = format!("{}\n", self.title);
        for block in &self.blocks {
            match block {
                Block::Heading(heading) => out.push_str(&format!("\n{heading}\n")),
                Block::Facts(facts) => {
                    for (label, value) in facts {
                        out.push_str(&format!("  {label}: {value}\n"));
                    }
                }
                Block::Table { columns, rows } => {
                    for line in aligned(columns, rows) {
                        out.push_str(&format!("  {line}\n"));
                    }
                }
                Block::Text(text) => out.push_str(&format!("\n{text}\n")),
                Block::Link { label, url } => out.push_str(&format!("{label}: {url}\n")),
                Block::Note(note) => out.push_str(&format!("\n{note}\n")),
            }
        }
        out
    }

    pub fn html(&self) -> String {
        const CELL: &str = "padding:4px 10px;border:1px solid #d0d7de";
        let mut out = String::from(
            "<!DOCTYPE html>\n<html><body style=\"margin:0;padding:16px;font-family:Arial,\
             Helvetica,sans-serif;font-size:14px;color:#1f2328\">\n",
        );
        out.push_str(&format!(
            "<h2 style=\"margin:0 0 12px;font-size:18px\">{}</h2>\n",
            escape_html(&self.title)
        ));
        for block in &self.blocks {
            match block {
                Block::Heading(heading) => out.push_str(&format!(
                    "<h3 style=\"margin:18px 0 6px;font-size:15px\">{}</h3>\n",
                    escape_html(heading)
                )),
                Block::Facts(facts) => {
                    out.push_str("<table style=\"border-collapse:collapse;margin:6px 0\">\n");
                    for (label, value) in facts {
                        out.push_str(&format!(
                            "<tr><td style=\"padding:2px 16px 2px 0;color:#57606a\">{}</td>\
                             <td style=\"padding:2px 0;font-weight:bold\">{}</td></tr>\n",
                            escape_html(label),
                            escape_html(value)
                        ));
                    }
                    out.push_str("</table>\n");
                }
                Block::Table { columns, rows } => {
                    out.push_str("<table style=\"border-collapse:collapse;margin:6px 0\">\n<tr>");
                    for (index, column) in columns.iter().enumerate() {
                        out.push_str(&format!(
                            "<th style=\"{CELL};background:#f6f8fa;text-align:{}\">{}</th>",
                            align(index),
                            escape_html(column)
                        ));
                    }
                    out.push_str("</tr>\n");
                    for row in rows {
                        out.push_str("<tr>");
                        for (index, cell) in row.iter().enumerate() {
                            out.push_str(&format!(
                                "<td style=\"{CELL};text-align:{}\">{}</td>",
                                align(index),
                                escape_html(cell)
                            ));
                        }
                        out.push_str("</tr>\n");
                    }
                    out.push_str("</table>\n");
                }
                Block::Text(text) => out.push_str(&format!(
                    "<p style=\"margin:12px 0\">{}</p>\n",
                    escape_html(text)
                )),
                Block::Link { label, url } => out.push_str(&format!(
                    "<p style=\"margin:12px 0\"><a href=\"{}\">{}</a></p>\n",
                    escape_html(url),
                    escape_html(label)
                )),
                Block::Note(note) => out.push_str(&format!(
                    "<p style=\"margin:16px 0 0;font-size:12px;color:#57606a\">{}</p>\n",
                    escape_html(note)
                )),
            }
        }
        out.push_str("</body></html>\n");
        out
    }

    pub fn slack(&self) -> Value {
        let mut blocks = vec![json!({
            "type": "header",
            "text": {"type": "plain_text", "text": truncate(&self.title, SLACK_HEADER_LIMIT)},
        })];
        for block in &self.blocks {
            match block {
                Block::Heading(heading) => blocks.push(mrkdwn_section(&format!(
                    "*{}*",
                    escape_slack(heading)
                ))),
                Block::Facts(facts) => {
                    for chunk in facts.chunks(SLACK_FIELDS_PER_SECTION) {
                        let fields: Vec<Value> = chunk
                            .iter()
                            .map(|(label, value)| {
                                json!({
                                    "type": "mrkdwn",
                                    "text": truncate(
                                        &format!("*{}*\n{}", escape_slack(label), escape_slack(value)),
                                        1900,
                                    ),
                                })
                            })
                            .collect();
                        blocks.push(json!({"type": "section", "fields": fields}));
                    }
                }
                Block::Table { columns, rows } => {
                    let table = aligned(columns, rows).join("\n");
                    blocks.push(mrkdwn_section(&format!(
                        "```\n{}\n```",
                        truncate(&escape_slack(&table), SLACK_TEXT_LIMIT - 8)
                    )));
                }
                Block::Text(text) => blocks.push(mrkdwn_section(&escape_slack(text))),
                Block::Link { label, url } => blocks.push(mrkdwn_section(&format!(
                    "<{}|{}>",
                    escape_slack(url),
                    escape_slack(label)
                ))),
                Block::Note(note) => blocks.push(json!({
                    "type": "context",
                    "elements": [{"type": "mrkdwn", "text": truncate(&escape_slack(note), SLACK_TEXT_LIMIT)}],
                })),
            }
        }
        Value::Array(blocks)
    }
}

fn mrkdwn_section(text: &str) -> Value {
    json!({"type": "section", "text": {"type": "mrkdwn", "text": truncate(text, SLACK_TEXT_LIMIT)}})
}

fn align(column: usize) -> &'static str {
    if column == 0 { "left" } else { "right" }
}

/// The table as lines of padded columns.
fn aligned(columns: &[String], rows: &[Vec<String>]) -> Vec<String> {
    let mut widths: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
    for row in rows {
        for (index, cell) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(index) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }
    std::iter::once(columns)
        .chain(rows.iter().map(Vec::as_slice))
        .map(|row| {
            row.iter()
                .enumerate()
                .map(|(index, cell)| {
                    let width = widths.get(index).copied().unwrap_or(0);
                    if index == 0 {
                        format!("{cell:<width$}")
                    } else {
                        format!("{cell:>width$}")
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect()
}

pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            other => out.push(other),
        }
    }
    out
}

/// Slack's mrkdwn escaping: only `&`, `<` and `>` are control characters.
pub fn escape_slack(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn truncate(text: &str, limit: usize) -> String {
    match text.char_indices().nth(limit.saturating_sub(1)) {
        Some((cut, _)) if text.chars().count() > limit => format!("{}…", &text[..cut]),
        _ => text.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Number formats
// ---------------------------------------------------------------------------------------------

/// Dollars, exact: two decimals when the amount is whole cents (`$70.00`), else six
/// (`$0.173475`), never rounded.
pub fn usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let magnitude = micros.unsigned_abs();
    if magnitude.is_multiple_of(10_000) {
        format!(
            "{sign}${}.{:02}",
            magnitude / 1_000_000,
            magnitude % 1_000_000 / 10_000
        )
    } else {
        format!(
            "{sign}${}",
            format_usd(i64::try_from(magnitude).unwrap_or(i64::MAX))
        )
    }
}

/// A change in dollars with its sign: `+$0.073475`, `-$1.00`, `±$0.00`.
pub fn usd_delta(micros: i64) -> String {
    match micros.signum() {
        0 => "±$0.00".to_string(),
        1 => format!("+{}", usd(micros)),
        _ => usd(micros),
    }
}

/// A change in a count with its sign: `+4`, `-3`, `±0`.
pub fn count_delta(delta: i64) -> String {
    match delta.signum() {
        0 => "±0".to_string(),
        1 => format!("+{delta}"),
        _ => delta.to_string(),
    }
}

/// `part / whole` in tenths of a percent, rounded half up; `None` when `whole` is zero.
pub fn tenths_of_percent(part: i64, whole: i64) -> Option<i64> {
    (whole > 0).then(|| {
        let (part, whole) = (i128::from(part), i128::from(whole));
        i64::try_from((part * 1000 * 2 + whole) / (whole * 2)).unwrap_or(i64::MAX)
    })
}

/// Tenths of a percent as text: `83.3%`.
pub fn percent(tenths: i64) -> String {
    let sign = if tenths < 0 { "-" } else { "" };
    let magnitude = tenths.unsigned_abs();
    format!("{sign}{}.{}%", magnitude / 10, magnitude % 10)
}

/// `part / whole` as a percentage, or `n/a` with nothing to divide by.
pub fn ratio(part: i64, whole: i64) -> String {
    tenths_of_percent(part, whole).map_or_else(|| "n/a".to_string(), percent)
}

/// A change in percentage points: `+3.3 pts`.
pub fn points_delta(tenths: i64) -> String {
    let magnitude = tenths.unsigned_abs();
    let sign = match tenths.signum() {
        0 => "±",
        1 => "+",
        _ => "-",
    };
    format!("{sign}{}.{} pts", magnitude / 10, magnitude % 10)
}

/// `1 call`, `3 calls`.
pub fn count_of(count: i64, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// A histogram bucket bound in seconds: `2.5 s`, or `over 120 s` for the overflow bucket.
pub fn seconds(bound: Option<f64>) -> String {
    match bound {
        None => "n/a".to_string(),
        Some(bound) if bound.is_infinite() => {
            let largest = shared::telemetry::metrics::SECONDS_BUCKETS
                .last()
                .copied()
                .unwrap_or(120.0);
            format!("over {largest} s")
        }
        Some(bound) => format!("{bound} s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Doc {
        let mut doc = Doc::new("Report <1>");
        doc.push(Block::Heading("Users".into()))
            .push(Block::Facts(vec![("Spent".into(), "$1.00".into())]))
            .push(Block::Table {
                columns: vec!["user".into(), "cost".into()],
                rows: vec![
                    vec!["<b>evil&co</b>".into(), "$0.100000".into()],
                    vec!["bob".into(), "$12.00".into()],
                ],
            })
            .push(Block::Link {
                label: "Runbook".into(),
                url: "https://example.com/a.md?x=1&y=2".into(),
            })
            .push(Block::Note("Small print".into()));
        doc
    }

    #[test]
    fn text_aligns_tables_and_lists_facts() {
        let text = sample().text();
        assert_eq!(
            text,
            "Report <1>\n\nUsers\n  Spent: $1.00\n  user                 cost\n  \
             <b>evil&co</b>  $0.100000\n  bob                $12.00\n\
             Runbook: https://example.com/a.md?x=1&y=2\n\nSmall print\n"
        );
    }

    #[test]
    fn html_escapes_every_piece_of_text() {
        let html = sample().html();
        assert!(html.contains("&lt;b&gt;evil&amp;co&lt;/b&gt;"), "{html}");
        assert!(!html.contains("<b>evil"), "{html}");
        assert!(html.contains("Report &lt;1&gt;"), "{html}");
        assert!(
            html.contains("href=\"https://example.com/a.md?x=1&amp;y=2\""),
            "{html}"
        );
    }

    #[test]
    fn slack_gets_a_header_fields_a_code_table_and_context() {
        let blocks = sample().slack();
        let blocks = blocks.as_array().unwrap();
        assert_eq!(blocks[0]["type"], "header");
        assert_eq!(blocks[0]["text"]["text"], "Report <1>");
        assert_eq!(blocks[2]["fields"][0]["text"], "*Spent*\n$1.00");
        let table = blocks[3]["text"]["text"].as_str().unwrap();
        assert!(table.starts_with("```\n"), "{table}");
        assert!(table.contains("&lt;b&gt;evil&amp;co&lt;/b&gt;"), "{table}");
        assert_eq!(
            blocks[4]["text"]["text"],
            "<https://example.com/a.md?x=1&amp;y=2|Runbook>"
        );
        assert_eq!(blocks[5]["type"], "context");
    }

    #[test]
    fn money_is_exact_and_short_when_it_can_be() {
        assert_eq!(usd(70_000_000), "$70.00");
        assert_eq!(usd(173_475), "$0.173475");
        assert_eq!(usd(100_000), "$0.10");
        assert_eq!(usd(0), "$0.00");
        assert_eq!(usd_delta(73_475), "+$0.073475");
        assert_eq!(usd_delta(-1_000_000), "-$1.00");
        assert_eq!(usd_delta(0), "±$0.00");
    }

    #[test]
    fn percentages_round_half_up_to_a_tenth() {
        assert_eq!(ratio(20, 24), "83.3%");
        assert_eq!(ratio(1, 8), "12.5%");
        assert_eq!(ratio(2, 3), "66.7%");
        assert_eq!(ratio(1, 0), "n/a");
        assert_eq!(points_delta(-33), "-3.3 pts");
        assert_eq!(count_delta(4), "+4");
        assert_eq!(count_delta(0), "±0");
        assert_eq!(seconds(Some(2.5)), "2.5 s");
        assert_eq!(seconds(Some(30.0)), "30 s");
        assert_eq!(seconds(Some(f64::INFINITY)), "over 120 s");
    }
}
