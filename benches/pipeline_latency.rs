//! Pipeline overhead: time from sending a query on the WebSocket to receiving its answer,
//! minus the LLM call's own time (`llm_latency_ms` in the answer), against the raw limit
//! measured in the same run: two bare Kafka hops (produce → consume with rdkafka, no
//! processing), since a turn crosses the log twice (query in, answer out); and against the
//! naive reference design (benches/reference/naive_chat.py: one Python process with a
//! WebSocket server and a Kafka client, JSON, no transactions) driven by the same client.
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

/// Per-turn timings (ms) of sequential turns on one socket.
#[derive(Default)]
struct Turns {
    ack: Vec<f64>,
    total: Vec<f64>,
    llm: Vec<f64>,
    overhead: Vec<f64>,
}

/// `turns` sequential question → answer turns (after 5 warm-up turns), timed at the client.
async fn run_turns(client: &mut support::Client, turns: usize) -> Turns {
    let mut timings = Turns::default();
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
        timings.ack.push(acked.unwrap().as_secs_f64() * 1000.0);
        timings.total.push(total);
        timings.llm.push(llm);
        timings.overhead.push(total - llm);
    }
    timings
}

/// The naive reference design (benches/reference/naive_chat.py) on its own topics.
async fn run_reference(pipeline: &support::Pipeline, stack: &support::Stack, turns: usize) -> Turns {
    let python = std::env::var("PARLEY_PYTHON").expect("PARLEY_PYTHON: the venv's python (infra/bench.sh sets it)");
    let port = support::free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/reference/naive_chat.py");
    let log = std::fs::File::create(std::env::temp_dir().join(format!("{}naive.log", pipeline.prefix))).unwrap();
    let mut reference = std::process::Command::new(python)
        .arg(script)
        .args(["--port", &port.to_string(), "--brokers", &stack.brokers, "--llm", &stack.llm])
        .args(["--topic-prefix", &pipeline.prefix, "--max-tokens", "16"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "the naive reference did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut client = pipeline.connect(&format!("http://127.0.0.1:{port}"), "naive").await;
    let timings = run_turns(&mut client, turns).await;
    let _ = reference.kill();
    let _ = reference.wait();
    timings
}

#[tokio::main]
async fn main() {
    let stack = support::stack()
        .expect("set PARLEY_KAFKA_BROKERS, PARLEY_SCHEMA_REGISTRY_URL and PARLEY_LLM_BASE_URL (infra/bench.sh does)");
    let turns: usize = std::env::var("PARLEY_BENCH_TURNS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    // The pipeline alone (no retrieval, no embedder), as the reference design does the job.
    let pipeline = support::Pipeline::start(&stack, &["--llm-max-tokens", "16", "--without-retrieval"]).await;
    let parley = run_turns(&mut pipeline.client().await, turns).await;
    let raw = raw_hops(&stack.brokers, &format!("{}raw-hop", pipeline.prefix), turns).await;
    let naive = run_reference(&pipeline, &stack, turns).await;
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &stack.brokers).create().unwrap();
    let naive_topics = [format!("{}naive-queries", pipeline.prefix), format!("{}naive-answers", pipeline.prefix)];
    let naive_topics: Vec<&str> = naive_topics.iter().map(String::as_str).collect();
    admin.delete_topics(&naive_topics, &AdminOptions::new()).await.unwrap();
    pipeline.stop().await;
    // The default configuration: each question is embedded and searched in Milvus before
    // the LLM call, and the embedder indexes every message beside it.
    let with_retrieval = support::Pipeline::start(&stack, &["--llm-max-tokens", "16"]).await;
    let rag = run_turns(&mut with_retrieval.client().await, turns).await;
    with_retrieval.stop().await;

    println!("| measure (ms) | n | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    summary("Parley: query sent → ack (event durable)", parley.ack);
    summary("Parley: query sent → final answer", parley.total);
    summary("Parley: LLM call (llm_latency_ms)", parley.llm);
    let (overhead_p50, overhead_p99) = summary("Parley: pipeline overhead (answer − LLM)", parley.overhead);
    let (raw_p50, raw_p99) = summary("raw rdkafka hop (produce → consume)", raw);
    summary("naive Python reference: query sent → ack", naive.ack);
    summary("naive Python reference: LLM call", naive.llm);
    let (naive_p50, naive_p99) = summary("naive Python reference: overhead (answer − LLM)", naive.overhead);
    summary("Parley with retrieval: LLM call", rag.llm);
    summary("Parley with retrieval: overhead (answer − LLM)", rag.overhead);
    println!();
    println!(
        "overhead / (2 × raw hop): p50 {:.2}, p99 {:.2}",
        overhead_p50 / (2.0 * raw_p50),
        overhead_p99 / (2.0 * raw_p99)
    );
    println!(
        "Parley overhead / naive reference overhead: p50 {:.2}, p99 {:.2}",
        overhead_p50 / naive_p50,
        overhead_p99 / naive_p99
    );
}
