//! What to do next: a failure in the operator's words, with the next step
//! where one is known (a wrong CA, a gateway that is not there, a device
//! the gateway does not have), judged from the failure's text so that the
//! daemon's recorded errors (text only) get the same advice.

use super::CliError;
use crate::config::Config;
use crate::gateway::GatewayError;

/// The message an operator sees for `e`: what went wrong in words, and the
/// next step where one is known (the gateway's own text follows as
/// `detail:`).
pub fn describe(e: &CliError, config: Option<&Config>) -> String {
    let (g, device) = match e {
        CliError::Gateway(g) => (g, None),
        CliError::AtDevice { device, source } => (source, Some(*device)),
        CliError::Read(crate::events::read::ReadError::Gateway(g)) => (g, None),
        _ => return e.to_string(),
    };
    let Some(config) = config else {
        return e.to_string();
    };
    match gateway_hint(&chain_text(g), is_transport(g), config, device) {
        // A transport failure is the gateway's, whatever device was asked.
        Some(hint) if is_transport(g) => format!("{hint}\n  detail: {g}"),
        Some(hint) => format!("{hint}\n  detail: {e}"),
        None => e.to_string(),
    }
}

/// A failure's text with every source in its chain (the transport's reason
/// sits in the sources, not in the status message).
pub(super) fn chain_text(e: &GatewayError) -> String {
    let mut parts = vec![e.to_string()];
    let mut src: Option<&(dyn std::error::Error + 'static)> = match e {
        GatewayError::Rpc { status, .. } => std::error::Error::source(status),
        other => std::error::Error::source(other),
    };
    while let Some(s) = src {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        src = s.source();
    }
    parts.join(": ")
}

/// A failure of the connection to the gateway itself (no answer from it),
/// rather than an answer about a device.
pub(super) fn is_transport(e: &GatewayError) -> bool {
    match e {
        GatewayError::Rpc { status, .. } => std::error::Error::source(status).is_some(),
        GatewayError::Channel(_) => true,
        _ => false,
    }
}

/// The io reason inside a transport error's text, e.g. "Connection refused".
fn io_reason(text: &str) -> Option<&str> {
    [
        "Connection refused",
        "Connection reset by peer",
        "No route to host",
        "Network is unreachable",
        "timed out",
        "Name or service not known",
        "failed to lookup address information",
    ]
    .into_iter()
    .find(|r| text.contains(r))
}

/// The next step for a gateway failure, judged from its text (the daemon's
/// recorded errors have only their text).
pub fn gateway_hint(
    text: &str,
    transport: bool,
    config: &Config,
    device: Option<u32>,
) -> Option<String> {
    let addr = &config.gateway.address;
    let file = config.path.display();
    let ca = config
        .gateway
        .ca_file
        .as_ref()
        .map_or("(none)".to_owned(), |p| p.display().to_string());
    // Another CA's certificate: unknown issuer, or (same issuer name, other
    // key) a bad signature.
    if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        return Some(format!(
            "the gateway's certificate is not signed by ca_file {ca}: copy the CA certificate of the gateway \
             at {addr} (cert/ca.crt of its installation) to {ca}, or point [gateway] ca_file in {file} at it"
        ));
    }
    if text.contains("NotValidForName") || text.contains("not valid for name") {
        return Some(format!(
            "the gateway's certificate does not name the host usersync checks: set [gateway] server_name in \
             {file} to a name the certificate lists, or regenerate the certificate with that name"
        ));
    }
    if text.contains("tcp connect error") || text.contains("error trying to connect") {
        let why = io_reason(text).map_or(String::new(), |r| format!(" ({r})"));
        return Some(format!(
            "cannot connect to the gateway at {addr}{why}: check that the gateway runs and listens on that \
             address and port, and [gateway] address in {file}"
        ));
    }
    let transport = transport
        || text.contains("transport error")
        || text.contains("h2 protocol error")
        || text.contains("connection error");
    let plaintext = config.gateway.ca_pem.is_none();
    if transport && plaintext {
        return Some(format!(
            "the gateway at {addr} speaks TLS (it does not answer plaintext HTTP/2; real gateways always use \
             TLS): set tls = true and ca_file in [gateway] of {file}"
        ));
    }
    if transport
        && (text.contains("InvalidContentType")
            || text.contains("corrupt message")
            || text.contains("CorruptMessage"))
    {
        return Some(format!(
            "what answers at {addr} does not speak TLS: check [gateway] address in {file} (the gateway's gRPC \
             port, 4000 on a default installation)"
        ));
    }
    if text.contains("no answer within") {
        return Some(format!(
            "the gateway at {addr} did not answer in time ([gateway] call_timeout_secs in {file}); the gateway \
             or the device it relays to may be slow or overloaded: try again"
        ));
    }
    if let Some(d) = device
        && text.contains("(Unavailable)")
        && !transport
    {
        let where_ = config
            .devices
            .get(&d)
            .map_or(String::new(), |c| format!(" at {}:{}", c.address, c.port));
        return Some(format!(
            "device {d} is not connected to the gateway: the running daemon registers every configured device \
             (`usersync status` shows whether it runs and the device's state); check that the device is on and \
             reachable from the gateway{where_}"
        ));
    }
    None
}
