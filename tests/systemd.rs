//! The systemd unit: the directives the service relies on are there, and
//! `systemd-analyze` verifies it and rates its exposure at 2.0 or less.
//!
//! `USERSYNC_SYSTEMD_ANALYZE` names the systemd-analyze to use (`.ci/run`
//! provides one of systemd ≥ 253, which knows `Type=notify-reload`);
//! otherwise the one on PATH. An older one cannot parse `notify-reload` and
//! `ReloadSignal=`; its complaints about exactly those are reported, every
//! other finding fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;

fn unit_text() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/usersync.service"))
        .unwrap()
}

#[test]
fn unit_has_the_directives_the_daemon_relies_on() {
    let text = unit_text();
    for line in [
        "Type=notify-reload",
        "ExecStart=/usr/bin/usersync run --config /etc/usersync/usersync.toml",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "WatchdogSec=60s",
        "DynamicUser=yes",
        "StateDirectory=usersync",
        "StateDirectoryMode=0700",
        "ConfigurationDirectory=usersync",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "NotifyAccess=main",
        "LimitCORE=0",
    ] {
        assert!(text.lines().any(|l| l == line), "unit lacks {line:?}");
    }
}

/// `RestartPreventExitStatus=` applies to the main process only (systemd
/// issue #11868): an `ExecStartPre=` that exits 78 is restarted every
/// `RestartSec` forever. The config is checked by `run` itself, which
/// exits 78 (tests/config_files.rs runs it on every invalid fixture).
#[test]
fn a_bad_config_stops_the_retries() {
    let text = unit_text();
    let pre: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("ExecStartPre=") || l.starts_with("ExecCondition="))
        .collect();
    assert!(
        pre.is_empty(),
        "a pre-start command's exit 78 would not stop Restart=on-failure: {pre:?}"
    );
    let restart = text.lines().find(|l| l.starts_with("Restart=")).unwrap();
    assert_eq!(restart, "Restart=on-failure");
    assert!(
        text.lines()
            .any(|l| l.starts_with("RestartPreventExitStatus=")
                && l.split(['=', ' ']).any(|v| v == "78"))
    );
}

fn analyzer() -> (PathBuf, Option<String>) {
    let bin = std::env::var_os("USERSYNC_SYSTEMD_ANALYZE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("systemd-analyze"));
    let lib = std::env::var("USERSYNC_SYSTEMD_LIBDIR").ok();
    (bin, lib)
}

fn analyze(args: &[&str], unit: &Path) -> std::process::Output {
    let (bin, lib) = analyzer();
    let mut cmd = Command::new(&bin);
    if let Some(lib) = lib {
        cmd.env("LD_LIBRARY_PATH", lib);
    }
    cmd.args(args).arg(unit).output().unwrap_or_else(|e| {
        panic!(
            "cannot run {} ({e}); install systemd or set USERSYNC_SYSTEMD_ANALYZE",
            bin.display()
        )
    })
}

/// The unit with its binary paths pointing at the binary under test.
fn unit_for_test(dir: &Path) -> PathBuf {
    let text = unit_text().replace("/usr/bin/usersync", env!("CARGO_BIN_EXE_usersync"));
    let path = dir.join("usersync.service");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn systemd_analyze_verifies_the_unit_and_rates_it_safe() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_test(dir.path());

    let out = analyze(&["verify"], &unit);
    let findings =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let old_systemd = |l: &str| {
        l.contains("Failed to parse service type, ignoring: notify-reload")
            || l.contains("Unknown key 'ReloadSignal'")
    };
    let mut tolerated = Vec::new();
    for line in findings.lines().filter(|l| !l.trim().is_empty()) {
        if old_systemd(line) {
            tolerated.push(line.to_owned());
        } else {
            panic!("systemd-analyze verify: {line}\n(all output:\n{findings})");
        }
    }
    assert!(out.status.success(), "verify failed:\n{findings}");
    if !tolerated.is_empty() {
        eprintln!("systemd older than 253 here; notify-reload not checked: {tolerated:?}");
    }

    let out = analyze(&["security", "--offline=yes"], &unit);
    let text = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for usersync.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    eprintln!("systemd-analyze security exposure: {exposure}");
    assert!(exposure <= 2.0, "exposure {exposure} > 2.0:\n{text}");
}
