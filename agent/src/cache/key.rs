//! The cache key: a pure function of what determines a compiled artifact.

use std::fmt;
use std::str::FromStr;

use rm_crds::{CompileOptions, DeviceType};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Everything that changes the compiled artifact. Two requests with equal
/// inputs share one cache entry; any difference is a different entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyInputs {
    /// `sha256:<hex>` of the model's content (see `source::ModelDigest`).
    pub model_digest: String,
    pub backend: String,
    pub compiler_version: String,
    pub device_type: DeviceType,
    pub options: CompileOptions,
}

/// Hex SHA-256 of the canonical JSON of [`KeyInputs`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CacheKey(String);

/// A string that is not a cache key.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a cache key: expected 64 lowercase hex digits as returned by /v1/prepare")]
pub struct BadCacheKey(pub String);

/// The canonical form of compile options: JSON with a fixed field order,
/// unset fields left out and `extra` sorted (it is a `BTreeMap`), so equal
/// options always give equal bytes.
pub fn canonical_options(options: &CompileOptions) -> String {
    // Serialising a plain struct with a BTreeMap cannot fail.
    serde_json::to_string(options).unwrap_or_default()
}

impl CacheKey {
    pub fn derive(inputs: &KeyInputs) -> CacheKey {
        let mut h = Sha256::new();
        h.update(b"rm-agent cache key v1\n");
        for part in [
            inputs.model_digest.as_str(),
            inputs.backend.as_str(),
            inputs.compiler_version.as_str(),
            inputs.device_type.as_str(),
            canonical_options(&inputs.options).as_str(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        CacheKey(hex(&h.finalize()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CacheKey {
    type Err = BadCacheKey;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(CacheKey(s.to_string()))
        } else {
            Err(BadCacheKey(s.to_string()))
        }
    }
}

impl TryFrom<String> for CacheKey {
    type Error = BadCacheKey;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<CacheKey> for String {
    fn from(k: CacheKey) -> String {
        k.0
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rm_crds::Precision;

    fn inputs() -> KeyInputs {
        KeyInputs {
            model_digest: "sha256:abc".into(),
            backend: "cpu".into(),
            compiler_version: "candle-0.11.1".into(),
            device_type: DeviceType::Cpu,
            options: CompileOptions::default(),
        }
    }

    #[test]
    fn equal_inputs_give_equal_keys() {
        assert_eq!(CacheKey::derive(&inputs()), CacheKey::derive(&inputs()));
    }

    #[test]
    fn every_input_changes_the_key() {
        let base = CacheKey::derive(&inputs());
        let mut i = inputs();
        i.options.precision = Some(Precision::Q8_0);
        assert_ne!(CacheKey::derive(&i), base);
        let mut i = inputs();
        i.options.extra.insert("a".into(), "b".into());
        assert_ne!(CacheKey::derive(&i), base);
        let mut i = inputs();
        i.compiler_version = "candle-0.12".into();
        assert_ne!(CacheKey::derive(&i), base);
        let mut i = inputs();
        i.device_type = DeviceType::Gpu;
        assert_ne!(CacheKey::derive(&i), base);
        let mut i = inputs();
        i.model_digest = "sha256:abd".into();
        assert_ne!(CacheKey::derive(&i), base);
    }

    #[test]
    fn extra_order_does_not_matter() {
        let mut a = inputs();
        a.options.extra.insert("x".into(), "1".into());
        a.options.extra.insert("y".into(), "2".into());
        let mut b = inputs();
        b.options.extra.insert("y".into(), "2".into());
        b.options.extra.insert("x".into(), "1".into());
        assert_eq!(CacheKey::derive(&a), CacheKey::derive(&b));
    }

    #[test]
    fn parses_only_hex_keys() {
        let k = CacheKey::derive(&inputs());
        assert_eq!(k.as_str().parse::<CacheKey>().ok(), Some(k));
        assert!("../etc".parse::<CacheKey>().is_err());
        assert!("ABC".parse::<CacheKey>().is_err());
    }
}
