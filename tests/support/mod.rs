//! Harness for end-to-end tests against the real local stack (infra/stack.sh start).
//! Each test runs its own `parley all` process on its own topics (a unique prefix), so
//! tests run in parallel without seeing each other's events, and deletes them afterwards.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use parley_gateway::protocol::ServerFrame;
use parley_retrieval::{MilvusSettings, VectorStore};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Addresses of the running stack, or None (test skipped) when it is not configured.
pub(crate) struct Stack {
    pub brokers: String,
    pub registry: String,
    pub llm: String,
    pub cql: String,
    /// Jaeger's query API; `parley` exports its spans to PARLEY_OTLP_ENDPOINT.
    pub jaeger: String,
}

/// Gateway options that turn the per-user rate limits off, for tests and benchmarks whose
/// one user asks faster than a person would.
pub(crate) const NO_RATE_LIMITS: [&str; 4] = ["--user-turns-per-minute", "0", "--user-tokens-per-minute", "0"];

/// Keyspace shared by the tests: their conversations and topics never collide.
pub(crate) const TEST_KEYSPACE: &str = "parley_test";

pub(crate) fn stack() -> Option<Stack> {
    let var = |name: &str| std::env::var(name).ok();
    // The vector store, the embedding model and the trace collector reach `parley` through
    // the environment.
    let inherited = ["PARLEY_MILVUS_URL", "PARLEY_EMBEDDING_MODEL_DIR", "PARLEY_OTLP_ENDPOINT"];
    let inherited = inherited.iter().all(|name| var(name).is_some());
    match (
        var("PARLEY_KAFKA_BROKERS"),
        var("PARLEY_SCHEMA_REGISTRY_URL"),
        var("PARLEY_LLM_BASE_URL"),
        var("PARLEY_CQL_NODES"),
        var("PARLEY_JAEGER_QUERY_URL"),
    ) {
        (Some(brokers), Some(registry), Some(llm), Some(cql), Some(jaeger)) if inherited => {
            Some(Stack { brokers, registry, llm, cql, jaeger })
        }
        _ if var("PARLEY_REQUIRE_STACK").as_deref() == Some("1") => {
            panic!(
                "PARLEY_REQUIRE_STACK=1 but PARLEY_KAFKA_BROKERS/PARLEY_SCHEMA_REGISTRY_URL/PARLEY_LLM_BASE_URL/PARLEY_CQL_NODES/PARLEY_MILVUS_URL/PARLEY_EMBEDDING_MODEL_DIR/PARLEY_OTLP_ENDPOINT/PARLEY_JAEGER_QUERY_URL are not all set"
            )
        }
        _ => {
            eprintln!("skipped: local stack not configured (run infra/test.sh)");
            None
        }
    }
}

/// A free port below Linux's ephemeral range (32768 and up): a pipeline restarted on the
/// same port must find it free, and an ephemeral port can meanwhile become the local end
/// of any client's connection (it happened: a restart failed with "address in use").
pub(crate) fn free_port() -> u16 {
    loop {
        let port = 20_000 + u16::try_from(uuid::Uuid::new_v4().as_u128() % 12_000).unwrap();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The options before a `parley` subcommand that put it on a test's own topics, keyspace
/// and vector collection.
pub(crate) fn global_args(
    brokers: &str,
    registry: &str,
    prefix: &str,
    cql: &str,
    keyspace: &str,
    collection: &str,
) -> Vec<String> {
    [
        "--kafka-brokers",
        brokers,
        "--schema-registry-url",
        registry,
        "--topic-prefix",
        prefix,
        "--cql-nodes",
        cql,
        "--cql-keyspace",
        keyspace,
        "--milvus-collection",
        collection,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// When the local stack was started (its Kafka's pid file, written at start), as a line of
/// the report: a just-started stack is colder than a warm one.
pub(crate) fn stack_age() -> String {
    let pid_file = std::env::var("PARLEY_RUN").map(|run| std::path::Path::new(&run).join("pids/kafka.pid"));
    let started = pid_file.ok().and_then(|file| std::fs::metadata(file).ok()?.modified().ok());
    match started.and_then(|at| at.elapsed().ok()) {
        Some(age) => format!("the local stack was started {:.0} s before this run", age.as_secs_f64()),
        None => "the local stack's start time is unknown (PARLEY_RUN/pids/kafka.pid)".to_owned(),
    }
}

/// Names no other test uses: a topic prefix, a Milvus collection and a loopback port.
struct FreshIds {
    prefix: String,
    collection: String,
    port: u16,
}

impl FreshIds {
    fn new() -> FreshIds {
        let id = uuid::Uuid::new_v4().simple();
        FreshIds { prefix: format!("test-{id}."), collection: format!("test_{id}"), port: free_port() }
    }

    fn listen(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// `args`, with the stack's model server unless they name one.
fn with_llm<'a>(stack: &'a Stack, args: &[&'a str]) -> Vec<&'a str> {
    let mut args = args.to_vec();
    if !args.contains(&"--llm-base-url") {
        args.extend(["--llm-base-url", &stack.llm]);
    }
    args
}

/// A `parley all` process on its own topics, plus any extra gateway instances; or (see
/// [`Pipeline::start_parts`]) a gateway process with inference and the projection in
/// processes of their own.
pub(crate) struct Pipeline {
    child: Child,
    extra_gateways: Vec<Child>,
    /// Services run apart from the gateway (`start_parts`), by name.
    parts: Vec<(&'static str, Child)>,
    args: Vec<String>,
    pub keyspace: String,
    pub prefix: String,
    /// This test's own Milvus collection.
    pub collection: String,
    pub http: String,
    pub brokers: String,
    pub registry: String,
    pub cql: String,
}

impl Pipeline {
    pub(crate) async fn start(stack: &Stack, extra_args: &[&str]) -> Pipeline {
        Self::start_in(stack, TEST_KEYSPACE, extra_args).await
    }

    /// Like `start`, with the projection in its own keyspace.
    pub(crate) async fn start_in(stack: &Stack, keyspace: &str, extra_args: &[&str]) -> Pipeline {
        let fresh = FreshIds::new();
        let mut args =
            global_args(&stack.brokers, &stack.registry, &fresh.prefix, &stack.cql, keyspace, &fresh.collection);
        args.extend(
            [
                "all",
                "--listen",
                &fresh.listen(),
                "--group-id",
                &format!("{}inference", fresh.prefix),
                "--embedder-group",
                &format!("{}embedder", fresh.prefix),
            ]
            .map(str::to_owned),
        );
        args.extend(with_llm(stack, extra_args).into_iter().map(str::to_owned));
        let child = spawn(&args, &fresh.prefix, "log");
        Self::started(stack, keyspace, fresh, child, vec![], args).await
    }

    /// The deployment's shape: `parley gateway`, `parley inference` and (unless
    /// `without_projection`) `parley projection` as three processes on their own topics, so
    /// that each part's CPU can be read apart. `wrap` goes before each `parley` (a profiler;
    /// empty: none); `common` are options every part takes.
    pub(crate) async fn start_parts(
        stack: &Stack,
        common: &[&str],
        gateway: &[&str],
        inference: &[&str],
        without_projection: bool,
        wrap: &[String],
    ) -> Pipeline {
        let fresh = FreshIds::new();
        let prefix = fresh.prefix.clone();
        let mut global =
            global_args(&stack.brokers, &stack.registry, &prefix, &stack.cql, TEST_KEYSPACE, &fresh.collection);
        global.extend(common.iter().map(|a| (*a).to_owned()));
        let command = |name: &str, extra: &[&str]| {
            let mut args = global.clone();
            args.push(name.to_owned());
            args.extend(extra.iter().map(|a| (*a).to_owned()));
            args
        };
        for setup in [&["topics"][..], &["schemas", "register"]] {
            let output =
                Command::new(env!("CARGO_BIN_EXE_parley")).args(command(setup[0], &setup[1..])).output().unwrap();
            assert!(output.status.success(), "parley {setup:?}: {}", String::from_utf8_lossy(&output.stderr));
        }
        let group = format!("{prefix}inference");
        let inference_args = [&["--group-id", &group][..], &with_llm(stack, inference)].concat();
        let mut parts =
            vec![("inference", spawn_wrapped(wrap, &command("inference", &inference_args), &prefix, "inference.log"))];
        if !without_projection {
            parts.push(("projection", spawn_wrapped(wrap, &command("projection", &[]), &prefix, "projection.log")));
        }
        let args = command("gateway", &[&["--listen", &fresh.listen()][..], gateway].concat());
        let child = spawn_wrapped(wrap, &args, &prefix, "log");
        Self::started(stack, TEST_KEYSPACE, fresh, child, parts, args).await
    }

    /// The pipeline whose first process (`parley all` or the gateway) is `child`, once it
    /// answers on its health endpoint.
    async fn started(
        stack: &Stack,
        keyspace: &str,
        fresh: FreshIds,
        child: Child,
        parts: Vec<(&'static str, Child)>,
        args: Vec<String>,
    ) -> Pipeline {
        let mut pipeline = Pipeline {
            keyspace: keyspace.to_owned(),
            child,
            extra_gateways: vec![],
            parts,
            args,
            http: format!("http://{}", fresh.listen()),
            prefix: fresh.prefix,
            collection: fresh.collection,
            brokers: stack.brokers.clone(),
            registry: stack.registry.clone(),
            cql: stack.cql.clone(),
        };
        pipeline.wait_healthy().await;
        pipeline
    }

    /// Every process of the pipeline by part: the gateway (or `all`) first.
    pub(crate) fn processes(&self) -> Vec<(&'static str, u32)> {
        let first = if self.parts.is_empty() { "parley all" } else { "gateway" };
        std::iter::once((first, self.child.id()))
            .chain(self.parts.iter().map(|(name, child)| (*name, child.id())))
            .collect()
    }

    /// Stops the first process (`parley all`; the gateway of a `start_parts` pipeline, whose
    /// other parts keep running) and starts it again with the same options, unwrapped.
    pub(crate) async fn restart(&mut self) {
        self.kill();
        self.child = spawn(&self.args, &self.prefix, "restarted.log");
        self.wait_healthy().await;
    }

    /// Kills the `parley all` process (as a crash would); `restart` starts it again.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn wait_healthy(&mut self) {
        // Generous: a cold stack creates its first topics, tables and collections here.
        let deadline = Instant::now() + Duration::from_secs(180);
        let client = reqwest::Client::new();
        while client.get(format!("{}/healthz", self.http)).send().await.is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("parley all exited with {status}:\n{}", log_tail(&self.log_path()));
            }
            if Instant::now() >= deadline {
                panic!("parley all did not come up in 180 s; its log ends:\n{}", log_tail(&self.log_path()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Starts another gateway instance on the same topics and secret, with `extra_args`;
    /// returns its base URL.
    pub(crate) async fn extra_gateway(&mut self, extra_args: &[&str]) -> String {
        let port = free_port();
        let mut args =
            global_args(&self.brokers, &self.registry, &self.prefix, &self.cql, &self.keyspace, &self.collection);
        args.extend(["gateway", "--listen", &format!("127.0.0.1:{port}")].map(str::to_owned));
        args.extend(extra_args.iter().map(|a| (*a).to_owned()));
        self.extra_gateways.push(spawn(&args, &self.prefix, &format!("gateway-{port}.log")));
        let http = format!("http://127.0.0.1:{port}");
        wait_healthy(&http).await;
        http
    }

    /// A new anonymous user's token.
    pub(crate) async fn session(&self) -> String {
        self.session_user().await.1
    }

    /// A new anonymous user: (user id, token).
    pub(crate) async fn session_user(&self) -> (String, String) {
        new_session(&self.http).await
    }

    /// A socket of `token`'s user on the gateway at `http`, past its `ready` frame.
    pub(crate) async fn connect(&self, http: &str, token: &str) -> Client {
        Client::open(&format!("{}/ws?token={token}", http.replace("http://", "ws://")), true).await
    }

    /// A socket of a new user on the gateway at `http`.
    pub(crate) async fn client_at(&self, http: &str) -> Client {
        let token = self.session().await; // any instance accepts any instance's tokens
        self.connect(http, &token).await
    }

    /// A socket of a new user.
    pub(crate) async fn client(&self) -> Client {
        self.client_at(&self.http).await
    }

    /// GET on the query API as `token`'s user: (status, JSON body).
    pub(crate) async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.request(reqwest::Method::GET, path, token, None).await
    }

    pub(crate) async fn delete(&self, path: &str, token: &str) -> (u16, Value) {
        self.request(reqwest::Method::DELETE, path, token, None).await
    }

    /// One HTTP call to this pipeline's gateway as `token`: status and JSON body (or null).
    async fn request(&self, method: reqwest::Method, path: &str, token: &str, body: Option<&Value>) -> (u16, Value) {
        let mut request = reqwest::Client::new().request(method, format!("{}{path}", self.http)).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Polls a conversation on the query path until it has at least `messages` messages.
    pub(crate) async fn conversation_when(&self, token: &str, id: &str, messages: usize) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.get(&format!("/api/conversations/{id}"), token).await;
            if status == 200 && body["messages"].as_array().is_some_and(|m| m.len() >= messages) {
                return body;
            }
            assert!(Instant::now() < deadline, "conversation {id} never had {messages} messages: {status} {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// People's data keys in this pipeline's keyspace, with the master key the services
    /// were given (the environment's); None when there is none (nothing is sealed).
    #[allow(dead_code)] // not every test binary opens sealed events
    pub(crate) async fn keys(&self) -> Option<parley_projections::keys::KeyStore> {
        let text = match std::env::var("PARLEY_MASTER_KEY_FILE") {
            Ok(file) => std::fs::read_to_string(file).unwrap(),
            Err(_) => std::env::var("PARLEY_MASTER_KEY").ok()?,
        };
        let master = parley_events::sealing::MasterKey::from_base64(&text, "local:test").unwrap();
        let settings = parley_projections::CqlSettings {
            nodes: self.cql.clone(),
            keyspace: self.keyspace.clone(),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        };
        let store = parley_projections::Store::connect(&settings).await.unwrap();
        Some(parley_projections::keys::KeyStore::open(&store, std::sync::Arc::new(master)).await.unwrap())
    }

    /// `events` as their readers see them: sealed content opened with this pipeline's keys.
    #[allow(dead_code)] // not every test binary opens sealed events
    pub(crate) async fn opened(
        &self,
        mut events: Vec<parley_events::ConversationEvent>,
    ) -> Vec<parley_events::ConversationEvent> {
        if let Some(keys) = self.keys().await {
            for event in &mut events {
                keys.open_event(event).await.unwrap();
            }
        }
        events
    }

    /// Runs the `parley` command line against this pipeline's topics and keyspace.
    pub(crate) fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_parley"))
            .args(["--kafka-brokers", &self.brokers, "--schema-registry-url", &self.registry])
            .args(["--topic-prefix", &self.prefix, "--cql-nodes", &self.cql, "--cql-keyspace", &self.keyspace])
            .args(["--milvus-collection", &self.collection])
            .args(args)
            .output()
            .unwrap()
    }

    pub(crate) fn log_path(&self) -> String {
        std::env::temp_dir().join(format!("{}log", self.prefix)).display().to_string()
    }

    pub(crate) fn events_topic(&self) -> String {
        format!("{}conversation-events", self.prefix)
    }

    /// The vector store this pipeline's embedder writes.
    pub(crate) fn milvus(&self) -> MilvusSettings {
        milvus_settings(&self.collection)
    }

    /// POST of a JSON body as `token`'s user: (status, JSON body).
    pub(crate) async fn post(&self, path: &str, token: &str, body: &Value) -> (u16, Value) {
        self.request(reqwest::Method::POST, path, token, Some(body)).await
    }

    /// Polls the search API until `q` finds a hit for which `found` holds; returns the hits.
    pub(crate) async fn search_until(&self, token: &str, q: &str, found: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let path = format!("/api/search?q={}&k=10", urlencode(q));
            let (status, body) = self.get(&path, token).await;
            let hits = body["hits"].as_array().cloned().unwrap_or_default();
            if status == 200 && hits.iter().any(&found) {
                return hits;
            }
            assert!(Instant::now() < deadline, "search for {q:?} never found the expected hit: {status} {body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the processes and deletes this test's topics and vector collection.
    /// The `parley all` process's id (for its memory and CPU time).
    /// The outcome (answer or failure) of the query `query_event_id` once it is in the log:
    /// what a test waits for instead of sleeping through "the turn is over by now".
    pub(crate) async fn outcome_in_log(&self, query_event_id: &str) -> parley_events::ConversationEvent {
        use parley_events::ConversationEvent;
        let topic = self.events_topic();
        let query: parley_events::EventId = query_event_id.parse().expect("an ack's event id");
        wait_until("the query's outcome in the log", || {
            let (brokers, registry, topic) = (&self.brokers, &self.registry, &topic);
            async move {
                log_to_end(brokers, registry, topic).await.into_iter().find(|event| match event {
                    ConversationEvent::ResponseGenerated(answer) => answer.query_event_id == query,
                    ConversationEvent::ResponseFailed(failed) => failed.query_event_id == query,
                    _ => false,
                })
            }
        })
        .await
    }

    /// Waits until consumer group `group` has committed an offset past `offset` of
    /// `topic`/`partition`: it has read the record there and is done with it (so "it did
    /// nothing with it" can be asserted without sleeping).
    pub(crate) async fn wait_consumed(&self, group: &str, topic: &str, partition: i32, offset: i64) {
        wait_until(&format!("{group} past {topic}/{partition}/{offset}"), || {
            let (brokers, group, topic) = (self.brokers.clone(), group.to_owned(), topic.to_owned());
            async move {
                let committed =
                    tokio::task::spawn_blocking(move || committed_offset(&brokers, &group, &topic, partition))
                        .await
                        .unwrap();
                committed.filter(|committed| *committed > offset)
            }
        })
        .await;
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) async fn stop(mut self) {
        self.kill_all();
        let _ = VectorStore::drop_collection(&self.milvus()).await;
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &self.brokers).create().unwrap();
        let topics: Vec<String> =
            parley_eventlog::Topics::with_prefix(&self.prefix).specs().into_iter().map(|spec| spec.name).collect();
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
    }

    fn kill_all(&mut self) {
        let parts = self.parts.iter_mut().map(|(_, child)| child);
        for child in std::iter::once(&mut self.child).chain(self.extra_gateways.iter_mut()).chain(parts) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.kill_all(); // a failed test still stops its processes
    }
}

/// A new anonymous user of the gateway at `http`: (user id, token).
pub(crate) async fn new_session(http: &str) -> (String, String) {
    let session: Value =
        reqwest::Client::new().post(format!("{http}/api/session")).send().await.unwrap().json().await.unwrap();
    (session["user_id"].as_str().unwrap().to_owned(), session["token"].as_str().unwrap().to_owned())
}

/// What `ready` gives, once it gives something (a minute at most; `what` names it).
pub(crate) async fn wait_until<T, F: Future<Output = Option<T>>>(what: &str, mut ready: impl FnMut() -> F) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(value) = ready().await {
            return value;
        }
        assert!(Instant::now() < deadline, "waited a minute for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (up to a minute) until the gateway at `http` answers `/healthz`.
pub(crate) async fn wait_healthy(http: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while reqwest::get(format!("{http}/healthz")).await.is_err() {
        assert!(Instant::now() < deadline, "the gateway at {http} did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Milvus settings from the environment (PARLEY_MILVUS_URL) for `collection`.
pub(crate) fn milvus_settings(collection: &str) -> MilvusSettings {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        milvus: MilvusSettings,
    }
    <Cli as clap::Parser>::parse_from(["test", "--milvus-collection", collection]).milvus
}

/// The `p`th percentile (0–100) of ascending `sorted` samples, nearest rank.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[(((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize).min(sorted.len() - 1)]
}

/// The ids of the `k` vectors among `candidates` nearest to `query` by inner product, in no
/// order: exact search, the truth a vector index's recall is measured against and the raw
/// limit of its latency.
pub(crate) fn exact_top_k<'a>(
    candidates: impl Iterator<Item = (usize, &'a [f32])>,
    query: &[f32],
    k: usize,
) -> Vec<usize> {
    let mut scored: Vec<(f32, usize)> =
        candidates.map(|(id, v)| (v.iter().zip(query).map(|(a, b)| a * b).sum(), id)).collect();
    if scored.len() > k {
        scored.select_nth_unstable_by(k, |a, b| b.0.total_cmp(&a.0));
        scored.truncate(k);
    }
    scored.into_iter().map(|(_, id)| id).collect()
}

/// Percent-encodes a query-string value.
pub(crate) fn urlencode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The last lines of a process log, for failure messages that explain themselves in CI.
pub(crate) fn log_tail(path: &str) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_else(|error| format!("({path}: {error})"));
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The secret that signs the anonymous tokens of every process the tests start (given as
/// the environment variable: secrets are never arguments).
pub(crate) const AUTH_SECRET: &str = "test-secret";

pub(crate) fn spawn(args: &[String], prefix: &str, log_name: &str) -> Child {
    spawn_wrapped(&[], args, prefix, log_name)
}

/// [`spawn`] with `wrap` before the binary (e.g. `valgrind --tool=callgrind`).
fn spawn_wrapped(wrap: &[String], args: &[String], prefix: &str, log_name: &str) -> Child {
    let log = std::fs::File::create(std::env::temp_dir().join(format!("{prefix}{log_name}"))).unwrap();
    let mut command = match wrap.split_first() {
        Some((program, wrap_args)) => {
            let mut command = Command::new(program);
            command.args(wrap_args).arg(env!("CARGO_BIN_EXE_parley"));
            command
        }
        None => Command::new(env!("CARGO_BIN_EXE_parley")),
    };
    command.env("PARLEY_AUTH_SECRET", AUTH_SECRET);
    // A test that names its model server means that one, not the stack's pool.
    if args.iter().any(|a| a == "--llm-base-url" || a == "--llm-endpoint") {
        command.env_remove("PARLEY_LLM_ENDPOINTS");
    }
    command.args(args).stdout(Stdio::null()).stderr(log).spawn().unwrap()
}

/// A llama.cpp server of the test's own on `port`, answering as model `alias`
/// (PARLEY_LLM_SERVER_COMMAND, set by infra/lib.sh).
pub(crate) fn start_model_server(port: u16, alias: &str) -> Child {
    let command = std::env::var("PARLEY_LLM_SERVER_COMMAND").expect("PARLEY_LLM_SERVER_COMMAND (infra/lib.sh)");
    let mut words = command.split_whitespace();
    Command::new(words.next().unwrap())
        .args(words)
        .args(["--port", &port.to_string(), "--alias", alias, "--parallel", "2", "--ctx", "4096"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits (up to a minute) until the model server at `base_url` lists its models.
pub(crate) async fn wait_until_serving(base_url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reqwest::get(format!("{base_url}/models")).await.is_ok_and(|r| r.status().is_success()) {
        assert!(Instant::now() < deadline, "model server at {base_url} did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) struct Client {
    pub socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Whether every frame must be one the gateway's `ServerFrame` describes.
    typed: bool,
}

/// Long enough for the tiny local model to answer under parallel tests on 2 cores.
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

impl Client {
    /// A socket at `url`, past its `ready` frame. `typed`: every frame must be one the
    /// gateway's `ServerFrame` describes (false only for a reference design, which speaks
    /// a subset of the protocol).
    pub(crate) async fn open(url: &str, typed: bool) -> Client {
        let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let mut client = Client { socket, typed };
        let ready = client.next_frame().await;
        assert_eq!(ready["type"], "ready", "{ready}");
        client
    }

    pub(crate) async fn send(&mut self, frame: Value) {
        self.socket.send(Message::Text(frame.to_string().into())).await.unwrap();
    }

    pub(crate) async fn send_raw(&mut self, text: String) {
        self.socket.send(Message::Text(text.into())).await.unwrap();
    }

    pub(crate) async fn ask(&mut self, client_message_id: &str, conversation_id: Option<&str>, text: &str) {
        let mut frame = json!({"type": "query", "client_message_id": client_message_id, "text": text});
        if let Some(id) = conversation_id {
            frame["conversation_id"] = json!(id);
        }
        self.send(frame).await;
    }

    pub(crate) async fn next_frame(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(ANSWER_TIMEOUT, self.socket.next())
                .await
                .expect("no frame within the timeout")
                .expect("socket closed")
                .expect("socket error");
            if let Message::Text(text) = message {
                // Every frame any test reads must be one the gateway's own type describes.
                if let Err(error) = serde_json::from_str::<ServerFrame>(text.as_str()) {
                    assert!(!self.typed, "not a server frame ({error}): {text}");
                }
                return serde_json::from_str(text.as_str()).unwrap();
            }
        }
    }

    /// The next frame, read with the gateway's own type (one it cannot read fails the test).
    pub(crate) async fn frame(&mut self) -> ServerFrame {
        serde_json::from_value(self.next_frame().await).expect("checked by next_frame")
    }

    /// Typed frames up to the first `answer` or `failed`.
    pub(crate) async fn turn(&mut self) -> Vec<ServerFrame> {
        let mut frames = Vec::new();
        loop {
            let frame = self.frame().await;
            let done = matches!(frame, ServerFrame::Answer { .. } | ServerFrame::Failed { .. });
            frames.push(frame);
            if done {
                return frames;
            }
        }
    }

    /// The `ack` or `error` frame that answers the query `client_message_id` (skipping the
    /// tokens and outcomes of earlier turns).
    pub(crate) async fn reply_to(&mut self, client_message_id: &str) -> Value {
        loop {
            let frame = self.next_frame().await;
            if (frame["type"] == "ack" || frame["type"] == "error") && frame["client_message_id"] == client_message_id {
                return frame;
            }
        }
    }

    /// Frames up to and including the first of type `kind`.
    pub(crate) async fn until(&mut self, kind: &str) -> Vec<Value> {
        let mut frames = Vec::new();
        loop {
            let frame = self.next_frame().await;
            let done = frame["type"] == kind;
            frames.push(frame);
            if done {
                return frames;
            }
        }
    }

    /// Frames up to the first `answer` or `failed`.
    pub(crate) async fn until_outcome(&mut self) -> Vec<Value> {
        let mut frames = Vec::new();
        loop {
            let frame = self.next_frame().await;
            let done = frame["type"] == "answer" || frame["type"] == "failed";
            frames.push(frame);
            if done {
                return frames;
            }
        }
    }
}

/// Writes `conversations` synthetic conversations of `turns` turns each (Started, then a
/// query and an answer per turn) straight to the events topic, as the services would.
pub(crate) async fn write_synthetic(
    brokers: &str,
    registry: &str,
    topic: &str,
    conversations: usize,
    turns: usize,
) -> Vec<(parley_events::ConversationId, Vec<parley_events::ConversationEvent>)> {
    write_synthetic_of(brokers, registry, topic, conversations, turns, |c| format!("user-{}", c % 7)).await
}

/// [`write_synthetic`] with conversation `c` owned by `owner(c)`.
pub(crate) async fn write_synthetic_of(
    brokers: &str,
    registry: &str,
    topic: &str,
    conversations: usize,
    turns: usize,
    owner: impl Fn(usize) -> String,
) -> Vec<(parley_events::ConversationId, Vec<parley_events::ConversationEvent>)> {
    write_synthetic_in_flight(brokers, registry, topic, conversations, turns, 1, owner).await
}

/// [`write_synthetic_of`], the conversations written `in_flight` at a time, their events
/// interleaved (one event of each in turn) as a log of many people chatting at once has
/// them; 1 writes each conversation whole before the next.
#[allow(dead_code)] // the benchmarks' realistic logs
pub(crate) async fn write_synthetic_in_flight(
    brokers: &str,
    registry: &str,
    topic: &str,
    conversations: usize,
    turns: usize,
    in_flight: usize,
    owner: impl Fn(usize) -> String,
) -> Vec<(parley_events::ConversationId, Vec<parley_events::ConversationEvent>)> {
    use parley_events::*;
    const P: Producer = Producer { name: "synthetic", version: "0" };
    let codec = std::sync::Arc::new(EventCodec::new(registry).unwrap());
    let producer =
        parley_eventlog::EventProducer::new(ClientConfig::new().set("bootstrap.servers", brokers).clone(), codec)
            .unwrap();
    let mut written = Vec::new();
    let mut pending = Vec::new();
    for c in 0..conversations {
        let id = ConversationId::random();
        let user: UserId = owner(c).parse().unwrap();
        let mut events = vec![ConversationEvent::Started(ConversationStarted {
            envelope: Envelope::new(EventId::random(), id, 1, P),
            user_id: user.clone(),
        })];
        for t in 0..turns {
            let sequence = 2 + 2 * t as i64;
            let query_id = turn::query_event_id(id, &format!("m{t}"));
            events.push(ConversationEvent::QueryReceived(UserQueryReceived {
                sealed_for: String::new(),
                envelope: Envelope::new(query_id, id, sequence, P),
                user_id: user.clone(),
                client_message_id: format!("m{t}"),
                text: format!("question {t} of conversation {c}"),
                no_cache: false,
            }));
            events.push(ConversationEvent::ResponseGenerated(LLMResponseGenerated {
                sealed_for: String::new(),
                envelope: Envelope::new(EventId::random(), id, sequence + 1, P),
                query_event_id: query_id,
                text: format!("answer {t} of conversation {c}"),
                model: "synthetic".into(),
                finish_reason: "stop".into(),
                prompt_tokens: 10,
                completion_tokens: 5,
                llm_latency_ms: 1,
                time_to_first_token_ms: None,
                attempts: 1,
                context_event_ids: vec![],
                user_id: None,
                retrieved: vec![],
                context_fingerprint: String::new(),
                cached_from: None,
                prompt: None,
            }));
        }
        written.push((id, events));
    }
    for group in written.chunks(in_flight.max(1)) {
        let longest = group.iter().map(|(_, events)| events.len()).max().unwrap_or(0);
        let order: Vec<(usize, usize)> = (0..longest).flat_map(|i| (0..group.len()).map(move |c| (c, i))).collect();
        for (c, i) in order {
            let (id, events) = &group[c];
            let Some(event) = events.get(i) else { continue };
            let key = id.to_string();
            type Delivery = std::pin::Pin<
                Box<dyn Future<Output = Result<parley_eventlog::LogPosition, parley_eventlog::EventLogError>> + Send>,
            >;
            let delivery: Delivery = match event {
                ConversationEvent::Started(e) => Box::pin(producer.enqueue(topic, &key, e, None).await.unwrap()),
                ConversationEvent::QueryReceived(e) => Box::pin(producer.enqueue(topic, &key, e, None).await.unwrap()),
                ConversationEvent::ResponseGenerated(e) => {
                    Box::pin(producer.enqueue(topic, &key, e, None).await.unwrap())
                }
                ConversationEvent::ResponseFailed(e) => Box::pin(producer.enqueue(topic, &key, e, None).await.unwrap()),
                ConversationEvent::CancelRequested(e) => {
                    Box::pin(producer.enqueue(topic, &key, e, None).await.unwrap())
                }
            };
            pending.push(delivery);
        }
    }
    for delivery in futures::future::join_all(pending).await {
        delivery.unwrap();
    }
    written
}

/// Drops a keyspace a test created for itself.
pub(crate) async fn drop_keyspace(cql: &str, keyspace: &str) {
    let session = scylla::client::session_builder::SessionBuilder::new().known_node(cql).build().await.unwrap();
    session.query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ()).await.unwrap();
}

/// A read_committed consumer of every partition of `topic` from its start (reporting each
/// partition's end when `eof`), and the number of partitions.
pub(crate) fn reader_from_start(brokers: &str, topic: &str, eof: bool) -> (rdkafka::consumer::StreamConsumer, usize) {
    use rdkafka::consumer::Consumer;

    let consumer: rdkafka::consumer::StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4().simple()))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", if eof { "true" } else { "false" })
        .create()
        .unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut assignment = rdkafka::TopicPartitionList::new();
    for partition in metadata.topics()[0].partitions() {
        assignment.add_partition_offset(topic, partition.id(), rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&assignment).unwrap();
    (consumer, assignment.count())
}

/// Every committed event of `topic` that decodes, read from the start to the end of each partition.
pub(crate) async fn log_to_end(brokers: &str, registry: &str, topic: &str) -> Vec<parley_events::ConversationEvent> {
    use rdkafka::Message;

    let codec = parley_events::EventCodec::new(registry).unwrap();
    let (consumer, mut open) = reader_from_start(brokers, topic, true);
    let mut events = Vec::new();
    while open > 0 {
        match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.expect("the topic's end") {
            Ok(message) => {
                // A poison record some test wrote on purpose is not an event.
                if let Ok(decoded) = codec.decode_conversation_event(message.payload().unwrap_or_default()).await {
                    events.push(decoded.event);
                }
            }
            Err(rdkafka::error::KafkaError::PartitionEOF(_)) => open -= 1,
            Err(error) => panic!("reading {topic}: {error}"),
        }
    }
    events
}

/// The first `count` events of `topic` (read_committed, from the start) whose key is
/// `conversation` (or any), with each record's `traceparent` header, ordered by
/// conversation and sequence.
pub(crate) async fn log_events(
    brokers: &str,
    registry: &str,
    topic: &str,
    conversation: Option<&str>,
    count: usize,
) -> Vec<(parley_events::ConversationEvent, Option<String>)> {
    use rdkafka::Message;
    use rdkafka::message::Headers;

    let codec = parley_events::EventCodec::new(registry).unwrap();
    let (consumer, _) = reader_from_start(brokers, topic, false);
    let mut events = Vec::new();
    while events.len() < count {
        let message =
            tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.expect("events on the topic").unwrap();
        if conversation.is_some_and(|c| message.key() != Some(c.as_bytes())) {
            continue;
        }
        let traceparent = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "traceparent").and_then(|h| h.value))
            .map(|v| String::from_utf8_lossy(v).into_owned());
        events.push((codec.decode_conversation_event(message.payload().unwrap()).await.unwrap().event, traceparent));
    }
    events.sort_by_key(|(e, _)| (e.envelope().conversation_id, e.envelope().sequence));
    events
}

/// The offset `group` committed on `topic`/`partition`, if any.
fn committed_offset(brokers: &str, group: &str, topic: &str, partition: i32) -> Option<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", group).create().unwrap();
    let mut wanted = rdkafka::TopicPartitionList::new();
    wanted.add_partition(topic, partition);
    let committed = consumer.committed_offsets(wanted, Duration::from_secs(10)).ok()?;
    match committed.find_partition(topic, partition)?.offset() {
        rdkafka::Offset::Offset(offset) => Some(offset),
        _ => None,
    }
}
