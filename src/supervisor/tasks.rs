//! The task tree: what kinds of task the supervisor runs, how each is
//! (re)spawned from the shared parts, and how a reload's changes reach the
//! tasks that own them.

use super::*;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum TaskKind {
    Device(u32),
    Group(String),
    Service,
    Events,
}

impl std::fmt::Display for TaskKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskKind::Device(id) => write!(f, "device {id}"),
            TaskKind::Group(name) => write!(f, "group {name}"),
            TaskKind::Service => f.write_str("notifier"),
            TaskKind::Events => f.write_str("event consumer"),
        }
    }
}

pub(super) struct Tasks {
    pub(super) set: JoinSet<()>,
    pub(super) kinds: HashMap<tokio::task::Id, (TaskKind, CancellationToken)>,
    pub(super) cancel: CancellationToken,
}

impl Tasks {
    /// Stops the task of `kind` (it is not restarted).
    pub(super) fn stop(&mut self, kind: &TaskKind) {
        for (k, token) in self.kinds.values() {
            if k == kind {
                token.cancel();
            }
        }
    }
}

/// Everything a task needs to be (re)spawned.
pub(super) struct Parts {
    pub(super) config: RwLock<Arc<Config>>,
    /// Device changes of reloads the gateway session has yet to make
    /// (register, forget); `config_changed` wakes it.
    pub(super) gateway_changes: Mutex<Vec<Change>>,
    /// The devices this daemon registered with the gateway, as registered:
    /// what a session forgets when the configuration no longer has them.
    pub(super) registered: Mutex<std::collections::BTreeMap<u32, crate::config::DeviceConfig>>,
    pub(super) config_changed: Notify,
    /// Tells the event consumer.
    pub(super) config_tx: watch::Sender<Arc<Config>>,
    /// Realtime events for the consumer.
    pub(super) realtime: mpsc::Sender<EventLog>,
    pub(super) client: GatewayClient,
    pub(super) store: Store,
    pub(super) board: Board,
    pub(super) inboxes: Inboxes,
    pub(super) catch_up: mpsc::Sender<CatchUpRequest>,
    pub(super) wake: Wakers,
    /// One writer per group: see [`crate::sync::WriterLock`].
    pub(super) writers: Mutex<HashMap<String, WriterLock>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Arc<Health>,
    /// Device clocks as realtime events show them (multi-master groups).
    pub(super) clocks: Arc<crate::sync::multi::clock::ClockWatch>,
}

impl Parts {
    pub(super) fn config(&self) -> Arc<Config> {
        Arc::clone(&self.config.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub(super) fn writer(&self, group: &str) -> WriterLock {
        Arc::clone(
            self.writers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(group.to_owned())
                .or_default(),
        )
    }

    pub(super) fn wake(&self) -> HashMap<String, Arc<Notify>> {
        self.wake.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(super) fn spawn(&self, tasks: &mut Tasks, kind: TaskKind) {
        let cancel = tasks.cancel.child_token();
        let config = self.config();
        let handle = match &kind {
            TaskKind::Device(id) => {
                let (tx, rx) = mpsc::channel(64);
                self.inboxes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(*id, tx);
                let task = DeviceTask {
                    id: *id,
                    monitoring: self.client.clone(),
                    catch_up: self.catch_up.clone(),
                    board: self.board.clone(),
                    store: self.store.clone(),
                    backoff: Backoff::device(),
                    metrics: Arc::clone(&self.metrics),
                };
                let span = tracing::info_span!("device", device_id = id);
                tasks.set.spawn(tracing::Instrument::instrument(
                    task.run(rx, cancel.clone()),
                    span,
                ))
            }
            TaskKind::Group(name) => {
                let Some(group) = config.group(name).cloned() else {
                    return;
                };
                let wake = self.wake().get(name).cloned().unwrap_or_default();
                let applier = Applier::new(
                    group,
                    self.client.clone(),
                    self.store.clone(),
                    self.board.clone(),
                    config.sync.clone(),
                    wake,
                    Arc::clone(&self.metrics),
                )
                .with_links(crate::sync::multi::Links {
                    catch_up: self.catch_up.clone(),
                    clocks: Arc::clone(&self.clocks),
                });
                let span = tracing::info_span!("group", group = %name);
                tasks.set.spawn(tracing::Instrument::instrument(
                    applier.run(self.writer(name), cancel.clone()),
                    span,
                ))
            }
            TaskKind::Events => return,
            TaskKind::Service => {
                let notifier = service::notifier(
                    Arc::clone(&self.health),
                    self.board.clone(),
                    self.store.clone(),
                    cancel.clone(),
                );
                tasks.set.spawn(notifier)
            }
        };
        tasks.kinds.insert(handle.id(), (kind, cancel));
    }

    /// Applies a new configuration to the tasks (the gateway session
    /// applies its part when woken). Returns a summary.
    pub(super) fn reconfigure(&self, tasks: &mut Tasks, new: Config) -> String {
        let old = self.config();
        let changes = config::diff(&old, &new);
        if changes.is_empty() {
            return "configuration unchanged".to_owned();
        }
        let (mut added_devices, mut removed_devices) = (Vec::new(), Vec::new());
        let (mut added_groups, mut changed_groups, mut removed_groups) =
            (Vec::new(), Vec::new(), Vec::new());
        let mut needs_restart = Vec::new();
        for change in &changes {
            match change {
                Change::AddDevice(id) => added_devices.push(*id),
                Change::RemoveDevice(id) => removed_devices.push(*id),
                // The device task keeps running; the session re-registers it.
                Change::ChangeDevice(_) => {}
                Change::AddGroup(g) => added_groups.push(g.clone()),
                Change::ChangeGroup(g) => changed_groups.push(g.clone()),
                Change::RemoveGroup(g) => removed_groups.push(g.clone()),
                Change::NeedsRestart(s) => needs_restart.push(*s),
                // Read from the new configuration where it is used.
                Change::Setting(_) => {}
            }
        }
        for name in &added_groups {
            self.wake
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.clone(), Arc::new(Notify::new()));
        }
        let new = Arc::new(new);
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&new);
        self.config_tx.send_replace(new);
        for id in &removed_devices {
            tasks.stop(&TaskKind::Device(*id));
            self.inboxes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            self.board.remove(*id);
            self.metrics.forget_device(*id);
        }
        for id in &added_devices {
            self.board.set(*id, crate::device::Phase::Disconnected);
            self.spawn(tasks, TaskKind::Device(*id));
        }
        for name in removed_groups.iter().chain(&changed_groups) {
            tasks.stop(&TaskKind::Group(name.clone()));
        }
        for name in &removed_groups {
            // Once its applier's last step is over, the group's state goes:
            // a group added later under that name starts afresh.
            let (store, writer, name) = (self.store.clone(), self.writer(name), name.clone());
            tokio::spawn(async move {
                let _w = writer.lock().await;
                let n = name.clone();
                match store.run(move |c| store::drop_group(c, &n)).await {
                    Ok(()) => tracing::info!(group = %name, "group removed: its state is dropped"),
                    Err(e) => {
                        tracing::error!(group = %name, error = %e, "cannot drop the state of a removed group")
                    }
                }
            });
        }
        for name in added_groups.iter().chain(&changed_groups) {
            self.spawn(tasks, TaskKind::Group(name.clone()));
        }
        self.gateway_changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(changes.iter().filter(|c| c.concerns_gateway()).cloned());
        self.config_changed.notify_one();
        if !needs_restart.is_empty() {
            tracing::warn!(settings = %needs_restart.join(", "), "these settings take effect at the next start");
        }
        config::summary(&changes)
    }
}
