use clap::Args;
use parley_events::lanes::LaneLayout;
use rdkafka::ClientConfig;

/// How to reach Kafka. Shared by every service's command line.
#[derive(Debug, Clone, Args)]
pub struct KafkaSettings {
    /// Kafka bootstrap servers, comma separated.
    #[arg(
        id = "kafka_brokers",
        long = "kafka-brokers",
        env = "PARLEY_KAFKA_BROKERS",
        default_value = "127.0.0.1:19092",
        global = true
    )]
    pub brokers: String,

    /// Prefix for every topic name, to run several isolated pipelines on one cluster.
    #[arg(long, global = true, env = "PARLEY_TOPIC_PREFIX", default_value = "", value_parser = parse_topic_prefix)]
    pub topic_prefix: String,

    /// A stable name for this process among the instances of its service (e.g. a
    /// StatefulSet's pod name). With it, a restarted consumer gets its partitions back at
    /// once (static group membership) and its transactional id fences the previous
    /// incarnation's open transaction; without it, a crashed member's partitions move only
    /// when its session (10 s) expires.
    #[arg(long, env = "PARLEY_INSTANCE_ID", global = true, value_parser = parse_topic_prefix)]
    pub instance_id: Option<String>,

    /// Which conversation-events partitions serve the premium and batch lanes (every other
    /// one is standard), e.g. `premium=0,batch=5` or `premium=0+1,batch=5`; `none`: one
    /// lane, no priorities. Gateways and inference must agree: a new conversation gets an
    /// id that hashes into its lane's partitions, and inference serves lanes by weight.
    #[arg(long, env = "PARLEY_LANES", global = true, default_value = parley_events::lanes::DEFAULT_LANES)]
    pub lanes: LaneLayout,
}

impl KafkaSettings {
    /// Base client config for every producer, consumer and admin client.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.dns.lookup", "use_all_dns_ips")
            // librdkafka backs off reconnecting up to 10 s by default: a broker back after
            // a restart would wait that long for clients. One attempt a second at most.
            .set("reconnect.backoff.max.ms", "1000");
        config
    }

    /// The topics under this prefix.
    pub fn topics(&self) -> Topics {
        Topics::with_prefix(&self.topic_prefix)
    }
}

/// The names of the topics Parley reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Durable conversation events, keyed by conversation id: the source of truth.
    pub events: String,
    /// Token deltas while an answer is generated; short retention, never replayed.
    pub tokens: String,
    /// Records a consumer gave up on, with the error and the original bytes.
    pub dead_letter: String,
    /// Submitted documents, keyed by document id: the knowledge base's source of truth.
    pub documents: String,
    /// What the embedder stored in the vector store, keyed by source id (audit trail).
    pub embeddings: String,
    /// Load reports of the inference instances (queue age), read by every gateway to shed
    /// turns; operational signals, not events, kept an hour.
    pub load: String,
    /// Erasure requests and completions, keyed by user id: the record of who was erased.
    pub erasures: String,
    /// What-if re-runs of answers (`parley replay --rerun`).
    pub experiments: String,
    /// Tier and budget changes, keyed by user id: the record of each person's account.
    pub accounts: String,
}

impl Topics {
    /// Parley's topic names, each after `prefix`.
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            events: format!("{prefix}conversation-events"),
            tokens: format!("{prefix}conversation-tokens"),
            dead_letter: format!("{prefix}dead-letter"),
            documents: format!("{prefix}documents"),
            embeddings: format!("{prefix}embeddings"),
            load: format!("{prefix}inference-load"),
            erasures: format!("{prefix}erasures"),
            experiments: format!("{prefix}experiments"),
            accounts: format!("{prefix}accounts"),
        }
    }
}

fn parse_topic_prefix(value: &str) -> Result<String, String> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if value.len() > 100 || !value.chars().all(legal) {
        return Err(format!("{value:?}: at most 100 characters of [a-zA-Z0-9._-]"));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_prefix_must_be_a_legal_topic_name_part() {
        assert_eq!(parse_topic_prefix("test-1.").unwrap(), "test-1.");
        assert!(parse_topic_prefix("a/b").unwrap_err().contains("a/b"));
        assert_eq!(Topics::with_prefix("t.").events, "t.conversation-events");
    }
}

/// Parses a duration option such as `250ms`, `30s`, `2m` or `24h` (a bare number is seconds).
pub fn parse_duration(value: &str) -> Result<std::time::Duration, String> {
    let value = value.trim();
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: u64 =
        number.parse().map_err(|_| format!("{value:?}: expected a duration like 500ms, 30s, 2m or 24h"))?;
    let millis = match unit {
        "ms" => number,
        "" | "s" => number.saturating_mul(1000),
        "m" => number.saturating_mul(60_000),
        "h" => number.saturating_mul(3_600_000),
        _ => return Err(format!("{value:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Ok(std::time::Duration::from_millis(millis))
}

#[cfg(test)]
mod duration_tests {
    use std::time::Duration;

    use super::parse_duration;

    #[test]
    fn durations_parse_with_units_and_reject_garbage() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("fast").unwrap_err().contains("fast"));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(24 * 3600)));
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
    }
}
