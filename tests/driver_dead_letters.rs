//! Dead letters that keep order, at the driver, on the real Kafka: a toy processor over
//! plain-text records ("work:x" is work, "poison:x" does not decode until it is cured)
//! meets a poisoned record in the middle of a key's records. The key's later records wait
//! while other keys flow on; a restart letters nothing twice and keeps the key held; a
//! discard lets them go on; a redrive runs the copy first; a copy still poison is
//! lettered again and the key stays held.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use parley_eventlog::KafkaSettings;
use parley_eventlog::dead_letter::{Decision, read_book, settle};
use parley_eventlog::driver::{Decoded, DriverSettings, Processor, QueueAge};
use parley_eventlog::lanes::Lanes;
use parley_eventlog::transaction::Outgoing;
use parley_events::dead_letters::{Entry, Status};
use parley_events::{EventCodec, EventsError};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::{stack, wait_until};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Works every record it can decode, in the order it starts them; "work:slow" waits for
/// the gate to open.
#[derive(Default)]
struct Toy {
    cured: Mutex<HashSet<String>>,
    worked: Mutex<Vec<String>>,
    gate_open: Mutex<bool>,
}

impl Processor for Toy {
    type Item = String;
    type Error = std::io::Error;

    async fn decode(&self, record: &OwnedMessage) -> Option<Decoded<String>> {
        let text = String::from_utf8_lossy(record.payload().unwrap_or_default()).into_owned();
        if text.starts_with("poison:") && !self.cured.lock().unwrap().contains(&text) {
            return Some(Err(EventsError::Undecodable { schema_id: None, reason: format!("{text} is poison") }));
        }
        Some(Ok(text))
    }

    fn wants(&self, _item: &String) -> bool {
        true
    }

    async fn process(self: Arc<Self>, unit: Vec<(OwnedMessage, String)>) -> Result<Vec<Outgoing>, std::io::Error> {
        for (_, item) in unit {
            while item == "work:slow" && !*self.gate_open.lock().unwrap() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            self.worked.lock().unwrap().push(item);
        }
        Ok(vec![])
    }
}

impl Toy {
    fn worked(&self, item: &str) -> bool {
        self.worked.lock().unwrap().iter().any(|w| w == item)
    }
}

struct Rig {
    kafka: KafkaSettings,
    codec: Arc<EventCodec>,
    group: String,
    topic: String,
    producer: FutureProducer,
}

impl Rig {
    fn start(&self, toy: &Arc<Toy>) -> (CancellationToken, JoinHandle<Result<(), parley_eventlog::EventLogError>>) {
        let lanes = Lanes::single();
        let topics = self.kafka.topics();
        let settings = DriverSettings {
            group_id: self.group.clone(),
            transactional_id: format!("{}-driver", self.group),
            topics: vec![self.topic.clone()],
            dead_letter_topic: topics.dead_letter.clone(),
            batch_size: 1,
            batch_wait: Duration::ZERO,
            concurrency: 2,
            one_per_key: true,
            queue: QueueAge::new(&lanes),
            lanes,
        };
        let shutdown = CancellationToken::new();
        let driver = tokio::spawn({
            let (kafka, toy, codec, shutdown) =
                (self.kafka.clone(), Arc::clone(toy), self.codec.clone(), shutdown.clone());
            async move { parley_eventlog::driver::run(&kafka, settings, toy, codec, shutdown).await }
        });
        (shutdown, driver)
    }

    /// Every record to partition 0, so a restart reads the poison again.
    async fn send(&self, key: &str, payload: &str) {
        let record = FutureRecord::to(&self.topic).partition(0).key(key).payload(payload);
        self.producer.send(record, Duration::from_secs(30)).await.map_err(|(error, _)| error).unwrap();
    }

    async fn letters_of(&self, key: &str) -> Vec<Entry> {
        let (book, _) = read_book(&self.kafka, &self.codec).await.unwrap();
        book.entries().iter().filter(|e| e.letter.key.as_deref() == Some(key.as_bytes())).cloned().collect()
    }

    async fn settle(&self, key: &str, decision: Decision) {
        let (book, _) = read_book(&self.kafka, &self.codec).await.unwrap();
        let open =
            book.entries().iter().find(|e| e.letter.key.as_deref() == Some(key.as_bytes()) && e.status == Status::Open);
        settle(&self.kafka, &self.codec, &book, open.unwrap().id, decision, "test", Some("why".into())).await.unwrap();
    }
}

async fn worked_in_time(toy: &Toy, item: &str) {
    wait_until(&format!("{item} worked"), || std::future::ready(toy.worked(item).then_some(()))).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poisoned_record_holds_back_its_key_until_it_is_discarded_or_redriven() {
    let Some(stack) = stack() else { return };
    let run = uuid::Uuid::new_v4().simple().to_string();
    let kafka = KafkaSettings {
        brokers: stack.brokers.clone(),
        topic_prefix: format!("letters-{run}-"),
        instance_id: None,
        lanes: parley_events::lanes::DEFAULT_LANES.parse().unwrap(),
    };
    parley_eventlog::topics::ensure_topics(&kafka, None).await.unwrap();
    let rig = Rig {
        codec: Arc::new(EventCodec::new(&stack.registry).unwrap()),
        group: format!("letters-{run}"),
        topic: kafka.topics().events,
        producer: kafka.client_config().create().unwrap(),
        kafka,
    };

    // A slow record first keeps the committed offset before the poison.
    for (key, payload) in [("s", "work:slow"), ("a", "work:a1"), ("a", "poison:a2"), ("a", "work:a3"), ("b", "work:b1")]
    {
        rig.send(key, payload).await;
    }
    let toy = Arc::new(Toy::default());
    let (shutdown, driver) = rig.start(&toy);
    worked_in_time(&toy, "work:b1").await;
    assert!(toy.worked("work:a1"), "the record before the poison is worked");
    let letters = wait_until("a's letter", || async {
        let letters = rig.letters_of("a").await;
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!toy.worked("work:a3"), "a's record after the poison must wait for the letter");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].status, Status::Open);
    assert_eq!(letters[0].letter.payload.as_deref(), Some(&b"poison:a2"[..]));

    // A restart reads the poison again (the slow record held the committed offset back):
    // it is known, not lettered twice, and a is still held.
    shutdown.cancel();
    driver.await.unwrap().unwrap();
    let toy = Arc::new(Toy { gate_open: Mutex::new(true), ..Toy::default() });
    let (shutdown, driver) = rig.start(&toy);
    worked_in_time(&toy, "work:slow").await;
    worked_in_time(&toy, "work:b1").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!toy.worked("work:a3"), "a is still held after the restart");
    assert_eq!(rig.letters_of("a").await.len(), 1, "the poison was lettered again after the restart");

    // Discard: a's held record goes on.
    rig.settle("a", Decision::Discard).await;
    worked_in_time(&toy, "work:a3").await;
    assert_eq!(rig.letters_of("a").await[0].status, Status::Discarded);

    // Redrive after the cure: the copy runs, then the record it held.
    for (key, payload) in [("c", "poison:c1"), ("c", "work:c2"), ("d", "work:d1")] {
        rig.send(key, payload).await;
    }
    worked_in_time(&toy, "work:d1").await;
    wait_until("c's letter", || async { (!rig.letters_of("c").await.is_empty()).then_some(()) }).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!toy.worked("work:c2"));
    toy.cured.lock().unwrap().insert("poison:c1".into());
    rig.settle("c", Decision::Redrive).await;
    worked_in_time(&toy, "work:c2").await;
    let worked = toy.worked.lock().unwrap().clone();
    let at = |item: &str| worked.iter().position(|w| w == item).unwrap();
    assert!(at("poison:c1") < at("work:c2"), "the redriven copy runs first: {worked:?}");
    let letters = rig.letters_of("c").await;
    assert!(matches!(&letters[0].status, Status::Redriven { copy } if copy.offset > letters[0].letter.source_offset));

    // A redrive of a record that is still poison: the copy is lettered again, e stays held.
    for (key, payload) in [("e", "poison:e1"), ("e", "work:e2")] {
        rig.send(key, payload).await;
    }
    wait_until("e's letter", || async { (!rig.letters_of("e").await.is_empty()).then_some(()) }).await;
    rig.settle("e", Decision::Redrive).await;
    let letters = wait_until("e's second letter", || async {
        let letters = rig.letters_of("e").await;
        (letters.len() == 2).then_some(letters)
    })
    .await;
    let Status::Redriven { copy } = &letters[0].status else { panic!("{letters:?}") };
    assert_eq!(letters[1].letter.source(), *copy, "the second letter is the copy's");
    assert_eq!(letters[1].status, Status::Open);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!toy.worked("work:e2"), "e stays held behind the copy's letter");

    shutdown.cancel();
    driver.await.unwrap().unwrap();
}
