//! Helpers the decoders' tests share.

/// `input` as a socket might deliver it: reads of the sizes in `cuts` (at least a byte each),
/// then the rest in one.
pub(crate) fn reads<'a>(mut input: &'a [u8], cuts: &'a [usize]) -> impl Iterator<Item = &'a [u8]> {
    let mut cuts = cuts.iter().copied();
    std::iter::from_fn(move || {
        if input.is_empty() {
            return None;
        }
        let n = cuts.next().unwrap_or(usize::MAX).clamp(1, input.len());
        let (read, rest) = input.split_at(n);
        input = rest;
        Some(read)
    })
}
