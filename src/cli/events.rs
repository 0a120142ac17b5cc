//! `usersync events`: a device's event log, read through the gateway.

use serde::Serialize;

use super::time::rfc3339;
use super::{CliError, at, client, configured};
use crate::config::Config;
use crate::events::codes;
use crate::proto::gsdk::event::EventLog;

#[derive(Debug, Serialize)]
pub struct EventLine {
    pub id: u32,
    /// RFC 3339.
    pub time: String,
    pub device: u32,
    pub user: String,
    pub code: String,
    pub sub_code: u32,
    pub description: String,
    pub changed_on_device: bool,
    #[serde(skip)]
    pub(super) timestamp: u64,
}

fn event_line(e: &EventLog) -> EventLine {
    EventLine {
        id: e.id,
        time: rfc3339(u64::from(e.timestamp)),
        device: e.device_id,
        user: e.user_id.clone(),
        code: format!("0x{:04X}", e.event_code),
        sub_code: e.sub_code,
        description: codes::name(e.event_code, e.sub_code),
        changed_on_device: e.changed_on_device,
        timestamp: u64::from(e.timestamp),
    }
}

/// Reads a device's log: from `since` (inclusive) if given, else its last
/// `limit` events.
pub async fn events(
    config: &Config,
    device: u32,
    since: Option<u32>,
    limit: u32,
) -> Result<Vec<EventLine>, CliError> {
    if limit == 0 {
        // maxNumOfLog = 0 asks the device for its whole log (WIRE.md B3).
        return Err(CliError::Usage(
            "--limit 0: give a number of events of at least 1 (0 would read the device's whole log)".into(),
        ));
    }
    configured(config, device)?;
    let gw = client(config)?;
    let events = match since {
        Some(start) => gw.get_log(device, start, limit).await.map_err(at(device))?,
        None => {
            // The newest event in O(log n) calls, then the page before it.
            let newest = match crate::events::read::find_newest(&gw, device, None, None).await {
                Ok(n) => n,
                Err(crate::events::read::ReadError::Gateway(e)) => return Err(at(device)(e)),
                Err(e) => return Err(e.into()),
            };
            let Some(newest) = newest else {
                return Ok(Vec::new());
            };
            let start = newest.id.saturating_sub(limit.saturating_sub(1)).max(1);
            let page = match gw.get_log(device, start, limit).await {
                Ok(page) => page,
                // Older than the oldest record (WIRE.md §5.4): the log is
                // shorter than `limit`; read it from its start.
                Err(e) if e.code() == Some(tonic::Code::OutOfRange) => {
                    gw.get_log(device, 0, limit).await.map_err(at(device))?
                }
                Err(e) => return Err(at(device)(e)),
            };
            page.into_iter().filter(|e| e.id <= newest.id).collect()
        }
    };
    Ok(events.iter().map(event_line).collect())
}
