//! The channel to the gateway: TLS (rustls) with the site's CA, HTTP/2
//! keepalive so a half-open connection is noticed, a connect timeout, and a
//! path-rewriting layer that maps our one codegen onto the namespace of the
//! configured API generation (WIRE.md §1.1).

use std::task::{Context, Poll};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tower::Service;

use super::GatewayError;
use crate::wire::{self, Api};

/// How to reach the gateway.
#[derive(Clone)]
pub struct GatewaySettings {
    /// `host:port`.
    pub address: String,
    /// `None` dials plaintext HTTP/2 (only for tests and the simulator's
    /// `--plaintext`; real gateways serve TLS only, WIRE.md B23).
    pub tls: Option<TlsSettings>,
    pub api: Api,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub connect_timeout: Duration,
    /// Deadline of an ordinary unary call.
    pub call_timeout: Duration,
    /// Deadline of a call that waits for a person (Card.Scan).
    pub input_timeout: Duration,
}

#[derive(Clone)]
pub struct TlsSettings {
    /// PEM of the gateway's root CA (`ca.crt`).
    pub ca_pem: Vec<u8>,
    /// Name to verify the certificate against; defaults to the host of
    /// `address` (rustls checks SANs only, WIRE.md §6).
    pub server_name: Option<String>,
}

impl std::fmt::Debug for GatewaySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewaySettings")
            .field("address", &self.address)
            .field("tls", &self.tls.is_some())
            .field("api", &self.api)
            .finish_non_exhaustive()
    }
}

/// Gateway command timeouts are 10–20 s (WIRE.md B27); a call gets a few
/// seconds more than the longest so the gateway answers before we give up.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(25);
/// `input_cmd` is 20 s and `face_input_cmd` 60 s (WIRE.md B27).
pub const DEFAULT_INPUT_TIMEOUT: Duration = Duration::from_secs(65);
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Large GetLog pages and users with face images exceed tonic's 4 MiB
/// default (WIRE.md §6); the gateway itself accepts 72 MiB (B25).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

impl GatewaySettings {
    /// Settings with the documented defaults.
    pub fn new(address: impl Into<String>, tls: Option<TlsSettings>, api: Api) -> Self {
        GatewaySettings {
            address: address.into(),
            tls,
            api,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            input_timeout: DEFAULT_INPUT_TIMEOUT,
        }
    }
}

/// The channel type every client wrapper uses.
pub type GatewayChannel = ApiPath<Channel>;

/// Builds a lazily connecting channel: it dials on first use and re-dials
/// after a failure by itself, so a gateway that is down at start-up is not
/// an error here (the caller's calls fail with UNAVAILABLE until it is up).
pub fn connect_lazy(settings: &GatewaySettings) -> Result<GatewayChannel, GatewayError> {
    let scheme = if settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let uri = format!("{scheme}://{}", settings.address);
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|e| GatewayError::Channel(format!("address {:?}: {e}", settings.address)))?
        .connect_timeout(settings.connect_timeout)
        .http2_keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if let Some(tls) = &settings.tls {
        let host = match &tls.server_name {
            Some(name) => name.clone(),
            None => host_of(&settings.address),
        };
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&tls.ca_pem))
            .domain_name(host);
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| GatewayError::Channel(format!("TLS setup: {e}")))?;
    }
    Ok(ApiPath::new(endpoint.connect_lazy(), settings.api))
}

/// The host part of `host:port`, without IPv6 brackets.
fn host_of(address: &str) -> String {
    let host = match address.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => address,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned()
}

/// Rewrites request paths for the gateway generation: our codegen always
/// produces `/gsdk.<pkg>.<Svc>/<M>`; V1.0–V1.4 gateways serve `/<pkg>...`.
#[derive(Clone, Debug)]
pub struct ApiPath<S> {
    inner: S,
    rewrite: fn(Api, &str) -> std::borrow::Cow<'_, str>,
    api: Api,
}

impl<S> ApiPath<S> {
    /// For a client talking to a gateway of `api`.
    pub fn new(inner: S, api: Api) -> Self {
        ApiPath {
            inner,
            rewrite: wire::client_path,
            api,
        }
    }

    /// For a server (the simulator) that serves `api`.
    pub fn server(inner: S, api: Api) -> Self {
        ApiPath {
            inner,
            rewrite: wire::server_path,
            api,
        }
    }
}

impl<S, B> Service<http::Request<B>> for ApiPath<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        if let std::borrow::Cow::Owned(new_path) = (self.rewrite)(self.api, path) {
            let mut parts = req.uri().clone().into_parts();
            let query = parts
                .path_and_query
                .as_ref()
                .and_then(|pq| pq.query())
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            if let Ok(pq) = format!("{new_path}{query}").parse() {
                parts.path_and_query = Some(pq);
                if let Ok(uri) = http::Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
            }
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_strips_port_and_brackets() {
        assert_eq!(host_of("127.0.0.1:4000"), "127.0.0.1");
        assert_eq!(host_of("gw.example:4000"), "gw.example");
        assert_eq!(host_of("[::1]:4000"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }

    #[tokio::test]
    async fn rewrites_full_uris() {
        let svc = tower::service_fn(|req: http::Request<()>| async move {
            Ok::<_, std::convert::Infallible>(req.uri().to_string())
        });
        let mut legacy = ApiPath::new(svc, Api::V1_4);
        let req = http::Request::builder()
            .uri("https://127.0.0.1:4000/gsdk.event.Event/GetLog")
            .body(())
            .unwrap();
        let seen = tower::ServiceExt::oneshot(&mut legacy, req).await.unwrap();
        assert_eq!(seen, "https://127.0.0.1:4000/event.Event/GetLog");

        let mut current = ApiPath::new(svc, Api::V1_8);
        let req = http::Request::builder()
            .uri("https://127.0.0.1:4000/gsdk.event.Event/GetLog")
            .body(())
            .unwrap();
        let seen = tower::ServiceExt::oneshot(&mut current, req).await.unwrap();
        assert_eq!(seen, "https://127.0.0.1:4000/gsdk.event.Event/GetLog");
    }
}
