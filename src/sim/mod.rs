//! The gateway simulator: a tonic server that speaks the G-SDK device
//! gateway API of any generation (both namespaces, WIRE.md §1.1) over TLS,
//! backed by simulated devices, with controls for the faults the daemon must
//! survive. Used by the tests, the demo and `usersync sim`.
//!
//! It must behave as WIRE.md says, rough edges included (dropped realtime
//! events, ring-buffer logs, Multi errors in status details, a reconnect
//! delay), not as is convenient for the daemon. Where WIRE.md leaves a
//! question open, every plausible answer can be switched on (API, `usersync
//! sim` flag, `--config` key, stdin command) and the default is the least
//! convenient one — see the table on [`Policies`]:
//!
//! * streams send their headers lazily, with the first message (§5.14);
//! * GetLog outside the stored range fails with OUT_OF_RANGE (§5.4);
//! * User.Get of an unknown ID fails with NOT_FOUND (§5.3);
//! * devices are unknown to the gateway until a client adds them, and again
//!   after a gateway restart (B14);
//! * device commands can be given a latency (0 by default, for speed).
//!
//! Faults on top: devices offline, dropped realtime events, failing Multi
//! calls, refused users, resets, gateway restarts, per-method latency, and
//! held devices that answer nothing until released. Hostile data, beyond
//! what WIRE.md allows: arbitrary event codes and user IDs in events,
//! records that do not decode, broken GetLog pages ([`LogFault`]), stalled
//! realtime streams and streams that never answer ([`StreamHeaders::Never`]).
//!
//! For harnesses: [`Simulator::users_changed`] wakes on any user-table
//! change, [`Simulator::holds`] and [`Simulator::user_bytes`] check single
//! users without copying tables, and [`Simulator::append_events`] fills a
//! log in bulk.

pub mod cli;
pub mod model;
mod service;
pub mod tls;
pub mod users;

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Identity, Server, ServerTlsConfig};

pub use model::{
    ChangedOnDevice, DeviceSpec, LogFault, LowByteCodes, MissingUser, ModelOptions, PastNewest,
    Policies, RealtimeStats, RpcRecord, StaleStart, StreamHeaders, codes,
};
use service::{AdminSvc, CardSvc, ConnectSvc, EventSvc, Shared, UserSvc};
pub use tls::SimCerts;

use crate::gateway::{ApiPath, GatewaySettings, MAX_MESSAGE_BYTES, TlsSettings};
use crate::proto::gsdk::admin::admin_server::AdminServer;
use crate::proto::gsdk::card::CsnCardData;
use crate::proto::gsdk::card::card_server::CardServer;
use crate::proto::gsdk::connect::connect_server::ConnectServer;
use crate::proto::gsdk::event::EventLog;
use crate::proto::gsdk::event::event_server::EventServer;
use crate::proto::gsdk::user::user_server::UserServer;
use crate::wire::Api;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("simulator I/O: {0}")]
    Io(#[from] io::Error),
    #[error("certificate generation: {0}")]
    Certs(#[from] rcgen::Error),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("{0}")]
    Control(String),
}

/// How to run a simulator.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub model: ModelOptions,
    /// Where to listen; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Serve TLS (the default, as a real gateway, WIRE.md B23).
    pub tls: bool,
    /// Names the server certificate covers.
    pub sans: Vec<String>,
    /// The gateway's reconnect interval (B14); the real default is 30 s.
    pub reconnect_delay: Duration,
    /// How long Card.Scan waits for a card (B27 `input_cmd`).
    pub scan_timeout: Duration,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            model: ModelOptions::default(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: true,
            sans: tls::DEFAULT_SANS.iter().map(|s| (*s).to_owned()).collect(),
            reconnect_delay: Duration::from_millis(200),
            scan_timeout: Duration::from_secs(20),
        }
    }
}

impl SimOptions {
    /// `n` devices with IDs 540000001…, the rest default.
    pub fn with_devices(n: u32) -> Self {
        let mut o = SimOptions::default();
        o.model.devices = (1..=n).map(|i| DeviceSpec::new(540_000_000 + i)).collect();
        o
    }
}

/// A running simulator.
pub struct Simulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    api: Api,
    certs: Option<SimCerts>,
    server: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
}

impl Simulator {
    /// Binds, generates certificates (if TLS) and starts serving.
    pub async fn start(opts: SimOptions) -> Result<Simulator, SimError> {
        let api = opts.model.api;
        let certs = if opts.tls {
            let sans: Vec<&str> = opts.sans.iter().map(String::as_str).collect();
            Some(tls::generate(&sans)?)
        } else {
            None
        };
        let shared = Shared::new(
            model::Model::new(opts.model),
            opts.reconnect_delay,
            opts.scan_timeout,
        );
        let listener = bind(opts.listen)?;
        let addr = listener.local_addr()?;
        let sim = Simulator {
            shared,
            addr,
            api,
            certs,
            server: Mutex::new(None),
        };
        sim.serve(listener)?;
        Ok(sim)
    }

    fn serve(&self, listener: tokio::net::TcpListener) -> Result<(), SimError> {
        let token = CancellationToken::new();
        let mut builder = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)));
        if let Some(certs) = &self.certs {
            let identity = Identity::from_pem(&certs.server_cert_pem, &certs.server_key_pem);
            builder = builder
                .tls_config(ServerTlsConfig::new().identity(identity))
                .map_err(|e| SimError::Tls(e.to_string()))?;
        }
        let api = self.api;
        let s = &self.shared;
        let router = builder
            .layer(tower::layer::layer_fn(move |inner| {
                ApiPath::server(inner, api)
            }))
            .add_service(sized(ConnectServer::new(ConnectSvc(Arc::clone(s)))))
            .add_service(sized_event(EventServer::new(EventSvc(Arc::clone(s)))))
            .add_service(sized_user(UserServer::new(UserSvc(Arc::clone(s)))))
            .add_service(CardServer::new(CardSvc(Arc::clone(s))))
            .add_service(AdminServer::new(AdminSvc(Arc::clone(s))));
        let conn_token = token.clone();
        let incoming = TcpListenerStream::new(listener)
            .map(move |r| r.map(|tcp| KillableIo::new(tcp, conn_token.clone())));
        let stop = token.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
                tracing::warn!(error = %e, "simulator server ended");
            }
        });
        *self.server.lock().unwrap_or_else(|e| e.into_inner()) = Some((token, task));
        Ok(())
    }

    async fn stop_serving(&self) {
        let running = self.server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((token, task)) = running {
            token.cancel();
            let _ = task.await;
        }
    }

    /// Stops the simulator: every connection is cut.
    pub async fn shutdown(&self) {
        self.stop_serving().await;
    }

    /// Restarts the gateway process: every connection and stream is cut, the
    /// port refuses connections for `down_for`, monitoring is lost and so
    /// are the async connections (unless preconnect: then every device is
    /// registered again); devices keep their users and logs.
    pub async fn restart(&self, down_for: Duration) -> Result<(), SimError> {
        self.stop_serving().await;
        self.shared.model().gateway_restarted();
        tokio::time::sleep(down_for).await;
        let listener = bind(self.addr)?;
        self.serve(listener)
    }

    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    pub fn api(&self) -> Api {
        self.api
    }

    pub fn ca_pem(&self) -> Option<&str> {
        self.certs.as_ref().map(|c| c.ca_pem.as_str())
    }

    pub fn certs(&self) -> Option<&SimCerts> {
        self.certs.as_ref()
    }

    /// Client settings that reach this simulator (TLS verified against its
    /// CA by the name `localhost`).
    pub fn gateway_settings(&self) -> GatewaySettings {
        let tls = self.certs.as_ref().map(|c| TlsSettings {
            ca_pem: c.ca_pem.clone().into_bytes(),
            server_name: Some("localhost".into()),
        });
        GatewaySettings::new(self.addr.to_string(), tls, self.api)
    }

    pub fn device_ids(&self) -> Vec<u32> {
        self.shared.model().device_ids()
    }

    /// Runs `f` on the model under its lock (for assertions and rare
    /// controls not wrapped below).
    pub fn with_model<R>(&self, f: impl FnOnce(&mut model::Model) -> R) -> R {
        f(&mut self.shared.model())
    }

    // ---- controls ---------------------------------------------------------

    /// Enrolls (or re-enrolls) a generated user at the device itself.
    pub fn enroll_on_device(&self, device: u32, user: &str) -> Result<u32, SimError> {
        self.control(|m| m.device_enroll(device, user))
    }

    pub fn update_on_device(&self, device: u32, user: &str) -> Result<u32, SimError> {
        self.control(|m| m.device_update(device, user))
    }

    pub fn delete_on_device(&self, device: u32, user: &str) -> Result<u32, SimError> {
        self.control(|m| m.device_delete(device, user))
    }

    pub fn delete_all_on_device(&self, device: u32) -> Result<u32, SimError> {
        self.control(|m| m.device_delete_all(device))
    }

    /// Stores an arbitrary raw record as if enrolled at the device.
    pub fn put_raw_on_device(&self, device: u32, raw: Vec<u8>) -> Result<u32, SimError> {
        self.control(|m| m.device_put_raw(device, raw))
    }

    pub fn event_on_device(&self, device: u32, code: u32, user: &str) -> Result<u32, SimError> {
        self.control(|m| m.device_event(device, code, user))
    }

    /// Appends `n` non-user events with `code` (e.g.
    /// [`codes::VERIFY_SUCCESS`]) to a device's log under one lock: bulk
    /// history for benchmarks (raise `log_capacity` to keep them all; a
    /// million records take 32–64 MB). They are real events: if the device is
    /// monitored, realtime subscribers get them too, and drop what their
    /// queue cannot hold (B10). Returns the first and last event ID.
    pub fn append_events(&self, device: u32, n: u32, code: u32) -> Result<(u32, u32), SimError> {
        self.control(|m| m.append_events(device, n, code))
    }

    /// Sets a device's clock `secs` off the machine's (positive: ahead);
    /// its events carry that time.
    pub fn set_clock_offset(&self, device: u32, secs: i64) {
        self.shared.model().set_clock_offset(device, secs);
    }

    /// Takes a device off the network at once.
    pub fn set_offline(&self, device: u32) -> Result<(), SimError> {
        self.control(|m| m.set_online(device, false))
    }

    /// Brings a device back; the gateway reconnects it after the reconnect
    /// delay.
    pub fn set_online(&self, device: u32) -> Result<(), SimError> {
        if !self.shared.model().device_ids().contains(&device) {
            return Err(SimError::Control(format!("no device {device}")));
        }
        self.shared.schedule_reconnect(vec![device]);
        Ok(())
    }

    /// `device` stops answering commands (`true`) or answers again
    /// (`false`): calls that address it wait meanwhile, its link stays up
    /// and it keeps logging. A real gateway would end such calls after its
    /// command timeout (B27); here they wait until released or cancelled.
    pub fn hold_device(&self, device: u32, on: bool) {
        self.shared.model().set_held(device, on);
        if !on {
            self.shared.released.notify_waiters();
        }
    }

    /// Calls now waiting on a held device.
    pub fn held_calls(&self, device: u32) -> usize {
        self.shared.model().held_calls(device)
    }

    /// One device's event log capacity from now on; shrinking drops the
    /// oldest records, as overwriting would.
    pub fn set_log_capacity(&self, device: u32, capacity: usize) {
        self.shared.model().set_log_capacity(device, capacity);
    }

    /// Drops this fraction (0–1) of the realtime events of `device` (all
    /// devices if `None`) before they reach subscribers.
    pub fn drop_realtime(&self, device: Option<u32>, fraction: f64) {
        self.shared.model().set_drop_fraction(device, fraction);
    }

    /// Breaks the GetLog answers of `device` (every device if `None`):
    /// duplicated records, descending order, or far more records than
    /// asked for (see [`LogFault`]).
    pub fn set_log_fault(&self, device: Option<u32>, fault: LogFault) {
        self.shared.model().set_log_fault(device, fault);
    }

    /// Stalls the realtime streams open now: they stay open but carry
    /// nothing until `stall_realtime(false)` (see [`model::Model::stall_realtime`]).
    pub fn stall_realtime(&self, on: bool) {
        self.shared.model().stall_realtime(on);
    }

    /// Stores a record that does not decode under `user` at the device and
    /// logs a user-update event for it (see [`model::Model::device_corrupt`]).
    pub fn corrupt_on_device(&self, device: u32, user: &str) -> Result<u32, SimError> {
        self.control(|m| m.device_corrupt(device, user))
    }

    /// The next `n` Multi calls that include `device` fail for it with a
    /// transient error.
    pub fn fail_next_multi(&self, device: u32, n: u32) {
        self.shared.model().fail_next_multi(device, n);
    }

    /// `device` permanently refuses to store `user` (e.g. cannot store its
    /// face), until [`Self::accept`].
    pub fn reject(&self, device: u32, user: &str) {
        self.shared.model().reject(device, user, true);
    }

    pub fn accept(&self, device: u32, user: &str) {
        self.shared.model().reject(device, user, false);
    }

    pub fn clear_log(&self, device: u32) -> Result<(), SimError> {
        self.control(|m| m.clear_device_log(device))
    }

    /// Factory reset: users and log gone, event IDs restart, the device
    /// reboots and is reconnected after the reconnect delay.
    pub fn factory_reset(&self, device: u32) -> Result<(), SimError> {
        self.control(|m| m.factory_reset(device))?;
        self.shared.schedule_reconnect(vec![device]);
        Ok(())
    }

    /// Database reset without a reboot: users and log gone, event IDs
    /// restart, the device stays connected and monitored.
    pub fn database_reset(&self, device: u32) -> Result<(), SimError> {
        self.control(|m| m.database_reset(device))
    }

    /// Delays every call of `method` (e.g. "EnrollMulti") by `delay`.
    pub fn set_latency(&self, method: &str, delay: Duration) {
        let mut m = self.shared.model();
        if delay.is_zero() {
            m.latency.remove(method);
        } else {
            m.latency.insert(method.to_owned(), delay);
        }
    }

    /// Switches the answers to WIRE.md's open questions. Calls already
    /// under way keep the answer they started with (a lazy stream that is
    /// waiting for its first message stays lazy).
    pub fn set_policies(&self, policies: Policies) {
        self.shared.model().policies = policies;
    }

    pub fn policies(&self) -> Policies {
        self.shared.model().policies
    }

    /// Lazy or eager response headers for streams opened from now on.
    pub fn set_stream_headers(&self, headers: StreamHeaders) {
        self.shared.model().policies.stream_headers = headers;
    }

    /// How long every device takes to answer a command the gateway relays
    /// (added once per call, on top of [`Self::set_latency`]).
    pub fn set_device_latency(&self, delay: Duration) {
        self.shared.model().device_latency = delay;
    }

    pub fn device_latency(&self) -> Duration {
        self.shared.model().device_latency
    }

    /// Whether the next [`Self::restart`] registers every device again, as
    /// if the gateway kept its async connections.
    pub fn set_preconnect(&self, on: bool) {
        self.shared.model().set_preconnect(on);
    }

    pub fn preconnect(&self) -> bool {
        self.shared.model().preconnect()
    }

    /// Presents a card at the device for the next Card.Scan.
    pub fn present_card(&self, device: u32, card: CsnCardData) {
        self.shared
            .model()
            .cards
            .entry(device)
            .or_default()
            .push_back(card);
        self.shared.card_presented.notify_waiters();
    }

    pub fn set_auto_card(&self, on: bool) {
        self.shared.model().auto_card = on;
    }

    /// While muted, status changes are lost before they reach the status
    /// streams; GetDeviceList still tells the truth.
    pub fn mute_status(&self, muted: bool) {
        self.shared.model().status_muted = muted;
    }

    /// Ends every open realtime and status stream with `status`.
    pub fn break_streams(&self, status: &tonic::Status) {
        self.shared.model().break_streams(status);
    }

    pub fn rpc_log(&self) -> Vec<RpcRecord> {
        self.shared.model().rpc_log()
    }

    pub fn clear_rpc_log(&self) {
        self.shared.model().clear_rpc_log();
    }

    /// A copy of a device's whole user table (see [`Self::holds`] and
    /// [`Self::user_bytes`] for cheap checks).
    pub fn users(&self, device: u32) -> BTreeMap<String, Vec<u8>> {
        self.shared.model().users(device)
    }

    /// A counter that changes every time any device's user table does
    /// (enroll, update, delete, delete-all, resets; through the API or at
    /// the device): `changed().await` instead of polling.
    pub fn users_changed(&self) -> watch::Receiver<u64> {
        self.shared.model().users_changed()
    }

    /// Whether `device` stores `user`.
    pub fn holds(&self, device: u32, user: &str) -> bool {
        self.shared.model().holds(device, user)
    }

    /// Whether `device` stores `user` with exactly the bytes `raw`.
    pub fn holds_exactly(&self, device: u32, user: &str, raw: &[u8]) -> bool {
        self.shared.model().holds_exactly(device, user, raw)
    }

    /// The raw record of one user, if stored.
    pub fn user_bytes(&self, device: u32, user: &str) -> Option<Vec<u8>> {
        self.shared.model().user_bytes(device, user)
    }

    pub fn user_count(&self, device: u32) -> usize {
        self.shared.model().user_count(device)
    }

    /// A copy of a device's whole log.
    pub fn log(&self, device: u32) -> Vec<EventLog> {
        self.shared.model().log(device)
    }

    /// The newest `n` records of a device's log, oldest first.
    pub fn log_tail(&self, device: u32, n: usize) -> Vec<EventLog> {
        self.shared.model().log_tail(device, n)
    }

    pub fn newest_event_id(&self, device: u32) -> Option<u32> {
        self.shared.model().newest_event_id(device)
    }

    pub fn is_connected(&self, device: u32) -> bool {
        self.shared.model().is_connected(device)
    }

    pub fn is_monitoring(&self, device: u32) -> bool {
        self.shared.model().is_monitoring(device)
    }

    pub fn realtime_stats(&self) -> RealtimeStats {
        self.shared.model().realtime_stats()
    }

    fn control<R>(
        &self,
        f: impl FnOnce(&mut model::Model) -> Result<R, String>,
    ) -> Result<R, SimError> {
        f(&mut self.shared.model()).map_err(SimError::Control)
    }
}

fn sized<T>(s: ConnectServer<T>) -> ConnectServer<T>
where
    T: crate::proto::gsdk::connect::connect_server::Connect,
{
    s.max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn sized_event<T>(s: EventServer<T>) -> EventServer<T>
where
    T: crate::proto::gsdk::event::event_server::Event,
{
    s.max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn sized_user<T>(s: UserServer<T>) -> UserServer<T>
where
    T: crate::proto::gsdk::user::user_server::User,
{
    s.max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Binds with SO_REUSEADDR so a restart can take the same port again while
/// old connections linger in TIME_WAIT.
fn bind(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A server-side connection that fails all I/O once its generation is
/// cancelled, so a simulated gateway restart really cuts every connection
/// (tonic spawns connection tasks that outlive the accept loop).
struct KillableIo {
    inner: TcpStream,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl KillableIo {
    fn new(inner: TcpStream, token: CancellationToken) -> Self {
        // serve_with_incoming ignores the builder's TCP settings; without
        // this, Nagle and delayed ACKs add ~40 ms to small answers.
        if let Err(e) = inner.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        KillableIo {
            inner,
            killed: Box::pin(token.cancelled_owned()),
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.killed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "simulated gateway stopped",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

use std::future::Future;

impl AsyncRead for KillableIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for KillableIo {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
