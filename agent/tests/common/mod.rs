//! Test helpers: start the real `rm-agent` binary, speak HTTP/1.1 to its unix
//! socket the way a stdlib-only client would, and build a tiny random llama.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};

pub struct Agent {
    pub child: Child,
    pub socket: PathBuf,
    pub cache: PathBuf,
    pub state: PathBuf,
    pub plugins: Option<PathBuf>,
    pub extra_args: Vec<String>,
    /// `--model-path-allow`: the test's own directory unless a test says
    /// otherwise (the tests write their models there).
    pub model_roots: Vec<PathBuf>,
    /// Environment given to the agent (and so to its workers).
    pub env: Vec<(String, String)>,
    /// An address-space limit (`ulimit -v`) the agent runs under: where a
    /// test may make an agent allocate without bound (an agent without the
    /// defence under test), the allocation fails there instead of drawing
    /// on the machine's memory.
    pub address_space: Option<u64>,
}

pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn lines(&self) -> Vec<Value> {
        String::from_utf8_lossy(&self.body)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
    pub fn message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = body.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(std::str::from_utf8(&body[..pos]).unwrap().trim(), 16).unwrap();
        body = &body[pos + 2..];
        if size == 0 {
            break;
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
    out
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    try_request(socket, method, path, headers, body).expect("an HTTP answer")
}

/// [`request`], or `None` when no answer came (the agent is gone).
pub fn try_request(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<Reply> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(300))).ok()?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: rm-agent\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).ok()?;
    // The agent may answer before it reads the body (a refused upload, a
    // missing token) and close: its answer is still there to read.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    parse_reply(&raw)
}

/// Sends a `POST` and leaves the answer unread: the caller hangs up by
/// dropping the stream.
pub fn send_only(socket: &Path, token: &str, path: &str, body: &Value) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    let body = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: rm-agent\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

/// A metric's value from `GET /metrics` (0 when absent: never counted).
pub fn metric(agent: &Agent, name: &str) -> f64 {
    let r = agent.get("/metrics");
    let text = String::from_utf8_lossy(&r.body).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// An HTTP/1.1 answer as read off the socket; `None` when no whole head
/// arrived (the connection was reset before it).
pub fn parse_reply(raw: &[u8]) -> Option<Reply> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = &raw[split + 4..];
    Some(Reply {
        status,
        body: if chunked {
            dechunk(body)
        } else {
            body.to_vec()
        },
    })
}

/// The token every test request carries unless it says otherwise: an
/// `rm-abstract.io/agent` slot of pod `default/test`, as the device plugin
/// writes and binds it.
pub const TOKEN: &str = "test-default-slot-token";
/// The header that carries [`TOKEN`].
pub const AUTH: (&str, &str) = ("Authorization", "Bearer test-default-slot-token");

impl Agent {
    pub fn start(dir: &Path, plugins: Option<PathBuf>, extra_args: &[&str]) -> Agent {
        Agent::start_with_env(dir, plugins, extra_args, &[])
    }

    /// [`Agent::start`] under an address-space limit of `bytes`, with few
    /// threads and malloc arenas (each reserves address space) so that the
    /// limit means the same on a machine of many cores.
    pub fn start_limited(dir: &Path, bytes: u64) -> Agent {
        let mut a = Agent::new(
            dir,
            None,
            &["--cpu-threads", "2"],
            &[
                ("TOKIO_WORKER_THREADS", "2"),
                ("RAYON_NUM_THREADS", "2"),
                ("MALLOC_ARENA_MAX", "2"),
            ],
        );
        a.address_space = Some(bytes);
        a.spawn();
        a
    }

    /// [`Agent::start`] with environment variables for the agent.
    pub fn start_with_env(
        dir: &Path,
        plugins: Option<PathBuf>,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let mut a = Agent::new(dir, plugins, extra_args, env);
        a.spawn();
        a
    }

    /// The agent's settings, not yet started.
    fn new(
        dir: &Path,
        plugins: Option<PathBuf>,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let a = Agent {
            child: Command::new("true").spawn().unwrap(),
            socket: dir.join("run/agent.sock"),
            cache: dir.join("cache"),
            state: dir.join("state"),
            plugins,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            model_roots: vec![dir.to_path_buf()],
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            address_space: None,
        };
        std::fs::create_dir_all(a.state.join("tokens")).unwrap();
        a.add_slot_token(TOKEN, "default");
        a
    }

    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let bin = env!("CARGO_BIN_EXE_rm-agent");
        let mut cmd = match self.address_space {
            Some(bytes) => {
                // The shell sets the limit and execs the agent: same pid.
                let mut c = Command::new("/bin/sh");
                c.arg("-c")
                    .arg("ulimit -v \"$0\" && exec \"$@\"")
                    .arg((bytes >> 10).to_string())
                    .arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--cache-dir")
            .arg(&self.cache)
            .arg("--state-dir")
            .arg(&self.state);
        for root in &self.model_roots {
            cmd.arg("--model-path-allow").arg(root);
        }
        if let Some(p) = &self.plugins {
            cmd.arg("--plugin-dir").arg(p);
        }
        // The default free-disk floor (10G) is for nodes; a test's agent
        // writes a few MB, and how full the machine's disk is must not
        // decide its result. Tests of the floor pass their own.
        if !self
            .extra_args
            .iter()
            .any(|a| a.starts_with("--min-free-disk"))
        {
            cmd.arg("--min-free-disk").arg("64M");
        }
        cmd.args(&self.extra_args)
            .env("RM_LOG", "info")
            .envs(self.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        self.child = cmd.spawn().unwrap();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if self.socket.exists() && UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("rm-agent did not open its socket");
    }

    /// SIGTERM and wait (graceful).
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
    }

    /// With [`TOKEN`].
    pub fn get(&self, path: &str) -> Reply {
        request(&self.socket, "GET", path, &[AUTH], b"")
    }
    /// With [`TOKEN`].
    pub fn post(&self, path: &str, body: Value) -> Reply {
        request(
            &self.socket,
            "POST",
            path,
            &[AUTH],
            body.to_string().as_bytes(),
        )
    }
    pub fn post_auth(&self, path: &str, token: &str, body: Value) -> Reply {
        let auth = format!("Bearer {token}");
        request(
            &self.socket,
            "POST",
            path,
            &[("Authorization", &auth)],
            body.to_string().as_bytes(),
        )
    }

    /// Writes a token record the way the device plugin does, bound to a pod
    /// of namespace `default`; `devices` are host device indices.
    pub fn add_token(&self, token: &str, device_type: &str, devices: &[u32]) {
        self.add_token_of(token, device_type, devices, "default", "test");
    }

    /// [`Agent::add_token`] bound to pod `namespace/pod`. The kubelet's
    /// device IDs are `dev-<index>`, so two tokens of the same devices name
    /// the same IDs, as when the kubelet gives them to another pod.
    pub fn add_token_of(
        &self,
        token: &str,
        device_type: &str,
        devices: &[u32],
        namespace: &str,
        pod: &str,
    ) {
        use rm_crds::token::{self, TokenDevice, TokenRecord};
        let device_type: rm_crds::DeviceType = device_type.parse().unwrap();
        let rec = TokenRecord {
            version: token::RECORD_VERSION,
            token_sha256: token::token_sha256(token),
            resource_name: device_type
                .info()
                .default_resource_name
                .unwrap_or("cpu")
                .to_string(),
            device_ids: devices.iter().map(|i| format!("dev-{i}")).collect(),
            devices: devices
                .iter()
                .map(|&index| TokenDevice {
                    id: format!("dev-{index}"),
                    device_type,
                    index,
                    pci_address: None,
                    nodes: vec![],
                })
                .collect(),
            created_unix_ms: 0,
            expires_unix_ms: None,
            owner: Some(token::TokenOwner {
                namespace: namespace.into(),
                pod: pod.into(),
            }),
            agent_slot: false,
        };
        self.write_token(&rec);
    }

    /// Writes the record of an `rm-abstract.io/agent` slot held by a pod of
    /// `namespace` (`None`: not yet bound by the device plugin).
    pub fn add_slot_token(&self, token: &str, namespace: impl Into<Option<&'static str>>) {
        use rm_crds::token::{self, TokenRecord};
        let rec = TokenRecord {
            version: token::RECORD_VERSION,
            token_sha256: token::token_sha256(token),
            resource_name: rm_crds::device::AGENT_RESOURCE.into(),
            device_ids: vec![format!("agent::{token}")],
            devices: vec![],
            created_unix_ms: 0,
            expires_unix_ms: None,
            owner: namespace.into().map(|ns| token::TokenOwner {
                namespace: ns.into(),
                pod: format!("{ns}-pod"),
            }),
            agent_slot: true,
        };
        self.write_token(&rec);
    }

    /// Removes a token's record, as the device plugin's collector does when
    /// the pod is gone (or its Allocate for another pod supersedes it).
    pub fn remove_token(&self, token: &str) {
        use rm_crds::token;
        let dir = self.state.join(token::TOKENS_DIR);
        std::fs::remove_file(token::record_path(&dir, &token::token_sha256(token))).unwrap();
    }

    pub fn write_token(&self, rec: &rm_crds::token::TokenRecord) {
        use rm_crds::token;
        let dir = self.state.join(token::TOKENS_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        let tmp = dir.join(format!(".{}.tmp", rec.token_sha256));
        std::fs::write(&tmp, serde_json::to_vec(rec).unwrap()).unwrap();
        std::fs::rename(&tmp, token::record_path(&dir, &rec.token_sha256)).unwrap();
    }

    /// A request with `token` (or none).
    pub fn call(&self, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> Reply {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        request(&self.socket, method, path, &headers, body)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plugin dir holding the test-double worker.
pub fn test_double_plugins(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/test-double");
    let dst = dir.join("plugins/test-double");
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["manifest.json", "worker.py"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    dir.join("plugins")
}

/// Deterministic pseudo-random numbers (no global RNG: same weights each run).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((x >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0) * scale
        })
        .collect()
}

pub const TINY_VOCAB: usize = 256;

/// Writes a tiny random llama (config.json + model.safetensors) to `dir`.
pub fn tiny_llama(dir: &Path, seed: u64) {
    tiny_model(dir, seed, false, 256)
}

/// [`tiny_llama`] with room for `context` positions: for work that must
/// last (thousands of tokens) or prompts that must be long.
pub fn tiny_llama_with_context(dir: &Path, seed: u64, context: usize) {
    tiny_model(dir, seed, false, context)
}

/// Writes a tiny random Qwen2 to `dir`: llama's shapes plus q/k/v biases, the
/// output head tied to the embedding, and no sliding-window fields in its
/// config (as some exports have).
pub fn tiny_qwen2(dir: &Path, seed: u64) {
    tiny_model(dir, seed, true, 256)
}

fn tiny_model(dir: &Path, seed: u64, qwen2: bool, context: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let (hidden, inter, layers, heads, kv) = (64usize, 128usize, 2usize, 4usize, 2usize);
    let head_dim = hidden / heads;
    let (arch, model_type) = if qwen2 {
        ("Qwen2ForCausalLM", "qwen2")
    } else {
        ("LlamaForCausalLM", "llama")
    };
    let cfg = json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": hidden, "intermediate_size": inter, "vocab_size": TINY_VOCAB,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": context,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": qwen2,
        "hidden_act": "silu",
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let mut s = seed;
    let mut add = |name: String, shape: &[usize], scale: f32, ones: bool| {
        s += 1;
        let n: usize = shape.iter().product();
        let v = if ones {
            values(n, s, 0.1).into_iter().map(|x| 1.0 + x).collect()
        } else {
            values(n, s, scale)
        };
        t.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    };
    add(
        "model.embed_tokens.weight".into(),
        &[TINY_VOCAB, hidden],
        1.0,
        false,
    );
    add("model.norm.weight".into(), &[hidden], 0.0, true);
    if !qwen2 {
        add("lm_head.weight".into(), &[TINY_VOCAB, hidden], 0.3, false);
    }
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), &[hidden], 0.0, true);
        add(
            format!("{p}.post_attention_layernorm.weight"),
            &[hidden],
            0.0,
            true,
        );
        for (proj, rows) in [
            ("q", heads * head_dim),
            ("k", kv * head_dim),
            ("v", kv * head_dim),
        ] {
            add(
                format!("{p}.self_attn.{proj}_proj.weight"),
                &[rows, hidden],
                0.3,
                false,
            );
            if qwen2 {
                add(
                    format!("{p}.self_attn.{proj}_proj.bias"),
                    &[rows],
                    0.5,
                    false,
                );
            }
        }
        add(
            format!("{p}.self_attn.o_proj.weight"),
            &[hidden, heads * head_dim],
            0.3,
            false,
        );
        add(
            format!("{p}.mlp.gate_proj.weight"),
            &[inter, hidden],
            0.3,
            false,
        );
        add(
            format!("{p}.mlp.up_proj.weight"),
            &[inter, hidden],
            0.3,
            false,
        );
        add(
            format!("{p}.mlp.down_proj.weight"),
            &[hidden, inter],
            0.3,
            false,
        );
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
}

/// Greedy decoding with candle's qwen2 directly, no agent involved. The
/// config is built here from the test's own numbers, not by the agent's
/// reader.
pub fn direct_greedy_qwen2(dir: &Path, prompt: &[u32], n: usize) -> Vec<u32> {
    use candle_transformers::models::qwen2;
    let raw: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let get = |k: &str| raw[k].as_u64().unwrap() as usize;
    let cfg = qwen2::Config {
        vocab_size: get("vocab_size"),
        hidden_size: get("hidden_size"),
        intermediate_size: get("intermediate_size"),
        num_hidden_layers: get("num_hidden_layers"),
        num_attention_heads: get("num_attention_heads"),
        num_key_value_heads: get("num_key_value_heads"),
        max_position_embeddings: get("max_position_embeddings"),
        sliding_window: get("max_position_embeddings"),
        max_window_layers: get("num_hidden_layers"),
        tie_word_embeddings: true,
        rope_theta: raw["rope_theta"].as_f64().unwrap(),
        rms_norm_eps: raw["rms_norm_eps"].as_f64().unwrap(),
        use_sliding_window: false,
        hidden_act: candle_nn::Activation::Silu,
    };
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let mut model = qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();
    greedy(prompt, n, |x, pos| model.forward(x, pos).unwrap())
}

/// Greedy decoding around `forward(input (1, len), position) -> logits of
/// the last position` (any leading unit dimensions).
fn greedy(prompt: &[u32], n: usize, mut forward: impl FnMut(&Tensor, usize) -> Tensor) -> Vec<u32> {
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    let mut pos = 0;
    for _ in 0..n {
        let x = Tensor::new(input.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = forward(&x, pos).flatten_all().unwrap();
        let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        pos += input.len();
        out.push(next);
        input = vec![next];
    }
    out
}

fn direct_llama(
    dir: &Path,
) -> (
    candle_transformers::models::llama::Llama,
    candle_transformers::models::llama::Config,
) {
    use candle_transformers::models::llama;
    let cfg: llama::LlamaConfig =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let cfg = cfg.into_config(false);
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    (llama::Llama::load(vb, &cfg).unwrap(), cfg)
}

/// Greedy decoding with candle's llama directly, no agent involved.
pub fn direct_greedy(dir: &Path, prompt: &[u32], n: usize) -> Vec<u32> {
    use candle_transformers::models::llama;
    let (model, cfg) = direct_llama(dir);
    let mut cache = llama::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
    greedy(prompt, n, |x, pos| {
        model.forward(x, pos, &mut cache).unwrap()
    })
}

/// The logits after the last of `ids`, with candle's llama directly: the
/// whole sequence in one pass from a fresh cache.
pub fn direct_last_logits(dir: &Path, ids: &[u32]) -> Vec<f32> {
    use candle_transformers::models::llama;
    let (model, cfg) = direct_llama(dir);
    let mut cache = llama::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .forward(&x, 0, &mut cache)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A GGUF metadata value, as the tests write it.
#[derive(Clone, Debug)]
pub enum Md {
    U32(u32),
    F32(f32),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    /// Any value type and its bytes as they go in the file (to write what
    /// no honest writer would).
    Raw(u32, Vec<u8>),
}

impl Md {
    fn encode(&self) -> (u32, Vec<u8>) {
        let s = |v: &str| {
            let mut b = (v.len() as u64).to_le_bytes().to_vec();
            b.extend(v.as_bytes());
            b
        };
        match self {
            Md::U32(v) => (4, v.to_le_bytes().to_vec()),
            Md::F32(v) => (6, v.to_le_bytes().to_vec()),
            Md::Str(v) => (8, s(v)),
            Md::Strs(v) => {
                let mut b = 8u32.to_le_bytes().to_vec();
                b.extend((v.len() as u64).to_le_bytes());
                for x in v {
                    b.extend(s(x));
                }
                (9, b)
            }
            Md::I32s(v) => {
                let mut b = 5u32.to_le_bytes().to_vec();
                b.extend((v.len() as u64).to_le_bytes());
                for x in v {
                    b.extend(x.to_le_bytes());
                }
                (9, b)
            }
            Md::Raw(t, b) => (*t, b.clone()),
        }
    }
}

/// One f32 tensor: its GGUF name, its dimensions in ggml order (fastest
/// first), and an offset that overrides the honest one.
#[derive(Clone, Debug)]
pub struct GgufTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub offset: Option<u64>,
}

/// A GGUF v3 file written field by field, so that tests can make any field
/// wrong. [`tiny_gguf`] is a valid one.
#[derive(Clone, Debug)]
pub struct GgufFile {
    pub metadata: Vec<(String, Md)>,
    pub tensors: Vec<GgufTensor>,
}

impl GgufFile {
    /// Sets `key` (replacing it if present).
    pub fn set(mut self, key: &str, v: Md) -> Self {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.into(), v));
        self
    }

    /// Drops every key starting with `prefix`.
    pub fn without(mut self, prefix: &str) -> Self {
        self.metadata.retain(|(k, _)| !k.starts_with(prefix));
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        const ALIGN: usize = 32;
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            out.extend((k.len() as u64).to_le_bytes());
            out.extend(k.as_bytes());
            let (t, b) = v.encode();
            out.extend(t.to_le_bytes());
            out.extend(b);
        }
        let mut data = Vec::new();
        for (i, t) in self.tensors.iter().enumerate() {
            out.extend((t.name.len() as u64).to_le_bytes());
            out.extend(t.name.as_bytes());
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(0u32.to_le_bytes()); // f32
            out.extend(t.offset.unwrap_or(data.len() as u64).to_le_bytes());
            // Honest tensors are small; a hostile shape gets a token amount
            // of data (its offset or size is the point).
            let n = t
                .dims
                .iter()
                .fold(1u64, |a, d| a.saturating_mul(*d))
                .min(1 << 16);
            // Norm weights near 1, the rest small: a stable tiny model.
            let v: Vec<f32> = if t.dims.len() == 1 {
                values(n as usize, i as u64, 0.1)
                    .into_iter()
                    .map(|x| 1.0 + x)
                    .collect()
            } else {
                values(n as usize, i as u64, 0.3)
            };
            for x in v {
                data.extend(x.to_le_bytes());
            }
            while data.len() % ALIGN != 0 {
                data.push(0);
            }
        }
        while out.len() % ALIGN != 0 {
            out.push(0);
        }
        out.extend(data);
        out
    }

    pub fn write(&self, path: &Path) -> PathBuf {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, self.bytes()).unwrap();
        path.to_owned()
    }
}

/// GPT-2's byte-level alphabet: byte b is the token text `byte_token(b)`.
pub fn byte_token(b: u8) -> String {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    if printable(b) {
        return char::from(b).to_string();
    }
    let n = (0..b).filter(|x| !printable(*x)).count() as u32;
    char::from_u32(256 + n).unwrap().to_string()
}

/// A valid tiny llama GGUF with a GPT-2 vocabulary of [`TINY_VOCAB`] byte
/// tokens: llama.cpp runs it, and each test breaks one field of it.
pub fn tiny_gguf() -> GgufFile {
    let (hidden, inter, layers, heads, kv) = (64u64, 128u64, 2usize, 4u32, 2u32);
    let head_dim = hidden / heads as u64;
    let kv_dim = kv as u64 * head_dim;
    let md = vec![
        ("general.architecture", Md::Str("llama".into())),
        ("llama.context_length", Md::U32(256)),
        ("llama.embedding_length", Md::U32(hidden as u32)),
        ("llama.block_count", Md::U32(layers as u32)),
        ("llama.feed_forward_length", Md::U32(inter as u32)),
        ("llama.attention.head_count", Md::U32(heads)),
        ("llama.attention.head_count_kv", Md::U32(kv)),
        ("llama.rope.dimension_count", Md::U32(head_dim as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Md::F32(1e-5)),
        ("tokenizer.ggml.model", Md::Str("gpt2".into())),
        (
            "tokenizer.ggml.tokens",
            Md::Strs((0..=255u8).map(byte_token).collect()),
        ),
        ("tokenizer.ggml.token_type", Md::I32s(vec![1; TINY_VOCAB])),
        ("tokenizer.ggml.merges", Md::Strs(vec![])),
        ("tokenizer.ggml.bos_token_id", Md::U32(1)),
        ("tokenizer.ggml.eos_token_id", Md::U32(2)),
    ];
    let v = TINY_VOCAB as u64;
    let mut tensors = vec![
        ("token_embd.weight".to_string(), vec![hidden, v]),
        ("output_norm.weight".to_string(), vec![hidden]),
        ("output.weight".to_string(), vec![hidden, v]),
    ];
    for l in 0..layers {
        let p = |n: &str| format!("blk.{l}.{n}.weight");
        tensors.extend([
            (p("attn_norm"), vec![hidden]),
            (p("ffn_norm"), vec![hidden]),
            (p("attn_q"), vec![hidden, hidden]),
            (p("attn_k"), vec![hidden, kv_dim]),
            (p("attn_v"), vec![hidden, kv_dim]),
            (p("attn_output"), vec![hidden, hidden]),
            (p("ffn_gate"), vec![hidden, inter]),
            (p("ffn_up"), vec![hidden, inter]),
            (p("ffn_down"), vec![inter, hidden]),
        ]);
    }
    GgufFile {
        metadata: md.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        tensors: tensors
            .into_iter()
            .map(|(name, dims)| GgufTensor {
                name,
                dims,
                offset: None,
            })
            .collect(),
    }
}
