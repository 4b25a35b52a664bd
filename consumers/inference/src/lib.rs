//! The inference consumer: reads UserQueryReceived, asks the LLM, appends the outcome.
//!
//! - [`prompt`]: what the model is asked (pure);
//! - [`retry`]: backoff and circuit breaker (pure);
//! - [`llm`]: the OpenAI-compatible client;
//! - [`service`]: the transactional consume–call–produce loop.

pub mod llm;
pub mod prompt;
pub mod retry;
pub mod service;
