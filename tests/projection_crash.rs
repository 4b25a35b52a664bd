//! kill -9 the projection in the middle of a burst, restart it: the projection ends equal
//! to the log (no duplicate, no gap), because writes are idempotent by sequence and
//! progress is stored in the same store after the state it covers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use parley_events::conversation::ConversationState;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use support::stack;
use uuid::Uuid;

const CONVERSATIONS: usize = 1000;
const TURNS: usize = 4;
const EVENTS: i64 = (CONVERSATIONS * (1 + 2 * TURNS)) as i64;

fn projection(stack: &support::Stack, prefix: &str, keyspace: &str) -> Child {
    let log = std::fs::File::create(std::env::temp_dir().join(format!("{prefix}projection.log"))).unwrap();
    Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["--kafka-brokers", &stack.brokers, "--schema-registry-url", &stack.registry, "--topic-prefix", prefix])
        .args(["--cql-nodes", &stack.cql, "--cql-keyspace", keyspace, "projection"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

async fn applied(session: &Session, keyspace: &str, topic: &str) -> i64 {
    let result = session
        .query_unpaged(format!("SELECT next_offset FROM {keyspace}.progress_g1 WHERE log_topic = ?"), (topic,))
        .await;
    let Ok(result) = result else { return 0 }; // tables not created yet
    result.into_rows_result().unwrap().rows::<(i64,)>().unwrap().map(|r| r.unwrap().0).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_projection_killed_mid_burst_ends_equal_to_the_log() {
    let Some(stack) = stack() else { return };
    let prefix = format!("test-{}.", Uuid::new_v4().simple());
    let keyspace = format!("parley_crash_{}", &Uuid::new_v4().simple().to_string()[..12]);
    let topic = format!("{prefix}conversation-events");
    let created = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["--kafka-brokers", &stack.brokers, "--topic-prefix", &prefix, "topics"])
        .output()
        .unwrap();
    assert!(created.status.success());
    let session = SessionBuilder::new().known_node(&stack.cql).build().await.unwrap();

    let mut first = projection(&stack, &prefix, &keyspace);
    let writer = tokio::spawn({
        let (brokers, registry, topic) = (stack.brokers.clone(), stack.registry.clone(), topic.clone());
        async move { support::write_synthetic(&brokers, &registry, &topic, CONVERSATIONS, TURNS).await }
    });
    // Kill -9 once some, but not all, of the burst is applied.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = applied(&session, &keyspace, &topic).await;
        if done > 0 && done < EVENTS {
            break;
        }
        assert!(done < EVENTS, "the burst was applied before the kill; make it larger");
        assert!(Instant::now() < deadline, "the projection never started applying");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let at_kill = applied(&session, &keyspace, &topic).await;
    let written = writer.await.unwrap();

    let mut second = projection(&stack, &prefix, &keyspace);
    let deadline = Instant::now() + Duration::from_secs(180);
    while applied(&session, &keyspace, &topic).await < EVENTS {
        assert!(Instant::now() < deadline, "the restarted projection did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    second.kill().unwrap();
    second.wait().unwrap();
    assert!(at_kill < EVENTS, "killed mid-burst ({at_kill} of {EVENTS})");

    let mut stored: HashMap<Uuid, Vec<(i64, String, String)>> = HashMap::new();
    let rows = session
        .query_unpaged(format!("SELECT conversation_id, sequence, kind, text FROM {keyspace}.messages_g1"), ())
        .await
        .unwrap();
    for row in rows.into_rows_result().unwrap().rows::<(Uuid, i64, String, String)>().unwrap() {
        let (id, sequence, kind, text) = row.unwrap();
        stored.entry(id).or_default().push((sequence, kind, text));
    }
    assert_eq!(stored.len(), CONVERSATIONS);
    for (id, events) in &written {
        let expected: Vec<_> = ConversationState::fold(events)
            .unwrap()
            .messages
            .iter()
            .map(|m| (m.sequence, m.kind.as_str().to_owned(), m.text.clone()))
            .collect();
        let mut got = stored.remove(&id.uuid()).unwrap_or_default();
        got.sort();
        assert_eq!(got, expected, "conversation {id}");
    }
    let heads =
        session.query_unpaged(format!("SELECT last_sequence FROM {keyspace}.conversations_g1"), ()).await.unwrap();
    let last: Vec<i64> = heads.into_rows_result().unwrap().rows::<(i64,)>().unwrap().map(|r| r.unwrap().0).collect();
    assert_eq!(last.len(), CONVERSATIONS);
    assert!(last.iter().all(|s| *s == 1 + 2 * TURNS as i64), "every head at its last sequence");
    let listed =
        session.query_unpaged(format!("SELECT user_id FROM {keyspace}.conversations_by_user_g1"), ()).await.unwrap();
    assert_eq!(listed.into_rows_result().unwrap().rows_num(), CONVERSATIONS, "no conversation listed twice");

    support::drop_keyspace(&stack.cql, &keyspace).await;
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &stack.brokers).create().unwrap();
    let topics = ["conversation-events", "conversation-tokens", "dead-letter"].map(|t| format!("{prefix}{t}"));
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&names, &rdkafka::admin::AdminOptions::new()).await;
}
