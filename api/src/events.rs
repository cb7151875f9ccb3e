//! Fan-out of job change events to Server-Sent Events streams.
//!
//! One Redis pub/sub connection per api process, not one per browser: a background task
//! subscribes to the events channel and re-broadcasts in-process. When the subscription is
//! (re)established it broadcasts `Resync`, so streams re-read their job once and cannot miss a
//! change that happened while Redis was unreachable.

use futures::StreamExt;
use shared::store::JobEvent;
use tokio::sync::broadcast;

#[derive(Debug, Clone)]
pub enum HubEvent {
    Job(JobEvent),
    Resync,
}

#[derive(Clone)]
pub struct EventHub {
    sender: broadcast::Sender<HubEvent>,
}

impl EventHub {
    /// Starts the subscriber task; it runs until the process ends, reconnecting as needed.
    /// Each reconnect asks `redis` for its primary of the moment, which may have moved.
    pub fn start(redis: shared::connection::Redis, channel: String) -> Self {
        let (sender, _) = broadcast::channel(4096);
        let hub = Self {
            sender: sender.clone(),
        };
        tokio::spawn(async move {
            loop {
                match redis.client().get_async_pubsub().await {
                    Ok(mut pubsub) => {
                        if let Err(error) = pubsub.subscribe(&channel).await {
                            tracing::warn!(%error, "Job events subscription failed");
                        } else {
                            let _ = sender.send(HubEvent::Resync);
                            let mut messages = pubsub.on_message();
                            while let Some(message) = messages.next().await {
                                let Ok(payload) = message.get_payload::<String>() else {
                                    continue;
                                };
                                match serde_json::from_str::<JobEvent>(&payload) {
                                    Ok(event) => {
                                        let _ = sender.send(HubEvent::Job(event));
                                    }
                                    Err(error) => {
                                        tracing::warn!(%error, "Ignoring a malformed job event")
                                    }
                                }
                            }
                            tracing::warn!("Job events subscription ended; reconnecting");
                        }
                    }
                    Err(error) => tracing::warn!(%error, "Cannot subscribe to job events"),
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
        hub
    }

    pub fn subscribe(&self) -> broadcast::Receiver<HubEvent> {
        self.sender.subscribe()
    }
}
