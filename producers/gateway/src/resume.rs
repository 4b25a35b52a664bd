//! Resuming an answer on a new socket: the socket follows the conversation at once (live
//! deltas come), while the deltas it missed are read back from the tokens topic. So one
//! socket gets each delta from two sources in any order. [`TokenOrder`] sits in front of
//! such a socket: it holds the answer's live frames until the `resumed` frame with the
//! read-back deltas comes, then lets each delta through once, in index order, and the
//! outcome last. Pure: no I/O.

use std::collections::{BTreeMap, HashMap};

use crate::protocol::ServerFrame;

/// Deltas held while an earlier one is missing, per answer, at most (beyond that the
/// answer frame, which has the whole text, is the client's way back).
const MAX_HELD: usize = 4096;

/// Per resumed answer: the next delta index to send, and what waits.
#[derive(Debug, Default)]
pub struct TokenOrder {
    answers: HashMap<String, Resumed>,
}

#[derive(Debug, Default)]
struct Resumed {
    next: i32,
    /// Until the `resumed` frame: live frames wait for the read-back.
    holding: bool,
    held: BTreeMap<i32, ServerFrame>,
    outcome: Option<ServerFrame>,
    done: bool,
}

impl Resumed {
    /// A delta: sent when it is the next one (with any held ones it unblocks), held when
    /// later, dropped when a repeat.
    fn token(&mut self, index: i32, frame: ServerFrame) -> Vec<ServerFrame> {
        if index < self.next {
            return vec![];
        }
        if self.holding || index > self.next {
            if self.held.len() < MAX_HELD {
                self.held.insert(index, frame);
            }
            return vec![];
        }
        let mut frames = vec![frame];
        self.next += 1;
        while let Some(next) = self.held.remove(&self.next) {
            frames.push(next);
            self.next += 1;
        }
        frames
    }

    /// The outcome ends the answer: whatever still waits (the answer text holds it all
    /// anyway), then the outcome.
    fn finish(&mut self, outcome: ServerFrame) -> Vec<ServerFrame> {
        self.done = true;
        let mut frames: Vec<ServerFrame> = std::mem::take(&mut self.held).into_values().collect();
        frames.push(outcome);
        frames
    }
}

impl TokenOrder {
    /// The client has the deltas of `query_event_id` up to `last_index` (-1: none); its
    /// live frames wait for the `resumed` frame.
    pub fn resume(&mut self, query_event_id: &str, last_index: i32) {
        let next = last_index.saturating_add(1).max(0);
        self.answers.insert(query_event_id.to_owned(), Resumed { next, holding: true, ..Resumed::default() });
    }

    /// The frames to send for `frame`, in order.
    pub fn admit(&mut self, frame: ServerFrame) -> Vec<ServerFrame> {
        let query = match &frame {
            ServerFrame::Token { query_event_id, .. }
            | ServerFrame::Answer { query_event_id, .. }
            | ServerFrame::Failed { query_event_id, .. }
            | ServerFrame::Resumed { query_event_id, .. } => query_event_id.clone(),
            _ => return vec![frame],
        };
        let Some(resumed) = self.answers.get_mut(&query) else { return vec![frame] };
        if resumed.done {
            // A second resume of a finished answer gets its `resumed` and outcome frames.
            return if matches!(frame, ServerFrame::Resumed { .. }) { vec![frame] } else { vec![] };
        }
        match frame {
            ServerFrame::Token { index, .. } => resumed.token(index, frame),
            ServerFrame::Resumed { conversation_id, query_event_id, status, replay } => {
                resumed.holding = false;
                let mut frames =
                    vec![ServerFrame::Resumed { conversation_id, query_event_id, status, replay: Vec::new() }];
                for token in replay {
                    if let ServerFrame::Token { index, .. } = token {
                        frames.extend(resumed.token(index, token));
                    }
                }
                // Sent after what the read-back had: nothing from before it is lost.
                let first_held = resumed.held.keys().next().copied();
                if let Some(first) = first_held.filter(|first| *first > resumed.next)
                    && let Some(frame) = resumed.held.remove(&first)
                {
                    resumed.next = first; // a gap neither source has: go on after it
                    frames.extend(resumed.token(first, frame));
                }
                if let Some(outcome) = resumed.outcome.take() {
                    frames.extend(resumed.finish(outcome));
                }
                frames
            }
            outcome if resumed.holding => {
                resumed.outcome = Some(outcome);
                vec![]
            }
            outcome => resumed.finish(outcome),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(index: i32) -> ServerFrame {
        ServerFrame::Token {
            conversation_id: "c".into(),
            query_event_id: "q".into(),
            index,
            delta: format!("d{index}"),
            position: None,
        }
    }

    fn resumed(replay: Vec<ServerFrame>) -> ServerFrame {
        ServerFrame::Resumed {
            conversation_id: "c".into(),
            query_event_id: "q".into(),
            status: "streaming".into(),
            replay,
        }
    }

    fn failed() -> ServerFrame {
        ServerFrame::Failed {
            conversation_id: "c".into(),
            query_event_id: "q".into(),
            event_id: "o".into(),
            error_kind: "timeout".into(),
            message: "slow".into(),
        }
    }

    fn indices(frames: &[ServerFrame]) -> Vec<i32> {
        frames
            .iter()
            .filter_map(|f| if let ServerFrame::Token { index, .. } = f { Some(*index) } else { None })
            .collect()
    }

    #[test]
    fn live_deltas_wait_for_the_read_back_and_each_comes_out_once_in_order() {
        let mut order = TokenOrder::default();
        order.resume("q", 2);
        let mut sent = Vec::new();
        // Live 4 to 6 come while the read-back runs; it has 1 to 5; live 7 after.
        for index in [4, 5, 6] {
            sent.extend(order.admit(token(index)));
        }
        assert!(sent.is_empty(), "held until the resumed frame");
        sent.extend(order.admit(resumed((1..=5).map(token).collect())));
        sent.extend(order.admit(token(7)));
        assert!(matches!(sent[0], ServerFrame::Resumed { ref replay, .. } if replay.is_empty()));
        assert_eq!(indices(&sent), [3, 4, 5, 6, 7]);
    }

    #[test]
    fn an_outcome_during_the_read_back_comes_after_its_deltas_and_ends_the_answer() {
        let mut order = TokenOrder::default();
        order.resume("q", -1);
        assert!(order.admit(token(2)).is_empty());
        assert!(order.admit(failed()).is_empty(), "the outcome waits for the read-back too");
        let sent = order.admit(resumed(vec![token(0), token(1)]));
        assert_eq!(indices(&sent), [0, 1, 2]);
        assert_eq!(sent.last(), Some(&failed()));
        assert!(order.admit(token(3)).is_empty(), "nothing of the answer after its outcome");
        // Other answers and frames pass untouched.
        let other = ServerFrame::Token {
            conversation_id: "c".into(),
            query_event_id: "other".into(),
            index: 9,
            delta: "x".into(),
            position: None,
        };
        assert_eq!(order.admit(other.clone()), [other]);
    }

    #[test]
    fn a_gap_neither_source_has_does_not_stall_the_answer() {
        let mut order = TokenOrder::default();
        order.resume("q", -1);
        order.admit(token(3));
        let sent = order.admit(resumed(vec![token(0)]));
        assert_eq!(indices(&sent), [0, 3], "1 and 2 aged out of the tokens topic");
        assert_eq!(indices(&order.admit(token(4))), [4]);
    }
}
