//! Every vector of `spec/vectors.json` (kept in `tests/fixtures/`) as a test: URL and
//! message signatures, key derivation, decryption, deterministic encryption, a full
//! safe-mode exchange and the negative cases.

use serde_json::Value;
use wxgate_protocol::crypto::{CryptoError, EncodingAesKey};
use wxgate_protocol::reply::envelope;
use wxgate_protocol::signature::{msg_signature, url_signature, verify};
use wxgate_protocol::{Event, Kind, Push};

fn vectors() -> Value {
    serde_json::from_str(include_str!("fixtures/vectors.json")).unwrap()
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_else(|| panic!("vector field {k} missing"))
}

fn random16(hex_str: &str) -> [u8; 16] {
    hex::decode(hex_str).unwrap().try_into().unwrap()
}

#[test]
fn url_signature_vectors() {
    let all = vectors();
    let list = all["url_signature_vectors"].as_array().unwrap();
    assert!(list.len() >= 6);
    for v in list {
        let sig = url_signature(s(v, "token"), s(v, "timestamp"), s(v, "nonce"));
        assert_eq!(sig, s(v, "expected_signature"), "{}", s(v, "name"));
        assert!(verify(&sig, &[s(v, "token"), s(v, "timestamp"), s(v, "nonce")]));
        for wrong in ["wrong_if_sorted_numerically", "wrong_if_sorted_case_insensitively"] {
            if let Some(w) = v[wrong].as_str() {
                assert_ne!(sig, w, "{}", s(v, "name"));
            }
        }
    }
}

#[test]
fn aes_key_vectors() {
    for v in vectors()["aes_key_vectors"].as_array().unwrap() {
        let key = EncodingAesKey::parse(s(v, "encoding_aes_key")).unwrap();
        assert_eq!(hex::encode(key.as_bytes()), s(v, "aes_key_hex"), "{}", s(v, "name"));
        assert_eq!(hex::encode(&key.as_bytes()[..16]), s(v, "iv_hex"));
    }
}

#[test]
fn decrypt_vectors() {
    for v in vectors()["decrypt_vectors"].as_array().unwrap() {
        let name = s(v, "name");
        let key = EncodingAesKey::parse(s(v, "encoding_aes_key")).unwrap();
        let encrypt = s(v, "encrypt");
        assert_eq!(
            msg_signature(s(v, "token"), s(v, "timestamp"), s(v, "nonce"), encrypt),
            s(v, "expected_msg_signature"),
            "{name}"
        );
        let (msg, trailer) = key.decrypt(encrypt).unwrap();
        assert_eq!(msg, s(v, "expected_plaintext"), "{name}");
        assert_eq!(
            msg.len().to_string(),
            v["expected_msg_len"].to_string().trim_matches('"'),
            "{name}"
        );
        assert_eq!(trailer, s(v, "expected_trailing_id").as_bytes(), "{name}");
        assert_eq!(key.open(encrypt, s(v, "appid_or_receive_id")).unwrap(), msg);
        // Sealing again with the prefix the vector used gives back the same ciphertext.
        let again = key.seal_with(
            &msg,
            s(v, "expected_trailing_id"),
            random16(s(v, "expected_random16_hex")),
        );
        assert_eq!(again, encrypt, "{name}");
    }
}

#[test]
fn encrypt_vectors() {
    for v in vectors()["encrypt_vectors"].as_array().unwrap() {
        let name = s(v, "name");
        let key = EncodingAesKey::parse(s(v, "encoding_aes_key")).unwrap();
        let plaintext = s(v, "plaintext");
        assert_eq!(plaintext.len() as u64, v["plaintext_utf8_bytes"].as_u64().unwrap(), "{name}");
        let encrypt = key.seal_with(plaintext, s(v, "appid"), random16(s(v, "random16_hex")));
        assert_eq!(encrypt, s(v, "expected_encrypt"), "{name}");
        let sig = msg_signature(s(v, "token"), s(v, "timestamp"), s(v, "nonce"), &encrypt);
        assert_eq!(sig, s(v, "expected_msg_signature"), "{name}");
        let body = envelope(&encrypt, &sig, s(v, "timestamp").parse().unwrap(), s(v, "nonce"));
        assert_eq!(body, s(v, "expected_reply_xml"), "{name}");
        assert_eq!(key.open(&encrypt, s(v, "appid")).unwrap(), plaintext);
    }
}

#[test]
fn full_exchange_vectors() {
    for v in vectors()["full_exchange_vectors"].as_array().unwrap() {
        let cfg = &v["config"];
        let q = &v["request"]["query"];
        let key = EncodingAesKey::parse(s(cfg, "encoding_aes_key")).unwrap();
        assert!(verify(s(q, "signature"), &[s(cfg, "token"), s(q, "timestamp"), s(q, "nonce")]));

        let outer = wxgate_protocol::xml::parse(s(&v["request"], "body")).unwrap();
        let encrypt = outer.text_of("Encrypt").unwrap();
        assert!(verify(
            s(q, "msg_signature"),
            &[s(cfg, "token"), s(q, "timestamp"), s(q, "nonce"), encrypt]
        ));
        let inner = key.open(encrypt, s(cfg, "appid")).unwrap();
        assert_eq!(inner, s(v, "expected_decrypted_xml"));

        let push = Push::parse(&inner).unwrap();
        let expect = &v["expected_parse"];
        assert_eq!(push.msg_type, s(expect, "MsgType"));
        assert_eq!(push.event_key(), Some(s(expect, "EventKey")));
        assert_eq!(push.scene(), Some(s(expect, "scene")));
        assert!(
            matches!(&push.kind, Kind::Event(Event::Subscribe { ticket: Some(t), .. }) if t == s(expect, "Ticket"))
        );

        let r = &v["reply"];
        let encrypt =
            key.seal_with(s(r, "plaintext"), s(cfg, "appid"), random16(s(r, "random16_hex")));
        assert_eq!(encrypt, s(r, "expected_encrypt"));
        let sig = msg_signature(s(cfg, "token"), s(r, "timestamp"), s(r, "nonce"), &encrypt);
        assert_eq!(sig, s(r, "expected_msg_signature"));
        assert_eq!(
            envelope(&encrypt, &sig, s(r, "timestamp").parse().unwrap(), s(r, "nonce")),
            s(r, "expected_body")
        );
    }
}

#[test]
fn negative_vectors() {
    for v in vectors()["negative_vectors"].as_array().unwrap() {
        let name = s(v, "name");
        let encrypt = s(v, "encrypt");
        if let Some(sig) = v["msg_signature"].as_str() {
            let signed = verify(sig, &[s(v, "token"), s(v, "timestamp"), s(v, "nonce"), encrypt]);
            assert_eq!(signed, name != "wrong-msg-signature", "{name}");
        }
        let Some(key) = v["encoding_aes_key"].as_str() else { continue };
        let key = EncodingAesKey::parse(key).unwrap();
        let appid = v["configured_appid"].as_str().unwrap_or("wx1234567890abcdef");
        let err = key.open(encrypt, appid).unwrap_err();
        let expected = match name {
            "trailing-appid-mismatch" => CryptoError::AppIdMismatch,
            "invalid-pkcs7-padding" => CryptoError::Padding,
            "ciphertext-not-multiple-of-16" => CryptoError::BlockLength(40),
            "msg-len-exceeds-buffer" => {
                assert!(
                    matches!(err, CryptoError::Length { declared: 10000, .. }),
                    "{name}: {err:?}"
                );
                continue;
            }
            other => panic!("negative vector {other} has no expectation here"),
        };
        assert_eq!(err, expected, "{name}");
    }
}
