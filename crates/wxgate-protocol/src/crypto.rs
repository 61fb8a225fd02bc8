//! The AES envelope of compatible and safe mode (protocol.md §4): AES-256-CBC with the IV
//! taken from the key, over `random(16) || be_u32(len) || msg || appid`, padded PKCS#7 to
//! a 32-byte block (not AES's 16, so the pad byte runs 1..=32).
//!
//! Decryption trusts nothing it reads: the pad is checked byte by byte, the length prefix
//! is bounds-checked before any slice, and the trailing AppID is compared exactly.

use std::fmt;

use aes::Aes256;
use aes::cipher::{Array, BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig, general_purpose};

/// WeChat's padding block: PKCS#7 with K = 32.
const PAD_BLOCK: usize = 32;
/// The random prefix and the length field that precede the message.
const HEADER: usize = 20;

/// Errors reading an EncodingAESKey.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("must be 43 characters, got {0}")]
    Length(usize),
    #[error("must hold only letters and digits (A-Z, a-z, 0-9)")]
    Alphabet,
}

/// Errors opening or sealing an envelope. Names follow the failure, never the secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("encrypt is not valid base64")]
    Base64,
    #[error("ciphertext length {0} is not a positive multiple of 16")]
    BlockLength(usize),
    #[error("bad padding (wrong key or corrupted ciphertext)")]
    Padding,
    #[error("decrypted payload too short for its header")]
    TooShort,
    #[error("declared message length {declared} exceeds the {available} bytes available")]
    Length { declared: u32, available: usize },
    #[error("decrypted message is not utf-8")]
    Utf8,
    #[error("trailing app id does not match this account")]
    AppIdMismatch,
}

/// A decoded EncodingAESKey: 32 bytes of AES-256 key, whose first 16 are also the IV.
///
/// The 43 characters carry 258 bits of which 256 are used; the last character's spare
/// bits are usually set, so strict base64 decoders refuse real keys (protocol.md §4.2).
#[derive(Clone, PartialEq, Eq)]
pub struct EncodingAesKey([u8; 32]);

impl fmt::Debug for EncodingAesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncodingAesKey(<redacted>)")
    }
}

const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

impl EncodingAesKey {
    /// Reads the 43-character form shown in the WeChat console.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        if s.len() != 43 {
            return Err(KeyError::Length(s.chars().count()));
        }
        if !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(KeyError::Alphabet);
        }
        let bytes = LENIENT.decode(s).map_err(|_| KeyError::Alphabet)?;
        // 43 base64 characters always decode to 32 bytes; the check keeps the invariant local.
        let key: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Length(43))?;
        Ok(EncodingAesKey(key))
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn iv(&self) -> [u8; 16] {
        let mut iv = [0; 16];
        iv.copy_from_slice(&self.0[..16]);
        iv
    }

    /// Decrypts an `Encrypt` value and returns the message and the trailing id, without
    /// judging the id (see [`EncodingAesKey::open`]).
    pub fn decrypt(&self, encrypt: &str) -> Result<(String, Vec<u8>), CryptoError> {
        let (msg, trailer) = self.decrypt_bytes(encrypt)?;
        Ok((String::from_utf8(msg).map_err(|_| CryptoError::Utf8)?, trailer))
    }

    /// Decrypts to the message's bytes (not yet checked as UTF-8) and the trailing id.
    pub fn decrypt_bytes(&self, encrypt: &str) -> Result<(Vec<u8>, Vec<u8>), CryptoError> {
        let mut buf =
            general_purpose::STANDARD.decode(encrypt.trim()).map_err(|_| CryptoError::Base64)?;
        if buf.is_empty() || buf.len() % 16 != 0 {
            return Err(CryptoError::BlockLength(buf.len()));
        }
        let mut cipher =
            cbc::Decryptor::<Aes256>::new(&Array::from(self.0), &Array::from(self.iv()));
        let (blocks, _) = Array::slice_as_chunks_mut(&mut buf);
        cipher.decrypt_blocks(blocks);

        let pad = usize::from(*buf.last().ok_or(CryptoError::Padding)?);
        if !(1..=PAD_BLOCK).contains(&pad) || pad > buf.len() {
            return Err(CryptoError::Padding);
        }
        if !buf[buf.len() - pad..].iter().all(|&b| usize::from(b) == pad) {
            return Err(CryptoError::Padding);
        }
        buf.truncate(buf.len() - pad);

        if buf.len() < HEADER {
            return Err(CryptoError::TooShort);
        }
        let declared = u32::from_be_bytes([buf[16], buf[17], buf[18], buf[19]]);
        let available = buf.len() - HEADER;
        let len = usize::try_from(declared)
            .ok()
            .filter(|&n| n <= available)
            .ok_or(CryptoError::Length { declared, available })?;
        let trailer = buf[HEADER + len..].to_vec();
        buf.truncate(HEADER + len);
        buf.drain(..HEADER);
        Ok((buf, trailer))
    }

    /// Like [`EncodingAesKey::open`], but leaves judging the message's UTF-8 to the caller
    /// (an authentic envelope whose content is not text is still authentic).
    pub fn open_bytes(&self, encrypt: &str, app_id: &str) -> Result<Vec<u8>, CryptoError> {
        let (msg, trailer) = self.decrypt_bytes(encrypt)?;
        if trailer != app_id.as_bytes() {
            return Err(CryptoError::AppIdMismatch);
        }
        Ok(msg)
    }

    /// Decrypts an `Encrypt` value whose trailing id must be `app_id` exactly.
    pub fn open(&self, encrypt: &str, app_id: &str) -> Result<String, CryptoError> {
        let (msg, trailer) = self.decrypt(encrypt)?;
        if trailer != app_id.as_bytes() {
            return Err(CryptoError::AppIdMismatch);
        }
        Ok(msg)
    }

    /// Encrypts `msg` for `app_id` with a fresh random prefix.
    pub fn seal(&self, msg: &str, app_id: &str) -> String {
        let mut random = [0u8; 16];
        // The prefix only has to differ between messages; if the OS source fails we still
        // produce a valid envelope rather than refuse to answer.
        let _ = getrandom::fill(&mut random);
        self.seal_with(msg, app_id, random)
    }

    /// Encrypts with a given prefix; deterministic, for test vectors and simulators.
    pub fn seal_with(&self, msg: &str, app_id: &str, random: [u8; 16]) -> String {
        let body = HEADER + msg.len() + app_id.len();
        let pad = PAD_BLOCK - body % PAD_BLOCK;
        let mut buf = Vec::with_capacity(body + pad);
        buf.extend_from_slice(&random);
        // The length counts UTF-8 bytes: a CJK character is 3, an emoji 4.
        buf.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        buf.extend_from_slice(msg.as_bytes());
        buf.extend_from_slice(app_id.as_bytes());
        buf.resize(body + pad, pad as u8);

        let mut cipher =
            cbc::Encryptor::<Aes256>::new(&Array::from(self.0), &Array::from(self.iv()));
        let (blocks, _) = Array::slice_as_chunks_mut(&mut buf);
        cipher.encrypt_blocks(blocks);
        general_purpose::STANDARD.encode(&buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> EncodingAesKey {
        EncodingAesKey::parse("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG").unwrap()
    }

    #[test]
    fn key_with_spare_bits_decodes() {
        assert_eq!(
            hex::encode(key().as_bytes()),
            "69b71d79f8218a39259a7a29aabb2dbafc31cb3d35db7e39ebbf3d0010831051"
        );
    }

    #[test]
    fn bad_keys_name_the_problem() {
        assert_eq!(EncodingAesKey::parse("abc"), Err(KeyError::Length(3)));
        assert_eq!(
            EncodingAesKey::parse("abcdefghijklmnopqrstuvwxyz0123456789ABCDEF+"),
            Err(KeyError::Alphabet)
        );
    }

    #[test]
    fn seal_then_open_round_trips_every_pad_length() {
        for n in 0..80 {
            let msg: String = "中".repeat(n % 7) + &"x".repeat(n);
            let sealed = key().seal(&msg, "wx1234567890abcdef");
            assert_eq!(key().open(&sealed, "wx1234567890abcdef").unwrap(), msg);
            assert_eq!(key().open(&sealed, "wx1234567890abcdeg"), Err(CryptoError::AppIdMismatch));
        }
    }

    #[test]
    fn debug_never_prints_the_key() {
        assert_eq!(format!("{:?}", key()), "EncodingAesKey(<redacted>)");
    }
}
