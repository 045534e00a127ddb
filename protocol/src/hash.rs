//! Stable key hashing and the consistent key-to-pair mapping.
//!
//! Every orchestrator must send a key to the same pair, whatever its build, platform or start
//! time, so the hash is spelled out here instead of borrowing `std`'s (randomised per process)
//! hasher. The mapping is Lamping and Veach's jump consistent hash: adding a pair to `n` moves
//! exactly the keys that land on the new pair, about `1/(n+1)` of them, and none between the
//! old pairs.
//!
//! ## Hash tags
//! As in Redis Cluster and twemproxy, a key holding `{...}` with at least one byte between
//! the first `{` and the next `}` is placed by that part alone ([`hash_tag`]): `{user1}:cart`
//! and `{user1}:profile` share a pair, so a transaction or a multi-key command can name both.

/// 64-bit FNV-1a of the key followed by the SplitMix64 finaliser.
///
/// FNV-1a alone mixes its last bytes poorly into the high bits; the finaliser spreads every
/// input bit over the whole word, which jump hash needs since it consumes the word through an
/// LCG.
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

/// Jump consistent hash: maps `hash` to a bucket in `0..buckets`.
///
/// Uses only IEEE-754 double multiplication and division, which give the same result on every
/// platform Rust targets with SSE2 or a soft-float ABI, so the answer is stable everywhere.
///
/// # Panics
/// If `buckets` is zero (a cluster always has at least one pair).
pub fn jump_hash(mut hash: u64, buckets: u32) -> u32 {
    assert!(buckets > 0, "jump_hash needs at least one bucket");
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < i64::from(buckets) {
        b = j;
        hash = hash.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((hash >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// The part of `key` that places it: the bytes between the first `{` and the next `}` when
/// there is at least one, else the whole key (Redis Cluster's rule, so applications written
/// for it group keys the same way here).
pub fn hash_tag(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|&b| b == b'{') else {
        return key;
    };
    match key[open + 1..].iter().position(|&b| b == b'}') {
        Some(len) if len > 0 => &key[open + 1..open + 1 + len],
        _ => key,
    }
}

/// The pair (in `0..pairs`) that owns `key`, placed by its hash tag if it has one.
pub fn pair_for_key(key: &[u8], pairs: usize) -> usize {
    let pairs = u32::try_from(pairs).expect("fewer than 2^32 pairs");
    jump_hash(key_hash(hash_tag(key)), pairs) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden values: these must never change, or keys would move between pairs on upgrade.
    #[test]
    fn hash_is_stable_across_builds() {
        // FNV-1a's published test vector for "a", then the finaliser.
        assert_eq!(key_hash(b"a"), mix64(0xaf63_dc4c_8601_ec8c));
        let golden: [(&[u8], u64, usize); 4] = [
            (b"a", 0x02c0_bdbf_4814_20f8, 1),
            (b"user:42", 0xd68c_b863_fc5e_0c34, 6),
            (b"", 0xf52a_15e9_a9b5_e89b, 5),
            (b"\x00\xff", 0xa70b_ee94_c6c8_447b, 0),
        ];
        for (key, hash, pair_of_7) in golden {
            assert_eq!(key_hash(key), hash, "key {key:?}");
            assert_eq!(pair_for_key(key, 7), pair_of_7, "key {key:?}");
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
        for pairs in 1..20 {
            assert_eq!(
                pair_for_key(b"{user1}:cart", pairs),
                pair_for_key(b"{user1}:profile", pairs)
            );
            assert_eq!(
                pair_for_key(b"x{user1}", pairs),
                pair_for_key(b"user1", pairs)
            );
        }
    }

    #[test]
    fn jump_hash_known_answers() {
        // Values from the reference implementation in the paper's C++ code.
        assert_eq!(jump_hash(0, 1), 0);
        assert_eq!(jump_hash(1, 1), 0);
        for buckets in 1..50 {
            for k in 0..200u64 {
                assert!(jump_hash(k, buckets) < buckets);
            }
        }
    }

    /// Adding a pair to `n` moves about `1/(n+1)` of the keys, and only onto the new pair.
    #[test]
    fn adding_a_pair_moves_one_in_n_plus_one() {
        const KEYS: usize = 100_000;
        for n in [1usize, 2, 3, 4, 8, 16] {
            let mut moved = 0;
            for i in 0..KEYS {
                let key = format!("key:{i}");
                let before = pair_for_key(key.as_bytes(), n);
                let after = pair_for_key(key.as_bytes(), n + 1);
                if before != after {
                    assert_eq!(after, n, "a key moved between old pairs");
                    moved += 1;
                }
            }
            let share = moved as f64 / KEYS as f64;
            let ideal = 1.0 / (n as f64 + 1.0);
            assert!(
                (share - ideal).abs() < 0.01,
                "n={n}: moved {share:.4}, ideal {ideal:.4}"
            );
        }
    }

    #[test]
    fn keys_spread_evenly() {
        const KEYS: usize = 80_000;
        let pairs = 4;
        let mut counts = [0usize; 4];
        for i in 0..KEYS {
            counts[pair_for_key(format!("k{i}").as_bytes(), pairs)] += 1;
        }
        for c in counts {
            let share = c as f64 / KEYS as f64;
            assert!((share - 0.25).abs() < 0.01, "{counts:?}");
        }
    }
}
