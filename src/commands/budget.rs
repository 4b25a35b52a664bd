//! A user's standing: `parley usage` (token spend from the log against the budgets
//! enforced), `parley budget` (their own budgets), `parley tier` (their lane).

use std::process::ExitCode;

use anyhow::{Context, Result};
use std::sync::Arc;

use parley_eventlog::EventProducer;
use parley_events::budget::{self, BudgetLimits, UsageFold};
use parley_events::lanes::Lane;
use parley_events::{AccountChanged, Budgets, Envelope, EventCodec, EventId, Producer, UserId};
use parley_projections::Store;
use parley_projections::budget::BudgetLedger;
use parley_projections::tiers::TierBook;

use crate::cli::Common;
use crate::commands::{report_undecodable, scan_decoded};

/// `parley tier`.
pub(crate) async fn tier(common: &Common, user: UserId, tier: Option<Lane>) -> Result<ExitCode> {
    let kafka = &common.kafka;
    let cql = &common.cql;
    let store = Store::connect(cql).await.context("connecting to the CQL store")?;
    let tiers = TierBook::open(&store).await?;
    if let Some(tier) = tier {
        record_change(common, &user, Some(tier.as_str().to_owned()), None).await?;
        tiers.set(&user, tier).await?;
    }
    let tier = tiers.tier_of(&user).await?;
    println!("{user}: {tier} (new conversations; lanes: {})", kafka.lanes);
    Ok(ExitCode::SUCCESS)
}

/// Appends the change to the `accounts` topic before it is applied: every change asked is
/// on record (`parley audit --user`), even one the store then refuses.
async fn record_change(common: &Common, user: &UserId, tier: Option<String>, budgets: Option<Budgets>) -> Result<()> {
    const SOURCE: Producer = Producer { name: "parley-cli", version: env!("CARGO_PKG_VERSION") };
    let change = AccountChanged {
        envelope: Envelope::new(EventId::random(), user.account_stream(), 1, SOURCE),
        user_id: user.clone(),
        changed_by: "operator".into(),
        tier,
        budgets,
    };
    let codec = Arc::new(EventCodec::new(common.schema_registry_url.as_str())?);
    let producer = EventProducer::new(common.kafka.client_config(), codec)?;
    producer
        .append(&common.kafka.topics().accounts, user.as_str(), &change, None)
        .await
        .context("recording the change on the accounts topic (nothing was changed)")?;
    Ok(())
}

/// `parley usage`.
pub(crate) async fn usage(common: &Common, user: UserId, format: String) -> Result<ExitCode> {
    let kafka = &common.kafka;
    let cql = &common.cql;
    let registry = common.schema_registry_url.as_str();
    let budgets = common.budgets;
    let now = parley_events::event::now_millis();
    let codec = EventCodec::new(registry)?;
    let mut fold = UsageFold::new(user.clone(), now);
    let mut undecodable = 0;
    let read = scan_decoded(
        kafka,
        &kafka.topics().events,
        Some(budget::month_start_ms(now)),
        &mut undecodable,
        async |bytes| codec.decode_conversation_event(bytes).await,
        |event, _| fold.apply(&event),
    )
    .await
    .context("reading the events topic")?;
    let usage = fold.usage;
    let store = Store::connect(cql).await.context("connecting to the CQL store")?;
    let ledger = BudgetLedger::open(&store).await?;
    let limits = ledger.limits_of(&user, &budgets).await?;
    let source = if ledger.has_own_limits(&user).await? { "own" } else { "default" };
    print_usage(&user, &usage, limits, source, read, &format)?;
    report_undecodable(undecodable);
    Ok(ExitCode::SUCCESS)
}

/// `parley budget`.
pub(crate) async fn budget(
    common: &Common,
    user: UserId,
    daily: Option<u64>,
    monthly: Option<u64>,
    conversation: Option<u64>,
) -> Result<ExitCode> {
    let cql = &common.cql;
    let budgets = common.budgets;
    let store = Store::connect(cql).await.context("connecting to the CQL store")?;
    let ledger = BudgetLedger::open(&store).await?;
    let current = ledger.limits_of(&user, &budgets).await?;
    let limits = BudgetLimits {
        daily: daily.unwrap_or(current.daily),
        monthly: monthly.unwrap_or(current.monthly),
        per_conversation: conversation.unwrap_or(current.per_conversation),
    };
    let own = |limit: u64| i64::try_from(limit).unwrap_or(i64::MAX);
    let budgets = Budgets {
        daily: own(limits.daily),
        monthly: own(limits.monthly),
        per_conversation: own(limits.per_conversation),
    };
    record_change(common, &user, None, Some(budgets)).await?;
    ledger.set_limits(&user, limits).await?;
    println!(
        "budgets of {user}, their own from now on: {limits}; the gateways and inference enforce them within {} s",
        parley_projections::budget::OWN_LIMITS_TTL.as_secs()
    );
    Ok(ExitCode::SUCCESS)
}

/// `parley usage`: each period's spend against the budget enforced for the user (`source`:
/// their own, or the defaults this command was given), as text or one JSON object.
pub(crate) fn print_usage(
    user: &UserId,
    usage: &budget::Usage,
    limits: BudgetLimits,
    source: &str,
    events_read: u64,
    format: &str,
) -> Result<()> {
    let row = |spent: u64, limit: u64| {
        serde_json::json!({"spent": spent, "budget": (limit > 0).then_some(limit),
            "left": BudgetLimits::left(spent, limit), "budget_source": source})
    };
    if format == "json" {
        let conversations: Vec<_> = usage
            .by_conversation
            .iter()
            .map(|(id, spent)| {
                let mut line = row(*spent, limits.per_conversation);
                line["conversation_id"] = serde_json::json!(id);
                line
            })
            .collect();
        let refused: Vec<_> = usage
            .refused
            .iter()
            .map(|(query, why)| serde_json::json!({"query_event_id": query, "reason": why}))
            .collect();
        let report = serde_json::json!({"user": user, "events_read": events_read,
            "today": row(usage.today, limits.daily), "this_month": row(usage.this_month, limits.monthly),
            "conversations": conversations, "refused_by_inference": refused});
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("{user}: model tokens spent this month, from the log ({events_read} events read); budgets: {source}");
    println!("  {:<50} {:>10} {:>10} {:>10}", "period", "spent", "budget", "left");
    let line = |what: &str, spent: u64, limit: u64| {
        let (budget, left) = match BudgetLimits::left(spent, limit) {
            Some(left) => (limit.to_string(), left.to_string()),
            None => ("no limit".to_owned(), "-".to_owned()),
        };
        println!("  {what:<50} {spent:>10} {budget:>10} {left:>10}");
    };
    line("today (UTC)", usage.today, limits.daily);
    line("this month (UTC)", usage.this_month, limits.monthly);
    for (conversation, spent) in &usage.by_conversation {
        line(&format!("conversation {conversation}"), *spent, limits.per_conversation);
    }
    for (query, why) in &usage.refused {
        println!("  refused by inference: query {query}: {why}");
    }
    Ok(())
}
