//! The fault-injection suite: a steady chat load over real WebSockets while each part of
//! the pipeline is killed with SIGKILL and restarted in turn (a gateway, inference in the
//! middle of generations, the embedder, the projector, the llama.cpp server, a Kafka
//! broker), then the promises are checked from every side: the log, the projection,
//! Milvus and what each client received. Used by tests/fault_e2e.rs (a size CI affords)
//! and benches/faults.rs (longer).
//!
//! The run owns its Kafka (one node, or three with PARLEY_KAFKA_NODES=3, started by
//! infra/stack.sh in a directory of its own), its model server and its `parley`
//! processes; the registry, the CQL store and Milvus are the stack's.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use parley_events::ConversationEvent;
use parley_events::invariants::violations;
use parley_retrieval::{SearchFilter, SourceKind, VectorStore};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{self, Stack, free_port, log_tail, spawn, start_model_server, wait_healthy, wait_until_serving};

/// What the suite kills, in the order it kills them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    Gateway,
    Inference,
    Embedder,
    Projector,
    Model,
    Kafka,
}

impl Fault {
    pub(crate) const ALL: [Fault; 6] =
        [Fault::Gateway, Fault::Inference, Fault::Embedder, Fault::Projector, Fault::Model, Fault::Kafka];

    /// What "recovered" means for this fault, as the report states it.
    pub(crate) fn recovery(self) -> &'static str {
        match self {
            Fault::Gateway => "first answer on a socket opened after the kill",
            Fault::Inference | Fault::Model | Fault::Kafka => "first answer generated after the kill reaches a client",
            Fault::Embedder => "a query acked after the kill has its vector in Milvus",
            Fault::Projector => "the projection serves a query acked after the kill",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Simulated users, each chatting in its own conversation, one turn after the other.
    pub clients: usize,
    /// How many times the whole list of faults is injected.
    pub rounds: usize,
    /// Kafka nodes (1, or 3: a cluster with replication 3 and min.insync 2).
    pub kafka_nodes: usize,
}

impl Settings {
    /// `clients` and `rounds`, with the Kafka size from PARLEY_KAFKA_NODES (default 1).
    pub(crate) fn from_env(clients: usize, rounds: usize) -> Self {
        let kafka_nodes = std::env::var("PARLEY_KAFKA_NODES").ok().and_then(|n| n.parse().ok()).unwrap_or(1);
        Self { clients, rounds, kafka_nodes }
    }
}

/// One injected fault and how long the pipeline took to serve again.
#[derive(Debug, Clone)]
pub(crate) struct Injected {
    pub fault: Fault,
    /// Which process: e.g. `gateway 1`, `kafka2`.
    pub target: String,
    pub recovered_after: Option<Duration>,
}

/// What the run saw and what the checks found. The targets: `lost`, `duplicated`,
/// `projection_mismatches`, `vectors_missing` and `vectors_extra` all zero.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub faults: Vec<Injected>,
    /// Queries acknowledged to a client.
    pub turns: usize,
    pub answered: usize,
    /// Turns whose outcome is a `ResponseFailed` (the model was unreachable for all retries).
    pub failed: usize,
    /// Resends a client made (after a reconnect, a refusal, or 30 s of silence).
    pub resends: usize,
    /// Turns the gateway refused as `overloaded` (shed) or `rate_limited`, then resent.
    pub refusals: usize,
    pub reconnects: usize,
    /// Acknowledged queries without an outcome in the log or at their client.
    pub lost: usize,
    /// Events written twice, queries answered twice, answers shown twice on one socket,
    /// or a client given an outcome other than the log's.
    pub duplicated: usize,
    /// Frames a client did not expect: errors other than `unavailable`, acks or outcomes
    /// of messages it never sent.
    pub surprises: usize,
    /// Conversations whose projection differs from the fold of their events.
    pub projection_mismatches: usize,
    pub vectors_missing: usize,
    pub vectors_extra: usize,
    /// Every finding behind a non-zero count above, for the failure message.
    pub findings: Vec<String>,
}

impl Report {
    pub(crate) fn clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.surprises == 0
            && self.projection_mismatches == 0
            && self.vectors_missing == 0
            && self.vectors_extra == 0
            && self.faults.iter().all(|f| f.recovered_after.is_some())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "| fault | killed | recovered after | measured as |")?;
        writeln!(f, "|---|---|---|---|")?;
        for injected in &self.faults {
            let after =
                injected.recovered_after.map_or("not recovered".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()));
            writeln!(f, "| {:?} | {} | {after} | {} |", injected.fault, injected.target, injected.fault.recovery())?;
        }
        writeln!(
            f,
            "\nfaults {}, turns {}, answered {}, failed {}, lost {}, duplicated {}, surprises {}, \
             projection mismatches {}, vectors missing {}, vectors extra {}, resends {}, reconnects {}, \
             refused (overloaded or rate limited) {}",
            self.faults.len(),
            self.turns,
            self.answered,
            self.failed,
            self.lost,
            self.duplicated,
            self.surprises,
            self.projection_mismatches,
            self.vectors_missing,
            self.vectors_extra,
            self.resends,
            self.reconnects,
            self.refusals
        )?;
        for finding in &self.findings {
            writeln!(f, "  {finding}")?;
        }
        Ok(())
    }
}

const QUESTIONS: [&str; 4] = ["Say OK.", "What is 2+2?", "Name a color.", "Say hello."];
/// A client that hears nothing for this long resends its open query (it cannot know
/// whether the query arrived).
const SILENCE: Duration = Duration::from_secs(30);
/// Bound on each wait of the run (recovery, settling, the final drain).
const PATIENCE: Duration = Duration::from_secs(180);

/// An outcome frame as a client received it.
#[derive(Debug, Clone)]
struct Received {
    event_id: String,
    failed: bool,
    /// Which of the client's sockets (0, 1, ...) it came on.
    socket: usize,
    socket_opened: Instant,
    at: Instant,
}

#[derive(Debug, Default, Clone)]
struct Turn {
    client_message_id: String,
    query_event_id: Option<String>,
    position: Option<String>,
    acked_at: Option<Instant>,
    /// How often the query was sent (more than once: resent).
    sends: usize,
    outcomes: Vec<Received>,
}

/// One simulated user's view of the run.
#[derive(Debug, Default)]
struct Transcript {
    user_id: String,
    token: String,
    conversation_id: Option<String>,
    turns: Vec<Turn>,
    sockets: usize,
    /// `overloaded` or `rate_limited` answers (each followed by a resend).
    refusals: usize,
    /// Error frames other than `unavailable`, and outcomes for queries it never sent.
    surprises: Vec<String>,
}

impl Transcript {
    fn completed(&self) -> usize {
        self.turns.iter().filter(|t| !t.outcomes.is_empty()).count()
    }
}

type Shared = Arc<Mutex<Transcript>>;

/// The run's own Kafka, one node or three, started and stopped by infra/stack.sh in a
/// directory of its own.
struct Kafka {
    run_dir: PathBuf,
    base_port: u16,
    nodes: usize,
}

impl Kafka {
    async fn start(nodes: usize) -> Kafka {
        let base_port = loop {
            let port = free_port();
            let span = u16::try_from(2 * nodes).unwrap();
            if port < 31_990 && (port..port + span).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
                break port;
            }
        };
        let run_dir = std::env::temp_dir().join(format!("parley-faults-{}", uuid::Uuid::new_v4().simple()));
        let kafka = Kafka { run_dir, base_port, nodes };
        kafka.stack(&["start"]).await;
        kafka
    }

    fn services(&self) -> Vec<String> {
        if self.nodes == 1 { vec!["kafka".to_owned()] } else { (1..=self.nodes).map(|n| format!("kafka{n}")).collect() }
    }

    fn brokers(&self) -> String {
        (0..self.nodes).map(|n| format!("127.0.0.1:{}", self.base_port + 2 * n as u16)).collect::<Vec<_>>().join(",")
    }

    /// `infra/stack.sh <action> <kafka services>` on this run's directory and ports.
    async fn stack(&self, action: &[&str]) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/infra/stack.sh");
        let mut command = tokio::process::Command::new("bash");
        command.arg(script).args(action);
        if action.len() == 1 {
            command.args(self.services());
        }
        let output = command
            .env("PARLEY_RUN", &self.run_dir)
            .env("PARLEY_KAFKA_NODES", self.nodes.to_string())
            .env("KAFKA_PORT", self.base_port.to_string())
            .env("KAFKA_CONTROLLER_PORT", (self.base_port + 1).to_string())
            .env_remove("PARLEY_KAFKA_BROKERS")
            .output()
            .await
            .unwrap();
        if !output.status.success() {
            let logs = self
                .services()
                .into_iter()
                .map(|s| log_tail(&self.run_dir.join(format!("logs/{s}.log")).display().to_string()));
            panic!(
                "infra/stack.sh {action:?} for the suite's Kafka failed:\n{}\n{}",
                String::from_utf8_lossy(&output.stderr),
                logs.collect::<Vec<_>>().join("\n")
            );
        }
    }

    /// SIGKILL of one node (the last: with three, not the first bootstrap address).
    fn kill(&self) -> String {
        let service = self.services().pop().unwrap();
        let pid_file = self.run_dir.join("pids").join(format!("{service}.pid"));
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let pid = pid.split_whitespace().next().unwrap();
        assert!(Command::new("kill").args(["-9", pid]).status().unwrap().success(), "kill -9 {service} ({pid})");
        // Gone or a zombie (nobody may reap it): until then it would pass for a node still
        // starting, and infra/stack.sh would not start a new one.
        let stat = format!("/proc/{pid}/stat");
        while std::fs::read_to_string(&stat)
            .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        service
    }

    async fn restart(&self, service: &str) {
        self.stack(&["start", service]).await;
    }

    async fn stop(self) {
        self.stack(&["stop"]).await;
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

impl Drop for Kafka {
    /// A failed run still stops its brokers (by the pid files infra/stack.sh wrote).
    fn drop(&mut self) {
        for service in self.services() {
            let pid_file = self.run_dir.join("pids").join(format!("{service}.pid"));
            let pid =
                std::fs::read_to_string(pid_file).ok().and_then(|p| p.split_whitespace().next().map(str::to_owned));
            // Only a process of this run (its command line names the run's directory).
            let ours = |pid: &str| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*self.run_dir.to_string_lossy()))
            };
            if let Some(pid) = pid.filter(|pid| ours(pid)) {
                let _ = Command::new("kill").args(["-9", &pid]).status();
            }
        }
    }
}

/// A `parley` process the suite can kill and start again with the same options.
struct Service {
    name: String,
    args: Vec<String>,
    prefix: String,
    child: Child,
    starts: usize,
}

impl Service {
    fn start(name: &str, args: Vec<String>, prefix: &str) -> Service {
        let child = spawn(&args, prefix, &format!("{name}.log"));
        Service { name: name.to_owned(), args, prefix: prefix.to_owned(), child, starts: 1 }
    }

    fn log_name(&self) -> String {
        self.log_name_of(self.starts)
    }

    /// The log of incarnation `start` (1: the first).
    fn log_name_of(&self, start: usize) -> String {
        if start == 1 { format!("{}.log", self.name) } else { format!("{}.{start}.log", self.name) }
    }

    /// The log of the running incarnation.
    fn log(&self) -> String {
        std::env::temp_dir().join(format!("{}{}", self.prefix, self.log_name())).display().to_string()
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.kill();
        self.starts += 1;
        self.child = spawn(&self.args, &self.prefix, &self.log_name());
    }

    /// The lines of every incarnation's log that mention one of `ids` or a change of the
    /// partitions it owns or of its transactions: how a query came to be answered twice.
    fn story(&self, ids: &[&str]) -> String {
        const MOVES: [&str; 4] = ["partition assigned", "partition revoked", "transaction aborted", "rebalance"];
        let lines = (1..=self.starts).flat_map(|start| {
            let name = self.log_name_of(start);
            let path = std::env::temp_dir().join(format!("{}{name}", self.prefix));
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            let relevant: Vec<String> = log
                .lines()
                .filter(|line| ids.iter().chain(MOVES.iter()).any(|needle| line.contains(needle)))
                .map(|line| format!("[{name}] {line}"))
                .collect();
            relevant
        });
        let lines: Vec<String> = lines.collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    }

    /// Panics with the process's log if it exited on its own.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited with {status}:\n{}", self.name, log_tail(&self.log()));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

struct ModelServer {
    port: u16,
    child: Child,
}

impl ModelServer {
    const ALIAS: &str = "SmolLM2-135M-Instruct";

    async fn start() -> ModelServer {
        let port = free_port();
        let server = ModelServer { port, child: start_model_server(port, Self::ALIAS) };
        wait_until_serving(&server.url()).await;
        server
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = start_model_server(self.port, Self::ALIAS);
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything the run started.
struct Pipeline {
    kafka: Kafka,
    model: ModelServer,
    gateways: Vec<Service>,
    gateway_urls: Vec<String>,
    inference: Service,
    projector: Service,
    embedder: Service,
    common: Vec<String>,
    prefix: String,
    collection: String,
}

impl Pipeline {
    async fn start(stack: &Stack, settings: &Settings) -> Pipeline {
        let kafka = Kafka::start(settings.kafka_nodes).await;
        let model = ModelServer::start().await;
        let id = uuid::Uuid::new_v4().simple();
        let prefix = format!("faults-{id}.");
        let collection = format!("faults_{id}");
        let common = support::global_args(
            &kafka.brokers(),
            &stack.registry,
            &prefix,
            &stack.cql,
            support::TEST_KEYSPACE,
            &collection,
        );
        let cli = |args: &[&str]| -> Output {
            Command::new(env!("CARGO_BIN_EXE_parley")).args(&common).args(args).output().unwrap()
        };
        for setup in [&["topics"][..], &["schemas", "register"]] {
            let output = cli(setup);
            assert!(output.status.success(), "parley {setup:?}: {}", String::from_utf8_lossy(&output.stderr));
        }
        let with = |args: &[&str]| -> Vec<String> {
            common.iter().cloned().chain(args.iter().map(|a| (*a).to_owned())).collect()
        };
        let mut gateways = Vec::new();
        let mut gateway_urls = Vec::new();
        for n in 0..2 {
            let listen = format!("127.0.0.1:{}", free_port());
            // Its users ask as fast as the model answers, faster than the default limits allow.
            let args = with(&[&["gateway", "--listen", &listen][..], &support::NO_RATE_LIMITS].concat());
            gateways.push(Service::start(&format!("gateway-{n}"), args, &prefix));
            gateway_urls.push(format!("http://{listen}"));
        }
        let model_url = model.url();
        let inference = Service::start(
            "inference",
            with(&["--instance-id", "faults-inference", "inference", "--llm-base-url", &model_url]),
            &prefix,
        );
        let projector =
            Service::start("projector", with(&["--instance-id", "faults-projector", "projection"]), &prefix);
        let embedder = Service::start("embedder", with(&["--instance-id", "faults-embedder", "embedder"]), &prefix);
        for url in &gateway_urls {
            wait_healthy(url).await;
        }
        Pipeline { kafka, model, gateways, gateway_urls, inference, projector, embedder, common, prefix, collection }
    }

    fn events_topic(&self) -> String {
        format!("{}conversation-events", self.prefix)
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_parley")).args(&self.common).args(args).output().unwrap()
    }

    fn assert_running(&mut self) {
        for service in self.gateways.iter_mut().chain([&mut self.inference, &mut self.projector, &mut self.embedder]) {
            service.assert_running();
        }
    }

    async fn stop(self) {
        let Pipeline { kafka, model, gateways, inference, projector, embedder, collection, .. } = self;
        drop((model, gateways, inference, projector, embedder));
        let _ = VectorStore::drop_collection(&support::milvus_settings(&collection)).await;
        kafka.stop().await;
    }
}

/// One simulated user: asks, waits for the outcome, asks again, until `stop`; on a lost
/// socket reconnects (to the next gateway when one refuses) and resends its open query
/// with the same client_message_id, as docs/protocol.md tells a client to.
async fn chat(index: usize, transcript: Shared, gateways: Vec<String>, stop: Arc<AtomicBool>) {
    let token = transcript.lock().unwrap().token.clone();
    let mut gateway = index % gateways.len();
    let mut socket = None;
    let mut socket_opened = Instant::now();
    let mut open: Option<usize> = None; // index of the turn waiting for its outcome
    let mut send = false;
    loop {
        if open.is_none() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let mut t = transcript.lock().unwrap();
            let n = t.turns.len();
            t.turns.push(Turn { client_message_id: format!("u{index}-t{n}"), ..Turn::default() });
            open = Some(n);
            send = true;
        }
        let Some(ws) = socket.as_mut() else {
            let url = format!("{}/ws?token={token}", gateways[gateway].replace("http://", "ws://"));
            match tokio_tungstenite::connect_async(url).await {
                Ok((ws, _)) => {
                    socket = Some(ws);
                    socket_opened = Instant::now();
                    transcript.lock().unwrap().sockets += 1;
                    send = true;
                }
                Err(_) => {
                    gateway = (gateway + 1) % gateways.len();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            continue;
        };
        if send {
            let frame = {
                let mut t = transcript.lock().unwrap();
                let turn = &t.turns[open.unwrap()];
                let mut frame = json!({"type": "query", "client_message_id": turn.client_message_id,
                    "text": QUESTIONS[open.unwrap() % QUESTIONS.len()]});
                if let Some(conversation) = &t.conversation_id {
                    frame["conversation_id"] = json!(conversation);
                }
                t.turns[open.unwrap()].sends += 1;
                frame
            };
            if ws.send(Message::Text(frame.to_string().into())).await.is_err() {
                socket = None;
                continue;
            }
            send = false;
        }
        let frame = match tokio::time::timeout(SILENCE, ws.next()).await {
            Err(_) => {
                send = true; // unsure whether the query arrived: resend it
                continue;
            }
            Ok(None | Some(Err(_))) => {
                socket = None;
                continue;
            }
            Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str::<Value>(text.as_str()).unwrap(),
            Ok(Some(Ok(_))) => continue,
        };
        // Refused (nothing was written): the same query is sent again after the pause.
        let refused = record(&mut transcript.lock().unwrap(), &frame, &mut open, socket_opened);
        if let Some(pause) = refused {
            tokio::time::sleep(pause).await;
            send = true;
        }
    }
    if let Some(mut ws) = socket {
        let _ = ws.close(None).await;
    }
}

/// Notes one frame in the transcript; closes the open turn on its outcome. When the
/// gateway refused the query and said it may be sent again (`unavailable`, `overloaded`:
/// a stalled pipeline sheds load; `rate_limited`), how long to wait first, as
/// docs/protocol.md tells a client.
fn record(t: &mut Transcript, frame: &Value, open: &mut Option<usize>, socket_opened: Instant) -> Option<Duration> {
    match frame["type"].as_str().unwrap_or_default() {
        "ack" => {
            t.conversation_id = frame["conversation_id"].as_str().map(str::to_owned);
            match t.turns.iter_mut().find(|turn| frame["client_message_id"] == turn.client_message_id) {
                Some(turn) => {
                    turn.query_event_id = frame["event_id"].as_str().map(str::to_owned);
                    turn.position = frame["position"].as_str().map(str::to_owned);
                    turn.acked_at.get_or_insert_with(Instant::now);
                }
                None => t.surprises.push(format!("an ack for a message it never sent: {frame}")),
            }
        }
        kind @ ("answer" | "failed") => {
            let turn = t
                .turns
                .iter()
                .position(|turn| turn.query_event_id.as_deref().is_some_and(|id| frame["query_event_id"] == id));
            let Some(n) = turn else {
                t.surprises.push(format!("an outcome for a query it never sent: {frame}"));
                return None;
            };
            let socket = t.sockets - 1;
            t.turns[n].outcomes.push(Received {
                event_id: frame["event_id"].as_str().unwrap_or_default().to_owned(),
                failed: kind == "failed",
                socket,
                socket_opened,
                at: Instant::now(),
            });
            if *open == Some(n) {
                *open = None;
            }
        }
        "error" if frame["code"] == "unavailable" => return Some(Duration::from_millis(500)),
        "error" if frame["code"] == "overloaded" || frame["code"] == "rate_limited" => {
            t.refusals += 1;
            return Some(Duration::from_millis(frame["retry_after_ms"].as_u64().unwrap_or(1_000)));
        }
        "error" => t.surprises.push(format!("error frame: {frame}")),
        _ => {}
    }
    None
}

/// Runs the suite: load, faults, drain, checks.
pub(crate) async fn run(stack: &Stack, settings: &Settings) -> Report {
    let mut pipeline = Pipeline::start(stack, settings).await;
    let mut transcripts: Vec<Shared> = Vec::new();
    for _ in 0..settings.clients {
        let (user_id, token) = support::new_session(&pipeline.gateway_urls[0]).await;
        transcripts.push(Arc::new(Mutex::new(Transcript { user_id, token, ..Transcript::default() })));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = transcripts
        .iter()
        .enumerate()
        .map(|(i, t)| tokio::spawn(chat(i, Arc::clone(t), pipeline.gateway_urls.clone(), Arc::clone(&stop))))
        .collect();
    let completed =
        |transcripts: &[Shared]| -> Vec<usize> { transcripts.iter().map(|t| t.lock().unwrap().completed()).collect() };
    settle(&transcripts, &completed(&transcripts), &mut pipeline).await;

    let mut kills = Vec::new();
    for round in 0..settings.rounds {
        for fault in Fault::ALL {
            let before = completed(&transcripts);
            let (killed_at, killed_wall) = (Instant::now(), SystemTime::now());
            let target = match fault {
                Fault::Gateway => {
                    let n = round % pipeline.gateways.len();
                    pipeline.gateways[n].restart();
                    wait_healthy(&pipeline.gateway_urls[n]).await;
                    format!("gateway {n}")
                }
                Fault::Inference => {
                    pipeline.inference.restart();
                    "inference".to_owned()
                }
                Fault::Embedder => {
                    pipeline.embedder.restart();
                    "embedder".to_owned()
                }
                Fault::Projector => {
                    pipeline.projector.restart();
                    "projector".to_owned()
                }
                Fault::Model => {
                    pipeline.model.restart();
                    "llama.cpp server".to_owned()
                }
                Fault::Kafka => {
                    let service = pipeline.kafka.kill();
                    pipeline.kafka.restart(&service).await;
                    service
                }
            };
            let live_recovery = match fault {
                Fault::Embedder => Some(vector_recovery(&pipeline, &transcripts, killed_at).await),
                Fault::Projector => Some(projection_recovery(&pipeline, &transcripts, killed_at).await),
                _ => None,
            };
            settle(&transcripts, &before, &mut pipeline).await;
            kills.push((fault, target, killed_at, killed_wall, live_recovery));
        }
    }

    stop.store(true, Ordering::Relaxed);
    let drained = tokio::time::timeout(PATIENCE, futures::future::join_all(clients)).await;
    let mut report = Report::default();
    if drained.is_err() {
        report
            .findings
            .push(format!("clients still waiting for outcomes {} s after the load stopped", PATIENCE.as_secs()));
    }
    let events = support::log_to_end(&pipeline.kafka.brokers(), &stack.registry, &pipeline.events_topic()).await;
    check(&pipeline, &events, &transcripts, &mut report).await;
    let outcome_times = outcome_times(&events);
    for (fault, target, killed_at, killed_wall, live) in kills {
        let recovered_after = live.flatten().or_else(|| match fault {
            Fault::Embedder | Fault::Projector => None,
            Fault::Gateway => {
                first_answer(&transcripts, |r| r.socket_opened > killed_at && r.at > killed_at).map(|at| at - killed_at)
            }
            Fault::Inference | Fault::Model | Fault::Kafka => first_answer(&transcripts, |r| {
                r.at > killed_at && outcome_times.get(&r.event_id).is_some_and(|t| *t > killed_wall)
            })
            .map(|at| at - killed_at),
        });
        report.faults.push(Injected { fault, target, recovered_after });
    }
    pipeline.stop().await;
    report
}

/// Waits until every client has completed a turn more than in `before`.
async fn settle(transcripts: &[Shared], before: &[usize], pipeline: &mut Pipeline) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let behind: Vec<usize> =
            (0..transcripts.len()).filter(|&i| transcripts[i].lock().unwrap().completed() <= before[i]).collect();
        if behind.is_empty() {
            return;
        }
        pipeline.assert_running();
        assert!(
            Instant::now() < deadline,
            "clients {behind:?} completed no turn in {} s; inference log:\n{}",
            PATIENCE.as_secs(),
            log_tail(&pipeline.inference.log())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The first ack any client got after `since`: (user, token, conversation, query event id, position).
async fn next_ack(transcripts: &[Shared], since: Instant) -> Option<(String, String, String, String, String)> {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        for t in transcripts {
            let t = t.lock().unwrap();
            let acked = t.turns.iter().find(|turn| turn.acked_at.is_some_and(|at| at > since));
            if let (Some(turn), Some(conversation)) = (acked, &t.conversation_id) {
                return Some((
                    t.user_id.clone(),
                    t.token.clone(),
                    conversation.clone(),
                    turn.query_event_id.clone()?,
                    turn.position.clone()?,
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Time from the kill until a query acked after it has its vector in Milvus.
async fn vector_recovery(pipeline: &Pipeline, transcripts: &[Shared], killed_at: Instant) -> Option<Duration> {
    let (user, _, _, query_event_id, _) = next_ack(transcripts, killed_at).await?;
    let store = vector_store(pipeline).await;
    let filter = SearchFilter { kind: Some(SourceKind::Message), ..SearchFilter::owner(user.parse().unwrap()) };
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        let sources = store.vector_sources(&filter, 16_384).await.unwrap_or_default();
        if sources.iter().any(|(_, source)| *source == query_event_id) {
            return Some(killed_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Time from the kill until the projection serves a query acked after it.
async fn projection_recovery(pipeline: &Pipeline, transcripts: &[Shared], killed_at: Instant) -> Option<Duration> {
    let (_, token, conversation, _, position) = next_ack(transcripts, killed_at).await?;
    let url = format!("{}/api/conversations/{conversation}?after={position}", pipeline.gateway_urls[1]);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        let response = client.get(&url).bearer_auth(&token).send().await;
        if response.is_ok_and(|r| r.status().is_success()) {
            return Some(killed_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

async fn vector_store(pipeline: &Pipeline) -> VectorStore {
    let settings = support::milvus_settings(&pipeline.collection);
    VectorStore::open(&settings, 384, "all-MiniLM-L6-v2").await.unwrap()
}

/// When the earliest outcome frame for which `wanted` holds reached its client.
fn first_answer(transcripts: &[Shared], wanted: impl Fn(&Received) -> bool) -> Option<Instant> {
    transcripts
        .iter()
        .flat_map(|t| t.lock().unwrap().turns.iter().flat_map(|turn| turn.outcomes.clone()).collect::<Vec<_>>())
        .filter(|r| !r.failed && wanted(r))
        .map(|r| r.at)
        .min()
}

/// Each outcome event's `occurred_at` (when the model finished), by event id.
fn outcome_times(events: &[ConversationEvent]) -> HashMap<String, SystemTime> {
    events
        .iter()
        .filter(|e| matches!(e, ConversationEvent::ResponseGenerated(_) | ConversationEvent::ResponseFailed(_)))
        .map(|e| {
            let envelope = e.envelope();
            let millis = u64::try_from(envelope.occurred_at).unwrap_or(0);
            (envelope.event_id.to_string(), UNIX_EPOCH + Duration::from_millis(millis))
        })
        .collect()
}

/// The checks, from the log, the projection, Milvus and the clients' transcripts.
async fn check(pipeline: &Pipeline, events: &[ConversationEvent], transcripts: &[Shared], report: &mut Report) {
    // The log: no event twice, no query answered twice, none left unanswered.
    let mut by_conversation: BTreeMap<String, Vec<&ConversationEvent>> = BTreeMap::new();
    for event in events {
        by_conversation.entry(event.envelope().conversation_id.to_string()).or_default().push(event);
    }
    for (conversation, events) in &by_conversation {
        for violation in violations(events.iter().copied()) {
            report.duplicated += 1;
            report.findings.push(format!("log of {conversation}: {violation}"));
        }
    }
    let mut outcomes: HashMap<String, Vec<&ConversationEvent>> = HashMap::new();
    for event in events {
        let query = match event {
            ConversationEvent::ResponseGenerated(o) => &o.query_event_id,
            ConversationEvent::ResponseFailed(o) => &o.query_event_id,
            _ => continue,
        };
        outcomes.entry(query.to_string()).or_default().push(event);
    }
    let answered_twice: Vec<&str> = outcomes.iter().filter(|(_, o)| o.len() > 1).map(|(q, _)| q.as_str()).collect();
    if !answered_twice.is_empty() {
        report.findings.push(format!("what inference logged of it:\n{}", pipeline.inference.story(&answered_twice)));
    }

    // The clients: every acked query has one outcome in the log, which the client got, and
    // never twice on one socket.
    for t in transcripts {
        let t = t.lock().unwrap();
        report.resends += t.turns.iter().map(|turn| turn.sends.saturating_sub(1)).sum::<usize>();
        report.reconnects += t.sockets.saturating_sub(1);
        report.refusals += t.refusals;
        for surprise in &t.surprises {
            report.surprises += 1;
            report.findings.push(format!("user {}: {surprise}", t.user_id));
        }
        for turn in &t.turns {
            let Some(query) = &turn.query_event_id else { continue };
            report.turns += 1;
            let logged = outcomes.get(query.as_str()).map_or(&[][..], Vec::as_slice);
            match logged {
                [] => {
                    report.lost += 1;
                    report
                        .findings
                        .push(format!("query {query} ({}) has no outcome in the log", turn.client_message_id));
                    continue;
                }
                [outcome] => match outcome {
                    ConversationEvent::ResponseFailed(_) => report.failed += 1,
                    _ => report.answered += 1,
                },
                _ => {} // counted with the log's violations
            }
            if turn.outcomes.is_empty() {
                report.lost += 1;
                report
                    .findings
                    .push(format!("query {query} ({}): its client never got the outcome", turn.client_message_id));
            }
            let logged_id = logged[0].envelope().event_id.to_string();
            for received in &turn.outcomes {
                if received.event_id != logged_id {
                    report.duplicated += 1;
                    report.findings.push(format!(
                        "query {query}: client got outcome {} but the log has {logged_id}",
                        received.event_id
                    ));
                }
            }
            let mut per_socket: HashMap<usize, usize> = HashMap::new();
            for received in &turn.outcomes {
                *per_socket.entry(received.socket).or_default() += 1;
            }
            for (socket, count) in per_socket {
                if count > 1 {
                    report.duplicated += 1;
                    report.findings.push(format!("query {query}: outcome shown {count} times on socket {socket}"));
                }
            }
        }
    }

    // The projection equals the fold of each conversation's events (`parley replay` diffs
    // them; it may take a moment to apply the last events).
    for conversation in by_conversation.keys() {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let output = pipeline.cli(&["replay", conversation]);
            if output.status.success() {
                break;
            }
            if Instant::now() >= deadline {
                report.projection_mismatches += 1;
                report.findings.push(format!("replay of {conversation}:\n{}", String::from_utf8_lossy(&output.stdout)));
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    // Milvus: one vector per message with text, none for anything else.
    let store = vector_store(pipeline).await;
    let messages: HashSet<String> = events
        .iter()
        .filter_map(|e| match e {
            ConversationEvent::QueryReceived(q) if !q.text.trim().is_empty() => Some(q.envelope.event_id.to_string()),
            ConversationEvent::ResponseGenerated(a) if !a.text.trim().is_empty() => {
                Some(a.envelope.event_id.to_string())
            }
            _ => None,
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut vectors: HashMap<String, usize> = HashMap::new();
        for t in transcripts {
            let user = t.lock().unwrap().user_id.clone();
            let filter = SearchFilter { kind: Some(SourceKind::Message), ..SearchFilter::owner(user.parse().unwrap()) };
            for (_, source) in store.vector_sources(&filter, 16_384).await.unwrap() {
                *vectors.entry(source).or_default() += 1;
            }
        }
        let missing: Vec<&String> = messages.iter().filter(|m| !vectors.contains_key(*m)).collect();
        let extra: Vec<(&String, &usize)> =
            vectors.iter().filter(|(source, count)| **count > 1 || !messages.contains(*source)).collect();
        if (missing.is_empty() && extra.is_empty()) || Instant::now() >= deadline {
            report.vectors_missing = missing.len();
            report.vectors_extra = extra.len();
            if !missing.is_empty() {
                report.findings.push(format!("messages without a vector: {missing:?}"));
            }
            if !extra.is_empty() {
                report.findings.push(format!("messages with several vectors, or vectors of no message: {extra:?}"));
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
