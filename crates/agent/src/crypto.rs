//! Optional encryption of stored data in the `age` format (X25519 recipients), so a user
//! decrypts with the standard `age -d -i key.txt`. The recipient (public key) comes from
//! the repository's Secret; the identity (private key) is only needed to restore.

use std::io::Write;
use std::str::FromStr;

/// Environment variable carrying the recipient into agent Jobs (from a Secret reference).
pub const RECIPIENT_ENV: &str = "AGE_RECIPIENT";

/// Parses an `age1...` recipient. The error never repeats the value.
pub fn parse_recipient(text: &str) -> Result<age::x25519::Recipient, String> {
    age::x25519::Recipient::from_str(text.trim())
        .map_err(|_| "not an age X25519 recipient (expected age1...)".to_string())
}

/// Runs `body` with a writer that encrypts to `recipient` (or passes through), then
/// finishes the age stream and hands back the inner writer.
pub fn sealed<W: Write, T>(
    writer: W,
    recipient: Option<&age::x25519::Recipient>,
    body: impl FnOnce(&mut dyn Write) -> std::io::Result<T>,
) -> std::io::Result<(W, T)> {
    match recipient {
        None => {
            let mut writer = writer;
            let out = body(&mut writer)?;
            Ok((writer, out))
        }
        Some(recipient) => {
            let encryptor =
                age::Encryptor::with_recipients(std::iter::once(recipient as &dyn age::Recipient))
                    .map_err(std::io::Error::other)?;
            let mut stream = encryptor.wrap_output(writer)?;
            let out = body(&mut stream)?;
            Ok((stream.finish()?, out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_output_decrypts_with_the_identity_and_bad_keys_are_refused() {
        let identity = age::x25519::Identity::generate();
        let recipient = identity.to_public();
        let (stored, ()) =
            sealed(Vec::new(), Some(&recipient), |w| w.write_all(b"hello")).unwrap_or_default();
        assert!(stored.starts_with(b"age-encryption.org/v1"));
        let decryptor = age::Decryptor::new(&stored[..]).ok();
        let mut plain = Vec::new();
        if let Some(d) = decryptor
            && let Ok(mut reader) = d.decrypt(std::iter::once(&identity as &dyn age::Identity))
        {
            let _ = std::io::Read::read_to_end(&mut reader, &mut plain);
        }
        assert_eq!(plain, b"hello");
        let (clear, ()) = sealed(Vec::new(), None, |w| w.write_all(b"x")).unwrap_or_default();
        assert_eq!(clear, b"x");
        let err = parse_recipient("age1-not-a-key-SECRETISH")
            .err()
            .unwrap_or_default();
        assert!(!err.contains("SECRETISH"));
        assert!(parse_recipient(&recipient.to_string()).is_ok());
    }
}
