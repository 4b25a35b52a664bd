//! The long-running services: `parley gateway`, `inference`, `projection`, `embedder`,
//! `erasure`, and `all` (every one of them in one process, the quick start).

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use parley_embedder::{CqlStores, EmbedderArgs};
use parley_erasure::watch::forget_erased_keys;
use parley_erasure::worker::Purger;
use parley_eventlog::topics::ensure_topics;
use parley_events::SchemaCatalog;
use parley_events::registry::SchemaRegistry;
use parley_gateway::{Credentials, Gateway, GatewayArgs};
use parley_inference::service::InferenceArgs;
use parley_projections::Store;
use parley_projections::reader::LiveReader;
use parley_retrieval::{Embedders, EmbeddingSettings, MilvusSettings, Retriever, VectorStore};
use tokio_util::sync::CancellationToken;

use crate::cli::Common;
use crate::commands::connect_store;

/// `parley gateway`.
pub(crate) async fn gateway(common: &Common, args: GatewayArgs, shutdown: CancellationToken) -> Result<ExitCode> {
    let kafka = &common.kafka;
    let registry = common.schema_registry_url.as_str();
    let budgets = common.budgets;
    let credentials = Credentials::load(&args, &shutdown).await?;
    let store = connect_store(common).await?;
    watch_erasures(common, &store, &shutdown);
    let retriever = retrieval(common).await?.map(|(embedders, vectors)| Retriever::new(embedders.questions, vectors));
    let keys = store.keys().cloned();
    let gateway = Gateway::bind(kafka, registry, &args, credentials, budgets, store, retriever, keys, shutdown).await?;
    print_chat_url(&gateway);
    gateway.serve().await?;
    Ok(ExitCode::SUCCESS)
}

/// `parley inference`.
pub(crate) async fn inference(common: &Common, args: InferenceArgs, shutdown: CancellationToken) -> Result<ExitCode> {
    let kafka = &common.kafka;
    let registry = common.schema_registry_url.as_str();
    let budgets = common.budgets;
    let store = connect_store(common).await?;
    watch_erasures(common, &store, &shutdown);
    let retriever = retrieval(common).await?.map(|(embedders, vectors)| Retriever::new(embedders.questions, vectors));
    let keys = store.keys().cloned();
    Box::pin(parley_inference::service::run(kafka, registry, store, retriever, keys, args, budgets, shutdown)).await?;
    Ok(ExitCode::SUCCESS)
}

/// `parley projection`.
pub(crate) async fn projection(common: &Common, shutdown: CancellationToken) -> Result<ExitCode> {
    let kafka = &common.kafka;
    let registry = common.schema_registry_url.as_str();
    let store = connect_store(common).await?;
    Box::pin(parley_projections::projector::run(kafka, registry, store, shutdown)).await?;
    Ok(ExitCode::SUCCESS)
}

/// `parley embedder`.
pub(crate) async fn embedder(common: &Common, args: EmbedderArgs, shutdown: CancellationToken) -> Result<ExitCode> {
    let kafka = &common.kafka;
    let registry = common.schema_registry_url.as_str();
    let (embedders, vectors) = open_retrieval(&common.embedding, &common.milvus).await?;
    let store = connect_store(common).await?;
    watch_erasures(common, &store, &shutdown);
    let keys = store.keys().cloned();
    let cql = Some(CqlStores { cache: Arc::new(LiveReader::new(store).await?), keys });
    parley_embedder::run(kafka, registry, embedders.bulk, vectors, cql, args, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// `parley erasure`: the erasure worker (one is enough; the topic has one partition).
pub(crate) async fn erasure(common: &Common, shutdown: CancellationToken) -> Result<ExitCode> {
    let store = connect_store(common).await?;
    let vectors = vector_store(common).await?;
    parley_erasure::worker::run(&common.kafka, &common.schema_registry_url, Purger { store, vectors }, shutdown)
        .await?;
    Ok(ExitCode::SUCCESS)
}

/// The vector store alone (an erasure purges it by owner; no embedding backend needed
/// beyond its dimension), unless `--without-retrieval`.
async fn vector_store(common: &Common) -> Result<Option<VectorStore>> {
    Ok(retrieval(common).await?.map(|(_, vectors)| vectors))
}

/// Forgets, in this process, the data key of each person erased from now on (every process
/// that opens or seals content runs it; without a master key there are no keys to forget).
fn watch_erasures(common: &Common, store: &Store, shutdown: &CancellationToken) {
    let Some(keys) = store.keys().cloned() else { return };
    let (kafka, registry, shutdown) = (common.kafka.clone(), common.schema_registry_url.clone(), shutdown.clone());
    tokio::spawn(async move {
        if let Err(error) = forget_erased_keys(&kafka, &registry, keys, shutdown.clone()).await {
            // A process that could miss an erasure would go on opening what it sealed.
            tracing::error!(%error, "the erasures watch stopped (is the erasures topic there? `parley topics` creates it); stopping the process");
            shutdown.cancel();
        }
    });
}

/// `parley all`: topics, schemas, then every service in this process.
pub(crate) async fn all(
    common: &Common,
    gateway: Box<GatewayArgs>,
    inference: InferenceArgs,
    embedder: EmbedderArgs,
    without_projection: bool,
    shutdown: CancellationToken,
) -> Result<ExitCode> {
    let kafka = &common.kafka;
    let registry = common.schema_registry_url.as_str();
    let budgets = common.budgets;
    let credentials = Credentials::load(&gateway, &shutdown).await?;
    ensure_topics(kafka, None).await.context("creating topics")?;
    SchemaRegistry::new(registry)?.register_all(&SchemaCatalog::embedded()).await.context("registering schemas")?;
    let store = connect_store(common).await?;
    watch_erasures(common, &store, &shutdown);
    let retrieval = retrieval(common).await?;
    let keys = store.keys().cloned();
    let erasure = spawn_linked(&shutdown, {
        let purger = Purger { store: store.clone(), vectors: retrieval.as_ref().map(|(_, vectors)| vectors.clone()) };
        let (kafka, registry, shutdown) = (kafka.clone(), registry.to_owned(), shutdown.clone());
        async move { parley_erasure::worker::run(&kafka, &registry, purger, shutdown).await }
    });
    // One embedding backend for the three: questions batched by one worker, indexing in the background.
    let retriever = retrieval.clone().map(|(embedders, vectors)| Retriever::new(embedders.questions, vectors));
    let gateway = Gateway::bind(
        kafka,
        registry,
        &gateway,
        credentials,
        budgets,
        store.clone(),
        retriever.clone(),
        keys.clone(),
        shutdown.clone(),
    )
    .await?;
    let cql = Some(CqlStores { cache: Arc::new(LiveReader::new(store.clone()).await?), keys: keys.clone() });
    let inference = spawn_linked(&shutdown, {
        let (kafka, registry, shutdown, store) = (kafka.clone(), registry.to_owned(), shutdown.clone(), store.clone());
        async move {
            Box::pin(parley_inference::service::run(
                &kafka, &registry, store, retriever, keys, inference, budgets, shutdown,
            ))
            .await
        }
    });
    let embedder = retrieval.map(|(embedders, vectors)| {
        let (kafka, registry, shutdown_) = (kafka.clone(), registry.to_owned(), shutdown.clone());
        spawn_linked(&shutdown, async move {
            parley_embedder::run(&kafka, &registry, embedders.bulk, vectors, cql, embedder, shutdown_).await
        })
    });
    let projection = (!without_projection).then(|| {
        let (kafka, registry, shutdown_) = (kafka.clone(), registry.to_owned(), shutdown.clone());
        spawn_linked(&shutdown, async move {
            Box::pin(parley_projections::projector::run(&kafka, &registry, store, shutdown_)).await
        })
    });
    print_chat_url(&gateway);
    let served = gateway.serve().await;
    inference.await.context("inference task")??;
    if let Some(projection) = projection {
        projection.await.context("projection task")??;
    }
    if let Some(embedder) = embedder {
        embedder.await.context("embedder task")??;
    }
    erasure.await.context("erasure task")??;
    served?;
    Ok(ExitCode::SUCCESS)
}

/// The embedding worker's doors and the vector store, unless `--without-retrieval`.
async fn retrieval(common: &Common) -> Result<Option<(Embedders, VectorStore)>> {
    if common.without_retrieval { Ok(None) } else { Ok(Some(open_retrieval(&common.embedding, &common.milvus).await?)) }
}

/// Loads the embedding backend, starts its worker and opens the vector store with the
/// backend's dimension.
pub(crate) async fn open_retrieval(
    embedding: &EmbeddingSettings,
    milvus: &MilvusSettings,
) -> Result<(Embedders, VectorStore)> {
    let backend = embedding.backend().await.context("loading the embedding backend")?;
    let vectors = VectorStore::open(milvus, backend.dimension(), backend.model())
        .await
        .with_context(|| format!("opening Milvus collection {} at {}", milvus.milvus_collection, milvus.milvus_url))?;
    Ok((Embedders::new(backend), vectors))
}

/// Serves the process's Prometheus metrics at `http://{addr}/metrics` until `shutdown`.
pub(crate) async fn serve_metrics(addr: SocketAddr, shutdown: CancellationToken) -> Result<()> {
    use parley_eventlog::metrics::{CONTENT_TYPE, render};
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("metrics on {addr}"))?;
    let routes = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], render()) }),
    );
    tracing::info!(%addr, "serving metrics at /metrics");
    tokio::spawn(async move {
        let served = axum::serve(listener, routes).with_graceful_shutdown(async move { shutdown.cancelled().await });
        if let Err(error) = served.await {
            tracing::warn!(%error, "the metrics server stopped");
        }
    });
    Ok(())
}

/// Runs one service of `parley all` as a task; when it ends, for whatever reason, the
/// whole process stops rather than limp on without it.
pub(crate) fn spawn_linked<E: Send + 'static>(
    shutdown: &CancellationToken,
    service: impl Future<Output = Result<(), E>> + Send + 'static,
) -> tokio::task::JoinHandle<Result<(), E>> {
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        let result = service.await;
        shutdown.cancel();
        result
    })
}

pub(crate) fn print_chat_url(gateway: &Gateway) {
    if let Some(addr) = gateway.local_addr() {
        println!("Parley chat: http://{addr}/");
    }
}
