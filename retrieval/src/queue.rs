//! A process's embeddings by who waits for them. Questions (a turn's retrieval, a search)
//! are embedded by one worker, every question waiting in one batch: batching is where the
//! throughput is (all-MiniLM-L6-v2 on a CPU embeds about twice as many texts per second
//! at batch 8 as one at a time). Bulk work (the embedder's chunks and messages) never
//! passes through that worker, so a question never waits behind it, and runs in the
//! background ([`EmbeddingBackend::embed_in_background`]: the lowest CPU priority for the
//! in-process model), so it takes only the CPU that the model server and questions leave.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use parley_eventlog::trace::{link_trace, traceparent_of};
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, Span, info_span};

use crate::backend::EmbeddingBackend;
use crate::error::RetrievalError;

/// The most question texts embedded in one batch.
pub const QUESTION_BATCH: usize = 32;

type Vectors = Result<Vec<Vec<f32>>, RetrievalError>;

/// Texts waiting to be embedded, and where their vectors go.
struct Request {
    texts: Vec<String>,
    reply: oneshot::Sender<Vectors>,
    /// The asking span's trace context: the batch links every trace it serves.
    traceparent: String,
}

/// The two doors to a process's embedding backend; each is an [`EmbeddingBackend`].
#[derive(Debug, Clone)]
pub struct Embedders {
    /// For a question someone waits on: batched with the others waiting.
    pub questions: Arc<dyn EmbeddingBackend>,
    /// For indexing: embedded in the background.
    pub bulk: Arc<dyn EmbeddingBackend>,
}

impl Embedders {
    /// Starts the question worker over `backend` (on the current tokio runtime); it stops
    /// once the questions' door is dropped.
    pub fn new(backend: Arc<dyn EmbeddingBackend>) -> Self {
        let (sender, requests) = mpsc::unbounded_channel();
        let questions =
            Arc::new(Questions { sender, model: backend.model().to_owned(), dimension: backend.dimension() });
        tokio::spawn(batch_questions(backend.clone(), requests));
        Self { questions, bulk: Arc::new(Background(backend)) }
    }
}

/// The questions' door: requests queued for the worker.
#[derive(Debug)]
struct Questions {
    sender: mpsc::UnboundedSender<Request>,
    model: String,
    dimension: usize,
}

impl EmbeddingBackend for Questions {
    fn model(&self) -> &str {
        &self.model
    }

    fn dimension(&self) -> usize {
        self.dimension
    }

    fn embed<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Vectors> {
        async move {
            let (reply, vectors) = oneshot::channel();
            let stopped = || RetrievalError::Embedding("the question embedding worker stopped".into());
            let traceparent = traceparent_of(&Span::current(), None);
            self.sender.send(Request { texts: texts.to_vec(), reply, traceparent }).map_err(|_| stopped())?;
            vectors.await.map_err(|_| stopped())?
        }
        .boxed()
    }
}

/// The bulk door: the backend, in the background.
#[derive(Debug)]
struct Background(Arc<dyn EmbeddingBackend>);

impl EmbeddingBackend for Background {
    fn model(&self) -> &str {
        self.0.model()
    }

    fn dimension(&self) -> usize {
        self.0.dimension()
    }

    fn embed<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Vectors> {
        self.0.embed_in_background(texts)
    }
}

/// The worker: whatever questions wait, up to [`QUESTION_BATCH`] texts, in one batch.
async fn batch_questions(backend: Arc<dyn EmbeddingBackend>, mut requests: mpsc::UnboundedReceiver<Request>) {
    while let Some(first) = requests.recv().await {
        let (mut texts, mut batch) = (first.texts.len(), vec![first]);
        while texts < QUESTION_BATCH {
            let Ok(request) = requests.try_recv() else { break };
            texts += request.texts.len();
            batch.push(request);
        }
        let span = info_span!("embedding.questions", requests = batch.len(), texts);
        for request in &batch {
            link_trace(&span, Some(&request.traceparent));
        }
        embed_batch(backend.as_ref(), batch).instrument(span).await;
    }
}

/// Embeds the requests' texts in one call and hands each request its vectors. When the
/// call fails, each request is tried alone, so one bad text fails only its own request.
async fn embed_batch(backend: &dyn EmbeddingBackend, batch: Vec<Request>) {
    let texts: Vec<String> = batch.iter().flat_map(|request| request.texts.iter().cloned()).collect();
    let embedded = backend.embed(&texts).await.and_then(|vectors| {
        if vectors.len() == texts.len() {
            Ok(vectors)
        } else {
            Err(RetrievalError::Embedding(format!(
                "the backend returned {} vectors for {} texts",
                vectors.len(),
                texts.len()
            )))
        }
    });
    match embedded {
        Ok(vectors) => {
            let mut vectors = vectors.into_iter();
            for request in batch {
                let own = vectors.by_ref().take(request.texts.len()).collect();
                let _ = request.reply.send(Ok(own));
            }
        }
        Err(error) if batch.len() == 1 => {
            let _ = batch.into_iter().next().map(|request| request.reply.send(Err(error)));
        }
        Err(_) => {
            for request in batch {
                let alone = backend.embed(&request.texts).await;
                let _ = request.reply.send(alone);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    /// Records each call's texts; a text "bad" fails the call it is in; each call takes 100 ms.
    /// Records each call's texts; a text "bad" fails the call it is in. A call takes
    /// 100 ms, one in the background 500 ms.
    #[derive(Debug, Default)]
    struct Recorder {
        calls: Mutex<Vec<Vec<String>>>,
    }

    impl Recorder {
        async fn call(&self, texts: &[String], takes: Duration) -> Vectors {
            self.calls.lock().unwrap().push(texts.to_vec());
            tokio::time::sleep(takes).await;
            if texts.iter().any(|t| t == "bad") {
                return Err(RetrievalError::Embedding("bad text".into()));
            }
            Ok(texts.iter().map(|t| vec![t.len() as f32]).collect())
        }
    }

    impl EmbeddingBackend for Recorder {
        fn model(&self) -> &str {
            "recorder"
        }

        fn dimension(&self) -> usize {
            1
        }

        fn embed<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Vectors> {
            self.call(texts, Duration::from_millis(100)).boxed()
        }

        fn embed_in_background<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Vectors> {
            self.call(texts, Duration::from_millis(500)).boxed()
        }
    }

    fn texts(items: &[&str]) -> Vec<String> {
        items.iter().map(|&t| t.to_owned()).collect()
    }

    #[tokio::test]
    async fn questions_waiting_together_are_one_batch_and_each_gets_its_own_vectors() {
        let recorder = Arc::new(Recorder::default());
        let embedders = Embedders::new(recorder.clone());
        // The first question occupies the worker; the next three wait and go as one batch.
        let asked: Vec<_> = ["a", "bb", "ccc", "dddd"]
            .iter()
            .map(|&t| {
                let questions = embedders.questions.clone();
                tokio::spawn(async move { questions.embed(&texts(&[t])).await.unwrap() })
            })
            .collect();
        let mut answers = Vec::new();
        for question in asked {
            answers.push(question.await.unwrap());
        }
        assert_eq!(answers, [vec![vec![1.0]], vec![vec![2.0]], vec![vec![3.0]], vec![vec![4.0]]]);
        let calls = recorder.calls.lock().unwrap().clone();
        assert!(calls.len() < 4, "some questions shared a batch: {calls:?}");
        assert_eq!(calls.concat(), texts(&["a", "bb", "ccc", "dddd"]), "in the order asked");
    }

    #[tokio::test]
    async fn a_question_never_waits_behind_bulk_work() {
        let recorder = Arc::new(Recorder::default());
        let embedders = Embedders::new(recorder.clone());
        let bulk = {
            let bulk = embedders.bulk.clone();
            let many: Vec<String> = (0..40).map(|i| format!("chunk {i:02}")).collect();
            tokio::spawn(async move { bulk.embed(&many).await.unwrap().len() })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        let question = embedders.questions.embed(&texts(&["question"])).await.unwrap();
        assert_eq!(question, [vec![8.0]]);
        assert!(!bulk.is_finished(), "the question was embedded while the bulk work still ran");
        assert_eq!(bulk.await.unwrap(), 40);
    }

    #[tokio::test]
    async fn a_failing_text_fails_only_its_own_request() {
        let recorder = Arc::new(Recorder::default());
        let embedders = Embedders::new(recorder.clone());
        let asked: Vec<_> = ["first", "bad", "good"]
            .iter()
            .map(|&t| {
                let questions = embedders.questions.clone();
                tokio::spawn(async move { questions.embed(&texts(&[t])).await })
            })
            .collect();
        let mut outcomes = Vec::new();
        for question in asked {
            outcomes.push(question.await.unwrap().is_ok());
        }
        assert_eq!(outcomes, [true, false, true]);
    }
}
