use super::checks::check_state_dir;
use super::*;

const GOOD: &str = r#"
[gateway]
address = "127.0.0.1:4000"
tls = false

[state]
dir = "/var/lib/usersync"

[[device]]
id = 1
address = "192.0.2.1"

[[device]]
id = 2
address = "192.0.2.2"
port = 51212
tls = true

[[group]]
name = "main"
sources = [1]
targets = [2]
"#;

fn parse_str(text: &str) -> Result<Config, ConfigError> {
    parse(Path::new("/etc/usersync/usersync.toml"), text)
}

#[test]
fn good_config_gets_defaults() {
    let c = parse_str(GOOD).unwrap();
    assert_eq!(c.gateway.api, Api::V1_8);
    assert_eq!(c.devices[&1].port, 51211);
    assert!(!c.devices[&1].tls);
    assert!(c.devices[&2].tls);
    assert!(!c.groups[0].prune);
    assert!(!c.groups[0].propagate_delete_all);
    assert_eq!(c.sync, SyncConfig::default());
    assert!(c.is_source(1) && !c.is_source(2));
    assert!(c.gateway.settings().tls.is_none());
}

fn expect_err(text: &str, line: Option<usize>, needle: &str) {
    let e = parse_str(text).unwrap_err();
    assert_eq!(e.line, line, "{e}");
    assert!(e.reason.contains(needle), "{e}");
    assert!(e.to_string().starts_with("/etc/usersync/usersync.toml"));
}

#[test]
fn errors_name_line_and_reason() {
    expect_err(
        &GOOD.replace("tls = false", "tls = false\ncolour = 1"),
        Some(5),
        "colour",
    );
    expect_err(
        &GOOD.replace("id = 2", "id = 1"),
        Some(14),
        "declared twice",
    );
    expect_err(
        &GOOD.replace("targets = [2]", "targets = [3]"),
        Some(22),
        "no [[device]] declares",
    );
    expect_err(
        &GOOD.replace("targets = [2]", "targets = [2, 1]"),
        Some(22),
        "both a source and a target",
    );
    expect_err(
        &GOOD.replace("targets = [2]", "targets = []"),
        Some(22),
        "must not be empty",
    );
    expect_err(
        &GOOD.replace("tls = false\n", ""),
        Some(2),
        "ca_file is required",
    );
    expect_err(
        &GOOD.replace("127.0.0.1:4000", "localhost"),
        Some(3),
        "host:port",
    );
    expect_err(
        &GOOD.replace("tls = false", "tls = false\napi = \"1.8\""),
        Some(5),
        "unknown api",
    );
    expect_err(
        &GOOD.replace("/var/lib/usersync", "relative"),
        Some(7),
        "absolute",
    );
    expect_err(&GOOD.replace("id = 1\n", "id = \"one\"\n"), Some(10), "");
}

#[test]
fn unreadable_ca_file_is_an_error() {
    let text = GOOD.replace("tls = false", "ca_file = \"/nonexistent/ca.crt\"");
    let e = parse_str(&text).unwrap_err();
    assert!(e.reason.contains("cannot read"), "{e}");
    assert_eq!(e.line, Some(4));
}

#[test]
fn gateway_addresses_are_host_and_port() {
    for good in [
        "127.0.0.1:4000",
        "gw.example:4000",
        "gateway:1",
        "[::1]:4000",
        "[fd00::2]:65535",
        "site_gw-2.local:4000",
    ] {
        assert_eq!(check_host_port(good), Ok(()), "{good}");
    }
    for (bad, why) in [
        ("::1", "brackets"),
        ("::1:4000", "brackets"),
        ("http://h:1", "not a URL"),
        ("https://gw.example:4000", "not a URL"),
        ("h :1", "spaces"),
        (" gw:4000", "spaces"),
        (":4000", "no host"),
        ("", "empty"),
        ("gw", "no port"),
        ("gw:", "not a number"),
        ("gw:0", "out of range"),
        ("gw:65536", "out of range"),
        ("gw:99999999999", "out of range"),
        ("gw:40a", "not a number"),
        ("[::1]", "no port"),
        ("[::1:4000", "no ']'"),
        ("[gw]:4000", "not an IPv6 address"),
        ("g/w:4000", "not a host name"),
        ("-gw:4000", "not a host name"),
    ] {
        let e = check_host_port(bad).unwrap_err();
        assert!(e.contains(why), "{bad:?}: {e}");
    }
    // Named with key and line in the file.
    expect_err(
        &GOOD.replace("127.0.0.1:4000", "::1"),
        Some(3),
        "gateway.address \"::1\": an IPv6 address goes in brackets",
    );
    expect_err(
        &GOOD.replace("127.0.0.1:4000", "http://gw:4000"),
        Some(3),
        "not a URL",
    );
}

#[test]
fn a_ca_file_must_hold_certificates_the_client_can_use() {
    let dir = tempfile::tempdir().unwrap();
    let certs = crate::sim::tls::generate(&["localhost"]).unwrap();
    certs.write_ca(dir.path()).unwrap();
    let good = std::fs::read(dir.path().join("ca.crt")).unwrap();
    assert_eq!(check_ca(&good), Ok(()));
    let garbage_b64 =
        b"-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n";
    assert!(check_ca(garbage_b64).unwrap_err().contains("not valid PEM"));
    let garbage_der = b"-----BEGIN CERTIFICATE-----\nSGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n";
    assert!(
        check_ca(garbage_der)
            .unwrap_err()
            .contains("not a usable CA certificate")
    );
    assert!(
        check_ca(b"hello")
            .unwrap_err()
            .contains("no PEM certificate")
    );
    // In a file: named with key, path and line.
    let path = dir.path().join("bad.crt");
    std::fs::write(&path, garbage_der).unwrap();
    let text = GOOD.replace("tls = false", &format!("ca_file = \"{}\"", path.display()));
    let e = parse_str(&text).unwrap_err();
    assert_eq!(e.line, Some(4), "{e}");
    assert!(
        e.reason.contains(&format!(
            "gateway.ca_file {}: certificate 1",
            path.display()
        )),
        "{e}"
    );
}

#[test]
fn a_server_name_must_be_a_name() {
    expect_err(
        &GOOD.replace("tls = false", "tls = false\nserver_name = \"not a name\""),
        Some(5),
        "gateway.server_name",
    );
}

#[test]
fn a_target_of_two_groups_is_rejected() {
    let text = format!(
        "{GOOD}\n[[device]]\nid = 3\naddress = \"x\"\n[[group]]\nname = \"two\"\nsources = [3]\ntargets = [2]\n"
    );
    let e = parse_str(&text).unwrap_err();
    assert_eq!(e.line, Some(30), "{e}");
    for needle in [
        "group \"two\": device 2 is already a target of group \"main\"",
        "prune and delete-all",
    ] {
        assert!(e.reason.contains(needle), "{e}");
    }
    // Two groups may share a source: reading it twice harms nobody.
    let text = format!(
        "{GOOD}\n[[device]]\nid = 3\naddress = \"x\"\n[[group]]\nname = \"two\"\nsources = [1]\ntargets = [3]\n"
    );
    parse_str(&text).unwrap();
}

#[test]
fn a_source_of_a_later_group_that_targets_it_is_a_chain() {
    // The target comes first, then a group makes it a source…
    let text = format!(
        "{GOOD}\n[[device]]\nid = 3\naddress = \"x\"\n[[group]]\nname = \"two\"\nsources = [2]\ntargets = [3]\n"
    );
    assert!(parse_str(&text).unwrap_err().reason.contains("chains"));
    // …or the source comes first, then a group targets it.
    let text = format!(
        "{GOOD}\n[[device]]\nid = 3\naddress = \"x\"\n[[group]]\nname = \"two\"\nsources = [3]\ntargets = [1]\n"
    );
    let e = parse_str(&text).unwrap_err();
    assert!(
        e.reason.contains("device 1 is a source of another group"),
        "{e}"
    );
}

#[test]
fn plaintext_and_exposed_metrics_are_warned_about() {
    let c = parse_str(&format!("{GOOD}\n[metrics]\nlisten = \"0.0.0.0:9187\"\n")).unwrap();
    let w = warnings(&c);
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].contains("tls = false") && w[0].contains("plaintext"),
        "{w:?}"
    );
    assert!(
        w[1].contains("0.0.0.0:9187") && w[1].contains("not a loopback"),
        "{w:?}"
    );
    let c = parse_str(&format!("{GOOD}\n[metrics]\nlisten = \"[::1]:9187\"\n")).unwrap();
    assert_eq!(warnings(&c).len(), 1);
}

#[test]
fn the_state_dir_must_take_a_file_or_be_creatable() {
    let dir = tempfile::tempdir().unwrap();
    assert!(check_state_dir(dir.path()).is_ok());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "probe removed"
    );
    assert!(check_state_dir(&dir.path().join("new/deeper")).is_ok());
    assert!(!dir.path().join("new").exists(), "nothing created");
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    for bad in [file.clone(), file.join("state")] {
        let (what, e) = check_state_dir(&bad).unwrap_err();
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::NotADirectory,
            "{bad:?}: {what}: {e}"
        );
    }
    let dangling = dir.path().join("link");
    std::os::unix::fs::symlink(dir.path().join("gone"), &dangling).unwrap();
    let (what, _) = check_state_dir(&dangling).unwrap_err();
    assert!(what.contains("symbolic link"), "{what}");
    let mut c = parse_str(GOOD).unwrap();
    c.state_dir = file.join("state");
    let e = check_runnable(&c).unwrap_err();
    assert!(matches!(e, Unrunnable::Config(_)), "{e}");
    assert!(e.to_string().contains("state.dir"), "{e}");
    c.state_dir = dir.path().join("state");
    check_runnable(&c).unwrap();
}

#[test]
fn a_device_address_has_no_port() {
    let text = GOOD.replace("address = \"192.0.2.1\"", "address = \"192.0.2.1:51211\"");
    let e = parse_str(&text).unwrap_err();
    assert!(
        e.reason
            .contains("has a port in it; write address = \"192.0.2.1\" and port = 51211"),
        "{e}"
    );
    for ok in ["192.0.2.1", "fd00::1", "reader-1.site.local"] {
        assert!(check_device_host(ok).is_ok(), "{ok}");
    }
    for bad in ["[fd00::1]", "reader 1", "http://x", "x:1"] {
        assert!(check_device_host(bad).is_err(), "{bad}");
    }
}

#[test]
fn type_errors_are_said_in_words() {
    let text = GOOD.replace("id = 1", "id = \"one\"");
    let e = parse_str(&text).unwrap_err();
    assert!(
            e.reason
                .contains("id: invalid type: string \"one\", expected a device ID, a whole number between 1 and 4294967295"),
            "{e}"
        );
    assert!(!e.reason.contains("u32"), "{e}");
    assert_eq!(
        in_words("invalid value: integer `-1`, expected u16", Some("port")),
        "port: invalid value: integer `-1`, expected a port, a whole number between 1 and 65535"
    );
}

#[test]
fn reload_summaries_read_as_words() {
    let d = [
        Change::AddDevice(5),
        Change::AddDevice(6),
        Change::ChangeGroup("main".into()),
    ];
    assert_eq!(summary(&d), "devices added: 5 6; groups changed: main");
    assert_eq!(summary(&[]), "no device or group changed");
}

#[test]
fn files_the_service_cannot_read_are_named() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let f = dir.path().join("usersync.toml");
    std::fs::write(&f, GOOD).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    let c = parse(&f, GOOD).unwrap();
    let w = unreadable_by_service(&c);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("chmod o+r"), "{w:?}");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(unreadable_by_service(&c).is_empty());
}

#[test]
fn chains_of_groups_are_rejected() {
    let text = format!(
        "{GOOD}\n[[device]]\nid = 3\naddress = \"x\"\n[[group]]\nname = \"two\"\nsources = [2]\ntargets = [3]\n"
    );
    let e = parse_str(&text).unwrap_err();
    assert!(e.reason.contains("chains"), "{e}");
}
