//! Reading a device's log against its checkpoint, for every answer a
//! conforming gateway may give (WIRE.md B1–B5, §5.4, §5.5):
//!
//! * a start older than the oldest record: clamped to the oldest, *or*
//!   `OUT_OF_RANGE`;
//! * a start past the newest record: an empty list, *or* `OUT_OF_RANGE`;
//! * a log that was reset (cleared, factory or database reset): IDs may
//!   restart below the checkpoint, or refill past it with other events.
//!
//! [`classify`] is the pure judgement of one page; [`read_after`] performs
//! the calls (one, or three when the gateway answers `OUT_OF_RANGE` and the
//! cause has to be told apart); [`find_newest`] finds a device's newest
//! event in O(log n) calls for its first sight.
//!
//! Nothing here touches checkpoints: the consumer owns them and decides.

use tonic::Code;

use super::{Anchor, Checkpoint, Mark};
use crate::gateway::{GatewayClient, GatewayError};
use crate::proto::gsdk::event::EventLog;
use crate::store::{self, Store};

/// Records per `GetLog` page.
pub const PAGE: u32 = 4096;

/// What a read of a device's log says, relative to its checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum Read {
    /// The checkpoint is confirmed (or the log is read from its start);
    /// `events` follow it, ascending. `more`: the page was full, read on.
    Next { events: Vec<EventLog>, more: bool },
    /// The events after the checkpoint up to `events[0]` are gone (the
    /// ring buffer overwrote them): the affected groups need a reconcile.
    Lost {
        events: Vec<EventLog>,
        more: bool,
        /// The first event ID that was never seen.
        first_lost: u32,
    },
    /// The log was reset: the checkpoint event is gone and nothing after it
    /// is there, or another event now carries its ID.
    Reset { why: String },
    /// First sight: the device's newest event (`None`: its log is empty).
    Newest(Option<EventLog>),
}

/// A read that cannot be trusted: the gateway broke a rule of WIRE.md §3
/// that the judgement relies on. The pass ends with an error.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error(
        "GetLog(device {device}, start {start}) answered events before the start and not the checkpoint itself"
    )]
    BeforeStart { device: u32, start: u32 },
    #[error(
        "GetLog(device {device}, start {start}) answered a full page that ends at event {end}, before the checkpoint {checkpoint}"
    )]
    ShortOfCheckpoint {
        device: u32,
        start: u32,
        end: u32,
        checkpoint: u32,
    },
    #[error("search for the newest event of device {device}: {reason}")]
    Search { device: u32, reason: String },
    #[error("reading the log of device {device} panicked (a bug); retrying later")]
    Panicked { device: u32 },
}

fn out_of_range(e: &GatewayError) -> bool {
    e.code() == Some(Code::OutOfRange)
}

/// Sorts a page by ID and drops repeated IDs: ascending order is inferred,
/// not stated (WIRE.md B4), and costs nothing to make sure of. A page that
/// ascends but for one step from the top half of the ID range to the
/// bottom half holds a wrap past 2^32 (WIRE.md §5.5) and keeps the
/// gateway's order: sorted, its oldest records would pass for its newest.
fn ordered(mut page: Vec<EventLog>) -> Vec<EventLog> {
    if !page.is_sorted_by(|a, b| a.id < b.id) && !wraps_once(&page) {
        page.sort_by_key(|e| e.id);
        page.dedup_by_key(|e| e.id);
    }
    page
}

/// Whether IDs ascend throughout but for one wrap past 2^32.
fn wraps_once(page: &[EventLog]) -> bool {
    const HALF: u32 = u32::MAX / 2;
    let mut wraps = 0;
    for w in page.windows(2) {
        let (a, b) = (w[0].id, w[1].id);
        if b > a {
            continue;
        }
        if a > HALF && b <= HALF {
            wraps += 1;
        } else {
            return false;
        }
    }
    wraps == 1 && page.last().map(|e| e.id) < page.first().map(|e| e.id)
}

/// Whether event `id` follows the checkpoint `cp` in a log: a greater ID,
/// or a small one after a checkpoint near 2^32 (a wrap, WIRE.md §5.5).
pub fn follows(id: u32, cp: u32) -> bool {
    id > cp || cp - id > u32::MAX / 2
}

/// What the daemon expects the log to hold, ascending: the events
/// realtime moved the checkpoint past since a read last found the log as
/// expected (the trail, oldest first), then the checkpoint event itself.
/// A read starts at the first of them.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub trail: &'a [Mark],
    pub checkpoint: u32,
    pub anchor: Option<&'a Anchor>,
}

impl Expected<'_> {
    /// Where the read starts: the oldest event not yet found in the log.
    pub fn start(&self) -> u32 {
        self.trail.first().map_or(self.checkpoint, |m| m.event)
    }

    fn marks(&self) -> impl Iterator<Item = (u32, Option<&Anchor>)> {
        self.trail
            .iter()
            .map(|m| (m.event, m.anchor.as_ref()))
            .chain(std::iter::once((self.checkpoint, self.anchor)))
    }

    /// Why `page` (ascending, no ID below `page[0]` expected to be
    /// there) shows that the log is not the one the expected events came
    /// from, if it does: an expected event it covers is missing or another
    /// event carries its ID. `Ok(None)`: every expected event it covers is
    /// there, unchanged. `Err`: a full page ends before the checkpoint
    /// (the page cannot tell).
    fn contradiction(
        &self,
        device: u32,
        page: &[EventLog],
        more: bool,
    ) -> Result<Option<String>, ReadError> {
        let r = log_order(self.start());
        let (Some(first), Some(last)) = (page.first(), page.last()) else {
            return Ok(Some(format!(
                "the log holds no event at or after {}",
                self.start()
            )));
        };
        for (id, anchor) in self.marks().filter(|(id, _)| r(*id) >= r(first.id)) {
            match page.binary_search_by_key(&r(id), |e| r(e.id)) {
                Ok(i) if anchor.is_none_or(|a| a.matches(&page[i])) => {}
                Ok(_) if id == self.checkpoint => {
                    return Ok(Some(format!(
                        "event {id} is not the checkpoint event any more"
                    )));
                }
                Ok(_) => {
                    return Ok(Some(format!(
                        "event {id} is not the event seen under that ID before (the checkpoint was moved past it)"
                    )));
                }
                // IDs are a per-device counter (WIRE.md B5): a log that
                // holds IDs on both sides of an expected event but not the
                // event itself is another log.
                Err(_) if r(id) < r(last.id) => {
                    return Ok(Some(format!(
                        "the log skips event {id}, which was delivered"
                    )));
                }
                Err(_) if more => {
                    return Err(ReadError::ShortOfCheckpoint {
                        device,
                        start: self.start(),
                        end: last.id,
                        checkpoint: self.checkpoint,
                    });
                }
                Err(_) => {
                    return Ok(Some(format!(
                        "the log ends at event {}, before the checkpoint {}",
                        last.id, self.checkpoint
                    )));
                }
            }
        }
        Ok(None)
    }
}

/// Judges `page`, the answer to `GetLog(start = expected.start(), max)`.
/// Pure.
///
/// Every expected event the page covers must be there, unchanged: a log
/// reset without a reboot (WIRE.md §5.5) whose first events realtime
/// dropped and whose next one carried the ID after the checkpoint passed
/// for the continuation; the events before it, read back from the new log,
/// are others.
pub fn classify(
    device: u32,
    expected: Expected<'_>,
    page: Vec<EventLog>,
    max: u32,
) -> Result<Read, ReadError> {
    let more = page.len() >= max as usize;
    let start = expected.start();
    let checkpoint = expected.checkpoint;
    let r = log_order(start);
    let mut page = ordered(page);
    // In log order from the start: the same as ID order unless the page
    // holds a wrap past 2^32.
    page.sort_by_key(|e| r(e.id));
    let Some(first_id) = page.first().map(|e| e.id) else {
        // Start past the newest record: the log holds nothing at or after
        // the start, so its IDs restarted below it (or it is empty).
        return Ok(Read::Reset {
            why: format!("the log holds no event at or after {start}"),
        });
    };
    if r(first_id) < 0 {
        // Records before the start: not what B1 says. Accept the page only
        // if, from the start on, it holds every expected event unchanged,
        // and take what follows the checkpoint.
        let from = page.partition_point(|e| r(e.id) < 0);
        let rest = page.split_off(from);
        let held = rest.first().is_some_and(|e| e.id == start)
            && matches!(expected.contradiction(device, &rest, more), Ok(None));
        if !held {
            return Err(ReadError::BeforeStart { device, start });
        }
        let events = rest
            .into_iter()
            .filter(|e| r(e.id) > r(checkpoint))
            .collect();
        return Ok(Read::Next { events, more });
    }
    if r(first_id) > r(checkpoint) {
        // Clamped to the oldest record, past every expected event: nothing
        // to verify. If that is checkpoint + 1 only the expected events
        // were overwritten (or cleared; IDs go on, §5.5): nothing was lost.
        if first_id == checkpoint.wrapping_add(1) {
            return Ok(Read::Next { events: page, more });
        }
        return Ok(Read::Lost {
            events: page,
            more,
            first_lost: checkpoint.wrapping_add(1),
        });
    }
    // From the start, or clamped to an oldest record at or before the
    // checkpoint (the ring overwrote the trail's oldest events): every
    // expected event from there on must be in the page, unchanged.
    if let Some(why) = expected.contradiction(device, &page, more)? {
        return Ok(Read::Reset { why });
    }
    let events = page
        .into_iter()
        .filter(|e| r(e.id) > r(checkpoint))
        .collect();
    Ok(Read::Next { events, more })
}

/// Where an event ID lies in a log read from `start`: its distance from
/// the start, negative before it. The same order as the IDs' while they
/// stay within 2^31 of the start; across a wrap past 2^32 (WIRE.md §5.5)
/// the IDs after the wrap come after those before it.
fn log_order(start: u32) -> impl Fn(u32) -> i64 {
    move |id| i64::from(id.wrapping_sub(start) as i32)
}

/// The newest part of `trail` that a page of `max` records always covers
/// with room to spare, so a page never ends before the checkpoint.
fn fitting(trail: &[Mark], max: u32) -> &[Mark] {
    if max == 0 {
        // "As many as possible" (WIRE.md B3).
        return trail;
    }
    let room = usize::try_from(max / 2).unwrap_or(usize::MAX);
    &trail[trail.len().saturating_sub(room)..]
}

/// Reads what follows `checkpoint` on `device`, from the oldest event of
/// `trail` (the events realtime moved the checkpoint past since a read last
/// found the log as expected; empty: from the checkpoint): one `GetLog`,
/// or, when the gateway answers `OUT_OF_RANGE` (WIRE.md §5.4), a look at
/// the oldest record to tell an overwritten ring (oldest past the start)
/// from a reset log (oldest at or below it: the start was past the newest).
pub async fn read_after(
    client: &GatewayClient,
    device: u32,
    checkpoint: &Checkpoint,
    trail: &[Mark],
    max: u32,
) -> Result<Read, ReadError> {
    let expected = match checkpoint {
        Checkpoint::Unseen => {
            return Err(ReadError::Search {
                device,
                reason: "a device never seen is searched, not read".into(),
            });
        }
        Checkpoint::Reset => {
            // The log is read from its oldest record (start 0 never fails,
            // WIRE.md B2); every record is new.
            let page = ordered(client.get_log(device, 0, max).await?);
            let more = page.len() >= max as usize;
            return Ok(Read::Next { events: page, more });
        }
        Checkpoint::At { event, anchor } => Expected {
            trail: fitting(trail, max),
            checkpoint: *event,
            anchor: anchor.as_ref(),
        },
    };
    let start = expected.start();
    match client.get_log(device, start, max).await {
        Ok(page) => classify(device, expected, page, max),
        Err(e) if out_of_range(&e) => {
            let oldest = client.get_log(device, 0, 1).await?;
            match oldest.first() {
                None => Ok(Read::Reset {
                    why: "the log is empty".into(),
                }),
                Some(o) if o.id > start => {
                    let page = client.get_log(device, o.id, max).await?;
                    classify(device, expected, page, max)
                }
                Some(o) => Ok(Read::Reset {
                    why: format!(
                        "the gateway says event {start} is out of range while the oldest event is {}: IDs restarted",
                        o.id
                    ),
                }),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Progress of a search for the newest event: the newest event known
/// (`low`) and an ID known to be past the newest (`high`, exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Search {
    pub low: u32,
    pub high: u64,
}

/// Finds the newest event of `device` in O(log n) calls: one page from the
/// oldest record (a small log ends there), then a binary search with
/// `GetLog(start, 1)` (IDs only increase within a log, WIRE.md B5), where
/// an empty answer or `OUT_OF_RANGE` means "past the newest". `resume` is
/// earlier progress; each step is recorded in `store` (if given), so a
/// restart resumes.
pub async fn find_newest(
    client: &GatewayClient,
    device: u32,
    resume: Option<Search>,
    store: Option<&Store>,
) -> Result<Option<EventLog>, ReadError> {
    // Saved progress counts only while its newest known event is still
    // there (the log may have been cleared or reset since).
    let resume = match resume {
        Some(s) => match client.get_log(device, s.low, 1).await {
            Ok(page) if page.first().is_some_and(|e| e.id == s.low) => Some(s),
            Ok(_) => None,
            Err(e) if out_of_range(&e) => None,
            Err(e) => return Err(e.into()),
        },
        None => None,
    };
    let mut search = match resume {
        Some(s) => s,
        None => {
            let page = ordered(client.get_log(device, 0, PAGE).await?);
            let full = page.len() >= PAGE as usize;
            let Some(last) = page.into_iter().last() else {
                return Ok(None);
            };
            if !full {
                return Ok(Some(last));
            }
            Search {
                low: last.id,
                high: u64::from(u32::MAX) + 1,
            }
        }
    };
    while search.high > u64::from(search.low) + 1 {
        let mid = u64::from(search.low) + (search.high - u64::from(search.low)) / 2;
        let mid32 = u32::try_from(mid).map_err(|_| ReadError::Search {
            device,
            reason: format!("probe {mid} beyond 32 bits"),
        })?;
        match client.get_log(device, mid32, 1).await {
            Ok(page) => match page.first() {
                Some(e) if e.id >= mid32 => search.low = e.id,
                _ => search.high = mid,
            },
            Err(e) if out_of_range(&e) => search.high = mid,
            Err(e) => return Err(e.into()),
        }
        if let Some(store) = store {
            let s = search;
            let r = store
                .run(move |c| store::set_log_search(c, device, s.low, s.high))
                .await;
            if let Err(e) = r {
                tracing::warn!(device_id = device, error = %e, "cannot record the search's progress");
            }
        }
    }
    // The newest event known; events logged since the search began follow
    // it and are read by the catch-up.
    let page = client.get_log(device, search.low, 1).await?;
    match page.into_iter().next() {
        Some(e) if e.id == search.low => Ok(Some(e)),
        other => Err(ReadError::Search {
            device,
            reason: format!(
                "event {} vanished during the search (now {:?}); searching again",
                search.low,
                other.map(|e| e.id)
            ),
        }),
    }
}

#[cfg(test)]
mod tests;
