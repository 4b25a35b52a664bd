//! Any OpenAI-compatible `/v1/embeddings` endpoint, through async-openai.

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::embeddings::{CreateEmbeddingRequest, EmbeddingInput};
use futures::FutureExt;
use futures::future::BoxFuture;

use crate::backend::EmbeddingBackend;
use crate::error::RetrievalError;

/// An OpenAI-compatible embeddings endpoint.
#[derive(Debug, Clone)]
pub struct OpenAiEmbeddings {
    client: Client<OpenAIConfig>,
    model: String,
    dimension: usize,
}

impl OpenAiEmbeddings {
    /// Connects and embeds a probe text to learn the model's dimension.
    pub async fn connect(base_url: &str, api_key: &str, model: &str) -> Result<Self, RetrievalError> {
        let config = OpenAIConfig::new().with_api_base(base_url).with_api_key(api_key);
        let mut backend = Self { client: Client::with_config(config), model: model.to_owned(), dimension: 0 };
        let probe = backend.request(&["dimension probe".to_owned()]).await?;
        backend.dimension = probe.first().map_or(0, Vec::len);
        if backend.dimension == 0 {
            return Err(RetrievalError::EmbeddingService(format!(
                "{base_url}: model {model} returned an empty vector"
            )));
        }
        Ok(backend)
    }

    async fn request(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, RetrievalError> {
        let request = CreateEmbeddingRequest {
            model: self.model.clone(),
            input: EmbeddingInput::StringArray(texts.to_vec()),
            encoding_format: None,
            user: None,
            dimensions: None,
        };
        let response = self
            .client
            .embeddings()
            .create(request)
            .await
            .map_err(|e| RetrievalError::EmbeddingService(e.to_string()))?;
        let mut data = response.data;
        if data.len() != texts.len() {
            return Err(RetrievalError::EmbeddingService(format!(
                "asked for {} embeddings, got {}",
                texts.len(),
                data.len()
            )));
        }
        data.sort_by_key(|d| d.index);
        Ok(data.into_iter().map(|d| normalized(d.embedding)).collect())
    }
}

/// Scales to unit length, so inner-product search ranks by cosine whatever the server does.
fn normalized(mut vector: Vec<f32>) -> Vec<f32> {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
    vector
}

impl EmbeddingBackend for OpenAiEmbeddings {
    fn model(&self) -> &str {
        &self.model
    }

    fn dimension(&self) -> usize {
        self.dimension
    }

    fn embed<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Result<Vec<Vec<f32>>, RetrievalError>> {
        async move {
            if texts.is_empty() {
                return Ok(vec![]);
            }
            let vectors = self.request(texts).await?;
            if let Some(wrong) = vectors.iter().find(|v| v.len() != self.dimension) {
                return Err(RetrievalError::EmbeddingService(format!(
                    "model {} changed dimension from {} to {}",
                    self.model,
                    self.dimension,
                    wrong.len()
                )));
            }
            Ok(vectors)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::normalized;

    #[test]
    fn vectors_are_scaled_to_unit_length_and_zero_stays_zero() {
        let v = normalized(vec![3.0, 4.0]);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        assert_eq!(normalized(vec![0.0, 0.0]), vec![0.0, 0.0]);
    }
}
