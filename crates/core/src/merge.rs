//! Merging a LoRA adapter into the base model's weights, as PEFT's `merge_and_unload` does:
//! `W' = W + scale * B . A` for every targeted projection, everything else unchanged.
//!
//! This is exact only for checkpoints that hold master (float) weights, which transformers
//! quantizes online at every forward: the merged model then quantizes W' and runs like PEFT's
//! merged model. A packed checkpoint (ternary bytes + scale) has no float weight to add to;
//! merging it is refused with a clear error (run the adapter unmerged with `--adapter`).
//! Note that the merged model's outputs differ from the unmerged adapter's: the delta goes
//! through the ternary quantizer with W. That is PEFT's semantics too.

use crate::config::{Config, WeightFormat};
use crate::error::{Error, Result};
use crate::lora::Lora;
use crate::weights::{OwnedTensor, WeightFiles};

/// The model's tensors with `lora` merged in (f32 for the merged projections; every other
/// tensor as f32 too, its values unchanged).
pub fn merge(config: &Config, weights: &WeightFiles, lora: &Lora) -> Result<Vec<OwnedTensor>> {
    if config.weight_format != WeightFormat::Master {
        return Err(Error::Lora {
            msg: "merging needs the base model's master (float) weights, and this checkpoint stores packed ternary weights; apply the adapter unmerged instead (--adapter)".into(),
        });
    }
    let scale = lora.config.scale();
    let r = lora.config.r;
    let mut out = Vec::new();
    for name in weights.names() {
        let (shape, float) = weights.info(name)?;
        if !float {
            return Err(Error::Lora {
                msg: format!("tensor {name} is not a float tensor; merging needs master weights"),
            });
        }
        let mut values = weights.f32(name, &shape)?;
        if let Some((l, p)) = target_of(name)
            && let Some(pair) = lora.layers.get(l).and_then(|layer| layer[p].as_ref())
        {
            let (o, i) = (shape[0], shape[1]);
            // W (O, I) += scale * B (O, R) . A (R, I)
            for (oo, row) in values.chunks_exact_mut(i).enumerate().take(o) {
                for rr in 0..r {
                    let g = scale * pair.b[oo * r + rr];
                    crate::ops::axpy(row, g, &pair.a[rr * i..(rr + 1) * i]);
                }
            }
        }
        out.push(OwnedTensor::f32(name, &shape, &values));
    }
    Ok(out)
}

/// (layer, projection in TARGETS order) of a projection weight's name.
fn target_of(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (l, rest) = rest.split_once('.')?;
    let module = rest.strip_suffix(".weight")?;
    let proj = module.rsplit('.').next()?;
    let p = crate::lora::TARGETS.iter().position(|t| *t == proj)?;
    Some((l.parse().ok()?, p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::LoraConfig;
    use crate::model::Model;
    use crate::rng::Rng;
    use std::path::Path;

    fn fixture(name: &str) -> (Vec<u8>, Vec<u8>) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/formats")
            .join(name);
        (
            std::fs::read(dir.join("config.json")).unwrap(),
            std::fs::read(dir.join("model.safetensors")).unwrap(),
        )
    }

    #[test]
    fn merged_weights_are_w_plus_scale_b_a_and_nothing_else_moves() {
        let (cfg_bytes, st) = fixture("master-f32-untied");
        let config = Config::from_json("config.json", &cfg_bytes).unwrap();
        let w = WeightFiles::parse(&[("model.safetensors", &st)]).unwrap();
        let mut lora = Lora::init(
            &config,
            LoraConfig::new(4, 8.0, 0.0, false, &["q_proj", "down_proj"]).unwrap(),
            3,
        );
        // PEFT's init has B = 0; give B values so the merge has something to add.
        let mut rng = Rng::new(5);
        lora.for_each_mut(|_, _, v| v.iter_mut().for_each(|x| *x = rng.normal() * 0.1));
        let merged = merge(&config, &w, &lora).unwrap();
        let scale = lora.config.scale();
        let mut changed = 0;
        for t in &merged {
            let (shape, _) = w.info(&t.name).unwrap();
            let before = w.f32(&t.name, &shape).unwrap();
            let after =
                WeightFiles::parse(&[("m", &crate::weights::serialize(std::slice::from_ref(t)))])
                    .unwrap()
                    .f32(&t.name, &shape)
                    .unwrap();
            match target_of(&t.name).filter(|&(l, p)| lora.layers[l][p].is_some()) {
                None => assert_eq!(before, after, "{} moved", t.name),
                Some((l, p)) => {
                    changed += 1;
                    let pair = lora.layers[l][p].as_ref().unwrap();
                    let (o, i, r) = (shape[0], shape[1], lora.config.r);
                    for (oo, ii) in [(0, 0), (o - 1, i - 1), (o / 2, i / 3)] {
                        let delta: f64 = (0..r)
                            .map(|rr| pair.b[oo * r + rr] as f64 * pair.a[rr * i + ii] as f64)
                            .sum::<f64>()
                            * scale as f64;
                        let got = after[oo * i + ii] as f64 - before[oo * i + ii] as f64;
                        assert!(
                            (got - delta).abs() <= 1e-5 * (1.0 + delta.abs()),
                            "{} ({oo},{ii}): {got} vs {delta}",
                            t.name
                        );
                    }
                }
            }
        }
        assert_eq!(changed, 2 * config.num_hidden_layers);
    }

    #[test]
    fn a_fresh_adapter_merges_to_the_same_model_and_packed_weights_are_refused() {
        let (cfg_bytes, st) = fixture("master-f32-untied");
        let config = Config::from_json("config.json", &cfg_bytes).unwrap();
        let w = WeightFiles::parse(&[("model.safetensors", &st)]).unwrap();
        let lora = Lora::init(
            &config,
            LoraConfig::new(4, 8.0, 0.0, false, &["all-linear"]).unwrap(),
            3,
        );
        let merged = crate::weights::serialize(&merge(&config, &w, &lora).unwrap());
        let a =
            Model::from_bytes("config.json", &cfg_bytes, &[("model.safetensors", &st)]).unwrap();
        let b = Model::from_bytes("config.json", &cfg_bytes, &[("model.safetensors", &merged)])
            .unwrap();
        let tokens = [1u32, 5, 9, 2];
        assert_eq!(a.logits(&tokens).unwrap(), b.logits(&tokens).unwrap());

        let (cfg_bytes, st) = fixture("packed-bitlinear");
        let config = Config::from_json("config.json", &cfg_bytes).unwrap();
        let w = WeightFiles::parse(&[("model.safetensors", &st)]).unwrap();
        let lora = Lora::init(
            &config,
            LoraConfig::new(4, 8.0, 0.0, false, &["all-linear"]).unwrap(),
            3,
        );
        let e = merge(&config, &w, &lora).err().unwrap().to_string();
        assert!(e.contains("master (float) weights"), "{e}");
    }
}
