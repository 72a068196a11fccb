//! Points in time as fleet records them: RFC 3339 in UTC, to the second. Parsed when a record
//! is read, so a corrupt time is an unreadable record, never a silent "long ago".

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `t` as the files write it: RFC 3339, UTC, to the second.
pub fn timestamp(t: SystemTime) -> String {
    Timestamp::from(t).to_string()
}

/// A time to the second (what the files hold; more would not survive a round trip).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(SystemTime);

impl Timestamp {
    pub fn system_time(self) -> SystemTime {
        self.0
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Timestamp {
        let seconds = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Timestamp(UNIX_EPOCH + Duration::from_secs(seconds))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_seconds(self.0))
    }
}

impl FromStr for Timestamp {
    type Err = humantime::TimestampError;
    fn from_str(s: &str) -> Result<Timestamp, Self::Err> {
        humantime::parse_rfc3339(s).map(Timestamp::from)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(|e| {
            serde::de::Error::custom(format!("{text:?} is not an RFC 3339 time in UTC: {e}"))
        })
    }
}

/// A time a record may lack (one that did not parse), for messages and pages.
pub fn shown(t: Option<Timestamp>) -> String {
    t.map_or_else(|| "an unknown time".to_owned(), |t| t.to_string())
}

/// Reads an optional time, taking one that does not parse as none: for fields whose loss
/// costs less than losing the record that holds them (see `status::tasks::TaskRecord`).
pub fn lenient_option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    Ok(text.and_then(|t| t.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_to_the_second_and_garbage_is_refused() {
        let t = Timestamp::from(UNIX_EPOCH + Duration::from_millis(1_764_000_000_750));
        let text = serde_json::to_string(&t).expect("json");
        assert_eq!(text, "\"2025-11-24T16:00:00Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&text).expect("back"), t);
        assert!(serde_json::from_str::<Timestamp>("\"tomorrow\"").is_err());
        assert!(serde_json::from_str::<Timestamp>("\"\"").is_err());
    }
}
