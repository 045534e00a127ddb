//! Redis' glob patterns (`*`, `?`, `[abc]`, `[^a-z]`, `\x`): SCAN and KEYS `MATCH` on the
//! workers, HSCAN's on hash fields, CONFIG GET's parameter names, and twincache-migrate's
//! key patterns (a copy that transforms on the way must know which scanned keys belong to
//! the schema's key pattern, and SCAN's MATCH can only filter by one pattern).

/// Whether `key` matches `pattern`, with Redis' `stringmatchlen` rules.
pub fn matches(pattern: &[u8], key: &[u8]) -> bool {
    // Iterative with one backtrack point for the last `*`: linear in practice, and no
    // recursion depth for a hostile pattern.
    let (mut p, mut k) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while k < key.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p, k));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    k += 1;
                    continue;
                }
                b'[' => {
                    if let Some((hit, next)) = class(pattern, p, key[k]) {
                        if hit {
                            p = next;
                            k += 1;
                            continue;
                        }
                    }
                }
                b'\\' if p + 1 < pattern.len() => {
                    if pattern[p + 1] == key[k] {
                        p += 2;
                        k += 1;
                        continue;
                    }
                }
                c => {
                    if c == key[k] {
                        p += 1;
                        k += 1;
                        continue;
                    }
                }
            }
        }
        match star {
            Some((sp, sk)) => {
                p = sp + 1;
                k = sk + 1;
                star = Some((sp, sk + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// A `[...]` class at `pattern[start]`: whether `c` is in it, and where the pattern goes on.
fn class(pattern: &[u8], start: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut hit = false;
    loop {
        let ch = *pattern.get(i)?;
        match ch {
            b']' => break,
            b'\\' => {
                i += 1;
                hit |= *pattern.get(i)? == c;
            }
            _ if pattern.get(i + 1) == Some(&b'-')
                && pattern.get(i + 2).is_some_and(|&e| e != b']') =>
            {
                let (lo, hi) = (ch.min(pattern[i + 2]), ch.max(pattern[i + 2]));
                hit |= (lo..=hi).contains(&c);
                i += 2;
            }
            _ => hit |= ch == c,
        }
        i += 1;
    }
    Some((hit != negate, i + 1))
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn like_redis() {
        let m = |p: &str, k: &str| matches(p.as_bytes(), k.as_bytes());
        assert!(m("user:*", "user:1"));
        assert!(m("user:*", "user:"));
        assert!(!m("user:*", "users:1"));
        assert!(m("*", ""));
        assert!(m("h?llo", "hello"));
        assert!(m("h[ae]llo", "hallo"));
        assert!(!m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo"));
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "axb"));
        assert!(m("*:*:x", "a:b:c:x"));
        assert!(!m("[abc", "a"));
        assert!(m("a*b*c", "aXbYbZc"));
    }
}
