//! Bearer tokens that bind a socket to a user: `<user id>.<hex HMAC-SHA256(secret, user id)>`.
//! Every gateway instance given the same secret accepts every other's tokens.

use hmac::{Hmac, Mac};
use parley_events::UserId;
use sha2::Sha256;
use uuid::Uuid;

type HmacSha256 = Hmac<Sha256>;

/// Issues and verifies anonymous tokens: `<user id>.<HMAC-SHA256 of it>`.
#[derive(Clone)]
pub struct TokenSigner {
    secret: Vec<u8>,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner(..)")
    }
}

impl TokenSigner {
    /// A signer with `secret`.
    pub fn new(secret: &[u8]) -> Self {
        Self { secret: secret.to_vec() }
    }

    /// A new anonymous user and its token.
    pub fn issue(&self) -> (String, String) {
        let user_id = format!("u-{}", Uuid::new_v4().simple());
        let token = self.token_for(&user_id);
        (user_id, token)
    }

    /// The token of an existing user (for operators and benchmarks holding the secret).
    pub fn token_for(&self, user_id: &str) -> String {
        format!("{user_id}.{}", hex::encode(self.mac(user_id).finalize().into_bytes()))
    }

    /// The user a token was issued to, if it is genuine.
    pub fn verify(&self, token: &str) -> Option<UserId> {
        let (user_id, signature) = token.rsplit_once('.')?;
        let signature = hex::decode(signature).ok()?;
        self.mac(user_id).verify_slice(&signature).ok()?;
        user_id.parse().ok()
    }

    fn mac(&self, user_id: &str) -> HmacSha256 {
        #[allow(clippy::expect_used)] // HMAC takes keys of any length
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC accepts any key length");
        mac.update(user_id.as_bytes());
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_and_forgeries_do_not() {
        let signer = TokenSigner::new(b"secret");
        let (user, token) = signer.issue();
        assert_eq!(signer.verify(&token).map(|u| u.to_string()), Some(user.clone()));
        assert_eq!(TokenSigner::new(b"other").verify(&token), None);
        let forged = format!("u-mallory.{}", token.rsplit_once('.').unwrap().1);
        assert_eq!(signer.verify(&forged), None);
        assert_eq!(signer.verify("garbage"), None);
    }
}
