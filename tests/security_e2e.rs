//! A gateway of a deployment, on the real stack: users with JWTs from an identity provider
//! (this test is the provider: it makes a key, publishes it as a JWKS file and signs
//! tokens), and HTTPS/WSS served by the gateway with a certificate the test makes and then
//! renews under it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use support::{Stack, stack};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const ISSUER: &str = "https://idp.test";
const AUDIENCE: &str = "parley-test";

/// The identity provider's signing key.
struct Provider {
    key: EncodingKey,
}

impl Provider {
    /// A new ES256 key, published in `jwks`.
    fn new(jwks: &std::path::Path) -> Provider {
        let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some("test-1".into());
        std::fs::write(jwks, serde_json::to_vec(&JwkSet { keys: vec![jwk] }).unwrap()).unwrap();
        Provider { key }
    }

    fn token(&self, user: &str, valid_for: Duration) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let claims = json!({"sub": user, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + valid_for.as_secs()});
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("test-1".into());
        encode(&header, &claims, &self.key).unwrap()
    }
}

/// A `parley gateway` of the test's own, with `extra` options.
struct Gateway {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Gateway {
    fn start(stack: &Stack, extra: &[&str]) -> Gateway {
        let id = uuid::Uuid::new_v4().simple();
        let prefix = format!("test-{id}.");
        let common = support::global_args(
            &stack.brokers,
            &stack.registry,
            &prefix,
            &stack.cql,
            "parley_test",
            &format!("t_{id}"),
        );
        let topics = Command::new(env!("CARGO_BIN_EXE_parley")).args(&common).arg("topics").output().unwrap();
        assert!(topics.status.success(), "{}", String::from_utf8_lossy(&topics.stderr));
        let port = support::free_port();
        let mut args = common;
        args.extend(["gateway", "--listen", &format!("127.0.0.1:{port}")].map(str::to_owned));
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let child = support::spawn(&args, &prefix, "gateway.log");
        Gateway { child, port, log: std::env::temp_dir().join(format!("{prefix}gateway.log")) }
    }

    fn logged(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_users_are_verified_and_a_socket_closes_when_its_token_expires() {
    let Some(stack) = stack() else { return };
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    let provider = Provider::new(&jwks);
    let jwks = jwks.display().to_string();
    let gateway = Gateway::start(
        &stack,
        &["--jwt-jwks", &jwks, "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE, "--jwt-leeway", "0s"],
    );
    let http = format!("http://127.0.0.1:{}", gateway.port);
    support::wait_healthy(&http).await;
    assert!(gateway.logged().contains("authentication: JWT mode"), "{}", gateway.logged());

    let client = reqwest::Client::new();
    // No anonymous sessions in JWT mode.
    let session = client.post(format!("{http}/api/session")).send().await.unwrap();
    assert_eq!(session.status(), 404);
    assert_eq!(session.json::<Value>().await.unwrap()["error"], "anonymous_sessions_off");

    // A good token reads the API; a token of another issuer does not, and says why.
    let token = provider.token("alice@example.org", Duration::from_secs(3600));
    let listed = client.get(format!("{http}/api/conversations")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(listed.status(), 200);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let foreign = encode(
        &Header { kid: Some("test-1".into()), ..Header::new(Algorithm::ES256) },
        &json!({"sub": "alice@example.org", "iss": "https://elsewhere", "aud": AUDIENCE, "exp": now + 600}),
        &provider.key,
    )
    .unwrap();
    let refused = client.get(format!("{http}/api/conversations")).bearer_auth(&foreign).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    assert!(refused.text().await.unwrap().contains("another issuer"));

    // A socket whose token runs out is closed with 4001; a fresh token opens a new one.
    let short = provider.token("alice@example.org", Duration::from_secs(4));
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws?token={short}", gateway.port)).await.unwrap();
    let ready: Value = match socket.next().await.unwrap().unwrap() {
        Message::Text(text) => serde_json::from_str(&text).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(ready["type"], "ready");
    assert_eq!(ready["user_id"], "alice@example.org", "the user is the token's subject");
    let opened = Instant::now();
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(30), socket.next()).await.expect("closed within 30 s") {
            Some(Ok(Message::Close(frame))) => break frame.expect("a close frame with a code"),
            Some(Ok(_)) => continue,
            other => panic!("the socket ended without a close frame: {other:?}"),
        }
    };
    assert_eq!(close.code, CloseCode::from(4001), "{close:?}");
    assert_eq!(close.reason.as_str(), "token expired");
    eprintln!("closed {:?} after opening with a 4 s token", opened.elapsed());
    let expired = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws?token={short}", gateway.port)).await;
    assert!(expired.is_err(), "an expired token opens no socket");
    let fresh = provider.token("alice@example.org", Duration::from_secs(3600));
    let (mut again, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws?token={fresh}", gateway.port)).await.unwrap();
    assert!(matches!(again.next().await, Some(Ok(Message::Text(_)))), "ready again");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_serves_https_and_wss_and_takes_a_renewed_certificate() {
    let Some(stack) = stack() else { return };
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let first = write_certificate(&cert_path, &key_path, "first");
    let (cert, key) = (cert_path.display().to_string(), key_path.display().to_string());
    let gateway = Gateway::start(&stack, &["--tls-cert", &cert, "--tls-key", &key, "--tls-reload-check", "200ms"]);
    let https = format!("https://localhost:{}", gateway.port);
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_der(&first).unwrap())
        .resolve("localhost", ([127, 0, 0, 1], gateway.port).into())
        .build()
        .unwrap();
    let health = support::wait_until("the gateway over HTTPS", || {
        let client = client.clone();
        let url = format!("{https}/healthz");
        async move { client.get(url).send().await.ok() }
    })
    .await;
    assert_eq!(health.text().await.unwrap(), "ok");
    // Plain HTTP on the same port is no longer spoken.
    assert!(reqwest::get(format!("http://127.0.0.1:{}/healthz", gateway.port)).await.is_err());
    let session: Value = client.post(format!("{https}/api/session")).send().await.unwrap().json().await.unwrap();
    let token = session["token"].as_str().unwrap();

    // WSS: the WebSocket upgrade over the gateway's TLS.
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client_config(&[&first])));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", gateway.port)).await.unwrap();
    let stream = tls.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    let url = format!("wss://localhost:{}/ws?token={token}", gateway.port);
    let (mut socket, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    let ready: Value = match socket.next().await.unwrap().unwrap() {
        Message::Text(text) => serde_json::from_str(&text).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(ready["type"], "ready");

    // A renewed certificate is served to new connections without a restart.
    let renewed = write_certificate(&cert_path, &key_path, "renewed");
    let served = support::wait_until("the renewed certificate", || {
        let renewed = renewed.clone();
        let port = gateway.port;
        let (first, renewed_ref) = (first.clone(), renewed.clone());
        async move {
            let served = served_certificate(port, &[&first, &renewed_ref]).await?;
            (served == renewed).then_some(served)
        }
    })
    .await;
    assert_eq!(served, renewed);
    assert!(gateway.logged().contains("TLS certificate reloaded"), "{}", gateway.logged());
}

/// A self-signed certificate for localhost (`name` tells one from another), written as
/// PEM with its key; returns the certificate's DER.
fn write_certificate(cert: &std::path::Path, key: &std::path::Path, name: &str) -> Vec<u8> {
    let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, format!("parley test {name}"));
    let certificate = params.self_signed(&pair).unwrap();
    // The key first: a reload never pairs the new certificate with the old key for long.
    std::fs::write(key, pair.serialize_pem()).unwrap();
    std::fs::write(cert, certificate.pem()).unwrap();
    certificate.der().to_vec()
}

fn client_config(trusted: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for der in trusted {
        roots.add(CertificateDer::from(der.to_vec())).unwrap();
    }
    rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth()
}

/// The leaf certificate the gateway on `port` serves now.
async fn served_certificate(port: u16, trusted: &[&[u8]]) -> Option<Vec<u8>> {
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client_config(trusted)));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let stream = tls.connect(ServerName::try_from("localhost").unwrap(), tcp).await.ok()?;
    let (_, connection) = stream.get_ref();
    connection.peer_certificates()?.first().map(|c| c.to_vec())
}
