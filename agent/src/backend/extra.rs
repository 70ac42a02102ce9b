//! Vendor options (`options.extra`): a typed allow-list per backend.
//!
//! `options.extra` is a map of strings that a pod (or a workload's
//! `compile.extra`) sends. A worker backend's `manifest.json` declares under
//! `extra_options` the keys it takes and their types; the agent refuses any
//! other key, and any value that does not parse as its type or lies outside
//! its range, before a compile starts. Workers convert the (checked) strings
//! by the same declarations (`workers/common/rm_worker.py`, `typed_extras`),
//! so a vendor SDK never sees a key or a string it was not meant to.
//!
//! `trust_remote_code` is special: it makes the compile import and run Python
//! code from the model repository as the agent's user. A manifest may list
//! it (as a `bool`), and the agent then still refuses it unless the cluster
//! operator started it with `--allow-trust-remote-code`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The extra option that runs the model repository's own code.
pub const TRUST_REMOTE_CODE: &str = "trust_remote_code";
/// The flag that allows it, and its environment variable. The agent also
/// sets the variable (`1` or `0`) in every worker's environment, so the
/// worker checks the same decision.
pub const ALLOW_TRUST_REMOTE_CODE_FLAG: &str = "--allow-trust-remote-code";
pub const ALLOW_TRUST_REMOTE_CODE_ENV: &str = "RM_ALLOW_TRUST_REMOTE_CODE";
/// Longest value of a `string` option whose declaration gives no `max_len`.
pub const STRING_MAX_LEN: usize = 256;
/// Longest value quoted back in an error message.
const QUOTE_MAX: usize = 64;

/// One key a backend takes in `options.extra`, as a manifest declares it:
/// `{"type": "int", "min": 1, "max": 8, "doc": "..."}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ExtraOption {
    /// A decimal integer (`-?[0-9]+`), within `min..=max` when given.
    Int {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<i64>,
        #[serde(default)]
        doc: String,
    },
    /// A finite decimal number, within `min..=max` when given.
    Float {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<f64>,
        #[serde(default)]
        doc: String,
    },
    /// `true` or `false`.
    Bool {
        #[serde(default)]
        doc: String,
    },
    /// Exactly one of `values`.
    Enum {
        values: Vec<String>,
        #[serde(default)]
        doc: String,
    },
    /// Printable text of at most `max_len` characters (default
    /// [`STRING_MAX_LEN`]). Prefer `enum`: a free string reaches the SDK.
    String {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_len: Option<usize>,
        #[serde(default)]
        doc: String,
    },
}

/// A backend's declarations, by key.
pub type ExtraOptions = BTreeMap<String, ExtraOption>;

impl ExtraOption {
    /// The type and its bounds, for messages: `int 1..=8`, `bool`.
    pub fn describe(&self) -> String {
        fn range<T: std::fmt::Display>(t: &str, min: &Option<T>, max: &Option<T>) -> String {
            match (min, max) {
                (Some(a), Some(b)) => format!("{t} {a}..={b}"),
                (Some(a), None) => format!("{t} >= {a}"),
                (None, Some(b)) => format!("{t} <= {b}"),
                (None, None) => t.to_string(),
            }
        }
        match self {
            ExtraOption::Int { min, max, .. } => range("int", min, max),
            ExtraOption::Float { min, max, .. } => range("float", min, max),
            ExtraOption::Bool { .. } => "bool".into(),
            ExtraOption::Enum { values, .. } => format!("one of {}", values.join("|")),
            ExtraOption::String { max_len, .. } => format!(
                "string of at most {} characters",
                max_len.unwrap_or(STRING_MAX_LEN)
            ),
        }
    }

    /// Checks one value; the error says what is wrong with it.
    pub fn check_value(&self, v: &str) -> Result<(), String> {
        match self {
            ExtraOption::Int { min, max, .. } => {
                let digits = v.strip_prefix('-').unwrap_or(v);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err("is not an integer".into());
                }
                let n: i64 = v
                    .parse()
                    .map_err(|_| "is not an integer of 64 bits".to_string())?;
                if let Some(m) = min.filter(|m| n < *m) {
                    return Err(format!("is below the minimum {m}"));
                }
                if let Some(m) = max.filter(|m| n > *m) {
                    return Err(format!("is above the maximum {m}"));
                }
                Ok(())
            }
            ExtraOption::Float { min, max, .. } => {
                // Decimal notation only: no "inf", "nan" or hex.
                let ok_chars = !v.is_empty()
                    && v.bytes().all(|b| {
                        b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E')
                    });
                let n: f64 = match v.parse() {
                    Ok(n) if ok_chars && f64::is_finite(n) => n,
                    _ => return Err("is not a finite decimal number".into()),
                };
                if let Some(m) = min.filter(|m| n < *m) {
                    return Err(format!("is below the minimum {m}"));
                }
                if let Some(m) = max.filter(|m| n > *m) {
                    return Err(format!("is above the maximum {m}"));
                }
                Ok(())
            }
            ExtraOption::Bool { .. } => match v {
                "true" | "false" => Ok(()),
                _ => Err("is not true or false".into()),
            },
            ExtraOption::Enum { values, .. } => {
                if values.iter().any(|x| x == v) {
                    Ok(())
                } else {
                    Err(format!("is not one of {}", values.join(", ")))
                }
            }
            ExtraOption::String { max_len, .. } => {
                let max = max_len.unwrap_or(STRING_MAX_LEN);
                if v.chars().count() > max {
                    Err(format!("is longer than {max} characters"))
                } else if v.chars().any(char::is_control) {
                    Err("contains control characters".into())
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Checks the declaration itself (from a manifest).
    fn check_decl(&self) -> Result<(), String> {
        match self {
            ExtraOption::Int {
                min: Some(a),
                max: Some(b),
                ..
            } if a > b => Err(format!("min {a} is above max {b}")),
            ExtraOption::Float { min, max, .. } => {
                if min.is_some_and(|m| !m.is_finite()) || max.is_some_and(|m| !m.is_finite()) {
                    return Err("min and max must be finite".into());
                }
                match (min, max) {
                    (Some(a), Some(b)) if a > b => Err(format!("min {a} is above max {b}")),
                    _ => Ok(()),
                }
            }
            ExtraOption::Enum { values, .. } => {
                if values.is_empty() {
                    return Err("an enum needs at least one value".into());
                }
                let mut seen = std::collections::BTreeSet::new();
                match values.iter().find(|v| !seen.insert(v.as_str())) {
                    Some(v) => Err(format!("value {v:?} is listed twice")),
                    None => Ok(()),
                }
            }
            ExtraOption::String {
                max_len: Some(0), ..
            } => Err("max_len must be at least 1".into()),
            _ => Ok(()),
        }
    }
}

/// Checks a manifest's `extra_options`: sensible key names, consistent
/// bounds, and `trust_remote_code` (if listed) declared as a `bool`.
pub fn check_declarations(options: &ExtraOptions) -> Result<(), String> {
    for (key, decl) in options {
        let name_ok = !key.is_empty()
            && key.len() <= 128
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !name_ok {
            return Err(format!(
                "extra_options key {key:?} is not a name of letters, digits, '_', '.' and '-'"
            ));
        }
        decl.check_decl()
            .map_err(|e| format!("extra_options {key:?}: {e}"))?;
        if key == TRUST_REMOTE_CODE && !matches!(decl, ExtraOption::Bool { .. }) {
            return Err(format!(
                "extra_options {TRUST_REMOTE_CODE:?} must be declared as {{\"type\": \"bool\"}}"
            ));
        }
    }
    Ok(())
}

/// The keys a request may use, with their types, for messages.
fn allowed_keys(options: &ExtraOptions, allow_trust_remote_code: bool) -> String {
    let keys: Vec<String> = options
        .iter()
        .filter(|(k, _)| allow_trust_remote_code || k.as_str() != TRUST_REMOTE_CODE)
        .map(|(k, d)| format!("{k} ({})", d.describe()))
        .collect();
    if keys.is_empty() {
        "none (this backend takes no extra options)".into()
    } else {
        keys.join(", ")
    }
}

fn quoted(v: &str) -> String {
    if v.chars().count() > QUOTE_MAX {
        let cut: String = v.chars().take(QUOTE_MAX).collect();
        format!("{cut:?}...")
    } else {
        format!("{v:?}")
    }
}

/// Checks a request's `options.extra` against a backend's declarations.
/// The error names the key, says what is wrong and lists the allowed keys.
pub fn validate_extra(
    backend: &str,
    options: &ExtraOptions,
    extra: &BTreeMap<String, String>,
    allow_trust_remote_code: bool,
) -> Result<(), String> {
    for (key, value) in extra {
        let Some(decl) = options.get(key) else {
            return Err(format!(
                "options.extra key {} is not an option of backend {backend}; allowed keys: {}",
                quoted(key),
                allowed_keys(options, allow_trust_remote_code)
            ));
        };
        if key == TRUST_REMOTE_CODE && !allow_trust_remote_code {
            return Err(format!(
                "options.extra key {TRUST_REMOTE_CODE:?} is refused on this node: it makes the \
                 compile import and run Python code from the model repository as the agent's \
                 user on the node (root, in a privileged container on accelerator nodes), so it \
                 is off unless the cluster operator starts the agent with \
                 {ALLOW_TRUST_REMOTE_CODE_FLAG} (env {ALLOW_TRUST_REMOTE_CODE_ENV}=true; Helm \
                 value agent.allowTrustRemoteCode=true), for trusted models only; allowed keys \
                 of backend {backend}: {}",
                allowed_keys(options, false)
            ));
        }
        decl.check_value(value).map_err(|why| {
            format!(
                "options.extra key {key:?}: the value {} {why} (expected {}); allowed keys of \
                 backend {backend}: {}",
                quoted(value),
                decl.describe(),
                allowed_keys(options, allow_trust_remote_code)
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decls(v: serde_json::Value) -> ExtraOptions {
        serde_json::from_value(v).expect("declarations parse")
    }

    fn extra(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn declarations_are_typed_and_strict() {
        let d = decls(serde_json::json!({
            "n": {"type": "int", "min": 1, "max": 8, "doc": "d"},
            "f": {"type": "float", "min": 0.0},
            "b": {"type": "bool"},
            "e": {"type": "enum", "values": ["a", "b"]},
            "s": {"type": "string", "max_len": 4}
        }));
        assert_eq!(d["n"].describe(), "int 1..=8");
        assert_eq!(d["f"].describe(), "float >= 0");
        assert_eq!(d["e"].describe(), "one of a|b");
        assert!(check_declarations(&d).is_ok());
        // Unknown fields and types are refused, so a typo is not a silent no-op.
        for bad in [
            serde_json::json!({"x": {"type": "int", "minimum": 1}}),
            serde_json::json!({"x": {"type": "bool", "min": 1}}),
            serde_json::json!({"x": {"type": "list"}}),
            serde_json::json!({"x": {"type": "enum"}}),
            serde_json::json!({"x": {"min": 1}}),
        ] {
            assert!(
                serde_json::from_value::<ExtraOptions>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        for bad in [
            serde_json::json!({"x": {"type": "int", "min": 9, "max": 1}}),
            serde_json::json!({"x": {"type": "enum", "values": []}}),
            serde_json::json!({"x": {"type": "enum", "values": ["a", "a"]}}),
            serde_json::json!({"x y": {"type": "bool"}}),
            serde_json::json!({"trust_remote_code": {"type": "string"}}),
        ] {
            assert!(check_declarations(&decls(bad.clone())).is_err(), "{bad}");
        }
    }

    #[test]
    fn values_parse_as_their_type_and_range() {
        let int = ExtraOption::Int {
            min: Some(1),
            max: Some(8),
            doc: String::new(),
        };
        assert!(int.check_value("8").is_ok());
        assert!(int.check_value("0").unwrap_err().contains("minimum 1"));
        assert!(int.check_value("9").unwrap_err().contains("maximum 8"));
        for bad in ["", "-", "1.0", " 1", "0x4", "1e3", "99999999999999999999"] {
            assert!(int.check_value(bad).is_err(), "{bad:?}");
        }
        let float = ExtraOption::Float {
            min: Some(0.0),
            max: None,
            doc: String::new(),
        };
        assert!(float.check_value("0.5").is_ok());
        assert!(float.check_value("-0.5").is_err());
        for bad in ["nan", "inf", "1e999", "", "0x1p3", "one"] {
            assert!(float.check_value(bad).is_err(), "{bad:?}");
        }
        let b = ExtraOption::Bool { doc: String::new() };
        assert!(b.check_value("true").is_ok() && b.check_value("false").is_ok());
        for bad in ["True", "1", "yes", ""] {
            assert!(b.check_value(bad).is_err(), "{bad:?}");
        }
        let s = ExtraOption::String {
            max_len: Some(3),
            doc: String::new(),
        };
        assert!(s.check_value("abc").is_ok());
        assert!(s.check_value("abcd").is_err());
        assert!(s.check_value("a\n").is_err());
    }

    #[test]
    fn trust_remote_code_needs_the_operator_and_the_manifest() {
        let d = decls(serde_json::json!({
            "trust_remote_code": {"type": "bool"},
            "n": {"type": "int"}
        }));
        let e = extra(&[("trust_remote_code", "true")]);
        let err = validate_extra("furiosa", &d, &e, false).unwrap_err();
        assert!(err.contains("\"trust_remote_code\""), "{err}");
        assert!(err.contains("--allow-trust-remote-code"), "{err}");
        assert!(err.contains("RM_ALLOW_TRUST_REMOTE_CODE"), "{err}");
        assert!(err.contains("model repository"), "{err}");
        // Not offered while off.
        assert!(
            err.contains("allowed keys of backend furiosa: n (int)"),
            "{err}"
        );
        assert!(validate_extra("furiosa", &d, &e, true).is_ok());
        let err =
            validate_extra("furiosa", &d, &extra(&[("trust_remote_code", "1")]), true).unwrap_err();
        assert!(err.contains("not true or false"), "{err}");
        // Enabled on the node but not listed by the backend: an unknown key.
        let none = ExtraOptions::new();
        let err = validate_extra("rbln", &none, &e, true).unwrap_err();
        assert!(err.contains("not an option of backend rbln"), "{err}");
        assert!(err.contains("none"), "{err}");
    }
}
