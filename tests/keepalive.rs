//! HTTP/2 keepalive notices a silent peer: a loopback proxy between client
//! and simulator stops forwarding without closing either socket (a half-open
//! connection, as after a cable pull), and the open stream must fail instead
//! of hanging forever.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{sim_registered, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use usersync::gateway::GatewayClient;
use usersync::sim::StreamHeaders;
use usersync::wire::Api;

/// Forwards one direction until `frozen`; then holds the sockets open and
/// silent until the test ends.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Swallow everything from now on; keep both sockets open.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn proxy(target: std::net::SocketAddr, frozen: Arc<AtomicBool>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, Arc::clone(&frozen)));
            tokio::spawn(pump(sr, cw, Arc::clone(&frozen)));
        }
    });
    addr
}

#[tokio::test]
async fn keepalive_notices_a_silent_peer() {
    // Registered devices and eager headers (not the defaults): this test is
    // about a stream that is open and then goes silent.
    let sim = sim_registered(Api::V1_8, 1).await;
    sim.set_stream_headers(StreamHeaders::Eager);
    let frozen = Arc::new(AtomicBool::new(false));
    let via = proxy(sim.address(), Arc::clone(&frozen)).await;

    let mut settings = sim.gateway_settings();
    settings.address = via.to_string();
    settings.keepalive_interval = Duration::from_millis(300);
    settings.keepalive_timeout = Duration::from_millis(300);
    let gw = GatewayClient::new(&settings).unwrap();

    let d = sim.device_ids()[0];
    gw.enable_monitoring(d).await.unwrap();
    let mut rt = gw.subscribe_realtime_log(8, vec![], vec![]).await.unwrap();
    sim.enroll_on_device(d, "1").unwrap();
    within("event through the proxy", rt.message())
        .await
        .unwrap()
        .unwrap();

    frozen.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    // Without keepalive this would wait forever: nothing is sent, nothing
    // closes. `within` bounds the test; keepalive must end it far sooner.
    let end = within("keepalive breaks the silent stream", rt.message()).await;
    assert!(end.is_err(), "expected an error, got {end:?}");
    eprintln!("silent peer noticed after {:?}", started.elapsed());
}
