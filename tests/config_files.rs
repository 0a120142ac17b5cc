//! Every file in `config/` and every fixture under
//! `tests/fixtures/config/{valid,invalid}/` is parsed; invalid ones must fail
//! with the file, the line and the reason their first line announces
//! (`# expect: LINE: TEXT`), and the binary must exit 78 for them, from
//! `check-config` and from `run` alike (the unit relies on `run` exiting 78
//! to stop retrying). A valid file whose state directory cannot be used
//! fails both the same way. Files the service's user could not read are
//! warned about; the demo configuration is shipped in the package.

use std::path::{Path, PathBuf};
use std::process::Command;

fn files(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no files in {dir}");
    v
}

/// Copies `file` into a fresh directory with a real CA beside it and every
/// `ca_file` pointing there, so the rest of the file is what is tested.
fn with_ca(file: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let certs = usersync::sim::tls::generate(&["localhost"]).unwrap();
    certs.write_ca(dir.path()).unwrap();
    let text: String = std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("ca_file") {
                "ca_file = \"ca.crt\"".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = dir.path().join(file.file_name().unwrap());
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn shipped_and_valid_configs_parse() {
    let mut all = files("config");
    all.extend(files("tests/fixtures/config/valid"));
    for file in all {
        let (_dir, path) = with_ca(&file);
        let cfg = usersync::config::load(&path)
            .unwrap_or_else(|e| panic!("{} should be valid: {e}", file.display()));
        assert_eq!(cfg.path, path);
    }
}

#[test]
fn the_shipped_example_documents_every_group_and_device_key() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/usersync.toml"))
            .unwrap();
    for key in [
        "address",
        "tls",
        "ca_file",
        "server_name",
        "api",
        "keepalive_interval_secs",
        "keepalive_timeout_secs",
        "connect_timeout_secs",
        "call_timeout_secs",
        "dir",
        "batch_users",
        "batch_bytes",
        "poll_interval_secs",
        "tail_check_delay_ms",
        "idle_check_interval_secs",
        "device_concurrency",
        "realtime_queue",
        "quarantine_after",
        "events",
        "id",
        "port",
        "name",
        "sources",
        "targets",
        "prune",
        "propagate_delete_all",
        "mode",
        "members",
        "echo_detection",
        "max_clock_skew_secs",
        "listen",
    ] {
        assert!(
            text.contains(&format!("{key} =")),
            "config/usersync.toml does not show {key}"
        );
    }
}

/// The all-keys fixture sets every key the shipped example shows (and
/// validation accepts it: `shipped_and_valid_configs_parse`).
#[test]
fn the_all_keys_fixture_sets_every_key() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let keys = |file: &str| -> std::collections::BTreeSet<String> {
        std::fs::read_to_string(root.join(file))
            .unwrap()
            .lines()
            .map(|l| l.trim_start_matches('#').trim())
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.to_owned()))
            .filter(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .collect()
    };
    let shown = keys("config/usersync.toml");
    let set = keys("tests/fixtures/config/valid/two-groups-all-keys.toml");
    let missing: Vec<_> = shown.difference(&set).collect();
    assert!(
        missing.is_empty(),
        "two-groups-all-keys.toml lacks {missing:?}"
    );
    let cfg = with_ca(&root.join("tests/fixtures/config/valid/two-groups-all-keys.toml"));
    let cfg = usersync::config::load(&cfg.1).unwrap();
    assert_eq!(
        cfg.sync.tail_check_delay,
        std::time::Duration::from_millis(250)
    );
    assert_eq!(
        cfg.sync.idle_check_interval,
        std::time::Duration::from_secs(900)
    );
    assert_eq!(cfg.sync.device_concurrency, 4);
}

fn expectation(file: &Path) -> (Option<usize>, String) {
    let text = std::fs::read_to_string(file).unwrap();
    let first = text.lines().next().unwrap_or_default();
    let spec = first.strip_prefix("# expect: ").unwrap_or_else(|| {
        panic!(
            "{}: first line must be `# expect: LINE: TEXT`",
            file.display()
        )
    });
    let (line, reason) = spec
        .split_once(": ")
        .unwrap_or((spec.trim_end_matches(':'), ""));
    (line.parse().ok(), reason.to_owned())
}

#[test]
fn invalid_configs_name_file_line_and_reason() {
    for file in files("tests/fixtures/config/invalid") {
        let (line, reason) = expectation(&file);
        let err = match usersync::config::load(&file) {
            Ok(_) => panic!("{} should be invalid", file.display()),
            Err(e) => e,
        };
        assert_eq!(err.file, file);
        if line.is_some() {
            assert_eq!(err.line, line, "{}: {err}", file.display());
        }
        assert!(
            err.reason.contains(&reason),
            "{}: expected {reason:?} in {err}",
            file.display()
        );
    }
}

fn usersync(args: &[&std::ffi::OsStr]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_usersync"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `check-config FILE` and `run --config FILE`.
fn both(file: &Path) -> [Vec<&std::ffi::OsStr>; 2] {
    [
        vec!["check-config".as_ref(), file.as_os_str()],
        vec!["run".as_ref(), "--config".as_ref(), file.as_os_str()],
    ]
}

#[test]
fn the_binary_exits_78_on_invalid_config() {
    for file in files("tests/fixtures/config/invalid") {
        let (line, reason) = expectation(&file);
        let at = match line {
            Some(line) => format!("{}:{line}: ", file.display()),
            None => format!("{}", file.display()),
        };
        for args in both(&file) {
            let (code, _, stderr) = usersync(&args);
            assert_eq!(code, Some(78), "{args:?}: {stderr}");
            assert!(
                stderr.contains(&at) && stderr.contains(&reason),
                "{args:?}: expected {at:?} and {reason:?} in {stderr}"
            );
        }
    }
    let (code, _, _) = usersync(&[
        "check-config".as_ref(),
        "/nonexistent/usersync.toml".as_ref(),
    ]);
    assert_eq!(code, Some(78));

    // The shipped file with a real CA and a state directory this test owns.
    let (dir, good) = with_ca(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/usersync.toml"));
    let text = std::fs::read_to_string(&good).unwrap().replace(
        "dir = \"/var/lib/usersync\"",
        &format!("dir = \"{}\"", dir.path().join("state").display()),
    );
    std::fs::write(&good, text).unwrap();
    let (code, stdout, stderr) = usersync(&["check-config".as_ref(), good.as_os_str()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("valid (3 devices, 1 group)"), "{stdout}");
    assert!(
        stderr.contains("only /var/lib/usersync writable"),
        "a state dir other than the unit's gets a note: {stderr}"
    );
    assert!(
        !dir.path().join("state").exists(),
        "check-config creates nothing"
    );
}

/// A valid file whose state directory cannot be used (here: beneath a
/// regular file, as a read-only or foreign directory would be under the
/// unit's sandbox) fails `check-config` and `run` with 78, naming the key.
#[test]
fn an_unusable_state_dir_exits_78_from_check_config_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    for state in [file.clone(), file.join("state")] {
        let cfg = dir.path().join("usersync.toml");
        std::fs::write(
            &cfg,
            format!(
                "[gateway]\naddress = \"127.0.0.1:1\"\ntls = false\n[state]\ndir = \"{}\"\n",
                state.display()
            ),
        )
        .unwrap();
        for args in both(&cfg) {
            let (code, _, stderr) = usersync(&args);
            assert_eq!(code, Some(78), "{args:?}: {stderr}");
            assert!(
                stderr.contains(&format!(
                    "{}: state.dir {}: cannot be",
                    cfg.display(),
                    state.display()
                )),
                "{args:?}: {stderr}"
            );
        }
    }
}

/// Plaintext to the gateway works, but `check-config` says what it
/// exposes (the daemon logs the same warning at start: tests/service.rs).
#[test]
fn check_config_warns_about_plaintext() {
    let (dir, file) = with_ca(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/config/valid/minimal-plaintext.toml"),
    );
    let text = std::fs::read_to_string(&file).unwrap().replace(
        "/var/lib/usersync",
        &dir.path().join("state").display().to_string(),
    );
    std::fs::write(&file, text).unwrap();
    let (code, _, stderr) = usersync(&["check-config".as_ref(), file.as_os_str()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: gateway.tls = false") && stderr.contains("plaintext"),
        "{stderr}"
    );
}

/// `check-config` runs as root (sudo); the unit's dynamic user reads only
/// what others may read. A config or CA it could not read is warned about.
#[test]
fn check_config_warns_about_files_the_service_cannot_read() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, file) = with_ca(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/config/valid/minimal-plaintext.toml"),
    );
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ca = dir.path().join("ca.crt");
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace(
            "/var/lib/usersync",
            &dir.path().join("state").display().to_string(),
        )
        .replace("tls = false", &format!("ca_file = \"{}\"", ca.display()));
    std::fs::write(&file, text).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, stderr) = usersync(&["check-config".as_ref(), file.as_os_str()]);
    assert_eq!(code, Some(0), "{stderr}");
    for f in [&file, &ca] {
        assert!(
            stderr.contains(&format!(
                "{} is not readable by the service's user (mode 600: `sudo chmod o+r {}`)",
                f.display(),
                f.display()
            )),
            "{stderr}"
        );
    }
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (_, _, stderr) = usersync(&["check-config".as_ref(), file.as_os_str()]);
    assert!(!stderr.contains("not readable"), "{stderr}");
}

/// The README's two-terminal walkthrough works installed: the package
/// ships the demo configuration, the README gives the installed commands,
/// and the package check looks for it.
#[test]
fn the_demo_config_is_shipped() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let installed = "/usr/share/doc/usersync/examples/demo.toml";
    assert!(
        cargo.contains(
            "[\"config/demo.toml\", \"usr/share/doc/usersync/examples/demo.toml\", \"644\"]"
        ),
        "Cargo.toml's deb assets do not ship config/demo.toml"
    );
    let check = std::fs::read_to_string(root.join("packaging/check-deb.sh")).unwrap();
    assert!(
        check.contains("examples/demo\\.toml"),
        "check-deb.sh does not check it"
    );
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for cmd in [
        "usersync sim --devices 3 --cert-dir /tmp/usersync-demo".to_owned(),
        format!("usersync run --config {installed}"),
    ] {
        assert!(readme.contains(&cmd), "README lacks {cmd:?}");
    }
    // The shipped demo config is what the simulator's defaults serve.
    let demo = std::fs::read_to_string(root.join("config/demo.toml")).unwrap();
    assert!(demo.contains("address = \"127.0.0.1:4000\""));
    assert!(demo.contains("ca_file = \"/tmp/usersync-demo/ca.crt\""));
}

/// A state directory that is a link to nowhere passed `check-config` and
/// then failed `run` with exit 1 ("File exists"): both exit 78 now, naming
/// the link.
#[test]
fn a_state_dir_behind_a_dangling_link_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("state");
    std::os::unix::fs::symlink(dir.path().join("gone"), &link).unwrap();
    let cfg = dir.path().join("usersync.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\naddress = \"127.0.0.1:1\"\ntls = false\n[state]\ndir = \"{}\"\n",
            link.display()
        ),
    )
    .unwrap();
    for args in both(&cfg) {
        let (code, _, stderr) = usersync(&args);
        assert_eq!(code, Some(78), "{args:?}: {stderr}");
        assert!(
            stderr.contains("is a symbolic link to a directory that does not exist"),
            "{args:?}: {stderr}"
        );
    }
}
