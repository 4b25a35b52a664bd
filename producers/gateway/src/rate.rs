//! Rate limits at admission, as token buckets (pure: time is passed in).
//!
//! Each gateway instance keeps its buckets from the log, not from its own admissions
//! alone: every instance reads every `UserQueryReceived` (a turn, charged to its user and
//! to the global bucket) and every outcome (its prompt + completion tokens, charged to the
//! user's token bucket), whichever instance or replay wrote them. So N instances enforce
//! one limit, not N times it. A query this instance admitted is charged at once and
//! remembered until it comes back from the log, so it is not charged twice. What two
//! instances admit in the same moment, before either sees the other's query in the log
//! (tens of milliseconds), can pass together: the limit may be exceeded by one turn per
//! instance per such moment, never multiplied.

use std::collections::{HashMap, HashSet};

use clap::Args;
use parley_events::{EventId, UserId};

/// The limits; 0 turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Args)]
pub struct RateSettings {
    /// Turns a user may start per minute (bursts up to this many).
    #[arg(long, env = "PARLEY_USER_TURNS_PER_MINUTE", default_value_t = 30)]
    pub user_turns_per_minute: u32,

    /// Model tokens (prompt + completion) a user may spend per minute; a turn is refused
    /// while the user's bucket is empty (what a turn costs is known only afterwards).
    #[arg(long, env = "PARLEY_USER_TOKENS_PER_MINUTE", default_value_t = 60_000)]
    pub user_tokens_per_minute: u32,

    /// Turns all users together may start per minute (0: no global limit; set it to what
    /// the model pool can answer).
    #[arg(long, env = "PARLEY_GLOBAL_TURNS_PER_MINUTE", default_value_t = 0)]
    pub global_turns_per_minute: u32,

    /// Documents a user may add per minute through the HTTP API (0: no limit).
    #[arg(long, env = "PARLEY_USER_DOCUMENTS_PER_MINUTE", default_value_t = 60)]
    pub user_documents_per_minute: u32,
}

/// A bucket of `capacity` that refills `capacity` per minute, continuously.
#[derive(Debug, Clone, PartialEq)]
struct Bucket {
    capacity: f64,
    level: f64,
    at_ms: i64,
}

const MINUTE_MS: f64 = 60_000.0;

impl Bucket {
    fn full(capacity: u32, now_ms: i64) -> Self {
        Self { capacity: f64::from(capacity), level: f64::from(capacity), at_ms: now_ms }
    }

    fn refill(&mut self, now_ms: i64) {
        if now_ms > self.at_ms {
            let elapsed = (now_ms - self.at_ms) as f64;
            self.level = (self.level + elapsed * self.capacity / MINUTE_MS).min(self.capacity);
            self.at_ms = now_ms;
        }
    }

    /// Milliseconds until the level reaches `needed` (0 when it has).
    fn wait_for(&self, needed: f64) -> u64 {
        if self.level >= needed || self.capacity <= 0.0 {
            return 0;
        }
        ((needed - self.level) * MINUTE_MS / self.capacity).ceil() as u64
    }

    /// Takes `cost`, even into debt (usage is charged after the fact). A bucket of no
    /// capacity is a limit turned off: nothing to keep.
    fn charge(&mut self, cost: f64, now_ms: i64) {
        if self.capacity > 0.0 {
            self.refill(now_ms);
            self.level -= cost;
        }
    }

    fn is_full(&self, now_ms: i64) -> bool {
        let mut probe = self.clone();
        probe.refill(now_ms);
        probe.level >= probe.capacity
    }
}

/// Which limit refused a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The user's questions per minute.
    UserTurns,
    /// The user's model tokens per minute.
    UserTokens,
    /// Everyone's questions per minute.
    GlobalTurns,
    /// The user's documents per minute.
    UserDocuments,
}

impl Limit {
    /// What the limit's refusal says.
    pub fn describe(self) -> &'static str {
        match self {
            Limit::UserTurns => "you have sent too many questions in the last minute",
            Limit::UserTokens => "your questions used too many model tokens in the last minute",
            Limit::GlobalTurns => "Parley is taking too many questions from everyone right now",
            Limit::UserDocuments => "you have added too many documents in the last minute",
        }
    }
}

/// A refused turn: which limit, and when a retry would pass it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// The limit.
    pub limit: Limit,
    /// When a retry would pass it.
    pub retry_after_ms: u64,
}

#[derive(Debug)]
struct UserBuckets {
    turns: Bucket,
    tokens: Bucket,
    documents: Bucket,
}

/// The buckets of every user seen lately, and the global one.
#[derive(Debug)]
pub struct RateLimiter {
    settings: RateSettings,
    users: HashMap<UserId, UserBuckets>,
    global: Bucket,
    /// Queries admitted here and already charged, until the log shows them.
    admitted_here: HashSet<EventId>,
}

impl RateLimiter {
    /// A limiter with full buckets at `now_ms`.
    pub fn new(settings: RateSettings, now_ms: i64) -> Self {
        Self {
            settings,
            users: HashMap::new(),
            global: Bucket::full(settings.global_turns_per_minute, now_ms),
            admitted_here: HashSet::new(),
        }
    }

    fn user(&mut self, user: &UserId, now_ms: i64) -> &mut UserBuckets {
        let settings = self.settings;
        self.users.entry(user.clone()).or_insert_with(|| UserBuckets {
            turns: Bucket::full(settings.user_turns_per_minute, now_ms),
            tokens: Bucket::full(settings.user_tokens_per_minute, now_ms),
            documents: Bucket::full(settings.user_documents_per_minute, now_ms),
        })
    }

    /// Admits a turn of `user` (charging it) or says which limit refuses it and for how long.
    pub fn admit(&mut self, user: &UserId, query_id: EventId, now_ms: i64) -> Result<(), Limited> {
        let settings = self.settings;
        self.global.refill(now_ms);
        let buckets = self.user(user, now_ms);
        buckets.turns.refill(now_ms);
        buckets.tokens.refill(now_ms);
        let checks = [
            (Limit::UserTurns, settings.user_turns_per_minute, buckets.turns.wait_for(1.0)),
            // Any token left admits a turn; its real usage is charged when it is known.
            (Limit::UserTokens, settings.user_tokens_per_minute, buckets.tokens.wait_for(f64::MIN_POSITIVE)),
        ];
        let global = (Limit::GlobalTurns, settings.global_turns_per_minute, self.global.wait_for(1.0));
        let refused = checks.into_iter().chain([global]).filter(|(_, limit, wait)| *limit > 0 && *wait > 0);
        if let Some((limit, _, retry_after_ms)) = refused.max_by_key(|(_, _, wait)| *wait) {
            return Err(Limited { limit, retry_after_ms });
        }
        self.user(user, now_ms).turns.charge(1.0, now_ms);
        self.global.charge(1.0, now_ms);
        self.admitted_here.insert(query_id);
        Ok(())
    }

    /// Admits a document of `user` (charging it), or says when one would pass.
    pub fn admit_document(&mut self, user: &UserId, event_id: EventId, now_ms: i64) -> Result<(), Limited> {
        let limit = self.settings.user_documents_per_minute;
        let documents = &mut self.user(user, now_ms).documents;
        documents.refill(now_ms);
        let wait = documents.wait_for(1.0);
        if limit > 0 && wait > 0 {
            return Err(Limited { limit: Limit::UserDocuments, retry_after_ms: wait });
        }
        documents.charge(1.0, now_ms);
        self.admitted_here.insert(event_id);
        Ok(())
    }

    /// A document read from the log: charged unless this instance admitted it.
    pub fn observe_document(&mut self, user: &UserId, event_id: EventId, now_ms: i64) {
        if !self.admitted_here.remove(&event_id) {
            self.user(user, now_ms).documents.charge(1.0, now_ms);
        }
    }

    /// A document admitted here that the log did not take.
    pub fn refund_document(&mut self, user: &UserId, event_id: EventId, now_ms: i64) {
        if self.admitted_here.remove(&event_id) {
            self.user(user, now_ms).documents.charge(-1.0, now_ms);
        }
    }

    /// A query read from the log: charged unless this instance admitted (and charged) it.
    pub fn observe_query(&mut self, user: &UserId, query_id: EventId, now_ms: i64) {
        if self.admitted_here.remove(&query_id) {
            return;
        }
        self.user(user, now_ms).turns.charge(1.0, now_ms);
        self.global.charge(1.0, now_ms);
    }

    /// A query admitted here that the log did not take: nothing to charge.
    pub fn refund(&mut self, user: &UserId, query_id: EventId, now_ms: i64) {
        if self.admitted_here.remove(&query_id) {
            self.user(user, now_ms).turns.charge(-1.0, now_ms);
            self.global.charge(-1.0, now_ms);
        }
    }

    /// An outcome read from the log: the model tokens the turn used.
    pub fn observe_usage(&mut self, user: &UserId, tokens: u64, now_ms: i64) {
        self.user(user, now_ms).tokens.charge(tokens as f64, now_ms);
    }

    /// Forgets users whose buckets are full again (they would be created full anyway).
    pub fn forget_rested(&mut self, now_ms: i64) {
        self.users.retain(|_, b| !(b.turns.is_full(now_ms) && b.tokens.is_full(now_ms) && b.documents.is_full(now_ms)));
    }

    /// Users with a bucket (the rested are forgotten).
    pub fn users_tracked(&self) -> usize {
        self.users.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(name: &str) -> UserId {
        name.parse().unwrap()
    }

    /// The event id the test calls `name`: the same name, the same id.
    fn e(name: impl AsRef<str>) -> EventId {
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_ref().as_bytes()).into()
    }

    fn limiter(turns: u32, tokens: u32, global: u32) -> RateLimiter {
        let settings = RateSettings {
            user_turns_per_minute: turns,
            user_tokens_per_minute: tokens,
            global_turns_per_minute: global,
            user_documents_per_minute: 2,
        };
        RateLimiter::new(settings, 0)
    }

    #[test]
    fn documents_have_a_bucket_of_their_own_shared_through_the_log() {
        let mut rate = limiter(0, 0, 0);
        rate.observe_document(&u("ann"), e("added-elsewhere"), 0);
        assert_eq!(rate.admit_document(&u("ann"), e("d1"), 0), Ok(()));
        rate.observe_document(&u("ann"), e("d1"), 1); // our own, back from the log: not twice
        let refused = rate.admit_document(&u("ann"), e("d2"), 1).unwrap_err();
        assert_eq!(refused, Limited { limit: Limit::UserDocuments, retry_after_ms: 29_999 });
        assert!(rate.admit(&u("ann"), e("q"), 1).is_ok(), "questions are another bucket");

        let mut rate = limiter(0, 0, 0);
        assert_eq!(rate.admit_document(&u("bob"), e("d1"), 0), Ok(()));
        assert_eq!(rate.admit_document(&u("bob"), e("d2"), 0), Ok(()));
        assert!(rate.admit_document(&u("bob"), e("d3"), 0).is_err());
        rate.refund_document(&u("bob"), e("d2"), 0);
        assert_eq!(rate.admit_document(&u("bob"), e("d3"), 0), Ok(()), "a document the log refused is refunded");
    }

    #[test]
    fn a_user_gets_a_burst_of_the_per_minute_limit_then_waits_for_refill() {
        let mut rate = limiter(3, 0, 0);
        for n in 0..3 {
            assert_eq!(rate.admit(&u("ann"), e(format!("q{n}")), 0), Ok(()));
        }
        let refused = rate.admit(&u("ann"), e("q3"), 0).unwrap_err();
        assert_eq!(refused, Limited { limit: Limit::UserTurns, retry_after_ms: 20_000 });
        assert!(rate.admit(&u("bob"), e("b0"), 0).is_ok(), "another user has a bucket of their own");
        assert!(rate.admit(&u("ann"), e("q3"), 19_999).is_err());
        assert_eq!(rate.admit(&u("ann"), e("q3"), 20_000), Ok(()), "one turn refills in 60 s / 3");
    }

    #[test]
    fn turns_other_instances_admitted_count_once_and_own_ones_are_not_counted_twice() {
        let mut rate = limiter(2, 0, 0);
        rate.observe_query(&u("ann"), e("elsewhere"), 0); // admitted by another gateway
        assert_eq!(rate.admit(&u("ann"), e("here"), 0), Ok(()));
        rate.observe_query(&u("ann"), e("here"), 5); // our own query, back from the log
        assert_eq!(rate.admit(&u("ann"), e("third"), 10).unwrap_err().limit, Limit::UserTurns);
    }

    #[test]
    fn a_query_the_log_refused_is_refunded() {
        let mut rate = limiter(1, 0, 0);
        assert_eq!(rate.admit(&u("ann"), e("q0"), 0), Ok(()));
        rate.refund(&u("ann"), e("q0"), 0);
        assert_eq!(rate.admit(&u("ann"), e("q0"), 0), Ok(()));
    }

    #[test]
    fn spent_tokens_refuse_turns_until_the_bucket_has_refilled_above_zero() {
        let mut rate = limiter(0, 1_000, 0);
        assert_eq!(rate.admit(&u("ann"), e("q0"), 0), Ok(()));
        rate.observe_usage(&u("ann"), 1_600, 0); // the answer cost more than was left
        let refused = rate.admit(&u("ann"), e("q1"), 0).unwrap_err();
        assert_eq!(refused.limit, Limit::UserTokens);
        assert_eq!(refused.retry_after_ms, 36_000, "600 tokens of debt at 1,000 a minute");
        assert_eq!(rate.admit(&u("ann"), e("q1"), 36_001), Ok(()));
    }

    #[test]
    fn the_global_limit_holds_across_users_and_the_longest_wait_is_reported() {
        let mut rate = limiter(10, 0, 2);
        assert!(rate.admit(&u("ann"), e("a"), 0).is_ok());
        rate.observe_query(&u("bob"), e("b"), 0);
        let refused = rate.admit(&u("cid"), e("c"), 0).unwrap_err();
        assert_eq!(refused, Limited { limit: Limit::GlobalTurns, retry_after_ms: 30_000 });
    }

    #[test]
    fn zero_turns_a_limit_off_and_rested_users_are_forgotten() {
        let mut rate = limiter(0, 0, 0);
        for n in 0..1_000 {
            assert!(rate.admit(&u("ann"), e(n.to_string()), 0).is_ok());
        }
        let mut rate = limiter(5, 100, 0);
        rate.admit(&u("ann"), e("q"), 0).unwrap();
        rate.observe_usage(&u("ann"), 50, 0);
        rate.forget_rested(1_000);
        assert_eq!(rate.users_tracked(), 1, "still refilling");
        rate.forget_rested(60_000);
        assert_eq!(rate.users_tracked(), 0);
    }
}
