//! `-o json` and `-o yaml`: objects as kubectl prints them (managedFields
//! left out), lists as a `v1/List`.

use serde::Serialize;
use serde_json::Value;

use crate::cli::OutputFormat;
use crate::error::{Error, Result};

fn to_value(v: &impl Serialize) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::Encode {
        format: "json",
        message: e.to_string(),
    })
}

/// One object without `metadata.managedFields`.
pub fn object_value(v: &impl Serialize) -> Result<Value> {
    let mut value = to_value(v)?;
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    Ok(value)
}

/// Objects wrapped in a `v1/List`, as `kubectl get -o json` prints them.
pub fn list_value<T: Serialize>(items: &[T]) -> Result<Value> {
    let items = items.iter().map(object_value).collect::<Result<Vec<_>>>()?;
    Ok(serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "metadata": {"resourceVersion": ""},
        "items": items,
    }))
}

/// Plain data (rows of a table) as a JSON or YAML document.
pub fn data_value(v: &impl Serialize) -> Result<Value> {
    to_value(v)
}

/// The document, ending in a newline. `wide` is not an encoding; it falls
/// back to JSON (callers only pass json or yaml).
pub fn encode(value: &Value, format: OutputFormat) -> Result<String> {
    match format {
        OutputFormat::Yaml => serde_yaml::to_string(value).map_err(|e| Error::Encode {
            format: "yaml",
            message: e.to_string(),
        }),
        OutputFormat::Json | OutputFormat::Wide => serde_json::to_string_pretty(value)
            .map(|s| s + "\n")
            .map_err(|e| Error::Encode {
                format: "json",
                message: e.to_string(),
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn managed_fields_are_left_out_and_lists_are_v1_lists() {
        let obj = serde_json::json!({"metadata": {"name": "a", "managedFields": [{}]}, "spec": {}});
        let list = list_value(&[obj]).unwrap();
        assert_eq!(list["kind"], "List");
        assert!(list["items"][0]["metadata"].get("managedFields").is_none());
        let yaml = encode(&list, OutputFormat::Yaml).unwrap();
        assert!(yaml.starts_with("apiVersion: v1\n"), "{yaml}");
    }
}
