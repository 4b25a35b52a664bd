//! What Parley's property tests share to fuzz its parsers (frames, HTTP parameters, Avro):
//! how a valid input is mutated, and how many cases a property runs. Plain functions with
//! no dependency, so each crate's tests generate the edits with their own tool.

/// One edit of a byte string: where, a byte, and which kind (see [`mutate`]).
pub type Edit = (usize, u8, u8);

/// Applies `edits` in order: kind 0 overwrites a byte, 1 inserts one, 2 truncates, any
/// other (or 0 at the end) repeats the prefix up to the position (nested or huge inputs).
/// Positions wrap around the current length.
pub fn mutate(bytes: &mut Vec<u8>, edits: &[Edit]) {
    for &(at, byte, kind) in edits {
        let at = at % (bytes.len() + 1);
        match kind {
            0 if at < bytes.len() => bytes[at] = byte,
            1 => bytes.insert(at, byte),
            2 => bytes.truncate(at),
            _ => bytes.extend_from_within(..at),
        }
    }
}

/// Cases per property: 10,000 in the test command; `PARLEY_FUZZ_CASES` for a longer run.
pub fn cases() -> u32 {
    std::env::var("PARLEY_FUZZ_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(10_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_edit_does_what_it_says() {
        let mut bytes = b"abc".to_vec();
        mutate(&mut bytes, &[(1, b'X', 0)]);
        assert_eq!(bytes, b"aXc");
        mutate(&mut bytes, &[(3, b'!', 1), (7, 0, 2)]); // 7 wraps to 7 % 5 = 2
        assert_eq!(bytes, b"aX");
        mutate(&mut bytes, &[(2, 0, 3)]);
        assert_eq!(bytes, b"aXaX");
        mutate(&mut bytes, &[(4, b'Z', 0)]); // nothing to overwrite at the end: a repeat
        assert_eq!(bytes, b"aXaXaXaX");
    }
}
