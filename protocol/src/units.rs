//! Human-friendly durations (`500ms`, `30s`, `5m`, `1h`) and sizes (`64KiB`, `16MiB`, `1GB`)
//! for command-line flags and URLs.
//!
//! A duration needs its unit: a bare number used to be seconds, so `--worker-timeout 500`,
//! meant as milliseconds, quietly became 500 s and disabled failover in practice. Only `0`
//! may go without one, since it means the same in every unit. A bare size is bytes, which is
//! what a number of bytes would be read as anyway.

use std::time::Duration;

/// Splits `"16MiB"` into `(16, "MiB")`; `what` names the kind of value for the error.
fn number_and_unit<'a>(s: &'a str, what: &str) -> Result<(u64, &'a str), String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n = num.parse().map_err(|_| format!("`{s}` is not {what}"))?;
    Ok((n, unit.trim()))
}

/// Parses `500ms`, `30s`, `5m`, `1h`, `2d`, or `0`; any other number without a unit is
/// refused (see the module docs).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = number_and_unit(s, "a duration (examples: 500ms, 30s, 5m, 1h)")?;
    let ms = match unit {
        "" if n == 0 => Some(0),
        "" => {
            return Err(format!(
                "`{s}` has no unit: write {n}ms, {n}s, {n}m or {n}h (a bare number is not \
                 taken as seconds)"
            ))
        }
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        other => {
            return Err(format!(
                "unknown duration unit `{other}` (use ms, s, m, h or d)"
            ))
        }
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("duration `{s}` is too large"))
}

/// [`parse_duration`] for settings where zero makes no sense (timeouts, intervals).
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("`{s}` must be more than zero"));
    }
    Ok(d)
}

/// Parses `4096`, `64KiB`, `16MiB`, `1GiB`, `10KB`, `2MB`, `1GB` (case-insensitive).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (n, unit) = number_and_unit(s, "a size (examples: 4096, 64KiB, 16MiB, 1GiB)")?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        let bare = parse_duration("500").unwrap_err();
        assert!(bare.contains("no unit") && bare.contains("500ms"), "{bare}");
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_positive_duration("0")
            .unwrap_err()
            .contains("more than zero"));
        assert!(parse_positive_duration("0ms")
            .unwrap_err()
            .contains("more than zero"));
        assert_eq!(parse_positive_duration("1ms"), Ok(Duration::from_millis(1)));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("16mib"), Ok(16 << 20));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert!(parse_size("lots").is_err());
    }
}
