//! Pipeline overhead: time from sending a query on the WebSocket to receiving its answer,
//! minus the LLM call's own time (`llm_latency_ms` in the answer), against the raw limit
//! measured in the same run: two bare Kafka hops (produce → consume with rdkafka, no
//! processing), since a turn crosses the log twice (query in, answer out).
//!
//! Needs the local stack (infra/stack.sh start; PARLEY_* variables as infra/lib.sh sets).
//! Run: `infra/bench.sh pipeline_latency` (or `cargo bench --bench pipeline_latency`).
//! PARLEY_BENCH_TURNS sets the number of turns (default 200).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

fn summary(name: &str, mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let (p50, p99) = (support::percentile(&samples, 50.0), support::percentile(&samples, 99.0));
    println!("| {name} | {} | {p50:.2} | {p99:.2} | {:.2} |", samples.len(), samples[samples.len() - 1]);
    (p50, p99)
}

/// One produce → consume hop of a small record, idempotent producer with acks=all, as the
/// gateway sends.
async fn raw_hops(brokers: &str, topic: &str, count: usize) -> Vec<f64> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    admin.create_topics(&[NewTopic::new(topic, 1, TopicReplication::Fixed(1))], &AdminOptions::new()).await.unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .create()
        .unwrap();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}-reader"))
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    consumer.assign(&assignment).unwrap();
    let payload = vec![7u8; 200];
    let mut samples = Vec::with_capacity(count);
    for i in 0..count + 10 {
        let started = Instant::now();
        producer.send(FutureRecord::to(topic).key("k").payload(&payload), Duration::from_secs(10)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), consumer.recv()).await.unwrap().unwrap();
        if i >= 10 {
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    admin.delete_topics(&[topic], &AdminOptions::new()).await.unwrap();
    samples
}

#[tokio::main]
async fn main() {
    let stack = support::stack()
        .expect("set PARLEY_KAFKA_BROKERS, PARLEY_SCHEMA_REGISTRY_URL and PARLEY_LLM_BASE_URL (infra/bench.sh does)");
    let turns: usize = std::env::var("PARLEY_BENCH_TURNS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let pipeline = support::Pipeline::start(&stack, &["--llm-max-tokens", "16"]).await;
    let mut client = pipeline.client().await;

    let mut ack_ms = Vec::new();
    let mut total_ms = Vec::new();
    let mut llm_ms = Vec::new();
    let mut overhead_ms = Vec::new();
    let mut conversation: Option<String> = None;
    for i in 0..turns + 5 {
        let started = Instant::now();
        client.ask(&format!("bench-{i}"), conversation.as_deref(), "Say one word.").await;
        let mut acked = None;
        let answer = loop {
            let frame = client.next_frame().await;
            match frame["type"].as_str() {
                Some("ack") => acked = Some(started.elapsed()),
                Some("answer") => break frame,
                Some("failed" | "error") => panic!("turn {i} failed: {frame}"),
                _ => {}
            }
        };
        let total = started.elapsed().as_secs_f64() * 1000.0;
        conversation = answer["conversation_id"].as_str().map(str::to_owned);
        if i < 5 {
            continue; // warm-up
        }
        let llm = answer["llm_latency_ms"].as_f64().unwrap();
        ack_ms.push(acked.unwrap().as_secs_f64() * 1000.0);
        total_ms.push(total);
        llm_ms.push(llm);
        overhead_ms.push(total - llm);
    }
    let raw = raw_hops(&stack.brokers, &format!("{}raw-hop", pipeline.prefix), turns).await;
    pipeline.stop().await;

    println!("| measure (ms) | n | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    summary("query sent → ack (event durable)", ack_ms);
    summary("query sent → final answer", total_ms);
    summary("LLM call (llm_latency_ms)", llm_ms);
    let (overhead_p50, overhead_p99) = summary("pipeline overhead (answer − LLM)", overhead_ms);
    let (raw_p50, raw_p99) = summary("raw rdkafka hop (produce → consume)", raw);
    println!();
    println!(
        "overhead / (2 × raw hop): p50 {:.2}, p99 {:.2}",
        overhead_p50 / (2.0 * raw_p50),
        overhead_p99 / (2.0 * raw_p99)
    );
}
