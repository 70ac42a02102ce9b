//! Chat templates: a model's own Jinja template, rendered the way
//! transformers' `apply_chat_template` does (`trim_blocks`, `lstrip_blocks`,
//! loop controls, `raise_exception`, `strftime_now`, a `tojson` that writes
//! Python's `json.dumps`, Python string and dict methods), so that a chat
//! sent to the agent becomes the same text, and the same token ids, as in
//! transformers. Pure functions over the template and the messages; the
//! service finds the template (tokenizer config or GGUF metadata).

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(
        "this model has no chat template (none in tokenizer_config.json, chat_template.jinja or the GGUF's tokenizer.chat_template); send \"prompt\" or \"input_ids\" instead of \"messages\""
    )]
    NoTemplate,
    #[error(
        "the model's chat_template is a list of named templates without one named \"default\" (names: {0})"
    )]
    NoDefault(String),
    #[error("the model's chat template cannot be compiled: {0}")]
    Syntax(String),
    #[error("the model's chat template refused these messages: {0}")]
    Render(String),
    #[error("{0}")]
    BadMessages(String),
}

impl ChatError {
    /// 400 for what the caller sent or chose (a model without a template);
    /// 422 for a template this engine cannot read.
    pub fn http_status(&self) -> u16 {
        match self {
            ChatError::Syntax(_) | ChatError::NoDefault(_) => 422,
            _ => 400,
        }
    }
}

/// A model's chat template and the special tokens it may name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatTemplate {
    pub source: String,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

/// A token in `tokenizer_config.json`: a string, or an AddedToken object.
fn token_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(m) => m.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The template in transformers' `chat_template` field: a string, or a list
/// of `{"name", "template"}` of which "default" is used.
pub fn pick_template(v: &Json) -> Result<Option<String>, ChatError> {
    match v {
        Json::String(s) => Ok(Some(s.clone())),
        Json::Array(list) => {
            let named: Vec<(&str, &str)> = list
                .iter()
                .filter_map(|t| Some((t.get("name")?.as_str()?, t.get("template")?.as_str()?)))
                .collect();
            match named.iter().find(|(n, _)| *n == "default") {
                Some((_, t)) => Ok(Some((*t).to_string())),
                None if named.is_empty() => Ok(None),
                None => Err(ChatError::NoDefault(
                    named.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
                )),
            }
        }
        _ => Ok(None),
    }
}

impl ChatTemplate {
    /// From a HuggingFace directory's files, as transformers reads them: a
    /// `chat_template.jinja` file wins over `chat_template.json`, which wins
    /// over `tokenizer_config.json`'s `chat_template`. The special tokens come
    /// from `tokenizer_config.json`.
    pub fn from_hf_files(
        tokenizer_config: Option<&Json>,
        chat_template_jinja: Option<String>,
        chat_template_json: Option<&Json>,
    ) -> Result<Option<Self>, ChatError> {
        let source = match chat_template_jinja {
            Some(s) => Some(s),
            None => match chat_template_json.and_then(|j| j.get("chat_template")) {
                Some(t) => pick_template(t)?,
                None => match tokenizer_config.and_then(|c| c.get("chat_template")) {
                    Some(t) => pick_template(t)?,
                    None => None,
                },
            },
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let tok = |name: &str| token_text(tokenizer_config.and_then(|c| c.get(name)));
        Ok(Some(ChatTemplate {
            source,
            bos_token: tok("bos_token"),
            eos_token: tok("eos_token"),
            unk_token: tok("unk_token"),
            pad_token: tok("pad_token"),
        }))
    }

    /// The text of the conversation, as `apply_chat_template(messages,
    /// tokenize=False, add_generation_prompt=...)` gives it.
    pub fn render(
        &self,
        messages: &[Json],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        check_messages(messages)?;
        let env = environment();
        let tmpl = env
            .template_from_str(&self.source)
            .map_err(|e| ChatError::Syntax(describe(&e)))?;
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), Json::Array(messages.to_vec()));
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(add_generation_prompt),
        );
        // transformers passes these explicitly as None: `tools is defined`
        // holds there, and must here.
        ctx.insert("tools".into(), Json::Null);
        ctx.insert("documents".into(), Json::Null);
        for (name, v) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("unk_token", &self.unk_token),
            ("pad_token", &self.pad_token),
        ] {
            if let Some(v) = v {
                ctx.insert(name.into(), Json::String(v.clone()));
            }
        }
        tmpl.render(Value::from(minijinja::value::Serde(&ctx)))
            .map_err(|e| ChatError::Render(describe(&e)))
    }
}

/// Every message an object with a string `role`; content is the
/// template's business (a string, a list of parts, or null with tool calls).
pub fn check_messages(messages: &[Json]) -> Result<(), ChatError> {
    if messages.is_empty() {
        return Err(ChatError::BadMessages(
            "\"messages\" must hold at least one message".into(),
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        if !m.get("role").is_some_and(Json::is_string) {
            return Err(ChatError::BadMessages(format!(
                "messages[{i}] must be an object with a string \"role\" (and usually \"content\")"
            )));
        }
    }
    Ok(())
}

/// The error's own words, with the template's line where minijinja knows it.
fn describe(e: &Error) -> String {
    let mut s = match e.detail() {
        Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        s.push_str(&format!(" (template line {line})"));
    }
    s
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    // transformers' ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
    {
        env.set_syntax(syntax);
    }
    // Python's str/dict/list methods (`.strip()`, `.items()`, `.startswith()`)
    // that HF templates call.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> Result<String, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(strftime(&format, secs))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Python's `datetime.now().strftime` in UTC for the directives templates
/// use (Llama 3.x writes "%d %b %Y"); others are kept as written.
pub fn strftime(format: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let m = (month - 1) as usize;
    let (h, min, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('-') => match chars.next() {
                Some('d') => out.push_str(&day.to_string()),
                Some('m') => out.push_str(&month.to_string()),
                Some(o) => out.push_str(&format!("%-{o}")),
                None => out.push_str("%-"),
            },
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&MONTHS[m][..3]),
            Some('B') => out.push_str(MONTHS[m]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{min:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=...)`,
/// whose separators (", " and ": ") differ from serde's compact form.
fn tojson(v: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    py_json(&v, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn py_json(v: &Value, indent: Option<usize>, level: usize, out: &mut String) -> Result<(), Error> {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&v.to_string()),
        ValueKind::String => {
            let s = v.as_str().unwrap_or_default();
            out.push_str(
                &serde_json::to_string(s)
                    .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?,
            );
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                py_json(item, indent, level + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, level);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                py_json(&Value::from(k.to_string()), indent, level + 1, out)?;
                out.push_str(": ");
                py_json(&v.get_item(k)?, indent, level + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, level);
            }
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson cannot serialize a {} value", v.kind()),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// SmolLM2-Instruct's template (from its tokenizer_config.json).
    pub const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn t(source: &str) -> ChatTemplate {
        ChatTemplate {
            source: source.into(),
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            ..Default::default()
        }
    }

    #[test]
    fn smollm2_template_renders_as_transformers() {
        let msgs = [json!({"role": "user", "content": "Hi"})];
        let s = t(SMOLLM2).render(&msgs, true).expect("renders");
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let s = t(SMOLLM2).render(&msgs, false).expect("renders");
        assert!(s.ends_with("Hi<|im_end|>\n"), "{s}");
    }

    #[test]
    fn trim_blocks_loop_controls_and_python_methods() {
        let src = "{{ bos_token }}{% for m in messages %}\n  {% if m.role == 'system' %}{% continue %}{% endif %}\n{{ m.role | upper }}: {{ m.content.strip() }}\n{% if loop.index > 2 %}{% break %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}";
        let msgs = [
            json!({"role": "system", "content": "be brief"}),
            json!({"role": "user", "content": "  one  "}),
            json!({"role": "assistant", "content": "two"}),
            json!({"role": "user", "content": "three"}),
        ];
        let s = t(src).render(&msgs, true).expect("renders");
        assert_eq!(s, "<s>USER: one\nASSISTANT: two\nASSISTANT:");
    }

    #[test]
    fn raise_exception_is_a_refusal_with_its_message() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must start with user') }}{% endif %}x";
        let e = t(src)
            .render(&[json!({"role": "assistant", "content": "a"})], true)
            .expect_err("refused");
        assert_eq!(e.http_status(), 400);
        assert!(
            e.to_string()
                .contains("Conversation roles must start with user"),
            "{e}"
        );
    }

    #[test]
    fn tojson_writes_pythons_json_dumps() {
        let src = "{{ messages[0] | tojson }}|{{ [1, 'é', none] | tojson(indent=2) }}";
        let s = t(src)
            .render(&[json!({"role": "user", "content": "a\"<b>"})], false)
            .expect("renders");
        assert_eq!(
            s,
            "{\"content\": \"a\\\"<b>\", \"role\": \"user\"}|[\n  1,\n  \"é\",\n  null\n]"
        );
    }

    #[test]
    fn named_templates_use_default_and_tokens_may_be_objects() {
        let cfg = json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ bos_token }}"}],
                         "bos_token": {"content": "<bos>", "__type": "AddedToken"}});
        let c = ChatTemplate::from_hf_files(Some(&cfg), None, None)
            .expect("reads")
            .expect("has one");
        assert_eq!(
            c.render(&[json!({"role": "user", "content": ""})], true)
                .expect("ok"),
            "D<bos>"
        );
        let cfg = json!({"chat_template": [{"name": "tool_use", "template": "T"}]});
        assert!(matches!(
            ChatTemplate::from_hf_files(Some(&cfg), None, None),
            Err(ChatError::NoDefault(_))
        ));
        assert_eq!(
            ChatTemplate::from_hf_files(Some(&json!({})), None, None).expect("ok"),
            None
        );
        // chat_template.jinja wins.
        let c = ChatTemplate::from_hf_files(Some(&cfg), Some("J".into()), None)
            .expect("reads")
            .expect("has one");
        assert_eq!(c.source, "J");
    }

    #[test]
    fn messages_need_a_role_and_bad_templates_are_named() {
        assert!(t("x").render(&[], true).is_err());
        assert!(t("x").render(&[json!({"content": "a"})], true).is_err());
        let e = t("{% for %}")
            .render(&[json!({"role": "user"})], true)
            .expect_err("syntax");
        assert_eq!(e.http_status(), 422);
    }

    #[test]
    fn strftime_formats_dates_like_python() {
        // 2024-07-26 13:25:09 UTC, a Friday.
        let t = 1_722_000_309;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %-d, %H:%M:%S %%", t),
            "Friday July 26, 13:25:09 %"
        );
    }
}
