//! The projection side, measured in one run against the local stack (infra/bench.sh
//! projection): a full rebuild's records/s against a raw rdkafka read of the same records
//! and against the CQL store's own write rate for the rows it writes,
//! replaying one conversation by offset index against a partition scan, and the query
//! path's latency (HTTP through `parley gateway`) for a conversation of 50 turns.
//! PARLEY_BENCH_CONVERSATIONS (default 2000, 11 events each) sets the log size.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use parley_eventlog::KafkaSettings;
use parley_eventlog::topics::ensure_topics;
use parley_events::conversation::{ConversationState, message_of};
use parley_events::lanes::LaneLayout;
use parley_gateway::auth::TokenSigner;
use parley_projections::rebuild::rebuild_context;
use parley_projections::replay::LogReader;
use parley_projections::store::{CONTEXT, EventLocation};
use parley_projections::{CqlSettings, Store};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    support::percentile(&samples, 50.0)
}

/// Reads every record of `topic` with a bare consumer (no decoding): the raw limit.
async fn raw_read(brokers: &str, topic: &str) -> (u64, Duration) {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("raw-{}", uuid::Uuid::new_v4().simple()))
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let partitions: Vec<i32> = metadata.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        assignment.add_partition_offset(topic, *p, Offset::Beginning).unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let started = Instant::now();
    let (mut records, mut at_end) = (0u64, HashSet::new());
    while at_end.len() < partitions.len() {
        match consumer.recv().await {
            Ok(_) => records += 1,
            Err(KafkaError::PartitionEOF(p)) => {
                at_end.insert(p);
            }
            Err(e) => panic!("{e}"),
        }
    }
    (records, started.elapsed())
}

#[tokio::main]
async fn main() {
    let stack = support::stack().expect("the local stack's PARLEY_* variables (infra/bench.sh sets them)");
    let conversations: usize =
        std::env::var("PARLEY_BENCH_CONVERSATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let prefix = format!("bench-{}.", uuid::Uuid::new_v4().simple());
    let keyspace = format!("parley_bench_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let kafka = KafkaSettings {
        brokers: stack.brokers.clone(),
        topic_prefix: prefix.clone(),
        instance_id: None,
        lanes: LaneLayout::default(),
    };
    ensure_topics(&kafka, None).await.unwrap();
    let topic = kafka.topics().events;
    let cql = CqlSettings {
        nodes: stack.cql.clone(),
        keyspace: keyspace.clone(),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
    };

    // As people chat: this many conversations in flight at once, their events interleaved
    // in the log (1: each conversation written whole, the easy case for a rebuild).
    let in_flight: usize = std::env::var("PARLEY_BENCH_IN_FLIGHT").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let owner = |c: usize| format!("user-{}", c % 7);
    let mut written =
        support::write_synthetic_in_flight(&stack.brokers, &stack.registry, &topic, conversations, 5, in_flight, owner)
            .await;
    let long = support::write_synthetic(&stack.brokers, &stack.registry, &topic, 1, 50).await.remove(0);
    written.push(long.clone());
    let total_events: usize = written.iter().map(|(_, e)| e.len()).sum();
    eprintln!("wrote {total_events} events");

    let (raw_records, raw_time) = raw_read(&stack.brokers, &topic).await;
    eprintln!("raw read: {raw_records} records in {raw_time:?}");
    let store = Store::connect(&cql).await.unwrap();
    store.generations(CONTEXT).await.unwrap(); // generation 1, empty: the rebuild fills generation 2
    let report =
        rebuild_context(&kafka, &stack.registry, &store, &CancellationToken::new(), &mut |_, _, _| {}).await.unwrap();
    let raw_rate = raw_records as f64 / raw_time.as_secs_f64();
    eprintln!("rebuild: {} records in {:?}", report.records, report.elapsed);

    // The store's own limit: the rows the rebuild wrote (each event's location, each
    // message, each conversation's row), written straight into a scratch generation the way
    // the rebuild batches them (per conversation, 32 conversations at a time), with no log
    // and no decoding.
    let scratch = report.generation + 100;
    store.create_generation(scratch).await.unwrap();
    let scratch = store.generation(scratch).await.unwrap();
    let store_started = Instant::now();
    let rows = written.iter().map(|(id, events)| {
        let (store, scratch) = (&store, &scratch);
        async move {
            let locations: Vec<EventLocation> = events
                .iter()
                .enumerate()
                .map(|(offset, event)| EventLocation {
                    sequence: event.envelope().sequence,
                    event_id: event.envelope().event_id,
                    event_type: event.type_name().to_owned(),
                    topic: "scratch".into(),
                    partition: 0,
                    offset: offset as i64,
                })
                .collect();
            let messages: Vec<_> = events.iter().filter_map(message_of).collect();
            let state = ConversationState::fold(events.iter()).unwrap();
            store.insert_locations(scratch, *id, &locations).await.unwrap();
            store.insert_messages(scratch, *id, &messages).await.unwrap();
            Box::pin(store.insert_conversation(scratch, *id, &state.head, state.started_at, state.updated_at, "t"))
                .await
                .unwrap();
        }
    });
    futures::stream::iter(rows).buffer_unordered(32).collect::<Vec<()>>().await;
    let store_rate = total_events as f64 / store_started.elapsed().as_secs_f64();
    store.drop_generation(scratch.number).await.unwrap();
    eprintln!("store limit: {store_rate:.0} events/s");

    // A person's audit across the whole log (every record read and decoded): user-3 owns
    // every seventh conversation.
    let audit_started = Instant::now();
    let audit = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["--kafka-brokers", &stack.brokers, "--schema-registry-url", &stack.registry])
        .args(["--topic-prefix", &prefix, "--cql-nodes", &stack.cql, "--cql-keyspace", &keyspace])
        .args(["audit", "--user", "user-3", "--format", "json"])
        .output()
        .unwrap();
    let audit_secs = audit_started.elapsed().as_secs_f64();
    assert!(audit.status.success(), "{}", String::from_utf8_lossy(&audit.stderr));
    let audited =
        String::from_utf8_lossy(&audit.stdout).lines().filter(|l| l.contains(r#""kind":"conversation""#)).count();
    assert_eq!(audited, (0..conversations).filter(|c| c % 7 == 3).count(), "every conversation of user-3");
    eprintln!("audit --user: {audited} conversations in {audit_secs:.1} s");

    // Replay one conversation (the 50-turn one): by the offset index, and by scanning.
    let reader = LogReader::new(&kafka, &stack.registry).unwrap();
    let generation = store.generation(report.generation).await.unwrap();
    let index = store.locations(&generation, long.0).await.unwrap();
    let mut by_index = Vec::new();
    let mut by_scan = Vec::new();
    for _ in 0..5 {
        let (records, _, elapsed) = reader.read(long.0, &index, false).await.unwrap();
        assert_eq!(records.len(), long.1.len());
        by_index.push(elapsed.as_secs_f64() * 1000.0);
        let (records, _, elapsed) = reader.read(long.0, &index, true).await.unwrap();
        assert_eq!(records.len(), long.1.len());
        by_scan.push(elapsed.as_secs_f64() * 1000.0);
    }

    eprintln!("replays done");
    // Query path: GET /api/conversations/{id} of the 50-turn conversation through a gateway.
    let port = support::free_port();
    let args: Vec<String> = [
        "--kafka-brokers",
        &stack.brokers,
        "--schema-registry-url",
        &stack.registry,
        "--topic-prefix",
        &prefix,
        "--cql-nodes",
        &stack.cql,
        "--cql-keyspace",
        &keyspace,
        "gateway",
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let mut gateway = support::spawn(&args, &prefix, "gateway.log");
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/api/conversations/{}", long.0);
    let token = TokenSigner::new(support::AUTH_SECRET.as_bytes()).token_for("user-0");
    support::wait_healthy(&format!("http://127.0.0.1:{port}")).await;
    let mut query_ms = Vec::new();
    for i in 0..220 {
        let started = Instant::now();
        let response = http.get(&url).bearer_auth(&token).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        if i >= 20 {
            query_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        assert_eq!(body["messages"].as_array().unwrap().len(), 100);
    }
    let _ = gateway.kill();
    let _ = gateway.wait();
    query_ms.sort_by(f64::total_cmp);

    println!(
        "log: {total_events} events in {} conversations, {in_flight} in flight at a time ({raw_records} records incl. any \
         markers)",
        written.len()
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!("| raw rdkafka read (no decoding) | {raw_rate:.0} records/s |");
    println!(
        "| full rebuild into a new generation | {:.0} records/s ({} records in {:.2} s) |",
        report.records_per_second(),
        report.records,
        report.elapsed.as_secs_f64()
    );
    println!("| rebuild / raw | {:.3} |", report.records_per_second() / raw_rate);
    println!("| the store's limit: the same rows written straight (no log, no decoding) | {store_rate:.0} events/s |");
    println!("| rebuild / the store's limit | {:.3} |", report.records_per_second() / store_rate);
    println!(
        "| `parley audit --user` over the whole log (one person's {audited} conversations) | {:.0} records/s ({audit_secs:.1} s, the command's start included) |",
        raw_records as f64 / audit_secs
    );
    println!("| replay 50-turn conversation, offset index (median of 5) | {:.1} ms |", median(by_index.clone()));
    println!("| replay 50-turn conversation, partition scan (median of 5) | {:.1} ms |", median(by_scan.clone()));
    println!(
        "| query path GET 50-turn conversation, p50 / p99 (n={}) | {:.2} / {:.2} ms |",
        query_ms.len(),
        support::percentile(&query_ms, 50.0),
        support::percentile(&query_ms, 99.0)
    );

    support::drop_keyspace(&stack.cql, &keyspace).await;
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &stack.brokers).create().unwrap();
    let topics = ["conversation-events", "conversation-tokens", "dead-letter"].map(|t| format!("{prefix}{t}"));
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&names, &rdkafka::admin::AdminOptions::new()).await;
}
