//! sitebench: the real daemon (`usersync run`, a child process) against the
//! in-process gateway simulator, every figure printed beside its FLOOR
//! measured in the same run on a fresh simulator with identical settings.
//!
//!     cargo build --release --example sitebench --bin usersync
//!     cargo run --release --example sitebench -- all [--write docs/BENCHMARKS.md]
//!     cargo run --release --example sitebench -- propagation --targets 100 --latency-ms 2 --changes 200
//!     cargo run --release --example sitebench -- site --devices 1000 --groups 10 --latency-ms 20
//!     cargo run --release --example sitebench -- first-sight --events 1000000 [--measure-naive]
//!
//! The simulator keeps its default, least convenient answers (lazy stream
//! headers, OUT_OF_RANGE GetLog answers, NOT_FOUND for unknown users,
//! devices unknown until AddAsyncConnection). Every device command is
//! delayed by the scenario's device latency.
//!
//! What is measured:
//!
//! * `propagation`: one group (1 source + N targets). A change is a new user
//!   enrolled at the source; its latency runs from just before the enroll to
//!   the moment every target holds the source's bytes exactly. Changes are
//!   spaced: the next starts when the previous is everywhere, plus 20 ms.
//! * `site`: many groups of 100 devices. Time until the daemon reports every
//!   device live, propagation as above (round-robin over the sources), then
//!   an idle window: device calls per device per minute (from the
//!   simulator's call log), the daemon's CPU, RSS and threads (`/proc`).
//! * `first-sight`: a source whose log already holds N events, seen by a
//!   daemon with a fresh state directory: GetLog calls to it and the time
//!   until its checkpoint equals the newest event ID.
//!
//! The FLOOR is the least any client must do per change: its own
//! `GatewayClient` registers the devices (AddAsyncConnection), enables
//! monitoring of the sources, subscribes to their realtime log (user
//! enroll/update codes only) and, per event, does one `User.Get` at the
//! source and one `EnrollMulti` to the group's targets. Nothing else: no
//! state, no catch-up, no log shipping. For first sight the floor is the
//! naive full read: pages of 4096 from ID 0 until a short page.
//!
//! Every wait has a deadline; a scenario that does not converge makes the
//! program exit non-zero. The daemon's stderr goes to a file in its temp
//! directory; its last lines are printed on failure, and the directory is
//! kept when the daemon did not end cleanly or logged WARN/ERROR lines.
//!
//! Options for a closer look: `--settle-secs S` measures changes S seconds
//! after the warm-up instead of at once (a fresh daemon may still be
//! reconciling its new targets then); `--dump-rpcs FILE` appends every
//! measured phase's simulator call log and latencies; `--keep` keeps every
//! daemon's temp dir (config, state, stderr).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use usersync::gateway::{GatewayClient, GatewayError};
use usersync::proto::gsdk::connect::AsyncConnectInfo;
use usersync::sim::{SimOptions, Simulator, codes};
use usersync::store::Store;

/// One change must reach every target within this.
const CHANGE_DEADLINE: Duration = Duration::from_secs(30);
/// Every device live, and the warm-up user on every target.
const READY_DEADLINE: Duration = Duration::from_secs(600);
/// First sight: checkpoint at the newest event.
const FIRST_SIGHT_DEADLINE: Duration = Duration::from_secs(600);
/// SIGTERM to exit.
const STOP_DEADLINE: Duration = Duration::from_secs(15);
/// Quiet time between two measured changes.
const QUIET: Duration = Duration::from_millis(20);
/// A scenario gives up after this many changes that did not arrive.
const MAX_TIMEOUTS: usize = 3;
/// The naive reader's page size.
const PAGE: u32 = 4096;
/// Methods the gateway answers itself (everything else addresses devices).
const GATEWAY_METHODS: [&str; 6] = [
    "GetDeviceList",
    "AddAsyncConnection",
    "DeleteAsyncConnection",
    "SubscribeStatus",
    "SubscribeRealtimeLog",
    "GetInfo",
];

/// Whether to keep every daemon's temp dir (`--keep`).
static KEEP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Where to dump call logs (`--dump-rpcs`).
static DUMP_RPCS: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();

/// Appends `log` (and the latencies, in order) under `heading` to the
/// `--dump-rpcs` file, if one was given.
fn dump_rpcs(heading: &str, log: &[usersync::sim::RpcRecord], latencies: &[Duration]) {
    let Some(Some(path)) = DUMP_RPCS.get() else {
        return;
    };
    let mut text = format!("### {heading}\n");
    if !latencies.is_empty() {
        let ms: Vec<String> = latencies
            .iter()
            .map(|d| format!("{:.1}", d.as_secs_f64() * 1e3))
            .collect();
        let _ = writeln!(text, "latencies_ms: {}", ms.join(" "));
    }
    for r in log {
        let _ = writeln!(
            text,
            "{} devices={:?} users={:?} start={:?} max={:?}",
            r.method, r.device_ids, r.user_ids, r.start_event_id, r.max
        );
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path);
    if let Err(e) = file.and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes())) {
        eprintln!("sitebench: --dump-rpcs {}: {e}", path.display());
    }
}

// ---- command line ------------------------------------------------------------

#[derive(Parser)]
#[command(about = "usersync daemon vs. the floor client, against the simulator")]
struct Cli {
    /// The daemon binary (default: `usersync` next to target/<profile>/examples/).
    #[arg(long, global = true)]
    daemon: Option<PathBuf>,
    /// Also write the tables, the machine, the command and the date here.
    #[arg(long, global = true)]
    write: Option<PathBuf>,
    /// Append the simulator's call log of every measured phase to this
    /// file (one line per call), to see what a side did.
    #[arg(long, global = true)]
    dump_rpcs: Option<PathBuf>,
    /// Keep every daemon's temp dir (config, state, stderr), not only
    /// those of daemons that did not end cleanly.
    #[arg(long, global = true)]
    keep: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// The default set: propagation to 100, 10 and 1 targets, first sight
    /// of a million events, a site of 1000 devices.
    All,
    /// Single-change propagation in one group.
    Propagation(PropagationArgs),
    /// A site: many groups, time to live, propagation, idle cost.
    Site(SiteArgs),
    /// A source with a long log seen for the first time.
    FirstSight(FirstSightArgs),
}

#[derive(Args, Clone)]
struct PropagationArgs {
    #[arg(long, default_value_t = 100)]
    targets: u32,
    #[arg(long, default_value_t = 2)]
    latency_ms: u64,
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Wait this long after the warm-up before measuring (0: measure at
    /// once, while the daemon may still be reconciling its targets).
    #[arg(long, default_value_t = 0)]
    settle_secs: u64,
}

#[derive(Args, Clone)]
struct SiteArgs {
    #[arg(long, default_value_t = 1000)]
    devices: u32,
    #[arg(long, default_value_t = 10)]
    groups: u32,
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    #[arg(long, default_value_t = 100)]
    changes: usize,
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Wait after the last change before the idle window opens.
    #[arg(long, default_value_t = 10)]
    idle_after_secs: u64,
    /// Wait this long after the warm-up before measuring changes (0:
    /// measure at once, while the daemon may still be reconciling).
    #[arg(long, default_value_t = 0)]
    settle_secs: u64,
}

#[derive(Args, Clone)]
struct FirstSightArgs {
    #[arg(long, default_value_t = 1_000_000)]
    events: u32,
    #[arg(long, default_value_t = 2)]
    latency_ms: u64,
    /// Also time the naive full read with its own client.
    #[arg(long)]
    measure_naive: bool,
}

// ---- main --------------------------------------------------------------------

/// One scenario's result: a Markdown section.
struct Section {
    title: String,
    body: String,
    /// Whether it converged.
    ok: bool,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = DUMP_RPCS.set(cli.dump_rpcs.clone());
    let _ = KEEP.set(cli.keep);
    let bin = match daemon_binary(cli.daemon.clone()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("sitebench: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut sections = Vec::new();
    for job in jobs(&cli.scenario) {
        let started = Instant::now();
        eprintln!("sitebench: running {}", job.name());
        let mut section = match job.run(&bin).await {
            Ok(s) => s,
            Err(e) => Section {
                title: job.name(),
                body: format!("**FAILED**: {e:#}\n"),
                ok: false,
            },
        };
        let _ = writeln!(
            section.body,
            "\n_Scenario wall time: {:.0} s._",
            started.elapsed().as_secs_f64()
        );
        println!("## {}\n\n{}", section.title, section.body);
        sections.push(section);
    }
    if let Some(path) = &cli.write
        && let Err(e) = write_report(path, &sections)
    {
        eprintln!("sitebench: writing {}: {e:#}", path.display());
        return ExitCode::FAILURE;
    }
    if sections.iter().all(|s| s.ok) {
        ExitCode::SUCCESS
    } else {
        eprintln!("sitebench: a scenario failed to converge");
        ExitCode::FAILURE
    }
}

enum Job {
    Propagation(PropagationArgs),
    Site(SiteArgs),
    FirstSight(FirstSightArgs),
}

impl Job {
    fn name(&self) -> String {
        match self {
            Job::Propagation(a) => format!(
                "propagation: 1 source + {} targets, device latency {} ms, {} changes{}",
                a.targets,
                a.latency_ms,
                a.changes,
                match a.settle_secs {
                    0 => String::new(),
                    s => format!(", measured {s} s after the warm-up"),
                }
            ),
            Job::Site(a) => format!(
                "site: {} devices in {} groups, device latency {} ms, {} changes{}",
                a.devices,
                a.groups,
                a.latency_ms,
                a.changes,
                match a.settle_secs {
                    0 => String::new(),
                    s => format!(", measured {s} s after the warm-up"),
                }
            ),
            Job::FirstSight(a) => format!(
                "first sight: a source holding {} events, device latency {} ms",
                a.events, a.latency_ms
            ),
        }
    }

    async fn run(&self, bin: &Path) -> Result<Section> {
        let name = self.name();
        let (body, ok) = match self {
            Job::Propagation(a) => propagation(bin, a).await?,
            Job::Site(a) => site(bin, a).await?,
            Job::FirstSight(a) => first_sight(bin, a).await?,
        };
        Ok(Section {
            title: name,
            body,
            ok,
        })
    }
}

fn jobs(scenario: &Scenario) -> Vec<Job> {
    match scenario {
        Scenario::All => {
            let prop = |targets| PropagationArgs {
                targets,
                latency_ms: 2,
                changes: 200,
                settle_secs: 0,
            };
            vec![
                Job::Propagation(prop(100)),
                Job::Propagation(prop(10)),
                Job::Propagation(prop(1)),
                Job::FirstSight(FirstSightArgs {
                    events: 1_000_000,
                    latency_ms: 2,
                    measure_naive: true,
                }),
                Job::Site(SiteArgs {
                    devices: 1000,
                    groups: 10,
                    latency_ms: 20,
                    changes: 100,
                    idle_secs: 60,
                    idle_after_secs: 10,
                    settle_secs: 0,
                }),
            ]
        }
        Scenario::Propagation(a) => vec![Job::Propagation(a.clone())],
        Scenario::Site(a) => vec![Job::Site(a.clone())],
        Scenario::FirstSight(a) => vec![Job::FirstSight(a.clone())],
    }
}

fn daemon_binary(arg: Option<PathBuf>) -> Result<PathBuf> {
    let path = match arg {
        Some(p) => p,
        None => {
            let exe = std::env::current_exe().context("own executable")?;
            exe.parent()
                .and_then(Path::parent)
                .context("own executable has no grandparent directory")?
                .join("usersync")
        }
    };
    if !path.is_file() {
        bail!(
            "daemon binary {} not found: `cargo build --release --bin usersync`, or pass --daemon PATH",
            path.display()
        );
    }
    Ok(path)
}

// ---- layout and simulator ----------------------------------------------------

/// A group: its first device is the source, the rest its targets.
#[derive(Clone, Debug)]
struct Group {
    source: u32,
    targets: Vec<u32>,
}

/// The devices split into equal groups, in ID order.
fn layout(devices: &[u32], groups: usize) -> Vec<Group> {
    let size = devices.len() / groups.max(1);
    devices
        .chunks(size.max(2))
        .take(groups.max(1))
        .map(|c| Group {
            source: c[0],
            targets: c[1..].to_vec(),
        })
        .collect()
}

async fn start_sim(devices: u32, latency: Duration, log_capacity: usize) -> Result<Simulator> {
    let mut opts = SimOptions::with_devices(devices);
    opts.model.log_capacity = opts.model.log_capacity.max(log_capacity);
    let sim = Simulator::start(opts)
        .await
        .map_err(|e| anyhow!("simulator: {e}"))?;
    sim.set_device_latency(latency);
    Ok(sim)
}

fn device_address(id: u32) -> String {
    format!("192.0.2.{}", id % 250 + 1)
}

/// A client of its own that has registered every device of `sim` with the
/// gateway (AddAsyncConnection), as any client must.
async fn registered_client(sim: &Simulator) -> Result<GatewayClient> {
    let client = GatewayClient::new(&sim.gateway_settings())?;
    let infos = sim
        .device_ids()
        .into_iter()
        .map(|id| AsyncConnectInfo {
            device_id: id,
            ip_addr: device_address(id),
            port: 51211,
            use_ssl: false,
        })
        .collect();
    client.add_async_connection(infos).await?;
    Ok(client)
}

// ---- the daemon, a child process ---------------------------------------------

/// Writes the daemon's configuration (and the simulator's CA) into `dir`.
fn write_config(sim: &Simulator, dir: &Path, groups: &[Group]) -> Result<PathBuf> {
    let ca = sim
        .certs()
        .context("simulator without TLS")?
        .write_ca(dir)
        .context("writing the CA")?;
    let mut text = format!(
        "[gateway]\naddress = \"{}\"\nca_file = \"{}\"\nserver_name = \"localhost\"\napi = \"{}\"\n\n\
         [state]\ndir = \"{}\"\n\n[log]\nevents = \"none\"\n\n",
        sim.address(),
        ca.display(),
        sim.api(),
        dir.join("state").display()
    );
    for d in sim.device_ids() {
        let _ = writeln!(
            text,
            "[[device]]\nid = {d}\naddress = \"{}\"\n",
            device_address(d)
        );
    }
    for (i, g) in groups.iter().enumerate() {
        let targets: Vec<String> = g.targets.iter().map(u32::to_string).collect();
        let _ = writeln!(
            text,
            "[[group]]\nname = \"g{i}\"\nsources = [{}]\ntargets = [{}]\n",
            g.source,
            targets.join(", ")
        );
    }
    let path = dir.join("usersync.toml");
    std::fs::write(&path, text).context("writing the config")?;
    Ok(path)
}

/// `usersync run` as a child process with its own temp directory. Dropping
/// it kills the process if it still runs.
struct Daemon {
    child: Child,
    dir: Option<tempfile::TempDir>,
    state_dir: PathBuf,
    stderr_path: PathBuf,
    started: Instant,
    store: Option<Store>,
}

impl Daemon {
    fn spawn(bin: &Path, sim: &Simulator, groups: &[Group]) -> Result<Daemon> {
        let dir = tempfile::Builder::new()
            .prefix("sitebench-")
            .tempdir()
            .context("temp dir")?;
        let config = write_config(sim, dir.path(), groups)?;
        let stderr_path = dir.path().join("daemon.stderr");
        let out = File::create(&stderr_path).context("daemon stderr file")?;
        let started = Instant::now();
        let child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Daemon {
            child,
            state_dir: dir.path().join("state"),
            dir: Some(dir),
            stderr_path,
            started,
            store: None,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails (with the end of its stderr) if the daemon has exited.
    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the daemon exited ({status})");
        }
        Ok(())
    }

    /// The state store, once the daemon has created it.
    async fn store(&mut self) -> Option<Store> {
        if self.store.is_none() {
            let dir = self.state_dir.clone();
            let opened = tokio::task::spawn_blocking(move || Store::open_existing(&dir)).await;
            self.store = opened.ok().and_then(Result::ok);
        }
        self.store.clone()
    }

    async fn live_count(&mut self) -> usize {
        let Some(store) = self.store().await else {
            return 0;
        };
        let rows = tokio::task::spawn_blocking(move || store.device_statuses()).await;
        match rows {
            Ok(Ok(rows)) => rows.iter().filter(|r| r.state == "live").count(),
            _ => 0,
        }
    }

    async fn checkpoint(&mut self, device: u32) -> Option<u32> {
        let store = self.store().await?;
        let cp = tokio::task::spawn_blocking(move || store.checkpoint(device)).await;
        cp.ok().and_then(Result::ok).flatten()
    }

    /// Waits until `devices` devices are live; returns the time since spawn.
    async fn wait_live(&mut self, devices: usize, deadline: Instant) -> Result<Duration> {
        loop {
            self.check_running()?;
            let live = self.live_count().await;
            if live >= devices {
                return Ok(self.started.elapsed());
            }
            if Instant::now() >= deadline {
                bail!(
                    "only {live}/{devices} devices live after {:.0} s",
                    self.started.elapsed().as_secs_f64()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The daemon's stderr, without terminal colour codes.
    fn stderr_text(&self) -> String {
        let raw = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        strip_ansi(&raw)
    }

    /// What to attach to a failure: the end of its stderr.
    fn diagnose(&self) -> String {
        format!("daemon stderr ends:\n{}", self.tail(30))
    }

    /// The last `n` lines of the daemon's stderr.
    fn tail(&self, n: usize) -> String {
        let text = self.stderr_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// WARN and ERROR lines of its stderr: how many, and a few distinct ones.
    fn complaints(&self) -> (usize, Vec<String>) {
        let text = self.stderr_text();
        let mut seen = std::collections::HashSet::new();
        let mut distinct: Vec<String> = Vec::new();
        let mut count = 0;
        for line in text
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        {
            count += 1;
            // Without the timestamp; numbers blanked to spot repeats.
            let msg = line.split_once(' ').map_or(line, |(_, m)| m).trim();
            let shape: String = msg
                .chars()
                .filter(|c| !c.is_ascii_digit())
                .take(120)
                .collect();
            if distinct.len() < 6 && seen.insert(shape) {
                distinct.push(msg.chars().take(240).collect());
            }
        }
        (count, distinct)
    }

    /// SIGTERM, wait, SIGKILL. Returns a note on how it ended and what it
    /// complained about; keeps the temp dir if it did not end cleanly.
    async fn stop(&mut self) -> String {
        let mut note = String::new();
        let exited_before = matches!(self.child.try_wait(), Ok(Some(_)));
        if !exited_before {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + STOP_DEADLINE;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => break None,
            }
        };
        match status {
            Some(s) if s.success() && !exited_before => {}
            Some(s) if exited_before => {
                let _ = writeln!(note, "- the daemon had exited by itself: {s}");
            }
            Some(s) => {
                let _ = writeln!(note, "- daemon exit after SIGTERM: {s}");
            }
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let _ = writeln!(
                    note,
                    "- daemon did not exit within {STOP_DEADLINE:?} of SIGTERM: killed"
                );
            }
        }
        let (count, distinct) = self.complaints();
        if count > 0 {
            let _ = writeln!(note, "- daemon stderr: {count} WARN/ERROR lines, e.g.:");
            for d in distinct {
                let _ = writeln!(note, "  - `{}`", d.replace('`', "'"));
            }
        }
        if !note.is_empty() || KEEP.get() == Some(&true) {
            self.keep_dir(&mut note);
        }
        note
    }

    /// Keeps the temp dir (state, stderr) for a look afterwards.
    fn keep_dir(&mut self, note: &mut String) {
        if let Some(dir) = self.dir.take() {
            let path = dir.keep();
            let _ = writeln!(note, "- kept {}", path.display());
        }
    }
}

/// `text` without ANSI escape sequences (the daemon colours its log even
/// when stderr is a file).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters final-byte
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---- the floor client --------------------------------------------------------

/// The floor client: subscription plus one Get and one EnrollMulti per
/// source event.
struct Floor {
    setup: Duration,
    task: JoinHandle<()>,
    errors: Arc<AtomicU64>,
}

impl Floor {
    async fn start(sim: &Simulator, groups: &[Group]) -> Result<Floor> {
        let t0 = Instant::now();
        let client = registered_client(sim).await?;
        let sources: Vec<u32> = groups.iter().map(|g| g.source).collect();
        client.enable_monitoring_multi(sources.clone()).await?;
        let setup = t0.elapsed();
        let targets: HashMap<u32, Arc<Vec<u32>>> = groups
            .iter()
            .map(|g| (g.source, Arc::new(g.targets.clone())))
            .collect();
        let errors = Arc::new(AtomicU64::new(0));
        // The subscription may not answer before its first event (lazy
        // headers): it lives in its own task.
        let task = tokio::spawn(floor_loop(client, sources, targets, Arc::clone(&errors)));
        wait_subscribed(sim).await?;
        Ok(Floor {
            setup,
            task,
            errors,
        })
    }

    fn stop(&self) -> String {
        self.task.abort();
        match self.errors.load(Ordering::Relaxed) {
            0 => String::new(),
            n => format!("- floor client: {n} failed calls\n"),
        }
    }
}

/// Waits until the gateway has seen the floor's subscription (recorded just
/// before it is registered), plus a margin.
async fn wait_subscribed(sim: &Simulator) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sim
        .rpc_log()
        .iter()
        .any(|r| r.method == "SubscribeRealtimeLog")
    {
        if Instant::now() >= deadline {
            bail!("floor: the subscription never reached the gateway");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(())
}

async fn floor_loop(
    client: GatewayClient,
    sources: Vec<u32>,
    targets: HashMap<u32, Arc<Vec<u32>>>,
    errors: Arc<AtomicU64>,
) {
    let user_codes = vec![codes::USER_ENROLL_SUCCESS, codes::USER_UPDATE_SUCCESS];
    let mut stream = match client
        .subscribe_realtime_log(4096, sources, user_codes)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("floor: subscribe: {e}");
            errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(ev)) => {
                let Some(t) = targets.get(&ev.device_id) else {
                    continue;
                };
                let job = floor_apply(
                    client.clone(),
                    ev.device_id,
                    ev.user_id,
                    Arc::clone(t),
                    Arc::clone(&errors),
                );
                tokio::spawn(job);
            }
            Ok(None) => return,
            Err(e) => {
                eprintln!("floor: realtime stream: {e}");
                errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

async fn floor_apply(
    client: GatewayClient,
    source: u32,
    user: String,
    targets: Arc<Vec<u32>>,
    errors: Arc<AtomicU64>,
) {
    let result = async {
        let mut got = client.user_get(source, vec![user.clone()]).await?;
        let rec = got.pop().context("User.Get answered no user")?;
        client
            .user_enroll_multi(targets.to_vec(), vec![rec.raw], true)
            .await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("floor: user {user}: {e:#}");
        errors.fetch_add(1, Ordering::Relaxed);
    }
}

// ---- the subject under test: daemon or floor ----------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Daemon,
    Floor,
}

enum Subject {
    Daemon(Box<Daemon>),
    Floor(Floor),
}

impl Subject {
    async fn start(side: Side, bin: &Path, sim: &Simulator, groups: &[Group]) -> Result<Subject> {
        Ok(match side {
            Side::Daemon => Subject::Daemon(Box::new(Daemon::spawn(bin, sim, groups)?)),
            Side::Floor => Subject::Floor(Floor::start(sim, groups).await?),
        })
    }

    /// Time from start until every device is live (the floor: its setup).
    async fn wait_live(&mut self, devices: usize) -> Result<Duration> {
        match self {
            Subject::Daemon(d) => d.wait_live(devices, Instant::now() + READY_DEADLINE).await,
            Subject::Floor(f) => Ok(f.setup),
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Subject::Daemon(d) => Some(d.pid()),
            Subject::Floor(_) => None,
        }
    }

    /// Diagnostics to attach to a failure.
    fn diagnose(&mut self) -> String {
        match self {
            Subject::Daemon(d) => d.diagnose(),
            Subject::Floor(f) => format!(
                "floor client failed calls: {}",
                f.errors.load(Ordering::Relaxed)
            ),
        }
    }

    async fn stop(&mut self) -> String {
        match self {
            Subject::Daemon(d) => d.stop().await,
            Subject::Floor(f) => f.stop(),
        }
    }
}

// ---- waiting on the simulator -------------------------------------------------

/// Waits (woken by user-table changes, never spinning) until `done` holds
/// or the deadline passes; returns whether it held.
async fn wait_users(
    rx: &mut watch::Receiver<u64>,
    deadline: Instant,
    mut done: impl FnMut() -> bool,
) -> bool {
    loop {
        let _ = *rx.borrow_and_update();
        if done() {
            return true;
        }
        let changed = tokio::time::timeout_at(deadline.into(), rx.changed()).await;
        if !matches!(changed, Ok(Ok(()))) {
            return done();
        }
    }
}

/// Waits until every target holds exactly `raw` as `user`; returns when.
async fn wait_on_targets(
    sim: &Simulator,
    rx: &mut watch::Receiver<u64>,
    targets: &[u32],
    user: &str,
    raw: &[u8],
    deadline: Instant,
) -> Option<Instant> {
    let mut left = targets.to_vec();
    let mut when = None;
    let ok = wait_users(rx, deadline, || {
        left.retain(|t| !sim.holds_exactly(*t, user, raw));
        if left.is_empty() && when.is_none() {
            when = Some(Instant::now());
        }
        left.is_empty()
    })
    .await;
    if ok { when } else { None }
}

/// Enrolls a warm-up user at every source until every target holds it
/// (re-enrolling every few seconds, in case the first event went by before
/// the subject was listening).
async fn warm_up(sim: &Simulator, groups: &[Group], deadline: Instant) -> Result<Duration> {
    let t0 = Instant::now();
    let user = "9000000";
    let mut rx = sim.users_changed();
    let mut pending: Vec<&Group> = groups.iter().collect();
    while !pending.is_empty() {
        if Instant::now() >= deadline {
            bail!(
                "warm-up: {} groups never received the warm-up user",
                pending.len()
            );
        }
        let round = (Instant::now() + Duration::from_secs(5)).min(deadline);
        let mut want = Vec::new();
        for g in &pending {
            sim.enroll_on_device(g.source, user)
                .map_err(|e| anyhow!("enroll: {e}"))?;
            want.push(sim.user_bytes(g.source, user).context("warm-up user")?);
        }
        let mut next = Vec::new();
        for (g, raw) in pending.iter().zip(&want) {
            if wait_on_targets(sim, &mut rx, &g.targets, user, raw, round)
                .await
                .is_none()
            {
                next.push(*g);
            }
        }
        pending = next;
    }
    Ok(t0.elapsed())
}

/// Latencies of spaced single changes (new users), round-robin over the
/// groups' sources.
#[derive(Default)]
struct Samples {
    latencies: Vec<Duration>,
    timeouts: usize,
    /// Gateway RPCs during the changes, by method (calls, not devices).
    rpcs: BTreeMap<&'static str, u64>,
    /// The daemon's CPU during the changes (clock ticks) and the wall time.
    cpu_ticks: Option<u64>,
    wall: Duration,
}

impl Samples {
    /// RPCs that address devices, per measured change.
    fn device_rpcs_per_change(&self) -> f64 {
        let n: u64 = self
            .rpcs
            .iter()
            .filter(|(m, _)| !GATEWAY_METHODS.contains(m))
            .map(|(_, n)| n)
            .sum();
        n as f64 / (self.latencies.len() + self.timeouts).max(1) as f64
    }

    fn rpc_breakdown(&self) -> String {
        self.rpcs
            .iter()
            .map(|(m, n)| format!("{m} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The daemon's CPU during the changes, % of one core.
    fn cpu_percent(&self) -> Option<f64> {
        self.cpu_ticks
            .map(|t| t as f64 / clock_ticks() as f64 / self.wall.as_secs_f64() * 100.0)
    }
}

async fn measure_changes(
    sim: &Simulator,
    groups: &[Group],
    changes: usize,
    pid: Option<u32>,
) -> Result<Samples> {
    let mut rx = sim.users_changed();
    let mut out = Samples::default();
    sim.clear_rpc_log();
    let cpu0 = pid.map(proc_cpu_ticks).transpose()?;
    let started = Instant::now();
    for i in 0..changes {
        let g = &groups[i % groups.len()];
        let user = format!("{}", 1_000_001 + i);
        let t0 = Instant::now();
        sim.enroll_on_device(g.source, &user)
            .map_err(|e| anyhow!("enroll: {e}"))?;
        let raw = sim.user_bytes(g.source, &user).context("enrolled user")?;
        match wait_on_targets(sim, &mut rx, &g.targets, &user, &raw, t0 + CHANGE_DEADLINE).await {
            Some(t1) => out.latencies.push(t1 - t0),
            None => {
                out.timeouts += 1;
                eprintln!(
                    "sitebench: change {i} (user {user}) did not reach every target within {CHANGE_DEADLINE:?}"
                );
                if out.timeouts >= MAX_TIMEOUTS {
                    bail!("{} changes did not reach every target", out.timeouts);
                }
            }
        }
        tokio::time::sleep(QUIET).await;
    }
    out.wall = started.elapsed();
    if let (Some(pid), Some(cpu0)) = (pid, cpu0) {
        out.cpu_ticks = Some(proc_cpu_ticks(pid)?.saturating_sub(cpu0));
    }
    let log = sim.rpc_log();
    for rec in &log {
        *out.rpcs.entry(rec.method).or_insert(0) += 1;
    }
    let side = if pid.is_some() { "daemon" } else { "floor" };
    dump_rpcs(&format!("{side}: {changes} changes"), &log, &out.latencies);
    Ok(out)
}

// ---- statistics and formatting ---------------------------------------------------

/// Nearest-rank percentile.
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("—".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "—".into(),
    }
}

fn dratio(a: Option<Duration>, b: Option<Duration>) -> String {
    ratio(a.map(|d| d.as_secs_f64()), b.map(|d| d.as_secs_f64()))
}

/// p50, p90, p99, max of a sample set.
fn stats(s: &Samples) -> [Option<Duration>; 4] {
    let mut v = s.latencies.clone();
    v.sort();
    [
        percentile(&v, 0.50),
        percentile(&v, 0.90),
        percentile(&v, 0.99),
        v.last().copied(),
    ]
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut t = format!("| {} |\n|", header.join(" | "));
    for (i, _) in header.iter().enumerate() {
        t.push_str(if i == 0 { "---|" } else { "---:|" });
    }
    t.push('\n');
    for r in rows {
        let _ = writeln!(t, "| {} |", r.join(" | "));
    }
    t
}

fn latency_rows(daemon: &Samples, floor: &Samples) -> Vec<Vec<String>> {
    let (d, f) = (stats(daemon), stats(floor));
    let mut rows: Vec<Vec<String>> = ["p50", "p90", "p99", "max"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            vec![
                format!("change → all targets, {name}"),
                ms(d[i]),
                ms(f[i]),
                dratio(d[i], f[i]),
            ]
        })
        .collect();
    rows.push(vec![
        "changes measured / timed out".into(),
        format!("{} / {}", daemon.latencies.len(), daemon.timeouts),
        format!("{} / {}", floor.latencies.len(), floor.timeouts),
        String::new(),
    ]);
    rows.extend(cost_rows(daemon, floor, 4));
    rows
}

/// Device RPCs per change and the daemon's CPU, padded to `width` columns.
fn cost_rows(daemon: &Samples, floor: &Samples, width: usize) -> Vec<Vec<String>> {
    let (d, f) = (
        daemon.device_rpcs_per_change(),
        floor.device_rpcs_per_change(),
    );
    let mut rows = vec![
        vec![
            "device-addressing RPCs per change".into(),
            format!("{d:.2}"),
            format!("{f:.2}"),
            ratio(Some(d), Some(f)),
        ],
        vec![
            "daemon CPU during the changes, % of one core".into(),
            daemon
                .cpu_percent()
                .map_or("—".into(), |c| format!("{c:.1} %")),
            "—".into(),
            String::new(),
        ],
    ];
    for r in &mut rows {
        r.resize(width, String::new());
    }
    rows
}

/// Which RPCs each side made during the measured changes.
fn rpc_note(daemon: &Samples, floor: &Samples) -> String {
    format!(
        "\nRPCs during the measured changes — daemon: {}; floor: {}.\n",
        daemon.rpc_breakdown(),
        floor.rpc_breakdown()
    )
}

/// What the simulator's realtime stream did for one side's whole run.
fn realtime_note(sim: &Simulator, side: Side) -> String {
    let rt = sim.realtime_stats();
    let who = match side {
        Side::Daemon => "daemon",
        Side::Floor => "floor",
    };
    format!(
        "- {who} run: the simulator delivered {} realtime events, dropped {} (queue full)\n",
        rt.delivered, rt.dropped_queue_full
    )
}

// ---- scenario: propagation ---------------------------------------------------------

/// What one side (daemon or floor) of a propagation run measured.
struct Run {
    live: Duration,
    warm_up: Duration,
    samples: Samples,
    note: String,
}

/// Starts a fresh simulator and `side` on it, waits until live and warm,
/// measures `changes` changes, then stops everything (also on error).
async fn propagation_run(
    side: Side,
    bin: &Path,
    devices: u32,
    groups: usize,
    latency: Duration,
    changes: usize,
    settle: Duration,
) -> Result<Run> {
    let sim = start_sim(devices, latency, 0).await?;
    let layout = layout(&sim.device_ids(), groups);
    let mut subject = Subject::start(side, bin, &sim, &layout).await?;
    let result = async {
        let live = subject.wait_live(devices as usize).await?;
        let warm_up = warm_up(&sim, &layout, Instant::now() + READY_DEADLINE).await?;
        tokio::time::sleep(settle).await;
        let samples = measure_changes(&sim, &layout, changes, subject.pid()).await?;
        anyhow::Ok((live, warm_up, samples))
    }
    .await;
    let result = result.map_err(|e| anyhow!("{e:#}\n{}", subject.diagnose()));
    let mut note = subject.stop().await;
    note.push_str(&realtime_note(&sim, side));
    sim.shutdown().await;
    let (live, warm_up, samples) = result.map_err(|e| anyhow!("{e:#}\n{note}"))?;
    Ok(Run {
        live,
        warm_up,
        samples,
        note,
    })
}

async fn propagation(bin: &Path, a: &PropagationArgs) -> Result<(String, bool)> {
    let latency = Duration::from_millis(a.latency_ms);
    let devices = a.targets + 1;
    let settle = Duration::from_secs(a.settle_secs);
    let floor = propagation_run(Side::Floor, bin, devices, 1, latency, a.changes, settle).await?;
    let daemon = propagation_run(Side::Daemon, bin, devices, 1, latency, a.changes, settle).await?;
    let mut rows = latency_rows(&daemon.samples, &floor.samples);
    rows.push(vec![
        "start → all devices live".into(),
        secs(daemon.live),
        format!("{} (setup)", secs(floor.live)),
        String::new(),
    ]);
    rows.push(vec![
        "live → warm-up user on all targets".into(),
        secs(daemon.warm_up),
        secs(floor.warm_up),
        String::new(),
    ]);
    let mut body = table(&["figure", "daemon", "floor", "daemon / floor"], &rows);
    body.push_str(&rpc_note(&daemon.samples, &floor.samples));
    body.push_str(&daemon.note);
    body.push_str(&floor.note);
    let ok = daemon.samples.timeouts == 0 && floor.samples.timeouts == 0;
    Ok((body, ok))
}

// ---- scenario: site ------------------------------------------------------------------

/// The idle window's figures.
struct Idle {
    window: Duration,
    device_calls: u64,
    by_method: BTreeMap<&'static str, u64>,
    cpu_ticks: u64,
    rss_kb: u64,
    threads: u64,
    /// Thread names (`comm`) and how many of each.
    thread_names: BTreeMap<String, usize>,
}

async fn idle_window(sim: &Simulator, pid: u32, secs: u64) -> Result<Idle> {
    sim.clear_rpc_log();
    let ticks0 = proc_cpu_ticks(pid)?;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let ticks1 = proc_cpu_ticks(pid)?;
    let window = t0.elapsed();
    let (rss_kb, threads) = proc_status(pid)?;
    let thread_names = proc_thread_names(pid);
    let mut by_method = BTreeMap::new();
    let mut device_calls = 0;
    let log = sim.rpc_log();
    dump_rpcs("daemon: idle window", &log, &[]);
    for rec in log {
        if GATEWAY_METHODS.contains(&rec.method) {
            continue;
        }
        let n = rec.device_ids.len() as u64;
        device_calls += n;
        *by_method.entry(rec.method).or_insert(0) += n;
    }
    Ok(Idle {
        window,
        device_calls,
        by_method,
        cpu_ticks: ticks1.saturating_sub(ticks0),
        rss_kb,
        threads,
        thread_names,
    })
}

/// The daemon side of a site run: live, propagation, idle.
async fn site_daemon(bin: &Path, a: &SiteArgs) -> Result<(Run, Idle)> {
    let latency = Duration::from_millis(a.latency_ms);
    let sim = start_sim(a.devices, latency, 0).await?;
    let layout = layout(&sim.device_ids(), a.groups as usize);
    let mut daemon = Daemon::spawn(bin, &sim, &layout)?;
    let result = async {
        let live = daemon
            .wait_live(a.devices as usize, Instant::now() + READY_DEADLINE)
            .await?;
        let warm = warm_up(&sim, &layout, Instant::now() + READY_DEADLINE).await?;
        tokio::time::sleep(Duration::from_secs(a.settle_secs)).await;
        let samples = measure_changes(&sim, &layout, a.changes, Some(daemon.pid())).await?;
        tokio::time::sleep(Duration::from_secs(a.idle_after_secs)).await;
        daemon.check_running()?;
        let idle = idle_window(&sim, daemon.pid(), a.idle_secs).await?;
        daemon.check_running()?;
        anyhow::Ok((live, warm, samples, idle))
    }
    .await;
    let result = result.map_err(|e| anyhow!("{e:#}\n{}", daemon.diagnose()));
    let mut note = daemon.stop().await;
    note.push_str(&realtime_note(&sim, Side::Daemon));
    sim.shutdown().await;
    let (live, warm_up, samples, idle) = result.map_err(|e| anyhow!("{e:#}\n{note}"))?;
    Ok((
        Run {
            live,
            warm_up,
            samples,
            note,
        },
        idle,
    ))
}

async fn site(bin: &Path, a: &SiteArgs) -> Result<(String, bool)> {
    if a.groups == 0 || a.devices < 2 * a.groups {
        bail!("site: need at least 2 devices per group");
    }
    let latency = Duration::from_millis(a.latency_ms);
    let groups = a.groups as usize;
    let floor = propagation_run(
        Side::Floor,
        bin,
        a.devices,
        groups,
        latency,
        a.changes,
        Duration::from_secs(a.settle_secs),
    )
    .await?;
    let (daemon, idle) = site_daemon(bin, a).await?;

    let mut rows = vec![vec![
        format!("start → all {} devices live", a.devices),
        secs(daemon.live),
        format!("{} (setup)", secs(floor.live)),
        String::new(),
        String::new(),
    ]];
    let (d, f) = (stats(&daemon.samples), stats(&floor.samples));
    let target = f[0].map(|p50| 2 * p50 + Duration::from_millis(20));
    for (i, name) in ["p50", "p90", "p99", "max"].iter().enumerate() {
        let goal = match (i, target, d[2]) {
            (2, Some(t), Some(p99)) => format!(
                "≤ 2 × floor p50 + 20 ms = {} — {}",
                ms(Some(t)),
                if p99 <= t { "met" } else { "MISSED" }
            ),
            _ => String::new(),
        };
        rows.push(vec![
            format!("change → all targets of its group, {name}"),
            ms(d[i]),
            ms(f[i]),
            dratio(d[i], f[i]),
            goal,
        ]);
    }
    rows.push(vec![
        "changes measured / timed out".into(),
        format!(
            "{} / {}",
            daemon.samples.latencies.len(),
            daemon.samples.timeouts
        ),
        format!(
            "{} / {}",
            floor.samples.latencies.len(),
            floor.samples.timeouts
        ),
        String::new(),
        String::new(),
    ]);
    rows.extend(cost_rows(&daemon.samples, &floor.samples, 5));
    rows.extend(idle_rows(&idle, a.devices));
    let mut body = table(
        &["figure", "daemon", "floor", "daemon / floor", "target"],
        &rows,
    );
    let _ = writeln!(
        body,
        "\nIdle window {:.0} s, opened {} s after the last change; device calls by method: {}.\n\
         The daemon's threads at the end of it: {}.\n\
         The floor makes no call without an event, so its idle figures are zero by construction.",
        idle.window.as_secs_f64(),
        a.idle_after_secs,
        if idle.by_method.is_empty() {
            "none".to_string()
        } else {
            idle.by_method
                .iter()
                .map(|(m, n)| format!("{m} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        },
        idle.thread_names
            .iter()
            .map(|(n, c)| format!("{n} ×{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    body.push_str(&rpc_note(&daemon.samples, &floor.samples));
    body.push_str(&daemon.note);
    body.push_str(&floor.note);
    let ok = daemon.samples.timeouts == 0 && floor.samples.timeouts == 0;
    Ok((body, ok))
}

fn idle_rows(idle: &Idle, devices: u32) -> Vec<Vec<String>> {
    let minutes = idle.window.as_secs_f64() / 60.0;
    let per_device_min = idle.device_calls as f64 / f64::from(devices) / minutes;
    let cpu = idle.cpu_ticks as f64 / clock_ticks() as f64 / idle.window.as_secs_f64() * 100.0;
    let row = |name: &str, daemon: String, floor: &str, target: String| {
        vec![
            name.to_string(),
            daemon,
            floor.to_string(),
            String::new(),
            target,
        ]
    };
    vec![
        row(
            "idle: device calls per device per minute",
            format!("{per_device_min:.3} ({} calls)", idle.device_calls),
            "0",
            format!(
                "< 1 — {}",
                if per_device_min < 1.0 {
                    "met"
                } else {
                    "MISSED"
                }
            ),
        ),
        row(
            "idle: daemon CPU, % of one core",
            format!("{cpu:.2} %"),
            "—",
            String::new(),
        ),
        row(
            "idle: daemon RSS",
            format!("{:.1} MiB", idle.rss_kb as f64 / 1024.0),
            "—",
            String::new(),
        ),
        row(
            "idle: daemon threads",
            idle.threads.to_string(),
            "—",
            String::new(),
        ),
    ]
}

// ---- /proc ------------------------------------------------------------------------

/// utime + stime of a process, in clock ticks.
fn proc_cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc/PID/stat without ')'")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .context("short /proc/PID/stat")?
            .parse()
            .context("/proc/PID/stat field")
    };
    Ok(field(14)? + field(15)?)
}

/// VmRSS (kB) and Threads of a process.
fn proc_status(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("/proc/{pid}/status"))?;
    let value = |key: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{key} in /proc/{pid}/status"))
    };
    Ok((value("VmRSS:")?, value("Threads:")?))
}

/// The names of a process's threads, counted.
fn proc_thread_names(pid: u32) -> BTreeMap<String, usize> {
    let mut names = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return names;
    };
    for task in tasks.flatten() {
        if let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) {
            *names.entry(comm.trim().to_string()).or_insert(0) += 1;
        }
    }
    names
}

/// Clock ticks per second (`getconf CLK_TCK`, read once; 100 if unknown).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

// ---- scenario: first sight -----------------------------------------------------------

/// A simulator whose first device's log holds `events` events; returns it
/// and the newest event ID.
async fn long_log_sim(events: u32, latency: Duration) -> Result<(Simulator, u32)> {
    let sim = start_sim(2, latency, events as usize + 10_000).await?;
    let source = sim.device_ids()[0];
    let (_, last) = sim
        .append_events(source, events, codes::VERIFY_SUCCESS)
        .map_err(|e| anyhow!("append_events: {e}"))?;
    Ok((sim, last))
}

/// What the daemon did on first sight of the long log.
struct FirstSight {
    took: Duration,
    get_logs: Vec<(Option<u32>, Option<u32>)>,
    note: String,
}

async fn first_sight_daemon(bin: &Path, a: &FirstSightArgs) -> Result<FirstSight> {
    let (sim, newest) = long_log_sim(a.events, Duration::from_millis(a.latency_ms)).await?;
    let ids = sim.device_ids();
    let groups = [Group {
        source: ids[0],
        targets: vec![ids[1]],
    }];
    sim.clear_rpc_log();
    let mut daemon = Daemon::spawn(bin, &sim, &groups)?;
    let deadline = Instant::now() + FIRST_SIGHT_DEADLINE;
    let result = async {
        loop {
            daemon.check_running()?;
            if daemon.checkpoint(ids[0]).await == Some(newest) {
                return anyhow::Ok(daemon.started.elapsed());
            }
            if Instant::now() >= deadline {
                bail!(
                    "checkpoint {:?} ≠ newest event {newest} after {FIRST_SIGHT_DEADLINE:?}",
                    daemon.checkpoint(ids[0]).await
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    .await;
    let result = result.map_err(|e| anyhow!("{e:#}\n{}", daemon.diagnose()));
    let get_logs = sim
        .rpc_log()
        .into_iter()
        .filter(|r| r.method == "GetLog" && r.device_ids == [ids[0]])
        .map(|r| (r.start_event_id, r.max))
        .collect();
    let note = daemon.stop().await;
    sim.shutdown().await;
    Ok(FirstSight {
        took: result.map_err(|e| anyhow!("{e:#}\n{note}"))?,
        get_logs,
        note,
    })
}

/// The naive full read with its own client: (calls, time).
async fn naive_read(a: &FirstSightArgs) -> Result<(usize, Duration)> {
    let (sim, newest) = long_log_sim(a.events, Duration::from_millis(a.latency_ms)).await?;
    let source = sim.device_ids()[0];
    let deadline = Instant::now() + FIRST_SIGHT_DEADLINE;
    let t0 = Instant::now();
    let result = async {
        let client = registered_client(&sim).await?;
        let (mut start, mut calls, mut last) = (0u32, 0usize, 0u32);
        loop {
            if Instant::now() >= deadline {
                bail!("naive read: not done after {FIRST_SIGHT_DEADLINE:?}");
            }
            calls += 1;
            let page = match client.get_log(source, start, PAGE).await {
                Ok(p) => p,
                // Past the newest: the end, under the OUT_OF_RANGE policy.
                Err(GatewayError::Rpc { status, .. })
                    if status.code() == tonic::Code::OutOfRange =>
                {
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(ev) = page.last() {
                last = ev.id;
                start = ev.id + 1;
            }
            if page.len() < PAGE as usize {
                break;
            }
        }
        if last != newest {
            bail!("naive read ended at {last}, newest is {newest}");
        }
        anyhow::Ok(calls)
    }
    .await;
    let took = t0.elapsed();
    sim.shutdown().await;
    Ok((result?, took))
}

async fn first_sight(bin: &Path, a: &FirstSightArgs) -> Result<(String, bool)> {
    if a.events == 0 {
        bail!("first-sight: --events must be at least 1");
    }
    let naive = if a.measure_naive {
        Some(naive_read(a).await?)
    } else {
        None
    };
    let daemon = first_sight_daemon(bin, a).await?;
    // A reader stops at its first short page.
    let naive_calls = (a.events / PAGE) as usize + 1;
    let calls = daemon.get_logs.len();
    let mut rows = vec![vec![
        "GetLog calls to the device".to_string(),
        calls.to_string(),
        match naive {
            Some((measured, _)) => format!("{naive_calls} computed, {measured} measured"),
            None => format!("{naive_calls} computed"),
        },
        ratio(Some(calls as f64), Some(naive_calls as f64)),
    ]];
    rows.push(vec![
        "start → checkpoint = newest event".into(),
        secs(daemon.took),
        naive.map_or("— (pass --measure-naive)".into(), |(_, t)| secs(t)),
        naive.map_or("—".into(), |(_, t)| dratio(Some(daemon.took), Some(t))),
    ]);
    let mut body = table(
        &["figure", "daemon", "naive full read", "daemon / naive"],
        &rows,
    );
    let shown: Vec<String> = daemon
        .get_logs
        .iter()
        .take(40)
        .map(|(s, m)| format!("{}+{}", s.unwrap_or(0), m.unwrap_or(0)))
        .collect();
    let _ = writeln!(
        body,
        "\nThe daemon's GetLog calls (start+max){}: {}.\n\
         Naive: pages of {PAGE} from ID 0 until a short page, floor(N/{PAGE})+1 calls; \
         its time includes its own AddAsyncConnection, the daemon's includes process start.",
        if calls > 40 { ", first 40" } else { "" },
        shown.join(", ")
    );
    body.push_str(&daemon.note);
    Ok((body, true))
}

// ---- the report file ---------------------------------------------------------------

fn write_report(path: &Path, sections: &[Section]) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let date = Command::new("date")
        .arg("-u")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut text = format!(
        "# Benchmarks\n\nWritten by `examples/sitebench.rs` (see its module doc for what is \
         measured and what the floor is).\n\n\
         - Machine: {cores} cores (nproc), {model}\n\
         - Command: `cargo run --release --example sitebench -- {}`\n\
         - Date: {date}\n\n",
        args.join(" ")
    );
    for s in sections {
        let _ = writeln!(text, "## {}\n\n{}", s.title, s.body);
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, text)?;
    Ok(())
}
