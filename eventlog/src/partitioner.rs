//! Which partition a key lands on, computed without asking the broker: a reader that must
//! know where a conversation's events are (to wait until a projection has all of them)
//! before any of them exists needs it.

/// librdkafka's `consistent_random` partitioner (its default, pinned by every Parley
/// producer): CRC-32 (IEEE) of the key modulo the partition count. Java clients default to
/// murmur2, so a non-Parley producer of conversation events must set the same partitioner.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    let partitions = u32::try_from(partitions.max(1)).unwrap_or(1);
    i32::try_from(crc32fast::hash(key) % partitions).unwrap_or(0)
}

/// The librdkafka setting [`partition_for_key`] mirrors.
pub const PARTITIONER: (&str, &str) = ("partitioner", "consistent_random");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hash_with_the_ieee_crc32() {
        // crc32("123456789") is the standard check value 0xCBF43926.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(partition_for_key(b"123456789", 6), i32::try_from(0xCBF4_3926_u32 % 6).unwrap());
        let key = b"0b7c2a44-4f1e-4d7e-9a1c-2f0d5e6a7b8c";
        assert!((0..6).contains(&partition_for_key(key, 6)));
        assert_eq!(partition_for_key(key, 1), 0);
    }
}
