//! Bounds the memory a worker spends on provider responses, and keeps what it spends warm.
//!
//! An image answer is a JSON body of a few MiB (the image in base64), and a worker keeps
//! hundreds of calls in flight. Calls that started together tend to answer together, and reading
//! every answer at once would hold all of them, and the images decoded from them, in memory at
//! the same time. A response therefore reads its body only once the worker's budget has room for
//! the body and for what will be decoded from it; until then it waits in its socket, where the
//! kernel and TCP flow control hold it for free.
//!
//! Large bodies are read into buffers the budget keeps for reuse (at most its own capacity of
//! them), and images are decoded from base64 in place, inside the body they arrived in: a fresh
//! multi-MiB allocation per answer costs a page fault per 4 KiB, zeroed by the kernel, which at
//! a hundred answers a second was more of the worker's time than decoding them.
//!
//! A body is also capped per provider (`openai.max_response_mib`, `gemini.max_response_mib`): an
//! answer that announces more is refused before anything is allocated or any share of the budget
//! is waited for, and a body without a length stops being read once it passes the cap. Below the
//! cap, a body larger than the whole budget takes the whole budget and is read alone.

use std::borrow::Cow;
use std::num::NonZeroU32;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The size assumed for a body that does not announce its length: about one 1024×1024 PNG in
/// base64.
const UNANNOUNCED_BODY_BYTES: u64 = 4 << 20;

/// Bodies smaller than this are read into fresh memory and not kept: the allocator serves them
/// well, and the pool is for the image answers.
const POOLED_MIN_BYTES: usize = 64 << 10;

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The connection failed or timed out while the body was read.
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
    /// The body is larger than the provider's cap: its `Content-Length` said so (`announced`,
    /// nothing was read), or more than the cap arrived without one.
    #[error("{}", too_large(*max_bytes, *announced))]
    TooLarge {
        max_bytes: u64,
        announced: Option<u64>,
    },
}

fn too_large(max_bytes: u64, announced: Option<u64>) -> String {
    let cap = format!("the {} MiB cap", max_bytes >> 20);
    match announced {
        Some(length) => format!("the answer announces {length} bytes, more than {cap}"),
        None => format!("the answer passed {cap} while it was read (no content-length)"),
    }
}

/// Megabytes as the bytes a body cap allows.
pub fn cap_bytes(mib: NonZeroU32) -> u64 {
    u64::from(mib.get()) << 20
}

/// The worker's response budget, shared by all its provider clients. Cloning shares it.
#[derive(Debug, Clone)]
pub struct ResponseBudget {
    permits: Arc<Semaphore>,
    capacity_kib: u32,
    pool: Arc<BufferPool>,
}

/// Buffers of finished bodies, kept for the next ones; never more bytes than the budget's
/// capacity, which the bodies in flight could take anyway.
#[derive(Debug, Default)]
struct BufferPool {
    capacity_bytes: usize,
    idle: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// An empty buffer of at least `length` bytes' capacity: a kept one when there is one.
    fn take(&self, length: usize) -> Vec<u8> {
        if length < POOLED_MIN_BYTES {
            return Vec::with_capacity(length);
        }
        let kept = self.idle.lock().map_or(None, |mut idle| {
            // The largest first: bodies of one kind of answer are about the same size.
            let index = (0..idle.len()).max_by_key(|&index| idle[index].capacity())?;
            Some(idle.swap_remove(index))
        });
        let mut buffer = kept.unwrap_or_default();
        buffer.reserve_exact(length);
        buffer
    }

    fn give_back(&self, mut buffer: Vec<u8>) {
        if buffer.capacity() < POOLED_MIN_BYTES {
            return;
        }
        buffer.clear();
        if let Ok(mut idle) = self.idle.lock() {
            let kept: usize = idle.iter().map(Vec::capacity).sum();
            if kept + buffer.capacity() <= self.capacity_bytes {
                idle.push(buffer);
            }
        }
    }
}

/// A body's buffer; goes back to the pool when dropped. It is also the owner behind the
/// [`Bytes`] of images decoded in place, so the buffer returns once the last image is stored.
#[derive(Debug)]
struct PooledBuffer {
    buffer: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for PooledBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.buffer
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buffer));
    }
}

/// A body read under the budget. Its share goes back to the budget once the body and every
/// [`BudgetShare`] taken from it are dropped: images decoded from the body carry one until they
/// are stored.
#[derive(Debug)]
pub struct HeldBody {
    body: PooledBuffer,
    share: BudgetShare,
}

/// A base64 JSON string of a body, as the body's own bytes.
///
/// Parsed as bytes, which serde_json finds the end of with a SIMD search for the closing quote;
/// as a `str` it would check every byte for control characters and then for UTF-8 (base64
/// decoding rejects both anyway), which took longer than decoding. A bare `Cow` field would
/// also be copied: serde borrows a `Cow` only when it is the field itself, hence the newtype.
#[derive(Debug, serde::Deserialize)]
pub struct Base64Field<'a>(#[serde(borrow)] Cow<'a, [u8]>);

/// Where one base64 image of a body is, found while the body was parsed.
#[derive(Debug)]
pub enum Encoded {
    /// The base64 is these bytes of the body, as it is when the JSON string has no escapes.
    InBody(Range<usize>),
    /// The JSON string had escapes (a sender may write `/` as `\/`), so it was copied.
    Copied(Vec<u8>),
}

impl HeldBody {
    /// A body that was not read under any budget, as a test has it.
    #[cfg(test)]
    pub fn unbudgeted(bytes: Vec<u8>) -> Self {
        Self {
            body: PooledBuffer {
                buffer: bytes,
                pool: Arc::default(),
            },
            share: BudgetShare::default(),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.body.buffer
    }

    /// A handle on this body's share of the budget, for what is decoded from it.
    pub fn share(&self) -> BudgetShare {
        self.share.clone()
    }

    /// Where `field`, parsed from this body, is: a range of the body, or a copy when the JSON
    /// string had escapes.
    pub fn locate(&self, field: &Base64Field<'_>) -> Encoded {
        let text: &[u8] = &field.0;
        let body = self.bytes();
        let start = (text.as_ptr() as usize).wrapping_sub(body.as_ptr() as usize);
        if start.saturating_add(text.len()) <= body.len() {
            Encoded::InBody(start..start + text.len())
        } else {
            Encoded::Copied(text.to_vec())
        }
    }

    /// Decodes the base64 `images` of this body, in place where they are in the body: the
    /// decoded images share its buffer, which returns to the pool when the last of them is
    /// dropped. The error carries the index of the first image that is not base64.
    pub fn decode(self, images: Vec<Encoded>) -> Result<Vec<Bytes>, (usize, base64_simd::Error)> {
        /// A decoded image: where it is in the body, or its own bytes.
        enum Piece {
            InBody(Range<usize>),
            Own(Bytes),
        }
        // The caller holds a share for the images; the body's own goes with it.
        let HeldBody { mut body, share: _ } = self;
        let mut pieces = Vec::with_capacity(images.len());
        for (index, image) in images.into_iter().enumerate() {
            let piece = match image {
                Encoded::InBody(range) => {
                    let start = range.start;
                    let decoded = base64_simd::STANDARD
                        .decode_inplace(&mut body.buffer[range])
                        .map_err(|error| (index, error))?;
                    Piece::InBody(start..start + decoded.len())
                }
                Encoded::Copied(text) => Piece::Own(Bytes::from(
                    base64_simd::STANDARD
                        .decode_to_vec(&text)
                        .map_err(|error| (index, error))?,
                )),
            };
            pieces.push(piece);
        }
        let shared = Bytes::from_owner(body);
        Ok(pieces
            .into_iter()
            .map(|piece| match piece {
                Piece::InBody(range) => shared.slice(range),
                Piece::Own(bytes) => bytes,
            })
            .collect())
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
            pool: Arc::new(BufferPool {
                capacity_bytes: capacity_kib as usize * 1024,
                idle: Mutex::default(),
            }),
        }
    }

    /// The share of the budget a body of `length` bytes takes, in KiB: the body itself, since
    /// its images are decoded inside it. One body alone always fits.
    fn share_kib(&self, length: Option<u64>) -> u32 {
        let bytes = length.unwrap_or(UNANNOUNCED_BODY_BYTES);
        let kib = bytes.div_ceil(1024);
        u32::try_from(kib)
            .unwrap_or(u32::MAX)
            .clamp(1, self.capacity_kib)
    }

    /// Waits until the budget has room for `response`'s body, then reads it into a buffer of
    /// its announced length (a kept one when the pool has one). A body larger than `max_bytes`
    /// is an error: at once when its `Content-Length` says so (nothing allocated, nothing
    /// waited for), else as soon as what was read passes the cap (reading stops there, and the
    /// connection is dropped with the response).
    pub async fn read(
        &self,
        mut response: reqwest::Response,
        max_bytes: u64,
    ) -> Result<HeldBody, ReadError> {
        let length = response.content_length();
        if let Some(announced) = length.filter(|&announced| announced > max_bytes) {
            return Err(ReadError::TooLarge {
                max_bytes,
                announced: Some(announced),
            });
        }
        let share = self.share_kib(length);
        // The semaphore is never closed, so this only fails in theory; read unbudgeted then.
        let share = self.permits.clone().acquire_many_owned(share).await.ok();
        let expected = length.map_or(0, |length| usize::try_from(length).unwrap_or(0));
        let mut body = PooledBuffer {
            buffer: self.pool.take(expected),
            pool: self.pool.clone(),
        };
        while let Some(chunk) = response.chunk().await? {
            let read = body.buffer.len().saturating_add(chunk.len());
            if u64::try_from(read).unwrap_or(u64::MAX) > max_bytes {
                return Err(ReadError::TooLarge {
                    max_bytes,
                    announced: None,
                });
            }
            body.buffer.extend_from_slice(&chunk);
        }
        Ok(HeldBody {
            body,
            share: BudgetShare(share.map(Arc::new)),
        })
    }

    /// KiB of the budget free right now.
    pub fn available_kib(&self) -> usize {
        self.permits.available_permits()
    }

    /// Bytes of body buffers kept for reuse right now.
    #[cfg(test)]
    fn pooled_bytes(&self) -> usize {
        self.pool
            .idle
            .lock()
            .map_or(0, |idle| idle.iter().map(Vec::capacity).sum())
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
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// The cap of the tests that are not about it: the shipped default.
    const CAP: u64 = 256 << 20;

    fn budget(mib: u32) -> ResponseBudget {
        ResponseBudget::new(NonZeroU32::new(mib).expect("non-zero"))
    }

    /// A hostile HTTP server: it answers every request with `head`, then, when `chunked`, with
    /// 64 KiB chunks for as long as the client reads them. Answers its URL and the body bytes
    /// it managed to write.
    async fn hostile(head: &'static str, chunked: bool) -> (String, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/", listener.local_addr().expect("address"));
        let written = Arc::new(AtomicU64::new(0));
        let counter = written.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = socket.read(&mut request).await;
                    if socket.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    if !chunked {
                        // Announce, then send nothing: the client must not wait for it.
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        return;
                    }
                    let mut chunk = b"10000\r\n".to_vec();
                    chunk.extend(std::iter::repeat_n(b'a', 0x10000));
                    chunk.extend_from_slice(b"\r\n");
                    while socket.write_all(&chunk).await.is_ok() {
                        counter.fetch_add(0x10000, Ordering::SeqCst);
                    }
                });
            }
        });
        (url, written)
    }

    #[tokio::test]
    async fn a_terabyte_content_length_fails_at_once_without_allocating_or_waiting() {
        let (url, _) = hostile(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1099511627776\r\n\r\n",
            false,
        )
        .await;
        let budget = budget(1);
        // The whole budget is taken: a body that waited for room would wait here.
        let taken = budget
            .permits
            .clone()
            .acquire_many_owned(1024)
            .await
            .expect("permits");
        let response = reqwest::get(&url).await.expect("sent");
        let read = tokio::time::timeout(Duration::from_secs(5), budget.read(response, 1 << 20))
            .await
            .expect("refused at once, not after waiting for the budget");
        let error = read.expect_err("larger than the cap");
        assert!(
            matches!(
                error,
                ReadError::TooLarge {
                    max_bytes: 0x10_0000,
                    announced: Some(1_099_511_627_776)
                }
            ),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("1099511627776") && error.to_string().contains("1 MiB"),
            "{error}"
        );
        drop(taken);
        assert_eq!(budget.available_kib(), 1024, "nothing of the budget kept");
        assert_eq!(budget.pooled_bytes(), 0, "no buffer was made for it");
    }

    #[tokio::test]
    async fn a_chunked_body_stops_being_read_once_it_passes_the_cap() {
        let (url, written) = hostile(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
            true,
        )
        .await;
        let budget = budget(4);
        let response = reqwest::get(&url).await.expect("sent");
        let read = tokio::time::timeout(Duration::from_secs(10), budget.read(response, 1 << 20))
            .await
            .expect("stopped reading");
        let error = read.expect_err("larger than the cap");
        assert!(
            matches!(
                error,
                ReadError::TooLarge {
                    announced: None,
                    ..
                }
            ),
            "{error:?}"
        );
        assert_eq!(budget.available_kib(), 4096, "its share went back");
        // The connection was dropped: the server's writes stop soon after the cap, at most a
        // few socket buffers later.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = written.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            written.load(Ordering::SeqCst),
            sent,
            "nobody reads any more"
        );
        assert!(sent < 16 << 20, "{sent} bytes were taken from the server");
    }

    #[tokio::test]
    async fn a_body_larger_than_the_whole_budget_but_within_the_cap_is_read_alone() {
        let server = wiremock::MockServer::start().await;
        wiremock::Mock::given(wiremock::matchers::any())
            .respond_with(
                wiremock::ResponseTemplate::new(200).set_body_bytes(vec![b'a'; 1536 << 10]),
            )
            .mount(&server)
            .await;
        let budget = budget(1);
        let response = reqwest::get(server.uri()).await.expect("sent");
        let held = tokio::time::timeout(Duration::from_secs(5), budget.read(response, 4 << 20))
            .await
            .expect("it did not wait for room the budget can never have")
            .expect("read");
        assert_eq!(held.bytes().len(), 1536 << 10);
        assert_eq!(budget.available_kib(), 0, "it holds the whole budget");
        drop(held);
        assert_eq!(budget.available_kib(), 1024);

        // One byte over the cap, announced: refused.
        let response = reqwest::get(server.uri()).await.expect("sent");
        let error = budget
            .read(response, (1536 << 10) - 1)
            .await
            .expect_err("over the cap");
        assert!(matches!(
            error,
            ReadError::TooLarge {
                announced: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn a_body_takes_its_own_size() {
        let budget = budget(64);
        assert_eq!(budget.share_kib(Some(4096)), 4);
        assert_eq!(budget.share_kib(Some(4097)), 5);
        assert_eq!(budget.share_kib(Some(1)), 1);
        assert_eq!(budget.share_kib(None), 4 * 1024);
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
                wiremock::ResponseTemplate::new(200).set_body_bytes(vec![b'a'; 600 << 10]),
            )
            .mount(&server)
            .await;
        // 600 KiB bodies: one fits in 1 MiB, two do not.
        let budget = budget(1);
        let client = reqwest::Client::new();
        let first = budget
            .read(client.get(server.uri()).send().await.expect("sent"), CAP)
            .await
            .expect("read");
        assert_eq!(first.bytes().len(), 600 << 10);
        assert_eq!(budget.available_kib(), 1024 - 600);
        let second = tokio::spawn({
            let budget = budget.clone();
            let response = client.get(server.uri()).send().await.expect("sent");
            async move {
                budget
                    .read(response, CAP)
                    .await
                    .map(|held| held.bytes().len())
            }
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
        assert_eq!(second, 600 << 10);
        assert_eq!(budget.available_kib(), 1024);
    }

    /// A JSON answer with `images` as base64 strings, the way the Images API sends them.
    fn answer_with(images: &[&[u8]]) -> Vec<u8> {
        let data: Vec<_> = images
            .iter()
            .map(|image| serde_json::json!({ "b64_json": base64_simd::STANDARD.encode_to_string(image) }))
            .collect();
        serde_json::json!({ "created": 1, "data": data })
            .to_string()
            .into_bytes()
    }

    #[derive(serde::Deserialize)]
    struct Answer<'a> {
        #[serde(borrow)]
        data: Vec<Datum<'a>>,
    }

    #[derive(serde::Deserialize)]
    struct Datum<'a> {
        #[serde(borrow)]
        b64_json: Base64Field<'a>,
    }

    fn located(held: &HeldBody) -> Vec<Encoded> {
        let answer: Answer<'_> = serde_json::from_slice(held.bytes()).expect("parses");
        answer
            .data
            .iter()
            .map(|datum| held.locate(&datum.b64_json))
            .collect()
    }

    #[test]
    fn images_are_decoded_in_place_inside_the_body() {
        let first = vec![7u8; 1000];
        let second = b"a second, shorter image".to_vec();
        let held = HeldBody::unbudgeted(answer_with(&[&first, &second]));
        let body_start = held.bytes().as_ptr() as usize;
        let body_end = body_start + held.bytes().len();
        let encoded = located(&held);
        assert!(matches!(encoded[0], Encoded::InBody(_)));
        let images = held.decode(encoded).expect("decodes");
        assert_eq!(images[0].as_ref(), first.as_slice());
        assert_eq!(images[1].as_ref(), second.as_slice());
        for image in &images {
            let at = image.as_ptr() as usize;
            assert!(
                (body_start..body_end).contains(&at),
                "the image lives in the body's buffer"
            );
        }
    }

    #[test]
    fn an_escaped_string_is_decoded_from_its_copy() {
        let image = vec![0xffu8; 300];
        let encoded = base64_simd::STANDARD.encode_to_string(&image);
        assert!(encoded.contains('/'));
        let body = format!(
            r#"{{"data":[{{"b64_json":"{}"}}]}}"#,
            encoded.replace('/', "\\/")
        );
        let held = HeldBody::unbudgeted(body.into_bytes());
        let located = located(&held);
        assert!(matches!(located[0], Encoded::Copied(_)));
        let images = held.decode(located).expect("decodes");
        assert_eq!(images[0].as_ref(), image.as_slice());
    }

    #[test]
    fn text_that_is_not_base64_is_an_error_naming_the_image() {
        let good = base64_simd::STANDARD.encode_to_string(b"fine");
        let body = format!(r#"{{"data":[{{"b64_json":"{good}"}},{{"b64_json":"not base64!"}}]}}"#);
        let held = HeldBody::unbudgeted(body.into_bytes());
        let located = located(&held);
        let (index, _) = held.decode(located).expect_err("the second is not base64");
        assert_eq!(index, 1);
    }

    #[tokio::test]
    async fn a_body_buffer_is_reused_once_its_images_are_dropped() {
        let image = vec![42u8; 300 << 10];
        let server = wiremock::MockServer::start().await;
        wiremock::Mock::given(wiremock::matchers::any())
            .respond_with(
                wiremock::ResponseTemplate::new(200).set_body_bytes(answer_with(&[&image])),
            )
            .mount(&server)
            .await;
        let budget = budget(4);
        let client = reqwest::Client::new();
        let read = || async {
            budget
                .read(client.get(server.uri()).send().await.expect("sent"), CAP)
                .await
                .expect("read")
        };
        let held = read().await;
        let encoded = located(&held);
        let images = held.decode(encoded).expect("decodes");
        assert_eq!(images[0].as_ref(), image.as_slice());
        assert_eq!(budget.pooled_bytes(), 0, "the images still use the buffer");
        let buffer_at = images[0].as_ptr() as usize;
        drop(images);
        let kept = budget.pooled_bytes();
        assert!(kept >= 400 << 10, "the buffer was kept: {kept} bytes");

        let again = read().await;
        assert_eq!(
            budget.pooled_bytes(),
            0,
            "the next body took the kept buffer"
        );
        let at = again.bytes().as_ptr() as usize;
        assert!(
            (at..at + again.bytes().len()).contains(&buffer_at),
            "the next body was read into the same memory"
        );
    }

    #[test]
    fn the_pool_keeps_no_more_than_the_budget() {
        let budget = budget(1);
        for _ in 0..4 {
            budget.pool.give_back(Vec::with_capacity(400 << 10));
        }
        assert_eq!(budget.pooled_bytes(), 800 << 10);
        budget.pool.give_back(Vec::with_capacity(1 << 10));
        assert_eq!(
            budget.pooled_bytes(),
            800 << 10,
            "small buffers are not kept"
        );
    }
}
