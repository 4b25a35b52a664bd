//! Where a turn's CPU goes, in instructions (repeatable for the same binary and load, unlike
//! timings on a shared machine): the gateway, inference and projection processes each run
//! under valgrind's callgrind, instrumented only from the warm-up on and zeroed after it;
//! one crowd step at a low rate; each process's counters dumped; instructions per turn by
//! part and each part's costliest functions (self cost) printed.
//!
//! `PARLEY_CROWD_PROFILE=1 infra/bench.sh crowd` runs this instead of the other parts;
//! PARLEY_CROWD_PROFILE_RATE (turns/s, default 5), PARLEY_CROWD_SECONDS (arrivals, default 15).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use parley_gateway::auth::TokenSigner;

use super::{crowd, env_or, report, socket_url, support, table_header};

/// Functions listed per part.
const TOP_FUNCTIONS: usize = 15;

pub(crate) async fn profile(stack: &support::Stack, stub_url: &str, seconds: f64) {
    let rate: f64 = env_or("PARLEY_CROWD_PROFILE_RATE", 5.0);
    let dumps = std::env::temp_dir().join(format!("parley-callgrind-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dumps).unwrap();
    let wrap: Vec<String> = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        &format!("--callgrind-out-file={}/callgrind.%p", dumps.display()),
    ]
    .map(str::to_owned)
    .to_vec();
    let inference = ["--llm-base-url", stub_url, "--concurrency", "256", "--llm-max-tokens", "16"];
    let pipeline = support::Pipeline::start_parts(stack, &["--without-retrieval"], &[], &inference, false, &wrap).await;
    let processes = pipeline.processes();
    for (_, pid) in &processes {
        callgrind_control(&["-i", "on"], *pid);
    }
    let signer = Arc::new(TokenSigner::new(support::AUTH_SECRET.as_bytes()));
    let (http, warm_signer, prefix) = (pipeline.http.clone(), signer.clone(), pipeline.prefix.clone());
    crowd(move |i| socket_url(&http, &warm_signer.token_for(&format!("{prefix}warm-{i}"))), 2.0, 3.0, &[]).await;
    for (_, pid) in &processes {
        callgrind_control(&["-z"], *pid);
    }
    let (http, prefix) = (pipeline.http.clone(), pipeline.prefix.clone());
    let step = crowd(
        move |i| socket_url(&http, &signer.token_for(&format!("{prefix}profiled-{i}"))),
        rate,
        seconds,
        &processes,
    )
    .await;
    for (_, pid) in &processes {
        callgrind_control(&["-d"], *pid);
    }
    println!("under callgrind (every process ~50× slower: latencies below are not the pipeline's):");
    table_header();
    report("Parley under callgrind (stub model)", rate, &step);
    let turns = step.turns.len().max(1) as f64;
    println!();
    println!("| part | instructions per turn | of the three |");
    println!("|---|---|---|");
    let counted: Vec<(&str, PathBuf, u64)> = processes
        .iter()
        .filter_map(|(part, pid)| {
            let dump = latest_dump(&dumps, *pid)?;
            let total = total_instructions(&dump)?;
            Some((*part, dump, total))
        })
        .collect();
    let all: u64 = counted.iter().map(|(_, _, total)| total).sum();
    for (part, _, total) in &counted {
        println!("| {part} | {:.0} | {:.0} % |", *total as f64 / turns, 100.0 * *total as f64 / all.max(1) as f64);
    }
    println!("| all three | {:.0} | |", all as f64 / turns);
    for (part, dump, _) in &counted {
        println!();
        println!("{part}: the {TOP_FUNCTIONS} functions of most instructions (self), over {turns:.0} turns");
        annotate(dump);
    }
    pipeline.stop().await;
    let _ = std::fs::remove_dir_all(&dumps);
}

fn callgrind_control(args: &[&str], pid: u32) {
    let output = Command::new("callgrind_control").args(args).arg(pid.to_string()).output().unwrap();
    assert!(output.status.success(), "callgrind_control {args:?} {pid}: {}", String::from_utf8_lossy(&output.stderr));
}

/// The newest counter dump of `pid` in `dir` (`callgrind.<pid>.<n>`).
fn latest_dump(dir: &Path, pid: u32) -> Option<PathBuf> {
    let prefix = format!("callgrind.{pid}.");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
        .max_by_key(|entry| entry.metadata().and_then(|m| m.modified()).ok())
        .map(|entry| entry.path())
}

/// The dump's instruction count (its `summary:` or `totals:` line).
fn total_instructions(dump: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dump).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("summary:").or_else(|| line.strip_prefix("totals:")))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// callgrind_annotate's table of the costliest functions.
fn annotate(dump: &Path) {
    let output = Command::new("callgrind_annotate").args(["--inclusive=no", "--auto=no"]).arg(dump).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    // The table follows the header line that names the `file:function` column.
    let rows = text.lines().skip_while(|line| !line.contains("file:function")).skip(1);
    for line in rows.filter(|line| !line.trim().is_empty()).take(TOP_FUNCTIONS) {
        println!("    {line}");
    }
}
