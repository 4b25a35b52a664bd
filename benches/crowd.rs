//! Parley under a crowd: simulated users over real WebSockets, open-loop arrivals at a set
//! rate, each user in its own conversation (3 turns, up to 1 s of think time between them).
//! Per load step: sustained turns/s, first-token and answer latency p50/p99 with the
//! model's own time subtracted, errors, the system's RSS and CPU milliseconds per turn (in
//! part 1 Parley runs as deployed, gateway, inference and projection in processes of their
//! own, each one's CPU reported; elsewhere as one `parley all`), and the local stack's Kafka
//! and CQL store CPU milliseconds per turn over the same step.
//!
//! 1. With a fixed-latency streaming stub model (benches/stub/model.rs): the pipeline's own
//!    capacity, side by side with the naive reference design (benches/reference) under the
//!    same load.
//! 2. Idle sockets: N connections that only received `ready`; gateway RSS per socket.
//! 3. With the real llama.cpp server: the crowd of 16 users, without retrieval and with
//!    it (the defaults), each run right after the same load sent straight to the model
//!    server by a client that keeps its own history (no pipeline), PARLEY_CROWD_REAL_ROUNDS
//!    times (default 3).
//! 4. Beyond capacity (4 inference slots, a 400 ms stub: 10 turns/s) at 3× that, with load
//!    shedding off and at two queue-age thresholds: admitted turns' first token against
//!    the unloaded pipeline's, and how fast `overloaded` refusals arrive.
//!
//! Run: `infra/bench.sh crowd`. PARLEY_CROWD_RATES (turns/s, comma separated, default
//! 10,25,50,100), PARLEY_CROWD_SECONDS (arrivals per step, default 15), PARLEY_CROWD_IDLE
//! (idle sockets, default 10000), PARLEY_CROWD_REAL=0 skips the real-model part,
//! PARLEY_CROWD_OVERLOAD=0 the beyond-capacity part, PARLEY_CROWD_LANES=0 the lanes part
//! (PARLEY_CROWD_FLOOD: turns of the flooded lane, default 120),
//! PARLEY_CROWD_WITHOUT_PROJECTION=1 runs part 1 with the context projection stopped,
//! PARLEY_CROWD_NAIVE_MAX_RATE runs the naive design's steps only up to that rate.
//! PARLEY_CROWD_PROFILE=1 runs only the instruction profile (crowd/profile.rs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "crowd/lanes.rs"]
mod lanes;
#[path = "crowd/profile.rs"]
mod profile;
#[path = "crowd/real_model.rs"]
mod real_model;
#[path = "stub/model.rs"]
mod stub_model;
#[path = "../tests/support/mod.rs"]
mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use parley_gateway::auth::TokenSigner;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const TURNS_PER_USER: usize = 3;
const THINK_MAX: Duration = Duration::from_secs(1);
const QUESTIONS: [&str; 4] = ["What is 2+2?", "Name a color.", "Say hello.", "What day comes after Monday?"];

/// One turn as a client saw it (ms).
#[derive(Debug, Clone, Default)]
struct Turn {
    first_token: Option<f64>,
    answer: f64,
    llm: f64,
    llm_first_token: Option<f64>,
    sent_at: f64,
    done_at: f64,
    /// Tokens the model generated.
    tokens: f64,
}

/// What one load step produced.
#[derive(Debug, Default)]
struct StepResult {
    turns: Vec<Turn>,
    errors: usize,
    /// How long each `overloaded` refusal took to arrive (ms).
    refusals: Vec<f64>,
    /// Peak RSS of the first process (the gateway, or `parley all`).
    rss_mib: Option<f64>,
    /// CPU seconds over the step of each process measured, by part.
    cpu_seconds: Vec<(&'static str, f64)>,
    /// CPU seconds of the local stack's Kafka and CQL store over the step.
    stack_cpu_seconds: (f64, f64),
}

/// The pid of a local stack service, from its pid file (None: not known).
fn stack_pid(service: &str) -> Option<u32> {
    let run = std::env::var("PARLEY_RUN").ok()?;
    // The file holds the pid, then its start time (infra/stack.sh).
    let file = std::fs::read_to_string(std::path::Path::new(&run).join(format!("pids/{service}.pid"))).ok()?;
    file.split_whitespace().next()?.parse().ok()
}

/// CPU seconds used so far by the local stack's Kafka and CQL store (0 when unknown).
fn stack_cpu() -> (f64, f64) {
    let cpu = |service| stack_pid(service).map_or(0.0, |pid| process_usage(pid).0);
    (cpu("kafka"), cpu("cassandra"))
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(mut samples: Vec<f64>, p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    support::percentile(&samples, p)
}

/// A WebSocket with small buffers (thousands of them live in this process).
async fn connect(url: &str, source: Option<IpAddr>) -> Option<WebSocket> {
    let address: SocketAddr = url.trim_start_matches("ws://").split('/').next()?.parse().ok()?;
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0)).ok()?;
    }
    let stream = socket.connect(address).await.ok()?;
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let (socket, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await.ok()?;
    Some(socket)
}

type WebSocket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn next_json(socket: &mut WebSocket) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(120), socket.next()).await.ok()?? {
            Ok(Message::Text(text)) => return serde_json::from_str(text.as_str()).ok(),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// One simulated user: its own socket and conversation, `TURNS_PER_USER` turns with think time.
async fn user(
    url: String,
    id: usize,
    epoch: Instant,
    results: mpsc::UnboundedSender<Result<Turn, String>>,
    refusals: mpsc::UnboundedSender<f64>,
) {
    let Some(mut socket) = connect(&url, None).await else {
        let _ = results.send(Err("connect".into()));
        return;
    };
    if next_json(&mut socket).await.is_none_or(|f| f["type"] != "ready") {
        let _ = results.send(Err("no ready frame".into()));
        return;
    }
    let mut conversation: Option<String> = None;
    for turn in 0..TURNS_PER_USER {
        let mut frame = json!({"type": "query", "client_message_id": format!("u{id}-t{turn}"),
                               "text": QUESTIONS[(id + turn) % QUESTIONS.len()]});
        if let Some(id) = &conversation {
            frame["conversation_id"] = json!(id);
        }
        let sent = Instant::now();
        if socket.send(Message::Text(frame.to_string().into())).await.is_err() {
            let _ = results.send(Err("send".into()));
            return;
        }
        let mut first_token = None;
        let outcome = loop {
            let Some(frame) = next_json(&mut socket).await else { break Err("no answer within 120 s".to_owned()) };
            match frame["type"].as_str() {
                Some("ack") => conversation = frame["conversation_id"].as_str().map(str::to_owned),
                Some("token") => first_token = first_token.or(Some(sent.elapsed().as_secs_f64() * 1000.0)),
                Some("answer") => {
                    break Ok(Turn {
                        first_token,
                        answer: sent.elapsed().as_secs_f64() * 1000.0,
                        llm: frame["llm_latency_ms"].as_f64().unwrap_or(0.0),
                        llm_first_token: frame["time_to_first_token_ms"].as_f64(),
                        sent_at: (sent - epoch).as_secs_f64(),
                        done_at: epoch.elapsed().as_secs_f64(),
                        tokens: frame["completion_tokens"].as_f64().unwrap_or(0.0),
                    });
                }
                // Shed at once: noted with how long the refusal took; the user goes away.
                Some("error") if frame["code"] == "overloaded" => {
                    let _ = refusals.send(sent.elapsed().as_secs_f64() * 1000.0);
                    return;
                }
                Some(kind @ ("failed" | "error")) => break Err(format!("{kind}: {}", frame["message"])),
                _ => {}
            }
        };
        let failed = outcome.is_err();
        let _ = results.send(outcome);
        if failed {
            return;
        }
        tokio::time::sleep(THINK_MAX.mul_f64(rand_unit())).await;
    }
    let _ = socket.close(None).await;
}

fn rand_unit() -> f64 {
    use std::hash::{BuildHasher, RandomState};
    let bits = RandomState::new().hash_one(Instant::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// CPU seconds (user + system) and RSS (MiB) of a process, from /proc.
fn process_usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    (ticks / 100.0, rss_kib / 1024.0)
}

/// Users arrive at `rate / TURNS_PER_USER` per second for `seconds` (open loop: arrivals do
/// not wait for answers); returns every turn once all users are done.
async fn crowd(
    url_for: impl Fn(usize) -> String,
    rate: f64,
    seconds: f64,
    processes: &[(&'static str, u32)],
) -> StepResult {
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let (refused, mut refusals) = mpsc::unbounded_channel();
    let users = ((rate * seconds) / TURNS_PER_USER as f64).ceil() as usize;
    let interval = Duration::from_secs_f64(TURNS_PER_USER as f64 / rate);
    let before: Vec<f64> = processes.iter().map(|(_, pid)| process_usage(*pid).0).collect();
    let stack_before = stack_cpu();
    let epoch = Instant::now();
    let mut tasks = Vec::with_capacity(users);
    for id in 0..users {
        tokio::time::sleep_until((epoch + interval * u32::try_from(id).unwrap()).into()).await;
        tasks.push(tokio::spawn(user(url_for(id), id, epoch, sender.clone(), refused.clone())));
    }
    let peak_rss = processes.first().map(|(_, pid)| process_usage(*pid).1);
    drop((sender, refused));
    let mut result = StepResult::default();
    while let Some(turn) = receiver.recv().await {
        match turn {
            Ok(turn) => result.turns.push(turn),
            Err(error) => {
                if result.errors == 0 {
                    eprintln!("first error of the step: {error}");
                }
                result.errors += 1;
            }
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    while let Some(refusal) = refusals.recv().await {
        result.refusals.push(refusal);
    }
    let stack_after = stack_cpu();
    result.stack_cpu_seconds = (stack_after.0 - stack_before.0, stack_after.1 - stack_before.1);
    result.cpu_seconds =
        processes.iter().zip(before).map(|((part, pid), before)| (*part, process_usage(*pid).0 - before)).collect();
    result.rss_mib = peak_rss;
    result
}

fn report(name: &str, rate: f64, step: &StepResult) -> (f64, f64) {
    let turns = &step.turns;
    let throughput = turns.len() as f64 / busy_seconds(turns);
    let answer_overhead: Vec<f64> = turns.iter().map(|t| t.answer - t.llm).collect();
    let first_overhead: Vec<f64> =
        turns.iter().filter_map(|t| Some(t.first_token? - t.llm_first_token.unwrap_or(t.llm))).collect();
    let first: Vec<f64> = turns.iter().map(|t| t.first_token.unwrap_or(t.answer)).collect();
    let p99 = percentile(answer_overhead.clone(), 99.0);
    println!(
        "| {name} | {rate:.0} | {throughput:.1} | {} | {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {} | {} | {:.2} | {:.2} |",
        turns.len(),
        step.errors,
        percentile(first.clone(), 50.0),
        percentile(first, 99.0),
        percentile(first_overhead.clone(), 50.0),
        percentile(first_overhead, 99.0),
        percentile(answer_overhead.clone(), 50.0),
        p99,
        step.rss_mib.map_or("-".into(), |r| format!("{r:.0}")),
        cpu_per_turn(step),
        1000.0 * step.stack_cpu_seconds.0 / turns.len().max(1) as f64,
        1000.0 * step.stack_cpu_seconds.1 / turns.len().max(1) as f64,
    );
    (throughput, p99)
}

/// CPU milliseconds per turn: all the system's processes, then each when there are several
/// (`12.1 = gateway 4.0 + inference 6.1 + projection 2.0`).
fn cpu_per_turn(step: &StepResult) -> String {
    let per_turn = |seconds: f64| 1000.0 * seconds / step.turns.len().max(1) as f64;
    let total = per_turn(step.cpu_seconds.iter().map(|(_, seconds)| seconds).sum());
    match step.cpu_seconds.as_slice() {
        [] => "-".into(),
        [_] => format!("{total:.2}"),
        parts => {
            let parts: Vec<String> =
                parts.iter().map(|(part, seconds)| format!("{part} {:.2}", per_turn(*seconds))).collect();
            format!("{total:.2} = {}", parts.join(" + "))
        }
    }
}

fn table_header() {
    println!(
        "| system | offered turns/s | sustained turns/s | turns | errors | first token p50 / p99 (ms) | first-token overhead p50 / p99 | answer overhead p50 / p99 | RSS MiB | CPU ms/turn (by process) | Kafka CPU ms/turn | CQL CPU ms/turn |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
}

/// The naive reference design on its own topics, answering with `llm`.
fn start_reference(pipeline: &support::Pipeline, llm: &str, max_tokens: u32) -> (std::process::Child, u16) {
    let python = std::env::var("PARLEY_PYTHON").expect("PARLEY_PYTHON: the venv's python (infra/bench.sh sets it)");
    let port = support::free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/reference/naive_chat.py");
    let log = std::fs::File::create(std::env::temp_dir().join(format!("{}naive.log", pipeline.prefix))).unwrap();
    let child = std::process::Command::new(python)
        .arg(script)
        .args(["--port", &port.to_string(), "--brokers", &pipeline.brokers, "--llm", llm])
        .args(["--topic-prefix", &pipeline.prefix, "--max-tokens", &max_tokens.to_string()])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    (child, port)
}

async fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn socket_url(http: &str, token: &str) -> String {
    format!("{}/ws?token={token}", http.replace("http://", "ws://"))
}

/// Opens `count` sockets that receive `ready` and then stay idle; returns the gateway RSS
/// growth per socket (KiB) and how many connected.
async fn idle_sockets(pipeline: &support::Pipeline, count: usize) -> (f64, usize, f64, f64) {
    // Past the gateway's file descriptor limit a connection waits in the listen backlog
    // and never gets `ready`: ask only for what the process may hold.
    let limit = open_files_limit(pipeline.pid()).unwrap_or(usize::MAX);
    let count = if count + 1000 > limit {
        println!("the gateway may open {limit} files: trying {} idle sockets, not {count}", limit - 1000);
        limit - 1000
    } else {
        count
    };
    let signer = Arc::new(TokenSigner::new(support::AUTH_SECRET.as_bytes()));
    let (_, rss_before) = process_usage(pipeline.pid());
    let mut sockets = Vec::with_capacity(count);
    let mut pending = futures::stream::iter(0..count)
        .map(|i| {
            let url = socket_url(&pipeline.http, &signer.token_for(&format!("{}idle-{i}", pipeline.prefix)));
            // 20,000 ephemeral ports per source address.
            let source = IpAddr::V4(Ipv4Addr::new(127, 0, 1, u8::try_from(1 + i / 20_000).unwrap()));
            async move {
                let mut socket = connect(&url, Some(source)).await?;
                next_json(&mut socket).await.filter(|f| f["type"] == "ready").map(|_| socket)
            }
        })
        .buffer_unordered(256);
    while let Some(socket) = pending.next().await {
        sockets.extend(socket);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, rss_after) = process_usage(pipeline.pid());
    let per_socket = (rss_after - rss_before) * 1024.0 / sockets.len().max(1) as f64;
    let connected = sockets.len();
    drop(sockets);
    (per_socket, connected, rss_before, rss_after)
}

/// The soft limit on open files of a process, from /proc.
fn open_files_limit(pid: u32) -> Option<usize> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    limits.lines().find(|l| l.starts_with("Max open files"))?.split_whitespace().nth(3)?.parse().ok()
}

#[tokio::main]
async fn main() {
    let stack = support::stack().expect("the local stack's PARLEY_* variables (infra/bench.sh sets them)");
    let rates: Vec<f64> = std::env::var("PARLEY_CROWD_RATES")
        .unwrap_or_else(|_| "10,25,50,100".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let seconds: f64 = env_or("PARLEY_CROWD_SECONDS", 15.0);
    let idle: usize = env_or("PARLEY_CROWD_IDLE", 10_000);
    let stub = stub_model::StubModel {
        first_token: Duration::from_millis(50),
        per_token: Duration::from_millis(5),
        tokens: 16,
    };
    let stub_url = stub.serve().await;
    println!(
        "stub model: first token after {:?}, {} tokens {:?} apart ({:?} per answer); {seconds} s of arrivals per step, {TURNS_PER_USER} turns per user, think time up to {THINK_MAX:?}",
        stub.first_token,
        stub.tokens,
        stub.per_token,
        stub.answer_time()
    );

    if env_or("PARLEY_CROWD_PROFILE", 0) == 1 {
        profile::profile(&stack, &stub_url, seconds).await;
        return;
    }

    // 1. The pipeline's own capacity (the model is a stub), and the naive design. Gateway,
    // inference and projection in processes of their own (as deployed), each one's CPU apart.
    println!("{}", support::stack_age());
    let without_projection = env_or("PARLEY_CROWD_WITHOUT_PROJECTION", 0) == 1;
    if without_projection {
        println!("the context projection is not running: chat must not need the read model");
    }
    let inference = ["--llm-base-url", &stub_url, "--concurrency", "256", "--llm-max-tokens", "16"];
    let pipeline =
        support::Pipeline::start_parts(&stack, &["--without-retrieval"], &[], &inference, without_projection, &[])
            .await;
    // The naive design sustains a few turns/s: a step far beyond that takes minutes.
    let naive_max_rate: f64 = env_or("PARLEY_CROWD_NAIVE_MAX_RATE", f64::INFINITY);
    let (mut reference, reference_port) = start_reference(&pipeline, &stub_url, 16);
    wait_for_port(reference_port).await;
    let signer = Arc::new(TokenSigner::new(support::AUTH_SECRET.as_bytes()));
    // Warm-up, not measured: group joins, first connections, caches, on both systems.
    let (http, warm_signer, prefix) = (pipeline.http.clone(), signer.clone(), pipeline.prefix.clone());
    crowd(move |i| socket_url(&http, &warm_signer.token_for(&format!("{prefix}warm-{i}"))), 5.0, 2.0, &[]).await;
    let naive_url = format!("ws://127.0.0.1:{reference_port}/");
    crowd(move |_| naive_url.clone(), 5.0, 2.0, &[]).await;
    table_header();
    let mut summary = Vec::new();
    for &rate in &rates {
        let (http, signer, prefix) = (pipeline.http.clone(), signer.clone(), pipeline.prefix.clone());
        let step = crowd(
            // Users of this run only: the test keyspace outlives runs.
            move |i| socket_url(&http, &signer.token_for(&format!("{prefix}crowd-{rate}-{i}"))),
            rate,
            seconds,
            &pipeline.processes(),
        )
        .await;
        let parley = report("Parley (stub model)", rate, &step);
        if rate <= naive_max_rate {
            let naive_url = format!("ws://127.0.0.1:{reference_port}/");
            let step = crowd(move |_| naive_url.clone(), rate, seconds, &[("naive", reference.id())]).await;
            let naive = report("naive reference (stub model)", rate, &step);
            summary.push((rate, parley, naive));
        }
    }
    println!();
    for (rate, (parley_tps, parley_p99), (naive_tps, naive_p99)) in &summary {
        println!(
            "offered {rate:.0} turns/s: sustained Parley {parley_tps:.1} / naive {naive_tps:.1} = {:.2}×; answer-overhead p99 Parley {parley_p99:.1} ms, naive {naive_p99:.1} ms",
            parley_tps / naive_tps
        );
    }

    // 2. Idle sockets.
    println!();
    let (per_socket, connected, before, after) = idle_sockets(&pipeline, idle).await;
    println!(
        "idle sockets: {connected} of {idle} connected; gateway RSS {before:.0} → {after:.0} MiB = {per_socket:.1} KiB per idle socket"
    );
    let _ = reference.kill();
    let _ = reference.wait();
    pipeline.stop().await;

    // 3. The real model, each run right after the same load sent to the model server alone.
    if env_or("PARLEY_CROWD_REAL", 1) == 1 {
        real_model::real_model(&stack).await;
    }

    // 4. Beyond capacity: shedding against none.
    if env_or("PARLEY_CROWD_OVERLOAD", 1) == 1 {
        overload(&stack, seconds).await;
    }

    // 5. Priority lanes: a flooded lower lane against a higher lane's turns.
    if env_or("PARLEY_CROWD_LANES", 1) == 1 {
        lanes::lanes(&stack).await;
    }
}

/// Seconds from the first turn sent to the last answered.
fn busy_seconds(turns: &[Turn]) -> f64 {
    let span = turns.iter().map(|t| t.done_at).fold(0.0, f64::max)
        - turns.iter().map(|t| t.sent_at).fold(f64::INFINITY, f64::min);
    span.max(1e-9)
}

/// A pipeline with a capacity (4 inference slots, a stub answering in 400 ms: 10 turns/s)
/// offered 3× that, with shedding off and at two thresholds, against the same pipeline
/// unloaded: first-token latency of the admitted turns, and how fast refusals come.
async fn overload(stack: &support::Stack, seconds: f64) {
    let stub = stub_model::StubModel {
        first_token: Duration::from_millis(100),
        per_token: Duration::from_millis(20),
        tokens: 16,
    };
    let stub_url = stub.serve().await;
    println!();
    println!(
        "beyond capacity: 4 inference slots, stub answers in {:?} (capacity 10 turns/s); {seconds} s of arrivals per step",
        stub.answer_time()
    );
    println!(
        "| shedding | offered turns/s | admitted turns | refused | errors | first token p50 / p99 (ms) | refusal p50 / p99 (ms) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let signer = Arc::new(TokenSigner::new(support::AUTH_SECRET.as_bytes()));
    let mut unloaded_p99 = f64::NAN;
    for (threshold, rate) in [("0", 5.0), ("0", 30.0), ("1s", 30.0), ("250ms", 30.0)] {
        let args =
            ["--llm-base-url", &stub_url, "--without-retrieval", "--concurrency", "4", "--shed-queue-age", threshold];
        let pipeline = support::Pipeline::start(stack, &[&args[..], &support::NO_RATE_LIMITS].concat()).await;
        let (http, signer, prefix) = (pipeline.http.clone(), signer.clone(), pipeline.prefix.clone());
        let step = crowd(
            move |i| socket_url(&http, &signer.token_for(&format!("{prefix}over-{threshold}-{rate}-{i}"))),
            rate,
            seconds,
            &[],
        )
        .await;
        let first: Vec<f64> = step.turns.iter().map(|t| t.first_token.unwrap_or(t.answer)).collect();
        let p99 = percentile(first.clone(), 99.0);
        if rate < 10.0 {
            unloaded_p99 = p99;
        }
        let shedding = if threshold == "0" { "off".to_owned() } else { format!("queue age > {threshold}") };
        println!(
            "| {shedding} | {rate:.0} | {} | {} | {} | {:.0} / {p99:.0} ({:.1}× unloaded p99) | {:.1} / {:.1} |",
            step.turns.len(),
            step.refusals.len(),
            step.errors,
            percentile(first, 50.0),
            p99 / unloaded_p99,
            percentile(step.refusals.clone(), 50.0),
            percentile(step.refusals, 99.0),
        );
        pipeline.stop().await;
    }
}
