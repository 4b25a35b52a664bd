//! Schema evolution against the registry: registering this build's schemas under
//! BACKWARD_TRANSITIVE and asking whether files on disk are compatible with what is there.
//! Subjects follow the RecordNameStrategy (subject = full record name), because one topic
//! carries several event types.

use std::time::Duration;

use schema_registry_converter::async_impl::schema_registry::{
    SrSettings, get_all_subjects, is_compatible_schema, post_schema,
};

use crate::catalog::SchemaCatalog;
use crate::error::EventsError;

/// The compatibility level Parley's subjects are held to.
pub const COMPATIBILITY_LEVEL: &str = "BACKWARD_TRANSITIVE";

/// The verdict for one schema file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The registry accepts it as the next version (or already has it).
    Compatible,
    /// No version of this subject is registered yet; anything is accepted.
    NewSubject,
    /// The registry refuses it under the subject's compatibility level.
    Incompatible,
}

/// What the registry says of one newest schema file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompatibilityReport {
    /// The registry subject (the event's full name).
    pub subject: String,
    /// The schema file checked.
    pub file: String,
    /// Whether it may be registered.
    pub verdict: Verdict,
}

/// A client for the parts of the Confluent registry API that evolution needs.
#[derive(Debug, Clone)]
pub struct SchemaRegistry {
    url: String,
    settings: SrSettings,
    http: reqwest::Client,
}

impl SchemaRegistry {
    /// A client of the Confluent-compatible API at `url`.
    pub fn new(url: &str) -> Result<Self, EventsError> {
        let url = url.trim_end_matches('/').to_owned();
        let settings = SrSettings::new_builder(url.clone())
            .set_timeout(Duration::from_secs(10))
            .no_proxy()
            .build()
            .map_err(|e| EventsError::Registry(e.to_string()))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .no_proxy()
            .build()
            .map_err(|e| EventsError::Registry(e.to_string()))?;
        Ok(Self { url, settings, http })
    }

    /// Sets the default compatibility level, then registers every version of every event,
    /// oldest first. Returns (subject, schema id) of each latest version.
    pub async fn register_all(&self, catalog: &SchemaCatalog) -> Result<Vec<(String, u32)>, EventsError> {
        self.set_default_compatibility(COMPATIBILITY_LEVEL).await?;
        let mut latest = Vec::new();
        for entry in catalog.entries() {
            let registered = post_schema(&self.settings, entry.full_name.clone(), entry.supplied())
                .await
                .map_err(|e| EventsError::Registry(format!("registering {}: {e}", entry.file)))?;
            latest.retain(|(subject, _)| subject != &entry.full_name);
            latest.push((entry.full_name.clone(), registered.id));
        }
        Ok(latest)
    }

    /// Asks the registry whether the newest version of each event in `catalog` may be
    /// registered next to what is already there.
    pub async fn check(&self, catalog: &SchemaCatalog) -> Result<Vec<CompatibilityReport>, EventsError> {
        let subjects = get_all_subjects(&self.settings).await.map_err(|e| EventsError::Registry(e.to_string()))?;
        let mut reports = Vec::new();
        for entry in catalog.latest_entries() {
            let verdict = if !subjects.contains(&entry.full_name) {
                Verdict::NewSubject
            } else if is_compatible_schema(&self.settings, entry.full_name.clone(), entry.supplied())
                .await
                .map_err(|e| EventsError::Registry(format!("checking {}: {e}", entry.file)))?
            {
                Verdict::Compatible
            } else {
                Verdict::Incompatible
            };
            reports.push(CompatibilityReport { subject: entry.full_name.clone(), file: entry.file.clone(), verdict });
        }
        Ok(reports)
    }

    /// The (subject, version) pairs a schema id is registered under, for audit output.
    pub async fn versions_of(&self, schema_id: u32) -> Result<Vec<(String, i64)>, EventsError> {
        #[derive(serde::Deserialize)]
        struct SubjectVersion {
            subject: String,
            version: i64,
        }
        let url = format!("{}/schemas/ids/{schema_id}/versions", self.url);
        let response = self.http.get(&url).send().await.map_err(|e| EventsError::Registry(format!("{url}: {e}")))?;
        if !response.status().is_success() {
            return Err(EventsError::Registry(format!("{url}: {}", response.status())));
        }
        let versions: Vec<SubjectVersion> =
            response.json().await.map_err(|e| EventsError::Registry(format!("{url}: {e}")))?;
        Ok(versions.into_iter().map(|v| (v.subject, v.version)).collect())
    }

    /// Sets the registry-wide compatibility level. Apicurio answers 409 to a writer that
    /// loses a race to create the rule; the rule then exists and a retry updates it.
    async fn set_default_compatibility(&self, level: &str) -> Result<(), EventsError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let response = self
                .http
                .put(format!("{}/config", self.url))
                .header("content-type", "application/vnd.schemaregistry.v1+json")
                .json(&serde_json::json!({ "compatibility": level }))
                .send()
                .await
                .map_err(|e| EventsError::Registry(format!("setting compatibility: {e}")))?;
            let status = response.status();
            if status.is_success() {
                return Ok(());
            }
            if status == reqwest::StatusCode::CONFLICT && attempt < 5 {
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                continue;
            }
            let body = response.text().await.unwrap_or_default();
            return Err(EventsError::Registry(format!("setting compatibility: {status} {body}")));
        }
    }
}
