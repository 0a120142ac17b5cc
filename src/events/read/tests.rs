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

fn exp(checkpoint: u32, anchor: &Anchor) -> Expected<'_> {
    Expected {
        trail: &[],
        checkpoint,
        anchor: Some(anchor),
    }
}

#[test]
fn the_checkpoint_event_confirms_the_page() {
    let page = vec![ev(10, 0x1000), ev(11, 0x2000), ev(12, 0x1000)];
    let r = classify(1, exp(10, &at(10)), page, 3).unwrap();
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
        classify(1, exp(10, &at(10)), page, 8).unwrap(),
        Read::Reset { .. }
    ));
}

#[test]
fn the_same_code_and_user_at_another_time_is_a_reset() {
    // A reset log refilled past the checkpoint with a similar event.
    let mut other = ev(10, 0x1000);
    other.timestamp += 3600;
    let r = classify(1, exp(10, &at(10)), vec![other, ev(11, 0x1000)], 8).unwrap();
    assert!(matches!(r, Read::Reset { .. }), "{r:?}");
}

#[test]
fn empty_answer_is_a_reset() {
    assert!(matches!(
        classify(1, exp(10, &at(10)), vec![], 8).unwrap(),
        Read::Reset { .. }
    ));
}

#[test]
fn clamped_to_a_later_oldest_is_lost_unless_only_the_checkpoint_went() {
    let r = classify(1, exp(10, &at(10)), vec![ev(11, 0x1000)], 8).unwrap();
    assert!(matches!(r, Read::Next { .. }), "{r:?}");
    let r = classify(1, exp(10, &at(10)), vec![ev(15, 0x1000)], 8).unwrap();
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
    assert!(classify(1, exp(10, &at(10)), page, 3).is_err());
    // Holding the verified checkpoint event: what follows it counts.
    let page = vec![ev(9, 0x1000), ev(10, 0x1000), ev(11, 0x2000)];
    assert_eq!(
        classify(1, exp(10, &at(10)), page, 8).unwrap(),
        Read::Next {
            events: vec![ev(11, 0x2000)],
            more: false
        }
    );
}

fn marks(ids: &[u32]) -> Vec<Mark> {
    ids.iter()
        .map(|id| Mark {
            event: *id,
            anchor: Some(at(*id)),
        })
        .collect()
}

fn with_trail<'a>(trail: &'a [Mark], checkpoint: u32, anchor: &'a Anchor) -> Expected<'a> {
    Expected {
        trail,
        checkpoint,
        anchor: Some(anchor),
    }
}

#[test]
fn a_trail_found_unchanged_confirms_the_page() {
    let trail = marks(&[8, 9]);
    let a10 = at(10);
    let e = with_trail(&trail, 10, &a10);
    assert_eq!(e.start(), 8);
    let page = vec![ev(8, 0x1000), ev(9, 0x1000), ev(10, 0x1000), ev(11, 0x2000)];
    assert_eq!(
        classify(1, e, page, 8).unwrap(),
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
    let anchor = at(max - 1);
    let Read::Next { events, .. } = classify(1, exp(max - 1, &anchor), page.clone(), 8).unwrap()
    else {
        panic!()
    };
    assert_eq!(events.iter().map(|e| e.id).collect::<Vec<_>>(), [max, 1, 2]);
    // A trail across the wrap is found in the log's order too.
    let trail = [Mark {
        event: max - 1,
        anchor: Some(at(max - 1)),
    }];
    let cp = Anchor::of(&ev(max, 0x2000));
    let expected = Expected {
        trail: &trail,
        checkpoint: max,
        anchor: Some(&cp),
    };
    let Read::Next { events, .. } = classify(1, expected, page.clone(), 8).unwrap() else {
        panic!()
    };
    assert_eq!(events.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2]);
    let one = Anchor::of(&ev(1, 0x2000));
    let past = [
        Mark {
            event: max - 1,
            anchor: Some(at(max - 1)),
        },
        Mark {
            event: max,
            anchor: Some(cp.clone()),
        },
    ];
    let expected = Expected {
        trail: &past,
        checkpoint: 1,
        anchor: Some(&one),
    };
    let Read::Next { events, .. } = classify(1, expected, page.clone(), 8).unwrap() else {
        panic!()
    };
    assert_eq!(events.iter().map(|e| e.id).collect::<Vec<_>>(), [2]);
    // The same trail, another event under an ID past the wrap: a reset.
    let other = Anchor::of(&ev(1, 0x1000));
    let expected = Expected {
        trail: &past,
        checkpoint: 1,
        anchor: Some(&other),
    };
    assert!(matches!(
        classify(1, expected, page, 8).unwrap(),
        Read::Reset { .. }
    ));
    assert!(follows(1, max) && follows(max, max - 1) && !follows(5, 10) && follows(11, 10));
    // Not a wrap: a shuffled page is still put in order.
    let page = vec![ev(12, 0x1000), ev(10, 0x1000), ev(11, 0x1000)];
    assert!(!wraps_once(&page));
    let page = vec![ev(max, 0x1000), ev(3, 0x1000), ev(1, 0x1000)];
    assert!(!wraps_once(&page));
}

#[test]
fn a_reset_whose_next_event_passed_for_the_continuation_is_a_reset() {
    // Realtime moved the checkpoint from 10 to 11, but 11 came from a
    // log reset whose events 1..=10 were all dropped: 11 itself reads
    // back unchanged, event 10 does not.
    let trail = marks(&[10]);
    let mut new11 = ev(11, 0x2000);
    new11.user_id = "new".into();
    let anchor = Anchor::of(&new11);
    let mut reset = ev(10, 0x1000);
    reset.timestamp += 60;
    let page = vec![reset, new11.clone(), ev(12, 0x1000)];
    let r = classify(1, with_trail(&trail, 11, &anchor), page.clone(), 8).unwrap();
    assert!(matches!(r, Read::Reset { .. }), "{r:?}");
    // Read from the checkpoint alone, as before the trail: unseen.
    let from_checkpoint = page.into_iter().skip(1).collect();
    let r = classify(1, exp(11, &anchor), from_checkpoint, 8).unwrap();
    assert!(matches!(r, Read::Next { .. }), "{r:?}");
}

#[test]
fn a_log_that_ends_or_skips_inside_the_trail_is_a_reset() {
    let trail = marks(&[8, 9]);
    let ends = vec![ev(8, 0x1000), ev(9, 0x1000)];
    let r = classify(1, with_trail(&trail, 10, &at(10)), ends, 8).unwrap();
    assert!(matches!(r, Read::Reset { .. }), "{r:?}");
    let skips = vec![ev(8, 0x1000), ev(10, 0x1000), ev(11, 0x1000)];
    let r = classify(1, with_trail(&trail, 10, &at(10)), skips, 8).unwrap();
    assert!(matches!(r, Read::Reset { .. }), "{r:?}");
    // A full page that ends before the checkpoint cannot tell.
    let full = vec![ev(8, 0x1000), ev(9, 0x1000)];
    assert!(matches!(
        classify(1, with_trail(&trail, 10, &at(10)), full, 2),
        Err(ReadError::ShortOfCheckpoint { .. })
    ));
}

#[test]
fn a_ring_that_overwrote_part_of_the_trail_verifies_the_rest() {
    let trail = marks(&[7, 8, 9]);
    // Clamped to 9: 9 and 10 are checked, 11 follows.
    let page = vec![ev(9, 0x1000), ev(10, 0x1000), ev(11, 0x1000)];
    let r = classify(1, with_trail(&trail, 10, &at(10)), page, 8).unwrap();
    assert_eq!(
        r,
        Read::Next {
            events: vec![ev(11, 0x1000)],
            more: false
        }
    );
    let mut other = ev(10, 0x1000);
    other.user_id = "x".into();
    let page = vec![ev(9, 0x1000), other];
    let r = classify(1, with_trail(&trail, 10, &at(10)), page, 8).unwrap();
    assert!(matches!(r, Read::Reset { .. }), "{r:?}");
    // Everything up to the checkpoint gone (a cleared log goes on at
    // checkpoint + 1): nothing lost; further on: lost.
    let r = classify(1, with_trail(&trail, 10, &at(10)), vec![ev(11, 0x4200)], 8).unwrap();
    assert!(matches!(r, Read::Next { .. }), "{r:?}");
    let r = classify(1, with_trail(&trail, 10, &at(10)), vec![ev(13, 0x4200)], 8).unwrap();
    assert!(matches!(r, Read::Lost { first_lost: 11, .. }), "{r:?}");
}

#[test]
fn a_long_trail_is_cut_to_what_a_page_covers() {
    let trail = marks(&[1, 2, 3, 4, 5, 6]);
    assert_eq!(fitting(&trail, 8).len(), 4);
    assert_eq!(fitting(&trail, 8)[0].event, 3);
    assert_eq!(fitting(&trail, PAGE).len(), 6);
}

#[test]
fn pages_out_of_order_are_put_in_order() {
    let page = vec![ev(12, 0x1000), ev(10, 0x1000), ev(11, 0x1000)];
    let Read::Next { events, .. } = classify(1, exp(10, &at(10)), page, 8).unwrap() else {
        panic!()
    };
    assert_eq!(events.iter().map(|e| e.id).collect::<Vec<_>>(), [11, 12]);
}
