//! The bundled chat page in a real browser: Debian's Chromium, headless, driven over
//! WebDriver by chromedriver. A person types a question and presses Enter, watches the
//! answer stream in, reloads the page, finds the conversation again (served by the
//! projection) and goes on with it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::key::Key;
use fantoccini::{ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use support::{ANSWER_TIMEOUT, Pipeline, free_port, stack};

/// Chromium's flags for a closed network: without the background-networking ones it keeps
/// trying to reach Google's hosts.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// chromedriver plus one browser session with its own empty profile.
struct Browser {
    driver: Child,
    client: fantoccini::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// None (test skipped) when no browser is configured, unless the stack is required.
    async fn start() -> Option<Browser> {
        let (chromium, chromedriver) = match (std::env::var("PARLEY_CHROMIUM"), std::env::var("PARLEY_CHROMEDRIVER")) {
            (Ok(chromium), Ok(chromedriver)) => (chromium, chromedriver),
            _ if std::env::var("PARLEY_REQUIRE_STACK").as_deref() == Ok("1") => {
                panic!("PARLEY_REQUIRE_STACK=1 but PARLEY_CHROMIUM/PARLEY_CHROMEDRIVER are not set")
            }
            _ => {
                eprintln!("skipped: no browser configured (run infra/test.sh)");
                return None;
            }
        };
        let port = free_port();
        let driver = Command::new(&chromedriver)
            .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".to_owned()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {chromedriver}: {e}"));
        let profile = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|flag| (*flag).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let capabilities = json!({ "goog:chromeOptions": { "binary": chromium, "args": args } });
        let capabilities = capabilities.as_object().unwrap().clone();
        let webdriver = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        let mut builder = ClientBuilder::new(HttpConnector::new());
        builder.capabilities(capabilities);
        // chromedriver takes a moment to listen; the session then starts the browser.
        let client = loop {
            match builder.connect(&webdriver).await {
                Ok(client) => break client,
                Err(_) if started.elapsed() < Duration::from_secs(30) => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("no WebDriver session from {chromedriver} with {chromium}: {e}"),
            }
        };
        Some(Browser { driver, client, _profile: profile })
    }

    async fn script(&self, body: &str) -> Value {
        self.client.execute(body, vec![]).await.unwrap()
    }

    /// Polls a script until it returns something other than null or false.
    async fn until(&self, what: &str, body: &str) -> Value {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            let value = self.script(body).await;
            if !(value.is_null() || value == Value::Bool(false)) {
                return value;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn until_connected(&self) {
        let connected = "return document.getElementById('status').textContent === 'connected'";
        self.until("the page's WebSocket", connected).await;
    }

    /// Every bubble on the page: its class, its text and its meta line.
    async fn bubbles(&self) -> Vec<(String, String, String)> {
        let bubbles = self
            .script(
                "return [...document.querySelectorAll('#log .msg')].map(b => [b.className, \
                 b.firstChild ? b.firstChild.textContent : '', b.querySelector('.meta')?.textContent ?? ''])",
            )
            .await;
        serde_json::from_value(bubbles).unwrap()
    }

    /// Ends the session (and with it the browser); dropping stops chromedriver.
    async fn stop(self) {
        self.client.clone().close().await.unwrap();
    }
}

/// A failed assertion must not leave chromedriver running.
impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Types into the page's box and presses Enter, as a person would.
async fn type_question(browser: &Browser, text: &str) {
    let input = browser.client.find(Locator::Id("input")).await.unwrap();
    input.send_keys(&format!("{text}{}", char::from(Key::Enter))).await.unwrap();
}

/// Waits until the page shows the answer's meta line under the `nth` bot bubble.
async fn until_answered(browser: &Browser, nth: usize) {
    let answered = format!("return document.querySelectorAll('#log .msg.bot:not(.streaming) .meta').length > {nth}");
    browser.until("the answer", &answered).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_person_chats_in_the_browser_reloads_and_goes_on() {
    let Some(stack) = stack() else { return };
    let Some(browser) = Browser::start().await else { return };
    let pipeline = Pipeline::start(&stack, &["--llm-max-tokens", "24"]).await;

    browser.client.goto(&format!("{}/", pipeline.http)).await.unwrap();
    browser.until_connected().await;
    // Records every text the answer bubble shows while it is still streaming.
    browser
        .script(
            "window.streamed = []; new MutationObserver(() => { for (const b of document.querySelectorAll('.msg.bot.streaming')) \
             window.streamed.push(b.textContent); }).observe(document.getElementById('log'), \
             { subtree: true, childList: true, characterData: true }); return null",
        )
        .await;
    type_question(&browser, "Name a primary color.").await;
    until_answered(&browser, 0).await;

    let shown = browser.bubbles().await;
    assert_eq!(shown.len(), 2, "{shown:?}");
    assert_eq!(shown[0].0, "msg user");
    assert_eq!(shown[0].1, "Name a primary color.");
    let (class, answer, meta) = &shown[1];
    assert_eq!(class, "msg bot");
    assert!(!answer.trim().is_empty(), "{shown:?}");
    assert!(meta.contains(" tokens · "), "the meta line names model, tokens and latency: {meta:?}");
    // The answer arrived token by token: the bubble showed growing prefixes of it first.
    let streamed: Vec<String> = serde_json::from_value(browser.script("return window.streamed").await).unwrap();
    let mut partial: Vec<&String> = streamed.iter().filter(|text| !text.is_empty()).collect();
    partial.dedup();
    assert!(partial.len() >= 2, "the answer streamed in several steps: {streamed:?}");
    for text in &partial {
        assert!(answer.starts_with(text.as_str()), "{text:?} is a prefix of {answer:?}");
    }

    // The page's own session: what the query API holds is what the page showed.
    let token = browser.script("return localStorage.getItem('parley.token')").await;
    let conversation = browser.script("return localStorage.getItem('parley.conversation')").await;
    let (token, conversation) = (token.as_str().unwrap().to_owned(), conversation.as_str().unwrap().to_owned());
    let stored = pipeline.conversation_when(&token, &conversation, 2).await;
    assert_eq!(stored["messages"][1]["text"], answer.as_str(), "{stored}");

    // A reload rebuilds the page from the projection, and the conversation goes on.
    browser.client.refresh().await.unwrap();
    browser.until_connected().await;
    let reloaded = browser.until("the history", "return document.querySelectorAll('#log .msg').length >= 2").await;
    assert_eq!(reloaded, Value::Bool(true));
    assert_eq!(browser.bubbles().await, shown, "the reloaded page shows the same conversation");
    type_question(&browser, "And another one?").await;
    until_answered(&browser, 1).await;
    let stored = pipeline.conversation_when(&token, &conversation, 4).await;
    let kinds: Vec<&str> = stored["messages"].as_array().unwrap().iter().map(|m| m["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["user_query", "answer", "user_query", "answer"], "{stored}");
    assert_eq!(browser.bubbles().await.len(), 4);

    browser.stop().await;
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_document_added_on_the_page_is_used_in_answers_until_removed() {
    let Some(stack) = stack() else { return };
    let Some(browser) = Browser::start().await else { return };
    let pipeline = Pipeline::start(&stack, &["--llm-max-tokens", "24"]).await;
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("zephyr.md");
    std::fs::write(&file, "The maintenance password of the Zephyr-9 reactor is blue-harmonica-42.").unwrap();
    let question = "What is the maintenance password of the Zephyr-9 reactor?";

    browser.client.goto(&format!("{}/", pipeline.http)).await.unwrap();
    browser.until_connected().await;
    browser.client.find(Locator::Id("docs-toggle")).await.unwrap().click().await.unwrap();
    let picker = browser.client.find(Locator::Id("doc-files")).await.unwrap();
    picker.send_keys(file.to_str().unwrap()).await.unwrap();
    // Listed with a Remove button once the embedder has stored it (until then: "indexing…").
    let listed = "const li = document.querySelector('#doc-list li'); \
                  return li && li.querySelector('button') ? li.firstChild.textContent : null";
    assert_eq!(browser.until("the document to be indexed", listed).await, "zephyr.md");

    type_question(&browser, question).await;
    until_answered(&browser, 0).await;
    let meta = &browser.bubbles().await[1].2;
    assert!(meta.contains("used 1 document chunk(s)"), "the answer used the document: {meta:?}");

    browser.client.find(Locator::Css("#doc-list li button")).await.unwrap().click().await.unwrap();
    let removed = "return document.querySelectorAll('#doc-list li').length === 0";
    browser.until("the document to be removed", removed).await;
    type_question(&browser, question).await;
    until_answered(&browser, 1).await;
    let meta = &browser.bubbles().await[3].2;
    assert!(!meta.contains("document chunk"), "a removed document is not used: {meta:?}");

    browser.stop().await;
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_from_the_cache_says_so_and_the_model_can_be_asked_anyway() {
    let Some(stack) = stack() else { return };
    let Some(browser) = Browser::start().await else { return };
    // Only a complete answer is cached: the model's default length lets it finish.
    let pipeline = Pipeline::start(&stack, &[]).await;
    browser.client.goto(&format!("{}/", pipeline.http)).await.unwrap();
    browser.until_connected().await;
    type_question(&browser, "What is the capital of France? Answer in one word.").await;
    until_answered(&browser, 0).await;
    let first = browser.bubbles().await[1].clone();
    // Once the question is indexed, the same question in a new chat comes from the cache.
    let token = browser.script("return localStorage.getItem('parley.token')").await;
    let token = token.as_str().unwrap().to_owned();
    let query = browser.script("return Object.keys(questions)[0]").await;
    let query = query.as_str().unwrap().to_owned();
    pipeline.search_until(&token, "capital of France", |hit| hit["source_event_id"] == query.as_str()).await;
    // An anonymous token is `<user id>.<signature>`; the projector has cached the answer.
    let user = token.rsplit_once('.').unwrap().0;
    support::wait_until("the cached answer", || async {
        let listed = pipeline.cli(&["cache", "list", user]);
        String::from_utf8_lossy(&listed.stdout).contains(&query).then_some(())
    })
    .await;
    browser.client.find(Locator::Id("new")).await.unwrap().click().await.unwrap();
    type_question(&browser, "what's the capital of france? answer in one word").await;
    until_answered(&browser, 0).await;
    let cached = browser.bubbles().await[1].clone();
    assert_eq!(cached.1, first.1, "the earlier answer, repeated");
    assert!(cached.2.starts_with("answered from cache"), "the page says where it came from: {cached:?}");
    // "Ask the model": the same question again, answered by the model.
    browser.client.find(Locator::Css(".ask-model")).await.unwrap().click().await.unwrap();
    until_answered(&browser, 1).await;
    let shown = browser.bubbles().await;
    assert_eq!(shown[2].1, "what's the capital of france? answer in one word", "{shown:?}");
    assert!(shown[3].2.contains(" tokens · "), "the model answered: {shown:?}");
    browser.stop().await;
    pipeline.stop().await;
}

/// Waits until the page's streaming bubble shows more than `chars` characters.
async fn until_streaming(browser: &Browser, chars: usize) {
    let streaming = format!("return (document.querySelector('.msg.bot.streaming')?.textContent.length ?? 0) > {chars}");
    browser.until("the answer streaming", &streaming).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reloaded_page_resumes_the_answer_stop_keeps_what_was_said_and_earlier_chats_reopen() {
    let Some(stack) = stack() else { return };
    let Some(browser) = Browser::start().await else { return };
    let pipeline = Pipeline::start(&stack, &["--llm-max-tokens", "400"]).await;
    let long = "Write a long story about a dragon and a knight, at least 300 words.";
    browser.client.goto(&format!("{}/", pipeline.http)).await.unwrap();
    browser.until_connected().await;

    // Reload in the middle of a long answer: the page picks it up and shows all of it.
    type_question(&browser, long).await;
    until_streaming(&browser, 20).await;
    browser.client.refresh().await.unwrap();
    browser.until_connected().await;
    until_answered(&browser, 0).await;
    let token = browser.script("return localStorage.getItem('parley.token')").await.as_str().unwrap().to_owned();
    let conversation =
        browser.script("return localStorage.getItem('parley.conversation')").await.as_str().unwrap().to_owned();
    let stored = pipeline.conversation_when(&token, &conversation, 2).await;
    let shown = browser.bubbles().await;
    assert_eq!(shown.len(), 2, "one question, one answer: {shown:?}");
    assert_eq!(shown[1].1, stored["messages"][1]["text"].as_str().unwrap(), "the whole answer after the reload");

    // Stop: the answer so far stays, marked stopped, and the next question is answered.
    type_question(&browser, long).await;
    until_streaming(&browser, 20).await;
    browser.client.find(Locator::Id("stop")).await.unwrap().click().await.unwrap();
    let stopped =
        "return [...document.querySelectorAll('.msg.bot .meta')].some(m => m.textContent.startsWith('stopped'))";
    browser.until("the stopped answer", stopped).await;
    let stored = pipeline.conversation_when(&token, &conversation, 4).await;
    let shown = browser.bubbles().await;
    assert_eq!(shown[3].1, stored["messages"][3]["text"].as_str().unwrap(), "what was said before the stop");
    assert!(shown[3].1.len() < stored["messages"][1]["text"].as_str().unwrap().len() * 2, "{shown:?}");
    type_question(&browser, "Say OK.").await;
    until_answered(&browser, 2).await;

    // A new chat, then the earlier one reopened from the list (newest first).
    browser.client.find(Locator::Id("new")).await.unwrap().click().await.unwrap();
    type_question(&browser, "Name a fruit.").await;
    until_answered(&browser, 0).await;
    browser.client.find(Locator::Id("convs-toggle")).await.unwrap().click().await.unwrap();
    let listed = "return [...document.querySelectorAll('#conv-list li')].map(li => li.dataset.conversationId)";
    let ids = browser
        .until("two conversations", &format!("const ids = (() => {{ {listed} }})(); return ids.length === 2 && ids"))
        .await;
    assert_eq!(ids[1], conversation.as_str(), "the earlier conversation is listed second: {ids}");
    browser.client.find(Locator::Css("#conv-list li:nth-child(2) button")).await.unwrap().click().await.unwrap();
    browser.until("the reopened history", "return document.querySelectorAll('#log .msg').length === 6").await;
    assert_eq!(browser.bubbles().await[3].1, shown[3].1, "the stopped answer, reopened");

    browser.stop().await;
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operations_page_charts_what_the_pipeline_did() {
    let Some(stack) = stack() else { return };
    let Some(browser) = Browser::start().await else { return };
    let pipeline = Pipeline::start(&stack, &[]).await;
    browser.client.goto(&pipeline.http).await.unwrap();
    browser.until_connected().await;
    type_question(&browser, "Say OK.").await;
    until_answered(&browser, 0).await;

    browser.client.goto(&format!("{}/ops", pipeline.http)).await.unwrap();
    // Six panels, each a uPlot chart (its canvas), fed by /ops/series.
    browser.until("six charts", "return document.querySelectorAll('section .uplot canvas').length === 6").await;
    let titles =
        browser.script("return [...document.querySelectorAll('section h2')].map(h => h.firstChild.textContent)").await;
    assert_eq!(
        titles,
        json!(["Turns per second", "First token", "Consumer lag", "Errors per second", "Dead letters", "Open sockets"])
    );
    // Once a snapshot after the turn is in, the turn shows: a rate and a first-token time.
    let now = |id: &str| format!("document.querySelector('#{id} .now').textContent");
    browser.until("the turn's rate", &format!("return /admitted [0-9.]+\\/s/.test({})", now("turns"))).await;
    let first_token = format!("const t = {}; return /p50 [0-9.]+ (ms|s)/.test(t) && t", now("first-token"));
    let first_token = browser.until("the first-token p50", &first_token).await;
    let lag = browser.script(&format!("return {}", now("lag"))).await;
    assert!(lag.as_str().unwrap().contains("inference"), "a lag line per consumer group: {lag}");
    eprintln!("first token: {first_token}; lag: {lag}");
    browser.client.set_window_size(1500, 1000).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await; // the charts are sized on the next refresh
    let screenshot = browser.client.screenshot().await.unwrap();
    let path = std::env::temp_dir().join("parley-ops-page.png");
    std::fs::write(&path, screenshot).unwrap();
    eprintln!("screenshot of the operations page: {}", path.display());
    browser.stop().await;
    pipeline.stop().await;
}
