//! Part 5 of the crowd benchmark: priority lanes against one shared queue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::SinkExt;
use parley_gateway::auth::TokenSigner;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::{QUESTIONS, connect, env_or, next_json, percentile, socket_url, stub_model, support};

/// One turn on a socket of its own, as its client saw it.
struct LaneTurn {
    first_token_ms: f64,
    /// When the ack and the answer came (s since the step began).
    acked_at: f64,
    answered_at: f64,
}

/// One turn on a socket of its own, starting a conversation in `lane` (the user's tier
/// when `None`).
async fn lane_turn(url: &str, id: &str, lane: Option<&str>, epoch: Instant) -> Result<LaneTurn, String> {
    let mut socket = connect(url, None).await.ok_or("connect")?;
    next_json(&mut socket).await.filter(|f| f["type"] == "ready").ok_or("no ready frame")?;
    let mut frame = json!({"type": "query", "client_message_id": id, "text": QUESTIONS[0]});
    if let Some(lane) = lane {
        frame["lane"] = json!(lane);
    }
    let sent = Instant::now();
    socket.send(Message::Text(frame.to_string().into())).await.map_err(|e| e.to_string())?;
    let (mut first_token, mut acked_at) = (None, 0.0);
    loop {
        let frame = next_json(&mut socket).await.ok_or("no answer within 120 s")?;
        match frame["type"].as_str() {
            Some("ack") => acked_at = epoch.elapsed().as_secs_f64(),
            Some("token") => first_token = first_token.or(Some(sent.elapsed().as_secs_f64() * 1000.0)),
            Some("answer") => {
                let _ = socket.close(None).await;
                let answered = sent.elapsed().as_secs_f64() * 1000.0;
                let answered_at = epoch.elapsed().as_secs_f64();
                return Ok(LaneTurn { first_token_ms: first_token.unwrap_or(answered), acked_at, answered_at });
            }
            Some(kind @ ("failed" | "error")) => return Err(format!("{kind}: {}", frame["message"])),
            _ => {}
        }
    }
}

/// What one lanes scenario measured.
struct LaneStep {
    /// First-token latency of the higher lane's turns (ms).
    high: Vec<f64>,
    /// Each flood turn as its client saw it.
    flood: Vec<LaneTurn>,
    errors: usize,
}

/// `flood` turns of the lower lane sent at once, then the higher lane's users asking one
/// turn after another (each on a new socket, 200 ms apart) until the flood is answered.
async fn lane_step(
    pipeline: &support::Pipeline,
    signer: &TokenSigner,
    flood: usize,
    low_lane: Option<&'static str>,
    high_users: &[String],
) -> LaneStep {
    let epoch = Instant::now();
    let mut floods = Vec::new();
    for n in 0..flood {
        let url = socket_url(&pipeline.http, &signer.token_for(&format!("{}flood-{n}", pipeline.prefix)));
        floods.push(tokio::spawn(async move { lane_turn(&url, &format!("f{n}"), low_lane, epoch).await }));
    }
    // The flood is in the log before the higher lane asks.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flooding = Arc::new(std::sync::atomic::AtomicBool::new(flood > 0));
    let mut highs = Vec::new();
    for (u, user) in high_users.iter().enumerate() {
        let url = socket_url(&pipeline.http, &signer.token_for(user));
        let flooding = flooding.clone();
        highs.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for turn in 0.. {
                latencies.push(lane_turn(&url, &format!("h{u}-{turn}"), None, epoch).await);
                let enough = if flood > 0 { !flooding.load(std::sync::atomic::Ordering::Relaxed) } else { turn >= 9 };
                if enough {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            latencies
        }));
    }
    let mut step = LaneStep { high: Vec::new(), flood: Vec::new(), errors: 0 };
    for task in floods {
        match task.await.unwrap() {
            Ok(turn) => step.flood.push(turn),
            Err(_) => step.errors += 1,
        }
    }
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    for task in highs {
        for turn in task.await.unwrap() {
            match turn {
                Ok(turn) => step.high.push(turn.first_token_ms),
                Err(_) => step.errors += 1,
            }
        }
    }
    step
}

/// Priority lanes against one shared queue (`--lanes none`, the naive design), on the stub
/// model (4 inference slots, 420 ms answers: 10 turns/s): a batch flood with standard chat
/// asking meanwhile, and a standard flood with premium users asking meanwhile.
pub(crate) async fn lanes(stack: &support::Stack) {
    let flood: usize = env_or("PARLEY_CROWD_FLOOD", 120);
    let stub = stub_model::StubModel {
        first_token: Duration::from_millis(100),
        per_token: Duration::from_millis(20),
        tokens: 16,
    };
    let stub_url = stub.serve().await;
    let signer = TokenSigner::new(support::AUTH_SECRET.as_bytes());
    println!();
    println!(
        "priority lanes: 4 inference slots, stub answers in {:?} (10 turns/s); {flood} turns of the lower lane at once, \
         4 users of the higher lane asking one turn after another meanwhile",
        stub.answer_time()
    );
    println!(
        "| lanes | premium slots | flooded lane | higher lane | higher-lane first token p50 / p99 (ms) | × unloaded p99 | higher-lane turns meanwhile | flood acked in (s) | flood answered in (s) | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (layout, premium_slots, low, high) in [
        ("premium=0,batch=5", "0", "batch", "standard"),
        ("none", "0", "batch", "standard"),
        ("premium=0,batch=5", "0", "standard", "premium"),
        ("premium=0,batch=5", "1", "standard", "premium"),
        ("none", "0", "standard", "premium"),
    ] {
        let args = [
            "--llm-base-url",
            &stub_url,
            "--without-retrieval",
            "--concurrency",
            "4",
            "--shed-queue-age",
            "0",
            "--lanes",
            layout,
            "--premium-slots",
            premium_slots,
        ];
        let pipeline = support::Pipeline::start(stack, &[&args[..], &support::NO_RATE_LIMITS].concat()).await;
        let high_users: Vec<String> = (0..4).map(|u| format!("{}{high}-{u}", pipeline.prefix)).collect();
        if high == "premium" {
            for user in &high_users {
                let set = pipeline.cli(&["tier", user, "premium"]);
                assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
            }
        }
        let low_lane = (low == "batch").then_some("batch");
        let unloaded = lane_step(&pipeline, &signer, 0, low_lane, &high_users).await;
        let loaded = lane_step(&pipeline, &signer, flood, low_lane, &high_users).await;
        let unloaded_p99 = percentile(unloaded.high, 99.0);
        let p99 = percentile(loaded.high.clone(), 99.0);
        println!(
            "| {layout} | {premium_slots} | {low} | {high} | {:.0} / {p99:.0} | {:.1}× (unloaded p99 {unloaded_p99:.0}) | {} | {:.1} | {:.1} | {} |",
            percentile(loaded.high.clone(), 50.0),
            p99 / unloaded_p99,
            loaded.high.len(),
            loaded.flood.iter().map(|t| t.acked_at).fold(0.0, f64::max),
            loaded.flood.iter().map(|t| t.answered_at).fold(0.0, f64::max),
            loaded.errors + unloaded.errors,
        );
        pipeline.stop().await;
    }
}
