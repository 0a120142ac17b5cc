//! The simulator's gRPC services: thin adapters that record each call, apply
//! injected latency, and run it against the [`Model`].

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::model::{Model, RpcRecord};
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
            reconnect_delay,
            scan_timeout,
        })
    }

    /// Locks the model. A panic while it was held cannot leave it half
    /// updated in a way worse than the panic itself, so poisoning is ignored.
    pub fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the call and waits for its injected latency.
    async fn enter(&self, rec: RpcRecord) {
        let delay = {
            let mut m = self.model();
            let d = m.latency.get(rec.method).copied();
            m.record(rec);
            d
        };
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
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
        let rx = self.0.model().subscribe_status(queue);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
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
        self.0.enter(rec("EnableMonitoring", &[id])).await;
        self.0.model().set_monitoring(id, true)?;
        Ok(Response::new(pe::EnableMonitoringResponse {}))
    }

    async fn enable_monitoring_multi(
        &self,
        request: Request<pe::EnableMonitoringMultiRequest>,
    ) -> Result<Response<pe::EnableMonitoringMultiResponse>, Status> {
        let ids = request.into_inner().device_i_ds;
        self.0.enter(rec("EnableMonitoringMulti", &ids)).await;
        self.0.model().set_monitoring_multi(&ids, true)?;
        Ok(Response::new(pe::EnableMonitoringMultiResponse::default()))
    }

    async fn disable_monitoring(
        &self,
        request: Request<pe::DisableMonitoringRequest>,
    ) -> Result<Response<pe::DisableMonitoringResponse>, Status> {
        let id = request.into_inner().device_id;
        self.0.enter(rec("DisableMonitoring", &[id])).await;
        self.0.model().set_monitoring(id, false)?;
        Ok(Response::new(pe::DisableMonitoringResponse {}))
    }

    async fn disable_monitoring_multi(
        &self,
        request: Request<pe::DisableMonitoringMultiRequest>,
    ) -> Result<Response<pe::DisableMonitoringMultiResponse>, Status> {
        let ids = request.into_inner().device_i_ds;
        self.0.enter(rec("DisableMonitoringMulti", &ids)).await;
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
        let rx =
            self.0
                .model()
                .subscribe_realtime(req.queue_size, &req.device_i_ds, &req.event_codes);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_log(
        &self,
        request: Request<pe::GetLogRequest>,
    ) -> Result<Response<pe::GetLogResponse>, Status> {
        let req = request.into_inner();
        self.0
            .enter(RpcRecord {
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
        self.0.enter(rec("ClearLog", &[id])).await;
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
        self.0.enter(rec("GetList", &[id])).await;
        let hdrs = self.0.model().user_headers(id)?;
        Ok(Response::new(pu::GetListResponse { hdrs }))
    }

    async fn get(
        &self,
        request: Request<pu::GetRequest>,
    ) -> Result<Response<pu::GetResponse>, Status> {
        let req = request.into_inner();
        self.0
            .enter(rec_users("Get", &[req.device_id], req.user_i_ds.clone()))
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
            .enter(rec_users("Enroll", &[req.device_id], raw_ids(&req.users)))
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
            .enter(rec_users(
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
            .enter(rec_users("Delete", &[req.device_id], req.user_i_ds.clone()))
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
            .enter(rec_users(
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
        self.0.enter(rec("DeleteAll", &[id])).await;
        self.0.model().delete_all(id)?;
        Ok(Response::new(pu::DeleteAllResponse {}))
    }

    async fn delete_all_multi(
        &self,
        request: Request<pu::DeleteAllMultiRequest>,
    ) -> Result<Response<pu::DeleteAllMultiResponse>, Status> {
        let ids = request.into_inner().device_i_ds;
        self.0.enter(rec("DeleteAllMulti", &ids)).await;
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
        self.0.enter(rec("Scan", &[id])).await;
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
