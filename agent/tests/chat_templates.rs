//! Chats through the model's own template (issue 19): `/v1/render` and
//! `/v1/generate` with `messages`, on a GGUF whose metadata carries the
//! template and on a safetensors directory whose tokenizer_config.json does
//! (the list-of-named-templates form). The tiny models' vocabulary is one
//! token per byte, so the expected ids are the rendered text's bytes.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Agent, Md, byte_token, tiny_gguf, tiny_llama};
use serde_json::{Value, json};

/// A system message, loop controls and Python string methods: what real
/// templates use.
const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}[SYS]{{ m.content.strip() }}\n{% continue %}{% endif %}\n{{ m.role }}: {{ m.content }}\n{% if loop.index > 3 %}{% break %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";

fn chat() -> Value {
    json!([
        {"role": "system", "content": "  be brief  "},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "Go"},
        {"role": "assistant", "content": "never shown"},
    ])
}

fn prepared(agent: &Agent, path: &std::path::Path) -> String {
    let reg = agent.post("/v1/models", json!({"source": {"path": path}}));
    assert_eq!(reg.status, 200, "{}", String::from_utf8_lossy(&reg.body));
    let p = agent.post(
        "/v1/prepare",
        json!({"model": reg.json()["model"], "device": "cpu"}),
    );
    assert_eq!(p.status, 200, "{}", String::from_utf8_lossy(&p.body));
    p.json()["key"].as_str().unwrap().to_string()
}

fn bytes_of(s: &str) -> Vec<u64> {
    s.bytes().map(u64::from).collect()
}

#[test]
fn a_gguf_chat_is_rendered_with_its_template_and_generated_from_those_ids() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), None, &["--min-free-disk", "0"]);
    // BOS and EOS are control tokens, as in real GGUFs: the template's
    // bos_token text becomes the one id.
    let mut types = vec![1i32; common::TINY_VOCAB];
    types[1] = 3;
    types[2] = 3;
    let gguf = tiny_gguf()
        .set("tokenizer.ggml.token_type", Md::I32s(types))
        .set("tokenizer.chat_template", Md::Str(TEMPLATE.into()))
        .write(&dir.path().join("chat.gguf"));
    let key = prepared(&agent, &gguf);

    let r = agent.post("/v1/render", json!({"key": key, "messages": chat()}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // bos_token is the GGUF's token 1, as transformers reads it.
    let want = format!(
        "{}[SYS]be brief\nuser: Hi\nassistant: Yo\nuser: Go\nassistant:",
        byte_token(1)
    );
    assert_eq!(r.json()["prompt"], json!(want));
    let mut ids = vec![1u64];
    ids.extend(bytes_of(&want[byte_token(1).len()..]));
    assert_eq!(r.json()["input_ids"], json!(ids));

    let r = agent.post(
        "/v1/render",
        json!({"key": key, "messages": chat(), "add_generation_prompt": false}),
    );
    assert!(r.json()["prompt"].as_str().unwrap().ends_with("Go\n"));

    let g = agent.post(
        "/v1/generate",
        json!({"key": key, "device": "cpu", "messages": chat(), "max_new_tokens": 3, "ignore_eos": true}),
    );
    assert_eq!(g.status, 200, "{}", String::from_utf8_lossy(&g.body));
    assert_eq!(g.json()["usage"]["prompt_tokens"], json!(ids.len()));
    assert_eq!(g.json()["usage"]["completion_tokens"], json!(3));
    // The same ids sent directly give the same greedy tokens.
    let direct = agent.post(
        "/v1/generate",
        json!({"key": key, "device": "cpu", "input_ids": ids, "max_new_tokens": 3, "ignore_eos": true}),
    );
    assert_eq!(
        g.json()["outputs"][0]["token_ids"],
        direct.json()["outputs"][0]["token_ids"]
    );

    // Streaming takes messages too.
    let s = agent.post(
        "/v1/generate",
        json!({"key": key, "device": "cpu", "messages": chat(), "max_new_tokens": 2, "ignore_eos": true, "stream": true}),
    );
    let lines = s.lines();
    assert_eq!(lines.last().unwrap()["event"], "done");
    assert_eq!(lines.len(), 3);

    // messages are exclusive with the other prompt fields; a message needs a role.
    let e = agent.post(
        "/v1/generate",
        json!({"key": key, "device": "cpu", "messages": chat(), "prompt": "x"}),
    );
    assert_eq!(e.status, 400);
    let e = agent.post(
        "/v1/render",
        json!({"key": key, "messages": [{"content": "x"}]}),
    );
    assert_eq!(e.status, 400);
    assert!(e.message().contains("role"), "{}", e.message());
}

#[test]
fn a_model_without_a_template_is_refused_with_400_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), None, &["--min-free-disk", "0"]);
    let gguf = tiny_gguf().write(&dir.path().join("plain.gguf"));
    let key = prepared(&agent, &gguf);
    let r = agent.post("/v1/render", json!({"key": key, "messages": chat()}));
    assert_eq!(r.status, 400);
    assert!(r.message().contains("no chat template"), "{}", r.message());
    let g = agent.post(
        "/v1/generate",
        json!({"key": key, "device": "cpu", "messages": chat()}),
    );
    assert_eq!(g.status, 400);
    assert!(g.message().contains("no chat template"), "{}", g.message());
}

#[test]
fn a_safetensors_chat_uses_tokenizer_config_and_its_default_named_template() {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), None, &["--min-free-disk", "0"]);
    let model = dir.path().join("llama");
    tiny_llama(&model, 3);
    let vocab: tokenizers::models::bpe::Vocab =
        (0..=255u8).map(|b| (byte_token(b), u32::from(b))).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .unwrap();
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    tok.save(model.join("tokenizer.json"), false).unwrap();
    std::fs::write(
        model.join("tokenizer_config.json"),
        json!({
            "bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>",
            "chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": TEMPLATE}],
        })
        .to_string(),
    )
    .unwrap();
    let key = prepared(&agent, &model);
    let r = agent.post("/v1/render", json!({"key": key, "messages": chat()}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let want = "<s>[SYS]be brief\nuser: Hi\nassistant: Yo\nuser: Go\nassistant:";
    assert_eq!(r.json()["prompt"], json!(want));
    assert_eq!(r.json()["input_ids"], json!(bytes_of(want)));
    // A text prompt's ids, as a generate with "prompt" runs them.
    let r = agent.post("/v1/render", json!({"key": key, "prompt": "Hi!"}));
    assert_eq!(r.json()["input_ids"], json!(bytes_of("Hi!")));
    let g = agent.post(
        "/v1/generate",
        json!({"key": key, "device": "cpu", "messages": chat(), "max_new_tokens": 2}),
    );
    assert_eq!(g.status, 200, "{}", String::from_utf8_lossy(&g.body));
    assert_eq!(g.json()["usage"]["prompt_tokens"], json!(want.len()));
}
