//! Sealing: a [`ProviderKey`] (key id + 32-byte secret) computes the HMAC-SHA256 over a
//! token's envelope header and body; a [`KeyRing`] holds the current key (which seals) and
//! older ones (which still verify) so keys can rotate without killing live tokens.
//!
//! The MAC is checked with `hmac`'s `verify_slice`, a constant-time comparison, before any
//! body field is trusted. Only the version and the key id are read before: both are needed
//! to know how to verify, and neither grants anything.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use sha2::Sha256;
use zerocopy::{FromZeros, IntoBytes};

use crate::body::{RawBody, TokenBody, BODY_VERSION, MAC_OFFSET};
use crate::envelope::{Envelope, RawToken, Token, TOKEN_ID_LENGTH, TOKEN_TYPE_VDISK};
use crate::error::FormatError;

/// Length of a provider secret.
pub const SECRET_LEN: usize = 32;

/// One sealing key: its id (recorded in every body it seals) and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ProviderKey {
    id: u32,
    secret: [u8; SECRET_LEN],
}

impl fmt::Debug for ProviderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "ProviderKey {{ id: {}, .. }}", self.id)
    }
}

impl ProviderKey {
    /// A key from its id and secret.
    pub fn new(id: u32, secret: [u8; SECRET_LEN]) -> Self {
        ProviderKey { id, secret }
    }

    /// A key with id `id` and a fresh random secret from the thread-local CSPRNG (ChaCha,
    /// seeded from the operating system).
    pub fn generate(id: u32) -> Self {
        let mut secret = [0u8; SECRET_LEN];
        rand::rng().fill_bytes(&mut secret);
        ProviderKey { id, secret }
    }

    /// The key id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The secret (for writing a key file).
    pub fn secret(&self) -> &[u8; SECRET_LEN] {
        &self.secret
    }

    fn mac(&self, header: &[u8], body: &[u8]) -> Hmac<Sha256> {
        // RFC 2104: a key shorter than the block is padded with zeros to the block (64 bytes
        // for SHA-256), so padding it here gives the same MAC through the infallible `new`.
        let mut block = [0u8; 64];
        block[..SECRET_LEN].copy_from_slice(&self.secret);
        let mut m = <Hmac<Sha256> as KeyInit>::new(&block.into());
        m.update(header);
        m.update(body);
        m
    }

    /// The seal over `header || body[..MAC_OFFSET]`.
    fn seal_bytes(&self, header: &[u8], body: &[u8]) -> [u8; 32] {
        let tag = self.mac(header, body).finalize().into_bytes();
        let mut out = [0u8; 32];
        out.copy_from_slice(&tag);
        out
    }
}

/// What opening a token yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// The well-known zero-data token.
    Zero,
    /// A sealed token whose seal verified, with its validated body.
    Sealed(TokenBody),
}

/// The keys of one provider: the first seals, all verify.
#[derive(Debug, Clone)]
pub struct KeyRing {
    keys: Vec<ProviderKey>,
}

impl KeyRing {
    /// A ring holding only `current`.
    pub fn new(current: ProviderKey) -> Self {
        KeyRing {
            keys: vec![current],
        }
    }

    /// A ring from keys, the first of which seals; `None` if empty or if two keys share an
    /// id.
    pub fn from_keys(keys: Vec<ProviderKey>) -> Option<Self> {
        let unique = keys
            .iter()
            .enumerate()
            .all(|(i, k)| keys[..i].iter().all(|o| o.id != k.id));
        (!keys.is_empty() && unique).then_some(KeyRing { keys })
    }

    /// The key that seals new tokens.
    pub fn current(&self) -> &ProviderKey {
        // The ring is never empty: every constructor and `retire` keep one key.
        &self.keys[0]
    }

    /// All keys, the current one first.
    pub fn keys(&self) -> &[ProviderKey] {
        &self.keys
    }

    /// Makes `key` the sealing key; the old ones keep verifying. Returns `false` (and
    /// changes nothing) if a key with this id is already in the ring.
    pub fn rotate(&mut self, key: ProviderKey) -> bool {
        if self.keys.iter().any(|k| k.id == key.id) {
            return false;
        }
        self.keys.insert(0, key);
        true
    }

    /// Drops the key `id`: tokens sealed under it stop verifying. The current key cannot be
    /// retired (rotate first); returns whether a key was dropped.
    pub fn retire(&mut self, id: u32) -> bool {
        match self.keys.iter().position(|k| k.id == id) {
            Some(i) if i > 0 => {
                self.keys.remove(i);
                true
            }
            _ => false,
        }
    }

    /// Seals `body` under the current key (setting its key id) into a 512-byte token.
    pub fn seal(&self, body: &TokenBody) -> Result<Token, FormatError> {
        let key = self.current();
        let mut b = body.clone();
        b.key_id = key.id;
        let mut raw = b.to_raw()?;
        let mut env = RawToken::new_zeroed();
        env.token_type.set(TOKEN_TYPE_VDISK);
        env.token_id_length.set(TOKEN_ID_LENGTH);
        let header = &env.as_bytes()[..crate::envelope::HEADER_SIZE];
        raw.mac = key.seal_bytes(header, &raw.as_bytes()[..MAC_OFFSET]);
        env.token_id.copy_from_slice(raw.as_bytes());
        Token::from_slice(env.as_bytes())
    }

    /// Parses and verifies a token: the envelope strictly, then the body's version and key
    /// id, then the seal (constant-time), then every body field.
    pub fn open(&self, token: &Token) -> Result<Opened, FormatError> {
        let (header, body) = match token.envelope()? {
            Envelope::Zero => return Ok(Opened::Zero),
            Envelope::Sealed { header, body } => (header, body),
        };
        let raw: &RawBody = zerocopy::transmute_ref!(&*body);
        let version = raw.version.get();
        if version != BODY_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let key_id = raw.key_id.get();
        let key = self
            .keys
            .iter()
            .find(|k| k.id == key_id)
            .ok_or(FormatError::UnknownKey(key_id))?;
        key.mac(&header, &body[..MAC_OFFSET])
            .verify_slice(&raw.mac)
            .map_err(|_| FormatError::BadMac)?;
        TokenBody::try_from(raw).map(Opened::Sealed)
    }
}
