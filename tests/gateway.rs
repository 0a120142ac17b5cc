//! The gateway client against the simulator, over TLS on loopback, in every
//! API generation — and the simulator's answers to WIRE.md's open questions,
//! each way it can give them.
//!
//! The simulator's defaults are the least convenient answers (lazy stream
//! headers, OUT_OF_RANGE, NOT_FOUND, no pre-registered devices). Tests about
//! something else start from `sim_registered` (devices already added) and
//! switch streams to eager headers where they open a stream before anything
//! happens; each says so.

mod common;

use std::time::Duration;

use common::{client, eventually, sim, sim_registered, sim_with, within};
use prost::Message;
use tonic::Code;
use usersync::gateway::{Disposition, GatewayClient, GatewayError, TlsSettings};
use usersync::proto::gsdk::connect::{AsyncConnectInfo, Status as DevStatus};
use usersync::sim::{
    MissingUser, PastNewest, Policies, SimOptions, Simulator, StaleStart, StreamHeaders, codes,
    users,
};
use usersync::wire::{Api, GSDK_MULTI_ERROR, LEGACY_MULTI_ERROR, Numbering, peek_user_id};

#[tokio::test]
async fn every_wrapper_works_in_every_generation() {
    for api in Api::ALL {
        // Registered devices and eager headers (not the defaults): this test
        // is about each wrapper, not about registration or stream opening.
        let sim = sim_registered(api, 3).await;
        sim.set_stream_headers(StreamHeaders::Eager);
        let gw = client(&sim);
        let ids = sim.device_ids();
        let (a, b, c) = (ids[0], ids[1], ids[2]);

        let info = gw.admin_get_info().await.unwrap();
        assert!(
            info.version.contains(api.nominal_version()),
            "{api}: {info:?}"
        );

        // Connect: the devices were pre-registered; re-adding is accepted,
        // deleting drops a device from the list.
        let list = gw.get_device_list().await.unwrap();
        assert_eq!(list.len(), 3, "{api}");
        assert!(
            list.iter()
                .all(|d| d.status == DevStatus::TcpConnected as i32)
        );
        let mut status = gw.subscribe_status(32).await.unwrap();
        gw.delete_async_connection(vec![c]).await.unwrap();
        let change = within("status change", status.message())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (change.device_id, change.status),
            (c, DevStatus::Disconnected as i32)
        );
        assert_eq!(gw.get_device_list().await.unwrap().len(), 2);
        gw.add_async_connection(vec![AsyncConnectInfo {
            device_id: c,
            ip_addr: "192.0.2.9".into(),
            port: 51211,
            use_ssl: true,
        }])
        .await
        .unwrap();
        let change = within("status change", status.message())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (change.device_id, change.status),
            (c, DevStatus::TlsConnected as i32)
        );

        // Event: monitoring, realtime, GetLog.
        gw.enable_monitoring(a).await.unwrap();
        gw.enable_monitoring_multi(vec![b, c]).await.unwrap();
        let mut rt = gw.subscribe_realtime_log(64, vec![], vec![]).await.unwrap();
        sim.enroll_on_device(a, "1000").unwrap();
        let ev = within("realtime event", rt.message())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((ev.device_id, ev.user_id.as_str()), (a, "1000"));
        assert_eq!(ev.event_code, codes::USER_ENROLL_SUCCESS);
        assert!(ev.changed_on_device);
        let log = gw.get_log(a, 0, 0).await.unwrap();
        assert_eq!(log.len(), 1);
        gw.disable_monitoring(a).await.unwrap();
        gw.disable_monitoring_multi(vec![b, c]).await.unwrap();
        assert!(!sim.is_monitoring(a) && !sim.is_monitoring(b));

        // User: GetList, Get, Enroll, EnrollMulti, Delete, DeleteMulti,
        // DeleteAllMulti.
        assert_eq!(gw.user_ids(a).await.unwrap(), vec!["1000"]);
        let got = gw.user_get(a, vec!["1000".into()]).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, "1000");
        gw.user_enroll(b, vec![got[0].raw.clone()], true)
            .await
            .unwrap();
        gw.user_enroll_multi(vec![b, c], vec![got[0].raw.clone()], true)
            .await
            .unwrap();
        assert_eq!(sim.users(c)["1000"], got[0].raw);
        gw.user_delete(b, vec!["1000".into()]).await.unwrap();
        assert!(sim.users(b).is_empty());
        gw.user_delete_multi(vec![c], vec!["1000".into()])
            .await
            .unwrap();
        assert!(sim.users(c).is_empty());
        gw.user_delete_all_multi(vec![a, b]).await.unwrap();
        assert!(sim.users(a).is_empty());

        // Card: Scan answers with a CSN card.
        let card = gw.card_scan(a).await.unwrap();
        assert_eq!(card.csn_card_data.unwrap().data.len(), 32);

        gw.disconnect(vec![b]).await.unwrap();
        eventually("device reconnects after Disconnect", || async {
            sim.is_connected(b)
        })
        .await;
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn the_other_namespace_is_unimplemented() {
    let legacy = sim(Api::V1_4, 1).await;
    let current = sim(Api::V1_8, 1).await;

    let mut wrong = legacy.gateway_settings();
    wrong.api = Api::V1_8;
    let err = GatewayClient::new(&wrong)
        .unwrap()
        .get_device_list()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unimplemented), "{err}");

    let mut wrong = current.gateway_settings();
    wrong.api = Api::V1_4;
    let err = GatewayClient::new(&wrong)
        .unwrap()
        .get_device_list()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unimplemented), "{err}");

    // v1.5 and v1.8 share the namespace.
    let mut same = current.gateway_settings();
    same.api = Api::V1_5;
    GatewayClient::new(&same)
        .unwrap()
        .get_device_list()
        .await
        .unwrap();

    // And the legacy simulator saw bare paths only.
    assert!(legacy.rpc_log().is_empty());
}

/// A user with every field set (V1.8) and a ≤V1.6-numbered user, plus a
/// field no schema knows, travel Get → EnrollMulti byte for byte.
#[tokio::test]
async fn users_travel_byte_for_byte() {
    for (api, numbering) in [(Api::V1_8, Numbering::V18), (Api::V1_5, Numbering::V16)] {
        let sim = sim_registered(api, 3).await;
        let gw = client(&sim);
        let ids = sim.device_ids();
        let mut full = users::every_field_v18("4242");
        let mut old = users::generate("1616", 3, numbering, users::UserProfile::default());
        // Field 99 (bytes), unknown to every schema: must survive too.
        for rec in [&mut full, &mut old] {
            rec.extend_from_slice(&[0x9a, 0x06, 0x05, b'h', b'e', b'l', b'l', b'o']);
        }
        sim.put_raw_on_device(ids[0], full.clone()).unwrap();
        sim.put_raw_on_device(ids[0], old.clone()).unwrap();

        let got = gw
            .user_get(ids[0], vec!["4242".into(), "1616".into()])
            .await
            .unwrap();
        assert_eq!(got.len(), 2);
        gw.user_enroll_multi(
            vec![ids[1], ids[2]],
            got.iter().map(|u| u.raw.clone()).collect(),
            true,
        )
        .await
        .unwrap();
        for target in [ids[1], ids[2]] {
            let stored = sim.users(target);
            assert_eq!(stored["4242"], full, "{api}: every-field user changed");
            assert_eq!(stored["1616"], old, "{api}: old-numbering user changed");
        }
        // GetList answers with the stored header bytes.
        let mut listed = gw.user_ids(ids[1]).await.unwrap();
        listed.sort();
        assert_eq!(listed, vec!["1616", "4242"]);
    }
}

#[tokio::test]
async fn multi_errors_decode_under_both_names() {
    for (api, name) in [
        (Api::V1_4, LEGACY_MULTI_ERROR),
        (Api::V1_8, GSDK_MULTI_ERROR),
    ] {
        assert_eq!(api.multi_error_type_name(), name);
        let sim = sim_registered(api, 3).await;
        let gw = client(&sim);
        let ids = sim.device_ids();
        sim.set_offline(ids[1]).unwrap();
        sim.fail_next_multi(ids[2], 1);
        let user = users::generate("77", 0, api.numbering(), Default::default());
        let err = gw
            .user_enroll_multi(ids.clone(), vec![user.clone()], true)
            .await
            .unwrap_err();
        let multi = err
            .multi()
            .unwrap_or_else(|| panic!("{api}: not a multi error: {err}"));
        assert_eq!(multi.code, Code::Internal);
        let mut failed: Vec<u32> = multi.failed_devices().collect();
        failed.sort();
        assert_eq!(failed, vec![ids[1], ids[2]]);
        assert_eq!(err.disposition(), Disposition::Transient);
        // The device that succeeded holds the user.
        assert!(sim.users(ids[0]).contains_key("77"));

        // A permanent refusal.
        sim.reject(ids[0], "78");
        let poison = users::generate("78", 0, api.numbering(), Default::default());
        let err = gw
            .user_enroll_multi(vec![ids[0]], vec![poison], true)
            .await
            .unwrap_err();
        let dev = err.multi().unwrap().for_device(ids[0]).unwrap().clone();
        assert_eq!(dev.code, Code::InvalidArgument);
        assert_eq!(err.disposition(), Disposition::Permanent);
    }
}

#[tokio::test]
async fn multi_error_status_code_is_not_relied_on() {
    let mut opts = SimOptions::with_devices(2);
    opts.model.preconnect = true; // the first device must take the call
    opts.model.policies = Policies {
        multi_error_code: Code::Unknown,
        ..Policies::default()
    };
    let sim = sim_with(opts).await;
    let gw = client(&sim);
    let ids = sim.device_ids();
    sim.set_offline(ids[1]).unwrap();
    let err = gw.user_delete_all_multi(ids.clone()).await.unwrap_err();
    let multi = err.multi().unwrap();
    assert_eq!(multi.code, Code::Unknown);
    assert_eq!(multi.failed_devices().collect::<Vec<_>>(), vec![ids[1]]);
}

fn stream_failure(api: Api) -> tonic::Status {
    usersync::gateway::multi_error_status(
        Code::Aborted,
        "monitoring failed",
        api.multi_error_type_name(),
        vec![usersync::proto::gsdk::err::ErrorResponse {
            device_id: 5,
            code: Code::Unavailable as i32,
            msg: "gone".into(),
        }],
    )
}

fn assert_stream_failure(e: &GatewayError) {
    let multi = e
        .multi()
        .unwrap_or_else(|| panic!("not a multi error: {e}"));
    assert_eq!(multi.code, Code::Aborted);
    assert_eq!(multi.failed_devices().collect::<Vec<_>>(), vec![5]);
}

/// Eager headers: the streams are open and the error ends them.
#[tokio::test]
async fn multi_error_on_a_stream_decodes() {
    for api in [Api::V1_4, Api::V1_8] {
        let sim = sim(api, 1).await;
        // Eager (not the default): the streams open before the failure.
        sim.set_stream_headers(StreamHeaders::Eager);
        let gw = client(&sim);
        let mut rt = gw.subscribe_realtime_log(8, vec![], vec![]).await.unwrap();
        let mut st = gw.subscribe_status(8).await.unwrap();
        eventually("both streams registered", || async {
            sim.rpc_log()
                .iter()
                .filter(|r| r.method.starts_with("Subscribe"))
                .count()
                == 2
        })
        .await;
        sim.break_streams(&stream_failure(api));
        let rt_err = within("realtime error", rt.message()).await.unwrap_err();
        assert_stream_failure(&GatewayError::from_status("SubscribeRealtimeLog", rt_err));
        let st_err = within("status error", st.message()).await.unwrap_err();
        assert_stream_failure(&GatewayError::from_status("SubscribeStatus", st_err));
    }
}

/// Lazy headers (the default): a failure before the first message ends the
/// opening call itself, details included.
#[tokio::test]
async fn multi_error_before_the_first_message_fails_the_opening_call() {
    for api in [Api::V1_4, Api::V1_8] {
        let sim = sim(api, 1).await;
        let gw = client(&sim);
        let rt = tokio::spawn({
            let gw = gw.clone();
            async move { gw.subscribe_realtime_log(8, vec![], vec![]).await }
        });
        let st = tokio::spawn({
            let gw = gw.clone();
            async move { gw.subscribe_status(8).await }
        });
        eventually("both streams registered", || async {
            sim.with_model(|m| m.status_subscribers() == 1 && m.realtime_subscribers() == 1)
        })
        .await;
        sim.break_streams(&stream_failure(api));
        let rt_err = within("realtime opening fails", rt)
            .await
            .unwrap()
            .unwrap_err();
        assert_stream_failure(&rt_err);
        let st_err = within("status opening fails", st)
            .await
            .unwrap()
            .unwrap_err();
        assert_stream_failure(&st_err);
    }
}

#[tokio::test]
async fn missing_users_both_answers() {
    let sim = sim_registered(Api::V1_8, 2).await;
    let gw = client(&sim);
    let (d, e) = (sim.device_ids()[0], sim.device_ids()[1]);
    sim.enroll_on_device(d, "1").unwrap();
    let both = vec!["1".to_owned(), "2".to_owned()];
    // Omitting is not the default: set explicitly.
    assert_eq!(sim.policies().missing_user, MissingUser::NotFound);
    sim.set_policies(Policies {
        missing_user: MissingUser::Lenient,
        ..sim.policies()
    });
    let got = gw.user_get(d, both.clone()).await.unwrap();
    assert_eq!(
        got.iter().map(|u| u.id.as_str()).collect::<Vec<_>>(),
        vec!["1"]
    );
    gw.user_delete(d, vec!["2".into()]).await.unwrap();

    sim.set_policies(Policies {
        missing_user: MissingUser::NotFound,
        ..Policies::default()
    });
    let err = gw.user_get(d, both).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    assert_eq!(err.disposition(), Disposition::Permanent);
    let err = gw.user_delete(d, vec!["2".into()]).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    // In a Multi call only the device that lacks the user fails; the other
    // deletes it.
    let err = gw
        .user_delete_multi(vec![d, e], vec!["1".into()])
        .await
        .unwrap_err();
    let multi = err.multi().expect("multi error");
    assert_eq!(multi.failed_devices().collect::<Vec<_>>(), vec![e]);
    assert_eq!(multi.for_device(e).unwrap().code, Code::NotFound);
    assert!(!sim.holds(d, "1"));
}

#[tokio::test]
async fn get_log_edges_over_the_wire() {
    let mut opts = SimOptions::with_devices(1);
    opts.model.log_capacity = 10;
    opts.model.devices[0].first_event_id = 1000;
    opts.model.preconnect = true;
    // The convenient answers first, set explicitly (the defaults are
    // OUT_OF_RANGE; see get_log_outside_the_stored_range_every_answer).
    opts.model.policies.stale_start = StaleStart::Clamp;
    opts.model.policies.past_newest = PastNewest::Empty;
    let sim = sim_with(opts).await;
    let gw = client(&sim);
    let d = sim.device_ids()[0];
    for i in 0..25 {
        sim.event_on_device(d, codes::VERIFY_SUCCESS, &i.to_string())
            .unwrap();
    }
    // Stored: 1015..=1024.
    let ids = |v: Vec<usersync::proto::gsdk::event::EventLog>| {
        v.into_iter().map(|e| e.id).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(gw.get_log(d, 0, 0).await.unwrap()),
        (1015..=1024).collect::<Vec<_>>()
    );
    assert_eq!(
        ids(gw.get_log(d, 0, 3).await.unwrap()),
        vec![1015, 1016, 1017]
    );
    assert_eq!(
        ids(gw.get_log(d, 1020, 0).await.unwrap()),
        (1020..=1024).collect::<Vec<_>>()
    );
    assert!(gw.get_log(d, 1025, 0).await.unwrap().is_empty());
    // Start older than the oldest: clamped …
    assert_eq!(gw.get_log(d, 1001, 2).await.unwrap()[0].id, 1015);
    // … or OUT_OF_RANGE, the other possible answer.
    sim.set_policies(Policies {
        stale_start: StaleStart::OutOfRange,
        ..sim.policies()
    });
    let err = gw.get_log(d, 1001, 2).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::OutOfRange));

    // Factory reset: users gone, IDs restart at the first ID.
    sim.enroll_on_device(d, "5").unwrap();
    sim.factory_reset(d).unwrap();
    eventually("device back after reset", || async { sim.is_connected(d) }).await;
    let log = gw.get_log(d, 0, 0).await.unwrap();
    assert_eq!(log[0].id, 1000);
    assert_eq!(log[0].event_code, codes::DEVICE_FACTORY_RESET);
    assert!(gw.user_ids(d).await.unwrap().is_empty());
}

#[tokio::test]
async fn offline_devices_fail_with_unavailable() {
    let sim = sim_registered(Api::V1_8, 1).await;
    // Eager (not the default): the status stream opens before any change.
    sim.set_stream_headers(StreamHeaders::Eager);
    let gw = client(&sim);
    let d = sim.device_ids()[0];
    let mut status = gw.subscribe_status(8).await.unwrap();
    sim.set_offline(d).unwrap();
    let change = within("offline status", status.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(change.status, DevStatus::Disconnected as i32);
    for err in [
        gw.get_log(d, 0, 0).await.unwrap_err(),
        gw.user_ids(d).await.unwrap_err(),
        gw.enable_monitoring(d).await.unwrap_err(),
    ] {
        assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
        assert_eq!(err.disposition(), Disposition::Transient);
    }
    sim.set_online(d).unwrap();
    let change = within("online status", status.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(change.status, DevStatus::TcpConnected as i32);
    gw.get_log(d, 0, 0).await.unwrap();
}

/// A subscriber that does not read loses events; the log keeps them.
#[tokio::test]
async fn realtime_queue_overflow_drops_events() {
    let sim = sim_registered(Api::V1_8, 1).await;
    // Eager (not the default): the stream opens before the first event.
    sim.set_stream_headers(StreamHeaders::Eager);
    let gw = client(&sim);
    let d = sim.device_ids()[0];
    gw.enable_monitoring(d).await.unwrap();
    let mut rt = gw.subscribe_realtime_log(4, vec![d], vec![]).await.unwrap();
    eventually("subscribed", || async {
        sim.with_model(|m| m.realtime_subscribers()) == 1
    })
    .await;
    // Events are appended faster than anything can drain a 4-deep queue:
    // all within one lock, before the server task runs.
    sim.with_model(|m| {
        for i in 0..50 {
            m.device_enroll(d, &format!("u{i}")).unwrap();
        }
    });
    let stats = sim.realtime_stats();
    assert_eq!(stats.delivered, 4);
    assert_eq!(stats.dropped_queue_full, 46);
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(within("event", rt.message()).await.unwrap().unwrap().id);
    }
    assert_eq!(got, vec![1, 2, 3, 4]);
    assert_eq!(gw.get_log(d, 0, 0).await.unwrap().len(), 50);

    // Injected drops are a fraction of the deliverable events.
    sim.drop_realtime(Some(d), 1.0);
    sim.enroll_on_device(d, "x").unwrap();
    assert_eq!(sim.realtime_stats().dropped_injected, 1);
}

#[tokio::test]
async fn gateway_restart_cuts_streams_and_comes_back() {
    // Registered devices, re-registered after the restart (preconnect), and
    // eager headers: not the defaults, this test is about the cut streams.
    let sim = sim_registered(Api::V1_8, 2).await;
    sim.set_stream_headers(StreamHeaders::Eager);
    let gw = client(&sim);
    let d = sim.device_ids()[0];
    gw.enable_monitoring(d).await.unwrap();
    let mut rt = gw.subscribe_realtime_log(8, vec![], vec![]).await.unwrap();
    sim.enroll_on_device(d, "1").unwrap();
    within("event before restart", rt.message())
        .await
        .unwrap()
        .unwrap();

    sim.restart(Duration::from_millis(100)).await.unwrap();
    // The stream ends (with an error or a clean end), never hangs.
    let end = within("stream ends", rt.message()).await;
    assert!(
        !matches!(end, Ok(Some(_))),
        "stream delivered after restart"
    );
    assert!(!sim.is_monitoring(d), "monitoring lost with the restart");
    // Users and logs survive; the channel re-dials by itself.
    eventually("gateway reachable again", || async {
        gw.get_log(d, 0, 0).await.is_ok()
    })
    .await;
    assert_eq!(gw.get_log(d, 0, 0).await.unwrap().len(), 1);
    assert_eq!(gw.user_ids(d).await.unwrap(), vec!["1"]);
}

#[tokio::test]
async fn tls_is_verified() {
    let sim = sim(Api::V1_8, 1).await;
    // The certificate covers localhost and 127.0.0.1 but not this name.
    let mut wrong_name = sim.gateway_settings();
    if let Some(tls) = wrong_name.tls.as_mut() {
        tls.server_name = Some("gateway.example".into());
    }
    wrong_name.connect_timeout = Duration::from_secs(2);
    let err = GatewayClient::new(&wrong_name)
        .unwrap()
        .get_device_list()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");

    // The dialled IP is in the certificate: no server_name needed.
    let mut by_ip = sim.gateway_settings();
    if let Some(tls) = by_ip.tls.as_mut() {
        tls.server_name = None;
    }
    GatewayClient::new(&by_ip)
        .unwrap()
        .get_device_list()
        .await
        .unwrap();

    // Another CA is not trusted.
    let other = usersync::sim::tls::generate(&["localhost"]).unwrap();
    let mut untrusted = sim.gateway_settings();
    untrusted.tls = Some(TlsSettings {
        ca_pem: other.ca_pem.into_bytes(),
        server_name: Some("localhost".into()),
    });
    assert!(
        GatewayClient::new(&untrusted)
            .unwrap()
            .get_device_list()
            .await
            .is_err()
    );

    // Plaintext simulator, plaintext client.
    let mut opts = SimOptions::with_devices(1);
    opts.tls = false;
    let plain = sim_with(opts).await;
    GatewayClient::new(&plain.gateway_settings())
        .unwrap()
        .get_device_list()
        .await
        .unwrap();
}

#[tokio::test]
async fn unary_calls_have_deadlines() {
    let sim = sim(Api::V1_8, 1).await;
    let mut settings = sim.gateway_settings();
    settings.call_timeout = Duration::from_millis(200);
    let gw = GatewayClient::new(&settings).unwrap();
    gw.get_device_list().await.unwrap();
    sim.set_latency("GetDeviceList", Duration::from_secs(5));
    let started = std::time::Instant::now();
    let err = gw.get_device_list().await.unwrap_err();
    assert!(
        matches!(err, GatewayError::Timeout { .. })
            || matches!(err.code(), Some(Code::DeadlineExceeded | Code::Cancelled)),
        "{err}"
    );
    assert_eq!(err.disposition(), Disposition::Transient);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn bad_records_from_the_gateway_are_skipped() {
    let sim = sim_registered(Api::V1_8, 1).await;
    let gw = client(&sim);
    let d = sim.device_ids()[0];
    sim.enroll_on_device(d, "good").unwrap();
    // Corrupt records in the device's table (no ID; truncated bytes): the
    // client logs and skips them instead of failing the whole answer.
    let no_id = usersync::proto::usersync::schema::v18::UserInfo {
        name: "no id".into(),
        ..Default::default()
    }
    .encode_to_vec();
    assert!(peek_user_id(&no_id).is_err());
    sim.with_model(|m| {
        m.corrupt_user(d, "noid", no_id);
        m.corrupt_user(d, "trunc", vec![0x0a, 0x20, 0x0a]);
    });
    let got = gw
        .user_get(d, vec!["noid".into(), "good".into(), "trunc".into()])
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|u| u.id.as_str()).collect::<Vec<_>>(),
        vec!["good"]
    );
    assert_eq!(gw.user_ids(d).await.unwrap(), vec!["good"]);
    // Enrolling a record without an ID is refused whole.
    let err = gw
        .user_enroll(d, vec![vec![0x1a, 0x01, b'x']], true)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
}

// ---- the open questions, every answer ------------------------------------

/// How long a call must stay pending to count as "not completed".
const STILL_PENDING: Duration = Duration::from_millis(300);

fn async_info(device_id: u32) -> AsyncConnectInfo {
    AsyncConnectInfo {
        device_id,
        ip_addr: format!("192.0.2.{}", device_id % 250),
        port: 51211,
        use_ssl: false,
    }
}

/// WIRE.md §5.14, §6: lazy headers (the default) hold a tonic client's
/// `subscribe_status(..).await` until the first status change; the
/// subscription is registered meanwhile. Eager headers answer at once.
#[tokio::test]
async fn status_stream_headers_lazy_and_eager() {
    let sim = sim(Api::V1_8, 1).await;
    assert_eq!(sim.policies().stream_headers, StreamHeaders::Lazy);
    let gw = client(&sim);
    let d = sim.device_ids()[0];

    let opening = gw.subscribe_status(8);
    tokio::pin!(opening);
    assert!(
        tokio::time::timeout(STILL_PENDING, &mut opening)
            .await
            .is_err(),
        "a lazy status stream opened before any status change"
    );
    eventually("status subscription registered while waiting", || async {
        sim.with_model(|m| m.status_subscribers()) == 1
    })
    .await;
    gw.add_async_connection(vec![async_info(d)]).await.unwrap();
    let mut status = within("lazy stream opens with the first change", &mut opening)
        .await
        .unwrap();
    let first = within("first change", status.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.device_id, first.status),
        (d, DevStatus::TcpConnected as i32)
    );

    // Eager: no change happens, yet the call returns.
    sim.set_stream_headers(StreamHeaders::Eager);
    let mut eager = within("eager stream opens at once", gw.subscribe_status(8))
        .await
        .unwrap();
    gw.delete_async_connection(vec![d]).await.unwrap();
    for stream in [&mut status, &mut eager] {
        let change = within("change", stream.message()).await.unwrap().unwrap();
        assert_eq!(
            (change.device_id, change.status),
            (d, DevStatus::Disconnected as i32)
        );
    }
}

/// The same for the realtime stream: a lazy one opens with the first event,
/// and events logged while it waits are all delivered, in order.
#[tokio::test]
async fn realtime_stream_headers_lazy_and_eager() {
    let sim = sim_registered(Api::V1_8, 1).await;
    let gw = client(&sim);
    let d = sim.device_ids()[0];
    gw.enable_monitoring(d).await.unwrap();

    let opening = gw.subscribe_realtime_log(8, vec![], vec![]);
    tokio::pin!(opening);
    assert!(
        tokio::time::timeout(STILL_PENDING, &mut opening)
            .await
            .is_err(),
        "a lazy realtime stream opened before any event"
    );
    eventually("realtime subscription registered while waiting", || async {
        sim.with_model(|m| m.realtime_subscribers()) == 1
    })
    .await;
    sim.enroll_on_device(d, "1").unwrap();
    sim.enroll_on_device(d, "2").unwrap();
    let mut lazy = within("lazy stream opens with the first event", &mut opening)
        .await
        .unwrap();
    for want in ["1", "2"] {
        let ev = within("event", lazy.message()).await.unwrap().unwrap();
        assert_eq!(ev.user_id, want);
    }

    sim.set_stream_headers(StreamHeaders::Eager);
    let mut eager = within(
        "eager stream opens at once",
        gw.subscribe_realtime_log(8, vec![], vec![]),
    )
    .await
    .unwrap();
    sim.enroll_on_device(d, "3").unwrap();
    for stream in [&mut lazy, &mut eager] {
        let ev = within("event", stream.message()).await.unwrap().unwrap();
        assert_eq!(ev.user_id, "3");
    }
}

/// A client that gives up on a lazy stream before it opened leaves nothing
/// behind in the gateway.
#[tokio::test]
async fn a_lazy_stream_whose_client_left_is_forgotten() {
    let sim = sim_registered(Api::V1_8, 1).await;
    let gw = client(&sim);
    let d = sim.device_ids()[0];
    gw.enable_monitoring(d).await.unwrap();

    let mut status = Box::pin(gw.subscribe_status(8));
    let mut realtime = Box::pin(gw.subscribe_realtime_log(8, vec![], vec![]));
    assert!(
        tokio::time::timeout(STILL_PENDING, &mut status)
            .await
            .is_err()
    );
    assert!(
        tokio::time::timeout(STILL_PENDING, &mut realtime)
            .await
            .is_err()
    );
    eventually("both subscriptions registered", || async {
        sim.with_model(|m| m.status_subscribers() == 1 && m.realtime_subscribers() == 1)
    })
    .await;
    drop(status);
    drop(realtime);
    eventually("both subscriptions forgotten", || async {
        sim.with_model(|m| m.status_subscribers() == 0 && m.realtime_subscribers() == 0)
    })
    .await;
    // The next change and event go nowhere, and nothing is counted as
    // delivered or dropped.
    assert!(sim.is_monitoring(d));
    sim.enroll_on_device(d, "1").unwrap();
    assert_eq!(sim.realtime_stats(), Default::default());
    sim.set_offline(d).unwrap();
    assert_eq!(sim.with_model(|m| m.status_subscribers()), 0);
}

/// WIRE.md §5.4: GetLog with a start outside the stored range, under all
/// four combinations of answers; start 0 never fails (B2).
#[tokio::test]
async fn get_log_outside_the_stored_range_every_answer() {
    let mut opts = SimOptions::with_devices(2);
    opts.model.log_capacity = 10;
    opts.model.devices[0].first_event_id = 1000;
    opts.model.preconnect = true; // about GetLog, not registration
    let defaults = opts.model.policies;
    assert_eq!(defaults.stale_start, StaleStart::OutOfRange);
    assert_eq!(defaults.past_newest, PastNewest::OutOfRange);
    let sim = sim_with(opts).await;
    let gw = client(&sim);
    let (d, empty) = (sim.device_ids()[0], sim.device_ids()[1]);
    for i in 0..25 {
        sim.event_on_device(d, codes::VERIFY_SUCCESS, &i.to_string())
            .unwrap();
    }
    // Stored: 1015..=1024; the other device's log is empty.
    let ids = |v: Vec<usersync::proto::gsdk::event::EventLog>| {
        v.into_iter().map(|e| e.id).collect::<Vec<_>>()
    };
    for stale in [StaleStart::Clamp, StaleStart::OutOfRange] {
        for past in [PastNewest::Empty, PastNewest::OutOfRange] {
            sim.set_policies(Policies {
                stale_start: stale,
                past_newest: past,
                ..defaults
            });
            let case = format!("{stale:?}/{past:?}");
            // Inside the range, and start 0: the same under every answer.
            assert_eq!(
                ids(gw.get_log(d, 0, 0).await.unwrap()),
                (1015..=1024).collect::<Vec<_>>(),
                "{case}"
            );
            assert!(gw.get_log(empty, 0, 0).await.unwrap().is_empty(), "{case}");
            assert_eq!(
                ids(gw.get_log(d, 1020, 0).await.unwrap()),
                (1020..=1024).collect::<Vec<_>>(),
                "{case}"
            );
            assert_eq!(ids(gw.get_log(d, 1024, 0).await.unwrap()), vec![1024]);

            // Older than the oldest.
            let older = gw.get_log(d, 1001, 2).await;
            match stale {
                StaleStart::Clamp => assert_eq!(ids(older.unwrap()), vec![1015, 1016]),
                StaleStart::OutOfRange => {
                    let err = older.unwrap_err();
                    assert_eq!(err.code(), Some(Code::OutOfRange), "{case}");
                    assert!(err.to_string().contains("1015"), "{case}: {err}");
                }
            }
            // Past the newest: newest + 1 (the resume point when nothing is
            // new), far beyond, and any start but 0 on an empty log.
            for (dev, start) in [(d, 1025), (d, 5000), (empty, 1), (empty, 1025)] {
                let past_newest = gw.get_log(dev, start, 0).await;
                match past {
                    PastNewest::Empty => assert!(past_newest.unwrap().is_empty(), "{case}"),
                    PastNewest::OutOfRange => {
                        let err = past_newest.unwrap_err();
                        assert_eq!(err.code(), Some(Code::OutOfRange), "{case}");
                        if dev == d {
                            assert!(err.to_string().contains("1024"), "{case}: {err}");
                        }
                    }
                }
            }
        }
    }
}

/// Device commands take the device latency once per call (a Multi call
/// runs on its devices in parallel, B22), on top of the method latency;
/// calls the gateway answers itself do not.
#[tokio::test]
async fn device_latency_applies_to_device_commands_only() {
    const LATENCY: Duration = Duration::from_millis(250);
    let sim = sim_registered(Api::V1_8, 3).await;
    assert_eq!(sim.device_latency(), Duration::ZERO, "default");
    let gw = client(&sim);
    let ids = sim.device_ids();
    sim.set_device_latency(LATENCY);
    let user = users::generate("9", 0, Numbering::V18, Default::default());

    let t = tokio::time::Instant::now();
    gw.user_enroll_multi(ids.clone(), vec![user.clone()], true)
        .await
        .unwrap();
    assert!(t.elapsed() >= LATENCY, "EnrollMulti: {:?}", t.elapsed());
    let t = tokio::time::Instant::now();
    gw.enable_monitoring_multi(ids.clone()).await.unwrap();
    assert!(t.elapsed() >= LATENCY, "EnableMonitoringMulti");
    let t = tokio::time::Instant::now();
    gw.user_get(ids[0], vec!["9".into()]).await.unwrap();
    assert!(t.elapsed() >= LATENCY, "Get");
    let t = tokio::time::Instant::now();
    gw.user_delete_all_multi(ids.clone()).await.unwrap();
    assert!(t.elapsed() >= LATENCY, "DeleteAllMulti");
    // Added to the method's own latency.
    sim.set_latency("GetLog", LATENCY);
    let t = tokio::time::Instant::now();
    gw.get_log(ids[0], 0, 0).await.unwrap();
    assert!(t.elapsed() >= 2 * LATENCY, "GetLog: {:?}", t.elapsed());
    sim.set_latency("GetLog", Duration::ZERO);

    // With devices that take an hour, the gateway still answers what it
    // knows itself, while a device command stays pending.
    sim.set_device_latency(Duration::from_secs(3600));
    sim.set_stream_headers(StreamHeaders::Eager);
    within("GetDeviceList", gw.get_device_list()).await.unwrap();
    within(
        "AddAsyncConnection",
        gw.add_async_connection(vec![async_info(ids[0])]),
    )
    .await
    .unwrap();
    within("GetInfo", gw.admin_get_info()).await.unwrap();
    within("SubscribeStatus", gw.subscribe_status(8))
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(STILL_PENDING, gw.get_log(ids[0], 0, 0))
            .await
            .is_err(),
        "GetLog answered without the device latency"
    );
}

/// B14: devices are unknown to the gateway until a client adds them (the
/// default), and unknown again after a gateway restart; with preconnect the
/// gateway registers them at start and after every restart.
#[tokio::test]
async fn devices_unknown_until_added_and_again_after_a_restart() {
    let sim = sim(Api::V1_8, 3).await;
    assert!(!sim.preconnect(), "default");
    let gw = client(&sim);
    let ids = sim.device_ids();
    assert!(gw.get_device_list().await.unwrap().is_empty());
    let err = gw.get_log(ids[0], 0, 0).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");

    gw.add_async_connection(ids.iter().map(|d| async_info(*d)).collect())
        .await
        .unwrap();
    let list = gw.get_device_list().await.unwrap();
    assert_eq!(list.len(), 3);
    assert!(
        list.iter()
            .all(|d| d.status == DevStatus::TcpConnected as i32)
    );
    gw.get_log(ids[0], 0, 0).await.unwrap();

    sim.restart(Duration::from_millis(50)).await.unwrap();
    eventually("gateway back, its device list lost", || async {
        gw.get_device_list().await.is_ok_and(|l| l.is_empty())
    })
    .await;
    assert!(!sim.is_connected(ids[0]));

    sim.set_preconnect(true);
    sim.restart(Duration::from_millis(50)).await.unwrap();
    eventually("gateway back with every device registered", || async {
        gw.get_device_list().await.is_ok_and(|l| l.len() == 3)
    })
    .await;
    gw.get_log(ids[0], 0, 0).await.unwrap();
}

/// What a harness needs: wake on user-table changes instead of polling,
/// check single users without copying tables, and bulk history.
#[tokio::test]
async fn harness_waits_for_user_changes_without_polling() {
    let mut opts = SimOptions::with_devices(3);
    opts.model.preconnect = true;
    opts.model.log_capacity = 1_000_000;
    let sim = sim_with(opts).await;
    let gw = client(&sim);
    let ids = sim.device_ids();
    let (source, targets) = (ids[0], ids[1..].to_vec());
    sim.enroll_on_device(source, "77").unwrap();
    let raw = sim.user_bytes(source, "77").expect("enrolled");

    let mut changed = sim.users_changed();
    changed.borrow_and_update();
    let writer = tokio::spawn({
        let gw = gw.clone();
        let (targets, raw) = (targets.clone(), raw.clone());
        async move {
            for t in targets {
                gw.user_enroll(t, vec![raw.clone()], true).await.unwrap();
            }
        }
    });
    let on_all = |sim: &Simulator| targets.iter().all(|t| sim.holds_exactly(*t, "77", &raw));
    while !on_all(&sim) {
        within("a user table changes", changed.changed())
            .await
            .unwrap();
    }
    within("writer", writer).await.unwrap();
    assert!(targets.iter().all(|t| sim.holds(*t, "77")));
    assert_eq!(sim.user_count(targets[0]), 1);
    assert_eq!(sim.user_bytes(targets[1], "77"), Some(raw));
    assert_eq!(sim.user_bytes(targets[1], "78"), None);

    // Bulk history: one lock, read back over the wire.
    let (first, last) = sim
        .append_events(source, 200_000, codes::VERIFY_SUCCESS)
        .unwrap();
    assert_eq!((first, last), (2, 200_001));
    assert_eq!(gw.get_log(source, 0, 0).await.unwrap().len(), 200_001);
    let tail = gw.get_log(source, 199_990, 0).await.unwrap();
    assert_eq!(tail.len(), 12);
    assert!(tail.iter().all(|e| e.event_code == codes::VERIFY_SUCCESS));
    assert!(!changed.has_changed().unwrap(), "no user changed");
}

/// A held device answers nothing: calls that address it wait (and are
/// counted) until it is released or their client gives up; the gateway and
/// the other devices answer meanwhile.
#[tokio::test]
async fn a_held_device_answers_nothing_until_released() {
    let sim = sim_registered(Api::V1_8, 2).await;
    let gw = client(&sim);
    let (d, other) = (sim.device_ids()[0], sim.device_ids()[1]);
    sim.hold_device(d, true);
    let held = tokio::spawn({
        let gw = gw.clone();
        async move { gw.get_log(d, 0, 0).await }
    });
    let mut cancelled = Box::pin(gw.user_delete_all_multi(vec![other, d]));
    assert!(
        tokio::time::timeout(STILL_PENDING, &mut cancelled)
            .await
            .is_err()
    );
    eventually("both calls wait on the held device", || async {
        sim.held_calls(d) == 2
    })
    .await;
    within("GetDeviceList", gw.get_device_list()).await.unwrap();
    within("the other device", gw.get_log(other, 0, 0))
        .await
        .unwrap();
    drop(cancelled);
    eventually("the cancelled call stops waiting", || async {
        sim.held_calls(d) == 1
    })
    .await;
    sim.enroll_on_device(d, "1").unwrap(); // it keeps logging
    sim.hold_device(d, false);
    let log = within("released call", held).await.unwrap().unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(sim.held_calls(d), 0);
}
