//! The monthly export: the month's billed calls as the same FOCUS CSV the api serves
//! (`shared::costs`), written to the object store as `exports/pictor-costs-YYYY-MM.csv`,
//! attached to an email and announced on Slack with its totals.
//!
//! The totals are summed from the rows written, so what the message says is what the file holds;
//! they are checked against the month's ledger aggregates, and a difference (aggregates damaged
//! or rebuilt meanwhile) is called out in the message instead of being hidden.

use std::collections::BTreeMap;

use bytes::Bytes;
use shared::costs::{CALL_COLUMNS, call_row, encode, service_name};
use shared::images::ImageStore;
use shared::ledger::{Ledger, Month};

use crate::deliver::{Attachment, Message};
use crate::render::{Block, Doc, count_of, usd};

/// Ledger entries read per round trip.
const LEDGER_BATCH: usize = 1000;
/// Larger files are not attached (mail servers refuse big messages); the email says where the
/// file is instead.
pub const MAX_ATTACHMENT_BYTES: usize = 10 * 1024 * 1024;

/// The export of one month.
#[derive(Debug, Clone, PartialEq)]
pub struct Export {
    pub month: Month,
    pub csv: Bytes,
    pub calls: i64,
    pub total: i64,
    /// (micro-dollars, calls) by provider.
    pub by_provider: BTreeMap<String, (i64, i64)>,
    /// The month's total according to the ledger aggregates.
    pub aggregate_total: i64,
}

impl Export {
    /// The object store path and attachment name: predictable, one per month.
    pub fn file_name(month: Month) -> String {
        format!("pictor-costs-{month}.csv")
    }

    pub fn object_path(month: Month) -> String {
        format!("exports/{}", Self::file_name(month))
    }

    /// Reads the month's ledger into the CSV and its totals.
    pub async fn build(ledger: &Ledger, month: Month) -> anyhow::Result<Self> {
        let mut csv = Vec::new();
        let mut calls = 0;
        let mut total = 0;
        let mut by_provider: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        let mut after: Option<String> = None;
        let mut header = Some(&CALL_COLUMNS[..]);
        loop {
            let (entries, last) = ledger
                .entries(month, after.as_deref(), LEDGER_BATCH)
                .await?;
            for entry in &entries {
                calls += 1;
                total += entry.cost_micros;
                let provider = by_provider.entry(entry.usage.provider.clone()).or_default();
                provider.0 += entry.cost_micros;
                provider.1 += 1;
            }
            if header.is_some() || !entries.is_empty() {
                csv.extend_from_slice(&encode(header.take(), entries.iter().map(call_row))?);
            }
            match last {
                Some(last) => after = Some(last),
                None => break,
            }
        }
        Ok(Self {
            month,
            csv: Bytes::from(csv),
            calls,
            total,
            by_provider,
            aggregate_total: ledger.spent(month).await?,
        })
    }

    /// Writes the file to the object store.
    pub async fn store(&self, store: &ImageStore) -> anyhow::Result<()> {
        let path = object_store_path(&Self::object_path(self.month));
        store.put(&path, self.csv.clone()).await?;
        Ok(())
    }

    pub fn message(&self, location: &str) -> Message {
        let mut doc = Doc::new(format!("Pictor costs of {}", self.month));
        let mut facts = vec![
            ("Billed calls".to_string(), self.calls.to_string()),
            ("Total (BilledCost)".to_string(), usd(self.total)),
        ];
        for (provider, (micros, calls)) in &self.by_provider {
            facts.push((
                service_name(provider),
                format!("{} in {}", usd(*micros), count_of(*calls, "call")),
            ));
        }
        facts.push(("File".to_string(), location.to_string()));
        doc.push(Block::Facts(facts));
        if self.aggregate_total != self.total {
            doc.push(Block::Text(format!(
                "The ledger entries add up to {} but the month's aggregates say {}: run \
                 `pictor admin costs rebuild --month {}` to recompute the aggregates.",
                usd(self.total),
                usd(self.aggregate_total),
                self.month
            )));
        }
        let attached = self.csv.len() <= MAX_ATTACHMENT_BYTES;
        doc.push(Block::Note(if attached {
            format!(
                "The CSV ({} bytes, one row per billed call, FOCUS column names) is attached to \
                 the email and is the same as GET /v1/costs/export.csv?month={}.",
                self.csv.len(),
                self.month
            )
        } else {
            format!(
                "The CSV ({} bytes) is too large to attach; fetch it from the object store or \
                 from GET /v1/costs/export.csv?month={}.",
                self.csv.len(),
                self.month
            )
        }));
        let attachments = if attached {
            vec![Attachment {
                filename: Self::file_name(self.month),
                content_type: "text/csv; charset=utf-8".to_string(),
                bytes: self.csv.clone(),
            }]
        } else {
            Vec::new()
        };
        let subject = format!(
            "[Pictor] Costs of {}: {} in {}",
            self.month,
            usd(self.total),
            count_of(self.calls, "call")
        );
        doc.into_message(subject, attachments)
    }
}

fn object_store_path(path: &str) -> object_store::path::Path {
    object_store::path::Path::from(path)
}
