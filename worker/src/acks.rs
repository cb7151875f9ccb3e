//! Acks sent together. A delivery whose job's end is written is ready to be acked; instead of
//! one `basic.ack` each, the consumer sends the ready ones of a short window
//! ([`ACK_WINDOW`], or sooner once [`ACK_BATCH`] are ready) together: one `basic.ack` with
//! `multiple` for the longest run of deliveries, oldest first, that are all ready, and one each
//! for ready deliveries past a delivery still running. RabbitMQ spends about a third of the CPU
//! per message on a quorum queue's consume and ack when acks come 16 at a time
//! (`docs/benchmarks.md`, cut 21).
//!
//! Nothing changes in what an ack means: a delivery is acked only after its job's end is
//! written, so a worker that dies with acks still waiting loses nothing; the broker redelivers
//! those messages and their copies find the job ended. An ack with `multiple` never covers a
//! delivery that is still running: every delivery is counted as unsettled from its arrival
//! until it is acked, requeued or rejected, and the run stops at the first one not ready.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// How long a ready ack may wait for others to go with it.
pub const ACK_WINDOW: Duration = Duration::from_millis(5);
/// Ready acks that are sent at once, without waiting for the window.
pub const ACK_BATCH: usize = 32;

/// One channel's deliveries between their arrival and their settlement; `T` is what sends a
/// delivery's ack (its acker and prefetch slot, in the consumer).
#[derive(Debug)]
pub struct AckBatch<T> {
    unsettled: BTreeSet<u64>,
    ready: BTreeMap<u64, T>,
}

/// What one flush sends.
#[derive(Debug, PartialEq, Eq)]
pub struct Flush<T> {
    /// The oldest unsettled deliveries, all ready, in order: acked together by the last one's
    /// tag with `multiple` (alone when there is one).
    pub run: Vec<(u64, T)>,
    /// Ready deliveries past one still running: acked one by one.
    pub singles: Vec<(u64, T)>,
}

impl<T> Default for AckBatch<T> {
    fn default() -> Self {
        Self {
            unsettled: BTreeSet::new(),
            ready: BTreeMap::new(),
        }
    }
}

impl<T> AckBatch<T> {
    /// A delivery arrived (before its job starts).
    pub fn delivered(&mut self, tag: u64) {
        self.unsettled.insert(tag);
    }

    /// A delivery was requeued or rejected on its own.
    pub fn settled(&mut self, tag: u64) {
        self.unsettled.remove(&tag);
        self.ready.remove(&tag);
    }

    /// A delivery's job ended: its ack waits for the next flush. Answers how many wait.
    pub fn ready(&mut self, tag: u64, sender: T) -> usize {
        self.ready.insert(tag, sender);
        self.ready.len()
    }

    pub fn waiting(&self) -> usize {
        self.ready.len()
    }

    /// Takes every ready ack, split into the run [`Flush::run`] covers and the rest.
    pub fn take(&mut self) -> Flush<T> {
        let mut run = Vec::new();
        while let Some(&oldest) = self.unsettled.first() {
            let Some(sender) = self.ready.remove(&oldest) else {
                break;
            };
            self.unsettled.remove(&oldest);
            run.push((oldest, sender));
        }
        let singles: Vec<(u64, T)> = std::mem::take(&mut self.ready).into_iter().collect();
        for (tag, _) in &singles {
            self.unsettled.remove(tag);
        }
        Flush { run, singles }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(delivered: &[u64]) -> AckBatch<&'static str> {
        let mut batch = AckBatch::default();
        for &tag in delivered {
            batch.delivered(tag);
        }
        batch
    }

    fn tags(items: &[(u64, &str)]) -> Vec<u64> {
        items.iter().map(|(tag, _)| *tag).collect()
    }

    #[test]
    fn the_oldest_ready_deliveries_go_as_one_run_and_stop_at_one_still_running() {
        let mut acks = batch(&[1, 2, 3, 4, 5, 6]);
        for tag in [2, 1, 3, 5, 6] {
            acks.ready(tag, "ack");
        }
        let flush = acks.take();
        assert_eq!(
            tags(&flush.run),
            [1, 2, 3],
            "4 still runs: the run ends at 3"
        );
        assert_eq!(tags(&flush.singles), [5, 6], "past 4, one by one");
        assert_eq!(acks.waiting(), 0);

        // 4 ends later: it is the oldest unsettled, so it goes alone, and nothing is acked twice.
        acks.ready(4, "ack");
        let flush = acks.take();
        assert_eq!(tags(&flush.run), [4]);
        assert!(flush.singles.is_empty());
    }

    #[test]
    fn a_requeued_or_rejected_delivery_does_not_hold_back_the_run_after_it() {
        let mut acks = batch(&[10, 11, 12]);
        acks.ready(12, "ack");
        acks.ready(10, "ack");
        acks.settled(11);
        let flush = acks.take();
        assert_eq!(tags(&flush.run), [10, 12]);
        assert!(flush.singles.is_empty());
    }

    #[test]
    fn a_run_never_covers_a_delivery_that_is_not_ready() {
        let mut acks = batch(&[1, 2, 3]);
        acks.ready(3, "ack");
        let flush = acks.take();
        assert!(flush.run.is_empty(), "1 and 2 still run");
        assert_eq!(tags(&flush.singles), [3]);
        // A delivery that arrives after a flush joins the next one's count.
        acks.delivered(4);
        acks.ready(1, "ack");
        acks.ready(4, "ack");
        let flush = acks.take();
        assert_eq!(tags(&flush.run), [1]);
        assert_eq!(tags(&flush.singles), [4]);
    }
}
