//! Byte sizes as people type them: `1G`, `512M`, `64K`, `4096`, `1.5G`, `2TiB`.

use crate::error::{Error, Result};

/// Parse a size with an optional binary suffix (K, M, G, T, optionally followed by `i`/`iB`/`B`).
pub fn parse_size(input: &str) -> Result<u64> {
    let bad = |why: &str| Error::BadSize {
        input: input.to_string(),
        why: why.to_string(),
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(bad(
            "empty; write bytes or a number with K, M, G or T, e.g. 1G",
        ));
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let mult: u64 = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KI" | "KIB" => 1 << 10,
        "M" | "MB" | "MI" | "MIB" => 1 << 20,
        "G" | "GB" | "GI" | "GIB" => 1 << 30,
        "T" | "TB" | "TI" | "TIB" => 1 << 40,
        _ => {
            return Err(bad(
                "unknown suffix; use K, M, G or T (powers of 1024), e.g. 64K or 1G",
            ))
        }
    };
    if num.is_empty() {
        return Err(bad("no number before the suffix"));
    }
    let value = if num.contains('.') {
        let f: f64 = num.parse().map_err(|_| bad("not a number"))?;
        let v = f * mult as f64;
        if !v.is_finite() || v > u64::MAX as f64 {
            return Err(bad("too large"));
        }
        if v.fract() != 0.0 {
            return Err(bad("not a whole number of bytes"));
        }
        v as u64
    } else {
        let n: u64 = num.parse().map_err(|_| bad("not a number or too large"))?;
        n.checked_mul(mult).ok_or_else(|| bad("too large"))?
    };
    Ok(value)
}

/// Format bytes compactly with a binary suffix when exact (`1G`), else with two decimals.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("T", 1 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ];
    for (unit, mult) in UNITS {
        if bytes >= mult {
            if bytes.is_multiple_of(mult) {
                return format!("{}{}", bytes / mult, unit);
            }
            return format!("{:.2}{}", bytes as f64 / mult as f64, unit);
        }
    }
    format!("{bytes}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("2TiB").unwrap(), 2 << 40);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "G",
            "1X",
            "abc",
            "99999999999999999999",
            "1.0000001K",
            "-1",
        ] {
            let e = parse_size(s).unwrap_err();
            assert_eq!(e.code(), "ERR_BAD_SIZE", "{s}");
            assert!(e.to_string().contains(&format!("'{s}'")), "{e}");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(1 << 30), "1G");
        assert_eq!(format_size(1536 << 20), "1.50G");
        assert_eq!(format_size(100), "100");
    }
}
