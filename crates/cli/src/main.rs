//! `bitlora`: the native command line over the same model code and WGSL kernels as the page.
//!
//! ```text
//! bitlora logits --model DIR --tokens 5,17,42 [--backend cpu|gpu]   one JSON object on stdout
//! bitlora generate --model DIR (--prompt TEXT | --tokens 1,2) [--backend cpu|gpu] [sampling]
//! bitlora bench decode [--shape 125m] [--backend cpu|gpu]           one JSON report on stdout
//! bitlora bench train [--shape 125m] [--backend cpu|gpu]            one JSON report on stdout
//! bitlora bench ternary [--shape 125m] --backend gpu                 ternary kernels at T = 128
//! bitlora train --data FILE --out DIR [--backend cpu|gpu] [options] fine-tunes a LoRA adapter
//! bitlora serve [--port N] [--root DIR] [--hub URL]...              serves the page
//! bitlora random-model --out DIR [--shape tiny | --config FILE] [--seed N]   a random BitNet model
//! bitlora export --adapter DIR --format gguf [--target llama|qvac] --out FILE   GGUF LoRA adapter
//! bitlora merge --adapter DIR --out DIR [--out-format safetensors|gguf] [--gguf-arch bitnet|bitnet-b1.58] [--gguf-type tq2_0|tq1_0|i2_s]  merged model
//! ```
//! `--model` takes a model directory or a `.gguf` file (llama.cpp / QVAC TQ1_0, TQ2_0;
//! bitnet.cpp I2_S); a .gguf's tokenizer.json and tokenizer_config.json are read beside it, and without a
//! tokenizer.json the tokenizer is rebuilt from the file's tokenizer.ggml.* keys (byte-level BPE),
//! without a tokenizer_config.json the chat template is the file's tokenizer.chat_template.
//! Errors go to stderr as one `error: ...` line and exit with status 1; bad flags exit with 2.

mod alloc;
mod bench;
mod bench_kernels;

/// bitlora's own pretrained model (MODEL_CARD.md), relative to the repository root.
pub const DEFAULT_MODEL: &str = "web/models/default";
mod serve;
mod train_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use bitlora_core::model::{self, Model};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "bitlora",
    version,
    about = "Fine-tune and run ternary BitNet b1.58 models; the native side of the bitlora page."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prints the logits of every position as one JSON object:
    /// {"tokens":[...],"logits":[[...V floats...], ...one row per position...]}
    Logits {
        /// Model directory (default: the bundled default model, run from the repository root): config.json and *.safetensors; or a .gguf file.
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        /// Comma-separated token ids, e.g. 5,17,42.
        #[arg(long, value_parser = parse_tokens)]
        tokens: TokenList,
        /// Where to run the forward pass: the CPU reference or the GPU (wgpu: Vulkan, Metal, ...).
        #[arg(long, value_enum, default_value_t = Backend::Cpu)]
        backend: Backend,
        /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors),
        /// applied unmerged as PEFT runs it (CPU or GPU backend).
        #[arg(long)]
        adapter: Option<PathBuf>,
    },
    /// Generates text after a prompt, streaming it to stdout as it is produced (batched
    /// prefill, then a KV cache; on the CPU reference or the GPU). Timing goes to stderr.
    Generate {
        /// Model directory (default: the bundled default model, run from the repository root): config.json, *.safetensors, and tokenizer.json for --prompt; or a .gguf file (tokenizer.json beside it, else the file's own tokenizer.ggml.*).
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        /// The prompt text (needs tokenizer.json in the model directory).
        #[arg(long, conflicts_with = "tokens", required_unless_present = "tokens")]
        prompt: Option<String>,
        /// The prompt as comma-separated token ids (for models without a tokenizer); the output
        /// is then token ids too.
        #[arg(long, value_parser = parse_tokens)]
        tokens: Option<TokenList>,
        /// Wrap the prompt as a user message in the model's chat template
        /// (tokenizer_config.json; for a .gguf without one, its tokenizer.chat_template) and
        /// stop at the end of the assistant's turn.
        #[arg(long, requires = "prompt")]
        chat: bool,
        /// Where to run the model: the CPU reference or the GPU (wgpu: Vulkan, Metal, ...).
        /// Sampling runs on the CPU either way, with the same sampler.
        #[arg(long, value_enum, default_value_t = Backend::Cpu)]
        backend: Backend,
        /// A PEFT LoRA adapter directory, applied unmerged as PEFT runs it (CPU or GPU backend).
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Runs a named benchmark workload on random weights and prints a JSON report
    /// (shared/BENCHMARKS-TARGETS.md): decode-<shape> = 128-token prompt, 128 generated tokens.
    Bench {
        /// Workload kind.
        #[arg(value_enum)]
        workload: Workload,
        /// Model shape.
        #[arg(long, value_enum, default_value_t = Shape::S125m)]
        shape: Shape,
        /// Prompt tokens (prefill); for train, tokens per training sequence.
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        /// Tokens to generate; for train, timed training steps (after 2 warm-up steps).
        #[arg(long, default_value_t = 128)]
        gen_len: usize,
        /// Seed of the random weights and prompt.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Where to run it: the CPU reference or the GPU (wgpu). The GPU report adds the
        /// adapter and `gpu_bytes` (decode: weights + KV cache + activations; train: weights +
        /// saved activations, adapter, gradients, scratch and AdamW's state).
        #[arg(long, value_enum, default_value_t = Backend::Cpu)]
        backend: Backend,
        /// train or decode with --backend gpu: time every kernel with GPU timestamp queries
        /// (where the device has TIMESTAMP_QUERY) and the host phases (train: upload,
        /// recording, submit to readback, AdamW: its GPU submit, or core's on the CPU with
        /// BITLORA_BENCH_CPU_ADAMW=1; decode: per token, recording and submit to the logits
        /// read back); prints a table on stderr and adds `profile` to the report.
        #[arg(long)]
        profile: bool,
        /// gguf: the file to write.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Fine-tunes a LoRA adapter on a text or JSONL file (CPU reference, or --backend gpu),
    /// with a progress bar, validation, checkpoints (Ctrl-C saves one) and PEFT adapter files
    /// in --out.
    Train(train_cmd::TrainArgs),
    /// Serves the page (index.html and web/) on localhost and prints its URL.
    Serve {
        /// Port to listen on; 0 picks a free one.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// The repository root that holds index.html and web/.
        #[arg(long, default_value = ".")]
        root: PathBuf,
        /// A hub the page may download models from (its Content-Security-Policy's connect-src);
        /// repeat for several. Default: https://huggingface.co (and its download hosts).
        /// `--hub none`: no other origin at all.
        #[arg(long = "hub", value_name = "URL")]
        hubs: Vec<String>,
    },
    /// Merges a PEFT LoRA adapter into a model with master (float) weights, as PEFT's
    /// merge_and_unload does (W += scale * B . A), and writes the merged model to --out
    /// (config.json, model.safetensors in f32, and the tokenizer files beside the model).
    Merge {
        #[arg(long, default_value = "web/models/default")]
        model: PathBuf,
        /// The PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// Output directory (created if missing; must not be the model's).
        #[arg(long)]
        out: PathBuf,
        /// safetensors: config.json + model.safetensors (f32 master weights); gguf: also
        /// model.gguf, the merged model re-quantized to ternary, with the model's
        /// tokenizer.json as tokenizer.ggml.* (none: no_vocab), for llama.cpp / QVAC /
        /// bitnet.cpp.
        #[arg(long, value_enum, default_value_t = OutFormat::Safetensors)]
        out_format: OutFormat,
        /// gguf: general.architecture. bitnet: the name upstream llama.cpp and QVAC Fabric
        /// read (tied head, TQ types only); bitnet-b1.58: bitnet.cpp's.
        #[arg(long, value_enum, default_value_t = GgufArchArg::Bitnet)]
        gguf_arch: GgufArchArg,
        /// gguf: the projections' type (TQ types need rows in whole 256-value blocks).
        /// Default: tq2_0; with --gguf-arch bitnet-b1.58, i2_s where rows are not whole blocks.
        #[arg(long, value_enum)]
        gguf_type: Option<GgufTypeArg>,
    },
    /// Exports a trained PEFT adapter for another runtime: `--format gguf` writes a GGUF LoRA
    /// adapter (llama.cpp's names, F32) for `llama-cli --lora` / `llama-export-lora`
    /// (`--target llama`) or QVAC Fabric's BitNet graph (`--target qvac`: each B multiplied by
    /// its projection's weight scale s_w, because that graph applies the per-tensor scale
    /// 1/s_w after adding the LoRA term).
    Export {
        /// The PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// The base model the adapter was trained on (directory or .gguf): its shapes, and
        /// for --target qvac its weight scales.
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        #[arg(long, value_enum)]
        format: ExportFormat,
        #[arg(long, value_enum, default_value_t = ExportTarget::Llama)]
        target: ExportTarget,
        /// The base model's general.architecture as the runtime knows it (llama.cpp and QVAC:
        /// bitnet; bitnet.cpp: bitnet-b1.58).
        #[arg(long, default_value = "bitnet")]
        arch: String,
        /// The file to write (e.g. adapter.gguf).
        #[arg(long)]
        out: PathBuf,
    },
    /// Writes a BitNet model with random bf16 master weights (config.json + model.safetensors).
    RandomModel {
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Model shape.
        #[arg(long, value_enum, default_value_t = Shape::Tiny)]
        shape: Shape,
        /// A config.json to draw random weights for, instead of --shape (e.g. a vocabulary
        /// larger than a phone's WebGPU binding limit: tests/browser/limits.test.mjs).
        #[arg(long, conflicts_with = "shape")]
        config: Option<PathBuf>,
        /// RNG seed: the same seed always gives the same bytes.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

#[derive(clap::Args)]
struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// 0 = greedy; higher is more random.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample only among the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: the smallest set of tokens with this much probability (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// > 1 discourages repeating tokens (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Extra stop token ids, comma-separated (the model's EOS always stops).
    #[arg(long, value_parser = parse_tokens)]
    stop: Option<TokenList>,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    Cpu,
    Gpu,
}

#[derive(Clone, Copy, ValueEnum)]
enum Workload {
    /// Prefill then KV-cached greedy decoding.
    Decode,
    /// LoRA training steps (r 8 on all seven projections, AdamW), one sequence per step.
    Train,
    /// The ternary forward and backward kernels alone, per projection shape, at T =
    /// --prompt-len (GPU only; --gen-len dispatches each, median).
    Ternary,
    /// Writes decode-<shape>'s random model (the same --seed) to --out as a TQ2_0 GGUF that
    /// llama.cpp loads (architecture bitnet, no vocabulary), to decode the same weights there.
    Gguf,
}

#[derive(Clone, Copy, ValueEnum)]
enum Shape {
    /// The bundled demo model: C 64, F 176, L 2, NH 4 (NKV 2), V 509.
    Tiny,
    /// Benchmark shape: C 768, F 3072, L 11, NH 12, V 32002 (~128 M parameters).
    #[value(name = "125m")]
    S125m,
    /// Benchmark shape: C 2048, F 3584, L 24, NH 32, V 32002 (~1.0 B parameters).
    #[value(name = "1b")]
    S1b,
    /// Benchmark shape of BitNet b1.58 2B-4T: C 2560, F 6912, L 30, NH 20 (NKV 5), V 128256.
    #[value(name = "2b4t")]
    S2b4t,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Tiny => "tiny",
            Shape::S125m => "125m",
            Shape::S1b => "1b",
            Shape::S2b4t => "2b4t",
        }
    }
}

#[derive(Clone, Debug)]
struct TokenList(Vec<u32>);

#[derive(Clone, Copy, ValueEnum)]
enum OutFormat {
    Safetensors,
    Gguf,
}

#[derive(Clone, Copy, ValueEnum)]
enum GgufArchArg {
    Bitnet,
    #[value(name = "bitnet-b1.58")]
    BitnetB158,
}

#[derive(Clone, Copy, ValueEnum)]
enum GgufTypeArg {
    #[value(name = "tq2_0")]
    Tq2_0,
    #[value(name = "tq1_0")]
    Tq1_0,
    #[value(name = "i2_s")]
    I2S,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    Gguf,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportTarget {
    Llama,
    Qvac,
}

fn parse_tokens(s: &str) -> Result<TokenList, String> {
    let tokens = s
        .split(',')
        .map(|t| {
            let t = t.trim();
            t.parse::<u32>().map_err(|_| {
                format!(
                    "\"{t}\" is not a token id (expected comma-separated non-negative integers)"
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TokenList(tokens))
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Model(#[from] bitlora_core::Error),
    #[error(transparent)]
    Gpu(#[from] bitlora_gpu::GpuError),
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
    #[error(transparent)]
    Train(#[from] train_cmd::TrainError),
    #[error("{0}: no tokenizer.json beside the model; pass the prompt as --tokens 1,2,3 instead")]
    NoTokenizer(String),
    #[error(
        "{0}: merge needs the model's master (float) weights (config.json + *.safetensors); a .gguf holds ternary ones. Merge into the safetensors checkpoint (with --out-format gguf for a GGUF result), or run the adapter unmerged (--adapter)"
    )]
    GgufMerge(String),
    #[error("{0}: no chat template there (a base model?); drop --chat")]
    NoChatTemplate(String),
    #[error("{0} runs on the GPU only: add --backend gpu")]
    GpuOnly(&'static str),
    #[error(
        "bench: shape {0} has no model of its own (use 125m, 1b or 2b4t), or the prompt exceeds its context"
    )]
    Bench(&'static str),
    #[error("{0} needs --out FILE")]
    NeedsOut(&'static str),
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
}

fn main() -> ExitCode {
    alloc::keep_freed_memory();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Logits {
            model,
            tokens,
            backend,
            adapter,
        } => logits(&model, &tokens.0, backend, adapter.as_deref()),
        Command::Generate {
            model,
            prompt,
            tokens,
            chat,
            backend,
            adapter,
            sampling,
        } => generate(
            &model,
            prompt.as_deref(),
            tokens.map(|t| t.0),
            chat,
            backend,
            adapter.as_deref(),
            &sampling,
        ),
        Command::Bench {
            workload: Workload::Decode,
            shape,
            prompt_len,
            gen_len,
            seed,
            backend,
            profile,
            ..
        } => {
            let report = match backend {
                Backend::Cpu => bench::decode_cpu(shape.name(), prompt_len, gen_len, seed),
                Backend::Gpu => {
                    bench::decode_gpu(shape.name(), prompt_len, gen_len, seed, profile)?
                }
            }
            .ok_or(CliError::Bench(shape.name()))?;
            if let Some(p) = &report.profile {
                eprint!("{}", p.table().replace("ms / step", "ms / token"));
            }
            eprintln!(
                "bitlora bench: {} on {}: prefill {:.1} tok/s, decode {:.1} tok/s, peak RSS {:.0} MiB",
                report.workload,
                report.backend,
                report.prefill_tokens_per_s,
                report.decode_tokens_per_s,
                report.peak_rss_mib.unwrap_or(f64::NAN)
            );
            println!(
                "{}",
                serde_json::to_string(&report).expect("a report serializes")
            );
            Ok(())
        }
        Command::Bench {
            workload: Workload::Ternary,
            shape,
            prompt_len,
            gen_len,
            seed,
            backend,
            profile: _,
            ..
        } => {
            let name = shape.name();
            if matches!(backend, Backend::Cpu) {
                return Err(CliError::GpuOnly("bench ternary"));
            }
            let report = bench_kernels::ternary_gpu(name, prompt_len, gen_len.max(1), seed)?
                .ok_or(CliError::Bench(name))?;
            println!(
                "{}",
                serde_json::to_string(&report).expect("a report serializes")
            );
            Ok(())
        }
        Command::Bench {
            workload: Workload::Train,
            shape,
            prompt_len,
            gen_len,
            seed,
            backend,
            profile,
            ..
        } => {
            // For train, --prompt-len is the sequence length and --gen-len the timed steps.
            let (name, steps) = (shape.name(), gen_len.max(1));
            let report = match backend {
                Backend::Cpu => bench::train_cpu(name, prompt_len, steps, 2, seed),
                Backend::Gpu => bench::train_gpu(name, prompt_len, steps, 2, seed, profile)?,
            }
            .ok_or(CliError::Bench(name))?;
            eprintln!(
                "bitlora bench: {} on {}: {:.1} tok/s (median step {:.3} s), peak RSS {:.0} MiB",
                report.workload,
                report.backend,
                report.tokens_per_s_median,
                report.step_seconds_median,
                report.peak_rss_mib.unwrap_or(f64::NAN)
            );
            println!(
                "{}",
                serde_json::to_string(&report).expect("a report serializes")
            );
            Ok(())
        }
        Command::Bench {
            workload: Workload::Gguf,
            shape,
            seed,
            out,
            ..
        } => {
            let out = out.ok_or(CliError::NeedsOut("bench gguf"))?;
            let bytes =
                bench::model_gguf(shape.name(), seed).ok_or(CliError::Bench(shape.name()))??;
            train_cmd::write_atomic(&out, &bytes)?;
            eprintln!(
                "bitlora bench: wrote decode-{}'s model (seed {seed}) as TQ2_0 GGUF to {}",
                shape.name(),
                out.display()
            );
            Ok(())
        }
        Command::Train(args) => Ok(train_cmd::run(&args)?),
        Command::Serve { port, root, hubs } => Ok(serve::serve(&root, port, &hubs)?),
        Command::Merge {
            model,
            adapter,
            out,
            out_format,
            gguf_arch,
            gguf_type,
        } => merge(&model, &adapter, &out, out_format, gguf_arch, gguf_type),
        Command::Export {
            adapter,
            model,
            format: ExportFormat::Gguf,
            target,
            arch,
            out,
        } => {
            let model = Model::from_path(&model)?;
            let lora = bitlora_core::peft::load_dir(&adapter, &model.config)?;
            let target = match target {
                ExportTarget::Llama => bitlora_core::gguf::AdapterTarget::Llama,
                ExportTarget::Qvac => bitlora_core::gguf::AdapterTarget::Qvac,
            };
            let bytes = bitlora_core::gguf::write_adapter(&lora, &model, target, &arch);
            train_cmd::write_atomic(&out, &bytes)?;
            eprintln!(
                "bitlora: wrote {} ({} bytes, {target:?} semantics)",
                out.display(),
                bytes.len()
            );
            Ok(())
        }
        Command::RandomModel {
            out,
            shape,
            config,
            seed,
        } => {
            let config = match config {
                Some(path) => {
                    let bytes = std::fs::read(&path).map_err(|source| {
                        CliError::Model(bitlora_core::Error::Io {
                            path: path.display().to_string(),
                            source,
                        })
                    })?;
                    bitlora_core::Config::from_json(&path.display().to_string(), &bytes)?
                }
                None => match shape.name() {
                    "tiny" => Some(model::tiny_config()),
                    name => model::bench_config(name),
                }
                .expect("every Shape has a config"),
            };
            let (_, tensors) = Model::random(config.clone(), seed);
            model::save_model_files(&out, &config, &tensors)?;
            eprintln!(
                "bitlora: wrote {}/config.json and model.safetensors",
                out.display()
            );
            Ok(())
        }
    }
}

fn logits(
    dir: &std::path::Path,
    tokens: &[u32],
    backend: Backend,
    adapter: Option<&std::path::Path>,
) -> Result<(), CliError> {
    let model = Model::from_path(dir)?;
    let lora = adapter
        .map(|a| bitlora_core::peft::load_dir(a, &model.config))
        .transpose()?;
    let logits = match backend {
        Backend::Cpu => model.forward_with_adapter(
            tokens,
            &mut bitlora_core::KvCache::new(&model.config),
            lora.as_ref(),
        )?,
        Backend::Gpu => {
            model.check_tokens(tokens)?;
            let gpu = pollster::block_on(bitlora_gpu::Gpu::new())?;
            eprintln!(
                "bitlora: GPU adapter {} ({})",
                gpu.info.name, gpu.info.backend
            );
            let mut gpu_model = bitlora_gpu::GpuModel::new(&gpu, &model)?;
            gpu_model.set_adapter(lora.as_ref())?;
            pollster::block_on(gpu_model.logits(tokens))?
        }
    };
    /// Field order and f32 values (shortest round-trip decimals) as the interface promises.
    #[derive(serde::Serialize)]
    struct LogitsJson<'a> {
        tokens: &'a [u32],
        logits: Vec<&'a [f32]>,
    }
    let out = LogitsJson {
        tokens,
        logits: logits.chunks_exact(model.config.vocab_size).collect(),
    };
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, &out).map_err(|e| CliError::Stdout(e.into()))?;
    writeln!(stdout).map_err(CliError::Stdout)?;
    Ok(())
}

fn merge(
    dir: &std::path::Path,
    adapter: &std::path::Path,
    out: &std::path::Path,
    out_format: OutFormat,
    gguf_arch: GgufArchArg,
    gguf_type: Option<GgufTypeArg>,
) -> Result<(), CliError> {
    let io = |p: &std::path::Path, source| {
        CliError::Model(bitlora_core::Error::Io {
            path: p.display().to_string(),
            source,
        })
    };
    if out.canonicalize().ok().is_some() && out.canonicalize().ok() == dir.canonicalize().ok() {
        return Err(CliError::Model(bitlora_core::Error::Lora {
            msg: "--out is the model's own directory; merge into a new one".into(),
        }));
    }
    if model::is_gguf(dir) {
        return Err(CliError::GgufMerge(dir.display().to_string()));
    }
    let model = Model::from_dir(dir)?;
    let lora = bitlora_core::peft::load_dir(adapter, &model.config)?;
    let index = dir.join("model.safetensors.index.json");
    let names: Vec<std::path::PathBuf> = if index.exists() {
        let v: serde_json::Value = serde_json::from_slice(&read_file(&index)?).map_err(|e| {
            CliError::Model(bitlora_core::Error::Data {
                file: index.display().to_string(),
                msg: e.to_string(),
            })
        })?;
        let mut files: Vec<String> = v["weight_map"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|f| f.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files.dedup();
        files.into_iter().map(|f| dir.join(f)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let bytes: Vec<Vec<u8>> = names
        .iter()
        .map(|p| read_file(p))
        .collect::<Result<_, _>>()?;
    let labels: Vec<String> = names.iter().map(|p| p.display().to_string()).collect();
    let files: Vec<(&str, &[u8])> = labels
        .iter()
        .map(String::as_str)
        .zip(bytes.iter().map(Vec::as_slice))
        .collect();
    let weights = bitlora_core::weights::WeightFiles::parse(&files)?;
    let merged = bitlora_core::merge::merge(&model.config, &weights, &lora)?;
    let st = bitlora_core::weights::serialize(&merged);
    let path = out.join("model.safetensors");
    // The GGUF before any file is written: a model the chosen runtime cannot load is refused
    // with the reason, and --out is left as it was.
    let gguf = match out_format {
        OutFormat::Safetensors => None,
        OutFormat::Gguf => Some(merged_gguf(dir, &model, &path, &st, gguf_arch, gguf_type)?),
    };
    std::fs::create_dir_all(out)
        .map_err(|e| train_cmd::TrainError::Write(out.display().to_string(), e))?;
    // Every file through a temporary name, fsynced and renamed (as `train` writes): a full
    // disk or a crash leaves no half-written file in --out, and the error says "cannot write".
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        let from = dir.join(f);
        if from.exists() {
            let bytes = std::fs::read(&from).map_err(|e| io(&from, e))?;
            train_cmd::write_atomic(&out.join(f), &bytes)?;
        }
    }
    train_cmd::write_atomic(&path, &st)?;
    if let Some(bytes) = gguf {
        train_cmd::write_atomic(&out.join("model.gguf"), &bytes)?;
    }
    eprintln!(
        "bitlora: merged {} ({} LoRA parameters) into {}",
        adapter.display(),
        lora.num_params(),
        out.display()
    );
    Ok(())
}

/// The merged master weights `st`, quantized as the model loads them, as a ternary GGUF for
/// `arch`, with `dir`'s tokenizer.json (if any) as `tokenizer.ggml.*`.
fn merged_gguf(
    dir: &std::path::Path,
    model: &Model,
    path: &std::path::Path,
    st: &[u8],
    arch: GgufArchArg,
    ty: Option<GgufTypeArg>,
) -> Result<Vec<u8>, CliError> {
    use bitlora_core::gguf::{GgmlType, GgufArch, write_model_as};
    let mut config = model.config.clone();
    config.weight_format = bitlora_core::WeightFormat::Master;
    let cfg = serde_json::to_vec(&config.to_json()).expect("JSON serializes");
    let merged = Model::from_bytes("config.json", &cfg, &[(&path.display().to_string(), st)])?;
    let arch = match arch {
        GgufArchArg::Bitnet => GgufArch::Bitnet,
        GgufArchArg::BitnetB158 => GgufArch::BitnetB158,
    };
    let tok_path = dir.join("tokenizer.json");
    let tok_bytes = if tok_path.exists() {
        Some(read_file(&tok_path)?)
    } else {
        None
    };
    let label = tok_path.display().to_string();
    let tok = tok_bytes.as_deref().map(|b| (label.as_str(), b));
    // The chat template goes along as tokenizer.chat_template (convert_hf_to_gguf.py's key).
    let tc_path = dir.join("tokenizer_config.json");
    let chat_template = if tc_path.exists() {
        bitlora_core::ChatTemplate::source_in_tokenizer_config(
            &tc_path.display().to_string(),
            &read_file(&tc_path)?,
        )?
    } else {
        None
    };
    let write = |t| write_model_as(&merged, arch, t, tok, chat_template.as_deref());
    let bytes = match ty {
        Some(GgufTypeArg::Tq2_0) => write(GgmlType::TQ2_0)?,
        Some(GgufTypeArg::Tq1_0) => write(GgmlType::TQ1_0)?,
        Some(GgufTypeArg::I2S) => write(GgmlType::I2_S)?,
        // bitnet.cpp reads I2_S: the old default, TQ2_0 where rows allow, else I2_S.
        None if arch == GgufArch::BitnetB158 => {
            write(GgmlType::TQ2_0).or_else(|_| write(GgmlType::I2_S))?
        }
        None => write(GgmlType::TQ2_0).map_err(|e| match e {
            bitlora_core::Error::TensorShape { name, actual, .. } => {
                bitlora_core::Error::GgufMetadata {
                    file: "(gguf export)".into(),
                    key: name,
                    problem: format!(
                        "has rows of {} values; llama.cpp's TQ1_0/TQ2_0 need whole 256-value blocks and it has no I2_S: use --gguf-arch bitnet-b1.58 for bitnet.cpp (I2_S)",
                        actual.get(1).copied().unwrap_or_default()
                    ),
                }
            }
            e => e,
        })?,
    };
    if arch == GgufArch::Bitnet
        && matches!(merged.config.hidden_act, bitlora_core::Activation::Relu2)
    {
        eprintln!(
            "bitlora: note: llama.cpp's bitnet graph gates the FFN with SiLU; this model's hidden_act is relu², so llama.cpp computes another function than bitlora from the same weights"
        );
    }
    Ok(bytes)
}

fn read_file(path: &std::path::Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|source| {
        CliError::Model(bitlora_core::Error::Io {
            path: path.display().to_string(),
            source,
        })
    })
}

fn generate(
    dir: &std::path::Path,
    prompt: Option<&str>,
    tokens: Option<Vec<u32>>,
    chat: bool,
    backend: Backend,
    adapter: Option<&std::path::Path>,
    args: &SamplingArgs,
) -> Result<(), CliError> {
    use bitlora_core::{ChatTemplate, Message, SamplingOptions, TextStream, Tokenizer};
    use std::io::Write;

    let model = Model::from_path(dir)?;
    let lora = adapter
        .map(|a| bitlora_core::peft::load_dir(a, &model.config))
        .transpose()?;
    let (gguf, model_path) = (model::is_gguf(dir), dir);
    let dir = model::side_dir(dir);
    let mut stop_tokens = model.config.eos_token_ids.clone();
    stop_tokens.extend(args.stop.iter().flat_map(|s| s.0.iter().copied()));

    let tokenizer = match prompt {
        None => None,
        Some(_) => {
            let path = dir.join("tokenizer.json");
            if !path.exists() && gguf {
                // No tokenizer.json beside the .gguf: the file's own tokenizer.ggml.* keys.
                Some(bitlora_core::gguf::read_tokenizer(model_path)?)
            } else if !path.exists() {
                return Err(CliError::NoTokenizer(dir.display().to_string()));
            } else {
                Some(Tokenizer::from_bytes(
                    &path.display().to_string(),
                    &read_file(&path)?,
                )?)
            }
        }
    };
    let prompt_ids = match (prompt, &tokenizer) {
        (Some(text), Some(tok)) => {
            let text = if chat {
                let cfg_path = dir.join("tokenizer_config.json");
                // tokenizer_config.json beside the model wins; without one, a .gguf's own
                // tokenizer.chat_template.
                let (template, source) = if !cfg_path.exists() && gguf {
                    (
                        bitlora_core::gguf::read_chat_template(model_path)?,
                        format!("{} (tokenizer.chat_template)", model_path.display()),
                    )
                } else {
                    (
                        ChatTemplate::from_tokenizer_config(
                            &cfg_path.display().to_string(),
                            &read_file(&cfg_path)?,
                        )?,
                        format!("{} (chat_template)", cfg_path.display()),
                    )
                };
                let template = template.ok_or(CliError::NoChatTemplate(source))?;
                // The end-of-turn token ends the reply (LLaMA-3: <|eot_id|>).
                stop_tokens.extend(
                    ["<|eot_id|>", "<|im_end|>", "<end_of_turn>"]
                        .iter()
                        .filter_map(|t| tok.token_to_id(t)),
                );
                template.render(
                    &[Message {
                        role: "user".into(),
                        content: text.to_string(),
                    }],
                    true,
                )?
            } else {
                text.to_string()
            };
            // A chat template writes the BOS itself; a plain prompt gets the tokenizer's own.
            tok.encode(&text, !chat)?
        }
        _ => tokens.unwrap_or_default(),
    };

    let opts = SamplingOptions {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        max_tokens: args.max_tokens,
        stop_tokens,
        seed: args.seed,
    };
    // The GPU is set up (adapter, weight upload, pipelines) before the clock starts.
    let gpu_model = match backend {
        Backend::Cpu => None,
        Backend::Gpu => {
            let gpu = pollster::block_on(bitlora_gpu::Gpu::new())?;
            eprintln!(
                "bitlora: GPU adapter {} ({})",
                gpu.info.name, gpu.info.backend
            );
            let mut gpu_model = bitlora_gpu::GpuModel::new(&gpu, &model)?;
            gpu_model.set_adapter(lora.as_ref())?;
            Some(gpu_model)
        }
    };
    let mut stdout = std::io::stdout().lock();
    let mut stream = tokenizer.as_ref().map(TextStream::new);
    let mut write_err = None;
    let mut first_token_at = None;
    let start = std::time::Instant::now();
    let on_token = |id| {
        first_token_at.get_or_insert_with(std::time::Instant::now);
        let piece = match &mut stream {
            Some(s) => match s.push(id) {
                Ok(p) => p.unwrap_or_default(),
                Err(e) => {
                    write_err = Some(CliError::Model(e));
                    return false;
                }
            },
            None => format!("{id} "),
        };
        if let Err(e) = stdout
            .write_all(piece.as_bytes())
            .and_then(|_| stdout.flush())
        {
            write_err = Some(CliError::Stdout(e));
            return false;
        }
        true
    };
    let out = match &gpu_model {
        None => bitlora_core::generate_with_adapter(
            &model,
            lora.as_ref(),
            &prompt_ids,
            &opts,
            on_token,
        )?,
        Some(gm) => pollster::block_on(gm.generate(&prompt_ids, &opts, on_token))?,
    };
    if let Some(e) = write_err {
        return Err(e);
    }
    writeln!(stdout)
        .and_then(|_| stdout.flush())
        .map_err(CliError::Stdout)?;
    let prefill = first_token_at.map_or(start.elapsed(), |t| t - start);
    let decode = start.elapsed() - prefill;
    eprintln!(
        "bitlora: prompt {} tokens in {:.3} s ({:.1} tok/s prefill); generated {} tokens, {:.1} tok/s decode",
        prompt_ids.len(),
        prefill.as_secs_f64(),
        prompt_ids.len() as f64 / prefill.as_secs_f64(),
        out.len(),
        out.len().saturating_sub(1) as f64 / decode.as_secs_f64().max(1e-9),
    );
    Ok(())
}
