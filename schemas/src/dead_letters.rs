//! Dead letters as a fold of the dead-letter topic, and the order they keep.
//!
//! A consumer that cannot decode a record writes a [`DeadLetter`]; an operator later
//! appends a [`DeadLetterResolved`] for it: the record was written back to its source
//! topic (redriven) or given up on (discarded). A letter's state is the fold of the topic
//! ([`LetterBook`]). Until its letter is resolved, the consumer holds back the later
//! records of the letter's key (a conversation is never applied out of order; other keys
//! flow on), and after a redrive it runs the copy before them ([`Holds`]).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use crate::event::{DeadLetter, DeadLetterRecord, DeadLetterResolved};
use crate::position::LogPosition;

/// [`DeadLetterResolved::action`] of a letter whose record was written back to its topic.
pub const REDRIVEN: &str = "redriven";
/// [`DeadLetterResolved::action`] of a letter given up on.
pub const DISCARDED: &str = "discarded";

impl DeadLetter {
    /// Where the record the letter carries was read.
    pub fn source(&self) -> LogPosition {
        LogPosition { topic: self.source_topic.clone(), partition: self.source_partition, offset: self.source_offset }
    }
}

impl DeadLetterResolved {
    /// Where the lettered record was read.
    pub fn source(&self) -> LogPosition {
        LogPosition { topic: self.source_topic.clone(), partition: self.source_partition, offset: self.source_offset }
    }

    /// Where the redriven copy was written (same topic and partition as the original, so it
    /// is read in order with the key's later records).
    pub fn copy(&self) -> Option<LogPosition> {
        self.redriven_offset.filter(|_| self.action == REDRIVEN).map(|offset| LogPosition { offset, ..self.source() })
    }
}

/// A letter's id: its partition and offset in the dead-letter topic (`0/12`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LetterId {
    /// The letter's partition of the dead-letter topic.
    pub partition: i32,
    /// The letter's offset.
    pub offset: i64,
}

impl fmt::Display for LetterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.partition, self.offset)
    }
}

impl FromStr for LetterId {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = || format!("{text:?} is not a dead letter id (partition/offset, as `list` shows)");
        let (partition, offset) = text.split_once('/').ok_or_else(invalid)?;
        let partition = partition.parse().ok().filter(|p| *p >= 0).ok_or_else(invalid)?;
        let offset = offset.parse().ok().filter(|o| *o >= 0).ok_or_else(invalid)?;
        Ok(Self { partition, offset })
    }
}

/// What became of a letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Nobody decided yet: its consumer holds the key back.
    Open,
    /// Written back to its source topic, at `copy`.
    Redriven {
        /// Where the copy was written.
        copy: LogPosition,
    },
    /// Dropped by an operator: the key goes on without it.
    Discarded,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Redriven { copy } => write!(f, "redriven to {copy}"),
            other => f.write_str(other.as_str()),
        }
    }
}

impl Status {
    /// Where a redriven letter's copy is.
    pub fn copy(&self) -> Option<&LogPosition> {
        match self {
            Self::Redriven { copy } => Some(copy),
            _ => None,
        }
    }

    /// As `dead-letters list` shows it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Redriven { .. } => REDRIVEN,
            Self::Discarded => DISCARDED,
        }
    }
}

/// Why a letter cannot be settled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettleRefused {
    /// No such letter.
    #[error("no dead letter {0}")]
    Unknown(LetterId),
    /// The letter was redriven already.
    #[error("dead letter {id} was redriven already (to {copy})")]
    Redriven {
        /// The letter.
        id: LetterId,
        /// Where its copy was written.
        copy: LogPosition,
    },
    /// The letter was discarded already.
    #[error("dead letter {0} was discarded already")]
    Discarded(LetterId),
}

/// One letter and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Where the letter is.
    pub id: LetterId,
    /// The letter.
    pub letter: DeadLetter,
    /// Open, redriven or discarded.
    pub status: Status,
    /// The decision that settled it, if any.
    pub resolution: Option<DeadLetterResolved>,
}

/// The dead-letter topic folded: every letter with its status, in the order read.
#[derive(Debug, Clone, Default)]
pub struct LetterBook {
    entries: Vec<Entry>,
    by_id: HashMap<LetterId, usize>,
}

impl LetterBook {
    /// Folds in the record at `id` of the dead-letter topic. A resolution settles its letter
    /// and any open letter of the same consumer for the same record (older builds could
    /// letter a record twice); a second resolution of a letter changes nothing.
    pub fn apply(&mut self, id: LetterId, record: DeadLetterRecord) {
        match record {
            DeadLetterRecord::Letter(letter) => {
                self.by_id.insert(id, self.entries.len());
                self.entries.push(Entry { id, letter, status: Status::Open, resolution: None });
            }
            DeadLetterRecord::Resolved(resolution) => {
                let named = LetterId { partition: resolution.letter_partition, offset: resolution.letter_offset };
                let status = match resolution.copy() {
                    Some(copy) => Status::Redriven { copy },
                    None => Status::Discarded,
                };
                let source = resolution.source();
                for entry in &mut self.entries {
                    let same_record = entry.letter.consumer == resolution.consumer && entry.letter.source() == source;
                    if entry.status == Status::Open && (entry.id == named || same_record) {
                        entry.status = status.clone();
                        entry.resolution = Some(resolution.clone());
                    }
                }
            }
        }
    }

    /// Every letter, in the order of the topic.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The letter at `id`.
    pub fn get(&self, id: LetterId) -> Option<&Entry> {
        self.by_id.get(&id).and_then(|index| self.entries.get(*index))
    }

    /// The letters of the records keyed `key` (a conversation's), in the order written.
    pub fn letters_of(&self, key: &[u8]) -> Vec<&Entry> {
        self.entries.iter().filter(|entry| entry.letter.key.as_deref() == Some(key)).collect()
    }

    /// The redriven copies of `letters` that are not among the positions `read` already:
    /// audit reads them through their letter (the projection's index names the original).
    pub fn copies_not_read(letters: &[&Entry], read: &[LogPosition]) -> Vec<LogPosition> {
        letters.iter().filter_map(|entry| entry.status.copy()).filter(|copy| !read.contains(copy)).cloned().collect()
    }

    /// The first letter `consumer` wrote for the record at `source`.
    pub fn find(&self, consumer: &str, source: &LogPosition) -> Option<&Entry> {
        self.entries.iter().find(|entry| entry.letter.consumer == consumer && entry.letter.source() == *source)
    }

    /// The record an operator appends to settle letter `id` (an error says why it cannot
    /// be: unknown, or already settled). `redriven_offset`: where the copy was written.
    pub fn resolution(
        &self,
        id: LetterId,
        redriven_offset: Option<i64>,
        resolved_by: &str,
        reason: Option<String>,
        resolved_at: i64,
    ) -> Result<DeadLetterResolved, SettleRefused> {
        let entry = self.get(id).ok_or(SettleRefused::Unknown(id))?;
        match &entry.status {
            Status::Open => {}
            Status::Redriven { copy } => return Err(SettleRefused::Redriven { id, copy: copy.clone() }),
            Status::Discarded => return Err(SettleRefused::Discarded(id)),
        }
        let letter = &entry.letter;
        Ok(DeadLetterResolved {
            letter_partition: id.partition,
            letter_offset: id.offset,
            consumer: letter.consumer.clone(),
            source_topic: letter.source_topic.clone(),
            source_partition: letter.source_partition,
            source_offset: letter.source_offset,
            key: letter.key.clone(),
            action: if redriven_offset.is_some() { REDRIVEN } else { DISCARDED }.to_owned(),
            redriven_offset,
            resolved_by: resolved_by.to_owned(),
            reason,
            resolved_at,
        })
    }
}

/// The keys one consumer holds back: those with an open letter, and those whose letter was
/// redriven and whose copy it has not read yet (the copy runs before the key's later
/// records). Records without a key are never held: there is no order to keep.
#[derive(Debug, Clone, Default)]
pub struct Holds {
    keys: HashMap<Vec<u8>, KeyHold>,
}

#[derive(Debug, Clone, Default)]
struct KeyHold {
    /// Source positions of the key's open letters.
    open: BTreeSet<LogPosition>,
    /// Redriven copies not read yet.
    awaiting: BTreeSet<LogPosition>,
}

/// A key a read record released: its held records may go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// The record's key, as written.
    pub key: Vec<u8>,
    /// Whether the record read is the key's redriven copy (it runs before the held ones).
    pub by_copy: bool,
}

impl Holds {
    /// The holds of `consumer` as its letters in `book` say.
    pub fn from_book(book: &LetterBook, consumer: &str) -> Self {
        let mut holds = Self::default();
        for entry in book.entries().iter().filter(|entry| entry.letter.consumer == consumer) {
            holds.apply(entry);
        }
        holds
    }

    /// Takes a letter of this consumer, as it now stands, into account.
    pub fn apply(&mut self, entry: &Entry) {
        let Some(key) = entry.letter.key.clone().filter(|key| !key.is_empty()) else { return };
        let source = entry.letter.source();
        match &entry.status {
            Status::Open => self.hold(key, source),
            Status::Redriven { copy } => {
                let hold = self.keys.entry(key.clone()).or_default();
                hold.open.remove(&source);
                hold.awaiting.insert(copy.clone());
                self.forget_if_free(&key);
            }
            Status::Discarded => {
                if let Some(hold) = self.keys.get_mut(&key) {
                    hold.open.remove(&source);
                }
                self.forget_if_free(&key);
            }
        }
    }

    /// Holds `key` back for the open letter of the record read at `source`.
    pub fn hold(&mut self, key: Vec<u8>, source: LogPosition) {
        self.keys.entry(key).or_default().open.insert(source);
    }

    /// Whether records of `key` are held back.
    pub fn is_held(&self, key: &[u8]) -> bool {
        self.keys.contains_key(key)
    }

    /// Keys held back now.
    pub fn held_keys(&self) -> usize {
        self.keys.len()
    }

    /// The copies awaited in `topic`/`partition`.
    pub fn awaiting_in(&self, topic: &str, partition: i32) -> Vec<LogPosition> {
        let copies = self.keys.values().flat_map(|hold| hold.awaiting.iter());
        copies.filter(|copy| copy.topic == topic && copy.partition == partition).cloned().collect()
    }

    /// The consumer read the record at `position`: a copy awaited there is seen, and so is
    /// any awaited at an earlier offset of the partition (it was read before this consumer's
    /// committed offset, which never passes unfinished work: it is done). Returns the keys
    /// this frees.
    pub fn read_at(&mut self, position: &LogPosition) -> Vec<Released> {
        let mut released = Vec::new();
        if self.keys.values().all(|hold| hold.awaiting.is_empty()) {
            return released; // every record is read through here: the common case is cheap
        }
        let keys: Vec<Vec<u8>> = self.keys.keys().cloned().collect();
        for key in keys {
            let Some(hold) = self.keys.get_mut(&key) else { continue };
            let seen: Vec<LogPosition> = hold
                .awaiting
                .iter()
                .filter(|c| {
                    c.topic == position.topic && c.partition == position.partition && c.offset <= position.offset
                })
                .cloned()
                .collect();
            if seen.is_empty() {
                continue;
            }
            let by_copy = seen.contains(position);
            for copy in &seen {
                hold.awaiting.remove(copy);
            }
            if self.forget_if_free(&key) {
                released.push(Released { key, by_copy });
            }
        }
        released
    }

    /// Drops the key once nothing holds it; whether it did.
    fn forget_if_free(&mut self, key: &[u8]) -> bool {
        let free = self.keys.get(key).is_some_and(|hold| hold.open.is_empty() && hold.awaiting.is_empty());
        if free {
            self.keys.remove(key);
        }
        free
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(consumer: &str, key: &str, offset: i64) -> DeadLetter {
        DeadLetter {
            source_topic: "events".into(),
            source_partition: 2,
            source_offset: offset,
            key: Some(key.as_bytes().to_vec()),
            payload: Some(vec![1, 2, 3]),
            consumer: consumer.into(),
            error: "undecodable".into(),
            failed_at: 1,
            headers: HashMap::new(),
        }
    }

    fn at(offset: i64) -> LogPosition {
        LogPosition { topic: "events".into(), partition: 2, offset }
    }

    fn id(offset: i64) -> LetterId {
        LetterId { partition: 0, offset }
    }

    fn book_with(letters: &[(i64, DeadLetter)]) -> LetterBook {
        let mut book = LetterBook::default();
        for (offset, letter) in letters {
            book.apply(id(*offset), DeadLetterRecord::Letter(letter.clone()));
        }
        book
    }

    #[test]
    fn letter_ids_parse_as_list_shows_them() {
        assert_eq!("0/12".parse::<LetterId>(), Ok(id(12)));
        assert_eq!(id(12).to_string(), "0/12");
        for bad in ["", "0", "0/", "/3", "a/b", "0/-1", "-1/2", "0/1/2"] {
            assert!(bad.parse::<LetterId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_resolution_settles_its_letter_once() {
        let mut book = book_with(&[(0, letter("inference", "c1", 10)), (1, letter("embedder", "c1", 10))]);
        let discard = book.resolution(id(0), None, "ops", None, 5).unwrap();
        assert_eq!(discard.action, DISCARDED);
        book.apply(id(2), DeadLetterRecord::Resolved(discard));
        assert_eq!(book.get(id(0)).unwrap().status, Status::Discarded);
        // The embedder's letter of the same record is its own to settle.
        assert_eq!(book.get(id(1)).unwrap().status, Status::Open);
        assert!(
            book.resolution(id(0), Some(40), "ops", None, 6).unwrap_err().to_string().contains("discarded already")
        );
        assert!(book.resolution(id(9), None, "ops", None, 6).unwrap_err().to_string().contains("no dead letter 0/9"));

        let redrive = book.resolution(id(1), Some(40), "ops", Some("fixed".into()), 7).unwrap();
        book.apply(id(3), DeadLetterRecord::Resolved(redrive.clone()));
        // A late second decision on the same letter changes nothing.
        book.apply(id(4), DeadLetterRecord::Resolved(DeadLetterResolved { action: DISCARDED.into(), ..redrive }));
        assert_eq!(book.get(id(1)).unwrap().status, Status::Redriven { copy: at(40) });
        assert_eq!(book.find("embedder", &at(10)).unwrap().id, id(1));
        assert!(book.find("embedder", &at(11)).is_none());
    }

    #[test]
    fn audit_reads_the_copies_of_a_conversations_letters_it_has_not_read() {
        let mut book = book_with(&[
            (0, letter("inference", "c1", 10)),
            (1, letter("embedder", "c1", 10)),
            (2, letter("inference", "c2", 11)),
            (3, letter("inference", "c1", 12)),
        ]);
        for (at_offset, letter_offset, copy) in [(4, 0, 40), (5, 2, 41), (6, 3, 42)] {
            let resolution = book.resolution(id(letter_offset), Some(copy), "ops", None, 5).unwrap();
            book.apply(id(at_offset), DeadLetterRecord::Resolved(resolution));
        }
        let letters = book.letters_of(b"c1");
        assert_eq!(letters.iter().map(|e| e.id).collect::<Vec<_>>(), [id(0), id(1), id(3)], "c2's is not c1's");
        // The copy at 40 was read already (the index named it); 42 was not; the embedder's
        // letter is open, so it has no copy.
        assert_eq!(LetterBook::copies_not_read(&letters, &[at(40)]), [at(42)]);
        assert_eq!(LetterBook::copies_not_read(&letters, &[]), [at(40), at(42)]);
        assert!(book.letters_of(b"c9").is_empty());
    }

    #[test]
    fn a_duplicate_letter_of_one_record_is_settled_with_it() {
        let mut book = book_with(&[(0, letter("inference", "c1", 10)), (1, letter("inference", "c1", 10))]);
        let discard = book.resolution(id(0), None, "ops", None, 5).unwrap();
        book.apply(id(2), DeadLetterRecord::Resolved(discard));
        assert!(book.entries().iter().all(|entry| entry.status == Status::Discarded));
        assert!(Holds::from_book(&book, "inference").held_keys() == 0);
    }

    #[test]
    fn an_open_letter_holds_its_key_for_its_consumer_only() {
        let book = book_with(&[(0, letter("inference", "c1", 10)), (1, letter("inference", "c2", 11))]);
        let holds = Holds::from_book(&book, "inference");
        assert!(holds.is_held(b"c1") && holds.is_held(b"c2") && !holds.is_held(b"c3"));
        assert_eq!(Holds::from_book(&book, "embedder").held_keys(), 0);
        let keyless = DeadLetter { key: None, ..letter("inference", "", 12) };
        let empty_key = letter("inference", "", 13);
        assert_eq!(Holds::from_book(&book_with(&[(0, keyless), (1, empty_key)]), "inference").held_keys(), 0);
    }

    #[test]
    fn a_discard_frees_the_key_once_its_last_open_letter_is_settled() {
        let mut book = book_with(&[(0, letter("inference", "c1", 10)), (1, letter("inference", "c1", 14))]);
        let mut holds = Holds::from_book(&book, "inference");
        book.apply(id(2), DeadLetterRecord::Resolved(book.resolution(id(0), None, "ops", None, 5).unwrap()));
        holds.apply(book.get(id(0)).unwrap());
        assert!(holds.is_held(b"c1"), "the second letter still holds it");
        book.apply(id(3), DeadLetterRecord::Resolved(book.resolution(id(1), None, "ops", None, 5).unwrap()));
        holds.apply(book.get(id(1)).unwrap());
        assert!(!holds.is_held(b"c1"));
    }

    #[test]
    fn a_redriven_key_waits_for_its_copy_and_the_copy_goes_first() {
        let mut book = book_with(&[(0, letter("inference", "c1", 10))]);
        let mut holds = Holds::from_book(&book, "inference");
        book.apply(id(1), DeadLetterRecord::Resolved(book.resolution(id(0), Some(40), "ops", None, 5).unwrap()));
        holds.apply(book.get(id(0)).unwrap());
        assert!(holds.is_held(b"c1"), "held until the copy is read");
        assert_eq!(holds.awaiting_in("events", 2), [at(40)]);
        assert!(holds.read_at(&at(39)).is_empty());
        assert!(holds.read_at(&LogPosition { partition: 3, ..at(40) }).is_empty(), "another partition");
        assert_eq!(holds.read_at(&at(40)), [Released { key: b"c1".to_vec(), by_copy: true }]);
        assert!(!holds.is_held(b"c1"));
    }

    #[test]
    fn a_copy_before_where_reading_starts_was_done_already() {
        // After a restart the book says "awaiting the copy at 40", but the committed offset
        // was past it: the first record read is beyond, and the key is free.
        let mut book = book_with(&[(0, letter("inference", "c1", 10))]);
        book.apply(id(1), DeadLetterRecord::Resolved(book.resolution(id(0), Some(40), "ops", None, 5).unwrap()));
        let mut holds = Holds::from_book(&book, "inference");
        assert!(holds.is_held(b"c1"));
        assert_eq!(holds.read_at(&at(57)), [Released { key: b"c1".to_vec(), by_copy: false }]);
        assert!(!holds.is_held(b"c1"));
    }

    #[test]
    fn a_key_lettered_again_while_awaiting_its_copy_stays_held() {
        let mut book = book_with(&[(0, letter("inference", "c1", 10))]);
        book.apply(id(1), DeadLetterRecord::Resolved(book.resolution(id(0), Some(40), "ops", None, 5).unwrap()));
        book.apply(id(2), DeadLetterRecord::Letter(letter("inference", "c1", 40)));
        let mut holds = Holds::from_book(&book, "inference");
        assert!(holds.read_at(&at(40)).is_empty(), "the copy is poison too: its letter holds the key");
        assert!(holds.is_held(b"c1"));
    }
}
