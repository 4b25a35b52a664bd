//! `parley replay --prompts`: each answer's prompt rebuilt from events alone (the system
//! prompt in use, the turns before it from the conversation's records, each retrieved chunk
//! from its document's event and each retrieved message from its conversation's) with the
//! builder inference uses, and checked against the digest the answer recorded.

use std::collections::HashMap;

use anyhow::{Context, Result};
use parley_embedder::sources::document_records;
use parley_eventlog::consumer::scan_topic;
use parley_events::conversation::{ConversationState, message_of};
use parley_events::sealing::ERASED;
use parley_events::{
    ConversationEvent, ConversationId, DocumentEvent, DocumentSubmitted, EventCodec, EventId, LLMResponseGenerated,
    RetrievedContext,
};
use parley_inference::prompt::{ChatMessage, PastKnowledge, Prompt, PromptLayout, build_prompt, knowledge_block};
use parley_inference::proof::{Verdict, layout_named, precheck, role_name, verify};
use parley_projections::Store;
use parley_projections::replay::{AuditRecord, LogReader, Lookup, conversation_records};
use parley_retrieval::{Hit, SourceKind};
use rdkafka::Message as _;
use serde::Serialize;

use crate::cli::Common;

/// What a prompt is rebuilt with that the events do not hold: the operator's settings then.
#[derive(Debug, Clone)]
pub(crate) struct PromptSettings {
    /// The system prompt inference was given.
    pub system_prompt: String,
    /// The embedder's chunk size and overlap (a retrieved chunk is cut again from its
    /// document's text).
    pub chunk_chars: usize,
    /// See `chunk_chars`.
    pub chunk_overlap: usize,
}

impl From<crate::cli::PromptArgs> for PromptSettings {
    fn from(args: crate::cli::PromptArgs) -> Self {
        Self {
            system_prompt: args.system_prompt,
            chunk_chars: usize::try_from(args.chunk_chars).unwrap_or(usize::MAX),
            chunk_overlap: usize::try_from(args.chunk_overlap).unwrap_or(0),
        }
    }
}

/// One answer's prompt, rebuilt (when it could be) and judged.
#[derive(Debug, Serialize)]
pub(crate) struct RebuiltPrompt {
    /// The answer's sequence.
    pub sequence: i64,
    /// The answer.
    pub answer_event_id: EventId,
    /// Proven, differs, or why it cannot be rebuilt.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// The messages rebuilt (empty when it could not be).
    pub messages: Vec<RebuiltMessage>,
}

/// A message of a rebuilt prompt.
#[derive(Debug, Serialize)]
pub(crate) struct RebuiltMessage {
    /// system, user or assistant.
    pub role: &'static str,
    /// What it says.
    pub content: String,
}

/// Where retrieved texts come from: the documents topic (read once, when an answer
/// retrieved a chunk) and other conversations' records.
struct Sources<'a> {
    common: &'a Common,
    store: &'a Store,
    reader: &'a LogReader,
    settings: &'a PromptSettings,
    documents: Option<HashMap<EventId, DocumentSubmitted>>,
    conversations: HashMap<ConversationId, Vec<AuditRecord>>,
}

impl Sources<'_> {
    /// Each of `retrieved` as inference had it, in order, or why one cannot be had.
    async fn hits(&mut self, retrieved: &[RetrievedContext], own: &[AuditRecord]) -> Result<Result<Vec<Hit>, String>> {
        let mut hits = Vec::with_capacity(retrieved.len());
        for one in retrieved {
            match self.hit(one, own).await? {
                Ok(hit) => hits.push(hit),
                Err(why) => return Ok(Err(why)),
            }
        }
        Ok(Ok(hits))
    }

    /// The hit as inference had it, or why it cannot be had.
    async fn hit(&mut self, retrieved: &RetrievedContext, own: &[AuditRecord]) -> Result<Result<Hit, String>> {
        let settings = self.settings;
        let (kind, label, text) = match retrieved.source_kind.as_str() {
            "document" => {
                let documents = self.documents().await?;
                let Some(document) = documents.get(&retrieved.source_event_id) else {
                    return Ok(Err(format!(
                        "the document event {} of retrieved chunk {} is not in the documents topic",
                        retrieved.source_event_id, retrieved.vector_id
                    )));
                };
                if document.text == ERASED {
                    return Ok(Err(format!("document {} was erased with its owner", document.document_id)));
                }
                let chunk = document_records(document, settings.chunk_chars, settings.chunk_overlap)
                    .into_iter()
                    .find(|chunk| chunk.position == retrieved.position);
                let Some(chunk) = chunk else {
                    return Ok(Err(format!(
                        "document {} has no chunk {} with --chunk-chars {} --chunk-overlap {}",
                        document.document_id, retrieved.position, settings.chunk_chars, settings.chunk_overlap
                    )));
                };
                (SourceKind::Document, chunk.label, chunk.text)
            }
            "message" => {
                let Ok(conversation) = retrieved.source_id.parse::<ConversationId>() else {
                    return Ok(Err(format!(
                        "retrieved message source {:?} is not a conversation id",
                        retrieved.source_id
                    )));
                };
                let records = if own.first().is_some_and(|r| r.event.envelope().conversation_id == conversation) {
                    own
                } else {
                    self.conversation(conversation).await?
                };
                let found = records.iter().find(|r| r.event_id == retrieved.source_event_id);
                let Some((message, label)) = found.and_then(|r| {
                    let label = match &r.event {
                        ConversationEvent::QueryReceived(_) => "user",
                        _ => "assistant",
                    };
                    message_of(&r.event).map(|m| (m, label))
                }) else {
                    return Ok(Err(format!(
                        "retrieved message {} of conversation {conversation} is not in the log",
                        retrieved.source_event_id
                    )));
                };
                if message.text == ERASED {
                    return Ok(Err(format!(
                        "retrieved message of conversation {conversation} was erased with its owner"
                    )));
                }
                (SourceKind::Message, label.to_owned(), message.text)
            }
            other => return Ok(Err(format!("retrieved source kind {other:?} is unknown to this replay"))),
        };
        Ok(Ok(Hit {
            id: retrieved.vector_id.clone(),
            kind,
            source_id: retrieved.source_id.clone(),
            source_event_id: retrieved.source_event_id,
            position: retrieved.position,
            label,
            text,
            score: retrieved.score,
            similarity: Some(retrieved.score),
            keyword_score: None,
        }))
    }

    /// Every document submission in the log, opened.
    async fn documents(&mut self) -> Result<&HashMap<EventId, DocumentSubmitted>> {
        if self.documents.is_none() {
            let codec = EventCodec::new(self.common.schema_registry_url.as_str())?;
            let mut documents = HashMap::new();
            let topic = self.common.kafka.topics().documents;
            scan_topic(&self.common.kafka, &topic, None, async |message| {
                if let Ok(decoded) = codec.decode_document_event(message.payload().unwrap_or_default()).await
                    && let DocumentEvent::Submitted(document) = decoded.event
                {
                    documents.insert(document.envelope.event_id, document);
                }
                anyhow::Ok(())
            })
            .await
            .context("reading the documents topic")?;
            if let Some(keys) = self.store.keys() {
                for document in documents.values_mut() {
                    keys.open_event(document).await?;
                }
            }
            self.documents = Some(documents);
        }
        Ok(self.documents.get_or_insert_default())
    }

    /// Another conversation's records, opened.
    async fn conversation(&mut self, id: ConversationId) -> Result<&[AuditRecord]> {
        if !self.conversations.contains_key(&id) {
            let (records, _, _) = conversation_records(self.reader, self.store, id, Lookup::IndexOrScan).await?;
            self.conversations.insert(id, records);
        }
        Ok(&self.conversations[&id])
    }
}

/// Each answer of the conversation whose `records` (opened) are given, with its prompt
/// rebuilt and judged.
pub(crate) async fn rebuild_prompts(
    common: &Common,
    store: &Store,
    reader: &LogReader,
    records: &[AuditRecord],
    settings: &PromptSettings,
) -> Result<Vec<RebuiltPrompt>> {
    let mut sources = Sources { common, store, reader, settings, documents: None, conversations: HashMap::new() };
    let mut rebuilt = Vec::new();
    for record in records {
        let ConversationEvent::ResponseGenerated(answer) = &record.event else { continue };
        let judged = |verdict: Verdict, messages: &[ChatMessage]| RebuiltPrompt {
            sequence: record.sequence,
            answer_event_id: answer.envelope.event_id,
            verdict,
            messages: messages
                .iter()
                .map(|m| RebuiltMessage { role: role_name(m.role), content: m.content.clone() })
                .collect(),
        };
        match rebuild(answer, records, &mut sources).await? {
            Ok(messages) => {
                let proof = answer.prompt.as_ref().context("a rebuilt prompt has a proof")?;
                rebuilt.push(judged(verify(proof, &messages), &messages));
            }
            Err(verdict) => rebuilt.push(judged(verdict, &[])),
        }
    }
    Ok(rebuilt)
}

/// The messages `answer`'s prompt had, rebuilt, or the verdict that says why not.
async fn rebuild(
    answer: &LLMResponseGenerated,
    records: &[AuditRecord],
    sources: &mut Sources<'_>,
) -> Result<Result<Vec<ChatMessage>, Verdict>> {
    let system_prompt = sources.settings.system_prompt.clone();
    let layout = match precheck(answer, &system_prompt) {
        Ok(layout) => layout,
        Err(verdict) => return Ok(Err(verdict)),
    };
    let budget = answer.prompt.as_ref().map_or(0, |p| usize::try_from(p.token_budget).unwrap_or(0));
    let prompt = match prompt_of(answer, records, sources, &system_prompt, layout, budget).await? {
        Ok(prompt) => prompt,
        Err(why) => return Ok(Err(Verdict::Unprovable { why })),
    };
    if prompt.context_event_ids != answer.context_event_ids {
        return Ok(Err(Verdict::Differs {
            why: format!(
                "the rebuilt prompt holds earlier turns {:?}, the answer recorded {:?}",
                prompt.context_event_ids, answer.context_event_ids
            ),
        }));
    }
    Ok(Ok(prompt.messages))
}

/// `answer`'s prompt built from events with `system_prompt`: its question, the turns before
/// it, the chunks and messages it retrieved; or why one of them cannot be read.
async fn prompt_of(
    answer: &LLMResponseGenerated,
    records: &[AuditRecord],
    sources: &mut Sources<'_>,
    system_prompt: &str,
    layout: PromptLayout,
    budget: usize,
) -> Result<Result<Prompt, String>> {
    let query = records.iter().find_map(|r| match &r.event {
        ConversationEvent::QueryReceived(query) if query.envelope.event_id == answer.query_event_id => Some(query),
        _ => None,
    });
    let Some(query) = query else {
        return Ok(Err(format!("its question {} is not in the conversation's records", answer.query_event_id)));
    };
    if query.text == ERASED {
        return Ok(Err("the owner was erased: the question reads [erased]".into()));
    }
    let before = records.iter().filter(|r| r.sequence < query.envelope.sequence).map(|r| &r.event);
    let history = ConversationState::fold(before).map(|state| state.messages).unwrap_or_default();
    let hits = match sources.hits(&answer.retrieved, records).await? {
        Ok(hits) => hits,
        Err(why) => return Ok(Err(why)),
    };
    // The earlier questions sent again with their knowledge: each block rebuilt from what
    // that question's answer retrieved.
    let mut past = PastKnowledge::new();
    for question in answer.prompt.as_ref().map(|p| p.knowledge_turns.as_slice()).unwrap_or_default() {
        let earlier = records.iter().find_map(|r| match &r.event {
            ConversationEvent::ResponseGenerated(a) if a.query_event_id == *question => Some(a),
            _ => None,
        });
        let Some(earlier) = earlier else {
            return Ok(Err(format!("earlier question {question} sent with its knowledge has no answer in the log")));
        };
        let earlier_hits = match sources.hits(&earlier.retrieved, records).await? {
            Ok(hits) => hits,
            Err(why) => return Ok(Err(format!("the knowledge of earlier question {question}: {why}"))),
        };
        if let Some(block) = knowledge_block(&earlier_hits.iter().collect::<Vec<_>>()) {
            past.insert(*question, block);
        }
    }
    Ok(Ok(build_prompt(system_prompt, &history, query, &hits, budget, layout, &past)))
}

/// The prompt `answer`'s turn would send today with `system_prompt` (the one recorded when
/// the answer holds a proof: its layout and budget; else `layout` and `budget`): what a
/// re-run sends. Err: why its context cannot be read.
pub(crate) async fn rerun_prompt(
    common: &Common,
    store: &Store,
    reader: &LogReader,
    records: &[AuditRecord],
    answer: &LLMResponseGenerated,
    settings: &PromptSettings,
    (layout, budget): (PromptLayout, usize),
) -> Result<Result<Prompt, String>> {
    let mut sources = Sources { common, store, reader, settings, documents: None, conversations: HashMap::new() };
    let (layout, budget) = match &answer.prompt {
        Some(proof) => {
            (layout_named(&proof.layout).unwrap_or(layout), usize::try_from(proof.token_budget).unwrap_or(budget))
        }
        None => (layout, budget),
    };
    prompt_of(answer, records, &mut sources, &settings.system_prompt, layout, budget).await
}
