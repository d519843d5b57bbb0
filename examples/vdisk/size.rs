//! Sizes on the command line: bytes, or a number with a K/M/G/T suffix (powers of 1024).

use crate::CliError;

/// A `--rate` option: bytes per second as [`parse_size`] reads them, 0 (unlimited) when
/// absent.
pub fn parse_rate(s: Option<&str>) -> Result<u64, CliError> {
    Ok(s.map(parse_size).transpose()?.unwrap_or(0))
}

/// Parses "4096", "64K", "1.5G", "2T", "512k", "1GiB", "10MB" (all binary multiples).
pub fn parse_size(s: &str) -> Result<u64, CliError> {
    let t = s.trim();
    let bad = || CliError::new(format!("invalid size '{s}': use bytes or a K/M/G/T suffix"));
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, mult) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 1u64 << 10),
        Some('m') => (&body[..body.len() - 1], 1 << 20),
        Some('g') => (&body[..body.len() - 1], 1 << 30),
        Some('t') => (&body[..body.len() - 1], 1 << 40),
        Some('p') => (&body[..body.len() - 1], 1 << 50),
        Some(c) if c.is_ascii_digit() => (body, 1),
        _ => return Err(bad()),
    };
    if num.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(bad);
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    let v = f * mult as f64;
    if !(0.0..1.8e19).contains(&v) || v.fract() != 0.0 {
        return Err(bad());
    }
    Ok(v as u64)
}

/// Parses "-o" option lists ("k=v,k2=v2", repeatable) into pairs; a bare key means "on".
pub fn parse_options(opts: &[String]) -> Result<Vec<(String, String)>, CliError> {
    let mut out = Vec::new();
    for o in opts {
        for part in o.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, "on"));
            let k = k.trim();
            if k.is_empty() {
                return Err(CliError::new(format!("invalid option '{part}'")));
            }
            out.push((k.to_string(), v.trim().to_string()));
        }
    }
    Ok(out)
}

/// Parses an on/off option value.
pub fn parse_bool(key: &str, v: &str) -> Result<bool, CliError> {
    match v.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(CliError::new(format!(
            "option {key} takes on or off, not '{v}'"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_size("2TiB").unwrap(), 2 << 40);
        assert_eq!(parse_size("10mb").unwrap(), 10 << 20);
        for bad in ["", "G", "1X", "-1", "1.3", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn options() {
        let o = parse_options(&["a=1,b".into(), "c=x".into()]).unwrap();
        assert_eq!(
            o,
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "on".into()),
                ("c".into(), "x".into())
            ]
        );
        assert!(parse_options(&["=1".into()]).is_err());
    }
}
