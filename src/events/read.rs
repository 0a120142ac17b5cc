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

use super::{Anchor, Checkpoint};
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

/// Judges `page`, the answer to `GetLog(start = checkpoint, max)`. Pure.
pub fn classify(
    device: u32,
    checkpoint: u32,
    anchor: Option<&Anchor>,
    page: Vec<EventLog>,
    max: u32,
) -> Result<Read, ReadError> {
    let more = page.len() >= max as usize;
    let page = ordered(page);
    let Some(first) = page.first() else {
        // Start past the newest record: the log holds nothing at or after
        // the checkpoint, so its IDs restarted below it (or it is empty).
        return Ok(Read::Reset {
            why: format!("the log holds no event at or after the checkpoint {checkpoint}"),
        });
    };
    let first_id = first.id;
    let verified = |ev: &EventLog| anchor.is_none_or(|a| a.matches(ev));
    if first_id == checkpoint {
        if !verified(first) {
            return Ok(Read::Reset {
                why: format!("event {checkpoint} is not the checkpoint event any more"),
            });
        }
        let events = page.into_iter().skip(1).collect();
        return Ok(Read::Next { events, more });
    }
    if first_id > checkpoint {
        // Clamped to the oldest record. If that is checkpoint + 1 only the
        // checkpoint event itself was overwritten: nothing was lost.
        if first_id == checkpoint.wrapping_add(1) {
            return Ok(Read::Next { events: page, more });
        }
        return Ok(Read::Lost {
            events: page,
            more,
            first_lost: checkpoint.wrapping_add(1),
        });
    }
    // Records before the start: not what B1 says. Accept the page only if
    // it holds the verified checkpoint event, and take what follows it.
    match page.iter().position(|e| e.id == checkpoint) {
        Some(i) if verified(&page[i]) => Ok(Read::Next {
            events: page.into_iter().skip(i + 1).collect(),
            more,
        }),
        _ => Err(ReadError::BeforeStart {
            device,
            start: checkpoint,
        }),
    }
}

/// Reads what follows `checkpoint` on `device`: one `GetLog`, or, when the
/// gateway answers `OUT_OF_RANGE` (WIRE.md §5.4), a look at the oldest
/// record to tell an overwritten ring (oldest past the checkpoint) from a
/// reset log (oldest at or below it: the start was past the newest).
pub async fn read_after(
    client: &GatewayClient,
    device: u32,
    checkpoint: &Checkpoint,
    max: u32,
) -> Result<Read, ReadError> {
    let (cp, anchor) = match checkpoint {
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
        Checkpoint::At { event, anchor } => (*event, anchor.as_ref()),
    };
    match client.get_log(device, cp, max).await {
        Ok(page) => classify(device, cp, anchor, page, max),
        Err(e) if out_of_range(&e) => {
            let oldest = client.get_log(device, 0, 1).await?;
            match oldest.first() {
                None => Ok(Read::Reset {
                    why: "the log is empty".into(),
                }),
                Some(o) if o.id > cp => {
                    let page = client.get_log(device, o.id, max).await?;
                    classify(device, cp, anchor, page, max)
                }
                Some(o) => Ok(Read::Reset {
                    why: format!(
                        "the gateway says the checkpoint {cp} is out of range while the oldest event is {}: IDs restarted",
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
mod tests {
    use super::*;

    fn ev(id: u32, code: u32) -> EventLog {
        EventLog {
            id,
            event_code: code,
            timestamp: id.wrapping_add(1000),
            ..Default::default()
        }
    }

    fn at(id: u32) -> Anchor {
        Anchor::of(&ev(id, 0x1000))
    }

    #[test]
    fn the_checkpoint_event_confirms_the_page() {
        let page = vec![ev(10, 0x1000), ev(11, 0x2000), ev(12, 0x1000)];
        let r = classify(1, 10, Some(&at(10)), page, 3).unwrap();
        assert_eq!(
            r,
            Read::Next {
                events: vec![ev(11, 0x2000), ev(12, 0x1000)],
                more: true
            }
        );
    }

    #[test]
    fn another_event_under_the_checkpoint_id_is_a_reset() {
        let page = vec![ev(10, 0x4502)];
        assert!(matches!(
            classify(1, 10, Some(&at(10)), page, 8).unwrap(),
            Read::Reset { .. }
        ));
    }

    #[test]
    fn the_same_code_and_user_at_another_time_is_a_reset() {
        // A reset log refilled past the checkpoint with a similar event.
        let mut other = ev(10, 0x1000);
        other.timestamp += 3600;
        let r = classify(1, 10, Some(&at(10)), vec![other, ev(11, 0x1000)], 8).unwrap();
        assert!(matches!(r, Read::Reset { .. }), "{r:?}");
    }

    #[test]
    fn empty_answer_is_a_reset() {
        assert!(matches!(
            classify(1, 10, Some(&at(10)), vec![], 8).unwrap(),
            Read::Reset { .. }
        ));
    }

    #[test]
    fn clamped_to_a_later_oldest_is_lost_unless_only_the_checkpoint_went() {
        let r = classify(1, 10, Some(&at(10)), vec![ev(11, 0x1000)], 8).unwrap();
        assert!(matches!(r, Read::Next { .. }), "{r:?}");
        let r = classify(1, 10, Some(&at(10)), vec![ev(15, 0x1000)], 8).unwrap();
        assert_eq!(
            r,
            Read::Lost {
                events: vec![ev(15, 0x1000)],
                more: false,
                first_lost: 11
            }
        );
    }

    #[test]
    fn a_page_from_before_the_start_is_never_taken_as_healthy() {
        // The bug this replaces: a fallback read from the oldest record
        // returned events below the checkpoint and passed as "nothing lost".
        let page = vec![ev(1, 0x1000), ev(2, 0x1000), ev(3, 0x2000)];
        assert!(classify(1, 10, Some(&at(10)), page, 3).is_err());
        // Holding the verified checkpoint event: what follows it counts.
        let page = vec![ev(9, 0x1000), ev(10, 0x1000), ev(11, 0x2000)];
        assert_eq!(
            classify(1, 10, Some(&at(10)), page, 8).unwrap(),
            Read::Next {
                events: vec![ev(11, 0x2000)],
                more: false
            }
        );
    }

    /// A page across a wrap past 2^32 is read in the gateway's order: the
    /// events after the wrap follow the checkpoint. Sorted, they came
    /// first and the checkpoint moved to the last ID before the wrap,
    /// which the next read found "out of range" and took for a reset, on
    /// every read until the ring forgot the wrap.
    #[test]
    fn a_page_across_a_wrap_keeps_its_order() {
        let max = u32::MAX;
        let page = vec![
            ev(max - 1, 0x1000),
            ev(max, 0x2000),
            ev(1, 0x2000),
            ev(2, 0x1000),
        ];
        let Read::Next { events, .. } = classify(1, max - 1, Some(&at(max - 1)), page, 8).unwrap()
        else {
            panic!()
        };
        assert_eq!(events.iter().map(|e| e.id).collect::<Vec<_>>(), [max, 1, 2]);
        assert!(follows(1, max) && follows(max, max - 1) && !follows(5, 10) && follows(11, 10));
        // Not a wrap: a shuffled page is still put in order.
        let page = vec![ev(12, 0x1000), ev(10, 0x1000), ev(11, 0x1000)];
        assert!(!wraps_once(&page));
        let page = vec![ev(max, 0x1000), ev(3, 0x1000), ev(1, 0x1000)];
        assert!(!wraps_once(&page));
    }

    #[test]
    fn pages_out_of_order_are_put_in_order() {
        let page = vec![ev(12, 0x1000), ev(10, 0x1000), ev(11, 0x1000)];
        let Read::Next { events, .. } = classify(1, 10, Some(&at(10)), page, 8).unwrap() else {
            panic!()
        };
        assert_eq!(events.iter().map(|e| e.id).collect::<Vec<_>>(), [11, 12]);
    }
}
