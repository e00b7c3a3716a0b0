//! A set of byte ranges kept as sorted, disjoint, merged intervals: the
//! union of what a ticket's operations completed, whose size is the
//! `transferred` of the ticket status.

/// Disjoint half-open ranges, sorted, adjacent ones merged.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<(u64, u64)>,
}

impl RangeSet {
    /// Adds `[start, end)`.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // First range that ends at or after `start` (touching merges).
        let first = self.ranges.partition_point(|&(_, e)| e < start);
        // Ranges from `first` that start at or before `end` overlap or touch.
        let last = first + self.ranges[first..].partition_point(|&(s, _)| s <= end);
        let merged = self.ranges[first..last].iter().fold((start, end), |(s, e), &(rs, re)| (s.min(rs), e.max(re)));
        self.ranges.splice(first..last, [merged]);
    }

    /// Total bytes covered.
    pub fn total(&self) -> u64 {
        self.ranges.iter().map(|(start, end)| end - start).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn total_is_the_size_of_the_union(ranges in proptest::collection::vec((0u64..500, 0u64..100), 0..40)) {
            let mut set = RangeSet::default();
            let mut covered = [false; 600];
            for (start, length) in ranges {
                set.insert(start, start + length);
                for byte in start..start + length {
                    covered[byte as usize] = true;
                }
            }
            prop_assert_eq!(set.total(), covered.iter().filter(|&&c| c).count() as u64);
            for pair in set.ranges.windows(2) {
                prop_assert!(pair[0].1 < pair[1].0, "disjoint, sorted, merged: {:?}", set.ranges);
            }
        }
    }
}
