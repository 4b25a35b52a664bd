//! The inference consumer: reads UserQueryReceived, asks the LLM, appends the outcome.
//!
//! - [`prompt`]: what the model is asked (pure); [`proof`]: what proves it was;
//! - [`experiment`]: a what-if re-run's prompt and outcome as events carry them (pure);
//! - [`cache`]: earlier answers that answer a new question too;
//! - [`retry`]: backoff and circuit breaker (pure);
//! - [`balancer`]: which LLM endpoint of the pool takes a call (pure);
//! - [`history`]: the histories kept of the conversations read (pure);
//! - [`context`]: earlier turns, kept or from the projection or else the log;
//! - [`llm`]: the pool of OpenAI-compatible endpoints; [`completion`]: what a call comes to;
//! - [`metrics`]: GenAI call metrics, the latency a person sees, breakers;
//! - [`service`]: the processor the event log's driver runs.
#![warn(missing_docs)]

pub mod balancer;
pub mod cache;
pub mod cancel;
pub mod completion;
pub mod context;
pub mod experiment;
pub mod history;
pub mod llm;
pub mod metrics;
pub mod prompt;
pub mod proof;
pub mod retry;
pub mod service;
