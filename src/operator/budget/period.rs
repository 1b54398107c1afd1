//! Budget periods: where the current one starts and ends in a time zone.

use jiff::{Timestamp, ToSpan, Zoned, tz::TimeZone};

use crate::api::budget::Period;

/// Start (inclusive) and end (exclusive) of the period containing `now`,
/// computed on the wall clock of `time_zone` so a Monthly budget in
/// Europe/Berlin rolls over at Berlin midnight, DST included.
pub fn bounds(
    period: Period,
    time_zone: &str,
    now: Timestamp,
) -> Result<(Timestamp, Timestamp), String> {
    let tz = TimeZone::get(time_zone).map_err(|_| {
        format!("unknown time zone {time_zone:?}; use an IANA name such as UTC or Europe/Berlin")
    })?;
    let local: Zoned = now.to_zoned(tz);
    let today = local.start_of_day().map_err(|e| e.to_string())?;
    let (start, length) = match period {
        Period::Daily => (today, 1.day()),
        Period::Weekly => {
            let since_monday = i64::from(local.weekday().to_monday_zero_offset());
            let monday = today
                .checked_sub(since_monday.days())
                .map_err(|e| e.to_string())?
                .start_of_day()
                .map_err(|e| e.to_string())?;
            (monday, 1.week())
        }
        Period::Monthly => (
            local
                .first_of_month()
                .map_err(|e| e.to_string())?
                .start_of_day()
                .map_err(|e| e.to_string())?,
            1.month(),
        ),
    };
    let end = start.checked_add(length).map_err(|e| e.to_string())?;
    Ok((start.timestamp(), end.timestamp()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn monthly_in_utc() {
        let (start, end) = bounds(Period::Monthly, "UTC", ts("2026-11-27T02:26:00Z")).unwrap();
        assert_eq!(start, ts("2026-11-01T00:00:00Z"));
        assert_eq!(end, ts("2026-12-01T00:00:00Z"));
    }

    #[test]
    fn monthly_follows_the_local_calendar() {
        // 23:30 UTC on Oct 31 is already November 1st in Berlin (UTC+1 in winter).
        let (start, end) =
            bounds(Period::Monthly, "Europe/Berlin", ts("2026-10-31T23:30:00Z")).unwrap();
        assert_eq!(start, ts("2026-10-31T23:00:00Z"));
        assert_eq!(end, ts("2026-11-30T23:00:00Z"));
    }

    #[test]
    fn daily_across_a_dst_change_is_23_hours() {
        // Berlin switches to summer time on 2026-03-29.
        let (start, end) =
            bounds(Period::Daily, "Europe/Berlin", ts("2026-03-29T12:00:00Z")).unwrap();
        assert_eq!(start, ts("2026-03-28T23:00:00Z"));
        assert_eq!(end, ts("2026-03-29T22:00:00Z"));
    }

    #[test]
    fn weekly_starts_on_monday() {
        // 2026-11-27 is a Friday.
        let (start, end) = bounds(
            Period::Weekly,
            "America/New_York",
            ts("2026-11-27T12:00:00Z"),
        )
        .unwrap();
        assert_eq!(start, ts("2026-11-23T05:00:00Z"));
        assert_eq!(end, ts("2026-11-30T05:00:00Z"));
    }

    #[test]
    fn unknown_time_zone_is_a_clear_error() {
        let error = bounds(Period::Daily, "Mars/Olympus", ts("2026-11-27T12:00:00Z")).unwrap_err();
        assert!(error.contains("Mars/Olympus"), "{error}");
    }
}
