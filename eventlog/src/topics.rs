//! The topics Parley owns, created by the project with explicit partitions and configs
//! (brokers run with `auto.create.topics.enable=false`).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::consumer::blocking_query;
use crate::error::EventLogError;
use crate::settings::{KafkaSettings, Topics};

/// One topic's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// The topic's name (prefix included).
    pub name: String,
    /// Its partitions.
    pub partitions: i32,
    /// Topic configs set at creation (retention, cleanup policy, record size).
    pub configs: Vec<(&'static str, &'static str)>,
}

impl TopicSpec {
    /// A topic of `partitions` with the cluster's default configs.
    pub fn new(name: &str, partitions: i32) -> Self {
        Self { name: name.to_owned(), partitions, configs: vec![] }
    }
}

/// Partitions of the conversation topics: the unit of consumer parallelism. A conversation
/// never moves between partitions, so this can only grow with a re-keying migration.
pub const CONVERSATION_PARTITIONS: i32 = 6;

impl Topics {
    /// The layout of every topic: see docs/events.md for the reasoning.
    pub fn specs(&self) -> Vec<TopicSpec> {
        vec![
            TopicSpec {
                name: self.events.clone(),
                partitions: CONVERSATION_PARTITIONS,
                // The log is the source of truth: kept forever, never compacted.
                configs: vec![
                    ("retention.ms", "-1"),
                    ("retention.bytes", "-1"),
                    ("cleanup.policy", "delete"),
                    ("max.message.bytes", "1048576"),
                ],
            },
            TopicSpec {
                name: self.tokens.clone(),
                partitions: CONVERSATION_PARTITIONS,
                // Deltas only matter while a socket is waiting for them.
                configs: vec![("retention.ms", "3600000"), ("cleanup.policy", "delete"), ("segment.ms", "600000")],
            },
            TopicSpec {
                name: self.documents.clone(),
                partitions: CONVERSATION_PARTITIONS,
                // Documents are facts like conversation events: re-embedding with a new model
                // replays them. Larger records: a document is up to MAX_DOCUMENT_BYTES of text.
                configs: vec![
                    ("retention.ms", "-1"),
                    ("retention.bytes", "-1"),
                    ("cleanup.policy", "delete"),
                    ("max.message.bytes", "2097152"),
                ],
            },
            TopicSpec {
                name: self.embeddings.clone(),
                partitions: CONVERSATION_PARTITIONS,
                configs: vec![("retention.ms", "-1"), ("retention.bytes", "-1"), ("cleanup.policy", "delete")],
            },
            TopicSpec {
                name: self.load.clone(),
                partitions: 1,
                // Only the latest report of each instance matters, and only for seconds.
                configs: vec![("retention.ms", "3600000"), ("cleanup.policy", "delete"), ("segment.ms", "600000")],
            },
            TopicSpec {
                name: self.erasures.clone(),
                // One partition: erasures are rare, and one worker finishing them in the order
                // asked keeps a person's request before its completion. Kept forever: it is
                // the record of who was erased and when, which a rebuild must know.
                partitions: 1,
                configs: vec![("retention.ms", "-1"), ("retention.bytes", "-1"), ("cleanup.policy", "delete")],
            },
            TopicSpec {
                name: self.accounts.clone(),
                // Rare, tiny, and the record of who could spend what when: kept forever; one
                // partition keeps every change in the order made.
                partitions: 1,
                configs: vec![("retention.ms", "-1"), ("retention.bytes", "-1"), ("cleanup.policy", "delete")],
            },
            TopicSpec {
                name: self.experiments.clone(),
                // Comparisons, not the record: kept 90 days. Their text is sealed under the
                // owner's key, so an erasure makes it unreadable before then.
                partitions: CONVERSATION_PARTITIONS,
                configs: vec![("retention.ms", "7776000000"), ("cleanup.policy", "delete")],
            },
            TopicSpec {
                name: self.dead_letter.clone(),
                partitions: 1,
                configs: vec![
                    ("retention.ms", "2592000000"),
                    ("cleanup.policy", "delete"),
                    ("max.message.bytes", "2097152"),
                ],
            },
        ]
    }
}

/// How many copies of a topic's records the cluster keeps, and how many must have a write
/// before it is acknowledged (every Parley producer writes with `acks=all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durability {
    /// Copies of each record.
    pub replication: i32,
    /// Copies written before a write is acknowledged.
    pub min_insync_replicas: i32,
}

impl Durability {
    /// For a cluster of `brokers`, unless the operator chose a replication factor: three
    /// copies where there are three brokers or more, written to two before the ack, so one
    /// broker can be lost without losing an acknowledged event or stopping writes.
    pub fn for_cluster(brokers: usize, chosen: Option<i32>) -> Self {
        let replication = chosen.unwrap_or_else(|| i32::try_from(brokers.clamp(1, 3)).unwrap_or(1));
        Self { replication, min_insync_replicas: if replication >= 3 { 2 } else { 1 } }
    }
}

/// Creates every missing topic of Parley's (existing ones are left as they are) at the
/// replication `chosen`, or, when None, at what the cluster's size allows
/// ([`Durability::for_cluster`]).
pub async fn ensure_topics(settings: &KafkaSettings, chosen: Option<i32>) -> Result<Durability, EventLogError> {
    create_topics(settings, &settings.topics().specs(), chosen).await
}

/// Creates the topics of `specs` that are missing, as [`ensure_topics`] does Parley's (a
/// new consumer's output topic, say).
pub async fn create_topics(
    settings: &KafkaSettings,
    specs: &[TopicSpec],
    chosen: Option<i32>,
) -> Result<Durability, EventLogError> {
    let admin: Arc<AdminClient<DefaultClientContext>> = Arc::new(settings.client_config().create()?);
    let brokers = {
        let admin = Arc::clone(&admin);
        blocking_query(move || admin.inner().fetch_metadata(None, Duration::from_secs(30))).await?.brokers().len()
    };
    let durability = Durability::for_cluster(brokers, chosen);
    let min_insync = durability.min_insync_replicas.to_string();
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|spec| {
            spec.configs.iter().fold(
                NewTopic::new(&spec.name, spec.partitions, TopicReplication::Fixed(durability.replication))
                    .set("min.insync.replicas", &min_insync),
                |topic, (key, value)| topic.set(key, value),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let mut attempt = 1;
    loop {
        match create_missing(&admin, &new_topics, &options).await {
            Err(error) if attempt < CREATE_ATTEMPTS && is_transient(&error) => {
                tracing::warn!(%error, attempt, "creating topics timed out; trying again");
                tokio::time::sleep(Duration::from_secs(2)).await;
                attempt += 1;
            }
            result => return result.map(|()| durability),
        }
    }
}

/// A broker that is still electing its controller or catching up with its metadata log
/// times out requests for a while; start-up rides that out rather than failing at once.
const CREATE_ATTEMPTS: u32 = 4;

async fn create_missing(
    admin: &AdminClient<DefaultClientContext>,
    new_topics: &[NewTopic<'_>],
    options: &AdminOptions,
) -> Result<(), EventLogError> {
    for result in admin.create_topics(new_topics, options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(EventLogError::TopicCreation { topic, code });
            }
        }
    }
    Ok(())
}

fn is_transient(error: &EventLogError) -> bool {
    let timed_out = |code: &RDKafkaErrorCode| {
        matches!(
            code,
            RDKafkaErrorCode::OperationTimedOut | RDKafkaErrorCode::RequestTimedOut | RDKafkaErrorCode::NotController
        )
    };
    match error {
        EventLogError::Kafka(KafkaError::AdminOp(code)) => timed_out(code),
        EventLogError::TopicCreation { code, .. } => timed_out(code),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::Durability;

    #[test]
    fn a_cluster_of_three_keeps_three_copies_and_acknowledges_after_two() {
        let durability = |brokers, chosen| {
            let Durability { replication, min_insync_replicas } = Durability::for_cluster(brokers, chosen);
            (replication, min_insync_replicas)
        };
        assert_eq!(durability(1, None), (1, 1));
        assert_eq!(durability(2, None), (2, 1));
        assert_eq!(durability(3, None), (3, 2));
        assert_eq!(durability(5, None), (3, 2));
        assert_eq!(durability(5, Some(5)), (5, 2));
        assert_eq!(durability(3, Some(1)), (1, 1), "an operator's choice wins");
    }
}
