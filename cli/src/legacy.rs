//! Retiring the old LangGraph service: finding, measuring and deleting the checkpoint data its
//! Redis checkpointer left behind (`pictor admin purge-langgraph-checkpoints`).
//!
//! The old service persisted its graphs with `langgraph-checkpoint-redis` (repository
//! redis-developer/langgraph-redis). Its keys carry no namespace of their own: each family is a
//! fixed prefix, then `:`-separated parts. An empty `checkpoint_ns` is stored as `__empty__` and
//! an empty id as `00000000-0000-0000-0000-000000000000` (`util.py`: `EMPTY_STRING_SENTINEL`,
//! `EMPTY_ID_SENTINEL`, `to_storage_safe_str`, `to_storage_safe_id`). The families, read from
//! its source:
//!
//! | family                 | key                                                          | type      | where it is built |
//! |------------------------|--------------------------------------------------------------|-----------|-------------------|
//! | `checkpoints`          | `checkpoint:{thread_id}:{checkpoint_ns}:{checkpoint_id}`; the shallow savers keep one per thread: `checkpoint:{thread_id}:{checkpoint_ns}` | RedisJSON | `base.py`: `CHECKPOINT_PREFIX = "checkpoint"`, `_make_redis_checkpoint_key`; `shallow.py` / `ashallow.py`: `_make_shallow_redis_checkpoint_key` |
//! | `checkpoint_blobs`     | `checkpoint_blob:{thread_id}:{checkpoint_ns}:{channel}:{version}` | RedisJSON | `base.py`: `CHECKPOINT_BLOB_PREFIX = "checkpoint_blob"`, `_make_redis_checkpoint_blob_key` |
//! | `checkpoint_writes`    | `checkpoint_write:{thread_id}:{checkpoint_ns}:{checkpoint_id}:{task_id}[:{idx}]` | RedisJSON | `base.py`: `CHECKPOINT_WRITE_PREFIX = "checkpoint_write"`, `_make_redis_checkpoint_writes_key` |
//! | `write_key_registries` | `write_keys_zset:{thread_id}:{checkpoint_ns}:{checkpoint_id}` | sorted set | `key_registry.py`: `WRITE_KEYS_ZSET_PREFIX = "write_keys_zset"`, `make_write_keys_zset_key` |
//! | `latest_pointers`      | `checkpoint_latest:{thread_id}:{checkpoint_ns}` (its value is the newest checkpoint's key) | string | `aio.py`: `latest_pointer_key` in `aput` / `aget_tuple` |
//!
//! The five prefixes are disjoint as SCAN globs (`checkpoint:*` does not match
//! `checkpoint_blob:…`), so every key is counted in one family only.
//!
//! **RediSearch indexes.** The savers index the three JSON families with RediSearch (through
//! redisvl). RediSearch 2.x keeps index definitions outside the keyspace, so they are not keys:
//! they are listed with `FT._LIST` and dropped with `FT.DROPINDEX` (without `DD`: the documents
//! are deleted by the scan, in batches). Their names are the key prefixes in `base.py`
//! (`checkpoint`, `checkpoint_blob`, `checkpoint_write`) and, in older releases and
//! `ashallow.py`'s `SCHEMAS`, `checkpoints`, `checkpoints_blobs`, `checkpoint_writes`
//! ([`INDEX_NAMES`]). A Redis without the module answers "unknown command", which is reported as
//! [`Indexes::ModuleMissing`], not as an error.
//!
//! **Not covered.** The saver's prefixes can be changed by its constructor
//! (`checkpoint_prefix`, …); the old service used the defaults. LangGraph's long-term memory
//! store (`RedisStore`, keys `store:*`, `store_vectors:*`) was not used by the old service and is
//! left alone: those prefixes are too generic to delete blindly.
//!
//! **Safety.** Keys are found with `SCAN MATCH {pattern} COUNT {batch}` and deleted with
//! `UNLINK` one batch at a time, so a live Redis is never blocked by one long command. A key
//! starting with Pictor's own prefix (`redis.prefix`, see `keys`) is never touched, even if it
//! matches a pattern: it is counted as protected instead. [`PurgeOptions::thread_prefix`] limits
//! every pattern to threads whose id starts with a given string (a canary purge of one tenant's
//! threads, and isolation for tests, which also use a Redis database of their own).

use std::num::NonZeroUsize;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::{ExposeSecret, SecretString};

/// One family of keys the LangGraph checkpointer writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    /// Stable name, used in the report.
    pub name: &'static str,
    /// The key prefix before the first `:`.
    pub prefix: &'static str,
    /// The Redis type of its keys.
    pub redis_type: &'static str,
}

impl Family {
    /// The SCAN pattern of this family, limited to threads starting with `thread_prefix`.
    pub fn pattern(&self, thread_prefix: Option<&str>) -> String {
        format!(
            "{}:{}*",
            self.prefix,
            glob_escape(thread_prefix.unwrap_or_default())
        )
    }

    /// Whether `key` belongs to this family (what SCAN MATCH already guarantees, checked again
    /// before anything is deleted).
    pub fn owns(&self, key: &[u8]) -> bool {
        key.strip_prefix(self.prefix.as_bytes())
            .is_some_and(|rest| rest.first() == Some(&b':'))
    }
}

/// Every key family of `langgraph-checkpoint-redis` (see the table above).
pub const FAMILIES: [Family; 5] = [
    Family {
        name: "checkpoints",
        prefix: "checkpoint",
        redis_type: "json",
    },
    Family {
        name: "checkpoint_blobs",
        prefix: "checkpoint_blob",
        redis_type: "json",
    },
    Family {
        name: "checkpoint_writes",
        prefix: "checkpoint_write",
        redis_type: "json",
    },
    Family {
        name: "write_key_registries",
        prefix: "write_keys_zset",
        redis_type: "zset",
    },
    Family {
        name: "latest_pointers",
        prefix: "checkpoint_latest",
        redis_type: "string",
    },
];

/// The RediSearch index names the savers create (current and older releases).
pub const INDEX_NAMES: [&str; 6] = [
    "checkpoint",
    "checkpoint_blob",
    "checkpoint_write",
    "checkpoints",
    "checkpoints_blobs",
    "checkpoint_writes",
];

#[derive(Debug, Clone)]
pub struct PurgeOptions {
    /// Keys asked for per SCAN call (its COUNT) and deleted per UNLINK at most.
    pub batch_size: NonZeroUsize,
    /// Pictor's key prefix: keys starting with it are never touched. Empty protects nothing.
    pub protected_prefix: String,
    /// Only threads whose id starts with this (None: every thread).
    pub thread_prefix: Option<String>,
}

/// What one pass found (or deleted) in one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyTally {
    pub family: Family,
    pub pattern: String,
    /// Keys found (survey) or deleted (purge).
    pub keys: u64,
    /// Bytes by `MEMORY USAGE` (survey only; 0 after a purge).
    pub bytes: u64,
    /// Matching keys left alone because they start with Pictor's prefix.
    pub protected: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tally {
    pub families: Vec<FamilyTally>,
}

impl Tally {
    pub fn keys(&self) -> u64 {
        self.families.iter().map(|family| family.keys).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.families.iter().map(|family| family.bytes).sum()
    }

    pub fn protected(&self) -> u64 {
        self.families.iter().map(|family| family.protected).sum()
    }
}

/// The RediSearch indexes of the old checkpointer that exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Indexes {
    /// The server has no RediSearch (`FT._LIST` is an unknown command).
    ModuleMissing,
    /// These of [`INDEX_NAMES`] exist (possibly none).
    Found(Vec<String>),
}

#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// A connection to the Redis holding the old checkpoints.
pub struct Checkpoints {
    connection: ConnectionManager,
}

enum Pass {
    Survey,
    Purge,
}

impl Checkpoints {
    /// Connects to `url` (which may name a logical database, `redis://host:6379/N`).
    pub async fn connect(url: &SecretString, timeout: Duration) -> Result<Self, PurgeError> {
        let client = redis::Client::open(url.expose_secret())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let connection = client.get_connection_manager_with_config(config).await?;
        Ok(Self { connection })
    }

    /// Counts and measures every family's keys; deletes nothing. Sizes come from `MEMORY
    /// USAGE` of every key, pipelined per batch; for aggregate types Redis samples 5 nested
    /// values, so they are estimates. `on_batch` hears how many keys each batch held.
    pub async fn survey(
        &mut self,
        options: &PurgeOptions,
        on_batch: impl FnMut(u64),
    ) -> Result<Tally, PurgeError> {
        self.pass(options, Pass::Survey, on_batch).await
    }

    /// Deletes every family's keys (but never Pictor's) with SCAN + UNLINK in batches.
    /// `on_batch` hears how many keys each batch deleted.
    pub async fn purge(
        &mut self,
        options: &PurgeOptions,
        on_batch: impl FnMut(u64),
    ) -> Result<Tally, PurgeError> {
        self.pass(options, Pass::Purge, on_batch).await
    }

    async fn pass(
        &mut self,
        options: &PurgeOptions,
        pass: Pass,
        mut on_batch: impl FnMut(u64),
    ) -> Result<Tally, PurgeError> {
        let mut tally = Tally::default();
        for family in FAMILIES {
            let pattern = family.pattern(options.thread_prefix.as_deref());
            let mut counted = FamilyTally {
                family,
                pattern: pattern.clone(),
                keys: 0,
                bytes: 0,
                protected: 0,
            };
            let mut cursor: u64 = 0;
            loop {
                let (next, found): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(options.batch_size.get())
                    .query_async(&mut self.connection)
                    .await?;
                let (keys, protected) = select(&family, found, &options.protected_prefix);
                counted.protected += protected;
                if !keys.is_empty() {
                    let handled = match pass {
                        Pass::Survey => {
                            counted.bytes += self.memory_usage(&keys).await?;
                            keys.len() as u64
                        }
                        Pass::Purge => {
                            redis::cmd("UNLINK")
                                .arg(&keys)
                                .query_async::<u64>(&mut self.connection)
                                .await?
                        }
                    };
                    counted.keys += handled;
                    on_batch(handled);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            tally.families.push(counted);
        }
        Ok(tally)
    }

    /// The summed `MEMORY USAGE` of `keys` in one pipeline (a key gone meanwhile counts 0).
    async fn memory_usage(&mut self, keys: &[Vec<u8>]) -> Result<u64, PurgeError> {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("MEMORY").arg("USAGE").arg(key);
        }
        let sizes: Vec<Option<u64>> = pipe.query_async(&mut self.connection).await?;
        Ok(sizes.into_iter().flatten().sum())
    }

    /// Which of the old checkpointer's RediSearch indexes exist.
    pub async fn indexes(&mut self) -> Result<Indexes, PurgeError> {
        let listed: Result<Vec<String>, redis::RedisError> = redis::cmd("FT._LIST")
            .query_async(&mut self.connection)
            .await;
        match listed {
            Ok(names) => Ok(Indexes::Found(
                names
                    .into_iter()
                    .filter(|name| INDEX_NAMES.contains(&name.as_str()))
                    .collect(),
            )),
            Err(error) if is_unknown_command(&error) => Ok(Indexes::ModuleMissing),
            Err(error) => Err(error.into()),
        }
    }

    /// Drops the named indexes, keeping their documents (the purge deletes those in batches).
    /// Returns the names dropped; an index already gone is skipped.
    pub async fn drop_indexes(&mut self, names: &[String]) -> Result<Vec<String>, PurgeError> {
        let mut dropped = Vec::new();
        for name in names {
            let result: Result<(), redis::RedisError> = redis::cmd("FT.DROPINDEX")
                .arg(name)
                .query_async(&mut self.connection)
                .await;
            match result {
                Ok(()) => dropped.push(name.clone()),
                Err(error)
                    if error
                        .to_string()
                        .to_ascii_lowercase()
                        .contains("unknown index") => {}
                Err(error) if is_unknown_command(&error) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(dropped)
    }
}

/// Splits a SCAN batch into the family's keys to act on and the count of protected ones.
fn select(family: &Family, found: Vec<Vec<u8>>, protected_prefix: &str) -> (Vec<Vec<u8>>, u64) {
    let mut protected = 0;
    let keys = found
        .into_iter()
        .filter(|key| family.owns(key))
        .filter(|key| {
            let pictor = is_protected(key, protected_prefix);
            protected += u64::from(pictor);
            !pictor
        })
        .collect();
    (keys, protected)
}

/// Whether `key` is one of Pictor's own keys.
pub fn is_protected(key: &[u8], protected_prefix: &str) -> bool {
    !protected_prefix.is_empty() && key.starts_with(protected_prefix.as_bytes())
}

fn is_unknown_command(error: &redis::RedisError) -> bool {
    error
        .to_string()
        .to_ascii_lowercase()
        .contains("unknown command")
}

/// `raw` with SCAN's glob characters escaped.
fn glob_escape(raw: &str) -> String {
    let mut escaped = String::with_capacity(raw.len());
    for c in raw.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_cover_each_family_and_escape_the_thread_prefix() {
        let patterns: Vec<String> = FAMILIES.iter().map(|f| f.pattern(None)).collect();
        assert_eq!(
            patterns,
            [
                "checkpoint:*",
                "checkpoint_blob:*",
                "checkpoint_write:*",
                "write_keys_zset:*",
                "checkpoint_latest:*"
            ]
        );
        assert_eq!(
            FAMILIES[0].pattern(Some("t[1]*")),
            "checkpoint:t\\[1\\]\\**"
        );
    }

    #[test]
    fn a_key_belongs_to_exactly_one_family() {
        let keys = [
            "checkpoint:t1:__empty__:01J0",
            "checkpoint:t1:__empty__",
            "checkpoint_blob:t1:__empty__:messages:00000000000000000000000000000002.0.5",
            "checkpoint_write:t1:__empty__:01J0:task:0",
            "write_keys_zset:t1:__empty__:01J0",
            "checkpoint_latest:t1:__empty__",
        ];
        for key in keys {
            let owners = FAMILIES
                .iter()
                .filter(|family| family.owns(key.as_bytes()))
                .count();
            assert_eq!(owners, 1, "{key}");
        }
        for stranger in [
            "checkpointer:x",
            "checkpoint",
            "my_checkpoint:x",
            "pictor:job:1",
        ] {
            assert!(
                !FAMILIES.iter().any(|f| f.owns(stranger.as_bytes())),
                "{stranger}"
            );
        }
    }

    #[test]
    fn pictor_keys_are_protected_even_when_they_match_a_family() {
        let family = FAMILIES[4];
        let found = vec![
            b"checkpoint_latest:t1:__empty__".to_vec(),
            b"checkpoint_latest:pictor:job".to_vec(),
        ];
        let (keys, protected) = select(&family, found, "checkpoint_latest:pictor:");
        assert_eq!(keys, vec![b"checkpoint_latest:t1:__empty__".to_vec()]);
        assert_eq!(protected, 1);
        assert!(!is_protected(b"anything", ""));
    }
}
