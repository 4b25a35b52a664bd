//! End to end, one file per feature: WebSocket → gateway → Kafka → inference → real LLM → Kafka → WebSocket.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

mod admission;
mod cancel;
mod dead_letters;
mod duplicates;
mod lanes;
mod resume;
mod turns;

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use parley_eventlog::LogPosition;
use parley_events::{ConversationEvent, EventCodec};
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use serde_json::{Value, json};
use support::{Pipeline, stack};
use tokio_tungstenite::tungstenite::Message as WsMessage;

fn only<'a>(frames: &'a [Value], kind: &str) -> Vec<&'a Value> {
    frames.iter().filter(|f| f["type"] == kind).collect()
}

/// The record at `partition`/`offset` of `topic`.
async fn read_at(pipeline: &Pipeline, topic: &str, partition: i32, offset: i64) -> rdkafka::message::OwnedMessage {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &pipeline.brokers)
        .set("group.id", format!("{}read-at", pipeline.prefix))
        .create()
        .unwrap();
    let mut assignment = rdkafka::TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset)).unwrap();
    consumer.assign(&assignment).unwrap();
    tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.unwrap().unwrap().detach()
}

/// Reads `count` records of type `T` from the start of `topic`.
async fn read_all<T: parley_events::event::AvroEvent>(pipeline: &Pipeline, topic: &str, count: usize) -> Vec<T> {
    let codec = EventCodec::new(&pipeline.registry).unwrap();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &pipeline.brokers)
        .set("group.id", format!("{}reader-{topic}", pipeline.prefix))
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut records = Vec::new();
    while records.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .expect("records on the topic")
            .unwrap();
        records.push(codec.decode::<T>(message.payload().unwrap()).await.unwrap().event);
    }
    records
}

async fn read_topic_of(pipeline: &Pipeline, count: usize) -> Vec<(ConversationEvent, Option<String>)> {
    support::log_events(&pipeline.brokers, &pipeline.registry, &pipeline.events_topic(), None, count).await
}
