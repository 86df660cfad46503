//! Secrets out of the configuration file: `${NAME}` in any string value is replaced by the
//! environment variable `NAME`, and `${file:/path}` by that file's contents (one trailing
//! newline removed), so a ConfigMap holds references and the values come from a Secret
//! mounted as environment or files. `$${` writes a literal `${`.

use serde_json::Value;

/// Expands every string of the document in place, and returns every problem at once, each
/// as `key.path: message` (never the value, which may be a secret).
pub fn expand(value: &mut Value, lookup: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
    let mut errors = Vec::new();
    walk(value, &mut String::new(), lookup, &mut errors);
    errors
}

/// The process environment as the lookup.
pub fn from_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn walk(
    value: &mut Value,
    path: &mut String,
    lookup: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<String>,
) {
    let len = path.len();
    match value {
        Value::String(text) if text.contains("${") => match expand_str(text, lookup) {
            Ok(expanded) => *text = expanded,
            Err(e) => errors.push(format!("{path}: {e}")),
        },
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push_str(&format!("[{i}]"));
                walk(item, path, lookup, errors);
                path.truncate(len);
            }
        }
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                walk(item, path, lookup, errors);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

fn expand_str(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let end = after
                .find('}')
                .ok_or_else(|| "`${` without a closing `}`".to_owned())?;
            let reference = &after[..end];
            out.push_str(&resolve(reference, lookup)?);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn resolve(reference: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    if let Some(path) = reference.strip_prefix("file:") {
        let mut text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read ${{file:{path}}}: {e}"))?;
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        return Ok(text);
    }
    if reference.is_empty()
        || !reference
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(format!(
            "${{{reference}}} is not a reference: use ${{NAME}} (letters, digits, _) or ${{file:/path}}"
        ));
    }
    lookup(reference)
        .ok_or_else(|| format!("${{{reference}}}: the environment variable is not set"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn env(name: &str) -> Option<String> {
        (name == "RABBIT_PW").then(|| "s3cret".to_owned())
    }

    #[test]
    fn references_expand_from_the_environment_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kafka-password");
        std::fs::write(&file, "from-a-file\n").unwrap();
        let mut doc = json!({
            "sinks": [
                {"uri": "amqp://app:${RABBIT_PW}@rabbit:5672/%2f"},
                {"properties": {"sasl.password": format!("${{file:{}}}", file.display())}},
                {"subject": "literal $${NOT_EXPANDED} and a lone $ sign"}
            ],
            "port": 8080
        });
        assert!(expand(&mut doc, &env).is_empty());
        assert_eq!(doc["sinks"][0]["uri"], "amqp://app:s3cret@rabbit:5672/%2f");
        assert_eq!(
            doc["sinks"][1]["properties"]["sasl.password"],
            "from-a-file"
        );
        assert_eq!(
            doc["sinks"][2]["subject"],
            "literal ${NOT_EXPANDED} and a lone $ sign"
        );
        assert_eq!(doc["port"], 8080);
    }

    /// Every bad reference is reported at once, by key, and no value is echoed.
    #[test]
    fn bad_references_name_the_key() {
        let mut doc = json!({
            "twilio": {"shared_keys": {"k": "${MISSING}"}},
            "sinks": [{"password": "${file:/nonexistent/pw}"}, {"uri": "x${RABBIT_PW"}, {"a": "${bad-name}"}]
        });
        let errors = expand(&mut doc, &env).join("\n");
        for expected in [
            "twilio.shared_keys.k: ${MISSING}: the environment variable is not set",
            "sinks[0].password: cannot read ${file:/nonexistent/pw}",
            "sinks[1].uri: `${` without a closing `}`",
            "sinks[2].a: ${bad-name} is not a reference",
        ] {
            assert!(
                errors.contains(expected),
                "missing {expected:?} in:\n{errors}"
            );
        }
        assert!(!errors.contains("s3cret"));
    }
}
