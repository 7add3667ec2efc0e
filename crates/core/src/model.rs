//! The BitNet b1.58 model: parameters and the forward pass, the CPU reference.
//!
//! Architecture of microsoft/bitnet-b1.58-2B-4T, as transformers' `modeling_bitnet.py`
//! (transformers v5) with every q,k,v,o,gate,up,down projection a BitLinear:
//! ```text
//! h = embed[tokens]                                                     (T, C)
//! for each layer:
//!     x = input_layernorm(h)                                            (T, C)
//!     q, k, v = rope(q_proj(x)), rope(k_proj(x)), v_proj(x)             (T, NH*HS), (T, NKV*HS) x2
//!     h += o_proj(attn_sub_norm(causal_gqa_attention(q, k, v)))         (T, C)
//!     x = post_attention_layernorm(h)                                   (T, C)
//!     h += down_proj(ffn_sub_norm(act(gate_proj(x)) * up_proj(x)))      (T, C); act = relu^2
//! logits = norm(h) . lm_head^T   (lm_head = embed when tied)            (T, V)
//! ```
//! Dimension letters: T tokens, C hidden, F ffn, V vocab, L layers, NH heads, NKV kv heads,
//! HS head size.

use std::path::Path;

use crate::config::{Activation, Config, Layout, WeightFormat};
use crate::error::{Error, Result};
use crate::lora::Lora;
use crate::ops;
use crate::quant::{self, TernaryLinear};
use crate::rng::Rng;
use crate::table::Table;
use crate::weights::{self, OwnedTensor, WeightFiles};

/// One transformer block's parameters.
#[derive(Clone, Debug)]
pub struct LayerParams {
    pub input_layernorm: Vec<f32>,          // (C)
    pub q_proj: TernaryLinear,              // (NH*HS, C)
    pub k_proj: TernaryLinear,              // (NKV*HS, C)
    pub v_proj: TernaryLinear,              // (NKV*HS, C)
    pub attn_sub_norm: Vec<f32>,            // (NH*HS)
    pub o_proj: TernaryLinear,              // (C, NH*HS)
    pub post_attention_layernorm: Vec<f32>, // (C)
    pub gate_proj: TernaryLinear,           // (F, C)
    pub up_proj: TernaryLinear,             // (F, C)
    pub ffn_sub_norm: Vec<f32>,             // (F)
    pub down_proj: TernaryLinear,           // (C, F)
}

/// All parameters of the model. The projections are frozen ternary; the rest is f32, the
/// embedding and the head held as bf16 where every value is one (lossless, same results:
/// [`Table`]).
#[derive(Clone, Debug)]
pub struct Params {
    pub embed_tokens: Table,      // (V, C)
    pub layers: Vec<LayerParams>, // L
    pub norm: Vec<f32>,           // (C)
    pub lm_head: Option<Table>,   // (V, C); None when tied to embed_tokens
}

impl Params {
    /// The output projection (V, C): lm_head, or the embedding when tied.
    pub fn head(&self) -> &Table {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }
}

/// Keys (after RoPE) and values of the tokens seen so far, per layer.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub k: Vec<Vec<f32>>, // L x (len, NKV*HS)
    pub v: Vec<Vec<f32>>, // L x (len, NKV*HS)
    pub len: usize,       // tokens cached
}

impl KvCache {
    pub fn new(config: &Config) -> KvCache {
        let l = config.num_hidden_layers;
        KvCache {
            k: vec![Vec::new(); l],
            v: vec![Vec::new(); l],
            len: 0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Model {
    pub config: Config,
    pub params: Params,
}

/// One of a layer's seven BitLinear projections. Its weight ([`LayerParams::proj`]), its
/// adapter (`lora.layers[l][p]`), its GPU launchers and its gradient all come from this one
/// value: a projection is `Proj::Down`, never a number kept in step by hand. The order of
/// [`Proj::ALL`] is the order of [`crate::lora::TARGETS`], of checkpoints and of the dropout
/// streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The tensor name inside a layer (`model.layers.{l}.{name}`), as in HF checkpoints.
    pub fn hf_name(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    /// PEFT's target-module name (`q_proj`).
    pub fn target(self) -> &'static str {
        crate::lora::TARGETS[self as usize]
    }

    /// (O, I): output and input features.
    pub fn shape(self, c: &Config) -> (usize, usize) {
        let (hid, ffn, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
        match self {
            Proj::Q => (q, hid),
            Proj::K | Proj::V => (kv, hid),
            Proj::O => (hid, q),
            Proj::Gate | Proj::Up => (ffn, hid),
            Proj::Down => (hid, ffn),
        }
    }
}

/// Per-projection arrays (`[T; 7]`, [`Proj::ALL`] order) are indexed by a [`Proj`].
impl<T> std::ops::Index<Proj> for [T; 7] {
    type Output = T;
    fn index(&self, p: Proj) -> &T {
        &self[p as usize]
    }
}

impl<T> std::ops::IndexMut<Proj> for [T; 7] {
    fn index_mut(&mut self, p: Proj) -> &mut T {
        &mut self[p as usize]
    }
}

/// The seven BitLinear projections of a layer, by their HF names, with (O, I) from the config.
pub fn projections(c: &Config) -> [(&'static str, usize, usize); 7] {
    Proj::ALL.map(|p| {
        let (o, i) = p.shape(c);
        (p.hf_name(), o, i)
    })
}

impl LayerParams {
    /// The weight of projection `p`.
    pub fn proj(&self, p: Proj) -> &TernaryLinear {
        match p {
            Proj::Q => &self.q_proj,
            Proj::K => &self.k_proj,
            Proj::V => &self.v_proj,
            Proj::O => &self.o_proj,
            Proj::Gate => &self.gate_proj,
            Proj::Up => &self.up_proj,
            Proj::Down => &self.down_proj,
        }
    }
}

impl Model {
    /// Loads a model from a `.gguf` file ([`crate::gguf`]) or from a directory
    /// ([`Model::from_dir`]).
    pub fn from_path(path: &Path) -> Result<Model> {
        if !is_gguf(path) {
            return Model::from_dir(path);
        }
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        crate::gguf::load_model(&path.display().to_string(), &bytes)
    }

    /// Loads a model from a directory holding `config.json` and `*.safetensors` (one file, or
    /// the shards of a sharded checkpoint).
    pub fn from_dir(dir: &Path) -> Result<Model> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| Error::Io {
                path: p.display().to_string(),
                source,
            })
        };
        let config_path = dir.join("config.json");
        let config = read(&config_path)?;
        let index_path = dir.join("model.safetensors.index.json");
        let names: Vec<std::path::PathBuf> = if index_path.exists() {
            // A sharded checkpoint: exactly the shards its index names, so a missing shard is
            // reported as an unreadable file rather than as missing tensors.
            let index = read(&index_path)?;
            shard_names(&index_path.display().to_string(), &index)?
                .into_iter()
                .map(|n| dir.join(n))
                .collect()
        } else {
            let mut names: Vec<_> = std::fs::read_dir(dir)
                .map_err(|source| Error::Io {
                    path: dir.display().to_string(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            names.sort();
            names
        };
        let files = names
            .iter()
            .map(|p| Ok((p.display().to_string(), read(p)?)))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        Model::from_bytes(&config_path.display().to_string(), &config, &refs)
    }

    /// Loads a model from the bytes of `config.json` and its safetensors files; the names
    /// appear in error messages.
    pub fn from_bytes(
        config_name: &str,
        config_json: &[u8],
        files: &[(&str, &[u8])],
    ) -> Result<Model> {
        let config = Config::from_json(config_name, config_json)?;
        let mut w = WeightFiles::parse(files)?;
        assemble(config, &mut w)
    }

    /// Checks token ids against the vocabulary and the context length.
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        self.config.check_tokens(tokens)
    }

    /// The full forward pass: tokens (T) -> logits (T, V), row-major.
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.forward(tokens, &mut KvCache::new(&self.config))
    }

    /// The forward pass of T new tokens after the `cache.len` tokens already in `cache`:
    /// returns their logits (T, V) and appends their keys and values to the cache. With an
    /// empty cache this is the whole-sequence pass; decoding feeds one token at a time. Every
    /// row is computed exactly as in the whole-sequence pass, so the results are identical.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        self.forward_with_adapter(tokens, cache, None)
    }

    /// [`Model::forward`] with a LoRA adapter applied, unmerged: each targeted projection is
    /// `BitLinear(x) + scale * (x . A^T) . B^T` as PEFT computes it (merging B.A into the
    /// ternary weight would change the result: the weight is re-quantized, the adapter is not).
    /// Runs on a thread of the CPU pool (`par::in_pool`): a decoded token's hundred-odd
    /// parallel loops then cost no wake-up each.
    pub fn forward_with_adapter(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        lora: Option<&Lora>,
    ) -> Result<Vec<f32>> {
        crate::par::in_pool(|| self.forward_in_pool(tokens, cache, lora))
    }

    fn forward_in_pool(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        lora: Option<&Lora>,
    ) -> Result<Vec<f32>> {
        if let Some(l) = lora
            && l.layers.len() != self.config.num_hidden_layers
        {
            return Err(Error::Lora {
                msg: format!(
                    "the adapter has {} layers, the model {}",
                    l.layers.len(),
                    self.config.num_hidden_layers
                ),
            });
        }
        self.check_tokens(tokens)?;
        let cfg = &self.config;
        let p = &self.params;
        let (t, c) = (tokens.len(), cfg.hidden_size);
        let (nh, nkv, hs) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let past = cache.len;
        if past + t > cfg.max_position_embeddings {
            return Err(Error::TooManyTokens {
                count: past + t,
                max: cfg.max_position_embeddings,
            });
        }

        // h = embed[tokens]                                              (T, C)
        let mut h: Vec<f32> = Vec::with_capacity(t * c);
        for &tok in tokens {
            p.embed_tokens.push_row(&mut h, tok as usize, c);
        }
        let (cos, sin) = ops::rope_tables_from(past, t, hs, cfg.rope_theta); // (T, HS/2) each

        for (l, (layer, (k_cache, v_cache))) in p
            .layers
            .iter()
            .zip(cache.k.iter_mut().zip(&mut cache.v))
            .enumerate()
        {
            // Attention block.
            let x = ops::rms_norm(&h, &layer.input_layernorm, cfg.rms_norm_eps); // (T, C)
            let mut q = lora_linear(layer, Proj::Q, lora, l, &x); // (T, NH*HS)
            let mut k = lora_linear(layer, Proj::K, lora, l, &x); // (T, NKV*HS)
            let v = lora_linear(layer, Proj::V, lora, l, &x); // (T, NKV*HS)
            ops::rope(&mut q, nh, hs, &cos, &sin);
            ops::rope(&mut k, nkv, hs, &cos, &sin);
            k_cache.extend_from_slice(&k); // (past+T, NKV*HS)
            v_cache.extend_from_slice(&v); // (past+T, NKV*HS)
            let a = ops::attention_cached(&q, k_cache, v_cache, t, past + t, nh, nkv, hs); // (T, NH*HS)
            let a = ops::rms_norm(&a, &layer.attn_sub_norm, cfg.rms_norm_eps); // (T, NH*HS)
            ops::add_in_place(&mut h, &lora_linear(layer, Proj::O, lora, l, &a)); // (T, C)

            // FFN block.
            let x = ops::rms_norm(&h, &layer.post_attention_layernorm, cfg.rms_norm_eps); // (T, C)
            let gate = lora_linear(layer, Proj::Gate, lora, l, &x); // (T, F)
            let up = lora_linear(layer, Proj::Up, lora, l, &x); // (T, F)
            let f = ops::gated_act(&gate, &up, cfg.hidden_act); // (T, F)
            let f = ops::rms_norm(&f, &layer.ffn_sub_norm, cfg.rms_norm_eps); // (T, F)
            ops::add_in_place(&mut h, &lora_linear(layer, Proj::Down, lora, l, &f)); // (T, C)
        }
        cache.len += t;

        let x = ops::rms_norm(&h, &p.norm, cfg.rms_norm_eps); // (T, C)
        Ok(p.head().matmul_t(&x, c, cfg.vocab_size)) // (T, V)
    }

    /// A model with random weights, reproducible from `seed`: master weights ~ N(0, 0.02) as
    /// transformers' `initializer_range`, norm weights ~ 1 + N(0, 0.1) so a bug that ignores
    /// them shows, embeddings ~ N(0, 0.5), and an untied head ~ N(0, 0.3) so the logits
    /// (about N(0, 2.4)) are neither flat nor dominated by one token. Used for the bundled
    /// demo model of the skeleton and for speed runs on the benchmark shapes.
    pub fn random(config: Config, seed: u64) -> (Model, Vec<OwnedTensor>) {
        Self::random_with(config, seed, true)
    }

    /// [`Model::random`]'s model alone, without its bf16 tensors (what `bench` runs): the same
    /// values, with less memory and time.
    pub fn random_model(config: Config, seed: u64) -> Model {
        Self::random_with(config, seed, false).0
    }

    fn random_with(config: Config, seed: u64, keep: bool) -> (Model, Vec<OwnedTensor>) {
        use rayon::prelude::*;
        // One SplitMix64 stream, each normal taking two draws, in the order below: the values
        // of a tensor start 2 x (values before it) draws in, so chunks of it are drawn in
        // parallel (Rng::skip) and equal the serial stream's.
        let base = Rng::new(seed);
        let mut drawn = 0u64;
        let mut normal = |n: usize, mean: f32, std: f32| -> Vec<f32> {
            const CHUNK: usize = 1 << 16;
            let start = drawn;
            drawn += n as u64;
            let mut out = vec![0f32; n];
            out.par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(k, chunk)| {
                    let mut rng = base.clone();
                    rng.skip(2 * (start + (k * CHUNK) as u64));
                    for x in chunk {
                        *x = mean + std * rng.normal();
                    }
                });
            out
        };
        let mut tensors = Vec::new();
        let push = |t: &mut Vec<OwnedTensor>, name: String, shape: &[usize], w: &[f32]| {
            if keep {
                t.push(OwnedTensor::bf16(name, shape, w));
            }
        };
        let (v, c, f, q) = (
            config.vocab_size,
            config.hidden_size,
            config.intermediate_size,
            config.q_dim(),
        );
        // Round through bf16 first: the file stores bf16, and the model must equal what loads.
        let bf = |mut x: Vec<f32>| -> Vec<f32> {
            x.par_iter_mut()
                .for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
            x
        };
        let embed = bf(normal(v * c, 0.0, 0.5));
        push(
            &mut tensors,
            "model.embed_tokens.weight".into(),
            &[v, c],
            &embed,
        );
        let mut layers = Vec::new();
        for l in 0..config.num_hidden_layers {
            let pre = format!("model.layers.{l}.");
            let mut norm_w = |name: &str, n: usize, tensors: &mut Vec<OwnedTensor>| {
                let w = bf(normal(n, 1.0, 0.1));
                push(tensors, format!("{pre}{name}.weight"), &[n], &w);
                w
            };
            let input_layernorm = norm_w("input_layernorm", c, &mut tensors);
            let attn_sub_norm = norm_w(config.layout.attn_sub_norm(), q, &mut tensors);
            let post_attention_layernorm = norm_w("post_attention_layernorm", c, &mut tensors);
            let ffn_sub_norm = norm_w(config.layout.ffn_sub_norm(), f, &mut tensors);
            let mut lin: Vec<TernaryLinear> = projections(&config)
                .iter()
                .map(|&(name, o, i)| {
                    let w = bf(normal(o * i, 0.0, 0.02));
                    push(&mut tensors, format!("{pre}{name}.weight"), &[o, i], &w);
                    TernaryLinear::from_master(&w, o, i)
                })
                .collect();
            let mut take = || lin.remove(0);
            layers.push(LayerParams {
                input_layernorm,
                q_proj: take(),
                k_proj: take(),
                v_proj: take(),
                attn_sub_norm,
                o_proj: take(),
                post_attention_layernorm,
                gate_proj: take(),
                up_proj: take(),
                ffn_sub_norm,
                down_proj: take(),
            });
        }
        let norm = bf(normal(c, 1.0, 0.1));
        push(&mut tensors, "model.norm.weight".into(), &[c], &norm);
        let lm_head = (!config.tie_word_embeddings).then(|| {
            let w = bf(normal(v * c, 0.0, 0.3));
            push(&mut tensors, "lm_head.weight".into(), &[v, c], &w);
            w
        });
        let model = Model {
            config,
            params: Params {
                embed_tokens: Table::new(embed),
                layers,
                norm,
                lm_head: lm_head.map(Table::new),
            },
        };
        (model, tensors)
    }
}

/// True for a path naming a `.gguf` file (a model given as one file, not a directory).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
        && !path.is_dir()
}

/// The directory of a model's side files (tokenizer.json, tokenizer_config.json): the model
/// directory itself, or the directory holding a `.gguf` file.
pub fn side_dir(path: &Path) -> &Path {
    if is_gguf(path) {
        path.parent().unwrap_or(Path::new("."))
    } else {
        path
    }
}

/// The shard files a `model.safetensors.index.json` lists in its `weight_map`, each once,
/// sorted. Shard names must be plain file names, as transformers writes them.
pub fn shard_names(file: &str, index_json: &[u8]) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(index_json).map_err(|e| Error::Json {
        file: file.to_string(),
        msg: e.to_string(),
    })?;
    let bad = |msg: String| Error::ShardIndex {
        file: file.to_string(),
        msg,
    };
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no \"weight_map\" object mapping tensors to shard files".into()))?;
    let mut names: Vec<String> = Vec::new();
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[\"{tensor}\"] is not a file name")))?;
        if shard.contains(['/', '\\']) || shard.starts_with('.') {
            return Err(bad(format!("shard \"{shard}\" is not a plain file name")));
        }
        if !names.iter().any(|n| n == shard) {
            names.push(shard.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Projection `p` of layer `l` on x: BitLinear, plus the adapter if it has one.
fn lora_linear(layer: &LayerParams, p: Proj, lora: Option<&Lora>, l: usize, x: &[f32]) -> Vec<f32> {
    let lin = layer.proj(p);
    let mut y = lin.forward(x);
    if let Some(pair) = lora.and_then(|a| a.layers[l][p].as_ref()) {
        let lora = lora.expect("pair came from it");
        let (r, scale) = (lora.config.r, lora.config.scale());
        let u = ops::matmul_t_fast(x, &pair.a, lin.in_features, r); // (T, R)
        let ub = ops::matmul_t_fast(&u, &pair.b, r, lin.out_features); // (T, O)
        for (yv, &d) in y.iter_mut().zip(&ub) {
            *yv += scale * d;
        }
    }
    y
}

/// What a tensor holding a NaN or an infinity is told ([`Error::BadValue`]'s `what`).
pub(crate) fn non_finite(index: usize, value: f32) -> String {
    format!("holds {value} at element {index}; a model's weights must be finite numbers")
}

/// Where loading takes tensors from: the parsed files ([`WeightFiles`]) or the tensors handed
/// over one at a time ([`crate::builder::ModelBuilder`]). Each tensor is asked for once.
pub(crate) trait TensorSource {
    /// A float tensor as f32, its shape checked.
    fn f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
    /// A u8 tensor (packed ternary weights), its shape checked.
    fn u8(&mut self, name: &str, shape: &[usize]) -> Result<Vec<u8>>;
    /// A float tensor whose every value must be finite: a NaN or an infinity in a model's
    /// weights makes every output junk, so it is refused at load with where it is (a damaged
    /// or wrongly converted file) instead of generating nonsense.
    fn f32_finite(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let v = self.f32(name, shape)?;
        if let Some(k) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::BadValue {
                file: self.file_of(name),
                name: name.to_string(),
                what: non_finite(k, v[k]),
            });
        }
        Ok(v)
    }
    /// The embedding or the head as a [`Table`] (bf16 where lossless), every value finite.
    fn table(&mut self, name: &str, shape: &[usize]) -> Result<Table> {
        Ok(Table::new(self.f32_finite(name, shape)?))
    }
    /// A master-weight projection (O, I), quantized to ternary.
    fn master_linear(&mut self, name: &str, o: usize, i: usize) -> Result<TernaryLinear> {
        Ok(TernaryLinear::from_master(
            &self.f32_finite(name, &[o, i])?,
            o,
            i,
        ))
    }
    /// The file a tensor lives in (for error messages).
    fn file_of(&self, name: &str) -> String;
}

impl TensorSource for WeightFiles<'_> {
    fn f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        WeightFiles::f32(self, name, shape)
    }
    fn u8(&mut self, name: &str, shape: &[usize]) -> Result<Vec<u8>> {
        WeightFiles::u8(self, name, shape).map(<[u8]>::to_vec)
    }
    fn file_of(&self, name: &str) -> String {
        WeightFiles::file_of(self, name).to_string()
    }
}

/// Every tensor of the model, in one order whatever the source, so the first problem
/// reported is the same.
/// The names of the two tables, which loaders keep as [`Table`]s as soon as they arrive.
const EMBED_TOKENS: &str = "model.embed_tokens.weight";
const LM_HEAD: &str = "lm_head.weight";

/// Whether tensor `name` is the embedding or the head.
pub(crate) fn is_table(name: &str) -> bool {
    name == EMBED_TOKENS || name == LM_HEAD
}

pub(crate) fn assemble(config: Config, w: &mut impl TensorSource) -> Result<Model> {
    let (v, c) = (config.vocab_size, config.hidden_size);
    let embed_tokens = w.table(EMBED_TOKENS, &[v, c])?;
    let layers = (0..config.num_hidden_layers)
        .map(|l| load_layer(w, &config, l))
        .collect::<Result<Vec<_>>>()?;
    let lm_head = if config.tie_word_embeddings {
        None
    } else {
        Some(w.table(LM_HEAD, &[v, c])?)
    };
    Ok(Model {
        params: Params {
            embed_tokens,
            layers,
            norm: w.f32_finite("model.norm.weight", &[c])?,
            lm_head,
        },
        config,
    })
}

/// The names of every tensor the model reads, for a config.
pub(crate) fn tensor_names(cfg: &Config) -> Vec<String> {
    let mut names = vec!["model.embed_tokens.weight".to_string()];
    for l in 0..cfg.num_hidden_layers {
        let pre = format!("model.layers.{l}.");
        for norm in [
            "input_layernorm",
            cfg.layout.attn_sub_norm(),
            "post_attention_layernorm",
            cfg.layout.ffn_sub_norm(),
        ] {
            names.push(format!("{pre}{norm}.weight"));
        }
        for (name, _, _) in projections(cfg) {
            names.push(format!("{pre}{name}.weight"));
            if cfg.weight_format != WeightFormat::Master {
                names.push(format!("{pre}{name}.weight_scale"));
            }
        }
    }
    if !cfg.tie_word_embeddings {
        names.push("lm_head.weight".to_string());
    }
    names.push("model.norm.weight".to_string());
    names
}

/// Loads one layer, quantizing master weights or unpacking packed ones per `weight_format`.
fn load_layer(w: &mut impl TensorSource, cfg: &Config, l: usize) -> Result<LayerParams> {
    let pre = format!("model.layers.{l}.");
    let mut lin = projections(cfg)
        .iter()
        .map(|&(name, o, i)| load_linear(w, cfg, &format!("{pre}{name}"), o, i))
        .collect::<Result<Vec<_>>>()?
        .into_iter();
    let mut take = || lin.next().expect("projections() lists seven");
    let mut norm = |name: &str, n: usize| w.f32_finite(&format!("{pre}{name}.weight"), &[n]);
    Ok(LayerParams {
        input_layernorm: norm("input_layernorm", cfg.hidden_size)?,
        q_proj: take(),
        k_proj: take(),
        v_proj: take(),
        attn_sub_norm: norm(cfg.layout.attn_sub_norm(), cfg.q_dim())?,
        o_proj: take(),
        post_attention_layernorm: norm("post_attention_layernorm", cfg.hidden_size)?,
        gate_proj: take(),
        up_proj: take(),
        ffn_sub_norm: norm(cfg.layout.ffn_sub_norm(), cfg.intermediate_size)?,
        down_proj: take(),
    })
}

/// One BitLinear projection `prefix.weight` of shape (O, I).
fn load_linear(
    w: &mut impl TensorSource,
    cfg: &Config,
    prefix: &str,
    o: usize,
    i: usize,
) -> Result<TernaryLinear> {
    let name = format!("{prefix}.weight");
    match cfg.weight_format {
        WeightFormat::Master => w.master_linear(&name, o, i),
        WeightFormat::PackedBitLinear | WeightFormat::PackedAutoBitLinear => {
            if !o.is_multiple_of(4) {
                return Err(Error::TensorShape {
                    file: w.file_of(&name),
                    name,
                    expected: vec![o.div_ceil(4), i],
                    actual: vec![o, i],
                });
            }
            let packed = w.u8(&name, &[o / 4, i])?;
            if let Some(pos) = packed
                .iter()
                .position(|b| (0..4).any(|s| (b >> (2 * s)) & 3 == 3))
            {
                return Err(Error::BadValue {
                    file: w.file_of(&name),
                    name,
                    what: format!("byte {pos} holds the invalid 2-bit code 3 (codes are 0, 1, 2)"),
                });
            }
            let scale_name = format!("{prefix}.weight_scale");
            let scale = w.f32(&scale_name, &[1])?[0];
            if !(scale.is_finite() && scale > 0.0) {
                return Err(Error::BadValue {
                    file: w.file_of(&scale_name),
                    name: scale_name,
                    what: format!("is {scale}, expected a positive number"),
                });
            }
            // bitlinear: W = T / weight_scale; autobitlinear: W = T * weight_scale.
            let w_scale = if cfg.weight_format == WeightFormat::PackedBitLinear {
                scale
            } else {
                1.0 / scale
            };
            Ok(TernaryLinear {
                out_features: o,
                in_features: i,
                packed,
                w_scale,
            })
        }
    }
}

/// Writes `config.json` and `model.safetensors` into `dir`.
pub fn save_model_files(dir: &Path, config: &Config, tensors: &[OwnedTensor]) -> Result<()> {
    fn io(p: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: p.display().to_string(),
            source,
        }
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cfg_path = dir.join("config.json");
    let mut json =
        serde_json::to_string_pretty(&config.to_json()).expect("a JSON value serializes");
    json.push('\n');
    std::fs::write(&cfg_path, json).map_err(io(&cfg_path))?;
    let st_path = dir.join("model.safetensors");
    std::fs::write(&st_path, weights::serialize(tensors)).map_err(io(&st_path))?;
    Ok(())
}

/// The bundled tiny model's shape: deliberately awkward sizes (F = 176 and V = 509 are not
/// multiples of a workgroup) with GQA (NH = 4, NKV = 2), HS = 16, and an untied head (a tied
/// head on random weights mostly predicts the input token back).
pub fn tiny_config() -> Config {
    Config {
        vocab_size: 509,
        hidden_size: 64,
        intermediate_size: 176,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        max_position_embeddings: 256,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        hidden_act: Activation::Relu2,
        tie_word_embeddings: false,
        weight_format: WeightFormat::Master,
        layout: Layout::BitNet,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

/// The benchmark shapes of shared/BENCHMARKS-TARGETS.md (bitnet.cpp's dummy-model table and
/// the real 2B-4T), relu2 FFN, for speed runs on random weights: "125m", "1b", "2b4t".
pub fn bench_config(name: &str) -> Option<Config> {
    let (c, f, l, nh, nkv, v, tied) = match name {
        "125m" => (768, 3072, 11, 12, 12, 32002, true),
        "1b" => (2048, 3584, 24, 32, 32, 32002, true),
        "2b4t" => (2560, 6912, 30, 20, 5, 128256, true),
        _ => return None,
    };
    Some(Config {
        vocab_size: v,
        hidden_size: c,
        intermediate_size: f,
        num_hidden_layers: l,
        num_attention_heads: nh,
        num_key_value_heads: nkv,
        head_dim: c / nh,
        max_position_embeddings: 4096,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        hidden_act: Activation::Relu2,
        tie_word_embeddings: tied,
        weight_format: WeightFormat::Master,
        layout: Layout::BitNet,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    })
}

/// Exposed for the GPU crate's tests: the per-token activation quantizer.
pub use quant::quantize_activations;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn tiny_bytes(tied: bool) -> (Config, Model, Vec<u8>) {
        let mut cfg = tiny_config();
        cfg.tie_word_embeddings = tied;
        let (model, tensors) = Model::random(cfg.clone(), 42);
        (cfg, model, weights::serialize(&tensors))
    }

    /// The parallel draws are the one serial stream: the embedding, then layer 0's first norm
    /// right after it, as `Rng::normal` called in a loop gives them; and the model without
    /// its tensors is the same model.
    #[test]
    fn random_weights_are_the_serial_stream() {
        let cfg = tiny_config();
        let (model, _) = Model::random(cfg.clone(), 7);
        let mut rng = Rng::new(7);
        let bf = |x: f32| half::bf16::from_f32(x).to_f32();
        let n = cfg.vocab_size * cfg.hidden_size;
        let embed: Vec<f32> = (0..n).map(|_| bf(0.5 * rng.normal())).collect();
        assert_eq!(*model.params.embed_tokens.to_f32(), embed);
        assert_eq!(model.params.embed_tokens.dtype(), crate::TableDtype::Bf16);
        let norm: Vec<f32> = (0..cfg.hidden_size)
            .map(|_| bf(1.0 + 0.1 * rng.normal()))
            .collect();
        assert_eq!(model.params.layers[0].input_layernorm, norm);
        let alone = Model::random_model(cfg, 7);
        assert_eq!(format!("{:?}", alone.params), format!("{:?}", model.params));
    }

    /// The model with its tables kept as f32 (the storage before bf16 tables).
    pub(crate) fn with_f32_tables(model: &Model) -> Model {
        let mut m = model.clone();
        m.params.embed_tokens = Table::new_f32(m.params.embed_tokens.to_f32().into_owned());
        m.params.lm_head = m
            .params
            .lm_head
            .map(|h| Table::new_f32(h.to_f32().into_owned()));
        m
    }

    /// bf16 tables (random and loaded models are bf16) give the f32 tables' logits bit for bit:
    /// a prefill over many tokens (blocks of tokens on threads) and cached one-token passes
    /// (W's rows on threads), tied and untied; and no reader made an f32 copy of a table.
    #[test]
    fn bf16_tables_give_the_f32_tables_logits_bit_for_bit() {
        use crate::table::TableDtype;
        for tied in [true, false] {
            let (_, model, bytes) = tiny_bytes(tied);
            let cfg = model.config.clone();
            let json = cfg.to_json().to_string();
            let loaded = Model::from_bytes(
                "config.json",
                json.as_bytes(),
                &[("model.safetensors", &bytes)],
            )
            .unwrap();
            for m in [&model, &loaded] {
                assert_eq!(m.params.embed_tokens.dtype(), TableDtype::Bf16);
                assert_eq!(m.params.head().dtype(), TableDtype::Bf16);
            }
            let f32_model = with_f32_tables(&model);
            assert_eq!(f32_model.params.head().dtype(), TableDtype::F32);
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            let prompt: Vec<u32> = (0..37).map(|k| (k * 97 + 5) % 509).collect();
            let (mut c1, mut c2) = (KvCache::new(&cfg), KvCache::new(&cfg));
            assert_eq!(
                bits(model.forward(&prompt, &mut c1).unwrap()),
                bits(f32_model.forward(&prompt, &mut c2).unwrap()),
                "tied {tied}: prefill"
            );
            for tok in [7u32, 508, 0, 42] {
                assert_eq!(
                    bits(model.forward(&[tok], &mut c1).unwrap()),
                    bits(f32_model.forward(&[tok], &mut c2).unwrap()),
                    "tied {tied}: decoding {tok}"
                );
            }
            assert!(!model.params.embed_tokens.has_f32_copy());
            assert!(!model.params.head().has_f32_copy());
            // Half the bytes.
            assert_eq!(
                2 * model.params.head().bytes(),
                f32_model.params.head().bytes()
            );
        }
    }

    #[test]
    fn load_reproduces_the_generated_model() {
        for tied in [true, false] {
            let (cfg, model, bytes) = tiny_bytes(tied);
            let json = cfg.to_json().to_string();
            let loaded = Model::from_bytes(
                "config.json",
                json.as_bytes(),
                &[("model.safetensors", &bytes)],
            )
            .unwrap();
            assert_eq!(
                loaded.params.layers[1].down_proj,
                model.params.layers[1].down_proj
            );
            let tokens = [5, 17, 42, 0, 508];
            assert_eq!(
                loaded.logits(&tokens).unwrap(),
                model.logits(&tokens).unwrap()
            );
        }
    }

    #[test]
    fn packed_formats_give_the_master_weights_result() {
        let (cfg, model, _) = tiny_bytes(true);
        for format in [
            WeightFormat::PackedBitLinear,
            WeightFormat::PackedAutoBitLinear,
        ] {
            let mut packed_cfg = cfg.clone();
            packed_cfg.weight_format = format;
            let mut tensors = vec![
                OwnedTensor::f32(
                    "model.embed_tokens.weight",
                    &[cfg.vocab_size, cfg.hidden_size],
                    &model.params.embed_tokens.to_f32(),
                ),
                OwnedTensor::f32("model.norm.weight", &[cfg.hidden_size], &model.params.norm),
            ];
            for (l, layer) in model.params.layers.iter().enumerate() {
                let pre = format!("model.layers.{l}.");
                for (name, v) in [
                    ("input_layernorm", &layer.input_layernorm),
                    ("self_attn.attn_sub_norm", &layer.attn_sub_norm),
                    ("post_attention_layernorm", &layer.post_attention_layernorm),
                    ("mlp.ffn_sub_norm", &layer.ffn_sub_norm),
                ] {
                    tensors.push(OwnedTensor::f32(
                        format!("{pre}{name}.weight"),
                        &[v.len()],
                        v,
                    ));
                }
                let lins = [
                    &layer.q_proj,
                    &layer.k_proj,
                    &layer.v_proj,
                    &layer.o_proj,
                    &layer.gate_proj,
                    &layer.up_proj,
                    &layer.down_proj,
                ];
                for ((name, o, i), lin) in projections(&cfg).into_iter().zip(lins) {
                    tensors.push(OwnedTensor::u8(
                        format!("{pre}{name}.weight"),
                        &[o / 4, i],
                        lin.packed.clone(),
                    ));
                    let s = if format == WeightFormat::PackedBitLinear {
                        lin.w_scale
                    } else {
                        1.0 / lin.w_scale
                    };
                    tensors.push(OwnedTensor::f32(
                        format!("{pre}{name}.weight_scale"),
                        &[1],
                        &[s],
                    ));
                }
            }
            let bytes = weights::serialize(&tensors);
            let json = packed_cfg.to_json().to_string();
            let loaded = Model::from_bytes(
                "config.json",
                json.as_bytes(),
                &[("model.safetensors", &bytes)],
            )
            .unwrap();
            let tokens = [3, 1, 4, 1, 5, 9, 2, 6];
            let (a, b) = (
                loaded.logits(&tokens).unwrap(),
                model.logits(&tokens).unwrap(),
            );
            // autobitlinear stores 1/s_w, which round-trips through f32 division: not bit-exact.
            crate::tolerance::KERNEL_F32.assert_close(&format!("{format:?} logits"), &a, &b);
        }
    }

    #[test]
    fn bad_inputs_give_named_errors() {
        let (cfg, model, bytes) = tiny_bytes(true);
        let json = cfg.to_json().to_string();
        let e = Model::from_bytes(
            "config.json",
            json.as_bytes(),
            &[("model.safetensors", &bytes[..bytes.len() - 100])],
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("model.safetensors: truncated"),
            "{e}"
        );
        let e = Model::from_bytes("config.json", json.as_bytes(), &[]).unwrap_err();
        assert!(matches!(e, Error::NoWeights));
        let mut small = cfg.clone();
        small.hidden_size = 32;
        let e = Model::from_bytes(
            "config.json",
            small.to_json().to_string().as_bytes(),
            &[("model.safetensors", &bytes)],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("has shape [509, 64], expected [509, 32]"),
            "{e}"
        );
        assert!(matches!(model.logits(&[]), Err(Error::NoTokens)));
        let e = model.logits(&[1, 509]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "token id 509 at position 1 is out of range: the vocabulary has 509 tokens"
        );
    }

    #[test]
    fn causal_prefix_property() {
        // Logits at position i depend only on tokens 0..=i: a prefix gives the same rows.
        let (_, model, _) = tiny_bytes(true);
        let full = model.logits(&[7, 8, 9, 10]).unwrap();
        let prefix = model.logits(&[7, 8]).unwrap();
        assert_eq!(&full[..prefix.len()], &prefix[..]);
    }
}
