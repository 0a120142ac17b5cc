//! The simulated gateway's state and behaviour, without I/O: devices with
//! user tables and ring-buffer event logs, the gateway's async connections,
//! monitoring, realtime and status subscribers, and injected faults.
//!
//! Every rule here restates WIRE.md; where WIRE.md §5 leaves a question open
//! the answer is a policy the tests can switch (see [`Policies`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch};
use tonic::{Code, Status};

use super::users::{self, UserProfile};
use crate::gateway::multi_error_status;
use crate::proto::gsdk::card::CsnCardData;
use crate::proto::gsdk::connect::{
    AsyncConnectInfo, DeviceInfo, Status as DevStatus, StatusChange,
};
use crate::proto::gsdk::err::ErrorResponse;
use crate::proto::gsdk::event::EventLog;
use crate::wire::{self, Api};

/// Event codes the simulator writes (WIRE.md §4).
pub mod codes {
    pub const USER_ENROLL_SUCCESS: u32 = 0x2000;
    pub const USER_UPDATE_SUCCESS: u32 = 0x2200;
    pub const USER_DELETE_SUCCESS: u32 = 0x2400;
    pub const USER_DELETE_ALL_SUCCESS: u32 = 0x2600;
    pub const DEVICE_SYSTEM_STARTED: u32 = 0x3100;
    pub const DEVICE_EVENT_LOG_CLEARED: u32 = 0x4200;
    pub const DEVICE_DATABASE_RESET: u32 = 0x4501;
    pub const DEVICE_FACTORY_RESET: u32 = 0x4502;
    pub const VERIFY_SUCCESS: u32 = 0x1000;
}

/// User.Get of an unknown ID and Delete of a missing user (WIRE.md §5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingUser {
    /// Get omits the user; Delete of a missing user succeeds.
    Lenient,
    /// Get fails with NOT_FOUND as a whole (the client has to find out
    /// which ID is missing); Delete of a missing user fails with NOT_FOUND
    /// for that device (per device in a Multi call).
    #[default]
    NotFound,
    /// Both fail with INTERNAL, a code that says nothing of why (a gateway
    /// that passes a device error on): the client must find out from the
    /// device's user list.
    Internal,
}

/// GetLog with a start older than the oldest stored record, i.e. the
/// records from `start` on were overwritten (WIRE.md §5.4, B6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StaleStart {
    /// Answer from the oldest stored record.
    Clamp,
    /// Fail with OUT_OF_RANGE naming the oldest stored ID.
    #[default]
    OutOfRange,
}

/// GetLog with a start past the newest stored record (WIRE.md §5.4). This
/// includes `newest + 1`, the usual resume point (B1) when nothing new was
/// logged, and any `start != 0` on an empty log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PastNewest {
    /// Answer an empty list.
    Empty,
    /// Fail with OUT_OF_RANGE naming the newest stored ID (or saying the
    /// log is empty).
    #[default]
    OutOfRange,
}

/// When SubscribeStatus and SubscribeRealtimeLog send their response
/// headers (WIRE.md §5.14, §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamHeaders {
    /// With the first message, as grpc-go and grpc-python servers do: a
    /// tonic client's `subscribe_*(..).await` returns only when the first
    /// status change or event arrives. The subscription is registered when
    /// the request arrives, so nothing produced meanwhile is lost (beyond
    /// the queue's own drops, B10). An error before the first message ends
    /// the call itself with that status.
    #[default]
    Lazy,
    /// At once: the call returns as soon as the subscription is registered.
    Eager,
    /// Never: the call is registered (its queue fills and then drops, B10)
    /// but nothing, not even the headers, is ever sent; the call waits
    /// until the client gives up. A hostile answer, not a conforming one:
    /// a client that awaits the headers before anything else never starts.
    Never,
}

/// Answers to WIRE.md's open questions; switchable so the daemon is tested
/// against every answer a conforming gateway may give. The defaults are the
/// least convenient plausible ones.
///
/// # Switches and their defaults
///
/// | WIRE.md | question | switch (API · `usersync sim` flag · `--config` key · stdin) | default |
/// |---|---|---|---|
/// | §5.14, §6 | stream response headers | [`Policies::stream_headers`] · `--stream-headers` · `stream_headers` · `stream-headers` | [`StreamHeaders::Lazy`] |
/// | §5.4 | GetLog start older than the oldest record | [`Policies::stale_start`] · `--stale-start` · `stale_start` · `stale-start` | [`StaleStart::OutOfRange`] |
/// | §5.4 | GetLog start past the newest record (also `newest + 1`, and any `start != 0` on an empty log; `start = 0` never fails, B2) | [`Policies::past_newest`] · `--past-newest` · `past_newest` · `past-newest` | [`PastNewest::OutOfRange`] |
/// | §5.3, B21 | User.Get of an unknown ID, Delete of a missing user | [`Policies::missing_user`] · `--missing-user` · `missing_user` · `missing-user` | [`MissingUser::NotFound`] |
/// | §5.2 | status code of a Multi partial failure | [`Policies::multi_error_code`] (API only) | INTERNAL |
/// | §5.9 | codes with a meaningful low byte | [`Policies::low_byte_codes`] (API only) | [`LowByteCodes::Full`] |
/// | B13 | `changedOnDevice` on user events | [`Policies::changed_on_device`] (API only) | [`ChangedOnDevice::Reported`] |
/// | B14, B15 | devices known before a client adds them; after a gateway restart | [`ModelOptions::preconnect`] · `--preconnect` · `preconnect` · `preconnect on\|off` | off: GetDeviceList is empty until AddAsyncConnection, and again after a restart |
/// | B27, B22 | time a device takes to answer a relayed command | [`ModelOptions::device_latency`] · `--device-latency-ms` · `device_latency_ms` · `device-latency` | 0 (real readers: tens of ms to 2 s) |
///
/// [`Policies::lenient`] gives the convenient answer to every question, for
/// the rare test that is not about them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policies {
    pub stream_headers: StreamHeaders,
    pub missing_user: MissingUser,
    pub stale_start: StaleStart,
    pub past_newest: PastNewest,
    /// Status code of a Multi call that failed on some device (§5.2).
    pub multi_error_code: Code,
    /// How codes whose low byte is part of the code (0x4502 …) are
    /// reported (§5.9).
    pub low_byte_codes: LowByteCodes,
    /// Whether user events carry `changedOnDevice` (B13).
    pub changed_on_device: ChangedOnDevice,
}

/// Whether user events carry `changedOnDevice` (WIRE.md B13, EventLog
/// field 10, listed since V1.3). Documented, so set by default; some
/// gateways or firmware may never set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChangedOnDevice {
    /// Set on changes made at the device itself, not on writes through the
    /// API.
    #[default]
    Reported,
    /// Never set (every event reads `false`).
    Omitted,
}

/// Reporting of event codes such as 0x4502 (WIRE.md B29, §5.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LowByteCodes {
    /// `eventCode = 0x4502`, `subCode = 0` (what event_code.json suggests).
    #[default]
    Full,
    /// `eventCode = 0x4500`, `subCode = 0x02`.
    Split,
}

impl Default for Policies {
    fn default() -> Self {
        Policies {
            stream_headers: StreamHeaders::default(),
            missing_user: MissingUser::default(),
            stale_start: StaleStart::default(),
            past_newest: PastNewest::default(),
            multi_error_code: Code::Internal,
            low_byte_codes: LowByteCodes::default(),
            changed_on_device: ChangedOnDevice::default(),
        }
    }
}

impl Policies {
    /// The convenient answers: eager headers, clamped and empty GetLog
    /// answers, unknown users omitted.
    pub fn lenient() -> Self {
        Policies {
            stream_headers: StreamHeaders::Eager,
            missing_user: MissingUser::Lenient,
            stale_start: StaleStart::Clamp,
            past_newest: PastNewest::Empty,
            ..Policies::default()
        }
    }
}

/// A device's GetLog answers broken on purpose (WIRE.md B1–B4 say a page
/// holds at most `maxNumOfLog` records from the start, ascending, each
/// once): hostile data the client must survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFault {
    /// Answers as WIRE.md says.
    #[default]
    None,
    /// Every record of a page twice.
    Duplicate,
    /// The page in descending order.
    OutOfOrder,
    /// `maxNumOfLog` ignored: every record from the start on, however many.
    Oversize,
}

impl LogFault {
    fn apply(
        self,
        mut page: Vec<EventLog>,
        all_from_start: impl FnOnce() -> Vec<EventLog>,
    ) -> Vec<EventLog> {
        match self {
            LogFault::None => page,
            LogFault::Duplicate => page.into_iter().flat_map(|e| [e.clone(), e]).collect(),
            LogFault::OutOfOrder => {
                page.reverse();
                page
            }
            LogFault::Oversize => all_from_start(),
        }
    }
}

/// One RPC the simulator received, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcRecord {
    pub method: &'static str,
    pub device_ids: Vec<u32>,
    pub user_ids: Vec<String>,
    /// GetLog only.
    pub start_event_id: Option<u32>,
    pub max: Option<u32>,
}

impl RpcRecord {
    pub fn new(method: &'static str) -> Self {
        RpcRecord {
            method,
            device_ids: Vec::new(),
            user_ids: Vec::new(),
            start_event_id: None,
            max: None,
        }
    }
}

/// Counters of realtime delivery.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RealtimeStats {
    pub delivered: u64,
    /// Dropped because a subscriber's queue was full (WIRE.md B10).
    pub dropped_queue_full: u64,
    /// Dropped by the injected drop fraction.
    pub dropped_injected: u64,
}

const RPC_LOG_LIMIT: usize = 200_000;
const MAX_QUEUE: usize = 1 << 20;

/// One stored record. Compact (32 bytes, against ~160 for an [`EventLog`])
/// so a benchmark can fill a device's log with millions of records: only
/// the fields the simulator ever sets are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StoredEvent {
    id: u32,
    timestamp: u32,
    event_code: u32,
    sub_code: u8,
    changed_on_device: bool,
    user_id: Box<str>,
}

/// A device's event log: a bounded ring with a per-device, only increasing
/// 32-bit ID (WIRE.md B5, B6).
#[derive(Debug, Clone)]
pub struct EventRing {
    device_id: u32,
    capacity: usize,
    events: VecDeque<StoredEvent>,
    next_id: u32,
}

impl EventRing {
    pub fn new(device_id: u32, capacity: usize, first_id: u32) -> Self {
        EventRing {
            device_id,
            capacity: capacity.max(1),
            events: VecDeque::new(),
            next_id: first_id.max(1),
        }
    }

    /// Appends a record, assigning the next ID; overwrites the oldest record
    /// when full.
    pub fn push(
        &mut self,
        timestamp: u32,
        (event_code, sub_code): (u32, u8),
        user_id: &str,
        changed_on_device: bool,
    ) -> u32 {
        let id = self.next_id;
        // Wrap-around is undocumented (§5.5); never hand out 0.
        self.next_id = match self.next_id.wrapping_add(1) {
            0 => 1,
            n => n,
        };
        if self.events.len() == self.capacity {
            self.events.pop_front();
        }
        self.events.push_back(StoredEvent {
            id,
            timestamp,
            event_code,
            sub_code,
            changed_on_device,
            user_id: user_id.into(),
        });
        id
    }

    fn to_wire(&self, e: &StoredEvent) -> EventLog {
        EventLog {
            id: e.id,
            timestamp: e.timestamp,
            device_id: self.device_id,
            user_id: e.user_id.to_string(),
            event_code: e.event_code,
            sub_code: u32::from(e.sub_code),
            changed_on_device: e.changed_on_device,
            ..Default::default()
        }
    }

    pub fn oldest_id(&self) -> Option<u32> {
        self.events.front().map(|e| e.id)
    }

    pub fn newest_id(&self) -> Option<u32> {
        self.events.back().map(|e| e.id)
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The first index in `lo..hi` whose record fails `pred` (the records
    /// there ascend, so `pred` holds for a prefix).
    fn partition(&self, lo: usize, hi: usize, pred: impl Fn(u32) -> bool) -> usize {
        let (mut lo, mut hi) = (lo, hi);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.events.get(mid).is_some_and(|e| pred(e.id)) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// GetLog: `start` inclusive, 0 = oldest, `max` 0 = all, ascending
    /// (WIRE.md B1–B4). A start outside the stored range is answered as the
    /// policies say (§5.4); `start = 0` never fails (B2).
    ///
    /// A log whose IDs wrapped past 2^32 (§5.5 is open; our answer) holds
    /// its records in log order, the IDs after the wrap (1..=newest) after
    /// the ones before it (oldest..=2^32 − 1); a start is looked for among
    /// the IDs after the wrap if it is one of them, else before it, and the
    /// answer follows log order from there.
    pub fn read(
        &self,
        start: u32,
        max: u32,
        stale: StaleStart,
        past: PastNewest,
    ) -> Result<Vec<EventLog>, Status> {
        let (Some(oldest), Some(newest)) = (self.oldest_id(), self.newest_id()) else {
            if start == 0 || past == PastNewest::Empty {
                return Ok(Vec::new());
            }
            return Err(Status::out_of_range(format!(
                "event {start} is past the newest stored record: the log is empty"
            )));
        };
        let wrapped = newest < oldest;
        // Beyond the newest: after it and before the oldest, in ring terms.
        let past_newest = if wrapped {
            start > newest && start < oldest
        } else {
            start > newest
        };
        if start != 0 && !wrapped && start < oldest && stale == StaleStart::OutOfRange {
            return Err(Status::out_of_range(format!(
                "event {start} is no longer stored; oldest is {oldest}"
            )));
        }
        if past_newest {
            if past == PastNewest::OutOfRange {
                return Err(Status::out_of_range(format!(
                    "event {start} is past the newest stored record {newest}"
                )));
            }
            return Ok(Vec::new());
        }
        let len = self.events.len();
        let from = if start == 0 {
            0
        } else if wrapped {
            // The first record after the wrap.
            let after = self.partition(0, len, |id| id >= oldest);
            if start <= newest {
                self.partition(after, len, |id| id < start)
            } else {
                self.partition(0, after, |id| id < start)
            }
        } else {
            self.partition(0, len, |id| id < start)
        };
        let take = if max == 0 { usize::MAX } else { max as usize };
        Ok(self
            .events
            .iter()
            .skip(from)
            .take(take)
            .map(|e| self.to_wire(e))
            .collect())
    }

    pub fn clear(&mut self) {
        self.events.clear();
    }

    /// Changes the capacity; a ring holding more drops its oldest records,
    /// as if they had been overwritten.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
        let excess = self.events.len().saturating_sub(self.capacity);
        self.events.drain(..excess);
    }

    pub fn all(&self) -> Vec<EventLog> {
        self.tail(usize::MAX)
    }

    /// The newest `n` records, oldest first.
    pub fn tail(&self, n: usize) -> Vec<EventLog> {
        let skip = self.events.len().saturating_sub(n);
        self.events
            .iter()
            .skip(skip)
            .map(|e| self.to_wire(e))
            .collect()
    }

    fn newest(&self) -> Option<EventLog> {
        self.events.back().map(|e| self.to_wire(e))
    }
}

/// How a device is set up at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub id: u32,
    /// Users "1".."=users" are generated at start.
    pub users: u32,
    pub first_event_id: u32,
    pub use_ssl: bool,
    /// device.Type (WIRE.md §2.1); 0x23 = BIOSTATION_3.
    pub device_type: i32,
}

impl DeviceSpec {
    pub fn new(id: u32) -> Self {
        DeviceSpec {
            id,
            users: 0,
            first_event_id: 1,
            use_ssl: false,
            device_type: 0x23,
        }
    }
}

#[derive(Debug)]
struct Device {
    spec: DeviceSpec,
    online: bool,
    monitoring: bool,
    users: BTreeMap<String, Vec<u8>>,
    revisions: HashMap<String, u32>,
    log: EventRing,
}

struct RealtimeSub {
    tx: mpsc::Sender<Result<EventLog, Status>>,
    devices: HashSet<u32>,
    codes: HashSet<u32>,
    /// Its queue's size (B10).
    capacity: usize,
    /// While stalled, events wait here instead of being sent (up to the
    /// queue's size; beyond it they are dropped, B10).
    stalled: Option<VecDeque<EventLog>>,
}

/// Watches the deletes a client sends to target devices, for fault tests:
/// deleting a user that a source has held without a break for `window` is
/// a violation (a client could only do it on a wrong judgement: an
/// unreadable record, an unknown-user answer about a device, a delete-all
/// taken on faith).
#[derive(Debug, Clone)]
pub struct DeleteGuard {
    sources: Vec<u32>,
    targets: Vec<u32>,
    window: Duration,
    present_since: HashMap<(u32, String), std::time::Instant>,
    violations: Vec<String>,
}

/// The simulated gateway.
pub struct Model {
    /// Status changes are not sent to subscribers (see `Simulator::mute_status`).
    pub(crate) status_muted: bool,
    guard: Option<DeleteGuard>,
    api: Api,
    pub(crate) policies: Policies,
    profile: UserProfile,
    log_capacity: usize,
    preconnect: bool,
    pub(crate) auto_card: bool,
    devices: BTreeMap<u32, Device>,
    managed: BTreeMap<u32, AsyncConnectInfo>,
    /// The status each managed device was last reported with.
    reported: BTreeMap<u32, i32>,
    status_subs: Vec<mpsc::Sender<Result<StatusChange, Status>>>,
    realtime_subs: Vec<RealtimeSub>,
    drop_fraction: HashMap<u32, f64>,
    log_faults: HashMap<u32, LogFault>,
    fail_multi: HashMap<u32, u32>,
    rejects: HashSet<(u32, String)>,
    pub(crate) latency: HashMap<String, Duration>,
    /// Added to every call that relays a command to devices (once per call).
    pub(crate) device_latency: Duration,
    /// Bumped whenever any device's user table changes.
    users_changed: watch::Sender<u64>,
    /// Devices that stopped answering commands (their link stays up).
    held: HashSet<u32>,
    /// Calls waiting on each held device.
    held_calls: HashMap<u32, usize>,
    pub(crate) cards: HashMap<u32, VecDeque<CsnCardData>>,
    rpc_log: VecDeque<RpcRecord>,
    rng: SmallRng,
    card_seq: u64,
    stats: RealtimeStats,
    /// Seconds each device's clock is off (event timestamps).
    clock_offsets: HashMap<u32, i64>,
}

fn now_secs() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

fn not_connected(id: u32) -> Status {
    Status::unavailable(format!("device {id} is not connected"))
}

fn device_error(device_id: u32, code: Code, msg: impl Into<String>) -> ErrorResponse {
    ErrorResponse {
        device_id,
        code: code as i32,
        msg: msg.into(),
    }
}

/// Deduplicates device IDs, keeping the first occurrence's order.
fn unique(ids: &[u32]) -> Vec<u32> {
    let mut seen = HashSet::new();
    ids.iter().copied().filter(|d| seen.insert(*d)).collect()
}

/// Settings of a model.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    pub api: Api,
    pub devices: Vec<DeviceSpec>,
    /// Records per device log (a ring, B6). Records are stored compactly
    /// (32 bytes plus the user ID), so millions per device are fine.
    pub log_capacity: usize,
    /// Register every device as an async connection at start and after a
    /// gateway restart, as if an earlier client had added them (and the
    /// gateway kept them). Off by default: a client must add its devices,
    /// and add them again after a gateway restart (B14).
    pub preconnect: bool,
    /// How long a device takes to answer a command the gateway relays to
    /// it, added once per call to every call that addresses devices (Multi
    /// calls run in parallel inside the gateway, B22). Real readers take
    /// tens of milliseconds to 2 s; 0 by default so tests run fast.
    pub device_latency: Duration,
    pub policies: Policies,
    pub profile: UserProfile,
    /// Card.Scan answers at once with a generated card when none was
    /// presented.
    pub auto_card: bool,
    pub seed: u64,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            api: Api::V1_8,
            devices: Vec::new(),
            log_capacity: 50_000,
            preconnect: false,
            device_latency: Duration::ZERO,
            policies: Policies::default(),
            profile: UserProfile::default(),
            auto_card: true,
            seed: 0x5eed,
        }
    }
}

impl Model {
    pub fn new(opts: ModelOptions) -> Self {
        let mut m = Model {
            status_muted: false,
            guard: None,
            api: opts.api,
            policies: opts.policies,
            profile: opts.profile,
            log_capacity: opts.log_capacity,
            preconnect: opts.preconnect,
            auto_card: opts.auto_card,
            devices: BTreeMap::new(),
            managed: BTreeMap::new(),
            reported: BTreeMap::new(),
            status_subs: Vec::new(),
            realtime_subs: Vec::new(),
            drop_fraction: HashMap::new(),
            log_faults: HashMap::new(),
            fail_multi: HashMap::new(),
            rejects: HashSet::new(),
            latency: HashMap::new(),
            device_latency: opts.device_latency,
            users_changed: watch::Sender::new(0),
            held: HashSet::new(),
            held_calls: HashMap::new(),
            cards: HashMap::new(),
            rpc_log: VecDeque::new(),
            rng: SmallRng::seed_from_u64(opts.seed),
            card_seq: opts.seed,
            stats: RealtimeStats::default(),
            clock_offsets: HashMap::new(),
        };
        for spec in opts.devices {
            m.add_device(spec);
        }
        m.apply_preconnect();
        m
    }

    pub fn api(&self) -> Api {
        self.api
    }

    /// Adds a physical device (online, not yet managed unless preconnect).
    pub fn add_device(&mut self, spec: DeviceSpec) {
        let mut dev = Device {
            log: EventRing::new(spec.id, self.log_capacity, spec.first_event_id),
            spec: spec.clone(),
            online: true,
            monitoring: false,
            users: BTreeMap::new(),
            revisions: HashMap::new(),
        };
        for n in 1..=spec.users {
            let id = n.to_string();
            let raw = users::generate(&id, 0, self.api.numbering(), self.profile);
            dev.users.insert(id.clone(), raw);
            dev.revisions.insert(id, 0);
        }
        self.devices.insert(spec.id, dev);
    }

    fn apply_preconnect(&mut self) {
        if !self.preconnect {
            return;
        }
        let infos: Vec<AsyncConnectInfo> = self
            .devices
            .values()
            .map(|d| AsyncConnectInfo {
                device_id: d.spec.id,
                ip_addr: format!("192.0.2.{}", d.spec.id % 250 + 1),
                port: 51211,
                use_ssl: d.spec.use_ssl,
            })
            .collect();
        self.add_async(infos);
    }

    pub fn device_ids(&self) -> Vec<u32> {
        self.devices.keys().copied().collect()
    }

    // ---- status ---------------------------------------------------------

    fn derived_status(&self, id: u32) -> i32 {
        let Some(info) = self.managed.get(&id) else {
            return DevStatus::Disconnected as i32;
        };
        match self.devices.get(&id) {
            None => DevStatus::TcpCannotConnect as i32,
            Some(d) if !d.online => DevStatus::Disconnected as i32,
            Some(_) if info.use_ssl => DevStatus::TlsConnected as i32,
            Some(_) => DevStatus::TcpConnected as i32,
        }
    }

    pub fn is_connected(&self, id: u32) -> bool {
        let s = self.derived_status(id);
        s == DevStatus::TcpConnected as i32 || s == DevStatus::TlsConnected as i32
    }

    /// Reports a device's status to subscribers if it changed. Monitoring
    /// does not survive a disconnect (WIRE.md B12).
    fn refresh_status(&mut self, id: u32) {
        let status = self.derived_status(id);
        if !self.is_connected(id)
            && let Some(d) = self.devices.get_mut(&id)
        {
            d.monitoring = false;
        }
        let previous = self.reported.get(&id).copied();
        if previous == Some(status) {
            return;
        }
        if self.managed.contains_key(&id) {
            self.reported.insert(id, status);
        } else {
            self.reported.remove(&id);
        }
        let change = StatusChange {
            device_id: id,
            status,
            timestamp: now_secs(),
        };
        if self.status_muted {
            // Lost on the way (the status queue's overflow is undocumented,
            // WIRE.md B30): only GetDeviceList shows the change.
            return;
        }
        self.status_subs.retain(|tx| match tx.try_send(Ok(change)) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }

    fn require_connected(&self, id: u32) -> Result<(), Status> {
        if self.is_connected(id) {
            Ok(())
        } else {
            Err(not_connected(id))
        }
    }

    // ---- Connect --------------------------------------------------------

    pub fn add_async(&mut self, infos: Vec<AsyncConnectInfo>) {
        for info in infos {
            let id = info.device_id;
            self.managed.insert(id, info);
            self.refresh_status(id);
        }
    }

    pub fn delete_async(&mut self, ids: &[u32]) {
        for id in ids {
            if self.managed.remove(id).is_some() {
                if let Some(d) = self.devices.get_mut(id) {
                    d.monitoring = false;
                }
                self.refresh_status(*id);
            }
        }
    }

    pub fn device_list(&self) -> Vec<DeviceInfo> {
        self.managed
            .values()
            .map(|info| DeviceInfo {
                device_id: info.device_id,
                connection_mode: 0,
                ip_addr: info.ip_addr.clone(),
                port: info.port,
                status: self.derived_status(info.device_id),
                auto_reconnect: true,
                use_ssl: info.use_ssl,
                r#type: self
                    .devices
                    .get(&info.device_id)
                    .map_or(0, |d| d.spec.device_type),
            })
            .collect()
    }

    /// Disconnect of an async device: the link drops and the gateway
    /// reconnects by itself later (WIRE.md B15). Returns the devices that
    /// were dropped, for the caller to reconnect after a delay.
    pub fn disconnect(&mut self, ids: &[u32]) -> Vec<u32> {
        let mut dropped = Vec::new();
        for &id in ids {
            if self.is_connected(id)
                && let Some(d) = self.devices.get_mut(&id)
            {
                d.online = false;
                dropped.push(id);
                self.refresh_status(id);
            }
        }
        dropped
    }

    pub fn subscribe_status(
        &mut self,
        queue_size: i32,
    ) -> mpsc::Receiver<Result<StatusChange, Status>> {
        let (tx, rx) = mpsc::channel(clamp_queue(queue_size));
        self.status_subs.push(tx);
        rx
    }

    // ---- Event ----------------------------------------------------------

    pub fn set_monitoring(&mut self, id: u32, on: bool) -> Result<(), Status> {
        self.require_connected(id)?;
        if let Some(d) = self.devices.get_mut(&id) {
            d.monitoring = on;
        }
        Ok(())
    }

    pub fn set_monitoring_multi(&mut self, ids: &[u32], on: bool) -> Result<(), Status> {
        let mut errors = Vec::new();
        for id in unique(ids) {
            if let Err(s) = self.set_monitoring(id, on) {
                errors.push(device_error(id, s.code(), s.message()));
            }
        }
        self.multi_result(errors)
    }

    pub fn subscribe_realtime(
        &mut self,
        queue_size: i32,
        devices: &[u32],
        codes: &[u32],
    ) -> mpsc::Receiver<Result<EventLog, Status>> {
        let capacity = clamp_queue(queue_size);
        let (tx, rx) = mpsc::channel(capacity);
        self.realtime_subs.push(RealtimeSub {
            tx,
            devices: devices.iter().copied().collect(),
            codes: codes.iter().copied().collect(),
            capacity,
            stalled: None,
        });
        rx
    }

    pub fn get_log(&self, id: u32, start: u32, max: u32) -> Result<Vec<EventLog>, Status> {
        self.require_connected(id)?;
        let dev = self.devices.get(&id).ok_or_else(|| not_connected(id))?;
        let (stale, past) = (self.policies.stale_start, self.policies.past_newest);
        let page = dev.log.read(start, max, stale, past)?;
        let fault = self.log_faults.get(&id).copied().unwrap_or_default();
        Ok(fault.apply(page, || {
            dev.log.read(start, 0, stale, past).unwrap_or_default()
        }))
    }

    /// ClearLog deletes every record (WIRE.md B7); IDs continue and the
    /// device logs the clearing itself (§5.5 is open; this is our answer).
    pub fn clear_log(&mut self, id: u32) -> Result<(), Status> {
        let dev = self.devices.get_mut(&id).ok_or_else(|| not_connected(id))?;
        dev.log.clear();
        self.append_event(id, codes::DEVICE_EVENT_LOG_CLEARED, "", false);
        Ok(())
    }

    /// Appends an event to a device's log and delivers it to realtime
    /// subscribers if the device is monitored. Delivery never blocks: a full
    /// queue drops the event (WIRE.md B10).
    pub fn append_event(&mut self, id: u32, code: u32, user_id: &str, on_device: bool) -> u32 {
        let codes = self.reported_code(code);
        let on_device = on_device && self.policies.changed_on_device == ChangedOnDevice::Reported;
        let offset = self.clock_offsets.get(&id).copied().unwrap_or(0);
        let time = u32::try_from((i64::from(now_secs()) + offset).max(0)).unwrap_or(u32::MAX);
        let Some(dev) = self.devices.get_mut(&id) else {
            return 0;
        };
        let event_id = dev.log.push(time, codes, user_id, on_device);
        if dev.monitoring
            && self.managed.contains_key(&id)
            && let Some(ev) = dev.log.newest()
        {
            self.deliver(ev);
        }
        event_id
    }

    /// `(eventCode, subCode)` of `code` as the policy reports it (§5.9).
    fn reported_code(&self, code: u32) -> (u32, u8) {
        match self.policies.low_byte_codes {
            LowByteCodes::Full => (code, 0),
            LowByteCodes::Split => (code & 0xFF00, (code & 0xFF) as u8),
        }
    }

    /// Appends `n` events with `code` (e.g. [`codes::VERIFY_SUCCESS`], no
    /// user) to a device's log under one lock: bulk history for benchmarks.
    /// They are honest events: if the device is monitored, realtime
    /// subscribers get them like any other (and their queues overflow and
    /// drop as B10 says). Returns the IDs of the first and last one.
    pub fn append_events(&mut self, id: u32, n: u32, code: u32) -> Result<(u32, u32), String> {
        self.device_mut(id)?;
        if n == 0 {
            return Err("append_events: n must be at least 1".into());
        }
        let first = self.append_event(id, code, "", false);
        let mut last = first;
        for _ in 1..n {
            last = self.append_event(id, code, "", false);
        }
        Ok((first, last))
    }

    fn deliver(&mut self, ev: EventLog) {
        let fraction = self
            .drop_fraction
            .get(&ev.device_id)
            .copied()
            .unwrap_or(0.0);
        let mut stats = self.stats;
        let rng = &mut self.rng;
        self.realtime_subs.retain_mut(|sub| {
            if !(sub.devices.is_empty() || sub.devices.contains(&ev.device_id))
                || !(sub.codes.is_empty() || sub.codes.contains(&ev.event_code))
            {
                return !sub.tx.is_closed();
            }
            if fraction > 0.0 && rng.random::<f64>() < fraction {
                stats.dropped_injected += 1;
                return true;
            }
            if let Some(held) = &mut sub.stalled {
                if held.len() < sub.capacity {
                    held.push_back(ev.clone());
                } else {
                    stats.dropped_queue_full += 1;
                }
                return true;
            }
            match sub.tx.try_send(Ok(ev.clone())) {
                Ok(()) => {
                    stats.delivered += 1;
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    stats.dropped_queue_full += 1;
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        self.stats = stats;
    }

    // ---- User -----------------------------------------------------------

    pub fn user_headers(&self, id: u32) -> Result<Vec<Vec<u8>>, Status> {
        self.require_connected(id)?;
        let dev = self.devices.get(&id).ok_or_else(|| not_connected(id))?;
        Ok(dev
            .users
            .values()
            .filter_map(|raw| wire::raw_hdr(raw).ok())
            .collect())
    }

    pub fn user_get(&self, id: u32, user_ids: &[String]) -> Result<Vec<Vec<u8>>, Status> {
        self.require_connected(id)?;
        let dev = self.devices.get(&id).ok_or_else(|| not_connected(id))?;
        let mut out = Vec::new();
        for uid in user_ids {
            match dev.users.get(uid) {
                Some(raw) => out.push(raw.clone()),
                None if self.policies.missing_user == MissingUser::NotFound => {
                    return Err(Status::not_found(format!("user {uid} not found")));
                }
                None if self.policies.missing_user == MissingUser::Internal => {
                    return Err(Status::internal("device error 0x0305"));
                }
                None => {}
            }
        }
        Ok(out)
    }

    /// Checks that every record has an ID before any device is touched.
    fn parse_users(users: &[Vec<u8>]) -> Result<Vec<(String, &Vec<u8>)>, Status> {
        users
            .iter()
            .enumerate()
            .map(|(i, raw)| {
                wire::peek_user_id(raw)
                    .map(|id| (id, raw))
                    .map_err(|e| Status::invalid_argument(format!("user record {i}: {e}")))
            })
            .collect()
    }

    /// Enrolls users on one device in order; stops at the first failure
    /// (users before it stay written, as on a device).
    fn enroll_on(
        &mut self,
        id: u32,
        users: &[(String, &Vec<u8>)],
        overwrite: bool,
    ) -> Result<(), (Code, String)> {
        if !self.is_connected(id) {
            return Err((Code::Unavailable, format!("device {id} is not connected")));
        }
        for (uid, raw) in users {
            if self.rejects.contains(&(id, uid.clone())) {
                return Err((
                    Code::InvalidArgument,
                    format!("device {id} cannot store user {uid}"),
                ));
            }
            let Some(dev) = self.devices.get_mut(&id) else {
                return Err((Code::Unavailable, format!("device {id} is not connected")));
            };
            let existed = dev.users.contains_key(uid);
            if existed && !overwrite {
                return Err((Code::AlreadyExists, format!("user {uid} already exists")));
            }
            dev.users.insert(uid.clone(), (*raw).clone());
            self.touch_users();
            let code = if existed {
                codes::USER_UPDATE_SUCCESS
            } else {
                codes::USER_ENROLL_SUCCESS
            };
            self.append_event(id, code, uid, false);
        }
        Ok(())
    }

    fn delete_on(&mut self, id: u32, user_ids: &[String]) -> Result<(), (Code, String)> {
        if !self.is_connected(id) {
            return Err((Code::Unavailable, format!("device {id} is not connected")));
        }
        let present: Vec<String> = user_ids
            .iter()
            .filter(|u| {
                self.devices
                    .get(&id)
                    .is_some_and(|d| d.users.contains_key(*u))
            })
            .cloned()
            .collect();
        self.check_delete(id, &present);
        for uid in user_ids {
            let removed = self
                .devices
                .get_mut(&id)
                .and_then(|d| d.users.remove(uid))
                .is_some();
            if removed {
                self.touch_users();
                self.append_event(id, codes::USER_DELETE_SUCCESS, uid, false);
            } else if self.policies.missing_user == MissingUser::NotFound {
                return Err((Code::NotFound, format!("user {uid} not found")));
            } else if self.policies.missing_user == MissingUser::Internal {
                return Err((Code::Internal, "device error 0x0305".to_owned()));
            }
        }
        Ok(())
    }

    fn delete_all_on(&mut self, id: u32) -> Result<(), (Code, String)> {
        if !self.is_connected(id) {
            return Err((Code::Unavailable, format!("device {id} is not connected")));
        }
        let present: Vec<String> = self
            .devices
            .get(&id)
            .map(|d| d.users.keys().cloned().collect())
            .unwrap_or_default();
        self.check_delete(id, &present);
        if let Some(d) = self.devices.get_mut(&id) {
            d.users.clear();
        }
        self.touch_users();
        self.append_event(id, codes::USER_DELETE_ALL_SUCCESS, "", false);
        Ok(())
    }

    fn single(result: Result<(), (Code, String)>) -> Result<(), Status> {
        result.map_err(|(code, msg)| Status::new(code, msg))
    }

    pub fn enroll(&mut self, id: u32, users: &[Vec<u8>], overwrite: bool) -> Result<(), Status> {
        let parsed = Self::parse_users(users)?;
        Self::single(self.enroll_on(id, &parsed, overwrite))
    }

    pub fn delete(&mut self, id: u32, user_ids: &[String]) -> Result<(), Status> {
        Self::single(self.delete_on(id, user_ids))
    }

    pub fn delete_all(&mut self, id: u32) -> Result<(), Status> {
        Self::single(self.delete_all_on(id))
    }

    /// Runs `op` on every device; an injected transient failure replaces the
    /// device's part. Any failure fails the call with the per-device errors
    /// in the status details (WIRE.md §1.4, B22).
    fn multi<F>(&mut self, ids: &[u32], mut op: F) -> Result<(), Status>
    where
        F: FnMut(&mut Self, u32) -> Result<(), (Code, String)>,
    {
        let mut errors = Vec::new();
        for id in unique(ids) {
            if let Some(n) = self.fail_multi.get_mut(&id)
                && *n > 0
            {
                *n -= 1;
                errors.push(device_error(
                    id,
                    Code::Unavailable,
                    "simulated transient failure",
                ));
                continue;
            }
            if let Err((code, msg)) = op(self, id) {
                errors.push(device_error(id, code, msg));
            }
        }
        self.multi_result(errors)
    }

    fn multi_result(&self, errors: Vec<ErrorResponse>) -> Result<(), Status> {
        if errors.is_empty() {
            return Ok(());
        }
        Err(multi_error_status(
            self.policies.multi_error_code,
            "multi command failed on some devices",
            self.api.multi_error_type_name(),
            errors,
        ))
    }

    pub fn enroll_multi(
        &mut self,
        ids: &[u32],
        users: &[Vec<u8>],
        overwrite: bool,
    ) -> Result<(), Status> {
        let parsed = Self::parse_users(users)?;
        self.multi(ids, |m, id| m.enroll_on(id, &parsed, overwrite))
    }

    pub fn delete_multi(&mut self, ids: &[u32], user_ids: &[String]) -> Result<(), Status> {
        self.multi(ids, |m, id| m.delete_on(id, user_ids))
    }

    pub fn delete_all_multi(&mut self, ids: &[u32]) -> Result<(), Status> {
        self.multi(ids, |m, id| m.delete_all_on(id))
    }

    /// The next card presented at the device, or a generated one when
    /// `auto_card` is on. `None`: wait for a card.
    pub fn take_card(&mut self, id: u32) -> Result<Option<CsnCardData>, Status> {
        self.require_connected(id)?;
        if let Some(card) = self.cards.get_mut(&id).and_then(VecDeque::pop_front) {
            return Ok(Some(card));
        }
        if self.auto_card {
            self.card_seq = self.card_seq.wrapping_add(1);
            return Ok(Some(users::scanned_card(self.card_seq)));
        }
        Ok(None)
    }

    // ---- control: things that happen at the device ----------------------

    fn device_mut(&mut self, id: u32) -> Result<&mut Device, String> {
        self.devices
            .get_mut(&id)
            .ok_or_else(|| format!("no device {id}"))
    }

    /// An administrator enrolls (or re-enrolls) a generated user at the
    /// device itself (`changedOnDevice`, WIRE.md B13). Returns the event ID.
    pub fn device_enroll(&mut self, id: u32, user_id: &str) -> Result<u32, String> {
        wire::validate_user_id(user_id)?;
        let numbering = self.api.numbering();
        let profile = self.profile;
        let dev = self.device_mut(id)?;
        let existed = dev.users.contains_key(user_id);
        let revision = if existed {
            dev.revisions.get(user_id).map_or(0, |r| r + 1)
        } else {
            0
        };
        dev.revisions.insert(user_id.to_owned(), revision);
        dev.users.insert(
            user_id.to_owned(),
            users::generate(user_id, revision, numbering, profile),
        );
        self.touch_users();
        let code = if existed {
            codes::USER_UPDATE_SUCCESS
        } else {
            codes::USER_ENROLL_SUCCESS
        };
        Ok(self.append_event(id, code, user_id, true))
    }

    /// An administrator changes an existing user at the device.
    pub fn device_update(&mut self, id: u32, user_id: &str) -> Result<u32, String> {
        let dev = self.device_mut(id)?;
        if !dev.users.contains_key(user_id) {
            return Err(format!("device {id} has no user {user_id}"));
        }
        self.device_enroll(id, user_id)
    }

    /// Stores an arbitrary raw record at the device, as enrolled there.
    pub fn device_put_raw(&mut self, id: u32, raw: Vec<u8>) -> Result<u32, String> {
        let uid = wire::peek_user_id(&raw).map_err(|e| e.to_string())?;
        let dev = self.device_mut(id)?;
        let existed = dev.users.insert(uid.clone(), raw).is_some();
        self.touch_users();
        let code = if existed {
            codes::USER_UPDATE_SUCCESS
        } else {
            codes::USER_ENROLL_SUCCESS
        };
        Ok(self.append_event(id, code, &uid, true))
    }

    /// Stores bytes under `key` without any check, as corrupt device data
    /// would be (for tests of the client's handling of bad data).
    pub fn corrupt_user(&mut self, id: u32, key: &str, raw: Vec<u8>) {
        if let Some(d) = self.devices.get_mut(&id) {
            d.users.insert(key.to_owned(), raw);
        }
        self.touch_users();
    }

    /// An administrator's change at the device leaves a record that does
    /// not decode (a firmware bug, a torn write): undecodable bytes stored
    /// under `user_id`, announced by a user-update event. Returns the event
    /// ID.
    pub fn device_corrupt(&mut self, id: u32, user_id: &str) -> Result<u32, String> {
        wire::validate_user_id(user_id)?;
        // Field 1 (the header) announced as 200 bytes long, 3 present.
        let garbage = vec![0x0A, 0xC8, 0x01, 0xFF, 0xFF, 0xFF];
        self.device_mut(id)?;
        self.corrupt_user(id, user_id, garbage);
        Ok(self.append_event(id, codes::USER_UPDATE_SUCCESS, user_id, true))
    }

    pub fn device_delete(&mut self, id: u32, user_id: &str) -> Result<u32, String> {
        let dev = self.device_mut(id)?;
        if dev.users.remove(user_id).is_none() {
            return Err(format!("device {id} has no user {user_id}"));
        }
        self.touch_users();
        Ok(self.append_event(id, codes::USER_DELETE_SUCCESS, user_id, true))
    }

    pub fn device_delete_all(&mut self, id: u32) -> Result<u32, String> {
        self.device_mut(id)?.users.clear();
        self.touch_users();
        Ok(self.append_event(id, codes::USER_DELETE_ALL_SUCCESS, "", true))
    }

    /// A non-user event (e.g. someone authenticating), to fill logs.
    pub fn device_event(&mut self, id: u32, code: u32, user_id: &str) -> Result<u32, String> {
        self.device_mut(id)?;
        Ok(self.append_event(id, code, user_id, false))
    }

    /// Sets a device's clock `secs` off (positive: ahead): its events are
    /// timestamped by it.
    pub fn set_clock_offset(&mut self, id: u32, secs: i64) {
        self.clock_offsets.insert(id, secs);
    }

    /// Takes a device off the network or brings it back. A device that comes
    /// back is reconnected by the caller after the reconnect delay.
    pub fn set_online(&mut self, id: u32, online: bool) -> Result<(), String> {
        self.device_mut(id)?.online = online;
        self.refresh_status(id);
        Ok(())
    }

    pub fn reconnect(&mut self, id: u32) {
        if let Some(d) = self.devices.get_mut(&id) {
            d.online = true;
        }
        self.refresh_status(id);
    }

    pub fn clear_device_log(&mut self, id: u32) -> Result<(), String> {
        self.device_mut(id)?;
        self.clear_log(id).map_err(|s| s.message().to_owned())
    }

    /// Factory reset: users and logs gone, event IDs restart at the
    /// configured first ID (§5.5 is open; this is our answer), the device
    /// reboots (drops its link, monitoring lost) and logs the reset.
    pub fn factory_reset(&mut self, id: u32) -> Result<(), String> {
        let capacity = self.log_capacity;
        let dev = self.device_mut(id)?;
        dev.users.clear();
        dev.revisions.clear();
        dev.log = EventRing::new(id, capacity, dev.spec.first_event_id);
        dev.online = false;
        self.touch_users();
        self.refresh_status(id);
        self.append_event(id, codes::DEVICE_FACTORY_RESET, "", false);
        self.append_event(id, codes::DEVICE_SYSTEM_STARTED, "", false);
        Ok(())
    }

    /// Database reset (0x4501) without a reboot: users and logs gone, event
    /// IDs restart at the first ID, the link stays up and monitored.
    pub fn database_reset(&mut self, id: u32) -> Result<(), String> {
        let capacity = self.log_capacity;
        let dev = self.device_mut(id)?;
        dev.users.clear();
        dev.revisions.clear();
        dev.log = EventRing::new(id, capacity, dev.spec.first_event_id);
        self.touch_users();
        self.append_event(id, codes::DEVICE_DATABASE_RESET, "", false);
        Ok(())
    }

    pub fn set_drop_fraction(&mut self, id: Option<u32>, fraction: f64) {
        let f = fraction.clamp(0.0, 1.0);
        match id {
            Some(id) => {
                self.drop_fraction.insert(id, f);
            }
            None => {
                for d in self.devices.keys() {
                    self.drop_fraction.insert(*d, f);
                }
            }
        }
    }

    /// Breaks the GetLog answers of `id` (every device if `None`) as
    /// `fault` says, from now on.
    pub fn set_log_fault(&mut self, id: Option<u32>, fault: LogFault) {
        let ids = match id {
            Some(id) => vec![id],
            None => self.devices.keys().copied().collect(),
        };
        for id in ids {
            if fault == LogFault::None {
                self.log_faults.remove(&id);
            } else {
                self.log_faults.insert(id, fault);
            }
        }
    }

    /// Stalls the realtime streams open now (`true`): they stay open and
    /// answer HTTP/2 pings but carry nothing; events wait in each stream's
    /// queue and are dropped when it is full (B10). Streams opened later
    /// are not stalled. `false`: the stalled streams go on, sending what
    /// waited first.
    pub fn stall_realtime(&mut self, on: bool) {
        let mut stats = self.stats;
        for sub in &mut self.realtime_subs {
            if on {
                sub.stalled.get_or_insert_with(VecDeque::new);
                continue;
            }
            for ev in sub.stalled.take().unwrap_or_default() {
                match sub.tx.try_send(Ok(ev)) {
                    Ok(()) => stats.delivered += 1,
                    Err(_) => stats.dropped_queue_full += 1,
                }
            }
        }
        self.stats = stats;
    }

    /// One device's log capacity from now on (shrinking drops its oldest
    /// records, as overwriting would). Unknown devices are ignored.
    pub fn set_log_capacity(&mut self, id: u32, capacity: usize) {
        if let Some(d) = self.devices.get_mut(&id) {
            d.log.set_capacity(capacity);
        }
    }

    /// A held device stops answering commands: every call that addresses
    /// it waits until it is released (or its client gives up), while its
    /// link stays up and it keeps logging. A real gateway would give up
    /// after its command timeout (B27); the simulator waits, so tests decide.
    pub fn set_held(&mut self, id: u32, on: bool) {
        if on {
            self.held.insert(id);
        } else {
            self.held.remove(&id);
        }
    }

    pub fn is_held(&self, id: u32) -> bool {
        self.held.contains(&id)
    }

    /// Calls now waiting on a held device.
    pub fn held_calls(&self, id: u32) -> usize {
        self.held_calls.get(&id).copied().unwrap_or(0)
    }

    pub(crate) fn count_held_call(&mut self, ids: &[u32], waiting: bool) {
        for id in ids {
            let n = self.held_calls.entry(*id).or_default();
            if waiting {
                *n += 1;
            } else {
                *n = n.saturating_sub(1);
            }
        }
    }

    pub fn fail_next_multi(&mut self, id: u32, n: u32) {
        self.fail_multi.insert(id, n);
    }

    pub fn reject(&mut self, id: u32, user_id: &str, on: bool) {
        if on {
            self.rejects.insert((id, user_id.to_owned()));
        } else {
            self.rejects.remove(&(id, user_id.to_owned()));
        }
    }

    /// The gateway process restarts: every stream ends, monitoring is lost,
    /// and async connections are forgotten unless preconnect re-adds them.
    pub fn gateway_restarted(&mut self) {
        self.status_subs.clear();
        self.realtime_subs.clear();
        self.managed.clear();
        self.reported.clear();
        for d in self.devices.values_mut() {
            d.monitoring = false;
        }
        self.apply_preconnect();
    }

    /// Ends every open realtime and status stream with `status` (as a
    /// gateway does when something inside it fails).
    pub fn break_streams(&mut self, status: &Status) {
        for sub in self.realtime_subs.drain(..) {
            let _ = sub.tx.try_send(Err(status.clone()));
        }
        for tx in self.status_subs.drain(..) {
            let _ = tx.try_send(Err(status.clone()));
        }
    }

    pub fn record(&mut self, rec: RpcRecord) {
        if self.rpc_log.len() == RPC_LOG_LIMIT {
            self.rpc_log.pop_front();
        }
        self.rpc_log.push_back(rec);
    }

    pub fn rpc_log(&self) -> Vec<RpcRecord> {
        self.rpc_log.iter().cloned().collect()
    }

    pub fn clear_rpc_log(&mut self) {
        self.rpc_log.clear();
    }

    /// Tells [`Self::users_changed`] watchers that a user table changed.
    fn touch_users(&mut self) {
        self.users_changed.send_modify(|n| *n = n.wrapping_add(1));
        self.observe_guard();
    }

    /// Watches deletes at `targets` from now on (see [`DeleteGuard`]).
    pub fn guard_deletes(&mut self, sources: Vec<u32>, targets: Vec<u32>, window: Duration) {
        self.guard = Some(DeleteGuard {
            sources,
            targets,
            window,
            present_since: HashMap::new(),
            violations: Vec::new(),
        });
        self.observe_guard();
    }

    /// Deletes the guard saw of users a source had held throughout its
    /// window.
    pub fn delete_violations(&self) -> Vec<String> {
        self.guard
            .as_ref()
            .map(|g| g.violations.clone())
            .unwrap_or_default()
    }

    fn observe_guard(&mut self) {
        let Some(g) = self.guard.as_mut() else {
            return;
        };
        let now = std::time::Instant::now();
        let mut held = HashSet::new();
        for s in &g.sources {
            if let Some(d) = self.devices.get(s) {
                for u in d.users.keys() {
                    held.insert((*s, u.clone()));
                }
            }
        }
        g.present_since.retain(|k, _| held.contains(k));
        for k in held {
            g.present_since.entry(k).or_insert(now);
        }
    }

    /// An API delete of `users` at `device`: a violation if a source had
    /// held one of them for the whole window (nothing the daemon saw could
    /// have said it was gone).
    fn check_delete(&mut self, device: u32, users: &[String]) {
        let Some(g) = self.guard.as_mut() else {
            return;
        };
        if !g.targets.contains(&device) {
            return;
        }
        let now = std::time::Instant::now();
        for u in users {
            for s in &g.sources {
                if let Some(since) = g.present_since.get(&(*s, u.clone()))
                    && now.duration_since(*since) >= g.window
                {
                    g.violations.push(format!(
                        "user {u} deleted from target {device} while source {s} had held it for {:?}",
                        now.duration_since(*since)
                    ));
                }
            }
        }
    }

    /// A counter bumped every time any device's user table changes
    /// (through the API or at the device, resets included).
    pub fn users_changed(&self) -> watch::Receiver<u64> {
        self.users_changed.subscribe()
    }

    /// Whether `device` stores `user_id`, without copying its table.
    pub fn holds(&self, id: u32, user_id: &str) -> bool {
        self.devices
            .get(&id)
            .is_some_and(|d| d.users.contains_key(user_id))
    }

    /// The raw record of one user.
    pub fn user_bytes(&self, id: u32, user_id: &str) -> Option<Vec<u8>> {
        self.devices.get(&id)?.users.get(user_id).cloned()
    }

    /// Whether `device` stores `user_id` with exactly these bytes.
    pub fn holds_exactly(&self, id: u32, user_id: &str, raw: &[u8]) -> bool {
        self.devices
            .get(&id)
            .and_then(|d| d.users.get(user_id))
            .is_some_and(|r| r.as_slice() == raw)
    }

    pub fn user_count(&self, id: u32) -> usize {
        self.devices.get(&id).map_or(0, |d| d.users.len())
    }

    pub fn users(&self, id: u32) -> BTreeMap<String, Vec<u8>> {
        self.devices
            .get(&id)
            .map(|d| d.users.clone())
            .unwrap_or_default()
    }

    pub fn log(&self, id: u32) -> Vec<EventLog> {
        self.devices
            .get(&id)
            .map(|d| d.log.all())
            .unwrap_or_default()
    }

    /// The newest `n` records of a device's log, oldest first.
    pub fn log_tail(&self, id: u32, n: usize) -> Vec<EventLog> {
        self.devices
            .get(&id)
            .map(|d| d.log.tail(n))
            .unwrap_or_default()
    }

    pub fn log_len(&self, id: u32) -> usize {
        self.devices.get(&id).map_or(0, |d| d.log.len())
    }

    pub fn newest_event_id(&self, id: u32) -> Option<u32> {
        self.devices.get(&id).and_then(|d| d.log.newest_id())
    }

    pub fn is_monitoring(&self, id: u32) -> bool {
        self.devices.get(&id).is_some_and(|d| d.monitoring)
    }

    pub fn realtime_stats(&self) -> RealtimeStats {
        self.stats
    }

    /// Open status streams (a stream whose client went away counts no
    /// more, even before the next status change removes it).
    pub fn status_subscribers(&self) -> usize {
        self.status_subs.iter().filter(|tx| !tx.is_closed()).count()
    }

    pub fn preconnect(&self) -> bool {
        self.preconnect
    }

    /// Whether the next gateway restart re-registers every device.
    pub fn set_preconnect(&mut self, on: bool) {
        self.preconnect = on;
    }

    pub fn realtime_subscribers(&self) -> usize {
        self.realtime_subs
            .iter()
            .filter(|s| !s.tx.is_closed())
            .count()
    }
}

fn clamp_queue(queue_size: i32) -> usize {
    usize::try_from(queue_size).unwrap_or(1).clamp(1, MAX_QUEUE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(r: &mut EventRing) -> u32 {
        r.push(0, (codes::VERIFY_SUCCESS, 0), "", false)
    }

    #[test]
    fn ring_overwrites_oldest_and_ids_only_increase() {
        let mut r = EventRing::new(7, 3, 10);
        for _ in 0..5 {
            push(&mut r);
        }
        assert_eq!(r.oldest_id(), Some(12));
        assert_eq!(r.newest_id(), Some(14));
        let ids: Vec<u32> = r.all().iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![12, 13, 14]);
        assert!(r.all().iter().all(|e| e.device_id == 7));
        assert_eq!(r.tail(2).iter().map(|e| e.id).collect::<Vec<_>>(), [13, 14]);
    }

    #[test]
    fn get_log_edges_under_every_policy() {
        use PastNewest as P;
        use StaleStart as S;
        let mut r = EventRing::new(1, 5, 1);
        for _ in 0..8 {
            push(&mut r);
        }
        let empty = EventRing::new(1, 5, 1);
        // Stored: 4..=8.
        let ids =
            |v: Result<Vec<EventLog>, Status>| v.unwrap().iter().map(|e| e.id).collect::<Vec<_>>();
        let code = |v: Result<Vec<EventLog>, Status>| v.unwrap_err().code();
        for stale in [S::Clamp, S::OutOfRange] {
            for past in [P::Empty, P::OutOfRange] {
                // In range, and start 0 (= oldest, B2): the same under every
                // policy, empty log included.
                assert_eq!(ids(r.read(0, 0, stale, past)), vec![4, 5, 6, 7, 8]);
                assert_eq!(ids(r.read(0, 1, stale, past)), vec![4]);
                assert_eq!(ids(r.read(6, 0, stale, past)), vec![6, 7, 8]);
                assert_eq!(ids(r.read(6, 2, stale, past)), vec![6, 7]);
                assert_eq!(ids(r.read(4, 0, stale, past)), vec![4, 5, 6, 7, 8]);
                assert_eq!(ids(r.read(8, 0, stale, past)), vec![8]);
                assert!(ids(empty.read(0, 0, stale, past)).is_empty());
                // Older than the oldest.
                match stale {
                    S::Clamp => assert_eq!(ids(r.read(2, 0, stale, past)), vec![4, 5, 6, 7, 8]),
                    S::OutOfRange => assert_eq!(code(r.read(2, 0, stale, past)), Code::OutOfRange),
                }
                // Past the newest (9 = newest + 1), and any start on an
                // empty log.
                for (log, start) in [(&r, 9), (&r, 1000), (&empty, 1), (&empty, 7)] {
                    match past {
                        P::Empty => assert!(ids(log.read(start, 0, stale, past)).is_empty()),
                        P::OutOfRange => {
                            assert_eq!(code(log.read(start, 0, stale, past)), Code::OutOfRange)
                        }
                    }
                }
            }
        }
        let err = r.read(9, 0, S::Clamp, P::OutOfRange).unwrap_err();
        assert!(err.message().contains("newest stored record 8"), "{err:?}");
        let err = r.read(2, 0, S::OutOfRange, P::Empty).unwrap_err();
        assert!(err.message().contains("oldest is 4"), "{err:?}");
    }

    #[test]
    fn stored_events_are_compact() {
        // A million-record log must not need gigabytes (benchmarks).
        assert!(std::mem::size_of::<StoredEvent>() <= 32);
    }

    #[test]
    fn shrinking_a_ring_drops_the_oldest() {
        let mut r = EventRing::new(1, 10, 1);
        for _ in 0..8 {
            push(&mut r);
        }
        r.set_capacity(3);
        assert_eq!(r.all().iter().map(|e| e.id).collect::<Vec<_>>(), [6, 7, 8]);
        push(&mut r);
        assert_eq!(r.oldest_id(), Some(7));
    }

    #[test]
    fn ring_ids_skip_zero_on_wrap() {
        let mut r = EventRing::new(1, 4, u32::MAX);
        assert_eq!(push(&mut r), u32::MAX);
        assert_eq!(push(&mut r), 1);
    }

    /// A wrapped log is read in log order from where its start is: the
    /// IDs after the wrap are the newest.
    #[test]
    fn a_wrapped_log_reads_in_log_order() {
        let mut r = EventRing::new(1, 8, u32::MAX - 2);
        for _ in 0..6 {
            push(&mut r);
        }
        let ids = |v: Result<Vec<EventLog>, Status>| -> Vec<u32> {
            v.unwrap().iter().map(|e| e.id).collect()
        };
        let (err, past) = (StaleStart::OutOfRange, PastNewest::OutOfRange);
        let max = u32::MAX;
        assert_eq!(
            ids(r.read(0, 0, err, past)),
            [max - 2, max - 1, max, 1, 2, 3]
        );
        assert_eq!(ids(r.read(max, 0, err, past)), [max, 1, 2, 3]);
        assert_eq!(ids(r.read(max - 1, 2, err, past)), [max - 1, max]);
        assert_eq!(ids(r.read(2, 0, err, past)), [2, 3]);
        assert_eq!(ids(r.read(3, 5, err, past)), [3]);
        assert_eq!(
            r.read(4, 0, err, past).unwrap_err().code(),
            Code::OutOfRange
        );
        assert!(r.read(4, 0, err, PastNewest::Empty).unwrap().is_empty());
    }

    #[test]
    fn defaults_are_the_inconvenient_answers() {
        let p = Policies::default();
        assert_eq!(p.stream_headers, StreamHeaders::Lazy);
        assert_eq!(p.stale_start, StaleStart::OutOfRange);
        assert_eq!(p.past_newest, PastNewest::OutOfRange);
        assert_eq!(p.missing_user, MissingUser::NotFound);
        let o = ModelOptions::default();
        assert!(!o.preconnect);
        assert_eq!(o.device_latency, Duration::ZERO);
        let m = Model::new(ModelOptions {
            devices: vec![DeviceSpec::new(1)],
            ..Default::default()
        });
        assert!(m.device_list().is_empty());
        assert!(!m.is_connected(1));
    }

    /// Devices registered as async connections (`preconnect`): these
    /// tests are about what connected devices do.
    fn model(devices: &[u32]) -> Model {
        Model::new(ModelOptions {
            devices: devices.iter().map(|d| DeviceSpec::new(*d)).collect(),
            preconnect: true,
            ..Default::default()
        })
    }

    #[test]
    fn log_faults_break_pages_as_named() {
        let mut m = model(&[1, 2]);
        for u in ["10", "11", "12"] {
            m.device_enroll(1, u).unwrap();
        }
        let ids = |m: &Model, start, max| -> Vec<u32> {
            m.get_log(1, start, max)
                .unwrap()
                .iter()
                .map(|e| e.id)
                .collect()
        };
        assert_eq!(ids(&m, 1, 2), [1, 2]);
        m.set_log_fault(Some(1), LogFault::Duplicate);
        assert_eq!(ids(&m, 1, 2), [1, 1, 2, 2]);
        m.set_log_fault(None, LogFault::OutOfOrder);
        assert_eq!(ids(&m, 1, 2), [2, 1]);
        m.set_log_fault(Some(1), LogFault::Oversize);
        assert_eq!(ids(&m, 1, 1), [1, 2, 3]);
        assert_eq!(ids(&m, 2, 1), [2, 3]);
        m.set_log_fault(Some(1), LogFault::None);
        assert_eq!(ids(&m, 1, 1), [1]);
    }

    #[test]
    fn a_stalled_stream_holds_its_queue_then_goes_on() {
        let mut m = model(&[1]);
        m.set_monitoring(1, true).unwrap();
        let mut rx = m.subscribe_realtime(2, &[], &[]);
        m.stall_realtime(true);
        let mut later = m.subscribe_realtime(8, &[], &[]);
        for u in ["10", "11", "12"] {
            m.device_enroll(1, u).unwrap();
        }
        assert!(rx.try_recv().is_err(), "stalled");
        assert_eq!(
            std::iter::from_fn(|| later.try_recv().ok()).count(),
            3,
            "a stream opened after the stall flows"
        );
        m.stall_realtime(false);
        let got: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| e.unwrap().user_id)
            .collect();
        assert_eq!(got, ["10", "11"], "what its queue held, the rest dropped");
        m.device_enroll(1, "13").unwrap();
        assert_eq!(rx.try_recv().unwrap().unwrap().user_id, "13");
    }

    #[test]
    fn a_record_that_does_not_decode_is_stored_and_announced() {
        let mut m = model(&[1]);
        let event = m.device_corrupt(1, "7").unwrap();
        assert!(wire::peek_user_id(&m.users(1)["7"]).is_err());
        let ev = m.log(1).into_iter().find(|e| e.id == event).unwrap();
        assert_eq!(
            (ev.event_code, ev.user_id.as_str()),
            (codes::USER_UPDATE_SUCCESS, "7")
        );
    }

    #[test]
    fn queue_size_is_clamped_never_zero() {
        assert_eq!(clamp_queue(0), 1);
        assert_eq!(clamp_queue(-5), 1);
        assert_eq!(clamp_queue(16), 16);
        assert_eq!(clamp_queue(i32::MAX), MAX_QUEUE);
    }

    #[test]
    fn realtime_only_for_monitored_devices_and_drops_when_full() {
        let mut m = model(&[1, 2]);
        let mut rx = m.subscribe_realtime(2, &[], &[]);
        m.device_enroll(1, "10").unwrap();
        assert!(rx.try_recv().is_err(), "not monitored yet");
        m.set_monitoring(1, true).unwrap();
        for u in ["11", "12", "13", "14"] {
            m.device_enroll(1, u).unwrap();
        }
        let got: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| e.unwrap().user_id)
            .collect();
        assert_eq!(got, vec!["11", "12"], "queue of 2: the rest is dropped");
        assert_eq!(m.realtime_stats().dropped_queue_full, 2);
        // The log still has everything.
        assert_eq!(m.log(1).len(), 5);
    }

    #[test]
    fn realtime_filters_and_monitoring_reset_on_disconnect() {
        let mut m = model(&[1, 2]);
        let mut only2 = m.subscribe_realtime(10, &[2], &[codes::USER_DELETE_SUCCESS]);
        m.set_monitoring(1, true).unwrap();
        m.set_monitoring(2, true).unwrap();
        m.device_enroll(1, "5").unwrap();
        m.device_enroll(2, "5").unwrap();
        m.device_delete(2, "5").unwrap();
        let e = only2.try_recv().unwrap().unwrap();
        assert_eq!((e.device_id, e.event_code), (2, codes::USER_DELETE_SUCCESS));
        assert!(only2.try_recv().is_err());

        m.set_online(2, false).unwrap();
        assert!(!m.is_monitoring(2));
        m.reconnect(2);
        assert!(m.is_connected(2));
        assert!(
            !m.is_monitoring(2),
            "monitoring does not survive a reconnect"
        );
    }

    #[test]
    fn multi_failure_lists_only_failed_devices() {
        let mut m = model(&[1, 2, 3]);
        m.set_online(2, false).unwrap();
        m.reject(3, "9", true);
        let users = vec![
            users::generate("8", 0, m.api().numbering(), UserProfile::default()),
            users::generate("9", 0, m.api().numbering(), UserProfile::default()),
        ];
        let err = m.enroll_multi(&[1, 2, 3], &users, true).unwrap_err();
        let multi = crate::gateway::MultiError::from_status(&err).unwrap();
        assert_eq!(multi.failed_devices().collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(multi.for_device(2).unwrap().code, Code::Unavailable);
        assert_eq!(multi.for_device(3).unwrap().code, Code::InvalidArgument);
        assert_eq!(m.users(1).len(), 2);
        // Device 3 stored the user before the poison one, as a device would.
        assert_eq!(m.users(3).keys().collect::<Vec<_>>(), vec!["8"]);
    }

    #[test]
    fn enroll_without_overwrite_fails_for_existing_user() {
        let mut m = model(&[1]);
        let u = users::generate("8", 0, m.api().numbering(), UserProfile::default());
        m.enroll(1, std::slice::from_ref(&u), false).unwrap();
        let err = m.enroll(1, &[u], false).unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists);
        let codes: Vec<u32> = m.log(1).iter().map(|e| e.event_code).collect();
        assert_eq!(codes, vec![codes::USER_ENROLL_SUCCESS]);
        assert!(!m.log(1)[0].changed_on_device);
    }

    #[test]
    fn missing_user_policies() {
        let mut m = model(&[1]);
        m.device_enroll(1, "1").unwrap();
        let ids = vec!["1".to_owned(), "404".to_owned()];
        // The convenient answer is not the default: set it explicitly.
        m.policies.missing_user = MissingUser::Lenient;
        assert_eq!(m.user_get(1, &ids).unwrap().len(), 1);
        m.delete(1, &["404".to_owned()]).unwrap();
        m.policies.missing_user = MissingUser::NotFound;
        assert_eq!(m.user_get(1, &ids).unwrap_err().code(), Code::NotFound);
        assert_eq!(
            m.delete(1, &["404".to_owned()]).unwrap_err().code(),
            Code::NotFound
        );
    }

    #[test]
    fn delete_multi_of_a_missing_user_fails_only_where_missing() {
        let mut m = model(&[1, 2]);
        m.device_enroll(1, "5").unwrap();
        let err = m.delete_multi(&[1, 2], &["5".to_owned()]).unwrap_err();
        let multi = crate::gateway::MultiError::from_status(&err).unwrap();
        assert_eq!(multi.failed_devices().collect::<Vec<_>>(), vec![2]);
        assert_eq!(multi.for_device(2).unwrap().code, Code::NotFound);
        assert!(!m.holds(1, "5"), "deleted where it existed");
    }

    #[test]
    fn user_changes_are_announced_and_cheap_to_check() {
        let mut m = model(&[1, 2]);
        let mut changed = m.users_changed();
        let seen = *changed.borrow_and_update();
        m.device_enroll(1, "7").unwrap();
        assert!(changed.has_changed().unwrap());
        assert!(*changed.borrow_and_update() > seen);
        let raw = m.user_bytes(1, "7").unwrap();
        assert!(m.holds(1, "7") && !m.holds(2, "7"));
        m.enroll(2, std::slice::from_ref(&raw), true).unwrap();
        assert!(changed.has_changed().unwrap(), "enroll through the API");
        changed.borrow_and_update();
        assert!(m.holds_exactly(2, "7", &raw));
        assert_eq!(m.user_count(2), 1);
        // Non-user events change nothing.
        m.device_event(1, codes::VERIFY_SUCCESS, "7").unwrap();
        assert!(!changed.has_changed().unwrap());
        let changes: [fn(&mut Model); 4] = [
            |m: &mut Model| m.delete(2, &["7".to_owned()]).unwrap(),
            |m: &mut Model| m.delete_all(1).unwrap(),
            |m: &mut Model| m.database_reset(1).unwrap(),
            |m: &mut Model| m.factory_reset(2).unwrap(),
        ];
        for change in changes {
            change(&mut m);
            assert!(changed.has_changed().unwrap());
            changed.borrow_and_update();
        }
    }

    #[test]
    fn a_million_records_in_bulk() {
        let mut m = Model::new(ModelOptions {
            devices: vec![DeviceSpec::new(1)],
            log_capacity: 1_000_000,
            preconnect: true,
            ..Default::default()
        });
        m.set_monitoring(1, true).unwrap();
        let mut rt = m.subscribe_realtime(4, &[], &[]);
        assert_eq!(
            m.append_events(1, 1_000_000, codes::VERIFY_SUCCESS),
            Ok((1, 1_000_000))
        );
        assert_eq!(m.log_len(1), 1_000_000);
        // Broadcast like any event: the 4-deep queue took 4, dropped the rest.
        assert_eq!(m.realtime_stats().delivered, 4);
        assert_eq!(m.realtime_stats().dropped_queue_full, 999_996);
        assert_eq!(rt.try_recv().unwrap().unwrap().id, 1);
        // The ring overwrites beyond its capacity.
        m.append_events(1, 2, codes::VERIFY_SUCCESS).unwrap();
        let page = m.get_log(1, 0, 2).unwrap();
        assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), vec![3, 4]);
        assert!(m.append_events(1, 0, codes::VERIFY_SUCCESS).is_err());
        assert!(m.append_events(9, 1, codes::VERIFY_SUCCESS).is_err());
    }

    #[test]
    fn factory_reset_restarts_ids_and_drops_users() {
        let mut m = model(&[1]);
        for u in ["1", "2", "3"] {
            m.device_enroll(1, u).unwrap();
        }
        assert_eq!(m.newest_event_id(1), Some(3));
        m.factory_reset(1).unwrap();
        assert!(m.users(1).is_empty());
        let log = m.log(1);
        assert_eq!(log[0].id, 1);
        assert_eq!((log[0].event_code, log[0].sub_code), (0x4502, 0));
        assert!(!m.is_connected(1));
        m.policies.low_byte_codes = LowByteCodes::Split;
        m.factory_reset(1).unwrap();
        let log = m.log(1);
        assert_eq!((log[0].event_code, log[0].sub_code), (0x4500, 0x02));
    }

    #[test]
    fn transient_multi_failures_count_down() {
        let mut m = model(&[1, 2]);
        m.fail_next_multi(2, 1);
        assert!(m.delete_all_multi(&[1, 2]).is_err());
        m.delete_all_multi(&[1, 2]).unwrap();
    }
}
