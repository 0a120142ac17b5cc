//! Times as the operator reads them: `YYYY-MM-DD HH:MM:SSZ` in text,
//! RFC 3339 in JSON (always UTC, computed here: no time-zone database), and
//! ages ("4m ago").

/// (date, time) of Unix seconds (civil-from-days, proleptic Gregorian).
fn civil(secs: u64) -> (String, String) {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        format!("{y:04}-{m:02}-{d:02}"),
        format!("{:02}:{:02}:{:02}", rem / 3600, (rem % 3600) / 60, rem % 60),
    )
}

/// `YYYY-MM-DD HH:MM:SSZ` for Unix seconds (text output).
pub fn fmt_utc(secs: u64) -> String {
    let (d, t) = civil(secs);
    format!("{d} {t}Z")
}

/// RFC 3339, `YYYY-MM-DDTHH:MM:SSZ` (JSON output).
pub fn rfc3339(secs: u64) -> String {
    let (d, t) = civil(secs);
    format!("{d}T{t}Z")
}

/// Unix seconds of an RFC 3339 time this module wrote.
fn parse_rfc3339(s: &str) -> Option<u64> {
    let (d, t) = s.strip_suffix('Z')?.split_once('T')?;
    let mut dp = d.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (dp.next()?.ok()?, dp.next()?.ok()?, dp.next()?.ok()?);
    let mut tp = t.split(':').map(|x| x.parse::<u64>());
    let (hh, mm, ss) = (tp.next()?.ok()?, tp.next()?.ok()?, tp.next()?.ok()?);
    // days-from-civil
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// "12s", "4m", "3h", "2d".
pub fn age(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// `2026-01-02 10:00:00Z (4m ago)`.
pub(super) fn when(secs: u64, now: u64) -> String {
    format!("{} ({} ago)", fmt_utc(secs), age(now.saturating_sub(secs)))
}

pub(super) fn text_time(rfc: &Option<String>, now: u64) -> String {
    rfc.as_deref()
        .and_then(parse_rfc3339)
        .map_or("-".to_owned(), |t| when(t, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(fmt_utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(fmt_utc(1_624_226_577), "2021-06-20 22:02:57Z");
        assert_eq!(fmt_utc(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(rfc3339(1_624_226_577), "2021-06-20T22:02:57Z");
        for t in [0, 951_782_400, 1_624_226_577, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        }
        assert_eq!(age(59), "59s");
        assert_eq!(age(61), "1m");
        assert_eq!(age(7200), "2h");
    }
}
