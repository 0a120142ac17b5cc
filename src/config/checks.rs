//! Checks beyond the file's own validity: addresses, the CA, whether the
//! daemon can run with it (state directory, files the service user must
//! read), and warnings worth an operator's attention.

use std::path::{Path, PathBuf};

use super::{Config, ConfigError};

/// Checks a device address: a host name or an IP address, without a port
/// (the port has its own key) and without brackets.
pub fn check_device_host(address: &str) -> Result<(), String> {
    if address.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    if address.chars().any(char::is_whitespace) {
        return Err("contains spaces; write the device's IP address or host name".into());
    }
    if address.contains("://") {
        return Err("is a URL; write only the device's IP address or host name".into());
    }
    if let Some(inner) = address.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
        return Err(format!(
            "has brackets; write the IPv6 address without them: {inner:?}"
        ));
    }
    if let Some((host, port)) = address.rsplit_once(':')
        && !host.is_empty()
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
    {
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        return Err(format!(
            "has a port in it; write address = \"{host}\" and port = {port}"
        ));
    }
    let name_char = |c: char| c.is_ascii_alphanumeric() || "-._".contains(c);
    if !address.chars().all(name_char) || address.starts_with(['.', '-']) || address.ends_with('-')
    {
        return Err("is not a host name or IP address".into());
    }
    Ok(())
}

/// Checks a gateway address: `host:port` with a DNS name or IPv4 address,
/// or `[v6]:port`; no scheme, no spaces, a port in 1..=65535.
pub fn check_host_port(address: &str) -> Result<(), String> {
    const FORM: &str = "write host:port, e.g. \"192.168.0.2:4000\" or \"[fd00::2]:4000\"";
    if address.is_empty() {
        return Err(format!("is empty; {FORM}"));
    }
    if address.chars().any(char::is_whitespace) {
        return Err(format!("contains spaces; {FORM}"));
    }
    if address.contains("://") {
        return Err(format!("is host:port, not a URL (no scheme); {FORM}"));
    }
    let port = if let Some(rest) = address.strip_prefix('[') {
        let (ip, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("has no ']' after the IPv6 address; {FORM}"))?;
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{ip:?} is not an IPv6 address"));
        }
        after
            .strip_prefix(':')
            .ok_or_else(|| format!("has no port after the IPv6 address; {FORM}"))?
    } else {
        let (host, port) = address
            .rsplit_once(':')
            .ok_or_else(|| format!("has no port; {FORM}"))?;
        if host.contains(':') {
            return Err(format!(
                "an IPv6 address goes in brackets: [ADDRESS]:PORT; {FORM}"
            ));
        }
        let name_char = |c: char| c.is_ascii_alphanumeric() || "-._".contains(c);
        if host.is_empty() {
            return Err(format!("has no host; {FORM}"));
        }
        if !host.chars().all(name_char) || host.starts_with(['.', '-']) || host.ends_with('-') {
            return Err(format!("{host:?} is not a host name or IPv4 address"));
        }
        port
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("port {port:?} is not a number"));
    }
    match port.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(()),
        _ => Err(format!("port {port} is out of range (1 to 65535)")),
    }
}

/// Checks a CA file the way the TLS client reads it, but strictly: every
/// PEM certificate block decodes and is a certificate a trust store
/// accepts (the client skips unparsable ones silently and would then trust
/// nothing).
pub fn check_ca(pem: &[u8]) -> Result<(), String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in CertificateDer::pem_slice_iter(pem).enumerate() {
        let n = i + 1;
        let cert = cert.map_err(|e| format!("certificate {n}: not valid PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("certificate {n}: not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into());
    }
    Ok(())
}

// ---- what a valid file must also allow: the daemon can start ---------------

/// Why a valid file still cannot run.
#[derive(Debug, thiserror::Error)]
pub enum Unrunnable {
    /// Restarting does not fix it (exit 78, EX_CONFIG).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state directory failed in a way that may pass (a full disk, an
    /// I/O error): exit 1, and the service manager retries.
    #[error("state.dir {}: {what}: {source}", path.display())]
    StateDir {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

/// Builds what `usersync run` builds from the file before it touches
/// anything — the gateway endpoint and TLS client configuration — and
/// checks that the state directory exists and takes a new file, or can be
/// created. `check-config` and `run` both call it, so a file `check-config`
/// accepts does not fail at start.
pub fn check_runnable(config: &Config) -> Result<(), Unrunnable> {
    let invalid = |reason: String| ConfigError {
        file: config.path.clone(),
        line: None,
        reason,
    };
    // The client spawns its connection worker, which needs a runtime
    // context; it never dials here (the channel is lazy).
    let build = || crate::gateway::GatewayClient::new(&config.gateway.settings()).map(drop);
    let built = match tokio::runtime::Handle::try_current() {
        Ok(_) => build(),
        Err(_) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .map_err(|e| invalid(format!("cannot start a runtime: {e}")))?;
            let _entered = rt.enter();
            build()
        }
    };
    built.map_err(|e| invalid(format!("gateway: {e}")))?;
    check_state_dir(&config.state_dir).map_err(|(what, source)| {
        use std::io::ErrorKind::*;
        // What a restart cannot fix: the wrong place, the wrong owner, a
        // sandbox that makes it read-only.
        if matches!(
            source.kind(),
            PermissionDenied | ReadOnlyFilesystem | NotADirectory | NotFound | IsADirectory
        ) {
            Unrunnable::Config(invalid(format!(
                "state.dir {}: {what}: {source} (the systemd unit makes only {UNIT_STATE_DIR} writable: use it, \
                 or add ReadWritePaths= with `systemctl edit usersync`)",
                config.state_dir.display()
            )))
        } else {
            Unrunnable::StateDir {
                path: config.state_dir.clone(),
                what,
                source,
            }
        }
    })
}

/// The state directory the systemd unit provides (`StateDirectory=`).
pub const UNIT_STATE_DIR: &str = "/var/lib/usersync";

/// An existing directory must take a new file (created and removed); a
/// missing one must be creatable in its nearest existing ancestor, which
/// is checked with access(2) rather than by creating anything.
pub(super) fn check_state_dir(dir: &Path) -> Result<(), (&'static str, std::io::Error)> {
    use std::io::{Error, ErrorKind};
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err(("cannot be used", Error::from(ErrorKind::NotADirectory))),
        Ok(_) => {
            let probe = dir.join(format!(".usersync-probe-{}", std::process::id()));
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&probe)
                .map_err(|e| ("cannot create a file in it", e))?;
            std::fs::remove_file(&probe).map_err(|e| ("cannot remove a file from it", e))
        }
        // A symbolic link to nowhere (a state directory removed under its
        // link) cannot be created through: mkdir finds the link.
        Err(e) if e.kind() == ErrorKind::NotFound && std::fs::symlink_metadata(dir).is_ok() => {
            Err(("is a symbolic link to a directory that does not exist", e))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let missing = |a: &Path| matches!(std::fs::symlink_metadata(a), Err(e) if e.kind() == ErrorKind::NotFound);
            let ancestor = dir
                .ancestors()
                .skip(1)
                .find(|a| !missing(a))
                .unwrap_or(Path::new("/"));
            match std::fs::metadata(ancestor) {
                Ok(m) if m.is_dir() => rustix::fs::access(
                    ancestor,
                    rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
                )
                .map_err(|e| ("cannot be created", Error::from(e))),
                Ok(_) => Err(("cannot be created", Error::from(ErrorKind::NotADirectory))),
                Err(e) => Err(("cannot be created", e)),
            }
        }
        Err(e) => Err(("cannot be read", e)),
    }
}

/// Settings that work but expose something; logged as warnings when the
/// daemon starts and printed by `check-config`.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut w = Vec::new();
    if config.gateway.ca_pem.is_none() {
        w.push(format!(
            "gateway.tls = false: users (cards, fingerprint and face templates, PINs) travel to the gateway \
             at {} in plaintext; real gateways serve TLS only",
            config.gateway.address
        ));
    }
    if let Some(addr) = config.metrics_listen
        && !addr.ip().is_loopback()
    {
        w.push(format!(
            "metrics.listen = \"{addr}\" is not a loopback address: metrics (device IDs, group names, \
             counts) are served to the network without authentication"
        ));
    }
    w
}

/// Files the daemon reads that the systemd unit's user could not: the unit
/// runs as a dynamic user (not root, in no group of the file), so it reads
/// only what others may read, through directories others may enter, while
/// `sudo usersync check-config` runs as root and reads everything.
pub fn unreadable_by_service(config: &Config) -> Vec<String> {
    let mut files = vec![("the configuration", config.path.clone())];
    if config.gateway.ca_pem.is_some()
        && let Some(ca) = &config.gateway.ca_file
    {
        files.push(("gateway.ca_file", ca.clone()));
    }
    let mut out = Vec::new();
    for (what, path) in files {
        let path = std::fs::canonicalize(&path).unwrap_or(path);
        if let Some(why) = not_world_readable(&path) {
            out.push(format!(
                "{what} {} is not readable by the service's user ({why}); the systemd unit runs as a \
                 dynamic user, not root and in no group, and would exit 78 at start",
                path.display()
            ));
        }
    }
    out
}

/// Why others cannot read `path`: a directory on the way they cannot enter,
/// or the file's mode.
fn not_world_readable(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).ok().map(|m| m.permissions().mode());
    let mut dirs: Vec<&Path> = path.ancestors().skip(1).collect();
    dirs.reverse();
    for d in dirs {
        if d.as_os_str().is_empty() {
            continue;
        }
        if let Some(m) = mode(d)
            && m & 0o001 == 0
        {
            return Some(format!(
                "directory {} has mode {:o}: `sudo chmod o+x {}`",
                d.display(),
                m & 0o7777,
                d.display()
            ));
        }
    }
    match mode(path) {
        Some(m) if m & 0o004 == 0 => Some(format!(
            "mode {:o}: `sudo chmod o+r {}`",
            m & 0o7777,
            path.display()
        )),
        _ => None,
    }
}

/// `check-config` runs outside the unit's sandbox, where any directory
/// may be writable; under the unit only [`UNIT_STATE_DIR`] is.
pub fn sandbox_note(config: &Config) -> Option<String> {
    (config.state_dir != Path::new(UNIT_STATE_DIR)).then(|| {
        format!(
            "state.dir is {}; the systemd unit makes only {UNIT_STATE_DIR} writable (ProtectSystem=strict): \
             add ReadWritePaths={} with `systemctl edit usersync`, or the daemon will exit 78 at start",
            config.state_dir.display(),
            config.state_dir.display()
        )
    })
}
