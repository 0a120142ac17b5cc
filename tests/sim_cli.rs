//! `usersync sim` as a separate process, called by a gRPC client written
//! independently of the crate's protos: messages declared here straight from
//! WIRE.md's field tables, method paths spelled out, TLS against the CA the
//! simulator writes. Both namespaces.

use std::process::Stdio;
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const DEADLINE: Duration = Duration::from_secs(20);

// ---- messages, from WIRE.md §2 ------------------------------------------

#[derive(Clone, PartialEq, Message)]
struct Empty {}

#[derive(Clone, PartialEq, Message)]
struct DeviceInfo {
    #[prost(uint32, tag = "1")]
    device_id: u32,
    #[prost(int32, tag = "5")]
    status: i32,
}

#[derive(Clone, PartialEq, Message)]
struct GetDeviceListResponse {
    #[prost(message, repeated, tag = "1")]
    device_infos: Vec<DeviceInfo>,
}

#[derive(Clone, PartialEq, Message)]
struct GetLogRequest {
    #[prost(uint32, tag = "1")]
    device_id: u32,
    #[prost(uint32, tag = "2")]
    start_event_id: u32,
    #[prost(uint32, tag = "3")]
    max_num_of_log: u32,
}

#[derive(Clone, PartialEq, Message)]
struct EventLog {
    #[prost(uint32, tag = "1")]
    id: u32,
    #[prost(uint32, tag = "3")]
    device_id: u32,
    #[prost(string, tag = "4")]
    user_id: String,
    #[prost(uint32, tag = "6")]
    event_code: u32,
    #[prost(bool, tag = "10")]
    changed_on_device: bool,
}

#[derive(Clone, PartialEq, Message)]
struct GetLogResponse {
    #[prost(message, repeated, tag = "1")]
    events: Vec<EventLog>,
}

#[derive(Clone, PartialEq, Message)]
struct DeviceRequest {
    #[prost(uint32, tag = "1")]
    device_id: u32,
}

#[derive(Clone, PartialEq, Message)]
struct UserHdr {
    #[prost(string, tag = "1")]
    id: String,
}

#[derive(Clone, PartialEq, Message)]
struct GetListResponse {
    #[prost(message, repeated, tag = "1")]
    hdrs: Vec<UserHdr>,
}

#[derive(Clone, PartialEq, Message)]
struct GetRequest {
    #[prost(uint32, tag = "1")]
    device_id: u32,
    #[prost(string, repeated, tag = "2")]
    user_ids: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
struct GetResponse {
    #[prost(bytes = "vec", repeated, tag = "1")]
    users: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
struct EnrollMultiRequest {
    #[prost(uint32, repeated, tag = "1")]
    device_ids: Vec<u32>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    users: Vec<Vec<u8>>,
    #[prost(bool, tag = "3")]
    overwrite: bool,
}

// ---- plumbing ----------------------------------------------------------

async fn call<Req, Resp>(ch: &Channel, path: String, req: Req) -> Result<Resp, tonic::Status>
where
    Req: Message + Send + Sync + 'static,
    Resp: Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path: http::uri::PathAndQuery = path.parse().expect("path");
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    grpc.unary(tonic::Request::new(req), path, codec)
        .await
        .map(tonic::Response::into_inner)
}

async fn line(lines: &mut Lines<BufReader<ChildStdout>>) -> String {
    tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("simulator output in time")
        .expect("read stdout")
        .expect("simulator still running")
}

struct Running {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    addr: String,
    ca: Vec<u8>,
    devices: Vec<u32>,
}

async fn start(api: &str, dir: &std::path::Path, extra: &[&str]) -> Running {
    let mut child = Command::new(env!("CARGO_BIN_EXE_usersync"))
        .args([
            "sim",
            "--listen",
            "127.0.0.1:0",
            "--devices",
            "3",
            "--api",
            api,
        ])
        .args(extra)
        .arg("--cert-dir")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn usersync sim");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let first = line(&mut lines).await;
    let addr = first
        .rsplit(' ')
        .next()
        .expect("address in first line")
        .to_owned();
    assert!(first.contains("listening on"), "{first}");
    let ca_line = line(&mut lines).await;
    let ca_path = ca_line.strip_prefix("CA certificate: ").expect("CA line");
    let ca = std::fs::read(ca_path).expect("CA file written");
    let dev_line = line(&mut lines).await;
    let devices = dev_line
        .strip_prefix("devices: ")
        .expect("devices line")
        .split(' ')
        .map(|d| d.parse().expect("device id"))
        .collect();
    line(&mut lines).await; // "type `help`"
    Running {
        child,
        lines,
        addr,
        ca,
        devices,
    }
}

async fn channel(r: &Running) -> Channel {
    let port = r.addr.rsplit(':').next().expect("port");
    Endpoint::from_shared(format!("https://localhost:{port}"))
        .expect("uri")
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&r.ca))
                .domain_name("localhost"),
        )
        .expect("tls")
        .connect()
        .await
        .expect("TLS connection to the simulator")
}

#[tokio::test]
async fn independent_client_in_both_namespaces() {
    for (api, prefix) in [("v1.8", "gsdk."), ("v1.5", "gsdk."), ("v1.4", "")] {
        let dir = tempfile::tempdir().unwrap();
        // Registered devices (not the default): this test is about the
        // calls, not registration.
        let mut sim = start(api, dir.path(), &["--preconnect"]).await;
        let ch = channel(&sim).await;
        let p = |svc: &str, m: &str| format!("/{prefix}{svc}/{m}");
        let (a, b, c) = (sim.devices[0], sim.devices[1], sim.devices[2]);

        let list: GetDeviceListResponse =
            call(&ch, p("connect.Connect", "GetDeviceList"), Empty {})
                .await
                .unwrap();
        let mut ids: Vec<u32> = list.device_infos.iter().map(|d| d.device_id).collect();
        ids.sort();
        assert_eq!(ids, sim.devices, "{api}");
        assert!(list.device_infos.iter().all(|d| d.status == 1));

        // Drive the simulator through stdin: an enrollment at device a.
        let stdin = sim.child.stdin.as_mut().unwrap();
        stdin
            .write_all(format!("enroll {a} 1000\n").as_bytes())
            .await
            .unwrap();
        let answer = line(&mut sim.lines).await;
        assert!(answer.starts_with("enrolled (event 1)"), "{answer}");

        let log: GetLogResponse = call(
            &ch,
            p("event.Event", "GetLog"),
            GetLogRequest {
                device_id: a,
                start_event_id: 0,
                max_num_of_log: 0,
            },
        )
        .await
        .unwrap();
        assert_eq!(log.events.len(), 1);
        let ev = &log.events[0];
        assert_eq!(
            (
                ev.id,
                ev.device_id,
                ev.user_id.as_str(),
                ev.event_code,
                ev.changed_on_device
            ),
            (1, a, "1000", 0x2000, true)
        );

        let users: GetListResponse = call(
            &ch,
            p("user.User", "GetList"),
            DeviceRequest { device_id: a },
        )
        .await
        .unwrap();
        assert_eq!(
            users.hdrs.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(),
            vec!["1000"]
        );

        let got: GetResponse = call(
            &ch,
            p("user.User", "Get"),
            GetRequest {
                device_id: a,
                user_ids: vec!["1000".into()],
            },
        )
        .await
        .unwrap();
        assert_eq!(got.users.len(), 1);

        let _: Empty = call(
            &ch,
            p("user.User", "EnrollMulti"),
            EnrollMultiRequest {
                device_ids: vec![b, c],
                users: got.users.clone(),
                overwrite: true,
            },
        )
        .await
        .unwrap();
        let copied: GetResponse = call(
            &ch,
            p("user.User", "Get"),
            GetRequest {
                device_id: c,
                user_ids: vec!["1000".into()],
            },
        )
        .await
        .unwrap();
        assert_eq!(copied.users, got.users, "{api}: byte-identical copy");

        // The other namespace is not served.
        let other = if prefix.is_empty() { "gsdk." } else { "" };
        let err = call::<Empty, GetDeviceListResponse>(
            &ch,
            format!("/{other}connect.Connect/GetDeviceList"),
            Empty {},
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented, "{api}");

        // SIGTERM stops it cleanly.
        let pid = sim.child.id().expect("pid").to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = tokio::time::timeout(DEADLINE, sim.child.wait())
            .await
            .expect("exits after SIGTERM")
            .unwrap();
        assert!(status.success(), "{api}: {status}");
    }
}

/// Types a command and returns its answer (`lines` lines).
async fn command(sim: &mut Running, cmd: &str, lines: usize) -> Vec<String> {
    let stdin = sim.child.stdin.as_mut().unwrap();
    stdin
        .write_all(format!("{cmd}\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    for _ in 0..lines {
        out.push(line(&mut sim.lines).await);
    }
    out
}

async fn get_log(
    ch: &Channel,
    device_id: u32,
    start: u32,
) -> Result<GetLogResponse, tonic::Status> {
    call(
        ch,
        "/gsdk.event.Event/GetLog".into(),
        GetLogRequest {
            device_id,
            start_event_id: start,
            max_num_of_log: 0,
        },
    )
    .await
}

async fn device_list(ch: &Channel) -> Result<GetDeviceListResponse, tonic::Status> {
    call(ch, "/gsdk.connect.Connect/GetDeviceList".into(), Empty {}).await
}

async fn stop(mut sim: Running) {
    command(&mut sim, "quit", 1).await;
    let status = tokio::time::timeout(DEADLINE, sim.child.wait())
        .await
        .expect("exits after quit")
        .unwrap();
    assert!(status.success(), "{status}");
}

const DEFAULT_ANSWERS: [&str; 6] = [
    "stream-headers lazy",
    "stale-start error",
    "past-newest error",
    "missing-user not-found",
    "preconnect off",
    "device-latency 0",
];

/// Without flags the simulator gives the least convenient answers; the
/// stdin commands switch them while it runs.
#[tokio::test]
async fn inconvenient_defaults_switched_at_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let mut sim = start("v1.8", dir.path(), &[]).await;
    let ch = channel(&sim).await;
    let a = sim.devices[0];
    assert_eq!(command(&mut sim, "policies", 6).await, DEFAULT_ANSWERS);

    // No device is known until a client adds it.
    assert!(device_list(&ch).await.unwrap().device_infos.is_empty());
    let err = get_log(&ch, a, 0).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);

    // With preconnect, the restarted gateway knows every device.
    command(&mut sim, "preconnect on", 1).await;
    let restarted = command(&mut sim, "restart 0.1", 1).await;
    assert_eq!(restarted, ["gateway restarted"]);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if device_list(&ch)
            .await
            .is_ok_and(|l| l.device_infos.len() == 3)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "devices registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // GetLog past the newest: OUT_OF_RANGE, then empty. Start 0: fine.
    assert!(get_log(&ch, a, 0).await.unwrap().events.is_empty());
    let err = get_log(&ch, a, 5).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange);
    command(&mut sim, "past-newest empty", 1).await;
    assert!(get_log(&ch, a, 5).await.unwrap().events.is_empty());

    // User.Get of an unknown ID: NOT_FOUND, then omitted.
    let get = GetRequest {
        device_id: a,
        user_ids: vec!["404".into()],
    };
    let err = call::<_, GetResponse>(&ch, "/gsdk.user.User/Get".into(), get.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    command(&mut sim, "missing-user omit", 1).await;
    let got: GetResponse = call(&ch, "/gsdk.user.User/Get".into(), get).await.unwrap();
    assert!(got.users.is_empty());

    // Device latency: a lower bound only.
    command(&mut sim, "device-latency 200", 1).await;
    let t = tokio::time::Instant::now();
    get_log(&ch, a, 0).await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(200));

    assert_eq!(
        command(&mut sim, "policies", 6).await,
        [
            "stream-headers lazy",
            "stale-start error",
            "past-newest empty",
            "missing-user omit",
            "preconnect on",
            "device-latency 200",
        ]
    );
    stop(sim).await;
}

/// Every answer from `--config`; a flag wins over the file.
#[tokio::test]
async fn answers_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sim.toml");
    std::fs::write(
        &file,
        "stream_headers = \"eager\"\nstale_start = \"clamp\"\npast_newest = \"empty\"\n\
         missing_user = \"omit\"\npreconnect = true\ndevice_latency_ms = 30\n",
    )
    .unwrap();
    let mut sim = start(
        "v1.8",
        dir.path(),
        &["--config", file.to_str().unwrap(), "--stale-start", "error"],
    )
    .await;
    assert_eq!(
        command(&mut sim, "policies", 6).await,
        [
            "stream-headers eager",
            "stale-start error",
            "past-newest empty",
            "missing-user omit",
            "preconnect on",
            "device-latency 30",
        ]
    );
    let ch = channel(&sim).await;
    assert_eq!(device_list(&ch).await.unwrap().device_infos.len(), 3);
    stop(sim).await;
}
