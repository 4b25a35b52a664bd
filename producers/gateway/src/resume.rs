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

/// The resumed answers of one socket.
#[derive(Debug, Default)]
pub struct TokenOrder {
    answers: HashMap<String, Resumed>,
}

/// Per resumed answer: the next delta to send, and what waits. Deltas are ordered by
/// (attempt, index): a retried model call starts its answer again at index 0 with the next
/// attempt, which the client shows as a restart; deltas of an attempt replaced are dropped.
#[derive(Debug, Default)]
struct Resumed {
    /// (attempt, index) of the next delta to send.
    next: (i32, i32),
    /// Until the `resumed` frame: live frames wait for the read-back.
    holding: bool,
    held: BTreeMap<(i32, i32), ServerFrame>,
    outcome: Option<ServerFrame>,
    done: bool,
}

impl Resumed {
    /// Whether the delta at `key` is the one to send now: the next of its attempt, or the
    /// first of a later attempt (the answer starts over).
    fn is_next(&self, key: (i32, i32)) -> bool {
        key == self.next || (key.0 > self.next.0 && key.1 == 0)
    }

    /// A delta: sent when it is the next one (with any held ones it unblocks), held when
    /// later, dropped when a repeat or of an attempt replaced.
    fn token(&mut self, key: (i32, i32), frame: ServerFrame) -> Vec<ServerFrame> {
        if key < self.next {
            return vec![];
        }
        if self.holding || !self.is_next(key) {
            if self.held.len() < MAX_HELD {
                self.held.insert(key, frame);
            }
            return vec![];
        }
        self.next = (key.0, key.1 + 1);
        let mut frames = vec![frame];
        frames.extend(self.flush());
        frames
    }

    /// The held deltas that are next now, in order (those passed by are dropped).
    fn flush(&mut self) -> Vec<ServerFrame> {
        let mut frames = Vec::new();
        loop {
            self.held.retain(|held, _| *held >= self.next);
            let Some(first) = self.held.keys().next().copied().filter(|first| self.is_next(*first)) else {
                return frames;
            };
            frames.extend(self.held.remove(&first));
            self.next = (first.0, first.1 + 1);
        }
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

/// A token frame's place in its answer: (attempt, index).
fn key_of(frame: &ServerFrame) -> Option<(i32, i32)> {
    match frame {
        ServerFrame::Token { attempt, index, .. } => Some((*attempt, *index)),
        _ => None,
    }
}

impl TokenOrder {
    /// The client has the deltas of `query_event_id` up to `last_index` (-1: none) of the
    /// first attempt, until [`TokenOrder::client_attempt`] says which; its live frames wait
    /// for the `resumed` frame.
    pub fn resume(&mut self, query_event_id: &str, last_index: i32) {
        let next = (1, last_index.saturating_add(1).max(0));
        self.answers.insert(query_event_id.to_owned(), Resumed { next, holding: true, ..Resumed::default() });
    }

    /// The client's last delta of `query_event_id` came from `attempt` (read back at the
    /// position it resumed from).
    pub fn client_attempt(&mut self, query_event_id: &str, attempt: i32) {
        if let Some(resumed) = self.answers.get_mut(query_event_id) {
            resumed.next.0 = attempt;
        }
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
            ServerFrame::Token { attempt, index, .. } => resumed.token((attempt, index), frame),
            ServerFrame::Resumed { conversation_id, query_event_id, status, replay } => {
                resumed.holding = false;
                let mut frames =
                    vec![ServerFrame::Resumed { conversation_id, query_event_id, status, replay: Vec::new() }];
                for token in replay {
                    if let Some(key) = key_of(&token) {
                        frames.extend(resumed.token(key, token));
                    }
                }
                // Sent after what the read-back had: nothing from before it is lost.
                frames.extend(resumed.flush());
                if let Some(first) = resumed.held.keys().next().copied() {
                    resumed.next = first; // a gap neither source has: go on after it
                    frames.extend(resumed.flush());
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
        attempt_token(1, index)
    }

    fn attempt_token(attempt: i32, index: i32) -> ServerFrame {
        ServerFrame::Token {
            conversation_id: "c".into(),
            query_event_id: "q".into(),
            index,
            delta: format!("d{index}"),
            attempt,
            position: None,
        }
    }

    fn keys(frames: &[ServerFrame]) -> Vec<(i32, i32)> {
        frames.iter().filter_map(key_of).collect()
    }

    #[test]
    fn a_retried_call_starts_the_answer_over_and_the_replaced_attempt_is_dropped() {
        // The client had deltas 0..=4 of attempt 1; the call was retried meanwhile.
        let mut order = TokenOrder::default();
        order.resume("q", 4);
        order.client_attempt("q", 1);
        let mut sent = Vec::new();
        sent.extend(order.admit(attempt_token(2, 2))); // live, during the read-back
        let replay = vec![attempt_token(1, 5), attempt_token(1, 6), attempt_token(2, 0), attempt_token(2, 1)];
        sent.extend(order.admit(resumed(replay)));
        sent.extend(order.admit(attempt_token(1, 7))); // a late delta of the failed call
        sent.extend(order.admit(attempt_token(2, 3)));
        assert_eq!(keys(&sent), [(1, 5), (1, 6), (2, 0), (2, 1), (2, 2), (2, 3)]);
    }

    #[test]
    fn a_client_already_on_the_retry_gets_no_second_restart() {
        // Its last delta was index 3 of attempt 2: index 0 of attempt 2 is not a restart.
        let mut order = TokenOrder::default();
        order.resume("q", 3);
        order.client_attempt("q", 2);
        let replay = vec![attempt_token(2, 0), attempt_token(2, 4), attempt_token(1, 9)];
        let mut sent = order.admit(resumed(replay));
        sent.extend(order.admit(attempt_token(2, 5)));
        assert_eq!(keys(&sent), [(2, 4), (2, 5)]);
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
            attempt: 1,
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
