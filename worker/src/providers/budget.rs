//! Bounds the memory a worker spends on provider responses.
//!
//! An image answer is a JSON body of a few MiB (the image in base64), and a worker keeps
//! hundreds of calls in flight. Calls that started together tend to answer together, and reading
//! every answer at once would hold all of them, and the images decoded from them, in memory at
//! the same time. A response therefore reads its body only once the worker's budget has room for
//! the body and for what will be decoded from it; until then it waits in its socket, where the
//! kernel and TCP flow control hold it for free.

use std::num::NonZeroU32;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The size assumed for a body that does not announce its length: about one 1024×1024 PNG in
/// base64.
const UNANNOUNCED_BODY_BYTES: u64 = 4 << 20;

/// The worker's response budget, shared by all its provider clients. Cloning shares it.
#[derive(Debug, Clone)]
pub struct ResponseBudget {
    permits: Arc<Semaphore>,
    capacity_kib: u32,
}

/// A body read under the budget. Its share goes back to the budget once the body and every
/// [`BudgetShare`] taken from it are dropped: images decoded from the body carry one until they
/// are stored.
#[derive(Debug)]
pub struct HeldBody {
    pub bytes: Bytes,
    share: BudgetShare,
}

impl HeldBody {
    /// A handle on this body's share of the budget, for what is decoded from it.
    pub fn share(&self) -> BudgetShare {
        self.share.clone()
    }
}

/// Keeps a body's share of the budget taken while something decoded from it is alive. Carries
/// no data: two shares compare equal.
#[derive(Clone, Default)]
pub struct BudgetShare(Option<Arc<OwnedSemaphorePermit>>);

impl std::fmt::Debug for BudgetShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kib = self.0.as_ref().map_or(0, |permit| permit.num_permits());
        write!(f, "BudgetShare({kib} KiB)")
    }
}

impl PartialEq for BudgetShare {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for BudgetShare {}

impl ResponseBudget {
    pub fn new(mib: NonZeroU32) -> Self {
        let capacity_kib = mib.get().saturating_mul(1024);
        Self {
            permits: Arc::new(Semaphore::new(capacity_kib as usize)),
            capacity_kib,
        }
    }

    /// The share of the budget a body of `length` bytes takes: the body, plus the three
    /// quarters of it that base64 decodes to, in KiB. One body alone always fits.
    fn share_kib(&self, length: Option<u64>) -> u32 {
        let bytes = length.unwrap_or(UNANNOUNCED_BODY_BYTES);
        let kib = bytes.saturating_mul(7).div_ceil(4).div_ceil(1024);
        u32::try_from(kib)
            .unwrap_or(u32::MAX)
            .clamp(1, self.capacity_kib)
    }

    /// Waits until the budget has room for `response`'s body, then reads it.
    pub async fn read(&self, response: reqwest::Response) -> Result<HeldBody, reqwest::Error> {
        let share = self.share_kib(response.content_length());
        // The semaphore is never closed, so this only fails in theory; read unbounded then.
        let share = self.permits.clone().acquire_many_owned(share).await.ok();
        let bytes = response.bytes().await?;
        Ok(HeldBody {
            bytes,
            share: BudgetShare(share.map(Arc::new)),
        })
    }

    /// KiB of the budget free right now.
    pub fn available_kib(&self) -> usize {
        self.permits.available_permits()
    }
}

impl Default for ResponseBudget {
    /// The shipped default, 32 MiB.
    fn default() -> Self {
        Self::new(NonZeroU32::new(32).unwrap_or(NonZeroU32::MIN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(mib: u32) -> ResponseBudget {
        ResponseBudget::new(NonZeroU32::new(mib).expect("non-zero"))
    }

    #[test]
    fn a_body_takes_itself_plus_what_it_decodes_to() {
        let budget = budget(64);
        assert_eq!(budget.share_kib(Some(4096)), 7);
        assert_eq!(budget.share_kib(Some(1)), 1);
        assert_eq!(budget.share_kib(None), 7 * 1024);
    }

    #[test]
    fn a_body_larger_than_the_budget_still_fits_alone() {
        let budget = budget(1);
        assert_eq!(budget.share_kib(Some(50 << 20)), 1024);
    }

    #[tokio::test]
    async fn a_body_waits_until_earlier_ones_are_released() {
        let server = wiremock::MockServer::start().await;
        wiremock::Mock::given(wiremock::matchers::any())
            .respond_with(
                wiremock::ResponseTemplate::new(200).set_body_bytes(vec![b'a'; 400 << 10]),
            )
            .mount(&server)
            .await;
        // 400 KiB bodies take 700 KiB each: one fits in 1 MiB, two do not.
        let budget = budget(1);
        let client = reqwest::Client::new();
        let first = budget
            .read(client.get(server.uri()).send().await.expect("sent"))
            .await
            .expect("read");
        assert_eq!(first.bytes.len(), 400 << 10);
        assert_eq!(budget.available_kib(), 1024 - 700);
        let second = tokio::spawn({
            let budget = budget.clone();
            let response = client.get(server.uri()).send().await.expect("sent");
            async move { budget.read(response).await.map(|held| held.bytes.len()) }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!second.is_finished(), "the second body waited for room");
        let decoded = first.share();
        drop(first);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(
            !second.is_finished(),
            "what was decoded from the first body still holds its share"
        );
        drop(decoded);
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), second)
            .await
            .expect("the second body was read once the first was released")
            .expect("joined")
            .expect("read");
        assert_eq!(second, 400 << 10);
        assert_eq!(budget.available_kib(), 1024);
    }
}
