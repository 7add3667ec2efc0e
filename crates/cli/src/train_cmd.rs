//! `bitlora train`: LoRA fine-tuning of a model directory on a data file, on the CPU reference
//! or (`--backend gpu`) on the GPU through wgpu, with the same loop (bitlora_core::trainer).
//!
//! Writes into `--out`: `adapter_model.safetensors` + `adapter_config.json` (PEFT's files),
//! `checkpoint.safetensors` (every `--checkpoint-every` steps, at the end and on Ctrl-C) and
//! `train_log.jsonl` (one line per step). Files are written to a temporary name and renamed,
//! so an interruption never leaves a half-written file. `--resume` continues from the
//! checkpoint in `--out`; an interrupted run loses at most the steps since the last one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bitlora_core::data::{self, Dataset};
use bitlora_core::lora::{Lora, LoraConfig};
use bitlora_core::optim::{AdamWConfig, Schedule};
use bitlora_core::tokenizer::{eos_token_text, training_eos};
use bitlora_core::trainer::{Backend, Checkpoint, CpuBackend, TrainOptions, Trainer};
use bitlora_core::{ChatTemplate, ConfigError, Error, Model, Tokenizer, TrainConfig, peft};
use bitlora_gpu::{Gpu, GpuBackend, GpuError, GpuModel, GpuTrainer};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Model directory (default: the bundled default model, run from the repository root): config.json, *.safetensors, tokenizer.json (tokenizer_config.json for chat data); or a .gguf file (tokenizer.json beside it, else the file's own tokenizer.ggml.*; tokenizer_config.json beside it, else its tokenizer.chat_template).
    #[arg(long, default_value = crate::DEFAULT_MODEL)]
    model: PathBuf,
    /// Training data: plain text, or JSONL with {"text"}, {"prompt","completion"} or {"messages"}.
    #[arg(long)]
    data: PathBuf,
    /// Output directory for the adapter, checkpoint and log.
    #[arg(long)]
    out: PathBuf,
    /// LoRA rank r.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (scale = alpha / r).
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    /// LoRA dropout on the adapter's input.
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Scale by alpha / sqrt(r) (rsLoRA).
    #[arg(long)]
    rslora: bool,
    /// Target modules, comma-separated (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj) or all-linear.
    #[arg(long, default_value = "all-linear")]
    targets: String,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f32,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Learning-rate schedule after warmup.
    #[arg(long, value_enum, default_value_t = ScheduleArg::Cosine)]
    schedule: ScheduleArg,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f32,
    /// Global gradient-norm clipping (0: off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    /// Optimizer steps (default: one epoch).
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<usize>,
    /// Passes over the training data.
    #[arg(long)]
    epochs: Option<f64>,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Sequences per optimizer step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Validation loss every N steps (0: only at the end).
    #[arg(long, default_value_t = 20)]
    eval_every: usize,
    /// Share of the data held out for validation (ignored with --val-data).
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f32,
    /// A separate validation file (same formats as --data); all of --data is then trained on.
    #[arg(long)]
    val_data: Option<PathBuf>,
    /// At most this many validation sequences, a seeded sample (0: all); with --val-fraction
    /// the rest of the share is trained on.
    #[arg(long, default_value_t = bitlora_core::train_config::DEFAULT_MAX_VAL_SEQUENCES)]
    max_val_sequences: usize,
    /// Stop (and save) once this many minutes of training have passed.
    #[arg(long, value_parser = parse_minutes)]
    max_minutes: Option<f64>,
    /// Count the loss on completions / assistant turns only.
    #[arg(long)]
    completions_only: bool,
    /// Save a checkpoint every N steps (0: only at the end and on Ctrl-C).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Continue from OUT/checkpoint.safetensors.
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Start a new run in an OUT that holds one (its checkpoint, adapter and log are replaced).
    #[arg(long)]
    overwrite: bool,
    /// Seed of the split, data order, dropout and adapter init.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the forward and backward run: the CPU reference or the GPU (wgpu: Vulkan, Metal or
    /// DX12 natively). The optimizer, data and checkpoints are the same either way.
    #[arg(long, value_enum, default_value_t = crate::Backend::Cpu)]
    backend: crate::Backend,
    /// GPU training: recompute each layer's activations in the backward instead of keeping
    /// every layer's (less GPU memory for about one more forward pass of work a step; the same
    /// results). auto: on where memory is short (a device with a phone's limits).
    #[arg(long, value_enum, default_value_t = RecomputeArg::Auto)]
    recompute: RecomputeArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum RecomputeArg {
    Auto,
    On,
    Off,
}

impl RecomputeArg {
    /// As core's `TrainConfig::recompute`: None for auto.
    fn forced(self) -> Option<bool> {
        match self {
            RecomputeArg::Auto => None,
            RecomputeArg::On => Some(true),
            RecomputeArg::Off => Some(false),
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ScheduleArg {
    Cosine,
    Linear,
    Constant,
}

impl From<ScheduleArg> for Schedule {
    fn from(s: ScheduleArg) -> Schedule {
        match s {
            ScheduleArg::Cosine => Schedule::Cosine,
            ScheduleArg::Linear => Schedule::Linear,
            ScheduleArg::Constant => Schedule::Constant,
        }
    }
}

impl TrainArgs {
    /// The flags as core's training config (the one the page uses too), not yet validated.
    fn config(&self) -> TrainConfig {
        TrainConfig {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            targets: self
                .targets
                .split(',')
                .map(|t| t.trim().to_string())
                .collect(),
            rslora: self.rslora,
            lr: self.lr,
            schedule: self.schedule.into(),
            warmup: self.warmup,
            weight_decay: self.weight_decay,
            // 0: off.
            max_grad_norm: (self.max_grad_norm != 0.0).then_some(self.max_grad_norm),
            steps: self.steps,
            epochs: self.epochs,
            batch: self.batch,
            eval_every: self.eval_every,
            context: self.context,
            completion_only: self.completions_only,
            // With --val-data, all of --data is trained on.
            val_fraction: if self.val_data.is_some() {
                0.0
            } else {
                self.val_fraction
            },
            max_val_sequences: self.max_val_sequences,
            seed: self.seed,
            checkpoint_every: self.checkpoint_every,
            name: None,
            recompute: self.recompute.forced(),
        }
    }
}

/// The flag of a training option (`weightDecay` -> `--weight-decay`).
fn flag(field: &str) -> String {
    if field == "completionOnly" {
        return "--completions-only".into();
    }
    let mut out = String::from("--");
    for ch in field.chars() {
        if ch.is_ascii_uppercase() {
            out.push('-');
        }
        out.push(ch.to_ascii_lowercase());
    }
    out
}

/// A config error with the option named as its flag ("--rank is 0; it must be ...").
fn flag_message(e: &ConfigError) -> String {
    match &e.field {
        Some(f) => format!("{} {}", flag(f), e.problem),
        None => e.message.clone(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Core(#[from] Error),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("{}", flag_message(.0))]
    Config(#[from] ConfigError),
    #[error("{0}: cannot write: {1}")]
    Write(String, std::io::Error),
    #[error(
        "{0}: no tokenizer.json beside the model: training on text needs the model's tokenizer"
    )]
    NoTokenizer(String),
    #[error("{0}: no checkpoint.safetensors to resume from")]
    NoCheckpoint(String),
    #[error("interrupted at step {0}; checkpoint saved: continue with --resume")]
    Interrupted(usize),
    #[error(
        "{0} already holds a run ({1}); continue it with --resume, or start over with --overwrite"
    )]
    RunExists(String, String),
    #[error(
        "{0}: another `bitlora train` is writing into this directory; wait for it to finish or use another --out"
    )]
    Locked(String),
    #[error(
        "every one of the {0} steps was skipped (non-finite loss or gradients): nothing was learned; lower --lr or check the data"
    )]
    AllSkipped(usize),
}

fn read(path: &Path) -> Result<Vec<u8>, TrainError> {
    std::fs::read(path).map_err(|source| {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
        .into()
    })
}

fn open(path: &Path) -> Result<std::io::BufReader<std::fs::File>, TrainError> {
    let f = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(std::io::BufReader::with_capacity(1 << 16, f))
}

/// Writes `bytes` to `path` through a temporary file of its own (this process's id in the
/// name), flushed to the disk before the rename, so a crash, a full disk or a second writer
/// never leaves a half-written file under `path`; on an error the temporary file is removed.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let err = |e| TrainError::Write(path.display().to_string(), e);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(err)?;
    // The rename itself reaches the disk with the directory's entry.
    if let Some(dir) = path.parent().and_then(|d| std::fs::File::open(d).ok()) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// An exclusive lock on `out` for this run: a lock file held (`flock`) while the process
/// lives, released by the OS when it exits, however it exits (no stale lock after a crash).
fn lock_out(out: &Path) -> Result<std::fs::File, TrainError> {
    let path = out.join(".bitlora-train.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| TrainError::Write(path.display().to_string(), e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(TrainError::Locked(out.display().to_string()))
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(TrainError::Write(path.display().to_string(), e))
        }
    }
}

fn save_adapter(out: &Path, lora: &Lora, model: &Model, base: &str) -> Result<(), TrainError> {
    let tensors = peft::adapter_tensors(lora, &model.config);
    write_atomic(
        &out.join("adapter_model.safetensors"),
        &bitlora_core::weights::serialize(&tensors),
    )?;
    let cfg = serde_json::to_string_pretty(&peft::adapter_config_json(&lora.config, base))
        .expect("JSON serializes");
    write_atomic(&out.join("adapter_config.json"), cfg.as_bytes())
}

pub fn run(a: &TrainArgs) -> Result<(), TrainError> {
    let model = Model::from_path(&a.model)?;
    let side = bitlora_core::model::side_dir(&a.model);
    let tok_path = side.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        Tokenizer::from_bytes(&tok_path.display().to_string(), &read(&tok_path)?)?
    } else if bitlora_core::model::is_gguf(&a.model) {
        // No tokenizer.json beside the .gguf: the file's own tokenizer.ggml.* keys.
        bitlora_core::gguf::read_tokenizer(&a.model)?
    } else {
        return Err(TrainError::NoTokenizer(a.model.display().to_string()));
    };
    let tc_path = side.join("tokenizer_config.json");
    let tc_bytes = if tc_path.exists() {
        Some(read(&tc_path)?)
    } else {
        None
    };
    let chat = match &tc_bytes {
        Some(b) => ChatTemplate::from_tokenizer_config(&tc_path.display().to_string(), b)?,
        // No tokenizer_config.json beside the .gguf: the file's own tokenizer.chat_template.
        None if bitlora_core::model::is_gguf(&a.model) => {
            bitlora_core::gguf::read_chat_template(&a.model)?
        }
        None => None,
    };
    // The end-of-text token: the tokenizer's own (tokenizer_config.json's eos_token) when it
    // names one the tokenizer knows, else the model config's eos_token_id.
    let eos_text = tc_bytes.as_deref().and_then(eos_token_text);
    let eos = training_eos(eos_text.as_deref(), Some(&tokenizer), &model.config);
    let config = a.config();
    config.validate(&model.config)?;

    let data_name = a.data.display().to_string();
    let opts = config.data_options();
    // Read as a stream and tokenised as it goes: memory grows with the sequences kept, not
    // with the file (issue 15).
    let mut dataset = data::load(
        &data_name,
        open(&a.data)?,
        &tokenizer,
        chat.as_ref(),
        eos,
        &opts,
    )?;
    let format = dataset.format;
    if let Some(v) = &a.val_data {
        let name = v.display().to_string();
        let val = data::load(&name, open(v)?, &tokenizer, chat.as_ref(), eos, &opts)?.train;
        dataset.val = data::sample(val, a.max_val_sequences, a.seed);
    }
    let train_tokens: usize = dataset.train.iter().map(|s| s.counted()).sum();
    eprintln!(
        "bitlora train: {} ({format}): {} training sequences ({train_tokens} target tokens), {} validation{}",
        data_name,
        dataset.train.len(),
        dataset.val.len(),
        if dataset.truncated > 0 {
            format!(", {} examples truncated to the context", dataset.truncated)
        } else {
            String::new()
        }
    );

    std::fs::create_dir_all(&a.out)
        .map_err(|e| TrainError::Write(a.out.display().to_string(), e))?;
    // Held until this function returns (or the process ends).
    let _lock = lock_out(&a.out)?;
    let ckpt_path = a.out.join("checkpoint.safetensors");
    if !a.resume && !a.overwrite {
        let held = ["checkpoint.safetensors", "adapter_model.safetensors"]
            .into_iter()
            .find(|f| a.out.join(f).exists());
        if let Some(f) = held {
            let what = match Checkpoint::read(
                &model.config,
                f,
                &std::fs::read(&ckpt_path).unwrap_or_default(),
            ) {
                Ok(c) => format!("a checkpoint at step {} of {}", c.steps().0, c.steps().1),
                Err(_) => f.to_string(),
            };
            return Err(TrainError::RunExists(a.out.display().to_string(), what));
        }
    }
    if a.overwrite {
        // A new run's log starts empty.
        let log = a.out.join("train_log.jsonl");
        if log.exists() {
            std::fs::remove_file(&log)
                .map_err(|e| TrainError::Write(log.display().to_string(), e))?;
        }
    }
    let start = if a.resume {
        if !ckpt_path.exists() {
            return Err(TrainError::NoCheckpoint(a.out.display().to_string()));
        }
        let ckpt = Checkpoint::read(
            &model.config,
            &ckpt_path.display().to_string(),
            &read(&ckpt_path)?,
        )?;
        let (step, steps) = ckpt.steps();
        eprintln!("bitlora train: resuming at step {step} of {steps}");
        Start::Resume(ckpt)
    } else {
        let steps = config.total_steps(dataset.train.len());
        let lora = Lora::init(&model.config, config.lora_config()?, a.seed);
        eprintln!(
            "bitlora train: LoRA r {} alpha {} on {}: {} trainable parameters, {steps} steps",
            a.rank,
            a.alpha,
            a.targets,
            lora.num_params()
        );
        let optim = config.adamw_config(steps);
        let options = config.train_options(steps);
        Start::New(lora, optim, options)
    };

    match a.backend {
        crate::Backend::Cpu => drive(
            a,
            &model,
            start.into_trainer(CpuBackend::new(&model), &model, dataset)?,
        ),
        crate::Backend::Gpu => {
            // The model's weights and the training step's buffers on the GPU, sized for the
            // longest sequence; the adapter and AdamW's state stay there too.
            let g = pollster::block_on(Gpu::new())?;
            let longest = dataset
                .train
                .iter()
                .chain(&dataset.val)
                .map(|s| s.tokens.len())
                .max()
                .unwrap_or(1);
            let mut gm = GpuModel::new(&g, &model)?;
            gm.set_recompute(a.recompute.forced().into());
            let gt = GpuTrainer::new(gm, start.lora_config(), longest)?;
            let trainer = start.into_trainer(GpuBackend::new(gt), &model, dataset)?;
            let b = trainer.backend();
            eprintln!(
                "bitlora train: on the GPU {} ({}): {:.0} MiB of weights, {:.0} MiB for training ({}), {:.1} MiB for the adapter and AdamW's state{}",
                g.info.name,
                g.info.backend,
                b.trainer().model().weight_bytes() as f64 / (1 << 20) as f64,
                b.trainer().bytes() as f64 / (1 << 20) as f64,
                if b.trainer().plan().recompute {
                    "activations recomputed in the backward"
                } else {
                    "every layer's activations kept"
                },
                (b.bytes() - b.trainer().bytes()) as f64 / (1 << 20) as f64,
                if b.resident() {
                    ""
                } else {
                    " (kept on the CPU: too large for one GPU binding)"
                }
            );
            drive(a, &model, trainer)
        }
    }
}

/// How a run starts: from scratch, or from a checkpoint.
enum Start {
    New(Lora, AdamWConfig, TrainOptions),
    Resume(Checkpoint),
}

impl Start {
    fn lora_config(&self) -> &LoraConfig {
        match self {
            Start::New(lora, ..) => &lora.config,
            Start::Resume(c) => c.lora_config(),
        }
    }

    fn into_trainer<B: Backend>(
        self,
        backend: B,
        model: &Model,
        data: Dataset,
    ) -> Result<Trainer<B>, B::Error> {
        match self {
            Start::New(lora, optim, options) => {
                Trainer::new(backend, &model.config, lora, optim, data, options)
            }
            Start::Resume(c) => Trainer::resume(backend, &model.config, data, c),
        }
    }
}

/// Runs `trainer` to the end (or Ctrl-C, or the time budget) with a progress bar, a JSONL log
/// and checkpoints: the CLI's driver around core's loop, the same for every backend.
fn drive<B: Backend>(
    a: &TrainArgs,
    model: &Model,
    mut trainer: Trainer<B>,
) -> Result<(), TrainError>
where
    TrainError: From<B::Error>,
{
    let ckpt_path = a.out.join("checkpoint.safetensors");
    // Ctrl-C asks the loop to stop after the current step and save.
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // If a handler cannot be set (e.g. one is already set), training still runs.
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }

    let base = a.model.display().to_string();
    let bar = indicatif::ProgressBar::new(trainer.options.steps as u64);
    bar.set_position(trainer.step as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < ETA {eta_precise}]",
        )
        .expect("a valid template"),
    );
    let log_path = a.out.join("train_log.jsonl");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| TrainError::Write(log_path.display().to_string(), e))?;
    let (start, mut tokens, mut last_val) = (Instant::now(), 0usize, None);
    let (mut ran, mut skipped) = (0usize, 0usize);
    if trainer.options.eval_every > 0
        && trainer.step == 0
        && let Some(v) = pollster::block_on(trainer.validate())?
    {
        eprintln!(
            "bitlora train: validation loss before training {v:.4} (perplexity {:.2})",
            v.exp()
        );
    }
    let deadline = a
        .max_minutes
        .map(|m| std::time::Duration::from_secs_f64(m * 60.0));
    while !trainer.done() {
        let r = pollster::block_on(trainer.step())?;
        tokens += r.tokens;
        last_val = r.val_loss.or(last_val);
        let tps = tokens as f64 / start.elapsed().as_secs_f64();
        bar.set_position(r.step as u64);
        bar.set_message(format!(
            "loss {:.4}  val {}  {:.0} tok/s",
            r.loss,
            last_val.map_or("-".to_string(), |v: f32| format!("{v:.4}")),
            tps
        ));
        ran += 1;
        if let Some(why) = &r.skipped {
            skipped += 1;
            bar.println(format!(
                "step {}: skipped, {why}; the adapter is unchanged",
                r.step
            ));
        }
        let line = serde_json::json!({"step": r.step, "epoch": r.epoch, "loss": r.loss, "val_loss": r.val_loss, "lr": r.lr,
            "grad_norm": r.grad_norm, "tokens": r.tokens, "tokens_per_s": tps, "skipped": r.skipped});
        writeln!(log, "{line}")
            .map_err(|e| TrainError::Write(log_path.display().to_string(), e))?;
        let interrupted = stop.load(Ordering::SeqCst);
        let out_of_time = deadline.is_some_and(|d| start.elapsed() >= d);
        if interrupted
            || out_of_time
            || trainer.done()
            || (a.checkpoint_every > 0 && r.step.is_multiple_of(a.checkpoint_every))
        {
            // One read of the adapter and Adam's moments (from the GPU, where they stay).
            let (checkpoint, adapter) = pollster::block_on(trainer.checkpoint_and_adapter())?;
            write_atomic(&ckpt_path, &checkpoint)?;
            save_adapter(&a.out, &adapter, model, &base)?;
        }
        if interrupted {
            bar.abandon();
            return Err(TrainError::Interrupted(r.step));
        }
        if out_of_time {
            bar.println(format!(
                "time budget of {} min reached at step {}; adapter and checkpoint saved",
                a.max_minutes.unwrap_or(0.0),
                r.step
            ));
            break;
        }
    }
    bar.finish();
    if ran > 0 && skipped == ran {
        return Err(TrainError::AllSkipped(ran));
    }
    let val = pollster::block_on(trainer.validate())?;
    eprintln!(
        "bitlora train: done: {} steps, {tokens} tokens in {:.1} s ({:.0} tok/s){}; adapter in {}{}",
        trainer.step,
        start.elapsed().as_secs_f64(),
        tokens as f64 / start.elapsed().as_secs_f64(),
        val.map_or(String::new(), |v| format!(
            ", validation loss {v:.4} (perplexity {:.2})",
            v.exp()
        )),
        a.out.display(),
        // The process's peak resident memory (Linux), data and model included.
        crate::bench::peak_rss_mib().map_or(String::new(), |m| format!("; peak memory {m:.0} MiB"))
    );
    Ok(())
}

/// `--max-minutes`: a finite number of minutes above 0, at most a year (a Duration holds it).
fn parse_minutes(s: &str) -> Result<f64, String> {
    const YEAR: f64 = 366.0 * 24.0 * 60.0;
    match s.trim().parse::<f64>() {
        Ok(m) if m.is_finite() && m > 0.0 && m <= YEAR => Ok(m),
        Ok(_) => Err(format!(
            "{s} is not a time limit; give minutes above 0 and at most {YEAR} (a year)"
        )),
        Err(_) => Err(format!("{s:?} is not a number of minutes")),
    }
}
