//! `parley audit --user`: one person's trail through the log (conversations, budget
//! refusals, documents, tier and budget changes, dead letters, erasures) with positions, and the budgets and tier
//! the CQL store holds for them now: for a support or compliance request. Structure only,
//! never content.

use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result};
use parley_eventlog::dead_letter::read_book;
use parley_events::trail::{Fact, UserTrail};
use parley_events::{AccountChanged, EventCodec, UserId};
use parley_projections::Store;
use parley_projections::budget::BudgetLedger;
use parley_projections::tiers::TierBook;

use crate::cli::Common;
use crate::commands::{report_undecodable, scan_decoded as scan};

/// `parley audit --user`.
pub(crate) async fn audit_user(common: &Common, user: UserId, since: Option<i64>, format: String) -> Result<ExitCode> {
    let kafka = &common.kafka;
    let topics = kafka.topics();
    let codec = EventCodec::new(common.schema_registry_url.as_str())?;
    let mut trail = UserTrail::default();
    let mut undecodable = 0u64;
    let mut read = scan(
        kafka,
        &topics.events,
        since,
        &mut undecodable,
        async |bytes| codec.decode_conversation_event(bytes).await,
        |event, place| trail.conversation_event(&user, &event, place),
    )
    .await
    .context("reading the events topic")?;
    read += scan(
        kafka,
        &topics.documents,
        since,
        &mut undecodable,
        async |bytes| codec.decode_document_event(bytes).await,
        |event, place| trail.document_event(&user, &event, place),
    )
    .await
    .context("reading the documents topic")?;
    read += scan(
        kafka,
        &topics.erasures,
        since,
        &mut undecodable,
        async |bytes| codec.decode_erasure_event(bytes).await,
        |event, place| trail.erasure_event(&user, &event, place),
    )
    .await
    .context("reading the erasures topic")?;
    read += scan(
        kafka,
        &topics.accounts,
        since,
        &mut undecodable,
        async |bytes| codec.decode::<AccountChanged>(bytes).await,
        |change, place| trail.account_event(&user, &change, place),
    )
    .await
    .context("reading the accounts topic")?;
    let (book, unreadable_letters) = read_book(kafka, &codec).await.context("reading the dead letters")?;
    trail.dead_letters(book.entries(), &trail.document_ids());

    let store = Store::connect(&common.cql).await.context("connecting to the CQL store")?;
    let ledger = BudgetLedger::open(&store).await?;
    let limits = ledger.limits_of(&user, &common.budgets).await?;
    let own_limits = ledger.has_own_limits(&user).await?;
    let tier = TierBook::open(&store).await?.tier_of(&user).await?;

    if format == "json" {
        println!(
            "{}",
            serde_json::json!({"kind": "account", "user_id": user, "tier": tier.as_str(),
                "budgets": {"daily": limits.daily, "monthly": limits.monthly, "per_conversation": limits.per_conversation,
                    "source": if own_limits { "own" } else { "default" }},
                "records_read": read, "since": since})
        );
        for summary in &trail.conversations {
            let mut line = serde_json::to_value(summary)?;
            line["kind"] = "conversation".into();
            println!("{line}");
        }
        trail.facts.iter().try_for_each(|fact| serde_json::to_string(fact).map(|line| println!("{line}")))?;
    } else {
        print_trail(&user, &trail, since, read);
        let source = if own_limits { "their own" } else { "the defaults" };
        println!("now: tier {tier}; budgets {limits} ({source})");
    }
    report_undecodable(undecodable + unreadable_letters.len() as u64);
    Ok(ExitCode::SUCCESS)
}

fn time(ms: i64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))).to_string()
}

fn print_trail(user: &UserId, trail: &UserTrail, since: Option<i64>, read: u64) {
    let window = since.map_or_else(|| "the whole log".to_owned(), |since| format!("the log since {}", time(since)));
    println!("{user} in {window} ({read} records read; content is never shown)");
    println!("conversations ({}):", trail.conversations.len());
    for c in &trail.conversations {
        let began = if c.started_in_window { "started" } else { "first seen" };
        println!(
            "  {} {began} {} at {}, last {} at {}",
            c.conversation_id,
            time(c.first.at),
            c.first.position,
            time(c.last.at),
            c.last.position
        );
        println!(
            "      {} events: {} questions, {} answers ({} from the cache), {} failed, {} cancels; {}+{} tokens",
            c.events,
            c.questions,
            c.answers,
            c.cached_answers,
            c.failures,
            c.cancels,
            c.prompt_tokens,
            c.completion_tokens
        );
    }
    for fact in &trail.facts {
        match fact {
            Fact::BudgetRefusal { conversation_id, query_event_id, place } => println!(
                "budget refused question {query_event_id} of {conversation_id} at {} ({})",
                time(place.at),
                place.position
            ),
            Fact::DocumentSubmitted { document_id, media_type, place } => {
                println!("document {document_id} ({media_type}) submitted {} at {}", time(place.at), place.position);
            }
            Fact::DocumentDeleted { document_id, place } => {
                println!("document {document_id} deleted {} at {}", time(place.at), place.position);
            }
            Fact::DeadLetter { letter, consumer, source, status, error } => {
                println!("dead letter {letter} of {consumer}: {source} could not be read ({error}); {status}");
            }
            Fact::AccountChanged { changed_by, tier, budgets, place } => {
                let mut what = Vec::new();
                what.extend(tier.as_ref().map(|tier| format!("tier {tier}")));
                what.extend(budgets.map(|b| {
                    format!(
                        "budgets daily {}, monthly {}, per conversation {} (0: no limit)",
                        b.daily, b.monthly, b.per_conversation
                    )
                }));
                println!("{changed_by} set {} {} at {}", what.join(" and "), time(place.at), place.position);
            }
            Fact::ErasureRequested { requested_by, place } => {
                println!("erasure requested by {requested_by} {} at {}", time(place.at), place.position);
            }
            Fact::ErasureCompleted { key_erased_at, purged, place } => {
                let purged: Vec<String> = purged.iter().map(|(where_, items)| format!("{where_} {items}")).collect();
                println!(
                    "erasure completed {} at {}: data key destroyed {}; purged {}",
                    time(place.at),
                    place.position,
                    time(*key_erased_at),
                    purged.join(", ")
                );
            }
        }
    }
}
