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

/// Parses an `AGE-SECRET-KEY-1...` identity, alone or as the key file `age-keygen -o`
/// writes (its `#` comment lines are skipped: a user puts that file in the Secret as it
/// is). The error never repeats the value.
pub fn parse_identity(text: &str) -> Result<age::x25519::Identity, String> {
    let key = text
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))
        .unwrap_or_default();
    age::x25519::Identity::from_str(key)
        .map_err(|_| "not an age X25519 identity (expected AGE-SECRET-KEY-1...)".to_string())
}

/// Whether `identity` decrypts what is encrypted to `recipient`: its public half is the
/// recipient. A pair that does not match means backups that could never be restored.
pub fn identity_matches(
    identity: &age::x25519::Identity,
    recipient: &age::x25519::Recipient,
) -> bool {
    identity.to_public().to_string() == recipient.to_string()
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

    #[test]
    fn an_identity_parses_alone_or_as_a_key_file_and_is_matched_to_its_recipient() {
        use age::secrecy::ExposeSecret;
        let identity = age::x25519::Identity::generate();
        let key = identity.to_string().expose_secret().to_string();
        let recipient = identity.to_public();
        let other = age::x25519::Identity::generate().to_public();
        let file = format!("# created: 2026-12-02T00:00:00Z\n# public key: {recipient}\n{key}\n");
        for (case, text) in [
            ("bare", key.clone()),
            ("key file", file),
            ("padded", format!("  {key}\n\n")),
        ] {
            let parsed = parse_identity(&text);
            assert!(
                parsed
                    .as_ref()
                    .is_ok_and(|i| identity_matches(i, &recipient)),
                "{case}"
            );
            assert!(
                parsed.is_ok_and(|i| !identity_matches(&i, &other)),
                "{case}"
            );
        }
        let err = parse_identity("AGE-SECRET-KEY-1SECRETISH")
            .err()
            .unwrap_or_default();
        assert!(!err.contains("SECRETISH"), "{err}");
        assert!(parse_identity("# only a comment\n").is_err());
    }
}
