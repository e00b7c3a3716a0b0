//! Wall-clock time as the records and streams write it.

/// The current time, RFC 3339, to the second.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|now| now.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}
