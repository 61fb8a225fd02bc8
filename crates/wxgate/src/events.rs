//! `wxgate events`: recorded pushes as JSON lines. Each line is the push's fields under
//! WeChat's own names (see [`crate::fields`]) with the record's facts added under
//! lowercase names WeChat does not use: `id`, `account`, `dedup_key`, `kind`,
//! `received_at`, `encrypted`, `deliveries`, `dead_letter`, `error`, `reply`, `status`,
//! `late_result`, `xml`.

use serde_json::{Map, Value};

use crate::store::Row;

/// One record as a JSON object.
pub fn to_json(row: &Row) -> Value {
    let mut line: Map<String, Value> = match serde_json::from_str(&row.fields) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    line.insert("id".into(), row.id.into());
    line.insert("account".into(), row.account.clone().into());
    line.insert("dedup_key".into(), row.dedup_key.clone().into());
    line.insert("kind".into(), row.kind.clone().into());
    line.insert("received_at".into(), rfc3339_ms(row.received_at_ms).into());
    line.insert("encrypted".into(), row.encrypted.into());
    line.insert("deliveries".into(), row.deliveries.into());
    line.insert("dead_letter".into(), row.dead_letter.into());
    if let Some(e) = &row.error {
        line.insert("error".into(), e.clone().into());
    }
    line.insert("reply".into(), row.reply.clone().map_or(Value::Null, Value::from));
    line.insert("status".into(), row.status.clone().into());
    if let Some(late) = &row.late_result {
        line.insert("late_result".into(), late.clone().into());
    }
    line.insert("xml".into(), row.xml.clone().into());
    Value::Object(line)
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_render_in_utc() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_733_300_000_123), "2024-12-04T08:13:20.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
