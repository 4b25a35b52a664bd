//! The `parley` command line: config errors name the option and the value, and
//! `parley schemas check` against the real registry accepts the repo and refuses an
//! incompatible edit (a new field without a default) with a non-zero exit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

fn check(registry: &str, dir: Option<&std::path::Path>) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_parley"));
    command.args(["--schema-registry-url", registry, "schemas", "check"]);
    if let Some(dir) = dir {
        command.arg("--dir").arg(dir);
    }
    command.output().unwrap()
}

#[test]
fn schemas_check_accepts_the_repo_and_refuses_an_incompatible_edit() {
    let Some(stack) = support::stack() else {
        return;
    };
    let registered = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["--schema-registry-url", &stack.registry, "schemas", "register"])
        .output()
        .unwrap();
    assert!(registered.status.success(), "{}", String::from_utf8_lossy(&registered.stderr));

    let repo_schemas = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/avro");
    let ok = check(&stack.registry, Some(&repo_schemas));
    assert!(ok.status.success(), "{}{}", String::from_utf8_lossy(&ok.stdout), String::from_utf8_lossy(&ok.stderr));
    assert!(check(&stack.registry, None).status.success(), "the compiled-in schemas too");

    let dir = std::env::temp_dir().join(format!("parley-schemas-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&repo_schemas).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let mut schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo_schemas.join("user_query_received.v3.avsc")).unwrap())
            .unwrap();
    schema["fields"].as_array_mut().unwrap().push(serde_json::json!({"name": "locale", "type": "string"}));
    std::fs::write(dir.join("user_query_received.v4.avsc"), schema.to_string()).unwrap();

    let refused = check(&stack.registry, Some(&dir));
    let stdout = String::from_utf8_lossy(&refused.stdout);
    assert_eq!(refused.status.code(), Some(1), "{stdout}");
    assert!(stdout.lines().any(|l| l.contains("UserQueryReceived") && l.contains("INCOMPATIBLE")), "{stdout}");

    // With a default the same change is compatible.
    schema["fields"].as_array_mut().unwrap().last_mut().unwrap()["default"] = serde_json::json!("en");
    std::fs::write(dir.join("user_query_received.v4.avsc"), schema.to_string()).unwrap();
    assert!(check(&stack.registry, Some(&dir)).status.success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_subcommand_parses_its_options() {
    // clap checks argument ids only when parsing: a clash between a global option and a
    // subcommand's option panics at run time, so parse each subcommand's help.
    for args in [
        &["gateway", "--help"][..],
        &["inference", "--help"],
        &["projection", "--help"],
        &["all", "--help"],
        &["topics", "--help"],
        &["schemas", "check", "--help"],
        &["replay", "--help"],
        &["audit", "--help"],
        &["projections", "rebuild", "--help"],
        // Every connection setting is global: it may follow the subcommand too.
        &["gateway", "--kafka-brokers", "127.0.0.1:1", "--topic-prefix", "p.", "--milvus-url", "http://h:1", "--help"],
        &["usage", "u", "--embedding-model-dir", "/m", "--cql-nodes", "127.0.0.1:1", "--help"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_parley")).args(args).output().unwrap();
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
    let output = Command::new(env!("CARGO_BIN_EXE_parley")).args(["topics", "--replication", "0"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--replication"), "{stderr}");
}

#[test]
fn a_bad_config_value_names_the_option_and_the_value() {
    let cases: [(&[&str], &str, &str); 4] = [
        (&["inference", "--llm-timeout", "fast"], "--llm-timeout", "fast"),
        (&["inference", "--concurrency", "0"], "--concurrency", "0"),
        (&["gateway", "--listen", "nowhere:port"], "--listen", "nowhere:port"),
        (&["--topic-prefix", "bad/prefix", "topics"], "--topic-prefix", "bad/prefix"),
    ];
    for (args, option, value) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_parley")).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(option) && stderr.contains(value), "{args:?}: {stderr}");
    }
    let from_env = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["gateway"])
        .env("PARLEY_MAX_FRAME_BYTES", "huge")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&from_env.stderr);
    assert!(stderr.contains("--max-frame-bytes") && stderr.contains("huge"), "{stderr}");
}

#[test]
fn the_gateway_checks_its_identity_settings_before_connecting_to_anything() {
    // Nothing listens on these: a gateway that connected first would report the store or
    // the model, hiding the bad JWT setting.
    let output = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["--cql-nodes", "127.0.0.1:9", "--kafka-brokers", "127.0.0.1:9", "--embedding-model-dir", "/nonexistent"])
        .args(["gateway", "--jwt-jwks", "http://example.org/jwks.json", "--jwt-issuer", "i", "--jwt-audience", "a"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--jwt-jwks") && stderr.contains("plain HTTP"), "the JWT setting first: {stderr}");
    assert!(!stderr.contains("CQL") && !stderr.contains("embedding"), "{stderr}");
}

#[test]
fn a_gateway_without_the_embedding_model_says_how_to_start_it() {
    let Some(stack) = support::stack() else { return };
    let output = Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["--cql-nodes", &stack.cql, "--kafka-brokers", &stack.brokers])
        .args(["gateway", "--listen", "127.0.0.1:0"])
        .env_remove("PARLEY_EMBEDDING_MODEL_DIR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--embedding-model-dir") && stderr.contains("--without-retrieval"), "{stderr}");
    assert!(!stderr.contains("\u{1b}["), "no colour codes into a pipe: {stderr}");
}
