//! Devices: the per-device state machine ([`state`]), the task that runs it
//! ([`task`]), and the [`Board`] where the rest of the daemon sees each
//! device's phase.

pub mod state;
pub mod task;

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

pub use state::{DeviceState, Input, Phase};
pub use task::{CatchUpRequest, DeviceTask};

/// The phase of every configured device, observable by the appliers.
#[derive(Clone, Debug)]
pub struct Board {
    tx: Arc<watch::Sender<BTreeMap<u32, Phase>>>,
}

impl Board {
    pub fn new(devices: impl IntoIterator<Item = u32>) -> Self {
        let map = devices
            .into_iter()
            .map(|d| (d, Phase::Disconnected))
            .collect();
        Board {
            tx: Arc::new(watch::Sender::new(map)),
        }
    }

    pub fn set(&self, device: u32, phase: Phase) {
        self.tx
            .send_if_modified(|m| m.insert(device, phase) != Some(phase));
    }

    pub fn remove(&self, device: u32) {
        self.tx.send_if_modified(|m| m.remove(&device).is_some());
    }

    pub fn phase(&self, device: u32) -> Phase {
        self.tx
            .borrow()
            .get(&device)
            .copied()
            .unwrap_or(Phase::Disconnected)
    }

    /// Runs `f` on every device's phase under one look at the board (for a
    /// pass over many devices).
    pub fn with_phases<R>(&self, f: impl FnOnce(&BTreeMap<u32, Phase>) -> R) -> R {
        f(&self.tx.borrow())
    }

    pub fn is_live(&self, device: u32) -> bool {
        self.phase(device) == Phase::Live
    }

    pub fn snapshot(&self) -> BTreeMap<u32, Phase> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<u32, Phase>> {
        self.tx.subscribe()
    }
}
