//! SHA-1 signatures (protocol.md §3): the URL `signature` over token, timestamp and nonce,
//! and `msg_signature` / `MsgSignature` over the same plus the `Encrypt` text.
//!
//! The parts are sorted as byte strings, not as numbers and not case-insensitively, then
//! joined with no separator; the digest is lowercase hex. Checks compare in constant time
//! so that a caller cannot learn a valid signature byte by byte.

use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

/// The lowercase hex SHA-1 of the byte-wise sorted, concatenated parts.
pub fn sign(parts: &[&str]) -> String {
    let mut sorted: Vec<&[u8]> = parts.iter().map(|p| p.as_bytes()).collect();
    sorted.sort_unstable();
    let mut hasher = Sha1::new();
    for part in sorted {
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// Whether `given` is the signature of `parts`. Upper-case hex is accepted; the
/// comparison takes the same time wherever the first difference is.
pub fn verify(given: &str, parts: &[&str]) -> bool {
    let expected = sign(parts);
    let given = given.to_ascii_lowercase();
    given.len() == expected.len() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// The URL signature of a push or verification request.
pub fn url_signature(token: &str, timestamp: &str, nonce: &str) -> String {
    sign(&[token, timestamp, nonce])
}

/// The message signature of an encrypted body or reply.
pub fn msg_signature(token: &str, timestamp: &str, nonce: &str, encrypt: &str) -> String {
    sign(&[token, timestamp, nonce, encrypt])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_order_not_numeric_order() {
        assert_eq!(
            url_signature("Token123", "1700000000", "99"),
            "87d5d3ae22332ae2595f1e006f51b3e9a08fab32"
        );
    }

    #[test]
    fn verify_rejects_near_misses() {
        let sig = url_signature("t", "1", "2");
        assert!(verify(&sig, &["t", "1", "2"]));
        assert!(verify(&sig.to_uppercase(), &["t", "1", "2"]));
        assert!(!verify(&sig[..39], &["t", "1", "2"]));
        assert!(!verify("", &["t", "1", "2"]));
        assert!(!verify(&sig, &["t", "1", "3"]));
    }
}
