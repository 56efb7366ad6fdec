//! Human sizes: parse `10G`, `64K`, `512` and print them back.

use crate::error::{Error, Result};

/// Parses a size such as `4096`, `64K`, `10G`, `1.5M` is refused (integers only).
/// Suffixes K, M, G, T, P (powers of 1024), optionally followed by `i`/`iB`/`B`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    if t.is_empty() {
        return Err(Error::invalid("empty size"));
    }
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(Error::invalid(format!(
            "size {s:?} does not start with a number"
        )));
    }
    let n: u64 = t[..digits_end]
        .parse()
        .map_err(|_| Error::invalid(format!("size {s:?} is too large")))?;
    let suffix = t[digits_end..].to_ascii_uppercase();
    let shift = match suffix.trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        _ => {
            return Err(Error::invalid(format!(
                "size {s:?} has an unknown suffix (use K, M, G, T or P)"
            )));
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| Error::invalid(format!("size {s:?} is too large")))
}

/// Formats bytes with a binary suffix, e.g. `64.0KiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("2TB").unwrap(), 2 << 40);
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "K",
            "-1",
            "1.5G",
            "10X",
            "99999999999999999999",
            "16777216P",
        ] {
            assert!(parse_size(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(100), "100B");
        assert_eq!(format_size(65536), "64.0KiB");
    }
}
