//! INCRBYFLOAT's arithmetic, exactly as Redis does it on x86-64: C `long double` (80-bit
//! extended precision, a 64-bit mantissa), read with `strtold`, and written with `%.17Lf`
//! then stripped of trailing zeros.
//!
//! Rust has no 80-bit float, and `f64` gives other answers: `10.5 + 0.1` is `10.6` in Redis
//! (the long double sum prints as `10.60000000000000000`) but `10.59999999999999964` with an
//! f64 printed the same way. So the three steps are done here in exact integer arithmetic
//! and rounded once, to nearest with ties to even, as the FPU and glibc do: parse to the
//! nearest 64-bit-mantissa value, add exactly and round, and print the exact binary value
//! rounded at 17 decimals. Inputs are bounded (Redis refuses strings of 5,120 bytes or more),
//! so the big integers are too.

use std::cmp::Ordering;

/// Redis' `MAX_LONG_DOUBLE_CHARS`: longer strings are not numbers.
const MAX_CHARS: usize = 5 * 1024;
/// The exponent range of a long double's value `m * 2^e` with a 64-bit mantissa `m` whose
/// top bit is set: the normal range (2^-16382 to 2^16384), and below it the subnormals.
const MIN_EXP: i64 = -16382 - 63;
const MAX_EXP: i64 = 16383 - 63;

/// A finite long double: `(-1)^neg * mantissa * 2^exp`, the mantissa normalised to 64
/// bits (or zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongDouble {
    neg: bool,
    mantissa: u64,
    exp: i64,
}

/// A parsed number: finite, or an infinity (which the additions refuse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Number {
    Finite(LongDouble),
    Infinite,
}

/// Parses like Redis' `string2ld` (`strtold`, refusing leading space, trailing bytes, NaN,
/// and values too large or too small to hold).
pub fn parse(s: &[u8]) -> Option<Number> {
    if s.is_empty() || s.len() >= MAX_CHARS || s[0].is_ascii_whitespace() {
        return None;
    }
    let (neg, body) = match s[0] {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let lower = body.to_ascii_lowercase();
    if lower == b"inf" || lower == b"infinity" {
        return Some(Number::Infinite);
    }
    let (digits, exp10, exp2) = if lower.starts_with(b"0x") {
        parse_hex(&lower[2..])?
    } else {
        let (d, e) = parse_decimal(body)?;
        (d, e, 0)
    };
    let value = round_scaled(neg, digits, exp10, exp2)?;
    Some(Number::Finite(value))
}

/// Decimal digits and exponent: `value = digits * 10^exp`.
fn parse_decimal(s: &[u8]) -> Option<(Big, i64)> {
    let mut i = 0;
    let mut digits = Big::zero();
    let (mut any, mut exp) = (false, 0i64);
    let mut significant = 0usize;
    while i < s.len() && s[i].is_ascii_digit() {
        push_digit(&mut digits, &mut significant, &mut exp, s[i] - b'0', false);
        any = true;
        i += 1;
    }
    if i < s.len() && s[i] == b'.' {
        i += 1;
        while i < s.len() && s[i].is_ascii_digit() {
            push_digit(&mut digits, &mut significant, &mut exp, s[i] - b'0', true);
            any = true;
            i += 1;
        }
    }
    if !any {
        return None;
    }
    if i < s.len() && (s[i] == b'e' || s[i] == b'E') {
        // "1e": strtold stops before the `e`, so Redis refuses it.
        exp = exp.saturating_add(exponent(s, &mut i)?);
    }
    (i == s.len()).then_some((digits, exp))
}

/// Adds a decimal digit to the number being read; digits after the point lower the
/// exponent. Leading zeros are not significant (they cost nothing).
fn push_digit(digits: &mut Big, significant: &mut usize, exp: &mut i64, d: u8, fraction: bool) {
    if *significant > 0 || d != 0 {
        digits.mul_add(10, u32::from(d));
        *significant += 1;
    }
    if fraction {
        *exp -= 1;
    }
}

/// The signed exponent after the `e` or `p` at `s[*i]` (clamped far past any value's range);
/// `None` without digits.
fn exponent(s: &[u8], i: &mut usize) -> Option<i64> {
    *i += 1;
    let neg = match s.get(*i) {
        Some(b'-') => true,
        Some(b'+') => false,
        _ => {
            *i -= 1;
            false
        }
    };
    *i += 1;
    let start = *i;
    let mut e: i64 = 0;
    while let Some(d) = s.get(*i).filter(|d| d.is_ascii_digit()) {
        e = (e * 10 + i64::from(d - b'0')).min(1 << 40);
        *i += 1;
    }
    (*i > start).then_some(if neg { -e } else { e })
}

/// Hexadecimal (`0x1.8p3`): `value = digits * 2^exp2` (no decimal exponent).
fn parse_hex(s: &[u8]) -> Option<(Big, i64, i64)> {
    let mut i = 0;
    let mut digits = Big::zero();
    let (mut any, mut exp2) = (false, 0i64);
    let hex = |c: u8| (c as char).to_digit(16);
    while let Some(d) = s.get(i).and_then(|&c| hex(c)) {
        digits.mul_add(16, d);
        any = true;
        i += 1;
    }
    if s.get(i) == Some(&b'.') {
        i += 1;
        while let Some(d) = s.get(i).and_then(|&c| hex(c)) {
            digits.mul_add(16, d);
            exp2 -= 4;
            any = true;
            i += 1;
        }
    }
    if !any {
        return None;
    }
    if s.get(i) == Some(&b'p') {
        exp2 = exp2.saturating_add(exponent(s, &mut i)?);
    }
    (i == s.len()).then_some((digits, 0, exp2))
}

/// The long double nearest to `digits * 10^exp10 * 2^exp2`; `None` when that overflows or
/// underflows to zero (Redis refuses both).
fn round_scaled(neg: bool, digits: Big, exp10: i64, exp2: i64) -> Option<LongDouble> {
    if digits.is_zero() {
        return Some(LongDouble {
            neg,
            mantissa: 0,
            exp: 0,
        });
    }
    // Far out of range either way, whatever the digits: refuse before computing powers.
    let magnitude = digits.bits() as i64 + exp2 + (exp10 as f64 * std::f64::consts::LOG2_10) as i64;
    if magnitude > MAX_EXP + 64 + 8 {
        return None;
    }
    if magnitude < MIN_EXP - 8 {
        return None;
    }
    let (mut num, mut den) = (digits, Big::from_u64(1));
    if exp10 >= 0 {
        num.mul_pow10(exp10 as u32);
    } else {
        den.mul_pow10((-exp10) as u32);
    }
    round_ratio(neg, &num, &den, exp2)
}

/// The long double nearest to `num / den * 2^exp2`.
fn round_ratio(neg: bool, num: &Big, den: &Big, exp2: i64) -> Option<LongDouble> {
    // Scale so the quotient has 66 bits: 64 kept, a round bit, a guard bit; the remainder
    // is the sticky bit.
    let shift = 66 + den.bits() as i64 - num.bits() as i64;
    let (mut n, mut d) = (num.clone(), den.clone());
    if shift >= 0 {
        n.shl(shift as usize);
    } else {
        d.shl((-shift) as usize);
    }
    let (q, exact) = n.div_small_quotient(&d);
    finish(neg, q, !exact, exp2 - shift)
}

/// Rounds `q * 2^exp` (q below 2^68, `sticky` if bits below it were dropped) to a long
/// double, to nearest with ties to even; subnormal results keep fewer bits.
fn finish(neg: bool, q: u128, sticky: bool, exp: i64) -> Option<LongDouble> {
    if q == 0 {
        return None;
    }
    let bits = 128 - q.leading_zeros() as i64;
    let mut drop = bits - 64;
    let mut e = exp + drop;
    if e < MIN_EXP {
        drop += MIN_EXP - e;
        e = MIN_EXP;
    }
    let (mut m, round_up) = if drop <= 0 {
        (q << (-drop) as u32, false)
    } else if drop >= 128 {
        (0, false)
    } else {
        let kept = q >> drop as u32;
        let rest = q & ((1u128 << drop as u32) - 1);
        let half = 1u128 << (drop - 1) as u32;
        let up = rest > half || (rest == half && (sticky || kept & 1 == 1));
        (kept, up)
    };
    if round_up {
        m += 1;
        if m >> 64 != 0 {
            m >>= 1;
            e += 1;
        }
    }
    if m == 0 {
        return None; // underflow to zero
    }
    if e > MAX_EXP {
        return None;
    }
    // Subnormals keep their small mantissa at the lowest exponent; normals fill 64 bits.
    Some(LongDouble {
        neg,
        mantissa: m as u64,
        exp: e,
    })
}

impl LongDouble {
    fn is_zero(&self) -> bool {
        self.mantissa == 0
    }

    /// The sum, rounded; `None` if it overflows (Redis: "increment would produce NaN or
    /// Infinity").
    pub fn add(self, other: LongDouble) -> Option<LongDouble> {
        if self.is_zero() {
            return Some(if other.is_zero() {
                LongDouble {
                    neg: self.neg && other.neg,
                    ..other
                }
            } else {
                other
            });
        }
        if other.is_zero() {
            return Some(self);
        }
        // Far apart, the smaller is below a quarter of the larger's last bit: no effect.
        let (big, small) = if self.exp >= other.exp {
            (self, other)
        } else {
            (other, self)
        };
        if big.exp - small.exp > 140 {
            return Some(big);
        }
        let base = small.exp;
        let mut a = Big::from_u64(big.mantissa);
        a.shl((big.exp - base) as usize);
        let b = Big::from_u64(small.mantissa);
        let (neg, sum) = if big.neg == small.neg {
            a.add(&b);
            (big.neg, a)
        } else {
            match a.cmp(&b) {
                Ordering::Equal => {
                    return Some(LongDouble {
                        neg: false,
                        mantissa: 0,
                        exp: 0,
                    })
                }
                Ordering::Greater => {
                    a.sub(&b);
                    (big.neg, a)
                }
                Ordering::Less => {
                    let mut b = b;
                    b.sub(&a);
                    (small.neg, b)
                }
            }
        };
        round_ratio(neg, &sum, &Big::from_u64(1), base)
    }

    /// `%.17Lf`, then trailing zeros (and a trailing point) removed, and `-0` written `0`:
    /// Redis' `ld2string(..., LD_STR_HUMAN)`.
    pub fn format(self) -> String {
        // n = round(|value| * 10^17), exactly.
        let mut n = Big::from_u64(self.mantissa);
        n.mul_pow10(17);
        if self.exp >= 0 {
            n.shl(self.exp as usize);
        } else {
            n.shr_round_even((-self.exp) as usize);
        }
        let mut digits = n.to_decimal();
        if digits.len() < 18 {
            digits = format!("{}{digits}", "0".repeat(18 - digits.len()));
        }
        let (int, frac) = digits.split_at(digits.len() - 17);
        let frac = frac.trim_end_matches('0');
        let mut out = String::with_capacity(digits.len() + 2);
        if self.neg {
            out.push('-');
        }
        out.push_str(int);
        if !frac.is_empty() {
            out.push('.');
            out.push_str(frac);
        }
        if out == "-0" {
            out = "0".into();
        }
        out
    }
}

/// Adds two numbers as INCRBYFLOAT does; the formatted result, or `None` for an infinite
/// one.
pub fn add(a: Number, b: Number) -> Option<String> {
    match (a, b) {
        (Number::Finite(a), Number::Finite(b)) => a.add(b).map(LongDouble::format),
        _ => None,
    }
}

/// Whether a parsed number is infinite (HINCRBYFLOAT refuses such an increment).
pub fn is_infinite(n: Number) -> bool {
    n == Number::Infinite
}

/// An unsigned big integer, little-endian 32-bit limbs: just what the conversions need.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Big(Vec<u32>);

impl Big {
    fn zero() -> Big {
        Big(Vec::new())
    }

    fn from_u64(v: u64) -> Big {
        let mut b = Big(vec![v as u32, (v >> 32) as u32]);
        b.trim();
        b
    }

    fn trim(&mut self) {
        while self.0.last() == Some(&0) {
            self.0.pop();
        }
    }

    fn is_zero(&self) -> bool {
        self.0.is_empty()
    }

    fn bits(&self) -> usize {
        match self.0.last() {
            None => 0,
            Some(&top) => self.0.len() * 32 - top.leading_zeros() as usize,
        }
    }

    /// `self = self * mul + add`.
    fn mul_add(&mut self, mul: u32, add: u32) {
        let mut carry = u64::from(add);
        for limb in self.0.iter_mut() {
            let v = u64::from(*limb) * u64::from(mul) + carry;
            *limb = v as u32;
            carry = v >> 32;
        }
        if carry != 0 {
            self.0.push(carry as u32);
        }
    }

    fn mul_pow10(&mut self, mut n: u32) {
        while n >= 9 {
            self.mul_add(1_000_000_000, 0);
            n -= 9;
        }
        if n > 0 {
            self.mul_add(10u32.pow(n), 0);
        }
    }

    fn shl(&mut self, bits: usize) {
        if self.is_zero() {
            return;
        }
        let (limbs, bits) = (bits / 32, bits % 32);
        if bits > 0 {
            let mut carry = 0u32;
            for limb in self.0.iter_mut() {
                let v = (*limb << bits) | carry;
                carry = *limb >> (32 - bits);
                *limb = v;
            }
            if carry != 0 {
                self.0.push(carry);
            }
        }
        if limbs > 0 {
            self.0.splice(0..0, std::iter::repeat_n(0, limbs));
        }
    }

    /// `self = round(self / 2^bits)`, ties to even.
    fn shr_round_even(&mut self, bits: usize) {
        if bits == 0 {
            return;
        }
        let bit = |b: &Big, i: usize| b.0.get(i / 32).is_some_and(|l| (l >> (i % 32)) & 1 == 1);
        let half = bit(self, bits - 1);
        let below = (0..bits - 1).any(|i| bit(self, i));
        let (limbs, rest) = (bits / 32, bits % 32);
        if limbs >= self.0.len() {
            self.0.clear();
        } else {
            self.0.drain(..limbs);
            if rest > 0 {
                for i in 0..self.0.len() {
                    let hi = self.0.get(i + 1).copied().unwrap_or(0);
                    self.0[i] = (self.0[i] >> rest) | (hi << (32 - rest));
                }
            }
            self.trim();
        }
        let odd = bit(self, 0);
        if half && (below || odd) {
            self.add(&Big::from_u64(1));
        }
    }

    fn add(&mut self, other: &Big) {
        if self.0.len() < other.0.len() {
            self.0.resize(other.0.len(), 0);
        }
        let mut carry = 0u64;
        for i in 0..self.0.len() {
            let v = u64::from(self.0[i]) + u64::from(other.0.get(i).copied().unwrap_or(0)) + carry;
            self.0[i] = v as u32;
            carry = v >> 32;
        }
        if carry != 0 {
            self.0.push(carry as u32);
        }
    }

    /// `self -= other`, for `self >= other`.
    fn sub(&mut self, other: &Big) {
        let mut borrow = 0i64;
        for i in 0..self.0.len() {
            let v = i64::from(self.0[i]) - i64::from(other.0.get(i).copied().unwrap_or(0)) - borrow;
            if v < 0 {
                self.0[i] = (v + (1 << 32)) as u32;
                borrow = 1;
            } else {
                self.0[i] = v as u32;
                borrow = 0;
            }
        }
        self.trim();
    }

    fn cmp(&self, other: &Big) -> Ordering {
        self.0
            .len()
            .cmp(&other.0.len())
            .then_with(|| self.0.iter().rev().cmp(other.0.iter().rev()))
    }

    /// The quotient of `self / den`, which must be below 2^128, and whether the division
    /// was exact. Binary long division: one compare and subtract per quotient bit.
    fn div_small_quotient(&self, den: &Big) -> (u128, bool) {
        let mut rem = self.clone();
        let mut q = 0u128;
        let top = self.bits().saturating_sub(den.bits());
        for i in (0..=top.min(127)).rev() {
            let mut shifted = den.clone();
            shifted.shl(i);
            if rem.cmp(&shifted) != Ordering::Less {
                rem.sub(&shifted);
                q |= 1u128 << i;
            }
        }
        (q, rem.is_zero())
    }

    fn to_decimal(&self) -> String {
        if self.is_zero() {
            return "0".into();
        }
        let mut n = self.clone();
        let mut chunks = Vec::new();
        while !n.is_zero() {
            let mut rem = 0u64;
            for limb in n.0.iter_mut().rev() {
                let v = (rem << 32) | u64::from(*limb);
                *limb = (v / 1_000_000_000) as u32;
                rem = v % 1_000_000_000;
            }
            n.trim();
            chunks.push(rem as u32);
        }
        let mut out = chunks.pop().map(|c| c.to_string()).unwrap_or_default();
        for c in chunks.iter().rev() {
            out += &format!("{c:09}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incr(a: &str, b: &str) -> Option<String> {
        add(parse(a.as_bytes())?, parse(b.as_bytes())?)
    }

    /// Answers taken from redis-server 7.0 on x86-64.
    #[test]
    fn sums_print_as_redis_prints_them() {
        assert_eq!(incr("10.50", "0.1").as_deref(), Some("10.6"));
        assert_eq!(incr("5.0e3", "2.0e2").as_deref(), Some("5200"));
        assert_eq!(incr("0", "3.0e3").as_deref(), Some("3000"));
        assert_eq!(incr("0", "1.5").as_deref(), Some("1.5"));
        assert_eq!(incr("1", "-1").as_deref(), Some("0"));
        assert_eq!(incr("-0.5", "0.25").as_deref(), Some("-0.25"));
        assert_eq!(incr("0", "0.1").as_deref(), Some("0.1"));
        assert_eq!(incr("0.1", "0.2").as_deref(), Some("0.3"));
        assert_eq!(incr("3", "1e-20").as_deref(), Some("3"));
        assert_eq!(incr("0", "-1e-20").as_deref(), Some("0"));
        assert_eq!(incr("0", "0x10").as_deref(), Some("16"));
        assert_eq!(
            incr("1e4000", "1e4000").as_deref().map(str::len),
            Some(4001)
        );
        assert_eq!(incr("0", "inf"), None);
        assert_eq!(incr("1e4932", "1e4932"), None, "overflows to infinity");
    }

    #[test]
    fn what_strtold_and_redis_refuse() {
        for bad in [
            "", " 1", "1 ", "abc", "1e", "1e+", ".", "-", "nan", "1..2", "0x", "1e99999",
            "1e-99999",
        ] {
            assert_eq!(parse(bad.as_bytes()), None, "{bad:?}");
        }
        for good in [
            "1", "+1", "-1.", ".5", "1E3", "infinity", "-INF", "0x1p3", "007",
        ] {
            assert!(parse(good.as_bytes()).is_some(), "{good:?}");
        }
        assert_eq!(parse(&vec![b'1'; MAX_CHARS]), None);
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 2^64 + 1 is not representable: it rounds to 2^64; 2^64 + 3 rounds up to 2^64 + 4.
        let v = |s: &str| match parse(s.as_bytes()) {
            Some(Number::Finite(v)) => v,
            _ => panic!("{s}"),
        };
        assert_eq!(v("18446744073709551617").format(), "18446744073709551616");
        assert_eq!(v("18446744073709551619").format(), "18446744073709551620");
        assert_eq!(v("0.5").format(), "0.5");
        assert_eq!(v("1.00000000000000000001").format(), "1");
    }
}
