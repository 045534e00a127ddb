//! Redis' glob patterns (`*`, `?`, `[abc]`, `[^a-z]`, `\x`): SCAN and KEYS `MATCH` on the
//! workers, HSCAN's on hash fields, CONFIG GET's parameter names, and twincache-migrate's
//! key patterns (a copy that transforms on the way must know which scanned keys belong to
//! the schema's key pattern, and SCAN's MATCH can only filter by one pattern).

/// Whether `key` matches `pattern`, with Redis' `stringmatchlen` rules. To test many keys
/// against one pattern, compile it once ([`Pattern::new`]).
pub fn matches(pattern: &[u8], key: &[u8]) -> bool {
    Pattern::new(pattern).matches(key)
}

/// A pattern compiled for matching many keys: runs of `*` are one, a `[...]` class is a
/// 256-bit set and an escape is its byte. Matching a key then costs the same whatever the
/// pattern's length: the uncompiled pattern cost its length for every key (a `MATCH` of
/// 100,000 `*` and an `x` took a worker 12 s over 10,000 keys, an adversarial test found).
#[derive(Debug, Clone)]
pub struct Pattern {
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Star,
    Any,
    Byte(u8),
    Class([u64; 4]),
}

impl Token {
    fn takes(&self, c: u8) -> bool {
        match self {
            Token::Any => true,
            Token::Byte(b) => *b == c,
            Token::Class(bits) => bits[usize::from(c >> 6)] >> (c & 63) & 1 == 1,
            Token::Star => false,
        }
    }
}

impl Pattern {
    pub fn new(pattern: &[u8]) -> Pattern {
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < pattern.len() {
            let token = match pattern[i] {
                b'*' => {
                    i += 1;
                    if tokens.last() == Some(&Token::Star) {
                        continue;
                    }
                    Token::Star
                }
                b'?' => {
                    i += 1;
                    Token::Any
                }
                b'[' => {
                    let (bits, next) = class(pattern, i);
                    i = next;
                    Token::Class(bits)
                }
                b'\\' if i + 1 < pattern.len() => {
                    i += 2;
                    Token::Byte(pattern[i - 1])
                }
                c => {
                    i += 1;
                    Token::Byte(c)
                }
            };
            tokens.push(token);
        }
        Pattern { tokens }
    }

    /// Whether `key` matches: iterative, with one backtrack point for the last `*`, so no
    /// recursion depth for a hostile pattern.
    pub fn matches(&self, key: &[u8]) -> bool {
        let t = &self.tokens;
        let (mut p, mut k) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while k < key.len() {
            if let Some(token) = t.get(p) {
                if *token == Token::Star {
                    star = Some((p, k));
                    p += 1;
                    continue;
                }
                if token.takes(key[k]) {
                    p += 1;
                    k += 1;
                    continue;
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
        t[p..].iter().all(|t| *t == Token::Star)
    }
}

/// A `[...]` class at `pattern[start]`: the bytes in it, and where the pattern goes on. As
/// Redis reads one: a class the pattern ends inside is closed there (`[abc` is `[abc]`), a
/// range may end in `]` (`[a-]` is `]` to `a`), and a `\\` escapes only if a byte follows.
fn class(pattern: &[u8], start: usize) -> ([u64; 4], usize) {
    let mut bits = [0u64; 4];
    let mut set = |lo: u8, hi: u8| {
        for c in lo..=hi {
            bits[usize::from(c >> 6)] |= 1 << (c & 63);
        }
    };
    let mut i = start + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    loop {
        let left = pattern.len().saturating_sub(i);
        if left >= 2 && pattern[i] == b'\\' {
            i += 1;
            set(pattern[i], pattern[i]);
        } else if left == 0 {
            break;
        } else if pattern[i] == b']' {
            i += 1;
            break;
        } else if left >= 3 && pattern[i + 1] == b'-' {
            let (a, b) = (pattern[i], pattern[i + 2]);
            set(a.min(b), a.max(b));
            i += 2;
        } else {
            set(pattern[i], pattern[i]);
        }
        i += 1;
    }
    if negate {
        bits = bits.map(|b| !b);
    }
    (bits, i.min(pattern.len()))
}

#[cfg(test)]
mod tests {
    use super::{matches, Pattern};
    use proptest::prelude::*;

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
        assert!(m("h[b-a]llo", "hallo"));
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "axb"));
        assert!(m("*:*:x", "a:b:c:x"));
        // As redis-server 7.0 answers KEYS: a class the pattern ends inside is closed
        // there, a range may end in `]`, and a `\\` that ends a class is itself.
        assert!(m("[abc", "a") && m("[abc", "b") && !m("[abc", "ab"));
        assert!(m("*[abc", "ab") && m("*[abc", "[abc") && !m("*[abc", ""));
        assert!(m("[a-]", "]") && m("[a-]", "a") && !m("[a-]", "-") && !m("[a-]", "b"));
        assert!(m("[a-", "a") && m("[a-", "-"));
        assert!(m("[\\", "\\"));
        assert!(!m("a[", "a") && !m("a[", "ab"));
        assert!(m("a*b*c", "aXbYbZc"));
        assert!(m("[\\]]", "]"));
        assert!(m("x\\", "x\\"));
        assert!(m("***", ""));
    }

    /// Redis' `stringmatchlen` as this module first ported it, byte by byte on the
    /// uncompiled pattern: the reference the compiled form must agree with.
    fn reference(pattern: &[u8], key: &[u8]) -> bool {
        fn class(pattern: &[u8], start: usize, c: u8) -> (bool, usize) {
            let mut i = start + 1;
            let negate = pattern.get(i) == Some(&b'^');
            if negate {
                i += 1;
            }
            let mut hit = false;
            loop {
                let left = pattern.len().saturating_sub(i);
                if left >= 2 && pattern[i] == b'\\' {
                    i += 1;
                    hit |= pattern[i] == c;
                } else if left == 0 {
                    break;
                } else if pattern[i] == b']' {
                    i += 1;
                    break;
                } else if left >= 3 && pattern[i + 1] == b'-' {
                    let (lo, hi) = (
                        pattern[i].min(pattern[i + 2]),
                        pattern[i].max(pattern[i + 2]),
                    );
                    hit |= (lo..=hi).contains(&c);
                    i += 2;
                } else {
                    hit |= pattern[i] == c;
                }
                i += 1;
            }
            (hit != negate, i.min(pattern.len()))
        }
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
                        if let (true, next) = class(pattern, p, key[k]) {
                            p = next;
                            k += 1;
                            continue;
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

    proptest! {
        #[test]
        fn the_compiled_pattern_matches_as_the_reference_does(
            pattern in proptest::collection::vec(
                prop_oneof![Just(b'*'), Just(b'?'), Just(b'['), Just(b']'), Just(b'^'),
                            Just(b'-'), Just(b'\\'), Just(b'a'), Just(b'b'), Just(b'c')],
                0..12,
            ),
            key in proptest::collection::vec(
                prop_oneof![Just(b'a'), Just(b'b'), Just(b'c'), Just(b'*'), Just(b'-'),
                            Just(b']'), Just(b'\\'), any::<u8>()],
                0..10,
            ),
        ) {
            prop_assert_eq!(matches(&pattern, &key), reference(&pattern, &key));
        }
    }

    /// A long pattern costs its length once, not for every key.
    #[test]
    fn a_long_pattern_is_compiled_to_a_few_tokens() {
        let mut stars = vec![b'*'; 100_000];
        stars.push(b'x');
        assert_eq!(Pattern::new(&stars).tokens.len(), 2);
        let mut class = b"*[".to_vec();
        class.extend(std::iter::repeat_n(b'b', 100_000));
        class.push(b']');
        let p = Pattern::new(&class);
        assert_eq!(p.tokens.len(), 2);
        assert!(p.matches(b"key:b") && !p.matches(b"key:1"));
    }
}
