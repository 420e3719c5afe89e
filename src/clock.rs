//! Wall-clock time in the one form the decision path uses: whole seconds since the Unix epoch.
//! Kept apart so pure modules take the time as an argument and only the edges read the clock.

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
