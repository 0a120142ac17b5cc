//! Every file in `config/` and every fixture under
//! `tests/fixtures/config/{valid,invalid}/` is parsed; invalid ones must fail
//! with the file, the line and the reason their first line announces
//! (`# expect: LINE: TEXT`), and the binary must exit 78 for them.

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
    ] {
        assert!(
            text.contains(&format!("{key} =")),
            "config/usersync.toml does not show {key}"
        );
    }
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

#[test]
fn the_binary_exits_78_on_invalid_config() {
    let bin = env!("CARGO_BIN_EXE_usersync");
    let bad = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config/invalid/duplicate-device.toml");
    for args in [
        vec!["check-config".to_owned(), bad.display().to_string()],
        vec![
            "run".to_owned(),
            "--config".to_owned(),
            bad.display().to_string(),
        ],
    ] {
        let out = Command::new(bin).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(78), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("{}:18: device 1 is declared twice", bad.display())),
            "{stderr}"
        );
    }
    let missing = Command::new(bin)
        .args(["check-config", "/nonexistent/usersync.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(78));

    let (_dir, good) = with_ca(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/usersync.toml"));
    let out = Command::new(bin)
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
