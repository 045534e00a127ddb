//! Options of a `set`: Redis' `NX`, `XX`, `PX`, `KEEPTTL` and `GET`, carried as the binary
//! frame's flags and TTL field.

use std::time::Duration;

use twincache_protocol::frame::{flags, Request};

use crate::Error;

/// How a [`Client::set_options`](crate::Client::set_options) writes: under which condition,
/// with which expiry, and whether it answers the previous value.
///
/// ```
/// use std::time::Duration;
/// use twincache_client::SetOptions;
///
/// // SET key value NX PX 30000 GET
/// let opts = SetOptions::new().nx().ttl(Duration::from_secs(30)).get();
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetOptions {
    nx: bool,
    xx: bool,
    ttl: Option<Duration>,
    keep_ttl: bool,
    get: bool,
}

impl SetOptions {
    /// A plain `set`: unconditional, no expiry, answers `OK`.
    pub fn new() -> SetOptions {
        SetOptions::default()
    }

    /// Only if the key does not exist (Redis `NX`); otherwise nothing is written and the
    /// answer is nil.
    pub fn nx(mut self) -> SetOptions {
        self.nx = true;
        self
    }

    /// Only if the key exists (Redis `XX`); otherwise nothing is written and the answer is
    /// nil.
    pub fn xx(mut self) -> SetOptions {
        self.xx = true;
        self
    }

    /// Expire the key after `ttl` (Redis `PX`), rounded down to milliseconds and at least
    /// 1 ms. A zero `ttl` is refused, as Redis refuses `PX 0`.
    pub fn ttl(mut self, ttl: Duration) -> SetOptions {
        self.ttl = Some(ttl);
        self
    }

    /// Keep the key's current expiry instead of clearing it (Redis `KEEPTTL`).
    pub fn keep_ttl(mut self) -> SetOptions {
        self.keep_ttl = true;
        self
    }

    /// Answer the previous value (nil if there was none) instead of `OK` (Redis `GET`).
    pub fn get(mut self) -> SetOptions {
        self.get = true;
        self
    }

    /// Puts the options into a `set` request; refuses combinations Redis refuses.
    pub(crate) fn apply(&self, req: &mut Request) -> Result<(), Error> {
        if self.nx && self.xx {
            return Err(Error::invalid("NX and XX together (Redis: syntax error)"));
        }
        if self.keep_ttl && self.ttl.is_some() {
            return Err(Error::invalid(
                "a TTL and KEEPTTL together (Redis: syntax error)",
            ));
        }
        let bit = |on: bool, flag: u8| if on { flag } else { 0 };
        req.flags |= bit(self.nx, flags::NX)
            | bit(self.xx, flags::XX)
            | bit(self.keep_ttl, flags::KEEP_TTL)
            | bit(self.get, flags::GET);
        if let Some(ttl) = self.ttl {
            req.ttl_ms = ttl_ms(ttl)?;
        }
        Ok(())
    }

    /// Whether the answer carries the previous value.
    pub(crate) fn wants_old(&self) -> bool {
        self.get
    }
}

/// A TTL in whole milliseconds for the frame's `ttl_ms`, where zero means "no expiry": so a
/// zero TTL, which Redis refuses, must be refused here rather than sent as "keep forever"
/// (or, as before, quietly turned into 1 ms).
pub(crate) fn ttl_ms(ttl: Duration) -> Result<u64, Error> {
    if ttl.is_zero() {
        return Err(Error::invalid(
            "a TTL of zero (Redis: invalid expire time in 'set' command); to keep a key \
             forever, set it without a TTL",
        ));
    }
    Ok(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use twincache_protocol::frame::Op;

    fn applied(opts: SetOptions) -> Result<Request, Error> {
        let mut req = Request::new(Op::Set, Bytes::from_static(b"k"));
        opts.apply(&mut req).map(|()| req)
    }

    #[test]
    fn options_become_flags_and_ttl() {
        let req = applied(SetOptions::new().nx().get().ttl(Duration::from_secs(2))).unwrap();
        assert_eq!(req.flags, flags::NX | flags::GET);
        assert_eq!(req.ttl_ms, 2000);
        let req = applied(SetOptions::new().xx().keep_ttl()).unwrap();
        assert_eq!(req.flags, flags::XX | flags::KEEP_TTL);
        assert_eq!(req.ttl_ms, 0);
        assert_eq!(applied(SetOptions::new()).unwrap().flags, 0);
    }

    #[test]
    fn refused_as_redis_refuses() {
        assert!(applied(SetOptions::new().nx().xx()).is_err());
        assert!(applied(SetOptions::new().keep_ttl().ttl(Duration::from_secs(1))).is_err());
        let zero = applied(SetOptions::new().ttl(Duration::ZERO)).unwrap_err();
        assert!(matches!(zero, Error::InvalidArgument(_)), "{zero}");
        assert!(!zero.is_retryable());
        // Under a millisecond, but not zero: the shortest TTL there is.
        assert_eq!(ttl_ms(Duration::from_micros(10)).unwrap(), 1);
        assert_eq!(ttl_ms(Duration::from_micros(2500)).unwrap(), 2);
    }
}
