use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::EventsError;

/// Where a record sits in the log. Clients get it when a write is acknowledged and may hand
/// it back to a read to wait until projections have applied it; dead letters name their
/// records' by it. Written `topic/partition/offset`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LogPosition {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The offset in the partition.
    pub offset: i64,
}

impl fmt::Display for LogPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.topic, self.partition, self.offset)
    }
}

impl FromStr for LogPosition {
    type Err = EventsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || EventsError::InvalidPosition(s.to_owned());
        let mut parts = s.rsplitn(3, '/');
        let offset = parts.next().and_then(|o| o.parse().ok()).filter(|o: &i64| *o >= 0).ok_or_else(invalid)?;
        let partition = parts.next().and_then(|p| p.parse().ok()).filter(|p: &i32| *p >= 0).ok_or_else(invalid)?;
        let topic = parts.next().filter(|t| !t.is_empty()).ok_or_else(invalid)?;
        Ok(Self { topic: topic.to_owned(), partition, offset })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_through_text() {
        let position = LogPosition { topic: "t.conversation-events".into(), partition: 3, offset: 42 };
        assert_eq!(position.to_string().parse::<LogPosition>().unwrap(), position);
        for bad in ["", "t/1", "t/x/1", "/1/2", "t/1/-2"] {
            assert!(bad.parse::<LogPosition>().is_err(), "{bad}");
        }
    }
}
