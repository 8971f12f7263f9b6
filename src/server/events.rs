//! GetContainerEvents (kubelet's Evented PLEG): every lifecycle change of a
//! container or pod sandbox, with the pod's status and all its containers'
//! statuses, to any number of subscribers. One broadcast channel keeps the
//! order the same for everyone; a subscriber that falls more than
//! `EVENT_BUFFER` events behind is dropped (its stream ends, with a log
//! line) instead of slowing the runtime down.

use super::{container, pod, Daemon};
use crate::container::ContainerFilter;
use cri_proto::v1 as cri;
use tokio::sync::broadcast;

/// Events a subscriber may lag behind before it is dropped.
pub const EVENT_BUFFER: usize = 1024;

pub use cri::ContainerEventType as Kind;

pub struct Events {
    tx: broadcast::Sender<cri::ContainerEventResponse>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(EVENT_BUFFER).0,
        }
    }
}

impl Events {
    pub fn subscribe(&self) -> broadcast::Receiver<cri::ContainerEventResponse> {
        self.tx.subscribe()
    }

    fn publish(&self, ev: cri::ContainerEventResponse) {
        // No subscriber is fine: nobody asked.
        let _ = self.tx.send(ev);
    }
}

impl Daemon {
    /// The event for `id` (a container or, for sandbox events, the pod id)
    /// in pod `pod_id`, with the pod's status and its containers' statuses
    /// as they are now. Build it before a removal, publish it after.
    pub(super) fn event(&self, id: &str, pod_id: &str, kind: Kind) -> cri::ContainerEventResponse {
        let pod_status = self.pods.get(pod_id).ok().map(|p| pod::to_status(&p));
        cri::ContainerEventResponse {
            container_id: id.to_string(),
            container_event_type: kind as i32,
            created_at: chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0),
            pod_sandbox_status: pod_status,
            containers_statuses: self.pod_container_statuses(pod_id),
        }
    }

    pub(super) fn pod_container_statuses(&self, pod_id: &str) -> Vec<cri::ContainerStatus> {
        self.containers
            .list(&ContainerFilter {
                pod_id: Some(pod_id.to_string()),
                ..Default::default()
            })
            .iter()
            .map(container::to_status)
            .collect()
    }

    pub(super) fn emit(&self, id: &str, pod_id: &str, kind: Kind) {
        self.events.publish(self.event(id, pod_id, kind));
    }

    pub(super) fn publish(&self, ev: cri::ContainerEventResponse) {
        self.events.publish(ev);
    }
}

/// Turns container exits noticed by the container manager into
/// CONTAINER_STOPPED events, for as long as the daemon runs.
pub fn forward_exits(daemon: std::sync::Arc<Daemon>) {
    let mut exits = daemon.containers.exits();
    tokio::spawn(async move {
        loop {
            match exits.recv().await {
                Ok(id) => {
                    if let Ok(c) = daemon.containers.get(&id) {
                        daemon.emit(&id, &c.pod_id, Kind::ContainerStoppedEvent);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "container exit events were dropped");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}
