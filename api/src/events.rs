//! Fan-out of job change events to Server-Sent Events streams.
//!
//! One Redis pub/sub connection per api process, not one per browser: a background task
//! subscribes to the events channel and re-broadcasts in-process. It subscribes only while some
//! stream follows a job, and lets the subscription go once none has for [`IDLE_UNSUBSCRIBE`]:
//! every job publishes a few events, and an api that nobody streams from would otherwise
//! receive and parse every one of them (and Redis send them) for nothing. Whenever the
//! subscription is (re)established the task broadcasts `Resync`, so streams re-read their job
//! once and cannot miss a change that happened before it, or while Redis was unreachable.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use shared::store::JobEvent;
use tokio::sync::{Notify, broadcast};

/// How long the subscription outlives the last stream, so that a client reconnecting (a
/// stream reached its lifetime, a page reloaded) finds it still there.
pub const IDLE_UNSUBSCRIBE: Duration = Duration::from_secs(30);

/// How often an established subscription checks whether any stream is left.
const IDLE_CHECK: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub enum HubEvent {
    Job(JobEvent),
    Resync,
}

#[derive(Clone)]
pub struct EventHub {
    sender: broadcast::Sender<HubEvent>,
    /// Wakes the subscriber task when a stream starts.
    wanted: Arc<Notify>,
}

impl EventHub {
    /// Starts the subscriber task; it runs until the process ends, subscribing while streams
    /// want events and reconnecting as needed. Each connect asks `redis` for its primary of the
    /// moment, which may have moved.
    pub fn start(redis: shared::connection::Redis, channel: String) -> Self {
        Self::start_with_idle(redis, channel, IDLE_UNSUBSCRIBE)
    }

    /// [`EventHub::start`] with another grace period after the last stream (tests).
    pub fn start_with_idle(
        redis: shared::connection::Redis,
        channel: String,
        idle: Duration,
    ) -> Self {
        let (sender, _) = broadcast::channel(4096);
        let wanted = Arc::new(Notify::new());
        let hub = Self {
            sender: sender.clone(),
            wanted: wanted.clone(),
        };
        tokio::spawn(async move {
            loop {
                while sender.receiver_count() == 0 {
                    wanted.notified().await;
                }
                match redis.client().get_async_pubsub().await {
                    Ok(mut pubsub) => {
                        if let Err(error) = pubsub.subscribe(&channel).await {
                            tracing::warn!(%error, "Job events subscription failed");
                        } else {
                            tracing::debug!("Subscribed to job events");
                            let _ = sender.send(HubEvent::Resync);
                            if relay(pubsub.on_message(), &sender, idle).await {
                                tracing::debug!("No event stream left; job events unsubscribed");
                                continue;
                            }
                            tracing::warn!("Job events subscription ended; reconnecting");
                        }
                    }
                    Err(error) => tracing::warn!(%error, "Cannot subscribe to job events"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        hub
    }

    /// A receiver of every job event from now on (after a `Resync` if the subscription was
    /// idle and is being established).
    pub fn subscribe(&self) -> broadcast::Receiver<HubEvent> {
        let receiver = self.sender.subscribe();
        self.wanted.notify_one();
        receiver
    }
}

/// Re-broadcasts the subscription's messages. Answers `true` when it stopped because no stream
/// was left for `idle`, `false` when the subscription itself ended.
async fn relay(
    messages: impl futures::Stream<Item = redis::Msg>,
    sender: &broadcast::Sender<HubEvent>,
    idle: Duration,
) -> bool {
    let mut messages = std::pin::pin!(messages);
    let mut checks = tokio::time::interval(IDLE_CHECK.min(idle));
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut unwanted_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else { return false };
                if sender.receiver_count() == 0 {
                    // Nobody to tell: not worth parsing.
                    continue;
                }
                let Ok(payload) = message.get_payload::<String>() else {
                    continue;
                };
                match serde_json::from_str::<JobEvent>(&payload) {
                    Ok(event) => {
                        let _ = sender.send(HubEvent::Job(event));
                    }
                    Err(error) => tracing::warn!(%error, "Ignoring a malformed job event"),
                }
            }
            _ = checks.tick() => {
                if sender.receiver_count() > 0 {
                    unwanted_since = None;
                } else {
                    let since = *unwanted_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= idle {
                        return true;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn subscribers(client: &redis::Client, channel: &str) -> i64 {
        let mut redis = client.get_multiplexed_async_connection().await.unwrap();
        let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(&mut redis)
            .await
            .unwrap();
        counts[0].1
    }

    async fn wait_for_subscribers(client: &redis::Client, channel: &str, wanted: i64) -> i64 {
        let mut seen = -1;
        for _ in 0..200 {
            seen = subscribers(client, channel).await;
            if seen == wanted {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        seen
    }

    /// The hub's next event for `receiver`, within 5 s.
    async fn next(receiver: &mut broadcast::Receiver<HubEvent>) -> HubEvent {
        tokio::time::timeout(Duration::from_secs(5), receiver.recv())
            .await
            .unwrap()
            .unwrap()
    }

    /// Real Redis (the suite's), on a channel of this test's own.
    #[tokio::test]
    async fn the_hub_subscribes_while_a_stream_wants_events_and_lets_go_after_the_grace_period() {
        let mut settings = shared::config::Settings::defaults().unwrap();
        settings.redis.prefix = format!("pictor-test-{}:", uuid::Uuid::new_v4().simple());
        let redis = shared::connection::Redis::connect(&settings.redis)
            .await
            .unwrap();
        let client = redis.client();
        let channel = redis.keys().events_channel();
        let hub = EventHub::start_with_idle(redis, channel.clone(), Duration::from_millis(300));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            subscribers(&client, &channel).await,
            0,
            "nobody streams yet"
        );

        let mut receiver = hub.subscribe();
        assert_eq!(wait_for_subscribers(&client, &channel, 1).await, 1);
        // The subscription starts with a resync, then relays what is published.
        let first = next(&mut receiver).await;
        assert!(matches!(first, HubEvent::Resync), "{first:?}");
        let event = serde_json::json!({
            "job_id": uuid::Uuid::new_v4(),
            "status": "running",
            "version": 3
        });
        let mut publisher = client.get_multiplexed_async_connection().await.unwrap();
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(event.to_string())
            .query_async(&mut publisher)
            .await
            .unwrap();
        let relayed = next(&mut receiver).await;
        assert!(
            matches!(&relayed, HubEvent::Job(job) if job.status == shared::domain::JobStatus::Running),
            "{relayed:?}"
        );

        // The last stream leaves: the subscription goes once the grace period is over.
        drop(receiver);
        assert_eq!(wait_for_subscribers(&client, &channel, 0).await, 0);
        // And comes back, with its resync, for the next stream.
        let mut receiver = hub.subscribe();
        assert_eq!(wait_for_subscribers(&client, &channel, 1).await, 1);
        let first = next(&mut receiver).await;
        assert!(matches!(first, HubEvent::Resync), "{first:?}");
    }
}
