//! KV-cached decoding and generation on the GPU, and the split of large tensors.
//!
//! - Cached decoding equals the GPU's full pass **bit for bit** (`assert_eq!`): every kernel
//!   computes a row in the same order whatever T and the cache offset (integer ternary
//!   products, serial sums in rms_norm and attention, k-ordered head), so prefill + one token at
//!   a time gives the very same f32 rows. Against the CPU `Model::forward` rows: MODEL_LOGITS
//!   and the same top-1.
//! - `GpuModel::generate` equals `bitlora_core::generate` token for token (greedy over several
//!   seeds and prompts; seeded top-k / top-p sampling; stop tokens and the callback).
//! - `GpuModel::with_max_binding` with a tiny threshold splits the embedding and the head into
//!   many chunks along V and cuts long inputs into several passes: the logits must equal the
//!   unsplit model's bit for bit (splitting changes no summation), tied and untied.

mod common;

use bitlora_core::model::tiny_config;
use bitlora_core::rng::Rng;
use bitlora_core::tolerance::MODEL_LOGITS;
use bitlora_core::{Activation, Config, Error, KvCache, Model, SamplingOptions, generate};
use bitlora_gpu::{GpuError, GpuKvCache, GpuModel};
use common::{block, gpu};

fn argmax(row: &[f32]) -> u32 {
    bitlora_core::generate::argmax(row)
}

fn random_tokens(seed: u64, n: usize, v: usize) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.below(v as u64) as u32).collect()
}

/// Checks GPU rows against CPU rows: MODEL_LOGITS and the same top-1 on every row.
fn against_cpu(what: &str, got: &[f32], want: &[f32], v: usize) -> f32 {
    MODEL_LOGITS.assert_close(what, got, want);
    for (r, (g, w)) in got.chunks_exact(v).zip(want.chunks_exact(v)).enumerate() {
        assert_eq!(argmax(g), argmax(w), "{what}: top-1 differs at row {r}");
    }
    MODEL_LOGITS.compare(got, want).max_abs
}

/// Prefill of `split` tokens, then one token at a time (with one 3-token step in the middle),
/// on the GPU and on the CPU.
fn cached_case(cfg: Config, seed: u64, t: usize, split: usize) {
    let (model, _) = Model::random(cfg, seed);
    let v = model.config.vocab_size;
    let tokens = random_tokens(seed ^ 0xdec0de, t, v);
    let gm = GpuModel::new(gpu(), &model).unwrap();
    let full = block(gm.logits(&tokens)).unwrap();

    // Steps: [0, split), then 1, 1, 3, 1, 1, ... tokens.
    let mut steps: Vec<std::ops::Range<usize>> = Vec::new();
    steps.push(0..split);
    let mut at = split;
    while at < t {
        let n = if steps.len() == 3 { 3.min(t - at) } else { 1 };
        steps.push(at..at + n);
        at += n;
    }
    let mut gcache = GpuKvCache::new(&gm, t).unwrap();
    let mut ccache = KvCache::new(&model.config);
    let (mut grows, mut crows) = (Vec::new(), Vec::new());
    for s in steps {
        let g = block(gm.forward(&tokens[s.clone()], &mut gcache)).unwrap();
        assert_eq!(g.len(), s.len() * v);
        grows.extend(g);
        crows.extend(model.forward(&tokens[s], &mut ccache).unwrap());
    }
    assert_eq!(gcache.len(), t);
    let what = format!("seed {seed} T={t} prefill {split}");
    assert!(
        grows == full,
        "{what}: GPU cached rows differ from the GPU full pass (max abs {:.3e})",
        MODEL_LOGITS.compare(&grows, &full).max_abs
    );
    let d = against_cpu(
        &format!("{what}: GPU cached vs CPU cached"),
        &grows,
        &crows,
        v,
    );
    println!("{what}: GPU cached == GPU full bit for bit; vs CPU max abs {d:.3e}");
}

#[test]
fn cached_decoding_equals_the_full_pass_bit_for_bit() {
    for seed in 1..=4 {
        cached_case(tiny_config(), seed, 24, 7);
    }
    // More keys than the attention workgroup (64): the cached queries span two key blocks.
    cached_case(tiny_config(), 5, 90, 70);
    // Tied head, SiLU with full MHA (the 1bitLLM shape), a 1-token prefill.
    let mut tied = tiny_config();
    tied.tie_word_embeddings = true;
    cached_case(tied, 6, 16, 1);
    let mut silu = tiny_config();
    silu.hidden_act = Activation::Silu;
    silu.num_key_value_heads = silu.num_attention_heads;
    cached_case(silu, 7, 20, 5);
}

#[test]
fn forward_last_is_the_last_row_and_the_cache_grows() {
    let (model, _) = Model::random(tiny_config(), 21);
    let gm = GpuModel::new(gpu(), &model).unwrap();
    let v = model.config.vocab_size;
    let tokens = random_tokens(22, 40, v);
    let full = block(gm.logits(&tokens)).unwrap();

    // forward_last reads back only the last row: equal to the full pass's last row.
    let mut cache = GpuKvCache::new(&gm, 40).unwrap();
    let last = block(gm.forward_last(&tokens, &mut cache)).unwrap();
    assert_eq!(last, full[39 * v..]);

    // A cache made for one position grows (copying the cached rows) as tokens arrive.
    let mut cache = GpuKvCache::new(&gm, 1).unwrap();
    assert_eq!(cache.capacity(), 1);
    let mut rows = Vec::new();
    for &tok in &tokens {
        rows.extend(block(gm.forward_last(&[tok], &mut cache)).unwrap());
    }
    assert_eq!(cache.capacity(), GpuKvCache::GROW.min(256));
    assert_eq!(rows, full, "decoding through a growing cache");
    println!(
        "cache: {} positions, {} bytes with activations",
        cache.capacity(),
        cache.bytes()
    );

    // Past the context: named, and the cache is left as it was.
    let mut cache = GpuKvCache::new(&gm, 8).unwrap();
    block(gm.forward(&vec![3; 250], &mut cache)).unwrap();
    let e = block(gm.forward(&[1; 7], &mut cache)).unwrap_err();
    assert!(
        matches!(
            e,
            GpuError::Model(Error::TooManyTokens {
                count: 257,
                max: 256
            })
        ),
        "{e}"
    );
    assert_eq!(cache.len(), 250);
    // A cache of another model's shape is refused by name.
    let mut other = tiny_config();
    other.num_hidden_layers = 3;
    let gm3 = GpuModel::new(gpu(), &Model::random(other, 1).0).unwrap();
    let e = block(gm.forward(&[1], &mut GpuKvCache::new(&gm3, 4).unwrap())).unwrap_err();
    assert!(e.to_string().contains("the KV cache has 3 layers"), "{e}");
}

/// GPU generate vs CPU generate with the same options, streaming included.
fn generate_case(model: &Model, gm: &GpuModel, prompt: &[u32], opts: &SamplingOptions) {
    let want = generate(model, prompt, opts, |_| true).unwrap();
    let mut streamed = Vec::new();
    let got = block(gm.generate(prompt, opts, |t| {
        streamed.push(t);
        true
    }))
    .unwrap();
    assert_eq!(got, want, "prompt {prompt:?} {opts:?}");
    assert_eq!(streamed, got);
}

#[test]
fn greedy_generation_equals_the_cpu_token_for_token() {
    let mut total = 0;
    for seed in [1, 2, 3, 42] {
        let (model, _) = Model::random(tiny_config(), seed);
        let gm = GpuModel::new(gpu(), &model).unwrap();
        for (i, len) in [1, 5, 23].into_iter().enumerate() {
            let prompt = random_tokens(seed * 10 + i as u64, len, 509);
            let opts = SamplingOptions {
                max_tokens: 24,
                ..Default::default()
            };
            generate_case(&model, &gm, &prompt, &opts);
            total += 24;
        }
    }
    println!("greedy: {total} tokens equal over 4 seeds x 3 prompts");
}

#[test]
fn sampled_generation_and_stops_equal_the_cpu() {
    let (model, _) = Model::random(tiny_config(), 42);
    let gm = GpuModel::new(gpu(), &model).unwrap();
    let prompt = [1, 5, 17, 42];
    for seed in 0..4 {
        let opts = SamplingOptions {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            repetition_penalty: 1.3,
            max_tokens: 20,
            seed,
            ..Default::default()
        };
        generate_case(&model, &gm, &prompt, &opts);
    }
    // A stop token ends generation (and is included); the callback stops it too.
    let greedy = SamplingOptions {
        max_tokens: 20,
        ..Default::default()
    };
    let all = block(gm.generate(&prompt, &greedy, |_| true)).unwrap();
    let stop = SamplingOptions {
        stop_tokens: vec![all[5]],
        ..greedy.clone()
    };
    generate_case(&model, &gm, &prompt, &stop);
    let mut n = 0;
    let two = block(gm.generate(&prompt, &greedy, |_| {
        n += 1;
        n < 2
    }))
    .unwrap();
    assert_eq!(two, all[..2]);
    // Options and lengths are checked as on the CPU.
    let e = block(gm.generate(&[1; 250], &greedy, |_| true)).unwrap_err();
    assert!(
        matches!(e, GpuError::Model(Error::TooManyTokens { count: 270, .. })),
        "{e}"
    );
    let bad = SamplingOptions {
        top_p: 0.0,
        ..greedy
    };
    let e = block(gm.generate(&prompt, &bad, |_| true)).unwrap_err();
    assert!(e.to_string().contains("top_p"), "{e}");
}

/// The split path: a 16 KiB threshold cuts the tiny model's (509, 64) f32 embedding
/// (130 KB) into 8 chunks of up to 64 rows and a 37-token input into passes of 8 tokens
/// ((8, 509) f32 logits fit); 12 KiB gives 11 chunks of up to 48 rows and passes of 6.
#[test]
fn split_embedding_head_and_passes_equal_the_unsplit_model() {
    for (tied, seed, max_binding) in [(false, 31, 16 << 10), (true, 32, 12 << 10)] {
        let mut cfg = tiny_config();
        cfg.tie_word_embeddings = tied;
        let (model, _) = Model::random(cfg, seed);
        let v = model.config.vocab_size;
        let whole = GpuModel::new(gpu(), &model).unwrap();
        let split = GpuModel::with_max_binding(gpu(), &model, max_binding).unwrap();
        assert_eq!(whole.vocab_chunks(), 1);
        assert!(split.vocab_chunks() >= 8, "{} chunks", split.vocab_chunks());
        assert!(split.max_pass_tokens() < 37);
        let tokens = random_tokens(seed, 37, v);
        let want = block(whole.logits(&tokens)).unwrap();
        let got = block(split.logits(&tokens)).unwrap();
        assert!(
            got == want,
            "split logits differ (max abs {:.3e})",
            MODEL_LOGITS.compare(&got, &want).max_abs
        );
        against_cpu("split GPU vs CPU", &got, &model.logits(&tokens).unwrap(), v);
        let opts = SamplingOptions {
            max_tokens: 16,
            ..Default::default()
        };
        generate_case(&model, &split, &tokens, &opts);
        println!(
            "tied {tied}: {} vocab chunks, {} tokens per pass: logits equal the unsplit model",
            split.vocab_chunks(),
            split.max_pass_tokens()
        );
    }
}
