//! Pipeline overhead: time from sending a query on the WebSocket to receiving its answer,
//! minus the LLM call's own time (`llm_latency_ms` in the answer), against the raw limit
//! measured in the same run: two bare Kafka hops (produce → consume with rdkafka, no
//! processing), since a turn crosses the log twice (query in, answer out), and the raw
//! limit of an answer written exactly once (a bare rdkafka transaction with one record and
//! a consumer offset, until a read_committed consumer has it); and against the
//! naive reference design (benches/reference/naive_chat.py: one Python process with a
//! WebSocket server and a Kafka client, JSON, no transactions) driven by the same client.
//! The same for the first token a person sees: first `token` frame minus the LLM's own
//! time to first token. Then it splits Parley's overhead into its parts, from the turns'
//! spans in Jaeger. Last, the cost of sealing a turn (in-process) and the throughput of
//! erasing a person with 1,000 conversations, against the raw limit: the same partition
//! deletes issued straight to the CQL store at the worker's concurrency.
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
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

fn summary(name: &str, mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let (p50, p99) = (support::percentile(&samples, 50.0), support::percentile(&samples, 99.0));
    println!("| {name} | {} | {p50:.2} | {p99:.2} | {:.2} |", samples.len(), samples[samples.len() - 1]);
    (p50, p99)
}

/// What sealing costs a turn, in-process, the key already in memory as it is after a
/// person's first turn: the question sealed once (gateway) and opened three times
/// (inference, the embedder, the gateway's listener), the answer sealed once (inference)
/// and opened twice (gateway, embedder), each of `deltas` deltas of `delta_chars`
/// characters sealed (inference) and opened (gateway). ms per turn. (The turns above ran
/// sealed: the quick start's master key is on.)
fn sealing_cost(turns: usize, deltas: i32, delta_chars: usize) -> Vec<f64> {
    use parley_events::sealing::{DataKey, delta_field};
    let key = DataKey::generate();
    let question = "How do I rotate the signing key of the gateway without logging everyone out?";
    let delta = "w".repeat(delta_chars);
    let answer = delta.repeat(usize::try_from(deltas).unwrap_or(0));
    (0..turns)
        .map(|_| {
            let (query, outcome): (parley_events::EventId, parley_events::EventId) =
                (uuid::Uuid::new_v4().into(), uuid::Uuid::new_v4().into());
            let started = Instant::now();
            let sealed = key.seal(&query, "text", question);
            for _ in 0..3 {
                assert_eq!(key.open(&query, "text", &sealed).unwrap().len(), question.len());
            }
            for index in 0..deltas {
                let sealed = key.seal(&query, &delta_field(1, index), &delta);
                assert_eq!(key.open(&query, &delta_field(1, index), &sealed).unwrap().len(), delta.len());
            }
            let sealed = key.seal(&outcome, "text", &answer);
            for _ in 0..2 {
                assert_eq!(key.open(&outcome, "text", &sealed).unwrap().len(), answer.len());
            }
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect()
}

/// A new one-partition topic for a raw measure; the admin client deletes it afterwards.
async fn one_partition_topic(brokers: &str, topic: &str) -> AdminClient<DefaultClientContext> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    admin.create_topics(&[NewTopic::new(topic, 1, TopicReplication::Fixed(1))], &AdminOptions::new()).await.unwrap();
    admin
}

/// `consumer` reads `topic`'s one partition from its start.
fn read_from_start(consumer: &StreamConsumer, topic: &str) {
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    consumer.assign(&assignment).unwrap();
}

/// One produce → consume hop of a small record, idempotent producer with acks=all and
/// `linger` ms (the gateway sends with 0; librdkafka's default and the naive design's is 2).
async fn raw_hops(brokers: &str, topic: &str, count: usize, linger: u32) -> Vec<f64> {
    let admin = one_partition_topic(brokers, topic).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", linger.to_string())
        .create()
        .unwrap();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}-reader"))
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    read_from_start(&consumer, topic);
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

/// The raw limit of an answer written exactly once: with bare rdkafka, a transaction that
/// appends one small record and commits a consumer offset with it (Parley's producer
/// settings: idempotent, `linger.ms` 0, `retry.backoff.ms` 10), then a `read_committed`
/// consumer's fetch of it. Per transaction: (its phases as Parley's span records them:
/// begin + append, offsets, commit; then until the reader has the record), in ms.
async fn raw_transactions(brokers: &str, topic: &str, count: usize) -> [Vec<f64>; 4] {
    let admin = one_partition_topic(brokers, topic).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("transactional.id", format!("{topic}-writer"))
        .set("retry.backoff.ms", "10")
        .set("linger.ms", "0")
        .create()
        .unwrap();
    let timeout = Duration::from_secs(10);
    tokio::task::block_in_place(|| producer.init_transactions(timeout)).unwrap();
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}-reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    read_from_start(&reader, topic);
    let group = reader.group_metadata().unwrap();
    let payload = vec![7u8; 200];
    let mut phases: [Vec<f64>; 4] = Default::default();
    for i in 0..count + 10 {
        let started = Instant::now();
        producer.begin_transaction().unwrap();
        producer.send(FutureRecord::to(topic).key("k").payload(&payload), timeout).await.unwrap();
        let appended = started.elapsed();
        let mut offsets = TopicPartitionList::new();
        offsets.add_partition_offset(topic, 0, Offset::Offset(i64::try_from(i).unwrap() + 1)).unwrap();
        tokio::task::block_in_place(|| producer.send_offsets_to_transaction(&offsets, &group, timeout)).unwrap();
        let offsets_sent = started.elapsed();
        tokio::task::block_in_place(|| producer.commit_transaction(timeout)).unwrap();
        let committed = started.elapsed();
        tokio::time::timeout(timeout, reader.recv()).await.unwrap().unwrap();
        let read = started.elapsed();
        if i >= 10 {
            let ms = |from: Duration, to: Duration| (to - from).as_secs_f64() * 1000.0;
            let values = [
                ms(Duration::ZERO, appended),
                ms(appended, offsets_sent),
                ms(offsets_sent, committed),
                ms(committed, read),
            ];
            for (samples, value) in phases.iter_mut().zip(values) {
                samples.push(value);
            }
        }
    }
    admin.delete_topics(&[topic], &AdminOptions::new()).await.unwrap();
    phases
}

/// Per-turn timings (ms) of sequential turns on one socket.
#[derive(Default)]
struct Turns {
    conversation: Option<String>,
    ack: Vec<f64>,
    total: Vec<f64>,
    llm: Vec<f64>,
    overhead: Vec<f64>,
    /// Query sent → first `token` frame, and that minus the LLM's own time to first token
    /// (only a server that streams tokens has them).
    first_token: Vec<f64>,
    first_token_overhead: Vec<f64>,
    /// When each question was sent and its first `token` frame read, in microseconds since
    /// the epoch (the spans' clock): the client's ends of the span breakdown.
    sent_at: Vec<f64>,
    token_at: Vec<Option<f64>>,
}

/// Turns run first and left out of every measure (connections, group joins, caches, and
/// the broker's hot paths: a few turns leave its request handling visibly colder).
const WARM_UP: usize = 50;

/// `turns` sequential question → answer turns (after the warm-up turns), timed at the client.
async fn run_turns(client: &mut support::Client, turns: usize) -> Turns {
    let mut timings = Turns::default();
    let mut conversation: Option<String> = None;
    for i in 0..turns + WARM_UP {
        let (started, sent_at) = (Instant::now(), unix_micros());
        client.ask(&format!("bench-{i}"), conversation.as_deref(), "Say one word.").await;
        let (mut acked, mut first_token, mut token_at) = (None, None, None);
        let answer = loop {
            let frame = client.next_frame().await;
            match frame["type"].as_str() {
                Some("ack") => acked = Some(started.elapsed()),
                Some("token") if first_token.is_none() => {
                    (first_token, token_at) = (Some(started.elapsed()), Some(unix_micros()));
                }
                Some("answer") => break frame,
                Some("failed" | "error") => panic!("turn {i} failed: {frame}"),
                _ => {}
            }
        };
        let total = started.elapsed().as_secs_f64() * 1000.0;
        conversation = answer["conversation_id"].as_str().map(str::to_owned);
        if i < WARM_UP {
            continue;
        }
        let llm = answer["llm_latency_ms"].as_f64().unwrap();
        timings.sent_at.push(sent_at);
        timings.token_at.push(token_at);
        timings.ack.push(acked.unwrap().as_secs_f64() * 1000.0);
        timings.total.push(total);
        timings.llm.push(llm);
        timings.overhead.push(total - llm);
        if let (Some(first_token), Some(llm_first_token)) = (first_token, answer["time_to_first_token_ms"].as_f64()) {
            let first_token = first_token.as_secs_f64() * 1000.0;
            timings.first_token.push(first_token);
            timings.first_token_overhead.push(first_token - llm_first_token);
        }
    }
    timings.conversation = conversation;
    timings
}

fn unix_micros() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64() * 1e6
}

/// Where the overhead goes, from the turns' spans in Jaeger and the client's clock: per
/// part, the milliseconds of each turn (parts missing from a trace are left out).
async fn span_breakdown(jaeger: &str, timed: &Turns) -> Vec<(&'static str, Vec<f64>)> {
    let turns = timed.sent_at.len();
    let url = format!("{}/api/traces", jaeger.trim_end_matches('/'));
    let tags = serde_json::json!({ "conversation_id": timed.conversation.as_deref().unwrap() }).to_string();
    let limit = (turns + WARM_UP).to_string();
    let query = [("service", "parley"), ("operation", "gateway.query"), ("tags", &tags), ("limit", &limit)];
    // Spans arrive in Jaeger in batches: wait until every turn's transaction is there.
    let deadline = Instant::now() + Duration::from_secs(30);
    let traces = loop {
        let found: serde_json::Value =
            reqwest::Client::new().get(&url).query(&query).send().await.unwrap().json().await.unwrap();
        let traces = found["data"].as_array().cloned().unwrap_or_default();
        let complete = traces.iter().filter(|t| span_of(t, "eventlog.transaction").is_some()).count();
        if complete >= turns + WARM_UP || Instant::now() > deadline {
            break traces;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut parts: Vec<(&'static str, Vec<f64>)> = [
        "client sends the question → gateway.query starts",
        "gateway.query: validate, append the query, acks=all",
        "query hop to the inference consumer",
        "inference: query read → model request sent",
        "… inference.seal_key: the asker's data key",
        "… inference.budget: the asker's token budgets",
        "inference.context: earlier turns (kept, else the projection)",
        "inference.retrieve: embed the question, search Milvus",
        "eventlog.transaction: begin + append the answer",
        "… send_offsets_to_transaction",
        "… commit_transaction",
        "first token's hop: inference enqueue → gateway push",
        "gateway pushes the first token → the client reads it",
        "answer's way back: commit → the gateway has it decoded",
        "gateway.outcome: open, apply, send to the socket",
    ]
    .into_iter()
    .map(|name| (name, vec![]))
    .collect();
    let started = |trace: &serde_json::Value| span_of(trace, "gateway.query").and_then(|s| s["startTime"].as_i64());
    let mut traces = traces;
    traces.sort_by_key(|trace| started(trace));
    for trace in traces.iter().skip(WARM_UP) {
        let (Some(query), Some(answer), Some(transaction)) = (
            span_of(trace, "gateway.query"),
            span_of(trace, "inference.answer"),
            span_of(trace, "eventlog.transaction"),
        ) else {
            continue;
        };
        let micros = |span: &serde_json::Value, field: &str| span[field].as_f64().unwrap();
        let field = |span: &serde_json::Value, key: &str| {
            span["tags"].as_array().unwrap().iter().find(|t| t["key"] == key).and_then(|t| t["value"].as_f64())
        };
        let query_end = micros(query, "startTime") + micros(query, "duration");
        // The turn this trace is: the last one sent before its query span began.
        let turn = timed.sent_at.iter().rposition(|sent| *sent <= micros(query, "startTime"));
        let values = [
            turn.map(|turn| (micros(query, "startTime") - timed.sent_at[turn]) / 1000.0),
            Some(micros(query, "duration") / 1000.0),
            Some((micros(answer, "startTime") - query_end) / 1000.0),
            span_of(trace, "inference.llm_attempt")
                .map(|request| (micros(request, "startTime") - micros(answer, "startTime")) / 1000.0),
            span_of(trace, "inference.seal_key").map(|s| micros(s, "duration") / 1000.0),
            span_of(trace, "inference.budget").map(|s| micros(s, "duration") / 1000.0),
            span_of(trace, "inference.context").map(|s| micros(s, "duration") / 1000.0),
            span_of(trace, "inference.retrieve").map(|s| micros(s, "duration") / 1000.0),
            field(transaction, "append_ms"),
            field(transaction, "offsets_ms"),
            field(transaction, "commit_ms"),
            span_of(trace, "inference.first_token")
                .zip(span_of(trace, "gateway.first_token"))
                .map(|(sent, pushed)| (micros(pushed, "startTime") - micros(sent, "startTime")) / 1000.0),
            span_of(trace, "gateway.first_token")
                .zip(turn.and_then(|turn| timed.token_at[turn]))
                .map(|(pushed, read)| (read - micros(pushed, "startTime") - micros(pushed, "duration")) / 1000.0),
            span_of(trace, "gateway.outcome").map(|pushed| {
                (micros(pushed, "startTime") - micros(transaction, "startTime") - micros(transaction, "duration"))
                    / 1000.0
            }),
            span_of(trace, "gateway.outcome").map(|s| micros(s, "duration") / 1000.0),
        ];
        for ((_, samples), value) in parts.iter_mut().zip(values) {
            samples.extend(value);
        }
    }
    parts.retain(|(_, samples)| !samples.is_empty());
    parts
}

fn span_of<'a>(trace: &'a serde_json::Value, operation: &str) -> Option<&'a serde_json::Value> {
    trace["spans"].as_array()?.iter().find(|span| span["operationName"] == operation)
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
    let mut client = support::Client::open(&format!("ws://127.0.0.1:{port}/ws"), false).await;
    let timings = run_turns(&mut client, turns).await;
    let _ = reference.kill();
    let _ = reference.wait();
    timings
}

/// Conversations of the person the erasure benchmark erases.
const ERASED_CONVERSATIONS: usize = 1_000;

/// Erasure throughput: a person with [`ERASED_CONVERSATIONS`] conversations of one turn,
/// projected, erased with `parley erase`; and the raw limit: another person's as many
/// conversations deleted by the same partition deletes straight from a CQL session, 32
/// at a time as the worker does. (The gateway's key store, Milvus and Kafka are the same
/// for one conversation or a thousand: one row, one delete by owner, two records.)
/// Returns (seconds for `parley erase`, the worker's seconds, the raw deletes' seconds).
async fn erasure_throughput(stack: &support::Stack) -> (f64, f64, f64) {
    use futures::StreamExt;

    let pipeline = support::Pipeline::start(stack, &["--without-retrieval"]).await;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (erased, raw) = (format!("erased-{id}"), format!("raw-{id}"));
    let topic = pipeline.events_topic();
    let owner = |c: usize| if c.is_multiple_of(2) { erased.clone() } else { raw.clone() };
    let written =
        support::write_synthetic_of(&stack.brokers, &stack.registry, &topic, 2 * ERASED_CONVERSATIONS, 1, owner).await;
    let session = scylla::client::session_builder::SessionBuilder::new().known_node(&stack.cql).build().await.unwrap();
    let ks = &pipeline.keyspace;
    // Projected: the projector's progress has reached every partition's end.
    let (reader, partitions) = support::reader_from_start(&stack.brokers, &topic, false);
    let ends: Vec<i64> = (0..partitions)
        .map(|p| reader.fetch_watermarks(&topic, i32::try_from(p).unwrap(), Duration::from_secs(10)).unwrap().1)
        .collect();
    support::wait_until("the synthetic conversations projected", || async {
        let cql = format!("SELECT log_partition, next_offset FROM {ks}.progress_g1 WHERE log_topic = ?");
        let rows = session.query_unpaged(cql, (topic.as_str(),)).await.ok()?.into_rows_result().ok()?;
        let applied: Vec<(i32, i64)> = rows.rows::<(i32, i64)>().ok()?.collect::<Result<_, _>>().ok()?;
        ends.iter()
            .enumerate()
            .all(|(p, end)| applied.iter().any(|(q, next)| *q as usize == p && next >= end))
            .then_some(())
    })
    .await;
    for user in [&erased, &raw] {
        let cql = format!("SELECT conversation_id FROM {ks}.conversations_by_user_g1 WHERE user_id = ?");
        let rows = session.query_unpaged(cql, (user.as_str(),)).await.unwrap().into_rows_result().unwrap();
        assert_eq!(rows.rows_num(), ERASED_CONVERSATIONS, "{user}'s conversations are all projected");
    }

    let started = Instant::now();
    let done = pipeline.cli(&["erase", &erased, "--wait", "600s"]);
    let cli_seconds = started.elapsed().as_secs_f64();
    let printed = String::from_utf8_lossy(&done.stdout);
    assert!(done.status.success(), "{printed} {}", String::from_utf8_lossy(&done.stderr));
    let purged = |place: &str| {
        printed.lines().find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some(place)).then(|| words.next().and_then(|n| n.parse::<usize>().ok())).flatten()
        })
    };
    assert_eq!(purged("cql:conversations"), Some(ERASED_CONVERSATIONS), "{printed}");
    let codec = parley_events::EventCodec::new(&stack.registry).unwrap();
    let (consumer, _) = support::reader_from_start(&stack.brokers, &format!("{}erasures", pipeline.prefix), false);
    let (mut requested_at, mut completed_at) = (None, None);
    while completed_at.is_none() {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.unwrap().unwrap();
        use rdkafka::Message;
        match codec.decode_erasure_event(message.payload().unwrap()).await.unwrap().event {
            parley_events::ErasureEvent::Requested(r) => requested_at = Some(r.envelope.occurred_at),
            parley_events::ErasureEvent::Completed(c) => completed_at = Some(c.envelope.occurred_at),
        }
    }
    let worker_seconds = (completed_at.unwrap() - requested_at.unwrap()) as f64 / 1000.0;

    let raw_ids: Vec<uuid::Uuid> = written
        .iter()
        .filter(|(_, events)| matches!(&events[0], parley_events::ConversationEvent::Started(s) if s.user_id.as_str() == raw))
        .map(|(id, _)| id.uuid())
        .collect();
    let mut deletes = Vec::new();
    for table in ["messages", "event_locations", "conversations"] {
        let cql = format!("DELETE FROM {ks}.{table}_g1 WHERE conversation_id = ?");
        deletes.push(session.prepare(cql).await.unwrap());
    }
    let started = Instant::now();
    futures::stream::iter(raw_ids.iter().map(|id| {
        let (deletes, session) = (&deletes, &session);
        async move {
            for delete in deletes {
                session.execute_unpaged(delete, (id,)).await.unwrap();
            }
        }
    }))
    .buffer_unordered(32)
    .collect::<Vec<()>>()
    .await;
    let raw_seconds = started.elapsed().as_secs_f64();
    pipeline.stop().await;
    (cli_seconds, worker_seconds, raw_seconds)
}

#[tokio::main]
async fn main() {
    let stack = support::stack()
        .expect("set PARLEY_KAFKA_BROKERS, PARLEY_SCHEMA_REGISTRY_URL and PARLEY_LLM_BASE_URL (infra/bench.sh does)");
    let age = support::stack_age();
    let turns: usize = std::env::var("PARLEY_BENCH_TURNS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    // The pipeline alone (no retrieval, no embedder), as the reference design does the job.
    let pipeline = support::Pipeline::start(
        &stack,
        &[&["--llm-max-tokens", "16", "--without-retrieval"][..], &support::NO_RATE_LIMITS].concat(),
    )
    .await;
    let parley = run_turns(&mut pipeline.client().await, turns).await;
    let parley_parts = span_breakdown(&stack.jaeger, &parley).await;
    let raw = raw_hops(&stack.brokers, &format!("{}raw-hop", pipeline.prefix), turns, 0).await;
    let raw_lingering = raw_hops(&stack.brokers, &format!("{}raw-hop-2", pipeline.prefix), turns, 2).await;
    let [raw_append, raw_offsets, raw_commit, raw_read] =
        raw_transactions(&stack.brokers, &format!("{}raw-transaction", pipeline.prefix), turns).await;
    let raw_exactly_once: Vec<f64> =
        (0..turns).map(|i| raw_append[i] + raw_offsets[i] + raw_commit[i] + raw_read[i]).collect();
    let naive = run_reference(&pipeline, &stack, turns).await;
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &stack.brokers).create().unwrap();
    let naive_topics = [format!("{}naive-queries", pipeline.prefix), format!("{}naive-answers", pipeline.prefix)];
    let naive_topics: Vec<&str> = naive_topics.iter().map(String::as_str).collect();
    admin.delete_topics(&naive_topics, &AdminOptions::new()).await.unwrap();
    pipeline.stop().await;
    // The default configuration: each question is embedded and searched in Milvus before
    // the LLM call, and the embedder indexes every message beside it.
    let with_retrieval =
        support::Pipeline::start(&stack, &[&["--llm-max-tokens", "16"][..], &support::NO_RATE_LIMITS].concat()).await;
    let rag = run_turns(&mut with_retrieval.client().await, turns).await;
    let rag_parts = span_breakdown(&stack.jaeger, &rag).await;
    with_retrieval.stop().await;
    let (erase_cli, erase_worker, erase_raw) = erasure_throughput(&stack).await;

    println!("{age}");
    println!();
    println!("| measure (ms) | n | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    summary("Parley: query sent → ack (event durable)", parley.ack);
    summary("Parley: query sent → final answer", parley.total);
    summary("Parley: LLM call (llm_latency_ms)", parley.llm);
    let (overhead_p50, overhead_p99) = summary("Parley: pipeline overhead (answer − LLM)", parley.overhead);
    summary("Parley: query sent → first token", parley.first_token);
    let (first_p50, first_p99) =
        summary("Parley: first-token overhead (first token − LLM's first token)", parley.first_token_overhead);
    let (raw_p50, raw_p99) = summary("raw rdkafka hop (produce → consume), linger.ms 0 as the gateway", raw);
    let (lingering_p50, lingering_p99) =
        summary("raw rdkafka hop, linger.ms 2 (librdkafka's default, the naive design's)", raw_lingering);
    summary("raw transaction, bare rdkafka: begin + append one record", raw_append);
    summary("… send_offsets_to_transaction", raw_offsets);
    summary("… commit_transaction", raw_commit);
    summary("… commit → a read_committed consumer has the record", raw_read);
    let (exactly_once_p50, exactly_once_p99) =
        summary("raw exactly-once hop (the four above, per transaction)", raw_exactly_once);
    summary("naive Python reference: query sent → ack", naive.ack);
    summary("naive Python reference: LLM call", naive.llm);
    let (naive_p50, naive_p99) = summary("naive Python reference: overhead (answer − LLM)", naive.overhead);
    summary("Parley with retrieval: LLM call", rag.llm);
    summary("Parley with retrieval: overhead (answer − LLM)", rag.overhead);
    summary("Parley with retrieval: first-token overhead", rag.first_token_overhead);
    summary(
        "sealing: a turn of this bench (question, answer, 16 deltas of 5 characters), in-process",
        sealing_cost(turns, 16, 5),
    );
    summary(
        "sealing: a long turn (question, answer, 512 deltas of 4 characters), in-process",
        sealing_cost(turns, 512, 4),
    );
    println!();
    let per_second = |seconds: f64| ERASED_CONVERSATIONS as f64 / seconds;
    println!("erasing a person with {ERASED_CONVERSATIONS} conversations (one turn each):");
    println!(
        "  `parley erase` (request → completion read back): {erase_cli:.2} s, {:.0} conversations/s",
        per_second(erase_cli)
    );
    println!(
        "  the worker (request → completion, event times): {erase_worker:.2} s, {:.0} conversations/s",
        per_second(erase_worker)
    );
    println!(
        "  raw limit (the 3 partition deletes per conversation, 32 at a time): {erase_raw:.2} s, {:.0} conversations/s",
        per_second(erase_raw)
    );
    println!("  worker / raw: {:.2}× the time", erase_worker / erase_raw);
    println!();
    println!(
        "overhead / (2 × raw hop): p50 {:.2}, p99 {:.2}",
        overhead_p50 / (2.0 * raw_p50),
        overhead_p99 / (2.0 * raw_p99)
    );
    println!(
        "first-token overhead / (2 × raw hop): p50 {:.2}, p99 {:.2}",
        first_p50 / (2.0 * raw_p50),
        first_p99 / (2.0 * raw_p99)
    );
    println!(
        "first-token overhead / (2 × raw hop at linger.ms 2): p50 {:.2}, p99 {:.2}",
        first_p50 / (2.0 * lingering_p50),
        first_p99 / (2.0 * lingering_p99)
    );
    println!(
        "overhead / (raw hop + raw exactly-once hop), the floor with the answer written exactly once: p50 {:.2}, p99 {:.2}",
        overhead_p50 / (raw_p50 + exactly_once_p50),
        overhead_p99 / (raw_p99 + exactly_once_p99)
    );
    println!(
        "Parley overhead / naive reference overhead: p50 {:.2}, p99 {:.2}",
        overhead_p50 / naive_p50,
        overhead_p99 / naive_p99
    );
    for (title, parts) in [("Parley", parley_parts), ("Parley with retrieval", rag_parts)] {
        println!();
        println!("{title}, parts of a turn from its spans in Jaeger:");
        println!("| part (ms) | n | p50 | p99 | max |");
        println!("|---|---|---|---|---|");
        for (name, samples) in parts {
            summary(name, samples);
        }
    }
}
