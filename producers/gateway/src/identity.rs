//! Who a bearer token belongs to. Two modes, one per deployment:
//! - **JWT** (a deployment): tokens from the organisation's identity provider, verified
//!   against its JWKS (a file, or a URL fetched with a timeout and refreshed), on an
//!   allow-list of asymmetric algorithms, with issuer, audience, expiry and not-before;
//!   the user is a configurable claim.
//! - **Anonymous** (the quick start's default): `POST /api/session` hands out a new user
//!   and an HMAC token that never expires ([`crate::auth`]).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use clap::Args;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use parley_eventlog::settings::parse_duration;
use parley_events::UserId;
use thiserror::Error;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::auth::TokenSigner;

/// The algorithms a JWT may be signed with: asymmetric only, so a public key can never be
/// taken for an HMAC secret, and never `none`.
pub const ALLOWED_ALGORITHMS: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

/// A JWKS refetched for a token whose key id is unknown at most this often (an identity
/// provider rotating keys is followed at once; a stream of forged key ids is not a stream
/// of fetches).
const UNKNOWN_KEY_REFETCH: Duration = Duration::from_secs(30);

/// How to verify JWTs. Without `--jwt-jwks`, the gateway runs in anonymous mode.
#[derive(Debug, Clone, Args)]
pub struct JwtSettings {
    /// The identity provider's JSON Web Key Set: a file path or an http(s) URL. Setting it
    /// turns JWT mode on (and anonymous sessions off).
    #[arg(long = "jwt-jwks", env = "PARLEY_JWT_JWKS")]
    pub jwks: Option<String>,

    /// The `iss` every token must carry (required with --jwt-jwks).
    #[arg(long = "jwt-issuer", env = "PARLEY_JWT_ISSUER")]
    pub issuer: Option<String>,

    /// The `aud` every token must carry (required with --jwt-jwks).
    #[arg(long = "jwt-audience", env = "PARLEY_JWT_AUDIENCE")]
    pub audience: Option<String>,

    /// The claim that names the user (a string).
    #[arg(long = "jwt-user-claim", env = "PARLEY_JWT_USER_CLAIM", default_value = "sub")]
    pub user_claim: String,

    /// Algorithms accepted, comma separated, among RS256, ES256 and EdDSA.
    #[arg(long = "jwt-algorithms", env = "PARLEY_JWT_ALGORITHMS", default_value = "RS256,ES256,EdDSA",
          value_parser = parse_algorithms)]
    pub algorithms: AlgorithmList,

    /// Clock skew allowed on `exp` and `nbf`.
    #[arg(long = "jwt-leeway", env = "PARLEY_JWT_LEEWAY", default_value = "30s", value_parser = parse_duration)]
    pub leeway: Duration,

    /// How often the JWKS is fetched (or read) again, for rotated keys.
    #[arg(long = "jwks-refresh", env = "PARLEY_JWKS_REFRESH", default_value = "5m", value_parser = parse_duration)]
    pub refresh: Duration,

    /// Longest wait for the JWKS URL to answer.
    #[arg(long = "jwks-timeout", env = "PARLEY_JWKS_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// The accepted algorithms (a subset of [`ALLOWED_ALGORITHMS`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlgorithmList(pub Vec<Algorithm>);

fn parse_algorithms(value: &str) -> Result<AlgorithmList, String> {
    let mut algorithms = Vec::new();
    for name in value.split(',').map(str::trim).filter(|name| !name.is_empty()) {
        let algorithm: Algorithm = name.parse().map_err(|_| format!("unknown algorithm {name:?}"))?;
        if !ALLOWED_ALGORITHMS.contains(&algorithm) {
            return Err(format!("{name} is not allowed: only RS256, ES256 and EdDSA (asymmetric) are"));
        }
        algorithms.push(algorithm);
    }
    if algorithms.is_empty() {
        return Err("at least one algorithm".into());
    }
    Ok(AlgorithmList(algorithms))
}

/// A token the gateway accepts, and whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The user the token names.
    pub user_id: UserId,
    /// When the token stops being accepted (seconds since the epoch: the second after
    /// `exp` plus the leeway): a socket opened with it is closed then. None: it does not expire
    /// (anonymous tokens).
    pub expires_at: Option<u64>,
}

/// Why a token was refused (said to the client: nothing here is secret).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AuthError {
    /// Not a JWT.
    #[error("the token is not a well-formed JWT")]
    Malformed,
    /// An algorithm not allowed (the allowed ones).
    #[error("the token's algorithm is not accepted (only {0})")]
    Algorithm(String),
    /// Signed with a key the key set lacks.
    #[error("the token's key is not in the identity provider's key set")]
    UnknownKey,
    /// No `kid` where the key set has several keys.
    #[error("the token names no key (`kid`), and the identity provider's key set has several")]
    NoKeyId,
    /// The signature does not verify.
    #[error("the token's signature does not verify")]
    Signature,
    /// Past `exp` (and the leeway).
    #[error("the token has expired")]
    Expired,
    /// Before `nbf`.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// Another `iss`.
    #[error("the token was issued by another issuer")]
    Issuer,
    /// Another `aud`.
    #[error("the token is meant for another audience")]
    Audience,
    /// The user claim is missing or not a valid user id (the claim).
    #[error("the token lacks a valid {0:?} claim")]
    Claim(String),
    /// An anonymous token that does not verify.
    #[error("the anonymous token does not verify")]
    Anonymous,
}

/// Why JWT mode could not start.
#[derive(Debug, Error)]
pub enum IdentityError {
    /// A setting JWT mode needs is not given (its name).
    #[error("--jwt-{0} is required with --jwt-jwks")]
    Missing(&'static str),
    /// The key set could not be read or parsed.
    #[error("the JWKS at {source_name} could not be loaded: {reason}")]
    Jwks {
        /// The file or URL.
        source_name: String,
        /// What failed.
        reason: String,
    },
    /// The key set's URL is plain HTTP to another machine.
    #[error(
        "--jwt-jwks {0}: a key set fetched over plain HTTP can be replaced on the way; use https (http is for loopback only)"
    )]
    InsecureJwks(String),
}

/// How this gateway knows who is calling.
#[derive(Debug, Clone)]
pub enum Identity {
    /// Tokens this gateway issues itself (`/api/session`).
    Anonymous(TokenSigner),
    /// Tokens of an identity provider.
    Jwt(Arc<JwtVerifier>),
}

impl Identity {
    /// JWT mode when `settings` name a JWKS (loaded now, refreshed until `shutdown`),
    /// anonymous mode with `secret` otherwise. Says at start-up which mode it is.
    pub async fn from_settings(
        settings: &JwtSettings,
        secret: &str,
        shutdown: &CancellationToken,
    ) -> Result<Self, IdentityError> {
        let Some(jwks) = &settings.jwks else {
            info!(
                "authentication: ANONYMOUS quick-start mode (POST /api/session gives anyone a new user and a \
                   non-expiring token); set --jwt-jwks, --jwt-issuer and --jwt-audience for a deployment"
            );
            return Ok(Self::Anonymous(TokenSigner::new(secret.as_bytes())));
        };
        let verifier = Arc::new(JwtVerifier::new(settings, KeySource::parse(jwks)).await?);
        info!(jwks = %jwks, issuer = ?settings.issuer, audience = ?settings.audience, claim = %settings.user_claim,
              "authentication: JWT mode (tokens from the identity provider; anonymous sessions are off)");
        tokio::spawn(refresh_keys(verifier.clone(), settings.refresh, shutdown.clone()));
        Ok(Self::Jwt(verifier))
    }

    /// Whose token this is, if the gateway accepts it.
    pub async fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        match self {
            Self::Anonymous(signer) => {
                signer.verify(token).map(|user_id| Verified { user_id, expires_at: None }).ok_or(AuthError::Anonymous)
            }
            Self::Jwt(verifier) => verifier.verify(token).await,
        }
    }

    /// The signer of anonymous sessions (None in JWT mode: users come from the provider).
    pub fn sessions(&self) -> Option<&TokenSigner> {
        match self {
            Self::Anonymous(signer) => Some(signer),
            Self::Jwt(_) => None,
        }
    }
}

/// Where the JWKS comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A file (reread when it changes).
    File(PathBuf),
    /// A URL (fetched again every refresh).
    Url(String),
}

impl KeySource {
    fn parse(value: &str) -> Self {
        if value.starts_with("https://") || value.starts_with("http://") {
            Self::Url(value.to_owned())
        } else {
            Self::File(PathBuf::from(value))
        }
    }

    fn name(&self) -> String {
        match self {
            Self::File(path) => path.display().to_string(),
            Self::Url(url) => url.clone(),
        }
    }

    async fn load(&self, client: &reqwest::Client) -> Result<JwkSet, String> {
        let body = match self {
            Self::File(path) => tokio::fs::read(path).await.map_err(|e| e.to_string())?,
            Self::Url(url) => {
                let response = client.get(url).send().await.map_err(|e| e.to_string())?;
                let response = response.error_for_status().map_err(|e| e.to_string())?;
                response.bytes().await.map_err(|e| e.to_string())?.to_vec()
            }
        };
        serde_json::from_slice(&body).map_err(|e| format!("not a JWK set: {e}"))
    }
}

/// Verifies JWTs against the identity provider's current keys.
#[derive(Debug)]
pub struct JwtVerifier {
    source: KeySource,
    client: reqwest::Client,
    keys: RwLock<Arc<JwkSet>>,
    /// When the keys were last loaded (one reload at a time).
    loaded_at: Mutex<Instant>,
    issuer: String,
    audience: String,
    user_claim: String,
    algorithms: Vec<Algorithm>,
    leeway: Duration,
}

impl JwtVerifier {
    async fn new(settings: &JwtSettings, source: KeySource) -> Result<Self, IdentityError> {
        if let KeySource::Url(url) = &source
            && !is_https_or_loopback(url)
        {
            return Err(IdentityError::InsecureJwks(url.clone()));
        }
        let issuer = settings.issuer.clone().ok_or(IdentityError::Missing("issuer"))?;
        let audience = settings.audience.clone().ok_or(IdentityError::Missing("audience"))?;
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .build()
            .map_err(|e| IdentityError::Jwks { source_name: source.name(), reason: e.to_string() })?;
        let keys =
            source.load(&client).await.map_err(|reason| IdentityError::Jwks { source_name: source.name(), reason })?;
        info!(keys = keys.keys.len(), "JWKS loaded");
        Ok(Self {
            source,
            client,
            keys: RwLock::new(Arc::new(keys)),
            loaded_at: Mutex::new(Instant::now()),
            issuer,
            audience,
            user_claim: settings.user_claim.clone(),
            algorithms: settings.algorithms.0.clone(),
            leeway: settings.leeway,
        })
    }

    /// Loads the keys again (a failure keeps the ones in use).
    async fn reload(&self) {
        let mut loaded_at = self.loaded_at.lock().await;
        match self.source.load(&self.client).await {
            Ok(keys) => *self.keys.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys),
            Err(reason) => warn!(source = %self.source.name(), %reason, "JWKS reload failed; keeping the keys in use"),
        }
        *loaded_at = Instant::now();
    }

    fn current_keys(&self) -> Arc<JwkSet> {
        self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Whose token this is, if it verifies.
    pub async fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        // `alg: none`, an unknown algorithm and a token that is not three parts end here.
        let header = decode_header(token).map_err(|_| AuthError::Malformed)?;
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthError::Algorithm(names(&self.algorithms)));
        }
        let kid = header.kid.as_deref();
        let mut keys = self.current_keys();
        if key_for(&keys, kid).is_none() {
            // Perhaps the provider rotated its keys: a reload under way is waited for (its
            // keys may have this one), else one is made if the last is old enough.
            let loaded_at = *self.loaded_at.lock().await;
            keys = self.current_keys();
            if key_for(&keys, kid).is_none() && loaded_at.elapsed() >= UNKNOWN_KEY_REFETCH {
                self.reload().await;
                keys = self.current_keys();
            }
        }
        let jwk = key_for(&keys, kid).ok_or(if kid.is_none() && keys.keys.len() > 1 {
            AuthError::NoKeyId
        } else {
            AuthError::UnknownKey
        })?;
        // A key published for one algorithm is not used with another.
        if let Some(published) = &jwk.common.key_algorithm
            && format!("{published:?}") != format!("{:?}", header.alg)
        {
            return Err(AuthError::Algorithm(names(&self.algorithms)));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|_| AuthError::UnknownKey)?;
        if key.family() != header.alg.family() {
            return Err(AuthError::Algorithm(names(&self.algorithms)));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway.as_secs();
        let claims = decode::<serde_json::Value>(token, &key, &validation).map_err(refusal)?.claims;
        let user_id: UserId = claims
            .get(&self.user_claim)
            .and_then(serde_json::Value::as_str)
            .and_then(|user| user.parse().ok())
            .ok_or_else(|| AuthError::Claim(self.user_claim.clone()))?;
        // The verifier accepts a token until the second after exp plus the leeway.
        let expires_at =
            claims.get("exp").and_then(serde_json::Value::as_u64).map(|exp| exp + self.leeway.as_secs() + 1);
        Ok(Verified { user_id, expires_at })
    }
}

/// Whether keys may be fetched from `url`: over TLS, or from this machine.
fn is_https_or_loopback(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else { return url.starts_with("https://") };
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.find(']') {
        Some(end) if authority.starts_with('[') => &authority[..=end],
        _ => authority.rsplit_once(':').map_or(authority, |(host, _)| host),
    };
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
}

/// The key a token names, or the only key of a set when it names none.
fn key_for<'a>(keys: &'a JwkSet, kid: Option<&str>) -> Option<&'a Jwk> {
    match kid {
        Some(kid) => keys.find(kid),
        None if keys.keys.len() == 1 => keys.keys.first(),
        None => None,
    }
}

fn refusal(error: jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::Issuer,
        ErrorKind::InvalidAudience => AuthError::Audience,
        ErrorKind::InvalidSignature => AuthError::Signature,
        ErrorKind::MissingRequiredClaim(claim) | ErrorKind::InvalidClaimFormat(claim) => {
            AuthError::Claim(claim.clone())
        }
        _ => AuthError::Malformed,
    }
}

fn names(algorithms: &[Algorithm]) -> String {
    algorithms.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ")
}

/// Loads the keys again every `every` until `shutdown`.
async fn refresh_keys(verifier: Arc<JwtVerifier>, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => verifier.reload().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use jsonwebtoken::{EncodingKey, Header, encode};
    use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519, PKCS_RSA_SHA256};
    use serde_json::{Value, json};

    use super::*;

    const ISSUER: &str = "https://idp.example";
    const AUDIENCE: &str = "parley";

    /// A signing key of the identity provider, and its public JWK.
    struct ProviderKey {
        algorithm: Algorithm,
        encoding: EncodingKey,
        jwk: Jwk,
    }

    fn provider_key(algorithm: Algorithm, kid: &str) -> ProviderKey {
        type FromPem = fn(&[u8]) -> jsonwebtoken::errors::Result<EncodingKey>;
        let (pair, pem_key): (KeyPair, FromPem) = match algorithm {
            Algorithm::RS256 => (KeyPair::generate_for(&PKCS_RSA_SHA256).unwrap(), EncodingKey::from_rsa_pem),
            Algorithm::ES256 => (KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(), EncodingKey::from_ec_pem),
            Algorithm::EdDSA => (KeyPair::generate_for(&PKCS_ED25519).unwrap(), EncodingKey::from_ed_pem),
            other => panic!("no test key for {other:?}"),
        };
        let encoding = pem_key(pair.serialize_pem().as_bytes()).unwrap();
        let mut jwk = match algorithm {
            // The library derives RSA and EC public keys, not Ed25519 ones: its raw bytes are x.
            Algorithm::EdDSA => serde_json::from_value(
                json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "x": base64_url(pair.public_key_raw())}),
            )
            .unwrap(),
            _ => Jwk::from_encoding_key(&encoding, algorithm).unwrap(),
        };
        jwk.common.key_id = Some(kid.to_owned());
        ProviderKey { algorithm, encoding, jwk }
    }

    fn now() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    fn claims() -> Value {
        json!({"sub": "alice@example.org", "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600, "nbf": now() - 5})
    }

    fn sign(key: &ProviderKey, claims: &Value) -> String {
        let mut header = Header::new(key.algorithm);
        header.kid = key.jwk.common.key_id.clone();
        encode(&header, claims, &key.encoding).unwrap()
    }

    async fn verifier(keys: &[&ProviderKey]) -> (JwtVerifier, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let set = JwkSet { keys: keys.iter().map(|k| k.jwk.clone()).collect() };
        std::fs::write(&path, serde_json::to_vec(&set).unwrap()).unwrap();
        let settings = JwtSettings {
            jwks: Some(path.display().to_string()),
            issuer: Some(ISSUER.into()),
            audience: Some(AUDIENCE.into()),
            user_claim: "sub".into(),
            algorithms: parse_algorithms("RS256,ES256,EdDSA").unwrap(),
            leeway: Duration::from_secs(30),
            refresh: Duration::from_secs(300),
            timeout: Duration::from_secs(5),
        };
        (JwtVerifier::new(&settings, KeySource::File(path)).await.unwrap(), dir)
    }

    fn with(claims: Value, change: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
        let mut claims = claims.as_object().unwrap().clone();
        change(&mut claims);
        Value::Object(claims)
    }

    #[tokio::test]
    async fn good_tokens_of_each_allowed_algorithm_name_their_user_and_expiry() {
        let keys = [
            provider_key(Algorithm::RS256, "rsa"),
            provider_key(Algorithm::ES256, "ec"),
            provider_key(Algorithm::EdDSA, "ed"),
        ];
        let (verifier, _dir) = verifier(&keys.iter().collect::<Vec<_>>()).await;
        for key in &keys {
            let claims = claims();
            let verified = verifier.verify(&sign(key, &claims)).await;
            let expires_at = claims["exp"].as_u64().map(|exp| exp + 30 + 1);
            let expected = Verified { user_id: "alice@example.org".parse().unwrap(), expires_at };
            assert_eq!(verified, Ok(expected), "{:?}", key.algorithm);
        }
    }

    #[tokio::test]
    async fn a_token_without_kid_needs_a_set_of_one_key_and_aud_may_be_an_array() {
        let (one, other) = (provider_key(Algorithm::ES256, "one"), provider_key(Algorithm::ES256, "other"));
        let without_kid =
            |key: &ProviderKey, claims: &Value| encode(&Header::new(Algorithm::ES256), claims, &key.encoding).unwrap();
        let (single, _dir) = verifier(&[&one]).await;
        assert!(single.verify(&without_kid(&one, &claims())).await.is_ok(), "a set of one key needs no kid");
        let (several, _dir2) = verifier(&[&one, &other]).await;
        assert_eq!(several.verify(&without_kid(&one, &claims())).await, Err(AuthError::NoKeyId));
        let audience = claims()["aud"].clone();
        let listed = with(claims(), |c| drop(c.insert("aud".into(), json!(["another-api", audience]))));
        assert!(single.verify(&without_kid(&one, &listed)).await.is_ok(), "an aud array containing the audience");
        let elsewhere = with(claims(), |c| drop(c.insert("aud".into(), json!(["another-api"]))));
        assert_eq!(single.verify(&without_kid(&one, &elsewhere)).await, Err(AuthError::Audience));
    }

    #[tokio::test]
    async fn each_kind_of_bad_token_is_refused_for_its_reason() {
        let key = provider_key(Algorithm::ES256, "ec");
        let stranger = provider_key(Algorithm::ES256, "ec"); // same key id, another key
        let (verifier, _dir) = verifier(&[&key]).await;
        let refused = |claims: Value| {
            let token = sign(&key, &claims);
            let verifier = &verifier;
            async move { verifier.verify(&token).await.unwrap_err() }
        };
        assert_eq!(
            refused(with(claims(), |c| drop(c.insert("exp".into(), json!(now() - 120))))).await,
            AuthError::Expired
        );
        assert_eq!(
            refused(with(claims(), |c| drop(c.insert("nbf".into(), json!(now() + 600))))).await,
            AuthError::NotYetValid
        );
        assert_eq!(
            refused(with(claims(), |c| drop(c.insert("iss".into(), json!("https://evil"))))).await,
            AuthError::Issuer
        );
        assert_eq!(
            refused(with(claims(), |c| drop(c.insert("aud".into(), json!("other"))))).await,
            AuthError::Audience
        );
        assert_eq!(refused(with(claims(), |c| drop(c.remove("exp")))).await, AuthError::Claim("exp".into()));
        assert_eq!(
            refused(with(claims(), |c| drop(c.insert("sub".into(), json!(42))))).await,
            AuthError::Claim("sub".into())
        );
        // Within the leeway, a token just expired still passes.
        let just_expired = sign(&key, &with(claims(), |c| drop(c.insert("exp".into(), json!(now() - 5)))));
        assert!(verifier.verify(&just_expired).await.is_ok());

        // Signed by a key the provider does not publish.
        assert_eq!(verifier.verify(&sign(&stranger, &claims())).await, Err(AuthError::Signature));
        // A payload changed after signing.
        let token = sign(&key, &claims());
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let forged = with(claims(), |c| drop(c.insert("sub".into(), json!("mallory"))));
        parts[1] = base64_url(&serde_json::to_vec(&forged).unwrap());
        assert_eq!(verifier.verify(&parts.join(".")).await, Err(AuthError::Signature));
        // `alg: none` with no signature, and garbage.
        let none = format!(
            "{}.{}.",
            base64_url(br#"{"alg":"none","typ":"JWT"}"#),
            base64_url(&serde_json::to_vec(&claims()).unwrap())
        );
        assert_eq!(verifier.verify(&none).await, Err(AuthError::Malformed));
        assert_eq!(verifier.verify("not.a.jwt").await, Err(AuthError::Malformed));
        // An unknown key id.
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("rotated-away".into());
        let unknown = encode(&header, &claims(), &key.encoding).unwrap();
        assert_eq!(verifier.verify(&unknown).await, Err(AuthError::UnknownKey));
    }

    #[tokio::test]
    async fn an_hmac_token_made_with_the_public_key_as_secret_is_refused() {
        let key = provider_key(Algorithm::RS256, "rsa");
        let (verifier, _dir) = verifier(&[&key]).await;
        // The classic confusion: HS256 keyed with the published key's bytes.
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rsa".into());
        let secret = serde_json::to_vec(&key.jwk).unwrap();
        let token = encode(&header, &claims(), &EncodingKey::from_secret(&secret).unwrap()).unwrap();
        assert!(matches!(verifier.verify(&token).await, Err(AuthError::Algorithm(_))));
        // And an allowed algorithm against a key of another family.
        let ec = provider_key(Algorithm::ES256, "rsa");
        assert!(matches!(verifier.verify(&sign(&ec, &claims())).await, Err(AuthError::Algorithm(_))));
    }

    #[tokio::test]
    async fn a_jwks_url_is_fetched_with_a_timeout_and_again_for_a_rotated_key() {
        use std::sync::Mutex as StdMutex;
        let (first, rotated) = (provider_key(Algorithm::ES256, "k1"), provider_key(Algorithm::EdDSA, "k2"));
        let published = Arc::new(StdMutex::new(JwkSet { keys: vec![first.jwk.clone()] }));
        let app = axum::Router::new()
            .route(
                "/jwks",
                axum::routing::get({
                    let published = published.clone();
                    move || async move { axum::Json(published.lock().unwrap().clone()) }
                }),
            )
            .route("/silent", axum::routing::get(std::future::pending::<String>));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let settings = |path: &str| JwtSettings {
            jwks: Some(format!("{base}{path}")),
            issuer: Some(ISSUER.into()),
            audience: Some(AUDIENCE.into()),
            user_claim: "sub".into(),
            algorithms: parse_algorithms("ES256,EdDSA").unwrap(),
            leeway: Duration::from_secs(30),
            refresh: Duration::from_secs(300),
            timeout: Duration::from_millis(500),
        };

        let url = KeySource::parse(&format!("{base}/jwks"));
        let verifier = JwtVerifier::new(&settings("/jwks"), url).await.unwrap();
        assert!(verifier.verify(&sign(&first, &claims())).await.is_ok());
        // The provider rotates its key: a token of the new key is unknown until the set is
        // fetched again, which a token naming an unknown key does (not more than every 30 s).
        *published.lock().unwrap() = JwkSet { keys: vec![rotated.jwk.clone()] };
        assert_eq!(verifier.verify(&sign(&rotated, &claims())).await, Err(AuthError::UnknownKey), "fetched < 30 s ago");
        *verifier.loaded_at.lock().await -= UNKNOWN_KEY_REFETCH;
        assert!(verifier.verify(&sign(&rotated, &claims())).await.is_ok(), "fetched again for the unknown key");
        assert_eq!(verifier.verify(&sign(&first, &claims())).await, Err(AuthError::UnknownKey), "the old key is gone");

        // A provider that does not answer fails the start within the timeout, naming the URL.
        let started = Instant::now();
        let silent = JwtVerifier::new(&settings("/silent"), KeySource::parse(&format!("{base}/silent"))).await;
        let failure = silent.unwrap_err().to_string();
        assert!(failure.contains("/silent") && started.elapsed() < Duration::from_secs(5), "{failure}");
    }

    #[test]
    fn keys_are_fetched_over_https_or_from_this_machine_only() {
        assert!(is_https_or_loopback("https://idp.example/jwks"));
        assert!(is_https_or_loopback("http://127.0.0.1:8081/jwks"));
        assert!(is_https_or_loopback("http://localhost/jwks"));
        assert!(is_https_or_loopback("http://[::1]:9/jwks") && is_https_or_loopback("http://[::1]/jwks"));
        assert!(!is_https_or_loopback("http://idp.example/jwks"));
        assert!(!is_https_or_loopback("http://127.0.0.1.evil.example/jwks"));
    }

    #[test]
    fn only_asymmetric_algorithms_can_be_configured() {
        assert_eq!(parse_algorithms("ES256, EdDSA").unwrap().0, [Algorithm::ES256, Algorithm::EdDSA]);
        assert!(parse_algorithms("HS256").unwrap_err().contains("not allowed"));
        assert!(parse_algorithms("none").is_err());
        assert!(parse_algorithms("").is_err());
    }

    fn base64_url(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }
}
