//! The compiled-in schema catalog: one `.avsc` file per event and version.
//!
//! Events reference the shared `io.parley.events.Envelope` record by name. The schema that
//! is registered (and that readers resolve against) is self-contained: the envelope is
//! inlined, so registry subjects need no schema references.

use std::collections::BTreeMap;
use std::path::Path;

use apache_avro::Schema;
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};
use serde_json::Value as Json;

use crate::error::EventsError;

const NAMESPACE: &str = "io.parley.events";
const ENVELOPE: &str = "io.parley.events.Envelope";

/// The `.avsc` files shipped with this build, as (file name, contents).
const EMBEDDED: &[(&str, &str)] = &[
    ("envelope.v1.avsc", include_str!("../avro/envelope.v1.avsc")),
    ("conversation_started.v1.avsc", include_str!("../avro/conversation_started.v1.avsc")),
    ("user_query_received.v1.avsc", include_str!("../avro/user_query_received.v1.avsc")),
    ("user_query_received.v2.avsc", include_str!("../avro/user_query_received.v2.avsc")),
    ("user_query_received.v3.avsc", include_str!("../avro/user_query_received.v3.avsc")),
    ("llm_response_generated.v1.avsc", include_str!("../avro/llm_response_generated.v1.avsc")),
    ("llm_response_generated.v2.avsc", include_str!("../avro/llm_response_generated.v2.avsc")),
    ("llm_response_generated.v3.avsc", include_str!("../avro/llm_response_generated.v3.avsc")),
    ("llm_response_generated.v4.avsc", include_str!("../avro/llm_response_generated.v4.avsc")),
    ("llm_response_generated.v5.avsc", include_str!("../avro/llm_response_generated.v5.avsc")),
    ("llm_response_generated.v6.avsc", include_str!("../avro/llm_response_generated.v6.avsc")),
    ("llm_response_failed.v1.avsc", include_str!("../avro/llm_response_failed.v1.avsc")),
    ("llm_token_delta.v1.avsc", include_str!("../avro/llm_token_delta.v1.avsc")),
    ("llm_token_delta.v2.avsc", include_str!("../avro/llm_token_delta.v2.avsc")),
    ("llm_token_delta.v3.avsc", include_str!("../avro/llm_token_delta.v3.avsc")),
    ("turn_cancel_requested.v1.avsc", include_str!("../avro/turn_cancel_requested.v1.avsc")),
    ("dead_letter.v1.avsc", include_str!("../avro/dead_letter.v1.avsc")),
    ("dead_letter.v2.avsc", include_str!("../avro/dead_letter.v2.avsc")),
    ("dead_letter_resolved.v1.avsc", include_str!("../avro/dead_letter_resolved.v1.avsc")),
    ("document_submitted.v1.avsc", include_str!("../avro/document_submitted.v1.avsc")),
    ("document_submitted.v2.avsc", include_str!("../avro/document_submitted.v2.avsc")),
    ("document_deleted.v1.avsc", include_str!("../avro/document_deleted.v1.avsc")),
    ("embeddings_indexed.v1.avsc", include_str!("../avro/embeddings_indexed.v1.avsc")),
    ("erasure_requested.v1.avsc", include_str!("../avro/erasure_requested.v1.avsc")),
    ("erasure_completed.v1.avsc", include_str!("../avro/erasure_completed.v1.avsc")),
    ("experiment_run.v1.avsc", include_str!("../avro/experiment_run.v1.avsc")),
    ("experiment_run.v2.avsc", include_str!("../avro/experiment_run.v2.avsc")),
    ("experiment_requested.v1.avsc", include_str!("../avro/experiment_requested.v1.avsc")),
    ("account_changed.v1.avsc", include_str!("../avro/account_changed.v1.avsc")),
];

/// One event schema at one version, with the envelope inlined.
#[derive(Debug, Clone)]
pub struct SchemaEntry {
    /// Full record name, e.g. `io.parley.events.UserQueryReceived`; also the registry subject.
    pub full_name: String,
    /// The version in the file name (`<event>.v<N>.avsc`).
    pub version: u32,
    /// The file it was read from.
    pub file: String,
    /// Self-contained schema JSON, as registered.
    pub json: String,
    /// The parsed schema.
    pub schema: Schema,
}

impl SchemaEntry {
    /// This schema as the registry client takes it.
    pub fn supplied(&self) -> SuppliedSchema {
        SuppliedSchema::new(Some(self.full_name.clone()), SchemaType::Avro, self.json.clone())
    }
}

/// Every event schema, by full name, each with all its versions (oldest first).
#[derive(Debug, Clone)]
pub struct SchemaCatalog {
    by_name: BTreeMap<String, Vec<SchemaEntry>>,
}

impl SchemaCatalog {
    /// The schemas compiled into this binary: what its producers write and readers expect.
    pub fn embedded() -> Self {
        let files = EMBEDDED.iter().map(|(f, c)| ((*f).to_owned(), (*c).to_owned()));
        #[allow(clippy::expect_used)] // the embedded files are checked by this crate's tests
        Self::from_files(files).expect("embedded schemas are valid")
    }

    /// Loads every `*.avsc` file of a directory (used by `parley schemas check`).
    pub fn from_dir(dir: &Path) -> Result<Self, EventsError> {
        let io_err = |reason: std::io::Error| EventsError::SchemaFile {
            file: dir.display().to_string(),
            reason: reason.to_string(),
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err)? {
            let path = entry.map_err(io_err)?.path();
            if path.extension().is_some_and(|e| e == "avsc") {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                files.push((name, std::fs::read_to_string(&path).map_err(io_err)?));
            }
        }
        Self::from_files(files)
    }

    /// Builds a catalog from (file name, JSON) pairs named `<snake_name>.v<N>.avsc`.
    pub fn from_files(files: impl IntoIterator<Item = (String, String)>) -> Result<Self, EventsError> {
        let mut parsed = Vec::new();
        let mut envelopes = BTreeMap::new();
        for (file, text) in files {
            let bad = |reason: String| EventsError::SchemaFile { file: file.clone(), reason };
            let version = file_version(&file).ok_or_else(|| bad("name must end in .v<N>.avsc".into()))?;
            let json: Json = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
            let name = json.get("name").and_then(Json::as_str).ok_or_else(|| bad("no record name".into()))?;
            let namespace = json.get("namespace").and_then(Json::as_str).unwrap_or(NAMESPACE);
            let full_name = format!("{namespace}.{name}");
            if full_name == ENVELOPE {
                envelopes.insert(version, json);
            } else {
                parsed.push((file, version, full_name, json));
            }
        }
        let envelope = envelopes
            .into_values()
            .next_back()
            .ok_or_else(|| EventsError::SchemaFile { file: "envelope.v<N>.avsc".into(), reason: "missing".into() })?;

        let mut by_name: BTreeMap<String, Vec<SchemaEntry>> = BTreeMap::new();
        for (file, version, full_name, mut json) in parsed {
            inline_named_type(&mut json, ENVELOPE, &envelope);
            let text = json.to_string();
            let schema = Schema::parse_str(&text)
                .map_err(|e| EventsError::SchemaFile { file: file.clone(), reason: e.to_string() })?;
            by_name.entry(full_name.clone()).or_default().push(SchemaEntry {
                full_name,
                version,
                file,
                json: text,
                schema,
            });
        }
        for versions in by_name.values_mut() {
            versions.sort_by_key(|e| e.version);
        }
        Ok(Self { by_name })
    }

    /// The newest version of an event's schema: what this build writes and reads into.
    pub fn latest(&self, full_name: &str) -> Result<&SchemaEntry, EventsError> {
        self.by_name
            .get(full_name)
            .and_then(|v| v.last())
            .ok_or_else(|| EventsError::UnknownEventType(full_name.to_owned()))
    }

    /// The newest version of every event.
    pub fn latest_entries(&self) -> impl Iterator<Item = &SchemaEntry> {
        self.by_name.values().filter_map(|versions| versions.last())
    }

    /// Every version of every event, oldest version first within each event.
    pub fn entries(&self) -> impl Iterator<Item = &SchemaEntry> {
        self.by_name.values().flatten()
    }
}

fn file_version(file: &str) -> Option<u32> {
    let stem = file.strip_suffix(".avsc")?;
    let (_, version) = stem.rsplit_once(".v")?;
    version.parse().ok()
}

/// Replaces every `"type": "<name>"` reference in `json` by the definition `with`.
fn inline_named_type(json: &mut Json, name: &str, with: &Json) {
    match json {
        Json::Object(map) => {
            if map.get("type").and_then(Json::as_str) == Some(name) && map.contains_key("name") {
                map.insert("type".into(), with.clone());
            }
            for value in map.values_mut() {
                inline_named_type(value, name, with);
            }
        }
        Json::Array(items) => items.iter_mut().for_each(|v| inline_named_type(v, name, with)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_catalog_inlines_the_envelope_in_every_event() {
        let catalog = SchemaCatalog::embedded();
        let entry = catalog.latest("io.parley.events.UserQueryReceived").unwrap();
        assert_eq!(entry.version, 3);
        assert!(entry.json.contains("\"correlation_id\""), "{}", entry.json);
        assert!(catalog.latest(ENVELOPE).is_err(), "the envelope is not an event of its own");
    }

    #[test]
    fn versions_are_ordered_and_latest_wins() {
        let v1 = r#"{"type":"record","name":"E","namespace":"io.parley.events","fields":[{"name":"a","type":"int"}]}"#;
        let v2 = r#"{"type":"record","name":"E","namespace":"io.parley.events","fields":[{"name":"a","type":"int"},{"name":"b","type":"int","default":0}]}"#;
        let env = EMBEDDED[0];
        let catalog = SchemaCatalog::from_files([
            ("e.v2.avsc".to_owned(), v2.to_owned()),
            ("e.v1.avsc".to_owned(), v1.to_owned()),
            (env.0.to_owned(), env.1.to_owned()),
        ])
        .unwrap();
        assert_eq!(catalog.latest("io.parley.events.E").unwrap().version, 2);
        assert_eq!(catalog.entries().count(), 2);
    }

    #[test]
    fn a_badly_named_or_invalid_file_is_a_clear_error() {
        let err = SchemaCatalog::from_files([("e.avsc".to_owned(), "{}".to_owned())]).unwrap_err();
        assert!(err.to_string().contains(".v<N>.avsc"), "{err}");
        let env = EMBEDDED[0];
        let err = SchemaCatalog::from_files([
            (env.0.to_owned(), env.1.to_owned()),
            (
                "e.v1.avsc".to_owned(),
                r#"{"type":"record","name":"E","fields":[{"name":"a","type":"nope"}]}"#.to_owned(),
            ),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("e.v1.avsc"), "{err}");
    }
}
