//! Which acknowledged writes are not yet on stable storage, and which may
//! have been lost. An NBD server acknowledges a write once it holds it,
//! not once it is on disk: a qemu-storage-daemon killed before its next
//! flush loses what it held (qcow2 metadata above all). So a backend keeps
//! a ledger, the way a kernel keeps a writeback error for fsync: every
//! acknowledged range is *unflushed* until a flush covers it; when one of
//! the backend's connections breaks (the daemon died, restarted, or was
//! replaced after a timeout), every unflushed range becomes *lost*. A
//! flush is refused while anything is lost, however often it is retried;
//! a range written again after the break is no longer lost, so a client
//! that starts its transfer over ends with a flush that succeeds.
//!
//! Each break starts a new *epoch*. A write records the epoch it was sent
//! in; acknowledged in a later one, it may have landed on the server that
//! died, and counts as lost. Memory is bounded: past [`MAX_RANGES`]
//! separate ranges a set keeps one range that covers them all (a flush then
//! asks for more to be written again, never less).

use std::collections::BTreeMap;
use std::ops::Range;

use parking_lot::Mutex;

/// Most separate ranges a set keeps before it covers them with one (about
/// 1 MiB per set at most).
pub const MAX_RANGES: usize = 16384;

/// Byte ranges as a map from start to end, coalesced, never overlapping.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RangeSet(BTreeMap<u64, u64>);

impl RangeSet {
    /// True when the set holds no byte.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Bytes in the set.
    pub fn bytes(&self) -> u64 {
        self.0.iter().map(|(start, end)| end - start).sum()
    }

    /// The first range, if any.
    pub fn first(&self) -> Option<Range<u64>> {
        self.0.first_key_value().map(|(&start, &end)| start..end)
    }

    /// Separate ranges held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Adds a range, merging it with those it touches.
    pub fn insert(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let (mut start, mut end) = (range.start, range.end);
        let touching: Vec<u64> = self.0.range(..=end).rev().take_while(|&(_, &e)| e >= start).map(|(&s, _)| s).collect();
        for key in touching {
            let old_end = self.0.remove(&key).expect("listed above");
            start = start.min(key);
            end = end.max(old_end);
        }
        self.0.insert(start, end);
        if self.0.len() > MAX_RANGES {
            let first = *self.0.first_key_value().expect("not empty").0;
            let last = self.0.values().copied().max().expect("not empty");
            self.0 = BTreeMap::from([(first, last)]);
        }
    }

    /// Removes a range, splitting those it cuts.
    pub fn remove(&mut self, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let overlapping: Vec<(u64, u64)> =
            self.0.range(..range.end).rev().take_while(|&(_, &e)| e > range.start).map(|(&s, &e)| (s, e)).collect();
        for (start, end) in overlapping {
            self.0.remove(&start);
            if start < range.start {
                self.0.insert(start, range.start);
            }
            if end > range.end {
                self.0.insert(range.end, end);
            }
        }
    }

    /// Adds every range of `other`.
    pub fn extend(&mut self, other: RangeSet) {
        for (start, end) in other.0 {
            self.insert(start..end);
        }
    }
}

/// Writes that a broken connection may have cost, as the 502 of a flush
/// reports them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "writes may be lost: the NBD server behind this image restarted or a connection to it broke after acknowledging {bytes} bytes \
     (in {ranges} ranges, the first at offset {first}) that were never flushed; start the transfer over: once those ranges are \
     written again, a flush succeeds"
)]
pub struct LostWrites {
    /// Bytes that may be lost.
    pub bytes: u64,
    /// Separate ranges they form.
    pub ranges: usize,
    /// Offset of the first.
    pub first: u64,
}

#[derive(Debug, Default)]
struct State {
    epoch: u64,
    unflushed: RangeSet,
    lost: RangeSet,
}

/// A flush under way: the epoch it started in and the ranges it covers.
#[derive(Debug)]
pub struct Flushing {
    epoch: u64,
    covered: RangeSet,
}

/// The ledger of one backend's writes.
#[derive(Debug, Default)]
pub struct Ledger(Mutex<State>);

impl Ledger {
    /// The current epoch, to be recorded by a write before it is sent.
    pub fn epoch(&self) -> u64 {
        self.0.lock().epoch
    }

    /// A write sent in epoch `sent_in` was acknowledged.
    pub fn acknowledged(&self, sent_in: u64, range: Range<u64>) {
        let mut state = self.0.lock();
        if state.epoch == sent_in {
            state.lost.remove(range.clone());
            state.unflushed.insert(range);
        } else {
            state.lost.insert(range);
        }
    }

    /// A connection broke: what was not flushed may be lost.
    pub fn connection_broke(&self) {
        let mut state = self.0.lock();
        state.epoch += 1;
        let unflushed = std::mem::take(&mut state.unflushed);
        state.lost.extend(unflushed);
    }

    /// True while some writes are lost.
    pub fn has_lost(&self) -> bool {
        !self.0.lock().lost.is_empty()
    }

    /// Starts a flush, or refuses it while writes are lost.
    pub fn begin_flush(&self) -> Result<Flushing, LostWrites> {
        let mut state = self.0.lock();
        lost_writes(&state.lost)?;
        Ok(Flushing { epoch: state.epoch, covered: std::mem::take(&mut state.unflushed) })
    }

    /// Ends a flush: on success what it covered is stable, unless a
    /// connection broke meanwhile; on failure it is unflushed again.
    pub fn end_flush(&self, flushing: Flushing, succeeded: bool) -> Result<(), LostWrites> {
        let mut state = self.0.lock();
        if state.epoch != flushing.epoch {
            state.lost.extend(flushing.covered);
            return lost_writes(&state.lost);
        }
        if !succeeded {
            state.unflushed.extend(flushing.covered);
        }
        Ok(())
    }
}

fn lost_writes(lost: &RangeSet) -> Result<(), LostWrites> {
    match lost.first() {
        None => Ok(()),
        Some(first) => Err(LostWrites { bytes: lost.bytes(), ranges: lost.len(), first: first.start }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The set as a bitmap over a small space, for comparison.
    fn model(set: &RangeSet, space: u64) -> Vec<bool> {
        (0..space).map(|byte| set.0.iter().any(|(&start, &end)| (start..end).contains(&byte))).collect()
    }

    proptest! {
        #[test]
        fn inserts_and_removes_match_a_bitmap(operations in prop::collection::vec((any::<bool>(), 0u64..200, 0u64..40), 0..60)) {
            let mut set = RangeSet::default();
            let mut bitmap = vec![false; 256];
            for (insert, start, length) in operations {
                let range = start..start + length;
                if insert { set.insert(range.clone()) } else { set.remove(range.clone()) }
                for byte in range {
                    bitmap[byte as usize] = insert;
                }
                prop_assert_eq!(model(&set, 256), bitmap.clone());
                // Coalesced: no two ranges touch.
                let ranges: Vec<_> = set.0.iter().collect();
                prop_assert!(ranges.windows(2).all(|pair| pair[0].1 < pair[1].0));
            }
        }
    }

    #[test]
    fn a_set_past_its_limit_covers_everything_it_held() {
        let mut set = RangeSet::default();
        for index in 0..=MAX_RANGES as u64 {
            set.insert(index * 10..index * 10 + 1);
        }
        assert_eq!(set.len(), 1);
        assert_eq!(set.first(), Some(0..MAX_RANGES as u64 * 10 + 1));
        set.insert(u64::MAX - 1..u64::MAX);
        assert_eq!(set.len(), 2, "numbers at the end of u64 are ranges like any other");
    }

    #[test]
    fn writes_before_a_break_are_lost_until_written_again() {
        let ledger = Ledger::default();
        let epoch = ledger.epoch();
        ledger.acknowledged(epoch, 0..100);
        ledger.connection_broke();
        let lost = ledger.begin_flush().expect_err("the write was never flushed");
        assert_eq!((lost.bytes, lost.first), (100, 0));
        assert!(ledger.begin_flush().is_err(), "a retried flush is refused too");
        let epoch = ledger.epoch();
        ledger.acknowledged(epoch, 0..60);
        assert_eq!(ledger.begin_flush().expect_err("40 bytes still lost").bytes, 40);
        ledger.acknowledged(epoch, 60..100);
        let flushing = ledger.begin_flush().expect("everything written again");
        assert!(ledger.end_flush(flushing, true).is_ok());
    }

    #[test]
    fn flushed_writes_survive_a_break_and_late_acknowledgements_do_not() {
        let ledger = Ledger::default();
        let epoch = ledger.epoch();
        ledger.acknowledged(epoch, 0..10);
        let flushing = ledger.begin_flush().unwrap();
        ledger.end_flush(flushing, true).unwrap();
        ledger.connection_broke();
        assert!(ledger.begin_flush().is_ok(), "flushed data is stable");
        // Sent before the break, acknowledged after: it may be on the dead server.
        ledger.acknowledged(epoch, 20..30);
        assert_eq!(ledger.begin_flush().unwrap_err().first, 20);
    }

    #[test]
    fn a_break_during_a_flush_fails_it() {
        let ledger = Ledger::default();
        ledger.acknowledged(0, 0..10);
        let flushing = ledger.begin_flush().unwrap();
        ledger.connection_broke();
        assert!(ledger.end_flush(flushing, true).is_err());
        let ledger = Ledger::default();
        ledger.acknowledged(0, 0..10);
        let flushing = ledger.begin_flush().unwrap();
        ledger.end_flush(flushing, false).unwrap();
        ledger.connection_broke();
        assert!(ledger.begin_flush().is_err(), "a failed flush leaves its writes unflushed");
    }
}
