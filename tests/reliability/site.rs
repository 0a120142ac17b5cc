//! A simulated site for the cases that run the daemon: the simulator in
//! this process (127.0.0.1:0, TLS), groups of one source and one target
//! each, and the daemon's configuration, state and log in a temporary
//! directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use usersync::sim::{SimOptions, Simulator};

use crate::daemon::until;

/// How long a change may take to arrive before a case fails (a bound for
/// a stuck daemon, not a measurement).
pub const DELIVERY: Duration = Duration::from_secs(60);

/// One group: `source` → `target`.
#[derive(Debug, Clone, Copy)]
pub struct Pair {
    pub name: &'static str,
    pub source: u32,
    pub target: u32,
}

pub struct Site {
    pub sim: Simulator,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    pub pairs: Vec<Pair>,
}

const NAMES: [&str; 4] = ["a", "c", "e", "g"];

impl Site {
    /// A simulator with `pairs` groups' devices (`sim` may change its
    /// options), and a configuration whose `[sync]` table is `sync`.
    pub async fn start(
        pairs: usize,
        sim: impl FnOnce(&mut SimOptions),
        sync: &str,
    ) -> Result<Site> {
        let n = u32::try_from(pairs * 2)?;
        let mut opts = SimOptions::with_devices(n);
        opts.reconnect_delay = Duration::from_millis(20);
        sim(&mut opts);
        let sim = Simulator::start(opts).await?;
        let ids = sim.device_ids();
        let pairs: Vec<Pair> = ids
            .chunks(2)
            .zip(NAMES)
            .map(|(c, name)| Pair {
                name,
                source: c[0],
                target: c[1],
            })
            .collect();
        let dir = tempfile::Builder::new().prefix("reliability-").tempdir()?;
        let site = Site {
            config: dir.path().join("usersync.toml"),
            state: dir.path().join("state"),
            log: dir.path().join("daemon.log"),
            sim,
            dir,
            pairs,
        };
        let state = site.state.clone();
        site.write_config(&state, sync)?;
        Ok(site)
    }

    /// Writes the configuration with `state` as the state directory.
    pub fn write_config(&self, state: &Path, sync: &str) -> Result<()> {
        let ca = self
            .sim
            .certs()
            .context("a TLS simulator")?
            .write_ca(self.dir.path())?;
        let mut text = format!(
            "[gateway]\naddress = \"{}\"\nca_file = \"{}\"\nserver_name = \"localhost\"\napi = \"{}\"\n\
             keepalive_interval_secs = 2\nkeepalive_timeout_secs = 2\ncall_timeout_secs = 5\n\n\
             [state]\ndir = \"{}\"\n\n[sync]\npoll_interval_secs = 1\n{sync}\n\n",
            self.sim.address(),
            ca.display(),
            self.sim.api(),
            state.display()
        );
        for d in self.sim.device_ids() {
            text.push_str(&format!(
                "[[device]]\nid = {d}\naddress = \"192.0.2.{}\"\n\n",
                d % 250
            ));
        }
        for p in &self.pairs {
            text.push_str(&format!(
                "[[group]]\nname = \"{}\"\nsources = [{}]\ntargets = [{}]\n\n",
                p.name, p.source, p.target
            ));
        }
        std::fs::write(&self.config, text)?;
        Ok(())
    }

    pub fn pair(&self, i: usize) -> Result<Pair> {
        self.pairs
            .get(i)
            .copied()
            .ok_or_else(|| anyhow!("no group {i}"))
    }

    /// An administrator enrolls (or changes) `user` at `device`.
    pub fn enroll(&self, device: u32, user: &str) -> Result<()> {
        self.sim
            .enroll_on_device(device, user)
            .map(drop)
            .map_err(|e| anyhow!("enroll {user} at {device}: {e}"))
    }

    /// Whether `target` holds `user` with exactly the bytes `source` holds.
    pub fn delivered(&self, p: Pair, user: &str) -> bool {
        match self.sim.user_bytes(p.source, user) {
            Some(raw) => self.sim.holds_exactly(p.target, user, &raw),
            None => false,
        }
    }

    /// Waits until `user` of `p.source` is at `p.target`, byte for byte.
    pub async fn wait_delivered(&self, p: Pair, user: &str, within: Duration) -> Result<()> {
        until(
            &format!("user {user} of {} at {}", p.source, p.target),
            within,
            || async { Ok(self.delivered(p, user)) },
        )
        .await
    }

    /// Whether every target holds exactly its source's users.
    pub fn converged(&self) -> bool {
        self.pairs
            .iter()
            .all(|p| self.sim.users(p.source) == self.sim.users(p.target))
    }

    pub async fn wait_converged(&self, within: Duration) -> Result<()> {
        until("every target holds its source's users", within, || async {
            Ok(self.converged())
        })
        .await
    }
}
