//! Thin typed wrappers, one per gateway RPC the daemon and the operator
//! commands use. Each unary call carries a deadline (sent as `grpc-timeout`
//! and enforced locally); failures come back as [`GatewayError`], with Multi
//! errors decoded. Users travel as [`UserRecord`]s: opaque bytes plus the
//! peeked ID.

use std::future::Future;
use std::time::Duration;

use tonic::Streaming;

use super::channel::{GatewayChannel, GatewaySettings, MAX_MESSAGE_BYTES, connect_lazy};
use super::error::GatewayError;
use crate::proto::gsdk::admin::{GetInfoRequest, admin_client::AdminClient};
use crate::proto::gsdk::card::{CardData, ScanRequest, card_client::CardClient};
use crate::proto::gsdk::connect::{
    AddAsyncConnectionRequest, AsyncConnectInfo, DeleteAsyncConnectionRequest, DeviceInfo,
    DisconnectRequest, GetDeviceListRequest, StatusChange, SubscribeStatusRequest,
    connect_client::ConnectClient,
};
use crate::proto::gsdk::event::{
    DisableMonitoringMultiRequest, DisableMonitoringRequest, EnableMonitoringMultiRequest,
    EnableMonitoringRequest, EventLog, GetLogRequest, SubscribeRealtimeLogRequest,
    event_client::EventClient,
};
use crate::proto::gsdk::user::{
    DeleteAllMultiRequest, DeleteMultiRequest, DeleteRequest, EnrollMultiRequest, EnrollRequest,
    GetListRequest, GetRequest, user_client::UserClient,
};
use crate::wire::{Api, UserRecord, peek_hdr_id};

/// The gateway's version as `Admin.GetInfo` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayInfo {
    pub version: String,
    pub build_date: String,
}

/// What `User.GetList` answered.
#[derive(Debug, Clone, Default)]
pub struct UserList {
    pub ids: Vec<String>,
    /// Headers that did not decode (no usable ID): users the device holds
    /// that cannot be named.
    pub unreadable: usize,
}

/// What `User.Get` answered.
#[derive(Debug, Clone, Default)]
pub struct UserAnswer {
    pub users: Vec<UserRecord>,
    /// Records that did not decode (no usable ID).
    pub unreadable: usize,
}

/// One cheaply clonable handle on the gateway channel.
#[derive(Clone)]
pub struct GatewayClient {
    connect: ConnectClient<GatewayChannel>,
    event: EventClient<GatewayChannel>,
    user: UserClient<GatewayChannel>,
    card: CardClient<GatewayChannel>,
    admin: AdminClient<GatewayChannel>,
    call_timeout: Duration,
    input_timeout: Duration,
    api: Api,
}

macro_rules! sized {
    ($client:ident, $ch:expr) => {
        $client::new($ch.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    };
}

impl GatewayClient {
    /// Creates the client; the channel dials lazily (see [`connect_lazy`]).
    pub fn new(settings: &GatewaySettings) -> Result<Self, GatewayError> {
        let ch = connect_lazy(settings)?;
        Ok(GatewayClient {
            connect: sized!(ConnectClient, ch),
            event: sized!(EventClient, ch),
            user: sized!(UserClient, ch),
            card: sized!(CardClient, ch),
            admin: sized!(AdminClient, ch),
            call_timeout: settings.call_timeout,
            input_timeout: settings.input_timeout,
            api: settings.api,
        })
    }

    pub fn api(&self) -> Api {
        self.api
    }

    // ---- Connect -------------------------------------------------------

    pub async fn add_async_connection(
        &self,
        infos: Vec<AsyncConnectInfo>,
    ) -> Result<(), GatewayError> {
        let mut c = self.connect.clone();
        let req = AddAsyncConnectionRequest {
            connect_infos: infos,
        };
        self.unary(
            "AddAsyncConnection",
            self.call_timeout,
            req,
            |r| async move { c.add_async_connection(r).await },
        )
        .await
        .map(drop)
    }

    pub async fn delete_async_connection(&self, device_ids: Vec<u32>) -> Result<(), GatewayError> {
        let mut c = self.connect.clone();
        let req = DeleteAsyncConnectionRequest {
            device_i_ds: device_ids,
        };
        self.unary(
            "DeleteAsyncConnection",
            self.call_timeout,
            req,
            |r| async move { c.delete_async_connection(r).await },
        )
        .await
        .map(drop)
    }

    pub async fn get_device_list(&self) -> Result<Vec<DeviceInfo>, GatewayError> {
        let mut c = self.connect.clone();
        self.unary(
            "GetDeviceList",
            self.call_timeout,
            GetDeviceListRequest {},
            |r| async move { c.get_device_list(r).await },
        )
        .await
        .map(|r| r.device_infos)
    }

    pub async fn disconnect(&self, device_ids: Vec<u32>) -> Result<(), GatewayError> {
        let mut c = self.connect.clone();
        let req = DisconnectRequest {
            device_i_ds: device_ids,
        };
        self.unary("Disconnect", self.call_timeout, req, |r| async move {
            c.disconnect(r).await
        })
        .await
        .map(drop)
    }

    /// Opens the status stream (see `open_stream`: may wait for the first
    /// change).
    pub async fn subscribe_status(
        &self,
        queue_size: i32,
    ) -> Result<Streaming<StatusChange>, GatewayError> {
        let mut c = self.connect.clone();
        let req = SubscribeStatusRequest { queue_size };
        self.open_stream(
            "SubscribeStatus",
            async move { c.subscribe_status(req).await },
        )
        .await
    }

    // ---- Event ---------------------------------------------------------

    pub async fn enable_monitoring(&self, device_id: u32) -> Result<(), GatewayError> {
        let mut c = self.event.clone();
        let req = EnableMonitoringRequest { device_id };
        self.unary("EnableMonitoring", self.call_timeout, req, |r| async move {
            c.enable_monitoring(r).await
        })
        .await
        .map(drop)
    }

    pub async fn enable_monitoring_multi(&self, device_ids: Vec<u32>) -> Result<(), GatewayError> {
        let mut c = self.event.clone();
        let req = EnableMonitoringMultiRequest {
            device_i_ds: device_ids,
        };
        self.unary(
            "EnableMonitoringMulti",
            self.call_timeout,
            req,
            |r| async move { c.enable_monitoring_multi(r).await },
        )
        .await
        .map(drop)
    }

    pub async fn disable_monitoring(&self, device_id: u32) -> Result<(), GatewayError> {
        let mut c = self.event.clone();
        let req = DisableMonitoringRequest { device_id };
        self.unary(
            "DisableMonitoring",
            self.call_timeout,
            req,
            |r| async move { c.disable_monitoring(r).await },
        )
        .await
        .map(drop)
    }

    pub async fn disable_monitoring_multi(&self, device_ids: Vec<u32>) -> Result<(), GatewayError> {
        let mut c = self.event.clone();
        let req = DisableMonitoringMultiRequest {
            device_i_ds: device_ids,
        };
        self.unary(
            "DisableMonitoringMulti",
            self.call_timeout,
            req,
            |r| async move { c.disable_monitoring_multi(r).await },
        )
        .await
        .map(drop)
    }

    /// Opens the realtime log stream for `device_ids` (empty = all devices)
    /// and `event_codes` (empty = all codes), WIRE.md B9.
    pub async fn subscribe_realtime_log(
        &self,
        queue_size: i32,
        device_ids: Vec<u32>,
        event_codes: Vec<u32>,
    ) -> Result<Streaming<EventLog>, GatewayError> {
        let mut c = self.event.clone();
        let req = SubscribeRealtimeLogRequest {
            queue_size,
            device_i_ds: device_ids,
            event_codes,
        };
        self.open_stream("SubscribeRealtimeLog", async move {
            c.subscribe_realtime_log(req).await
        })
        .await
    }

    /// Reads up to `max` records (0 = all) starting at `start_event_id`
    /// inclusive (0 = oldest), WIRE.md B1–B3.
    pub async fn get_log(
        &self,
        device_id: u32,
        start_event_id: u32,
        max: u32,
    ) -> Result<Vec<EventLog>, GatewayError> {
        let mut c = self.event.clone();
        let req = GetLogRequest {
            device_id,
            start_event_id,
            max_num_of_log: max,
        };
        self.unary("GetLog", self.call_timeout, req, |r| async move {
            c.get_log(r).await
        })
        .await
        .map(|r| r.events)
    }

    // ---- User ----------------------------------------------------------

    /// The IDs of the users stored on a device. A header without a usable ID
    /// is logged and skipped: use [`Self::user_ids_checked`] where a
    /// skipped header must not pass for a user the device does not have.
    pub async fn user_ids(&self, device_id: u32) -> Result<Vec<String>, GatewayError> {
        Ok(self.user_ids_checked(device_id).await?.ids)
    }

    /// Like [`Self::user_ids`], and says how many headers could not be
    /// read.
    pub async fn user_ids_checked(&self, device_id: u32) -> Result<UserList, GatewayError> {
        let mut c = self.user.clone();
        let req = GetListRequest { device_id };
        let resp = self
            .unary("GetList", self.call_timeout, req, |r| async move {
                c.get_list(r).await
            })
            .await?;
        let mut list = UserList {
            ids: Vec::with_capacity(resp.hdrs.len()),
            unreadable: 0,
        };
        for (i, hdr) in resp.hdrs.iter().enumerate() {
            match peek_hdr_id(hdr) {
                Ok(id) => list.ids.push(id),
                Err(e) => {
                    list.unreadable += 1;
                    tracing::warn!(device_id, index = i, error = %e, "GetList: user header skipped")
                }
            }
        }
        Ok(list)
    }

    /// Reads users as raw records. Unknown IDs are simply missing from the
    /// answer (some gateways omit them, others fail the call with NOT_FOUND,
    /// WIRE.md §5.3; callers handle both). Undecodable records are logged and
    /// skipped: use [`Self::user_get_checked`] where a skipped record must
    /// not pass for a missing user.
    pub async fn user_get(
        &self,
        device_id: u32,
        user_ids: Vec<String>,
    ) -> Result<Vec<UserRecord>, GatewayError> {
        Ok(self.user_get_checked(device_id, user_ids).await?.users)
    }

    /// Like [`Self::user_get`], and says how many records could not be
    /// read.
    pub async fn user_get_checked(
        &self,
        device_id: u32,
        user_ids: Vec<String>,
    ) -> Result<UserAnswer, GatewayError> {
        let mut c = self.user.clone();
        let req = GetRequest {
            device_id,
            user_i_ds: user_ids,
        };
        let resp = self
            .unary(
                "Get",
                self.call_timeout,
                req,
                |r| async move { c.get(r).await },
            )
            .await?;
        let mut answer = UserAnswer {
            users: Vec::with_capacity(resp.users.len()),
            unreadable: 0,
        };
        for (i, raw) in resp.users.into_iter().enumerate() {
            match UserRecord::from_raw(raw) {
                Ok(u) => answer.users.push(u),
                Err(e) => {
                    answer.unreadable += 1;
                    tracing::warn!(device_id, index = i, error = %e, "User.Get: record cannot be read")
                }
            }
        }
        Ok(answer)
    }

    pub async fn user_enroll(
        &self,
        device_id: u32,
        users: Vec<Vec<u8>>,
        overwrite: bool,
    ) -> Result<(), GatewayError> {
        let mut c = self.user.clone();
        let req = EnrollRequest {
            device_id,
            users,
            overwrite,
        };
        self.unary("Enroll", self.call_timeout, req, |r| async move {
            c.enroll(r).await
        })
        .await
        .map(drop)
    }

    /// Enrolls the same users on several devices in one call. A partial
    /// failure is [`GatewayError::Multi`]: devices not listed succeeded.
    pub async fn user_enroll_multi(
        &self,
        device_ids: Vec<u32>,
        users: Vec<Vec<u8>>,
        overwrite: bool,
    ) -> Result<(), GatewayError> {
        let mut c = self.user.clone();
        let req = EnrollMultiRequest {
            device_i_ds: device_ids,
            users,
            overwrite,
        };
        self.unary("EnrollMulti", self.call_timeout, req, |r| async move {
            c.enroll_multi(r).await
        })
        .await
        .map(drop)
    }

    pub async fn user_delete(
        &self,
        device_id: u32,
        user_ids: Vec<String>,
    ) -> Result<(), GatewayError> {
        let mut c = self.user.clone();
        let req = DeleteRequest {
            device_id,
            user_i_ds: user_ids,
        };
        self.unary("Delete", self.call_timeout, req, |r| async move {
            c.delete(r).await
        })
        .await
        .map(drop)
    }

    pub async fn user_delete_multi(
        &self,
        device_ids: Vec<u32>,
        user_ids: Vec<String>,
    ) -> Result<(), GatewayError> {
        let mut c = self.user.clone();
        let req = DeleteMultiRequest {
            device_i_ds: device_ids,
            user_i_ds: user_ids,
        };
        self.unary("DeleteMulti", self.call_timeout, req, |r| async move {
            c.delete_multi(r).await
        })
        .await
        .map(drop)
    }

    pub async fn user_delete_all_multi(&self, device_ids: Vec<u32>) -> Result<(), GatewayError> {
        let mut c = self.user.clone();
        let req = DeleteAllMultiRequest {
            device_i_ds: device_ids,
        };
        self.unary("DeleteAllMulti", self.call_timeout, req, |r| async move {
            c.delete_all_multi(r).await
        })
        .await
        .map(drop)
    }

    // ---- Card / Admin --------------------------------------------------

    /// Waits for a card on the device (a person must present one).
    pub async fn card_scan(&self, device_id: u32) -> Result<CardData, GatewayError> {
        let mut c = self.card.clone();
        let resp = self
            .unary(
                "Scan",
                self.input_timeout,
                ScanRequest { device_id },
                |r| async move { c.scan(r).await },
            )
            .await?;
        resp.card_data.ok_or(GatewayError::BadData {
            method: "Scan",
            reason: "answer without card data".into(),
        })
    }

    pub async fn admin_get_info(&self) -> Result<GatewayInfo, GatewayError> {
        let mut c = self.admin.clone();
        let resp = self
            .unary(
                "GetInfo",
                self.call_timeout,
                GetInfoRequest {},
                |r| async move { c.get_info(r).await },
            )
            .await?;
        Ok(GatewayInfo {
            version: resp.version,
            build_date: resp.build_date,
        })
    }

    // ---- plumbing ------------------------------------------------------

    async fn unary<Req, Resp, F, Fut>(
        &self,
        method: &'static str,
        timeout: Duration,
        req: Req,
        call: F,
    ) -> Result<Resp, GatewayError>
    where
        F: FnOnce(tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let mut request = tonic::Request::new(req);
        request.set_timeout(timeout);
        match tokio::time::timeout(timeout, call(request)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(GatewayError::from_status(method, status)),
            Err(_) => Err(GatewayError::Timeout {
                method,
                after: timeout,
            }),
        }
    }

    /// Opens a server stream. No deadline: a gateway may send the response
    /// headers only with the first message (WIRE.md §5.14, §6), so opening
    /// may take as long as the stream stays quiet. Callers open streams in
    /// tasks of their own; keepalive finds a dead connection.
    async fn open_stream<T, Fut>(
        &self,
        method: &'static str,
        open: Fut,
    ) -> Result<Streaming<T>, GatewayError>
    where
        Fut: Future<Output = Result<tonic::Response<Streaming<T>>, tonic::Status>>,
    {
        match open.await {
            Ok(resp) => Ok(resp.into_inner()),
            Err(status) => Err(GatewayError::from_status(method, status)),
        }
    }
}
