//! Part 3 of the crowd benchmark: the crowd of 16 users on the real model, each Parley run
//! right after the same load sent straight to llama.cpp.

use std::time::Instant;

use parley_gateway::auth::TokenSigner;
use serde_json::{Value, json};

use super::{
    QUESTIONS, StepResult, THINK_MAX, TURNS_PER_USER, Turn, busy_seconds, crowd, env_or, percentile, rand_unit, report,
    socket_url, support, table_header,
};

/// One turn sent straight to the model server as a chat client that keeps its own history
/// would send it: Parley's default system prompt, the earlier turns, the question. Returns
/// the turn and the answer's text (the next turn's history).
async fn direct_turn(llm: &str, history: &[Value], question: &str, epoch: Instant) -> Result<(Turn, String), String> {
    let sent = Instant::now();
    let mut messages = vec![json!({"role": "system", "content": default_system_prompt()})];
    messages.extend_from_slice(history);
    messages.push(json!({"role": "user", "content": question}));
    let body = json!({"model": "m", "stream": true, "max_tokens": 256, "messages": messages});
    let mut response = reqwest::Client::new()
        .post(format!("{llm}/chat/completions"))
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let (mut first_token, mut tokens, mut text, mut pending) = (None, 0, String::new(), String::new());
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        pending.push_str(&String::from_utf8_lossy(&chunk));
        // Server-sent events, one token each; a chunk may end inside one.
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let event = line.trim().strip_prefix("data: ").and_then(|data| serde_json::from_str::<Value>(data).ok());
            if let Some(delta) = event.as_ref().and_then(|e| e["choices"][0]["delta"]["content"].as_str()) {
                first_token = first_token.or(Some(sent.elapsed().as_secs_f64() * 1000.0));
                tokens += 1;
                text.push_str(delta);
            }
        }
    }
    let answer = sent.elapsed().as_secs_f64() * 1000.0;
    let turn = Turn {
        first_token,
        answer,
        llm: answer,
        llm_first_token: first_token,
        sent_at: (sent - epoch).as_secs_f64(),
        done_at: epoch.elapsed().as_secs_f64(),
        tokens: f64::from(tokens),
    };
    Ok((turn, text))
}

async fn direct_crowd(llm: &str, users: usize) -> StepResult {
    let epoch = Instant::now();
    let tasks: Vec<_> = (0..users)
        .map(|id| {
            let llm = llm.to_owned();
            tokio::spawn(async move {
                let (mut turns, mut history) = (Vec::new(), Vec::new());
                for turn in 0..TURNS_PER_USER {
                    let question = QUESTIONS[(id + turn) % QUESTIONS.len()];
                    let asked = direct_turn(&llm, &history, question, epoch).await;
                    if let Ok((_, answer)) = &asked {
                        history.push(json!({"role": "user", "content": question}));
                        history.push(json!({"role": "assistant", "content": answer}));
                    }
                    turns.push(asked.map(|(turn, _)| turn));
                    tokio::time::sleep(THINK_MAX.mul_f64(rand_unit())).await;
                }
                turns
            })
        })
        .collect();
    let mut result = StepResult::default();
    for task in tasks {
        for turn in task.await.unwrap() {
            match turn {
                Ok(turn) => result.turns.push(turn),
                Err(_) => result.errors += 1,
            }
        }
    }
    result
}

/// The real-model crowd: `users` users arrive at once (each 3 turns, think time), as the
/// issue measured it.
async fn real_crowd(pipeline: &support::Pipeline, users: usize) -> StepResult {
    let signer = TokenSigner::new(support::AUTH_SECRET.as_bytes());
    let tokens: Vec<String> = (0..users).map(|i| signer.token_for(&format!("{}real-{i}", pipeline.prefix))).collect();
    let http = pipeline.http.clone();
    let rate = users as f64 * TURNS_PER_USER as f64 * 100.0; // all arrive within ~10 ms
    crowd(
        move |i| socket_url(&http, &tokens[i]),
        rate,
        users as f64 * TURNS_PER_USER as f64 / rate,
        &pipeline.processes(),
    )
    .await
}

/// The crowd of 16 users on the real model, in `PARLEY_CROWD_REAL_ROUNDS` rounds (default
/// 3): each Parley run (without retrieval, and with it as the quick start runs) right
/// after the same load sent straight to llama.cpp, so the two share the same minute.
pub(crate) async fn real_model(stack: &support::Stack) {
    println!();
    println!(
        "real model (llama.cpp, SmolLM2-135M, 4 slots): 16 users × {TURNS_PER_USER} turns, think time up to {THINK_MAX:?}"
    );
    table_header();
    let mut ratios = Vec::new();
    for round in 1..=env_or("PARLEY_CROWD_REAL_ROUNDS", 3) {
        for (name, args) in
            [("Parley, no retrieval", vec!["--without-retrieval"]), ("Parley, retrieval on (defaults)", vec![])]
        {
            let pipeline = support::Pipeline::start(stack, &args).await;
            let direct = direct_crowd(&stack.llm, 16).await;
            let (direct_tps, _) = report(&format!("direct to the model server (round {round})"), 16.0, &direct);
            let step = real_crowd(&pipeline, 16).await;
            let (tps, _) = report(&format!("{name} (round {round})"), 16.0, &step);
            pipeline.stop().await;
            let first = |step: &StepResult, p| percentile(step.turns.iter().filter_map(|t| t.first_token).collect(), p);
            ratios.push(format!(
                "| {name} | {round} | {:.2}× | {:.2}× | {:.2}× | {:.2}× | {} | {} |",
                tps / direct_tps,
                tokens_per_second(&step) / tokens_per_second(&direct),
                first(&step, 50.0) / first(&direct, 50.0),
                first(&step, 99.0) / first(&direct, 99.0),
                step.refusals.len(),
                step.errors,
            ));
        }
    }
    println!();
    println!(
        "| Parley against llama.cpp direct | round | turns/s | generated tokens/s | first token p50 | first token p99 | refused | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for line in ratios {
        println!("{line}");
    }
}

/// Tokens generated per second from the first turn sent to the last answered.
fn tokens_per_second(step: &StepResult) -> f64 {
    step.turns.iter().map(|t| t.tokens).sum::<f64>() / busy_seconds(&step.turns)
}

/// The system prompt Parley sends when none is configured.
fn default_system_prompt() -> String {
    #[derive(clap::Parser)]
    struct Defaults {
        #[command(flatten)]
        inference: parley_inference::service::InferenceArgs,
    }
    <Defaults as clap::Parser>::parse_from(["defaults"]).inference.system_prompt
}
