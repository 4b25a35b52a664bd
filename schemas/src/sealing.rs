//! Crypto-shredding, the pure part: what a person wrote or was answered is sealed under a
//! data key of that person, and destroying the key erases the content wherever the log
//! went. An authenticated cipher from RustCrypto (XChaCha20-Poly1305: a random 192-bit nonce
//! per value, so no nonce bookkeeping), key material zeroized when dropped. The event id and
//! the field's name are bound as associated data: a sealed value moved to another event or
//! field does not open.
//!
//! Data keys are stored wrapped (sealed) by a key-encryption key: [`KeyWrapper`], a master
//! key in a file or the environment locally ([`MasterKey`]), a KMS in production.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Bytes of a key.
pub const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 24;
/// What starts a sealed text value (then base64 of nonce and ciphertext): the version of
/// the format, so a later scheme can be told apart.
pub const SEALED_PREFIX: &str = "sealed.v1.";
/// What replay, audit and the query path show for content whose key was destroyed.
pub const ERASED: &str = "[erased]";
/// What they show for a sealed value that does not open with its subject's live key
/// (altered, or sealed under another key): never the ciphertext.
pub const UNREADABLE: &str = "[unreadable]";

/// Why a value could not be sealed or opened.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SealError {
    /// Not a sealed value of a known format.
    #[error("not a sealed value")]
    NotSealed,
    /// The key, the event or the field is not the one it was sealed with, or it was altered.
    #[error("the value does not open with this key for this event and field (altered, or another key)")]
    Unopenable,
    /// Opened, but not UTF-8 text.
    #[error("the opened value is not text")]
    NotText,
    /// A key of the wrong length or encoding.
    #[error("a key must be {KEY_BYTES} bytes, base64: {0}")]
    BadKey(String),
}

/// One person's data key. Never printed, zeroed when dropped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; KEY_BYTES]);

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    /// A new random key (the operating system's generator).
    pub fn generate() -> Self {
        Self(XChaCha20Poly1305::generate_key(&mut OsRng).into())
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.0.into())
    }

    /// `text` sealed for `field` of `bound_to` (the event's id; a conversation's id for its
    /// title): [`SEALED_PREFIX`] and base64.
    pub fn seal(&self, bound_to: &dyn fmt::Display, field: &str, text: &str) -> String {
        let sealed = seal_bytes(&self.cipher(), &associated(bound_to.to_string().as_bytes(), field), text.as_bytes());
        format!("{SEALED_PREFIX}{}", STANDARD_NO_PAD.encode(sealed))
    }

    /// The text `sealed` holds, if it was sealed with this key for this id and field.
    pub fn open(&self, bound_to: &dyn fmt::Display, field: &str, sealed: &str) -> Result<String, SealError> {
        let bytes = STANDARD_NO_PAD
            .decode(sealed.strip_prefix(SEALED_PREFIX).ok_or(SealError::NotSealed)?)
            .map_err(|_| SealError::NotSealed)?;
        let opened = open_bytes(&self.cipher(), &associated(bound_to.to_string().as_bytes(), field), &bytes)?;
        String::from_utf8(opened.to_vec()).map_err(|_| SealError::NotText)
    }
}

/// The field a token delta is sealed as, with its query's event id: each delta of each
/// attempt is a value of its own.
pub fn delta_field(attempt: i32, index: i32) -> String {
    format!("delta {attempt} {index}")
}

/// Whether `value` is a sealed value (of any key).
pub fn is_sealed(value: &str) -> bool {
    value.starts_with(SEALED_PREFIX)
}

/// Wraps and unwraps data keys: the key-encryption key never leaves it. Locally a
/// [`MasterKey`]; in production an implementation that calls a KMS (its encrypt and
/// decrypt operations, with the subject as encryption context), so the master key never
/// reaches Parley's machines.
pub trait KeyWrapper: Send + Sync {
    /// Which key wraps (recorded beside each wrapped key, so a rotation can find them).
    fn id(&self) -> &str;
    /// `key` wrapped for `subject` (bound as associated data).
    fn wrap(&self, subject: &str, key: &DataKey) -> Vec<u8>;
    /// The key `wrapped` holds, if this wrapper wrapped it for `subject`.
    fn unwrap(&self, subject: &str, wrapped: &[u8]) -> Result<DataKey, SealError>;
}

/// A key-encryption key held by Parley: 32 random bytes, base64, from a file or an
/// environment variable the operator provides.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey {
    key: [u8; KEY_BYTES],
    #[zeroize(skip)]
    id: String,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey").field("id", &self.id).finish_non_exhaustive()
    }
}

impl MasterKey {
    /// The key `text` holds (base64 of 32 bytes; white space around it is ignored), named
    /// `id` (e.g. `local:<file name>`).
    pub fn from_base64(text: &str, id: &str) -> Result<Self, SealError> {
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|e| SealError::BadKey(e.to_string()))?,
        );
        let key: [u8; KEY_BYTES] =
            bytes.as_slice().try_into().map_err(|_| SealError::BadKey(format!("got {} bytes", bytes.len())))?;
        Ok(Self { key, id: id.to_owned() })
    }

    /// A new random master key, base64.
    pub fn generate_base64() -> Zeroizing<String> {
        let key = Zeroizing::new(<[u8; KEY_BYTES]>::from(XChaCha20Poly1305::generate_key(&mut OsRng)));
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(key.as_slice()))
    }
}

impl KeyWrapper for MasterKey {
    fn id(&self) -> &str {
        &self.id
    }

    fn wrap(&self, subject: &str, key: &DataKey) -> Vec<u8> {
        seal_bytes(&XChaCha20Poly1305::new(&self.key.into()), &associated(subject.as_bytes(), "data key"), &key.0)
    }

    fn unwrap(&self, subject: &str, wrapped: &[u8]) -> Result<DataKey, SealError> {
        let cipher = XChaCha20Poly1305::new(&self.key.into());
        let opened = open_bytes(&cipher, &associated(subject.as_bytes(), "data key"), wrapped)?;
        let key: [u8; KEY_BYTES] = opened.as_slice().try_into().map_err(|_| SealError::Unopenable)?;
        Ok(DataKey(key))
    }
}

/// The associated data of a value: who or what it belongs to, and which field it is
/// (length-prefixed, so no two pairs give the same bytes).
fn associated(owner: &[u8], field: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(8 + owner.len() + field.len());
    data.extend_from_slice(&u32::try_from(owner.len()).unwrap_or(u32::MAX).to_be_bytes());
    data.extend_from_slice(owner);
    data.extend_from_slice(field.as_bytes());
    data
}

/// Nonce, then ciphertext and tag.
fn seal_bytes(cipher: &XChaCha20Poly1305, associated: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    // Encryption fails only for inputs beyond the cipher's limit (about 256 GiB).
    let ciphertext = cipher.encrypt(&nonce, Payload { msg: plaintext, aad: associated }).unwrap_or_default();
    let mut sealed = Vec::with_capacity(NONCE_BYTES + ciphertext.len());
    sealed.extend_from_slice(&nonce);
    sealed.extend_from_slice(&ciphertext);
    sealed
}

fn open_bytes(cipher: &XChaCha20Poly1305, associated: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
    if sealed.len() < NONCE_BYTES {
        return Err(SealError::Unopenable);
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_BYTES);
    cipher
        .decrypt(XNonce::from_slice(nonce), Payload { msg: ciphertext, aad: associated })
        .map(Zeroizing::new)
        .map_err(|_| SealError::Unopenable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::EventId;

    fn event() -> EventId {
        uuid::Uuid::new_v4().into()
    }

    #[test]
    fn a_sealed_value_opens_only_with_its_key_event_and_field() {
        let key = DataKey::generate();
        let (here, elsewhere) = (event(), event());
        let sealed = key.seal(&here, "text", "the canary 7f3a");
        assert!(is_sealed(&sealed) && !sealed.contains("canary"), "{sealed}");
        assert_eq!(key.open(&here, "text", &sealed).as_deref(), Ok("the canary 7f3a"));
        assert_eq!(key.open(&elsewhere, "text", &sealed), Err(SealError::Unopenable));
        assert_eq!(key.open(&here, "title", &sealed), Err(SealError::Unopenable));
        assert_eq!(DataKey::generate().open(&here, "text", &sealed), Err(SealError::Unopenable));
        assert_eq!(key.open(&here, "text", "plain words"), Err(SealError::NotSealed));
        // The same text sealed twice looks different (a fresh nonce each time).
        assert_ne!(key.seal(&here, "text", "same"), key.seal(&here, "text", "same"));
        // One flipped character of the ciphertext and it no longer opens.
        let mut altered = sealed.clone().into_bytes();
        let at = altered.len() - 5;
        altered[at] = if altered[at] == b'A' { b'B' } else { b'A' };
        assert_eq!(key.open(&here, "text", &String::from_utf8(altered).unwrap()), Err(SealError::Unopenable));
    }

    #[test]
    fn a_wrapped_data_key_unwraps_only_with_its_master_key_for_its_subject() {
        let master = MasterKey::from_base64(&MasterKey::generate_base64(), "local:test").unwrap();
        let key = DataKey::generate();
        let wrapped = master.wrap("u-alice", &key);
        let unwrapped = master.unwrap("u-alice", &wrapped).unwrap();
        let e = event();
        assert_eq!(unwrapped.open(&e, "text", &key.seal(&e, "text", "hi")).as_deref(), Ok("hi"));
        assert!(master.unwrap("u-bob", &wrapped).is_err(), "another subject's wrapping");
        let other = MasterKey::from_base64(&MasterKey::generate_base64(), "local:other").unwrap();
        assert!(other.unwrap("u-alice", &wrapped).is_err(), "another master key");
        assert!(matches!(MasterKey::from_base64("c2hvcnQ=", "x"), Err(SealError::BadKey(_))));
        assert!(matches!(MasterKey::from_base64("not base64!", "x"), Err(SealError::BadKey(_))));
        assert_eq!(format!("{master:?}"), "MasterKey { id: \"local:test\", .. }", "never printed");
        assert_eq!(format!("{key:?}"), "DataKey(..)");
    }
}
