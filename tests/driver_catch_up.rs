//! The driver's catch-up against a transaction still open at the assignment. A fault-suite
//! run found an answered query answered a second time after a Kafka restart: the catch-up
//! after the assignment ended at the last stable offset, short of an outcome whose
//! transaction was still being committed, so the query started again before its outcome
//! became readable. Here a toy processor over plain-text records ("work:x" is work,
//! "done:x" its output) meets work whose output sits in an open transaction: the work must
//! not start, and once the transaction commits it must be known as done.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use parley_eventlog::KafkaSettings;
use parley_eventlog::driver::{Decoded, DriverSettings, Processor, QueueAge};
use parley_eventlog::lanes::Lanes;
use parley_eventlog::transaction::Outgoing;
use parley_events::EventCodec;
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use support::stack;
use tokio_util::sync::CancellationToken;

/// Marks work done when its output was read while catching up, and records what it did.
#[derive(Default)]
struct Toy {
    topic: String,
    read: Mutex<Vec<String>>,
    done: Mutex<HashSet<String>>,
    worked: Mutex<Vec<String>>,
}

impl Processor for Toy {
    type Item = String;
    type Error = std::io::Error;

    async fn decode(&self, record: &OwnedMessage) -> Option<Decoded<String>> {
        Some(Ok(String::from_utf8_lossy(record.payload().unwrap_or_default()).into_owned()))
    }

    fn observe(&self, item: &String, catching_up: bool) {
        self.read.lock().unwrap().push(item.clone());
        if let Some(work) = item.strip_prefix("done:").filter(|_| catching_up) {
            self.done.lock().unwrap().insert(work.to_owned());
        }
    }

    fn wants(&self, item: &String) -> bool {
        item.starts_with("work:")
    }

    async fn process(self: Arc<Self>, unit: Vec<(OwnedMessage, String)>) -> Result<Vec<Outgoing>, std::io::Error> {
        let mut outgoing = Vec::new();
        for (_, item) in unit {
            let work = item.trim_start_matches("work:").to_owned();
            if self.done.lock().unwrap().remove(&work) {
                continue;
            }
            self.worked.lock().unwrap().push(work.clone());
            outgoing.push(Outgoing {
                topic: self.topic.clone(),
                key: "k".into(),
                payload: format!("done:{work}").into_bytes(),
                traceparent: None,
            });
        }
        Ok(outgoing)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn work_whose_output_is_in_an_open_transaction_is_not_started_again() {
    let Some(stack) = stack() else { return };
    let run = uuid::Uuid::new_v4().simple().to_string();
    let kafka = KafkaSettings {
        brokers: stack.brokers.clone(),
        topic_prefix: format!("catchup-{run}-"),
        instance_id: None,
        lanes: parley_events::lanes::DEFAULT_LANES.parse().unwrap(),
    };
    parley_eventlog::topics::ensure_topics(&kafka, None).await.unwrap();
    let topics = kafka.topics();
    let topic = topics.events.clone();

    // "work:a" is committed; its output "done:a" is in a transaction left open.
    let plain: FutureProducer = kafka.client_config().create().unwrap();
    send(&plain, &topic, "work:a").await;
    let open: FutureProducer =
        kafka.client_config().set("transactional.id", format!("catchup-{run}")).create().unwrap();
    tokio::task::block_in_place(|| open.init_transactions(Duration::from_secs(30))).unwrap();
    open.begin_transaction().unwrap();
    send(&open, &topic, "done:a").await;

    let toy = Arc::new(Toy { topic: topic.clone(), ..Toy::default() });
    let lanes = Lanes::single();
    let settings = DriverSettings {
        group_id: format!("catchup-{run}"),
        transactional_id: format!("catchup-driver-{run}"),
        topics: vec![topic.clone()],
        dead_letter_topic: topics.dead_letter.clone(),
        batch_size: 1,
        batch_wait: Duration::ZERO,
        concurrency: 2,
        one_per_key: false,
        queue: QueueAge::new(&lanes),
        lanes,
    };
    let codec = Arc::new(EventCodec::new(&stack.registry).unwrap());
    let shutdown = CancellationToken::new();
    let driver = tokio::spawn({
        let (kafka, toy, shutdown) = (kafka.clone(), Arc::clone(&toy), shutdown.clone());
        async move { parley_eventlog::driver::run(&kafka, settings, toy, codec, shutdown).await }
    });

    // The driver is assigned the partition, reads "work:a" and reaches the last stable
    // offset, which stops short of the open transaction: "work:a" must wait.
    let read_a = || std::future::ready(toy.read.lock().unwrap().contains(&"work:a".to_owned()).then_some(()));
    support::wait_until("the driver to read work:a", read_a).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!driver.is_finished(), "the driver stopped: {:?}", driver.await);
    assert!(toy.worked.lock().unwrap().is_empty(), "work started before the open transaction was resolved");

    tokio::task::block_in_place(|| open.commit_transaction(Duration::from_secs(30))).unwrap();
    send(&plain, &topic, "work:b").await;
    let worked = support::wait_until("work after the catch-up", || {
        let worked = toy.worked.lock().unwrap();
        std::future::ready(worked.contains(&"b".to_owned()).then(|| worked.clone()))
    })
    .await;
    assert_eq!(worked, ["b"], "work whose output was committed was done again");

    shutdown.cancel();
    driver.await.unwrap().unwrap();
}

async fn send(producer: &FutureProducer, topic: &str, payload: &str) {
    let record = FutureRecord::to(topic).key("k").payload(payload);
    producer.send(record, Duration::from_secs(30)).await.map_err(|(error, _)| error).unwrap();
}
