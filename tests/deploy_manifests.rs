//! The compose file, the k8s manifests and the Dockerfile are not what the tests run, so
//! this keeps them honest: they parse, every `parley` container runs a real subcommand,
//! every PARLEY_* setting is one the binary reads (from its own `--help`), and every
//! reference between manifests (config maps, secrets, scale targets, selectors) resolves.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_yaml_ng::Value;

const SERVICES: [&str; 5] = ["gateway", "inference", "projection", "embedder", "erasure"];
const IMAGE: &str = "parley:latest";

fn help(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_parley")).args(args).arg("--help").output().unwrap();
    assert!(output.status.success(), "parley {args:?} --help");
    String::from_utf8(output.stdout).unwrap()
}

/// Every `[env: NAME…]` the binary's help lists, over every subcommand a container runs.
fn known_env_vars() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for args in [&[][..], &["topics"], &["schemas", "register"], &["all"]]
        .into_iter()
        .chain(SERVICES.map(|s| vec![s]).iter().map(Vec::as_slice).collect::<Vec<_>>())
    {
        let text = help(args);
        for piece in text.split("[env: ").skip(1) {
            let end = piece.find(['=', ']']).unwrap();
            names.insert(piece[..end].to_owned());
        }
    }
    // Secrets are read from the environment but are no options (never arguments): the help
    // of their file options names them.
    for secret in ["PARLEY_AUTH_SECRET", "PARLEY_LLM_API_KEY", "PARLEY_MASTER_KEY"] {
        assert!(help(&["all"]).contains(&format!("variable {secret}")), "{secret} is documented");
        names.insert(secret.to_owned());
    }
    assert!(names.contains("PARLEY_KAFKA_BROKERS") && names.contains("PARLEY_AUTH_SECRET_FILE"), "{names:?}");
    names
}

fn is_subcommand(args: &[String]) -> bool {
    match args.first().map(String::as_str) {
        Some("schemas") => args.get(1).is_some_and(|a| a == "register"),
        Some(first) => SERVICES.contains(&first) || first == "topics",
        None => false,
    }
}

fn strings(value: &Value) -> Vec<String> {
    value.as_sequence().into_iter().flatten().map(|v| v.as_str().unwrap().to_owned()).collect()
}

fn keys(value: &Value) -> Vec<String> {
    value.as_mapping().into_iter().flatten().map(|(k, _)| k.as_str().unwrap().to_owned()).collect()
}

fn repo(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

#[test]
fn the_compose_file_runs_real_subcommands_with_real_settings() {
    let known = known_env_vars();
    let mut compose: Value = serde_yaml_ng::from_str(&repo("infra/compose.yaml")).unwrap();
    compose.apply_merge().unwrap();
    let services = compose["services"].as_mapping().unwrap();
    let mut ran = BTreeSet::new();
    for (name, service) in services {
        if service["image"].as_str() != Some(IMAGE) {
            continue;
        }
        let command = strings(&service["command"]);
        assert!(is_subcommand(&command), "{name:?} runs {command:?}");
        ran.insert(command[0].clone());
        let mut environment = service["environment"].clone();
        environment.apply_merge().unwrap();
        for variable in keys(&environment) {
            assert!(known.contains(&variable), "{name:?} sets {variable}, which parley does not read");
        }
        for dependency in keys(&service["depends_on"]) {
            assert!(services.contains_key(dependency.as_str()), "{name:?} depends on unknown {dependency}");
        }
    }
    for service in SERVICES.iter().chain(&["topics", "schemas"]) {
        assert!(ran.contains(*service), "no container runs `parley {service}`");
    }
}

#[test]
fn the_dockerfile_sets_only_real_settings() {
    let known = known_env_vars();
    let dockerfile = repo("Dockerfile");
    let env_block = dockerfile.split("\nENV ").nth(1).unwrap();
    for variable in env_block.split_whitespace().filter_map(|w| w.split_once('=')).map(|(k, _)| k) {
        assert!(known.contains(variable), "the Dockerfile sets {variable}, which parley does not read");
    }
    assert!(dockerfile.contains("--bin parley") && dockerfile.contains("ENTRYPOINT [\"parley\"]"));
}

#[test]
fn the_k8s_manifests_reference_what_exists() {
    let known = known_env_vars();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s");
    let mut documents = Vec::new();
    // Parley's own manifests; k8s/platform/ (what they run on) is checked against the
    // Kubernetes schemas by infra/validate_manifests.py.
    for path in std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_file()) {
        let text = std::fs::read_to_string(path).unwrap();
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            documents.push(Value::deserialize(document).unwrap());
        }
    }
    let named = |kind: &str| -> BTreeSet<String> {
        documents
            .iter()
            .filter(|d| d["kind"] == kind)
            .map(|d| d["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let (config_maps, secrets, deployments) = (named("ConfigMap"), named("Secret"), named("Deployment"));
    for service in SERVICES {
        assert!(deployments.contains(&format!("parley-{service}")), "no Deployment for {service}");
    }
    for document in &documents {
        let kind = document["kind"].as_str().unwrap();
        assert!(document["apiVersion"].is_string(), "{kind} without apiVersion");
        if kind != "Namespace" {
            assert_eq!(document["metadata"]["namespace"], "parley", "{kind} {:?}", document["metadata"]["name"]);
        }
        for settings in [&document["data"], &document["stringData"]] {
            for variable in keys(settings) {
                assert!(known.contains(&variable), "{kind} sets {variable}, which parley does not read");
            }
        }
        let pod = &document["spec"]["template"]["spec"];
        let containers = pod["containers"].as_sequence().into_iter().chain(pod["initContainers"].as_sequence());
        for container in containers.flatten().filter(|c| c["image"] == IMAGE) {
            assert!(is_subcommand(&strings(&container["args"])), "{kind} runs {:?}", container["args"]);
            for variable in container["env"].as_sequence().into_iter().flatten() {
                let name = variable["name"].as_str().unwrap();
                assert!(known.contains(name), "{kind} sets {name}, which parley does not read");
            }
            for source in container["envFrom"].as_sequence().into_iter().flatten() {
                if let Some(map) = source["configMapRef"]["name"].as_str() {
                    assert!(config_maps.contains(map), "unknown ConfigMap {map}");
                }
                if let Some(secret) = source["secretRef"]["name"].as_str() {
                    assert!(secrets.contains(secret), "unknown Secret {secret}");
                }
            }
        }
        let target = document["spec"]["scaleTargetRef"]["name"].as_str();
        if let Some(target) = target {
            assert!(deployments.contains(target), "{kind} scales unknown {target}");
        }
        if kind == "ScaledObject" {
            // KEDA reads the lag of the group the service really consumes in.
            let service = target.unwrap().trim_start_matches("parley-");
            // A replica beyond the partition count would hold no partition and do nothing.
            let max_replicas = document["spec"]["maxReplicaCount"].as_i64().unwrap();
            assert!(
                max_replicas <= i64::from(parley_eventlog::topics::CONVERSATION_PARTITIONS),
                "{service} scales to {max_replicas} replicas, past the partition count"
            );
            for trigger in document["spec"]["triggers"].as_sequence().unwrap() {
                let group = trigger["metadata"]["consumerGroup"].as_str().unwrap();
                assert!(help(&[service]).contains(&format!("[default: {group}]")), "{service} is not in group {group}");
            }
        }
        if kind == "Service" {
            let selector = &document["spec"]["selector"];
            assert!(
                documents
                    .iter()
                    .any(|d| d["kind"] == "Deployment" && &d["spec"]["template"]["metadata"]["labels"] == selector),
                "Service selector {selector:?} matches no Deployment"
            );
        }
    }
}
