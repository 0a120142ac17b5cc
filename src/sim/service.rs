//! The simulator's gRPC services: thin adapters that record each call, apply
//! injected latency (per method, plus the device latency for calls the
//! gateway relays to devices), open streams with lazy or eager headers, and
//! run the call against the [`Model`].

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::model::{Model, RpcRecord, StreamHeaders};
use crate::proto::gsdk::admin::{GetInfoRequest, GetInfoResponse, admin_server::Admin};
use crate::proto::gsdk::card::{
    CardData, ScanRequest, ScanResponse, Type as CardType, card_server::Card,
};
use crate::proto::gsdk::connect::{self as pc, connect_server::Connect};
use crate::proto::gsdk::event::{self as pe, event_server::Event};
use crate::proto::gsdk::user::{self as pu, user_server::User};

/// State shared by the services and the control handle.
pub struct Shared {
    model: Mutex<Model>,
    /// Wakes Card.Scan callers when a card is presented.
    pub(crate) card_presented: Notify,
    /// Wakes calls waiting on held devices when one is released.
    pub(crate) released: Notify,
    /// How long the gateway waits before it reconnects a device that came
    /// back (`device_server.reconnect_interval`, WIRE.md B14).
    pub(crate) reconnect_delay: Duration,
    /// How long Card.Scan waits for a card (`input_cmd`, WIRE.md B27).
    pub(crate) scan_timeout: Duration,
}

impl Shared {
    pub fn new(model: Model, reconnect_delay: Duration, scan_timeout: Duration) -> Arc<Self> {
        Arc::new(Shared {
            model: Mutex::new(model),
            card_presented: Notify::new(),
            released: Notify::new(),
            reconnect_delay,
            scan_timeout,
        })
    }

    /// Locks the model. A panic while it was held cannot leave it half
    /// updated in a way worse than the panic itself, so poisoning is ignored.
    pub fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a call the gateway answers itself and waits for its
    /// injected latency.
    async fn enter(&self, rec: RpcRecord) {
        self.enter_as(rec, Reach::Gateway).await;
    }

    /// Records a call the gateway relays to the devices it names and waits
    /// for its injected latency plus the device latency: once per call, as
    /// a Multi call runs on its devices in parallel (WIRE.md B22).
    async fn enter_devices(&self, rec: RpcRecord) {
        self.enter_as(rec, Reach::Devices).await;
    }

    async fn enter_as(&self, rec: RpcRecord, reach: Reach) {
        let devices = match reach {
            Reach::Gateway => Vec::new(),
            Reach::Devices => rec.device_ids.clone(),
        };
        let delay = {
            let mut m = self.model();
            let method = m.latency.get(rec.method).copied().unwrap_or_default();
            let device = match reach {
                Reach::Gateway => Duration::ZERO,
                Reach::Devices => m.device_latency,
            };
            m.record(rec);
            method + device
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.wait_while_held(&devices).await;
    }

    /// Waits while any of `devices` is held (see [`Model::set_held`]).
    async fn wait_while_held(&self, devices: &[u32]) {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the check, so a release in between wakes it.
            released.as_mut().enable();
            let held: Vec<u32> = {
                let m = self.model();
                devices.iter().copied().filter(|d| m.is_held(*d)).collect()
            };
            if held.is_empty() {
                return;
            }
            let _waiting = HeldCall::new(self, held);
            released.await;
        }
    }

    /// Brings devices back after the reconnect delay, as the gateway's async
    /// connection does.
    pub(crate) fn schedule_reconnect(self: &Arc<Self>, ids: Vec<u32>) {
        if ids.is_empty() {
            return;
        }
        let delay = self.reconnect_delay;
        if delay.is_zero() {
            let mut m = self.model();
            for id in ids {
                m.reconnect(id);
            }
            return;
        }
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut m = shared.model();
            for id in ids {
                m.reconnect(id);
            }
        });
    }
}

/// Counts a call as waiting on held devices while it lives (a cancelled
/// call stops counting).
struct HeldCall<'a> {
    shared: &'a Shared,
    devices: Vec<u32>,
}

impl<'a> HeldCall<'a> {
    fn new(shared: &'a Shared, devices: Vec<u32>) -> Self {
        shared.model().count_held_call(&devices, true);
        HeldCall { shared, devices }
    }
}

impl Drop for HeldCall<'_> {
    fn drop(&mut self) {
        self.shared.model().count_held_call(&self.devices, false);
    }
}

/// Who answers a call.
#[derive(Debug, Clone, Copy)]
enum Reach {
    /// The gateway, from its own state (device list, streams, version).
    Gateway,
    /// The devices the call names, through the gateway.
    Devices,
}

fn rec(method: &'static str, devices: &[u32]) -> RpcRecord {
    RpcRecord {
        device_ids: devices.to_vec(),
        ..RpcRecord::new(method)
    }
}

fn rec_users(method: &'static str, devices: &[u32], users: Vec<String>) -> RpcRecord {
    RpcRecord {
        device_ids: devices.to_vec(),
        user_ids: users,
        ..RpcRecord::new(method)
    }
}

fn raw_ids(users: &[Vec<u8>]) -> Vec<String> {
    users
        .iter()
        .map(|u| crate::wire::peek_user_id(u).unwrap_or_else(|_| "?".into()))
        .collect()
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Answers a streaming call whose subscription is already registered (its
/// sender is in the model). Eager: the response (headers) goes out at once.
/// Lazy (WIRE.md §5.14): only with the first item, as grpc-go servers do;
/// an error before it ends the call with that status. Never: no answer at
/// all (hostile). While a lazy call
/// waits, the receiver lives in this future: if the client goes away, the
/// server drops the future, the receiver with it, and the model forgets the
/// closed sender on its next delivery.
async fn open_stream<T: Send + 'static>(
    headers: StreamHeaders,
    mut rx: mpsc::Receiver<Result<T, Status>>,
) -> Result<Response<BoxStream<T>>, Status> {
    let stream: BoxStream<T> = match headers {
        StreamHeaders::Eager => Box::pin(ReceiverStream::new(rx)),
        StreamHeaders::Lazy => match rx.recv().await {
            Some(Ok(first)) => {
                Box::pin(tokio_stream::once(Ok(first)).chain(ReceiverStream::new(rx)))
            }
            Some(Err(status)) => return Err(status),
            // The gateway ended the subscription (a restart) before anything
            // was sent.
            None => Box::pin(tokio_stream::empty()),
        },
        StreamHeaders::Never => {
            // The subscription stays registered (its queue fills, then
            // drops) while the call waits for nothing, until the client
            // goes away and the server drops this future.
            let _registered = rx;
            return std::future::pending().await;
        }
    };
    Ok(Response::new(stream))
}

/// Connect service.
#[derive(Clone)]
pub struct ConnectSvc(pub Arc<Shared>);

#[tonic::async_trait]
impl Connect for ConnectSvc {
    async fn connect(
        &self,
        request: Request<pc::ConnectRequest>,
    ) -> Result<Response<pc::ConnectResponse>, Status> {
        self.0.enter(rec("Connect", &[])).await;
        let info = request.into_inner().connect_info.unwrap_or_default();
        Err(Status::unimplemented(format!(
            "synchronous Connect to {}:{} is not simulated; use AddAsyncConnection",
            info.ip_addr, info.port
        )))
    }

    async fn add_async_connection(
        &self,
        request: Request<pc::AddAsyncConnectionRequest>,
    ) -> Result<Response<pc::AddAsyncConnectionResponse>, Status> {
        let infos = request.into_inner().connect_infos;
        let ids: Vec<u32> = infos.iter().map(|i| i.device_id).collect();
        self.0.enter(rec("AddAsyncConnection", &ids)).await;
        self.0.model().add_async(infos);
        Ok(Response::new(pc::AddAsyncConnectionResponse {}))
    }

    async fn delete_async_connection(
        &self,
        request: Request<pc::DeleteAsyncConnectionRequest>,
    ) -> Result<Response<pc::DeleteAsyncConnectionResponse>, Status> {
        let ids = request.into_inner().device_i_ds;
        self.0.enter(rec("DeleteAsyncConnection", &ids)).await;
        self.0.model().delete_async(&ids);
        Ok(Response::new(pc::DeleteAsyncConnectionResponse {}))
    }

    async fn get_device_list(
        &self,
        _request: Request<pc::GetDeviceListRequest>,
    ) -> Result<Response<pc::GetDeviceListResponse>, Status> {
        self.0.enter(rec("GetDeviceList", &[])).await;
        let device_infos = self.0.model().device_list();
        Ok(Response::new(pc::GetDeviceListResponse { device_infos }))
    }

    async fn disconnect(
        &self,
        request: Request<pc::DisconnectRequest>,
    ) -> Result<Response<pc::DisconnectResponse>, Status> {
        let ids = request.into_inner().device_i_ds;
        self.0.enter(rec("Disconnect", &ids)).await;
        let dropped = self.0.model().disconnect(&ids);
        self.0.schedule_reconnect(dropped);
        Ok(Response::new(pc::DisconnectResponse {}))
    }

    type SubscribeStatusStream = BoxStream<pc::StatusChange>;

    async fn subscribe_status(
        &self,
        request: Request<pc::SubscribeStatusRequest>,
    ) -> Result<Response<Self::SubscribeStatusStream>, Status> {
        let queue = request.into_inner().queue_size;
        self.0.enter(rec("SubscribeStatus", &[])).await;
        let (headers, rx) = {
            let mut m = self.0.model();
            (m.policies.stream_headers, m.subscribe_status(queue))
        };
        open_stream(headers, rx).await
    }
}

/// Event service.
#[derive(Clone)]
pub struct EventSvc(pub Arc<Shared>);

#[tonic::async_trait]
impl Event for EventSvc {
    async fn enable_monitoring(
        &self,
        request: Request<pe::EnableMonitoringRequest>,
    ) -> Result<Response<pe::EnableMonitoringResponse>, Status> {
        let id = request.into_inner().device_id;
        self.0.enter_devices(rec("EnableMonitoring", &[id])).await;
        self.0.model().set_monitoring(id, true)?;
        Ok(Response::new(pe::EnableMonitoringResponse {}))
    }

    async fn enable_monitoring_multi(
        &self,
        request: Request<pe::EnableMonitoringMultiRequest>,
    ) -> Result<Response<pe::EnableMonitoringMultiResponse>, Status> {
        let ids = request.into_inner().device_i_ds;
        self.0
            .enter_devices(rec("EnableMonitoringMulti", &ids))
            .await;
        self.0.model().set_monitoring_multi(&ids, true)?;
        Ok(Response::new(pe::EnableMonitoringMultiResponse::default()))
    }

    async fn disable_monitoring(
        &self,
        request: Request<pe::DisableMonitoringRequest>,
    ) -> Result<Response<pe::DisableMonitoringResponse>, Status> {
        let id = request.into_inner().device_id;
        self.0.enter_devices(rec("DisableMonitoring", &[id])).await;
        self.0.model().set_monitoring(id, false)?;
        Ok(Response::new(pe::DisableMonitoringResponse {}))
    }

    async fn disable_monitoring_multi(
        &self,
        request: Request<pe::DisableMonitoringMultiRequest>,
    ) -> Result<Response<pe::DisableMonitoringMultiResponse>, Status> {
        let ids = request.into_inner().device_i_ds;
        self.0
            .enter_devices(rec("DisableMonitoringMulti", &ids))
            .await;
        self.0.model().set_monitoring_multi(&ids, false)?;
        Ok(Response::new(pe::DisableMonitoringMultiResponse::default()))
    }

    type SubscribeRealtimeLogStream = BoxStream<pe::EventLog>;

    async fn subscribe_realtime_log(
        &self,
        request: Request<pe::SubscribeRealtimeLogRequest>,
    ) -> Result<Response<Self::SubscribeRealtimeLogStream>, Status> {
        let req = request.into_inner();
        self.0
            .enter(rec("SubscribeRealtimeLog", &req.device_i_ds))
            .await;
        let (headers, rx) = {
            let mut m = self.0.model();
            let rx = m.subscribe_realtime(req.queue_size, &req.device_i_ds, &req.event_codes);
            (m.policies.stream_headers, rx)
        };
        open_stream(headers, rx).await
    }

    async fn get_log(
        &self,
        request: Request<pe::GetLogRequest>,
    ) -> Result<Response<pe::GetLogResponse>, Status> {
        let req = request.into_inner();
        self.0
            .enter_devices(RpcRecord {
                start_event_id: Some(req.start_event_id),
                max: Some(req.max_num_of_log),
                ..rec("GetLog", &[req.device_id])
            })
            .await;
        let events =
            self.0
                .model()
                .get_log(req.device_id, req.start_event_id, req.max_num_of_log)?;
        Ok(Response::new(pe::GetLogResponse { events }))
    }

    async fn clear_log(
        &self,
        request: Request<pe::ClearLogRequest>,
    ) -> Result<Response<pe::ClearLogResponse>, Status> {
        let id = request.into_inner().device_id;
        self.0.enter_devices(rec("ClearLog", &[id])).await;
        let mut m = self.0.model();
        if !m.is_connected(id) {
            return Err(Status::unavailable(format!("device {id} is not connected")));
        }
        m.clear_log(id)?;
        Ok(Response::new(pe::ClearLogResponse {}))
    }
}

/// User service.
#[derive(Clone)]
pub struct UserSvc(pub Arc<Shared>);

#[tonic::async_trait]
impl User for UserSvc {
    async fn get_list(
        &self,
        request: Request<pu::GetListRequest>,
    ) -> Result<Response<pu::GetListResponse>, Status> {
        let id = request.into_inner().device_id;
        self.0.enter_devices(rec("GetList", &[id])).await;
        let hdrs = self.0.model().user_headers(id)?;
        Ok(Response::new(pu::GetListResponse { hdrs }))
    }

    async fn get(
        &self,
        request: Request<pu::GetRequest>,
    ) -> Result<Response<pu::GetResponse>, Status> {
        let req = request.into_inner();
        self.0
            .enter_devices(rec_users("Get", &[req.device_id], req.user_i_ds.clone()))
            .await;
        let users = self.0.model().user_get(req.device_id, &req.user_i_ds)?;
        Ok(Response::new(pu::GetResponse { users }))
    }

    async fn enroll(
        &self,
        request: Request<pu::EnrollRequest>,
    ) -> Result<Response<pu::EnrollResponse>, Status> {
        let req = request.into_inner();
        self.0
            .enter_devices(rec_users("Enroll", &[req.device_id], raw_ids(&req.users)))
            .await;
        self.0
            .model()
            .enroll(req.device_id, &req.users, req.overwrite)?;
        Ok(Response::new(pu::EnrollResponse {}))
    }

    async fn enroll_multi(
        &self,
        request: Request<pu::EnrollMultiRequest>,
    ) -> Result<Response<pu::EnrollMultiResponse>, Status> {
        let req = request.into_inner();
        self.0
            .enter_devices(rec_users(
                "EnrollMulti",
                &req.device_i_ds,
                raw_ids(&req.users),
            ))
            .await;
        self.0
            .model()
            .enroll_multi(&req.device_i_ds, &req.users, req.overwrite)?;
        Ok(Response::new(pu::EnrollMultiResponse::default()))
    }

    async fn delete(
        &self,
        request: Request<pu::DeleteRequest>,
    ) -> Result<Response<pu::DeleteResponse>, Status> {
        let req = request.into_inner();
        self.0
            .enter_devices(rec_users("Delete", &[req.device_id], req.user_i_ds.clone()))
            .await;
        self.0.model().delete(req.device_id, &req.user_i_ds)?;
        Ok(Response::new(pu::DeleteResponse {}))
    }

    async fn delete_multi(
        &self,
        request: Request<pu::DeleteMultiRequest>,
    ) -> Result<Response<pu::DeleteMultiResponse>, Status> {
        let req = request.into_inner();
        self.0
            .enter_devices(rec_users(
                "DeleteMulti",
                &req.device_i_ds,
                req.user_i_ds.clone(),
            ))
            .await;
        self.0
            .model()
            .delete_multi(&req.device_i_ds, &req.user_i_ds)?;
        Ok(Response::new(pu::DeleteMultiResponse::default()))
    }

    async fn delete_all(
        &self,
        request: Request<pu::DeleteAllRequest>,
    ) -> Result<Response<pu::DeleteAllResponse>, Status> {
        let id = request.into_inner().device_id;
        self.0.enter_devices(rec("DeleteAll", &[id])).await;
        self.0.model().delete_all(id)?;
        Ok(Response::new(pu::DeleteAllResponse {}))
    }

    async fn delete_all_multi(
        &self,
        request: Request<pu::DeleteAllMultiRequest>,
    ) -> Result<Response<pu::DeleteAllMultiResponse>, Status> {
        let ids = request.into_inner().device_i_ds;
        self.0.enter_devices(rec("DeleteAllMulti", &ids)).await;
        self.0.model().delete_all_multi(&ids)?;
        Ok(Response::new(pu::DeleteAllMultiResponse::default()))
    }
}

/// Card service (Scan only).
#[derive(Clone)]
pub struct CardSvc(pub Arc<Shared>);

#[tonic::async_trait]
impl Card for CardSvc {
    async fn scan(&self, request: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let id = request.into_inner().device_id;
        self.0.enter_devices(rec("Scan", &[id])).await;
        let deadline = tokio::time::Instant::now() + self.0.scan_timeout;
        loop {
            let notified = self.0.card_presented.notified();
            if let Some(card) = self.0.model().take_card(id)? {
                return Ok(Response::new(ScanResponse {
                    card_data: Some(CardData {
                        r#type: CardType::CardTypeCsn as i32,
                        csn_card_data: Some(card),
                        smart_card_data: None,
                    }),
                }));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Status::deadline_exceeded(format!(
                    "no card presented at device {id}"
                )));
            }
        }
    }
}

/// Admin service (GetInfo only).
#[derive(Clone)]
pub struct AdminSvc(pub Arc<Shared>);

#[tonic::async_trait]
impl Admin for AdminSvc {
    async fn get_info(
        &self,
        _request: Request<GetInfoRequest>,
    ) -> Result<Response<GetInfoResponse>, Status> {
        self.0.enter(rec("GetInfo", &[])).await;
        let api = self.0.model().api();
        Ok(Response::new(GetInfoResponse {
            version: format!("v{}", api.nominal_version()),
            build_date: "2025-05-29".into(),
        }))
    }
}
