//! Stacking per-clip rows of different lengths into one batch buffer, each padded to the longest: the audio of
//! the frame loader's batches (samples) and of the feature cache's units and batches (encoder states).

/// One row to stack: `blocks` runs of `len x inner` values, the runs `stride x inner` apart in `values`
/// (`stride >= len`: a row cut from an already padded buffer keeps its padding out).
#[derive(Debug, Clone, Copy)]
pub struct PaddedRow<'a, T> {
    pub values: &'a [T],
    pub len: usize,
    pub stride: usize,
}

impl<'a, T> PaddedRow<'a, T> {
    /// A row stored without padding (`stride == len`).
    pub fn dense(values: &'a [T], len: usize) -> Self {
        Self { values, len, stride: len }
    }
}

/// Stacks `rows` as `[rows, blocks, padded, inner]`, `padded` the longest `len` (at least `min_len`), padding with
/// `T::default()`. Returns the buffer and `padded`.
pub fn stack_padded<T: Copy + Default>(
    rows: &[PaddedRow<'_, T>],
    blocks: usize,
    inner: usize,
    min_len: usize,
) -> (Vec<T>, usize) {
    let padded = rows.iter().map(|r| r.len).max().unwrap_or(0).max(min_len);
    let mut out = vec![T::default(); rows.len() * blocks * padded * inner];
    for (i, row) in rows.iter().enumerate() {
        assert!(row.len <= row.stride, "a row's length exceeds its stride");
        for b in 0..blocks {
            let src = b * row.stride * inner;
            let dst = (i * blocks + b) * padded * inner;
            out[dst..dst + row.len * inner].copy_from_slice(&row.values[src..src + row.len * inner]);
        }
    }
    (out, padded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_padded_to_the_longest_and_strided_rows_drop_their_padding() {
        // Two rows of 2 blocks x len x 2 values: lengths 1 and 2, the second cut from a buffer padded to 3.
        let a = [1, 2, 3, 4];
        let b = [5, 6, 7, 8, 0, 0, 9, 10, 11, 12, 0, 0];
        let rows = [PaddedRow::dense(&a[..], 1), PaddedRow { values: &b[..], len: 2, stride: 3 }];
        let (out, padded) = stack_padded(&rows, 2, 2, 0);
        assert_eq!(padded, 2);
        #[rustfmt::skip]
        assert_eq!(out, [
            1, 2, 0, 0,   3, 4, 0, 0,
            5, 6, 7, 8,   9, 10, 11, 12,
        ]);
        let (out, padded) = stack_padded::<u8>(&[], 1, 1, 1);
        assert_eq!((out.len(), padded), (0, 1));
    }
}
