//! A point in a conversation's history (`parley replay --at`, the query API's `?at=`): its
//! state then is the fold of the records up to that point. Pure: no I/O.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, UNIX_EPOCH};

use parley_eventlog::LogPosition;

use crate::error::ProjectionError;
use crate::replay::AuditRecord;

/// Where to stop reading a conversation's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayPoint {
    /// Up to and including this sequence of the conversation.
    Sequence(i64),
    /// Up to and including this record of the events topic (a `position` the gateway
    /// acknowledged, or one `parley audit` lists).
    Position(LogPosition),
    /// Everything the log had taken by this time (ms since the epoch): a record's log
    /// timestamp, or its envelope's time when the record has none.
    Time(i64),
}

impl ReplayPoint {
    /// Whether `record` is part of the conversation's history at this point.
    pub fn admits(&self, record: &AuditRecord) -> bool {
        match self {
            Self::Sequence(sequence) => record.sequence <= *sequence,
            Self::Position(position) => record.partition == position.partition && record.offset <= position.offset,
            Self::Time(at) => record.log_timestamp.unwrap_or(record.occurred_at) <= *at,
        }
    }

    /// The records of the history at this point, in their order. A position must name the
    /// events topic and the partition the conversation lives in: a point in another
    /// partition says nothing about this conversation's order.
    pub fn history<'a>(
        &self,
        records: &'a [AuditRecord],
        events_topic: &str,
    ) -> Result<Vec<&'a AuditRecord>, ProjectionError> {
        if let Self::Position(position) = self {
            let elsewhere = records.iter().find(|r| r.partition != position.partition);
            if position.topic != events_topic || elsewhere.is_some() {
                let lives_in =
                    records.first().map_or(String::from("no partition"), |r| format!("{events_topic}/{}", r.partition));
                return Err(ProjectionError::InvalidPoint(format!(
                    "{position} is not in this conversation's partition (it lives in {lives_in})"
                )));
            }
        }
        Ok(records.iter().filter(|r| self.admits(r)).collect())
    }
}

impl fmt::Display for ReplayPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sequence(sequence) => write!(f, "sequence {sequence}"),
            Self::Position(position) => write!(f, "position {position}"),
            Self::Time(at) => {
                let time = UNIX_EPOCH + Duration::from_millis(u64::try_from(*at).unwrap_or(0));
                write!(f, "{}", humantime::format_rfc3339_millis(time))
            }
        }
    }
}

/// `7` (a sequence), `parley.conversation-events/3/1042` (a position) or
/// `2026-12-05T07:30:00Z` (an RFC 3339 time in UTC, fractions of a second allowed).
impl FromStr for ReplayPoint {
    type Err = ProjectionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Ok(sequence) = s.parse::<i64>() {
            return if sequence >= 1 {
                Ok(Self::Sequence(sequence))
            } else {
                Err(ProjectionError::InvalidPoint(format!("sequence {sequence}: sequences start at 1")))
            };
        }
        if s.contains('/') {
            return s
                .parse()
                .map(Self::Position)
                .map_err(|_| ProjectionError::InvalidPoint(format!("{s:?} is not a position topic/partition/offset")));
        }
        let time = humantime::parse_rfc3339(s).map_err(|e| {
            ProjectionError::InvalidPoint(format!(
                "{s:?} is neither a sequence, a position topic/partition/offset nor an RFC 3339 time in UTC \
                 (2026-12-05T07:30:00Z): {e}"
            ))
        })?;
        let millis = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        Ok(Self::Time(i64::try_from(millis).unwrap_or(i64::MAX)))
    }
}

#[cfg(test)]
mod tests {
    use parley_events::conversation::ConversationState;
    use parley_events::{
        ConversationEvent, ConversationId, ConversationStarted, Envelope, EventId, Producer, UserQueryReceived,
    };

    use super::*;

    const TOPIC: &str = "parley.conversation-events";
    const P: Producer = Producer { name: "t", version: "0" };

    fn query(id: ConversationId, sequence: i64, text: &str) -> ConversationEvent {
        ConversationEvent::QueryReceived(UserQueryReceived {
            sealed_for: String::new(),
            envelope: Envelope::new(EventId::random(), id, sequence, P),
            user_id: "alice".parse().unwrap(),
            client_message_id: format!("m{sequence}"),
            text: text.into(),
            no_cache: false,
        })
    }

    fn record(event: ConversationEvent, partition: i32, offset: i64, log_timestamp: i64) -> AuditRecord {
        let envelope = event.envelope().clone();
        AuditRecord {
            sequence: envelope.sequence,
            event_type: event.type_name(),
            event_id: envelope.event_id,
            partition,
            offset,
            schema_id: 1,
            occurred_at: envelope.occurred_at,
            log_timestamp: Some(log_timestamp),
            correlation_id: envelope.correlation_id,
            causation_id: None,
            trace_id: None,
            producer: "t/0".into(),
            redriven_from: None,
            retrieved: vec![],
            event,
        }
    }

    /// Started at offset 10 (t=1000), then questions at sequences 2 and 3 (offsets 12, 15;
    /// t=2000, 3000).
    fn history() -> Vec<AuditRecord> {
        let id = ConversationId::random();
        let started = ConversationEvent::Started(ConversationStarted {
            envelope: Envelope::new(EventId::random(), id, 1, P),
            user_id: "alice".parse().unwrap(),
        });
        vec![
            record(started, 2, 10, 1000),
            record(query(id, 2, "first"), 2, 12, 2000),
            record(query(id, 3, "second"), 2, 15, 3000),
        ]
    }

    fn last_sequence(point: &str) -> i64 {
        let records = history();
        let point: ReplayPoint = point.parse().unwrap();
        let kept = point.history(&records, TOPIC).unwrap();
        ConversationState::fold(kept.into_iter().map(|r| &r.event)).unwrap().head.last_sequence
    }

    #[test]
    fn each_kind_of_point_cuts_the_history_where_it_says() {
        assert_eq!(last_sequence("2"), 2);
        assert_eq!(last_sequence("99"), 3);
        assert_eq!(last_sequence(&format!("{TOPIC}/2/14")), 2);
        assert_eq!(last_sequence(&format!("{TOPIC}/2/15")), 3);
        assert_eq!(last_sequence("1970-01-01T00:00:02.500Z"), 2);
        assert_eq!(last_sequence("1970-01-01T00:00:01Z"), 1);
    }

    #[test]
    fn a_point_before_the_conversation_leaves_nothing() {
        let records = history();
        let point: ReplayPoint = "1970-01-01T00:00:00.999Z".parse().unwrap();
        assert!(point.history(&records, TOPIC).unwrap().is_empty());
    }

    #[test]
    fn a_position_elsewhere_is_refused_with_where_the_conversation_lives() {
        let records = history();
        for elsewhere in [format!("{TOPIC}/3/12"), "parley.documents/2/12".to_owned()] {
            let error = elsewhere.parse::<ReplayPoint>().unwrap().history(&records, TOPIC).unwrap_err();
            assert!(error.to_string().contains(&format!("lives in {TOPIC}/2")), "{error}");
        }
    }

    #[test]
    fn what_is_not_a_point_is_refused_with_the_forms_that_are() {
        for bad in ["0", "-3", "yesterday", "t/x/1", "2026-12-05 07:30"] {
            assert!(bad.parse::<ReplayPoint>().is_err(), "{bad}");
        }
        let error = "yesterday".parse::<ReplayPoint>().unwrap_err().to_string();
        assert!(error.contains("RFC 3339"), "{error}");
        assert_eq!("2026-12-05T07:30:00Z".parse::<ReplayPoint>().unwrap().to_string(), "2026-12-05T07:30:00.000Z");
    }
}
