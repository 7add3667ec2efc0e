//! `bitlora`: the native command line over the same model code and WGSL kernels as the page.
//!
//! ```text
//! bitlora logits --model DIR --tokens 5,17,42 [--backend cpu|gpu]   one JSON object on stdout
//! bitlora serve [--port N] [--root DIR]                             serves the page
//! bitlora random-model --out DIR [--shape tiny] [--seed N]          writes a random BitNet model
//! ```
//! Errors go to stderr as one `error: ...` line and exit with status 1; bad flags exit with 2.

mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use bitlora_core::model::{self, Model};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "bitlora", version, about = "Fine-tune and run ternary BitNet b1.58 models; the native side of the bitlora page.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prints the logits of every position as one JSON object:
    /// {"tokens":[...],"logits":[[...V floats...], ...one row per position...]}
    Logits {
        /// Model directory: config.json and *.safetensors.
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids, e.g. 5,17,42.
        #[arg(long, value_parser = parse_tokens)]
        tokens: TokenList,
        /// Where to run the forward pass: the CPU reference or the GPU (wgpu: Vulkan, Metal, ...).
        #[arg(long, value_enum, default_value_t = Backend::Cpu)]
        backend: Backend,
    },
    /// Serves the page (index.html and web/) on localhost and prints its URL.
    Serve {
        /// Port to listen on; 0 picks a free one.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// The repository root that holds index.html and web/.
        #[arg(long, default_value = ".")]
        root: PathBuf,
    },
    /// Writes a BitNet model with random bf16 master weights (config.json + model.safetensors).
    RandomModel {
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Model shape.
        #[arg(long, value_enum, default_value_t = Shape::Tiny)]
        shape: Shape,
        /// RNG seed: the same seed always gives the same bytes.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    Cpu,
    Gpu,
}

#[derive(Clone, Copy, ValueEnum)]
enum Shape {
    /// The bundled demo model: C 64, F 176, L 2, NH 4 (NKV 2), V 509.
    Tiny,
}

#[derive(Clone, Debug)]
struct TokenList(Vec<u32>);

fn parse_tokens(s: &str) -> Result<TokenList, String> {
    let tokens = s
        .split(',')
        .map(|t| {
            let t = t.trim();
            t.parse::<u32>().map_err(|_| format!("\"{t}\" is not a token id (expected comma-separated non-negative integers)"))
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
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
}

fn main() -> ExitCode {
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
        Command::Logits { model, tokens, backend } => logits(&model, &tokens.0, backend),
        Command::Serve { port, root } => Ok(serve::serve(&root, port)?),
        Command::RandomModel { out, shape, seed } => {
            let config = match shape {
                Shape::Tiny => model::tiny_config(),
            };
            let (_, tensors) = Model::random(config.clone(), seed);
            model::save_model_files(&out, &config, &tensors)?;
            eprintln!("bitlora: wrote {}/config.json and model.safetensors", out.display());
            Ok(())
        }
    }
}

fn logits(dir: &std::path::Path, tokens: &[u32], backend: Backend) -> Result<(), CliError> {
    let model = Model::from_dir(dir)?;
    let logits = match backend {
        Backend::Cpu => model.logits(tokens)?,
        Backend::Gpu => {
            model.check_tokens(tokens)?;
            let gpu = pollster::block_on(bitlora_gpu::Gpu::new())?;
            eprintln!("bitlora: GPU adapter {} ({})", gpu.info.name, gpu.info.backend);
            let gpu_model = bitlora_gpu::GpuModel::new(&gpu, &model)?;
            pollster::block_on(gpu_model.logits(tokens))?
        }
    };
    let rows: Vec<&[f32]> = logits.chunks_exact(model.config.vocab_size).collect();
    let out = serde_json::json!({ "tokens": tokens, "logits": rows });
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, &out).map_err(|e| CliError::Stdout(e.into()))?;
    writeln!(stdout).map_err(CliError::Stdout)?;
    Ok(())
}
