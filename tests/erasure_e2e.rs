//! The right to erasure on the real stack. A person writes a question and a document that
//! hold a canary: before erasure the canary is nowhere in clear where an operator with disk
//! access would look (Kafka's segment files, the CQL store's data files after a flush,
//! Jaeger's traces, the service logs); after `DELETE /api/me` it cannot be read through
//! the chat API, the query API, replay, audit, a raw consumer, a Milvus search or the
//! cache, their wrapped data key is gone from the CQL store's files after a compaction,
//! while another person's data, written at the same time, is intact. An erasure asked
//! while the worker is down, over a half-done one, is finished when the worker returns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use parley_events::ConversationEvent;
use parley_events::sealing::{ERASED, is_sealed};
use parley_projections::keys::SubjectKey;
use parley_retrieval::{SearchFilter, VectorStore};
use rdkafka::Message;
use serde_json::{Value, json};
use support::{Pipeline, stack};

/// Where the local stack keeps its files and tools (infra/lib.sh exports them); None when
/// the stack is not this machine's (the test is then skipped, unless the stack is required).
struct StackFiles {
    run: PathBuf,
    kafka_libs: String,
    cassandra_libs: String,
    jmx_port: String,
    jvm_options: Vec<String>,
}

impl StackFiles {
    fn find() -> Option<Self> {
        let var = |name: &str| std::env::var(name).ok();
        match (
            var("PARLEY_RUN"),
            var("PARLEY_KAFKA_LIBS"),
            var("PARLEY_CASSANDRA_LIBS"),
            var("PARLEY_CASSANDRA_JMX_PORT"),
        ) {
            (Some(run), Some(kafka), Some(cassandra), Some(jmx)) => {
                let options = std::fs::read_to_string(
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/cassandra/jvm17.options"),
                )
                .unwrap();
                Some(Self {
                    run: PathBuf::from(run),
                    kafka_libs: format!("{kafka}/*"),
                    cassandra_libs: format!("{cassandra}/*"),
                    jmx_port: jmx,
                    jvm_options: options
                        .lines()
                        .filter(|l| !l.starts_with('#'))
                        .flat_map(str::split_whitespace)
                        .map(str::to_owned)
                        .collect(),
                })
            }
            _ if std::env::var("PARLEY_REQUIRE_STACK").is_ok_and(|v| v == "1") => {
                panic!("PARLEY_REQUIRE_STACK=1 but PARLEY_RUN/PARLEY_KAFKA_LIBS/PARLEY_CASSANDRA_LIBS are not set")
            }
            _ => None,
        }
    }

    /// Every record of this test's topics, as Kafka's own DumpLogSegments prints them
    /// (batches decompressed, keys and payloads as text).
    fn kafka_segments(&self, prefix: &str) -> String {
        let mut files = Vec::new();
        for data in std::fs::read_dir(&self.run).unwrap().flatten() {
            let name = data.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("kafka") && name.ends_with("-data")) {
                continue;
            }
            for partition in std::fs::read_dir(data.path()).unwrap().flatten() {
                if partition.file_name().to_string_lossy().starts_with(prefix) {
                    for file in std::fs::read_dir(partition.path()).unwrap().flatten() {
                        if file.path().extension().is_some_and(|e| e == "log") {
                            files.push(file.path().display().to_string());
                        }
                    }
                }
            }
        }
        assert!(!files.is_empty(), "no segment files of {prefix}* under {}", self.run.display());
        let args = ["--files", &files.join(","), "--print-data-log"];
        self.java(&self.kafka_libs, &[], "org.apache.kafka.tools.DumpLogSegments", &args)
    }

    /// Flushes `keyspace`'s memtables to disk, then every row of its data files as
    /// sstabledump prints them.
    fn cql_data_files(&self, keyspace: &str) -> String {
        self.nodetool(&["flush", keyspace]);
        let mut dump = String::new();
        let config = format!("-Dcassandra.config=file://{}", self.run.join("cassandra.yaml").display());
        let storage = format!("-Dcassandra.storagedir={}", self.run.join("cassandra-data").display());
        for table in std::fs::read_dir(self.run.join("cassandra-data/data").join(keyspace)).unwrap().flatten() {
            for file in std::fs::read_dir(table.path()).unwrap().flatten() {
                let path = file.path().display().to_string();
                if path.ends_with("-Data.db") {
                    let class = "org.apache.cassandra.tools.SSTableExport";
                    dump.push_str(&self.java(&self.cassandra_libs, &[&config, &storage], class, &[&path]));
                }
            }
        }
        dump
    }

    fn nodetool(&self, args: &[&str]) {
        let mut all = vec!["-h", "127.0.0.1", "-p", &self.jmx_port];
        all.extend_from_slice(args);
        self.java(&self.cassandra_libs, &[], "org.apache.cassandra.tools.NodeTool", &all);
    }

    fn java(&self, classpath: &str, properties: &[&str], class: &str, args: &[&str]) -> String {
        let logback = Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/cassandra/logback.xml");
        let output = Command::new("java")
            .args(&self.jvm_options)
            .arg(format!("-Dlogback.configurationFile={}", logback.display()))
            .arg(format!("-Dcassandra.logdir={}", std::env::temp_dir().display()))
            .args(properties)
            .args(["-cp", classpath, class])
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "{class} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// Every span of the traces `trace_ids`, as Jaeger's query API returns them.
async fn traces(jaeger: &str, trace_ids: &[String]) -> String {
    let mut all = String::new();
    for id in trace_ids {
        let body: Value = reqwest::get(format!("{jaeger}/api/traces/{id}")).await.unwrap().json().await.unwrap();
        all.push_str(&body.to_string());
    }
    all
}

/// The W3C trace id of a `traceparent`.
fn trace_id(traceparent: &str) -> String {
    traceparent.split('-').nth(1).unwrap().to_owned()
}

/// The raw records of `topic` keyed `key`, up to the topic's end.
async fn raw_records(brokers: &str, topic: &str, key: &str) -> Vec<Vec<u8>> {
    let (consumer, mut open) = support::reader_from_start(brokers, topic, true);
    let mut records = Vec::new();
    while open > 0 {
        match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.unwrap() {
            Ok(message) if message.key() == Some(key.as_bytes()) => records.push(message.payload().unwrap().to_vec()),
            Ok(_) => {}
            Err(rdkafka::error::KafkaError::PartitionEOF(_)) => open -= 1,
            Err(error) => panic!("{error}"),
        }
    }
    records
}

/// Whether sstabledump's `dump` holds a live `wrapped` cell in `subject`'s partition.
fn holds_wrapped_key(dump: &str, subject: &str) -> bool {
    dump.split(&format!("\"key\" : [ \"{subject}\" ]"))
        .skip(1)
        .any(|rest| rest.split("\"partition\"").next().unwrap_or_default().contains("\"name\" : \"wrapped\""))
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// One person's turn and document, both holding `canary`: (conversation id, document id).
async fn write_with_canary(pipeline: &Pipeline, token: &str, canary: &str) -> (String, String) {
    let text = format!("The vault code word is {canary}. Keep {canary} secret.");
    let (status, submitted) =
        pipeline.post("/api/documents", token, &json!({"title": format!("{canary}.txt"), "text": text})).await;
    assert_eq!(status, 202, "{submitted}");
    let document = submitted["document_id"].as_str().unwrap().to_owned();
    pipeline.search_until(token, canary, |hit| hit["source_id"] == document.as_str()).await;
    let mut client = pipeline.connect(&pipeline.http, token).await;
    client.ask("q1", None, &format!("What is the vault code word? Is it {canary}?")).await;
    let frames = client.until_outcome().await;
    let outcome = frames.last().unwrap();
    assert_eq!(outcome["type"], "answer", "{frames:?}");
    (outcome["conversation_id"].as_str().unwrap().to_owned(), document)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_erased_person_leaves_nothing_readable_and_nobody_else_loses_anything() {
    let Some(stack) = stack() else { return };
    let Some(files) = StackFiles::find() else { return };
    if std::env::var("PARLEY_MASTER_KEY_FILE").is_err() {
        return;
    }
    let keyspace = format!("parley_erasure_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let pipeline = Pipeline::start_in(&stack, &keyspace, &[]).await;
    let (alice, alice_token) = pipeline.session_user().await;
    let (bob, bob_token) = pipeline.session_user().await;
    let canary = format!("canary{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let bobs_canary = format!("canary{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let ((conversation, document), (bobs_conversation, bobs_document)) = tokio::join!(
        write_with_canary(&pipeline, &alice_token, &canary),
        write_with_canary(&pipeline, &bob_token, &bobs_canary)
    );
    pipeline.conversation_when(&alice_token, &conversation, 2).await;
    pipeline.conversation_when(&bob_token, &bobs_conversation, 2).await;

    // Before erasure: nothing in clear where an operator with disk access would look.
    let segments = files.kafka_segments(&pipeline.prefix);
    assert!(segments.contains(&conversation), "the dump shows the records (their keys in clear)");
    assert!(!segments.contains(&canary), "the canary is in a Kafka segment file in clear");
    let rows = files.cql_data_files(&keyspace);
    assert!(rows.contains(&conversation), "the dump shows the projection's rows (their keys in clear)");
    assert!(!rows.contains(&canary), "the canary is in a CQL data file in clear");
    assert!(holds_wrapped_key(&rows, &alice), "her wrapped data key is in the data files (the dump reads them)");
    let events =
        support::log_events(&stack.brokers, &stack.registry, &pipeline.events_topic(), Some(&conversation), 3).await;
    let ConversationEvent::QueryReceived(sealed) = &events[1].0 else { panic!("{events:?}") };
    assert!(is_sealed(&sealed.text), "{sealed:?}");
    let trace_ids: Vec<String> = events.iter().filter_map(|(_, tp)| tp.as_deref()).map(trace_id).collect();
    let spans = traces(&stack.jaeger, &trace_ids).await;
    assert!(spans.contains(&conversation), "the turn's traces are in Jaeger: {}", &spans[..spans.len().min(300)]);
    assert!(!spans.contains(&canary), "the canary is in a trace");
    let mut logs = vec![PathBuf::from(pipeline.log_path())];
    logs.extend(std::fs::read_dir(files.run.join("logs")).unwrap().flatten().map(|f| f.path()));
    for log in &logs {
        let text = std::fs::read(log).unwrap();
        assert!(!contains(&text, &canary), "the canary is in {} in clear", log.display());
    }
    let session = scylla::client::session_builder::SessionBuilder::new().known_node(&stack.cql).build().await.unwrap();
    let cached_before = cached_answers(&session, &keyspace, &alice).await;

    // Alice erases herself.
    let asked = Instant::now();
    let (status, erased) = pipeline.delete("/api/me", &alice_token).await;
    eprintln!("DELETE /api/me answered in {:.0} ms: {erased}", asked.elapsed().as_secs_f64() * 1000.0);
    assert_eq!((status, erased["status"].as_str()), (200, Some("completed")), "{erased}");
    let purged = &erased["purged"];
    assert_eq!(purged["cql:conversations"], 1, "{erased}");
    assert!(purged["cql:messages"].as_i64().unwrap() >= 2, "question and answer: {erased}");
    assert!(purged["milvus:vectors"].as_i64().unwrap() >= 3, "the document's chunk and both messages: {erased}");
    assert_eq!(purged["cql:answer_cache"], cached_before, "{erased}");

    // The chat API: she is told she was erased; nothing of hers is served.
    let mut client = pipeline.connect(&pipeline.http, &alice_token).await;
    client.ask("q2", Some(&conversation), "Are you still there?").await;
    let refused = client.reply_to("q2").await;
    assert_eq!((refused["type"].as_str(), refused["code"].as_str()), (Some("error"), Some("erased")), "{refused}");
    // The query API: no conversation, no list, no document, no search hit, no cached answer.
    let (status, _) = pipeline.get(&format!("/api/conversations/{conversation}"), &alice_token).await;
    assert_eq!(status, 404);
    let (_, list) = pipeline.get("/api/conversations", &alice_token).await;
    assert_eq!(list["conversations"], json!([]), "{list}");
    let (_, documents) = pipeline.get("/api/documents", &alice_token).await;
    assert_eq!(documents["documents"], json!([]), "{documents}");
    let (_, found) = pipeline.get(&format!("/api/search?q={canary}&k=10"), &alice_token).await;
    assert_eq!(found["hits"], json!([]), "{found}");
    assert_eq!(cached_answers(&session, &keyspace, &alice).await, 0);
    // Milvus itself, by owner and by text.
    let vectors = VectorStore::open(&pipeline.milvus(), 384, "all-MiniLM-L6-v2").await.unwrap();
    assert_eq!(vectors.count(&SearchFilter::owner(alice.parse().unwrap())).await.unwrap(), 0);
    let by_text =
        vectors.search_keywords(&canary, None, &SearchFilter::owner(alice.parse().unwrap()), 10).await.unwrap();
    assert!(by_text.is_empty(), "{by_text:?}");
    // Replay and audit run, show the structure, the content marked erased, invariants hold.
    let replay = pipeline.cli(&["replay", &conversation]);
    let printed = String::from_utf8_lossy(&replay.stdout);
    assert!(replay.status.success(), "{printed} {}", String::from_utf8_lossy(&replay.stderr));
    assert!(!printed.contains(&canary) && printed.contains(ERASED), "{printed}");
    assert!(printed.contains("invariants: hold") && printed.contains("owner erased at"), "{printed}");
    let prompts = pipeline.cli(&["replay", &conversation, "--prompts"]);
    let printed = String::from_utf8_lossy(&prompts.stdout);
    assert!(prompts.status.success(), "{printed} {}", String::from_utf8_lossy(&prompts.stderr));
    assert!(printed.contains("cannot be rebuilt exactly") && !printed.contains(&canary), "{printed}");
    let audit = pipeline.cli(&["audit", &conversation]);
    let printed = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.status.success(), "{printed} {}", String::from_utf8_lossy(&audit.stderr));
    assert!(printed.contains("UserQueryReceived") && !printed.contains(&canary), "{printed}");
    // Her trail, for the compliance record: the conversation, the document, the erasure.
    let trail = pipeline.cli(&["audit", "--user", &alice]);
    let printed = String::from_utf8_lossy(&trail.stdout);
    assert!(trail.status.success(), "{printed} {}", String::from_utf8_lossy(&trail.stderr));
    assert!(printed.contains(&conversation) && printed.contains(&format!("document {document}")), "{printed}");
    assert!(printed.contains("erasure requested by self") && printed.contains("erasure completed"), "{printed}");
    assert!(!printed.contains(&canary) && !printed.contains(&bobs_conversation), "{printed}");
    // A raw consumer: sealed bytes whose key is gone; the key store says erased.
    for topic in [pipeline.events_topic(), format!("{}documents", pipeline.prefix)] {
        let key = if topic.ends_with("documents") { &document } else { &conversation };
        let records = raw_records(&stack.brokers, &topic, key).await;
        assert!(!records.is_empty() && records.iter().all(|r| !contains(r, &canary)), "{topic}");
    }
    let keys = pipeline.keys().await.unwrap();
    assert!(matches!(keys.key(&alice).await.unwrap(), SubjectKey::Erased(_)));
    let opened = pipeline.opened(events.into_iter().map(|(e, _)| e).collect()).await;
    let ConversationEvent::QueryReceived(query) = &opened[1] else { panic!("{opened:?}") };
    assert_eq!(query.text, ERASED);
    // Her wrapped key is gone from the CQL store's files once they are compacted.
    files.nodetool(&["flush", &keyspace, "data_keys"]);
    files.nodetool(&["compact", &keyspace, "data_keys"]);
    assert!(!holds_wrapped_key(&files.cql_data_files(&keyspace), &alice), "her wrapped key is still in a data file");
    // Erasing again is harmless, and finds nothing more.
    let again = pipeline.cli(&["erase", &alice, "--reason", "ticket-42"]);
    let printed = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success(), "{printed} {}", String::from_utf8_lossy(&again.stderr));
    assert!(printed.contains("cql:messages") && printed.contains(" 0 purged"), "{printed}");

    // Bob, who wrote at the same time, keeps everything.
    let body = pipeline.conversation_when(&bob_token, &bobs_conversation, 2).await;
    assert!(body["messages"][0]["text"].as_str().unwrap().contains(&bobs_canary), "{body}");
    pipeline.search_until(&bob_token, &bobs_canary, |hit| hit["source_id"] == bobs_document.as_str()).await;
    assert!(matches!(keys.key(&bob).await.unwrap(), SubjectKey::Live(_)));
    pipeline.stop().await;
    support::drop_keyspace(&stack.cql, &keyspace).await;
}

async fn cached_answers(session: &scylla::client::session::Session, keyspace: &str, user: &str) -> i64 {
    let cql = format!("SELECT query_event_id FROM {keyspace}.answer_cache_g1 WHERE user_id = ?");
    let rows = session.query_unpaged(cql, (user,)).await.unwrap().into_rows_result().unwrap();
    i64::try_from(rows.rows_num()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_erasure_asked_while_the_worker_is_down_over_a_half_done_one_is_finished_when_it_returns() {
    let Some(stack) = stack() else { return };
    if std::env::var("PARLEY_MASTER_KEY_FILE").is_err() {
        return;
    }
    let mut pipeline = Pipeline::start(&stack, &["--without-retrieval"]).await;
    let (carol, token) = pipeline.session_user().await;
    let mut client = pipeline.connect(&pipeline.http, &token).await;
    client.ask("q1", None, "Say something short.").await;
    let frames = client.until_outcome().await;
    let conversation = frames.last().unwrap()["conversation_id"].as_str().unwrap().to_owned();
    pipeline.conversation_when(&token, &conversation, 2).await;
    drop(client);

    // A worker that died half way: her key destroyed, her rows still there, nothing
    // completed. The request is appended while no worker runs.
    pipeline.keys().await.unwrap().destroy(&carol).await.unwrap();
    pipeline.kill();
    let asked = pipeline.cli(&["erase", &carol, "--wait", "0"]);
    assert!(asked.status.success(), "{}", String::from_utf8_lossy(&asked.stderr));
    let started = Instant::now();
    pipeline.restart().await;
    let done = pipeline.cli(&["erase", &carol, "--wait", "60s"]);
    let printed = String::from_utf8_lossy(&done.stdout);
    assert!(done.status.success(), "{printed} {}", String::from_utf8_lossy(&done.stderr));
    // The erasure asked while down was completed first, with her rows; this one found none.
    let completions = erasure_completions(&pipeline, &carol).await;
    assert_eq!(completions.len(), 2, "{completions:?}");
    let first = &completions[0];
    let items = |place: &str| first.purged.iter().find(|p| p.place == place).map_or(0, |p| p.items);
    assert_eq!(items("cql:conversations"), 1, "{first:?}");
    assert!(items("cql:messages") >= 2, "{first:?}");
    let (status, _) = pipeline.get(&format!("/api/conversations/{conversation}"), &token).await;
    assert_eq!(status, 404);
    eprintln!("finished {:.1} s after the worker came back", started.elapsed().as_secs_f64());
    pipeline.stop().await;
}

/// The completions of `user`'s erasures, oldest first.
async fn erasure_completions(pipeline: &Pipeline, user: &str) -> Vec<parley_events::ErasureCompleted> {
    let codec = parley_events::EventCodec::new(&pipeline.registry).unwrap();
    let topic = format!("{}erasures", pipeline.prefix);
    let mut completions = Vec::new();
    for record in raw_records(&pipeline.brokers, &topic, user).await {
        if let parley_events::ErasureEvent::Completed(done) = codec.decode_erasure_event(&record).await.unwrap().event {
            completions.push(done);
        }
    }
    completions
}
