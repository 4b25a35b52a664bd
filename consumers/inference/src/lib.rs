//! The inference consumer: reads UserQueryReceived, asks the LLM, appends the outcome.
//!
//! - [`prompt`]: what the model is asked (pure);
//! - [`retry`]: backoff and circuit breaker (pure);
//! - [`context`]: earlier turns, from the projection or else the log;
//! - [`llm`]: the OpenAI-compatible client;
//! - [`service`]: the transactional consume–call–produce loop.

pub mod context;
pub mod llm;
pub mod prompt;
pub mod retry;
pub mod service;
