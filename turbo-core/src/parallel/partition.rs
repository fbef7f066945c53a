//! Contiguous, balanced splits of an axis (tokens, heads, latent rows) over the ranks.

use std::ops::Range;

use crate::{Error, Result};

/// `len` items split into `parts` contiguous ranges in rank order, as even as a given
/// alignment allows: the items go in units of `align` (the last unit may be shorter), and the
/// first `units % parts` ranks take one unit more than the others. A range may be empty (more
/// ranks than units).
///
/// Alignment keeps shard boundaries where a computation's grouping needs them: W8A8 int8
/// linears quantise activations in tiles of 128 rows, so DiT token shards of an int8 model
/// start at multiples of 128 and every tile holds the rows it holds on one device.
///
/// ```
/// use turbo_core::parallel::Partition;
///
/// let heads = Partition::balanced(12, 5)?;
/// assert_eq!(heads.sizes(), [3, 3, 2, 2, 2]);
/// let tokens = Partition::aligned(300, 2, 128)?;
/// assert_eq!(tokens.sizes(), [256, 44]);
/// assert_eq!(tokens.range(1), 256..300);
/// # Ok::<(), turbo_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    starts: Vec<usize>,
}

impl Partition {
    /// [`Partition::aligned`] with an alignment of 1.
    pub fn balanced(len: usize, parts: usize) -> Result<Self> {
        Self::aligned(len, parts, 1)
    }

    /// `len` items in `parts` ranges whose boundaries are multiples of `align` (or `len`).
    /// Fails with [`Error::InvalidConfig`] for zero parts or a zero alignment.
    pub fn aligned(len: usize, parts: usize, align: usize) -> Result<Self> {
        if parts == 0 || align == 0 {
            return Err(Error::InvalidConfig {
                field: "partition".into(),
                reason: format!(
                    "{len} items in {parts} parts aligned to {align}: both must be at least 1"
                ),
            });
        }
        let units = len.div_ceil(align);
        let (base, extra) = (units / parts, units % parts);
        let mut starts = Vec::with_capacity(parts + 1);
        let mut unit = 0;
        for part in 0..parts {
            starts.push((unit * align).min(len));
            unit += base + usize::from(part < extra);
        }
        starts.push(len);
        Ok(Self { starts })
    }

    /// The number of ranges.
    pub fn parts(&self) -> usize {
        self.starts.len() - 1
    }

    /// The number of items split.
    pub fn total(&self) -> usize {
        self.starts[self.parts()]
    }

    /// Range `part`'s items.
    pub fn range(&self, part: usize) -> Range<usize> {
        self.starts[part]..self.starts[part + 1]
    }

    /// Range `part`'s first item.
    pub fn start(&self, part: usize) -> usize {
        self.starts[part]
    }

    /// Range `part`'s item count.
    pub fn len(&self, part: usize) -> usize {
        self.starts[part + 1] - self.starts[part]
    }

    /// Whether range `part` is empty.
    pub fn is_empty(&self, part: usize) -> bool {
        self.len(part) == 0
    }

    /// Every range's item count, in order.
    pub fn sizes(&self) -> Vec<usize> {
        (0..self.parts()).map(|part| self.len(part)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_splits_differ_by_at_most_one() {
        for len in 0..40 {
            for parts in 1..9 {
                let p = Partition::balanced(len, parts).unwrap();
                let sizes = p.sizes();
                assert_eq!(sizes.iter().sum::<usize>(), len);
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(max - min <= 1, "{len} in {parts}: {sizes:?}");
                // Contiguous and in order.
                for part in 1..parts {
                    assert_eq!(p.range(part - 1).end, p.start(part));
                }
            }
        }
    }

    #[test]
    fn aligned_boundaries_are_multiples_of_the_alignment() {
        let p = Partition::aligned(75_600, 8, 128).unwrap();
        assert_eq!(p.total(), 75_600);
        for part in 0..8 {
            assert_eq!(p.start(part) % 128, 0);
        }
        assert_eq!(p.sizes()[..7], [9472; 7]);
        assert_eq!(p.len(7), 75_600 - 7 * 9472);
        // More ranks than units: the last ones are empty.
        assert_eq!(
            Partition::aligned(130, 4, 128).unwrap().sizes(),
            [128, 2, 0, 0]
        );
    }

    #[test]
    fn zero_parts_or_alignment_is_an_error() {
        assert!(matches!(
            Partition::balanced(4, 0),
            Err(Error::InvalidConfig { .. })
        ));
        assert!(Partition::aligned(4, 2, 0).is_err());
    }
}
