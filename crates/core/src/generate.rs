//! Text generation on the CPU reference: batched prefill of the prompt, then one token at a time
//! with the KV cache, sampling as transformers' `generate` does.
//!
//! Sampling order (transformers' logits processors, then warpers): repetition penalty over every
//! token in the sequence so far (`logit < 0 ? logit * p : logit / p`), temperature, top-k,
//! top-p (keep the smallest set of most likely tokens whose probability reaches p, at least
//! one), then a draw from the softmax. Temperature 0 means greedy (argmax, lowest id on ties).

use crate::error::{Error, Result};
use crate::lora::Lora;
use crate::model::{KvCache, Model};
use crate::rng::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingOptions {
    /// 0 = greedy; otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Nucleus sampling threshold in (0, 1] (1 = off).
    pub top_p: f32,
    /// > 1 discourages tokens already in the sequence (1 = off).
    pub repetition_penalty: f32,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Generation ends after producing any of these (it is included in the output).
    pub stop_tokens: Vec<u32>,
    /// Seed of the sampling RNG: the same seed and inputs give the same text.
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            max_tokens: 64,
            stop_tokens: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplingOptions {
    /// Rejects values that have no meaning, naming the option.
    pub fn validate(&self) -> Result<()> {
        let bad = |option: &'static str, msg: String| Err(Error::Sampling { option, msg });
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(
                "temperature",
                format!(
                    "is {}; use 0 (greedy) or a positive number",
                    self.temperature
                ),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("is {}; it must be in (0, 1]", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition_penalty",
                format!(
                    "is {}; it must be positive (1 = off)",
                    self.repetition_penalty
                ),
            );
        }
        Ok(())
    }
}

/// Picks next tokens from logits according to [`SamplingOptions`].
pub struct Sampler {
    opts: SamplingOptions,
    rng: Rng,
}

impl Sampler {
    pub fn new(opts: SamplingOptions) -> Result<Sampler> {
        opts.validate()?;
        let rng = Rng::new(opts.seed);
        Ok(Sampler { opts, rng })
    }

    /// The next token given one row of logits (V) and the sequence so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let mut l = logits.to_vec();
        let p = self.opts.repetition_penalty;
        if p != 1.0 {
            let mut seen = vec![false; l.len()];
            for &t in history {
                if let Some(s) = seen.get_mut(t as usize)
                    && !*s
                {
                    *s = true;
                    let x = &mut l[t as usize];
                    *x = if *x < 0.0 { *x * p } else { *x / p };
                }
            }
        }
        if self.opts.temperature == 0.0 {
            return argmax(&l);
        }
        for x in &mut l {
            *x /= self.opts.temperature;
        }
        // Candidates, most likely first (ties: lower id first, deterministic).
        let mut idx: Vec<u32> = (0..l.len() as u32).collect();
        idx.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
        if self.opts.top_k > 0 {
            idx.truncate(self.opts.top_k.max(1));
        }
        let max = l[idx[0] as usize];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| libm::exp((l[i as usize] - max) as f64))
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if self.opts.top_p < 1.0 {
            let mut cum = 0.0;
            let keep = probs
                .iter()
                .position(|&q| {
                    cum += q;
                    cum >= self.opts.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            idx.truncate(keep);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.uniform() as f64 * total;
        for (&i, &q) in idx.iter().zip(&probs) {
            if r < q {
                return i;
            }
            r -= q;
        }
        *idx.last().expect("at least one candidate")
    }
}

/// Index of the largest logit, the lowest index among equals; a NaN is never chosen (0 when
/// every logit is NaN). `shaders/argmax.wgsl` applies the same rules on the GPU.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<usize> = None;
    for (i, &x) in logits.iter().enumerate() {
        if !x.is_nan() && best.is_none_or(|b| x > logits[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0) as u32
}

/// Generates up to `opts.max_tokens` tokens after `prompt`, calling `on_token` with each as soon
/// as it exists; `on_token` returns false to stop early. Returns the generated tokens.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    opts: &SamplingOptions,
    on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    generate_with_adapter(model, None, prompt, opts, on_token)
}

/// [`generate`] with a LoRA adapter applied (unmerged, as PEFT runs it).
pub fn generate_with_adapter(
    model: &Model,
    lora: Option<&Lora>,
    prompt: &[u32],
    opts: &SamplingOptions,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    let mut sampler = Sampler::new(opts.clone())?;
    let max = model.config.max_position_embeddings;
    if prompt.len() + opts.max_tokens > max {
        return Err(Error::TooManyTokens {
            count: prompt.len() + opts.max_tokens,
            max,
        });
    }
    let v = model.config.vocab_size;
    let mut cache = KvCache::new(&model.config);
    let mut seq = prompt.to_vec();
    let mut logits = model.forward_with_adapter(prompt, &mut cache, lora)?; // batched prefill: (T, V)
    let mut out = Vec::new();
    while out.len() < opts.max_tokens {
        let last = &logits[logits.len() - v..];
        let next = sampler.sample(last, &seq);
        seq.push(next);
        out.push(next);
        if !on_token(next) || opts.stop_tokens.contains(&next) {
            break;
        }
        if out.len() < opts.max_tokens {
            logits = model.forward_with_adapter(&[next], &mut cache, lora)?; // (1, V)
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny_config;

    fn model() -> Model {
        Model::random(tiny_config(), 42).0
    }

    #[test]
    fn cached_decoding_equals_the_full_pass_bit_for_bit() {
        let m = model();
        let tokens = [1, 5, 17, 42, 300, 7, 7, 7, 100, 200];
        let full = m.logits(&tokens).unwrap();
        let mut cache = KvCache::new(&m.config);
        let mut rows = m.forward(&tokens[..4], &mut cache).unwrap();
        for &t in &tokens[4..] {
            rows.extend(m.forward(&[t], &mut cache).unwrap());
        }
        assert_eq!(rows, full);
    }

    #[test]
    fn greedy_generation_equals_recomputing_argmax() {
        let m = model();
        let prompt = [3, 1, 4, 1, 5];
        let opts = SamplingOptions {
            max_tokens: 12,
            ..Default::default()
        };
        let mut streamed = Vec::new();
        let out = generate(&m, &prompt, &opts, |t| {
            streamed.push(t);
            true
        })
        .unwrap();
        let mut seq = prompt.to_vec();
        for _ in 0..12 {
            let l = m.logits(&seq).unwrap();
            seq.push(argmax(&l[l.len() - m.config.vocab_size..]));
        }
        assert_eq!(out, seq[prompt.len()..]);
        assert_eq!(streamed, out);
    }

    #[test]
    fn stop_tokens_and_callbacks_end_generation() {
        let m = model();
        let opts = SamplingOptions {
            max_tokens: 20,
            ..Default::default()
        };
        let all = generate(&m, &[1, 2, 3], &opts, |_| true).unwrap();
        let stop = SamplingOptions {
            stop_tokens: vec![all[2]],
            ..opts.clone()
        };
        let until = generate(&m, &[1, 2, 3], &stop, |_| true).unwrap();
        assert_eq!(
            until,
            all[..=all.iter().position(|&t| t == all[2]).unwrap()]
        );
        let two = generate(&m, &[1, 2, 3], &opts, {
            let mut n = 0;
            move |_| {
                n += 1;
                n < 2
            }
        })
        .unwrap();
        assert_eq!(two, all[..2]);
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_k() {
        let m = model();
        let opts = SamplingOptions {
            temperature: 1.0,
            top_k: 3,
            max_tokens: 16,
            seed: 9,
            ..Default::default()
        };
        let a = generate(&m, &[1, 2, 3], &opts, |_| true).unwrap();
        let b = generate(&m, &[1, 2, 3], &opts, |_| true).unwrap();
        assert_eq!(a, b, "same seed, same tokens");
        // With top_k = 1 sampling is greedy whatever the temperature.
        let k1 = SamplingOptions {
            top_k: 1,
            temperature: 5.0,
            ..opts.clone()
        };
        let greedy = SamplingOptions {
            max_tokens: 16,
            ..Default::default()
        };
        assert_eq!(
            generate(&m, &[1, 2, 3], &k1, |_| true).unwrap(),
            generate(&m, &[1, 2, 3], &greedy, |_| true).unwrap()
        );
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let logits = [0.0f32, 3.0, 2.9, -5.0];
        // probs ~ [0.025, 0.51, 0.46, 0.0003]: top_p 0.5 keeps only token 1.
        let mut s = Sampler::new(SamplingOptions {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        })
        .unwrap();
        assert!((0..50).all(|_| s.sample(&logits, &[]) == 1));
        let mut s = Sampler::new(SamplingOptions {
            temperature: 1.0,
            top_p: 0.9,
            ..Default::default()
        })
        .unwrap();
        let drawn: std::collections::BTreeSet<u32> =
            (0..200).map(|_| s.sample(&logits, &[])).collect();
        assert_eq!(drawn, [1, 2].into_iter().collect());
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        // 2.0 / 2 = 1.0 < 1.5, so token 1 wins once token 0 is penalised; negatives grow.
        let mut s = Sampler::new(SamplingOptions {
            repetition_penalty: 2.0,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.sample(&[2.0, 1.5, -1.0], &[0]), 1);
        assert_eq!(s.sample(&[2.0, 1.5, -1.0], &[]), 0);
    }

    #[test]
    fn bad_options_are_named() {
        let e = Sampler::new(SamplingOptions {
            top_p: 0.0,
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("top_p"), "{e}");
        let e = Sampler::new(SamplingOptions {
            temperature: -1.0,
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("temperature"), "{e}");
        let m = model();
        let e = generate(
            &m,
            &[1; 250],
            &SamplingOptions {
                max_tokens: 10,
                ..Default::default()
            },
            |_| true,
        )
        .unwrap_err();
        assert!(matches!(e, Error::TooManyTokens { .. }), "{e}");
    }
}
