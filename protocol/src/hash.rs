//! Stable key hashing.
//!
//! Every orchestrator must send a key to the same pair, whatever its build, platform or start
//! time, so the hash is spelled out here instead of borrowing `std`'s (randomised per process)
//! hasher. Which pair holds a key is the slot map's to say (`crate::slots`).
//!
//! ## Hash tags
//! As in Redis Cluster and twemproxy, a key holding `{...}` with at least one byte between
//! the first `{` and the next `}` is placed by that part alone ([`hash_tag`]): `{user1}:cart`
//! and `{user1}:profile` share a pair, so a transaction or a multi-key command can name both.

/// 64-bit FNV-1a of the key followed by the SplitMix64 finaliser.
///
/// FNV-1a alone mixes its last bytes poorly into the high bits; the finaliser spreads every
/// input bit over the whole word, so the slot (its low bits) depends on every byte.
pub fn key_hash(key: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    mix64(h)
}

/// The SplitMix64 finaliser: a bijection with full avalanche.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The part of `key` that places it: the bytes between the first `{` and the next `}` when
/// there is at least one, else the whole key (Redis Cluster's rule, so applications written
/// for it group keys the same way here).
pub fn hash_tag(key: &[u8]) -> &[u8] {
    // Every request's key is searched: memchr's vectorised search rather than byte by byte.
    let Some(open) = memchr::memchr(b'{', key) else {
        return key;
    };
    match memchr::memchr(b'}', &key[open + 1..]) {
        Some(len) if len > 0 => &key[open + 1..open + 1 + len],
        _ => key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden values: these must never change, or keys would move between pairs on upgrade.
    #[test]
    fn hash_is_stable_across_builds() {
        // FNV-1a's published test vector for "a", then the finaliser.
        assert_eq!(key_hash(b"a"), mix64(0xaf63_dc4c_8601_ec8c));
        let golden: [(&[u8], u64); 4] = [
            (b"a", 0x02c0_bdbf_4814_20f8),
            (b"user:42", 0xd68c_b863_fc5e_0c34),
            (b"", 0xf52a_15e9_a9b5_e89b),
            (b"\x00\xff", 0xa70b_ee94_c6c8_447b),
        ];
        for (key, hash) in golden {
            assert_eq!(key_hash(key), hash, "key {key:?}");
        }
    }

    #[test]
    fn hash_tags_place_keys_like_redis_cluster() {
        assert_eq!(hash_tag(b"{user1}:cart"), b"user1");
        assert_eq!(hash_tag(b"a{user1}b{x}"), b"user1");
        assert_eq!(hash_tag(b"{}x"), b"{}x", "an empty tag is no tag");
        assert_eq!(hash_tag(b"{a"), b"{a");
        assert_eq!(hash_tag(b"a}{b}"), b"b");
        assert_eq!(hash_tag(b"{{a}}"), b"{a");
        assert_eq!(hash_tag(b"x{user1}"), b"user1");
    }
}
