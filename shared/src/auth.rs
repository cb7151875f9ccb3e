//! Bearer keys: [`ApiKeys`] parses the development keys (`user:role:secret`) and the hashed
//! production key file (`user:role:sha256hex`), and answers which principal a presented secret
//! belongs to. Keys are held only as SHA-256 digests.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::domain::{Principal, Role, UserId};

/// Bearer keys known to the api, held only as SHA-256 digests so that no secret stays in memory
/// longer than parsing takes and a key file never needs to hold one.
#[derive(Clone, Default)]
pub struct ApiKeys {
    by_digest: HashMap<[u8; 32], Principal>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.by_digest.len())
    }
}

impl ApiKeys {
    /// Parses "user:role:secret,user:role:secret".
    pub fn parse_plain(raw: &str) -> Result<Self, String> {
        let mut keys = Self::default();
        for (index, entry) in raw
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let (principal, secret) =
                parse_entry(entry).map_err(|message| format!("entry {} {message}", index + 1))?;
            if keys
                .by_digest
                .insert(Sha256::digest(secret.as_bytes()).into(), principal)
                .is_some()
            {
                return Err(format!(
                    "entry {}: the same secret is listed twice (each key must be unique)",
                    index + 1
                ));
            }
        }
        Ok(keys)
    }

    /// Parses lines of "user:role:sha256hex"; blank lines and '#' comments are skipped.
    pub fn parse_hashed(text: &str) -> Result<Self, String> {
        let mut keys = Self::default();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (principal, hex) =
                parse_entry(line).map_err(|message| format!("line {} {message}", number + 1))?;
            let digest = decode_hex32(hex).ok_or_else(|| {
                format!(
                    "line {}: the digest must be 64 hexadecimal characters",
                    number + 1
                )
            })?;
            if keys.by_digest.insert(digest, principal).is_some() {
                return Err(format!(
                    "line {}: the same digest is listed twice (each key must be unique)",
                    number + 1
                ));
            }
        }
        Ok(keys)
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// The principal a bearer secret belongs to, if any.
    pub fn authenticate(&self, secret: &str) -> Option<&Principal> {
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        self.by_digest.get(&digest)
    }
}

fn parse_entry(entry: &str) -> Result<(Principal, &str), String> {
    let mut parts = entry.splitn(3, ':');
    let (Some(user), Some(role), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("must look like user:role:secret".to_string());
    };
    let user = UserId::parse(user).map_err(|error| format!(": {error}"))?;
    let role = match role {
        "user" => Role::User,
        "ops" => Role::Ops,
        other => return Err(format!(": unknown role {other:?} (use user or ops)")),
    };
    if secret.is_empty() {
        return Err(": the secret is empty".to_string());
    }
    Ok((Principal { user, role }, secret))
}

fn decode_hex32(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (index, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_authenticate_by_secret_and_carry_role() {
        let keys = ApiKeys::parse_plain("alice:user:SECRET,ops:ops:SECRET3").unwrap();
        let alice = keys.authenticate("SECRET").unwrap();
        assert_eq!(alice.user.as_str(), "alice");
        assert_eq!(alice.role, Role::User);
        assert_eq!(keys.authenticate("SECRET3").unwrap().role, Role::Ops);
        assert!(keys.authenticate("nope").is_none());
    }

    #[test]
    fn a_key_listed_twice_is_refused_whatever_its_user() {
        let error = ApiKeys::parse_plain("alice:user:same,bob:ops:same").unwrap_err();
        assert!(error.contains("entry 2"), "{error}");
        let digest = format!("{:x}", Sha256::digest(b"s3cret"));
        let error =
            ApiKeys::parse_hashed(&format!("bob:user:{digest}\ncarol:ops:{digest}\n")).unwrap_err();
        assert!(error.contains("line 2"), "{error}");
    }

    #[test]
    fn hashed_key_file_accepts_the_digest_of_the_secret() {
        let digest = format!("{:x}", Sha256::digest(b"s3cret"));
        let keys = ApiKeys::parse_hashed(&format!("# prod\nbob:user:{digest}\n")).unwrap();
        assert_eq!(keys.authenticate("s3cret").unwrap().user.as_str(), "bob");
        assert!(ApiKeys::parse_hashed("bob:user:abc").is_err());
    }
}
