//! Token budgets (pure rules; the ledger that applies them lives with the CQL store).
//!
//! A turn is admitted only if its worst case fits every budget it falls under: the user's
//! day and month (UTC) and its conversation. Admission *reserves* that worst case in each
//! budget; the turn's outcome *settles* it, replacing the reservation with the model's
//! real usage. So parallel turns at the edge of a budget cannot overspend it: each sees the
//! others' reservations. A turn can overspend only by what its real usage exceeds its
//! reservation.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::event::ConversationEvent;
use crate::ids::{ConversationId, EventId, UserId};

/// Token budgets; 0 turns one off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BudgetLimits {
    /// Model tokens per UTC day.
    pub daily: u64,
    /// Model tokens per UTC month.
    pub monthly: u64,
    /// Model tokens per conversation, over its whole life.
    pub per_conversation: u64,
}

impl BudgetLimits {
    /// What is left of `limit` after `used`; None: no limit (0).
    pub fn left(used: u64, limit: u64) -> Option<u64> {
        (limit > 0).then(|| limit.saturating_sub(used))
    }
}

/// In words: `daily 2200 tokens, monthly no limit, per conversation no limit`.
impl std::fmt::Display for BudgetLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let one = |limit: u64| if limit == 0 { "no limit".to_owned() } else { format!("{limit} tokens") };
        write!(
            f,
            "daily {}, monthly {}, per conversation {}",
            one(self.daily),
            one(self.monthly),
            one(self.per_conversation)
        )
    }
}

/// The span a budget counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeriodKind {
    /// A UTC day.
    Day,
    /// A UTC month.
    Month,
    /// A conversation's whole life.
    Conversation,
}

impl PeriodKind {
    /// The name operators and messages use.
    pub fn as_str(self) -> &'static str {
        match self {
            PeriodKind::Day => "daily",
            PeriodKind::Month => "monthly",
            PeriodKind::Conversation => "conversation",
        }
    }
}

/// One budget a turn is charged to: its ledger key, its limit and when it starts again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Period {
    /// Which budget.
    pub kind: PeriodKind,
    /// `day:2026-11-28`, `month:2026-11`, `conversation:<id>`.
    pub key: String,
    /// Its limit in tokens.
    pub limit: u64,
    /// Milliseconds since the epoch when this budget is full again (none: never).
    pub resets_at_ms: Option<i64>,
}

const DAY_MS: i64 = 86_400_000;

/// The budgets a turn of `conversation_id` at `now_ms` is charged to (those turned on).
pub fn periods(limits: BudgetLimits, conversation_id: &str, now_ms: i64) -> Vec<Period> {
    let days = now_ms.div_euclid(DAY_MS);
    let (year, month, day) = civil_from_days(days);
    let next_month = if month == 12 { days_from_civil(year + 1, 1, 1) } else { days_from_civil(year, month + 1, 1) };
    let all = [
        (PeriodKind::Day, format!("day:{year:04}-{month:02}-{day:02}"), limits.daily, Some((days + 1) * DAY_MS)),
        (PeriodKind::Month, format!("month:{year:04}-{month:02}"), limits.monthly, Some(next_month * DAY_MS)),
        (PeriodKind::Conversation, format!("conversation:{conversation_id}"), limits.per_conversation, None),
    ];
    all.into_iter()
        .filter(|(_, _, limit, _)| *limit > 0)
        .map(|(kind, key, limit, resets_at_ms)| Period { kind, key, limit, resets_at_ms })
        .collect()
}

/// The ledger key of one turn's reservation.
pub fn turn_key(query_id: EventId) -> String {
    format!("turn:{query_id}")
}

/// What a turn reserves: its question (≈ 4 characters a token) plus `reserve_tokens`, the
/// worst case of everything else (earlier turns and retrieved context in the prompt, and
/// the longest answer).
pub fn reservation(question_chars: usize, reserve_tokens: u64) -> u64 {
    u64::try_from(question_chars.div_ceil(4)).unwrap_or(u64::MAX).saturating_add(reserve_tokens)
}

/// A budget a turn does not fit in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    /// The budget that refused.
    pub kind: PeriodKind,
    /// Its limit in tokens.
    pub limit: u64,
    /// Spent and reserved so far in that budget.
    pub committed: u64,
    /// When it starts again (ms since the epoch); never for a conversation's.
    pub resets_at_ms: Option<i64>,
}

impl Exceeded {
    /// In words a person understands.
    pub fn describe(&self) -> String {
        let what = match self.kind {
            PeriodKind::Day => "your daily token budget is used up",
            PeriodKind::Month => "your monthly token budget is used up",
            PeriodKind::Conversation => "this conversation has used its token budget; start a new one",
        };
        format!("{what} ({} of {} tokens)", self.committed, self.limit)
    }
}

/// Whether `reservation` fits every period, given what each has committed (spent plus
/// reserved; a period absent from `committed` has nothing yet).
pub fn check(periods: &[Period], committed: &HashMap<String, u64>, reservation: u64) -> Result<(), Exceeded> {
    for period in periods {
        let so_far = committed.get(&period.key).copied().unwrap_or(0);
        if so_far.saturating_add(reservation) > period.limit {
            return Err(Exceeded {
                kind: period.kind,
                limit: period.limit,
                committed: so_far,
                resets_at_ms: period.resets_at_ms,
            });
        }
    }
    Ok(())
}

/// A period's committed tokens once a turn that reserved `reserved` really used `used`.
pub fn settled(committed: u64, reserved: u64, used: u64) -> u64 {
    committed.saturating_sub(reserved).saturating_add(used)
}

/// When the UTC month of `now_ms` began (ms since the epoch).
pub fn month_start_ms(now_ms: i64) -> i64 {
    let (year, month, _) = civil_from_days(now_ms.div_euclid(DAY_MS));
    days_from_civil(year, month, 1) * DAY_MS
}

/// What a user spent according to the log: model tokens of their answers by budget, and
/// the turns inference refused for want of budget.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Usage {
    /// Tokens spent this UTC day.
    pub today: u64,
    /// Tokens spent this UTC month.
    pub this_month: u64,
    /// Tokens spent per conversation this month.
    pub by_conversation: BTreeMap<ConversationId, u64>,
    /// (query event id, why), for outcomes with error kind `budget_exceeded`.
    pub refused: Vec<(EventId, String)>,
}

/// Error kind of the outcome of a turn inference refused for want of budget.
pub const BUDGET_EXCEEDED: &str = "budget_exceeded";

/// `user`'s usage in the day and month of `now_ms`, folded from `events` (which must hold
/// the month's queries and outcomes).
pub fn usage<'a>(events: impl IntoIterator<Item = &'a ConversationEvent>, user: &UserId, now_ms: i64) -> Usage {
    let mut fold = UsageFold::new(user.clone(), now_ms);
    events.into_iter().for_each(|event| fold.apply(event));
    fold.usage
}

/// [`usage`] one event at a time, for a scan of the log too large to hold: events of one
/// partition in order (a query before its outcome), partitions in any order.
#[derive(Debug)]
pub struct UsageFold {
    user: UserId,
    /// The day's and the month's period keys of now.
    now: Vec<String>,
    /// The user's queries seen.
    theirs: HashSet<EventId>,
    /// What is folded so far.
    pub usage: Usage,
}

impl UsageFold {
    /// An empty fold of `user`'s usage in the day and month of `now_ms`.
    pub fn new(user: UserId, now_ms: i64) -> Self {
        Self { user, now: period_keys(now_ms), theirs: HashSet::new(), usage: Usage::default() }
    }

    /// Folds in one event.
    pub fn apply(&mut self, event: &ConversationEvent) {
        match event {
            ConversationEvent::QueryReceived(query) if query.user_id == self.user => {
                self.theirs.insert(query.envelope.event_id);
            }
            ConversationEvent::ResponseGenerated(answer) if self.theirs.contains(&answer.query_event_id) => {
                let used =
                    u64::try_from(i64::from(answer.prompt_tokens) + i64::from(answer.completion_tokens)).unwrap_or(0);
                let at = period_keys(answer.envelope.occurred_at);
                if at[0] == self.now[0] {
                    self.usage.today += used;
                }
                if at[1] == self.now[1] {
                    self.usage.this_month += used;
                }
                *self.usage.by_conversation.entry(answer.envelope.conversation_id).or_default() += used;
            }
            ConversationEvent::ResponseFailed(failed)
                if failed.error_kind == BUDGET_EXCEEDED && self.theirs.contains(&failed.query_event_id) =>
            {
                self.usage.refused.push((failed.query_event_id, failed.error_message.clone()));
            }
            _ => {}
        }
    }
}

/// The day's and the month's period keys of `at_ms`.
fn period_keys(at_ms: i64) -> Vec<String> {
    let all = BudgetLimits { daily: 1, monthly: 1, per_conversation: 1 };
    periods(all, "", at_ms).into_iter().map(|p| p.key).collect()
}

/// (year, month, day) of a count of days since 1970-01-01 (proleptic Gregorian; H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a civil date (the inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let month = i64::from(month);
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_read_as_words_and_zero_is_no_limit() {
        let limits = BudgetLimits { daily: 2200, monthly: 0, per_conversation: 500 };
        assert_eq!(limits.to_string(), "daily 2200 tokens, monthly no limit, per conversation 500 tokens");
        assert_eq!(BudgetLimits::left(901, 2200), Some(1299));
        assert_eq!(BudgetLimits::left(3000, 2200), Some(0));
        assert_eq!(BudgetLimits::left(901, 0), None);
    }
    use crate::event::{Envelope, LLMResponseFailed, LLMResponseGenerated, UserQueryReceived};
    use crate::test_events::P;
    use crate::turn::query_event_id;

    /// Conversation `n` of the test (a fixed id, so the test reads as c1, c2, c3).
    fn c(n: u128) -> ConversationId {
        uuid::Uuid::from_u128(n).into()
    }

    fn envelope(conversation: u128, event_id: EventId, at: i64) -> Envelope {
        let mut envelope = Envelope::new(event_id, c(conversation), 2, P);
        envelope.occurred_at = at;
        envelope
    }

    fn query(conversation: u128, id: &str, user: &str, at: i64) -> ConversationEvent {
        ConversationEvent::QueryReceived(UserQueryReceived {
            sealed_for: String::new(),
            envelope: envelope(conversation, query_event_id(c(conversation), id), at),
            user_id: user.parse().unwrap(),
            client_message_id: id.into(),
            text: "hi".into(),
            no_cache: false,
        })
    }

    fn answer(conversation: u128, query: &str, prompt: i32, completion: i32, at: i64) -> ConversationEvent {
        ConversationEvent::ResponseGenerated(LLMResponseGenerated {
            sealed_for: String::new(),
            envelope: envelope(conversation, EventId::random(), at),
            query_event_id: query_event_id(c(conversation), query),
            text: "ok".into(),
            model: "m".into(),
            finish_reason: "stop".into(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            llm_latency_ms: 1,
            time_to_first_token_ms: None,
            attempts: 1,
            context_event_ids: vec![],
            user_id: None, // as events before schema v2: attributed through the query
            retrieved: vec![],
            context_fingerprint: String::new(),
            cached_from: None,
            prompt: None,
        })
    }

    fn failed(conversation: u128, query: &str, kind: &str, at: i64) -> ConversationEvent {
        ConversationEvent::ResponseFailed(LLMResponseFailed {
            envelope: envelope(conversation, EventId::random(), at),
            query_event_id: query_event_id(c(conversation), query),
            error_kind: kind.into(),
            error_message: "your daily token budget is used up".into(),
            attempts: 0,
        })
    }

    const NOV_28_2026_NOON: i64 = 1_795_867_200_000; // 2026-11-28T12:00:00Z

    #[test]
    fn a_turn_falls_under_its_day_month_and_conversation_with_their_resets() {
        let limits = BudgetLimits { daily: 10, monthly: 100, per_conversation: 5 };
        let periods = periods(limits, "c1", NOV_28_2026_NOON);
        let keys: Vec<&str> = periods.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["day:2026-11-28", "month:2026-11", "conversation:c1"]);
        assert_eq!(periods[0].resets_at_ms, Some(NOV_28_2026_NOON + 12 * 3_600_000));
        assert_eq!(periods[1].resets_at_ms, Some(1_796_083_200_000), "2026-12-01T00:00:00Z");
        assert_eq!(periods[2].resets_at_ms, None);
        let december = super::periods(limits, "c1", 1_798_675_200_000 + 1); // 2026-12-31T00:00:00Z
        assert_eq!(december[1].key, "month:2026-12");
        assert_eq!(december[1].resets_at_ms, Some(1_798_761_600_000), "2027-01-01T00:00:00Z");
        assert!(super::periods(BudgetLimits::default(), "c1", 0).is_empty(), "0 turns a budget off");
    }

    #[test]
    fn civil_dates_round_trip_across_leap_years() {
        for days in [-1, 0, 59, 10_956, 11_016, 20_785, 47_541] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn a_reservation_must_fit_beside_what_is_spent_and_reserved() {
        let limits = BudgetLimits { daily: 1_000, monthly: 0, per_conversation: 0 };
        let periods = periods(limits, "c", NOV_28_2026_NOON);
        let mut committed = HashMap::new();
        assert_eq!(check(&periods, &committed, 1_000), Ok(()));
        committed.insert("day:2026-11-28".to_owned(), 600);
        assert_eq!(check(&periods, &committed, 400), Ok(()));
        let refused = check(&periods, &committed, 401).unwrap_err();
        assert_eq!((refused.kind, refused.committed, refused.limit), (PeriodKind::Day, 600, 1_000));
        assert!(refused.describe().contains("daily token budget"), "{}", refused.describe());
    }

    #[test]
    fn usage_counts_the_users_answers_by_day_month_and_conversation_and_lists_refusals() {
        let yesterday = NOV_28_2026_NOON - DAY_MS;
        let last_month = NOV_28_2026_NOON - 40 * DAY_MS;
        let events = [
            query(1, "q1", "ann", yesterday),
            answer(1, "q1", 100, 20, yesterday),
            query(1, "q2", "ann", NOV_28_2026_NOON),
            answer(1, "q2", 200, 30, NOV_28_2026_NOON),
            query(2, "q3", "ann", last_month),
            answer(2, "q3", 1_000, 0, last_month),
            query(3, "q4", "bob", NOV_28_2026_NOON),
            answer(3, "q4", 5_000, 0, NOV_28_2026_NOON),
            query(1, "q5", "ann", NOV_28_2026_NOON),
            failed(1, "q5", BUDGET_EXCEEDED, NOV_28_2026_NOON),
        ];
        let usage = usage(&events, &"ann".parse().unwrap(), NOV_28_2026_NOON);
        assert_eq!((usage.today, usage.this_month), (230, 350));
        assert_eq!(usage.by_conversation.get(&c(1)), Some(&350));
        assert_eq!(usage.by_conversation.get(&c(2)), Some(&1_000));
        assert_eq!(usage.by_conversation.get(&c(3)), None, "bob's");
        assert_eq!(usage.refused.len(), 1);
        assert_eq!(usage.refused[0].0, query_event_id(c(1), "q5"));
        assert_eq!(month_start_ms(NOV_28_2026_NOON), 1_793_491_200_000, "2026-11-01T00:00:00Z");
    }

    #[test]
    fn settling_replaces_the_reservation_with_the_real_usage() {
        assert_eq!(reservation(10, 2_000), 2_003);
        assert_eq!(settled(5_000, 2_003, 350), 3_347);
        assert_eq!(settled(100, 2_003, 50), 50, "never below what was really used");
    }
}
