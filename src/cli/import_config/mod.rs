//! `usersync import-config`: Suprema's `sync_config.json` converted to our
//! configuration and its `last_event_id`s seeded as checkpoints — all or
//! nothing, with the daemon stopped.

use std::path::{Path, PathBuf};

use crate::cli::{CliError, Daemon, daemon, plural};
use crate::store::{self, Store, StoreError};

mod example;

pub use example::{ExampleConfig, ExampleDevice, import_text};
use example::{check_example, json_key_at};

/// Where the converted configuration points. Paths are as the operator
/// gave them; [`import_config`] resolves them against the current
/// directory.
#[derive(Debug, Clone)]
pub struct ImportTarget {
    pub gateway: String,
    pub ca_file: PathBuf,
    pub state_dir: PathBuf,
    pub api: crate::wire::Api,
}

/// Why this user cannot write in `dir`, in words with the next step.
fn unwritable(flag: &str, path: &Path, dir: &Path, e: &std::io::Error) -> CliError {
    let why = match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "directory {} does not exist (create it, or pass {flag} with another path)",
            dir.display()
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "this user may not write in {} (run it with sudo, or pass {flag} with a path of yours)",
            dir.display()
        ),
        _ => format!("cannot write in {}: {e}", dir.display()),
    };
    CliError::Usage(format!("{flag} {}: {why}; nothing written", path.display()))
}

/// Converts `json` and writes it to `output`, seeding the checkpoints from
/// `last_event_id` so nothing is replayed twice — all or nothing: the JSON,
/// the flags, the CA, the output's directory and the state directory are
/// checked first; the file appears (created beside it, then linked into
/// place, never over an existing file) in the same step as the seeded
/// checkpoints are committed. Relative paths (`json`, `--ca-file`,
/// `--output`, `--state-dir`) are relative to the current directory. The
/// checkpoints are the daemon's: a running daemon is refused, and its lock
/// is held meanwhile; a device that already has a checkpoint keeps it (the
/// output says so).
pub fn import_config(json: &Path, output: &Path, t: &ImportTarget) -> Result<String, CliError> {
    let cwd = std::env::current_dir()
        .map_err(|e| CliError::Usage(format!("cannot tell the current directory: {e}")))?;
    let abs = |p: &Path| {
        if p.is_absolute() {
            p.to_owned()
        } else {
            cwd.join(p)
        }
    };
    // The output first: where it goes decides whether anything else matters.
    let output = abs(output);
    match output.try_exists() {
        Ok(true) => {
            return Err(CliError::Usage(format!(
                "--output {}: exists; not overwriting it (move it aside, or pass --output with a new path)",
                output.display()
            )));
        }
        Ok(false) => {}
        Err(e) => {
            return Err(unwritable(
                "--output",
                &output,
                output.parent().unwrap_or(Path::new("/")),
                &e,
            ));
        }
    }
    let out_dir = output.parent().unwrap_or(Path::new("/")).to_owned();
    if let Err(e) = rustix::fs::access(
        &out_dir,
        rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
    ) {
        return Err(unwritable(
            "--output",
            &output,
            &out_dir,
            &std::io::Error::from(e),
        ));
    }

    // The JSON.
    let json_abs = abs(json);
    let text = std::fs::read_to_string(&json_abs).map_err(|e| {
        CliError::Usage(format!(
            "{}: cannot read: {e}{}",
            json.display(),
            if json.is_relative() {
                format!(" (relative to the current directory {})", cwd.display())
            } else {
                String::new()
            }
        ))
    })?;
    let example: ExampleConfig = serde_json::from_str(&text).map_err(|e| {
        let key = json_key_at(&text, e.line(), e.column());
        let msg = e.to_string();
        let msg = msg
            .rsplit_once(" at line ")
            .map_or(msg.as_str(), |(m, _)| m);
        CliError::Usage(format!(
            "{}:{}:{}: {}; nothing written",
            json.display(),
            e.line(),
            e.column(),
            crate::config::in_words(msg, key.as_deref())
        ))
    })?;
    check_example(json, &example)?;

    // The flags.
    if let Err(reason) = crate::config::check_host_port(&t.gateway) {
        return Err(CliError::Usage(format!(
            "--gateway {:?}: {reason}; nothing written",
            t.gateway
        )));
    }
    let ca = abs(&t.ca_file);
    let pem = std::fs::read(&ca).map_err(|e| {
        CliError::Usage(format!(
            "--ca-file {}: cannot read {}: {e}; copy the gateway's CA certificate (cert/ca.crt of its \
             installation) there, or pass --ca-file with its path (relative paths are relative to the \
             current directory); nothing written",
            t.ca_file.display(),
            ca.display()
        ))
    })?;
    crate::config::check_ca(&pem).map_err(|reason| {
        CliError::Usage(format!(
            "--ca-file {}: {reason}; nothing written",
            ca.display()
        ))
    })?;
    let state_dir = abs(&t.state_dir);
    let resolved = ImportTarget {
        gateway: t.gateway.clone(),
        ca_file: ca,
        state_dir: state_dir.clone(),
        api: t.api,
    };
    let toml = import_text(&example, &resolved);
    let config = crate::config::parse(&output, &toml).map_err(|e| {
        CliError::Usage(format!(
            "{}: the converted configuration is invalid: {} (a bug in the conversion: please report it \
             with the JSON); nothing written",
            json.display(),
            e.reason
        ))
    })?;
    if let Err(e) = crate::config::check_runnable(&config) {
        let why = match &e {
            crate::config::Unrunnable::Config(c) => c.reason.clone(),
            other => other.to_string(),
        };
        let sudo = if why.contains("Permission denied") {
            " (run it with sudo, or pass --state-dir with a directory of yours)"
        } else {
            ""
        };
        return Err(CliError::Usage(format!(
            "--state-dir {}: {}{sudo}; nothing written",
            state_dir.display(),
            why.split(" (the systemd unit").next().unwrap_or(&why)
        )));
    }

    // Everything checked: the daemon's lock, then file and checkpoints.
    let Daemon::Stopped(_lock) = daemon(&config)? else {
        return Err(CliError::Usage(format!(
            "a usersync daemon is running on {}: stop it first (systemctl stop usersync); \
             import-config seeds the checkpoints it owns; nothing written",
            config.state_dir.display()
        )));
    };
    let tmp = out_dir.join(format!(
        ".{}.import-{}",
        output
            .file_name()
            .map_or("usersync.toml".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let written = write_new(&tmp, &toml).and_then(|()| {
        let st = Store::open(&config.state_dir)?;
        let seeded = st.with(|c| {
            let tx = c.transaction()?;
            let mut seeded = Seeded::default();
            for d in std::iter::once(&example.enroll_device).chain(&example.devices) {
                if d.last_event_id == 0 {
                    continue;
                }
                // The daemon's own progress is newer knowledge than the
                // example's: replacing it could skip events it has not
                // handled (or replay handled ones).
                if let Some(at) = store::checkpoint(&tx, d.device_id)? {
                    seeded.kept.push((d.device_id, at, d.last_event_id));
                    continue;
                }
                store::set_checkpoint(&tx, d.device_id, d.last_event_id)?;
                seeded.set += 1;
            }
            // The file appears only if it is still new, just before the
            // commit; a commit that fails takes it away again.
            std::fs::hard_link(&tmp, &output).map_err(|source| StoreError::Dir {
                path: output.clone(),
                source,
            })?;
            if let Err(e) = tx.commit() {
                let _ = std::fs::remove_file(&output);
                return Err(e.into());
            }
            Ok(seeded)
        })?;
        Ok((seeded, st.path().to_owned()))
    });
    let _ = std::fs::remove_file(&tmp);
    let (seeded, db) = written.map_err(|e| match e {
        StoreError::Dir { path, source } if path == output => {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                CliError::Usage(format!(
                    "--output {}: appeared meanwhile; not overwriting it; nothing written",
                    output.display()
                ))
            } else {
                unwritable("--output", &output, &out_dir, &source)
            }
        }
        other => CliError::Store(other),
    })?;
    let kept: String = seeded
        .kept
        .iter()
        .map(|(device, at, example)| {
            format!(
                "device {device} already has a checkpoint in {} (event {at}): kept, its last_event_id {example} \
                 not used (replacing it could skip events the daemon has not handled yet)\n",
                db.display()
            )
        })
        .collect();
    Ok(format!(
        "wrote {} ({}, 1 group); seeded {} in {}\n{kept}next: `sudo usersync check-config --config {}`, then \
         `sudo systemctl start usersync`",
        output.display(),
        plural(config.devices.len() as u64, "device"),
        plural(seeded.set, "checkpoint"),
        db.display(),
        output.display()
    ))
}

/// What import-config did to the checkpoints.
#[derive(Debug, Default)]
struct Seeded {
    set: u64,
    /// (device, its checkpoint, the example's last_event_id): devices that
    /// already had a checkpoint, kept.
    kept: Vec<(u32, u32, u32)>,
}

/// Creates `path` (which must not exist) with `text`, mode 0644 (the
/// service's user reads it), synced to disk.
fn write_new(path: &Path, text: &str) -> Result<(), StoreError> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |source| StoreError::Dir {
        path: path.to_owned(),
        source,
    };
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(err)?;
    f.sync_all().map_err(err)
}
