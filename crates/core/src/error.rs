//! The one error type of bitlora-core. Every variant names the file, tensor or op involved and,
//! where it helps, what to do about it; the wasm boundary turns these into `JsError`s unchanged.

/// Result with bitlora-core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{file}: not valid JSON: {msg}")]
    Json { file: String, msg: String },

    /// A sharded model's `model.safetensors.index.json` that is JSON but not a usable index.
    #[error("{file}: {msg}")]
    ShardIndex { file: String, msg: String },

    #[error("{file}: field `{field}` {problem}")]
    ConfigField {
        file: String,
        field: &'static str,
        problem: String,
    },

    #[error(
        "{file}: unsupported model_type \"{model_type}\"; bitlora runs BitNet b1.58 checkpoints (model_type \"bitnet\", or \"llama\" with architectures [\"BitnetForCausalLM\"] as 1bitLLM's)"
    )]
    UnsupportedModelType { file: String, model_type: String },

    #[error("{file}: not a safetensors file: {msg}")]
    NotSafetensors { file: String, msg: String },

    #[error(
        "{file}: truncated: the header says the tensor data needs {expected} bytes but the file has {actual} (an interrupted download or copy: get the file again)"
    )]
    Truncated {
        file: String,
        expected: u64,
        actual: u64,
    },

    #[error(
        "no safetensors weights given (expected model.safetensors or *.safetensors beside config.json)"
    )]
    NoWeights,

    #[error("tensor `{name}` is missing from {files}")]
    MissingTensor { name: String, files: String },

    #[error("{file}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        file: String,
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    /// A tensor whose contents (not its shape or dtype) cannot be a BitNet weight: an invalid
    /// packed code, a scale that is not a positive number. Bad input, not a bug.
    #[error("{file}: tensor `{name}` {what}; the file is damaged or not a BitNet checkpoint")]
    BadValue {
        file: String,
        name: String,
        what: String,
    },

    #[error("{file}: tensor `{name}` has dtype {dtype}, expected {expected}")]
    TensorDtype {
        file: String,
        name: String,
        dtype: String,
        expected: &'static str,
    },

    #[error(
        "token id {token} at position {position} is out of range: the vocabulary has {vocab} tokens"
    )]
    TokenOutOfRange {
        token: u32,
        position: usize,
        vocab: usize,
    },

    #[error("{count} tokens exceed the model's context of {max} positions")]
    TooManyTokens { count: usize, max: usize },

    #[error("no tokens given: a forward pass needs at least one token id")]
    NoTokens,

    #[error("{file}: {msg}")]
    Tokenizer { file: String, msg: String },

    #[error("{file}: chat_template: {msg}")]
    ChatTemplate { file: String, msg: String },

    #[error("{file}: {msg}")]
    Data { file: String, msg: String },

    /// A line of a JSONL data file (1-based) that cannot be read; front ends point at it.
    #[error("{file}: line {line}: {msg}")]
    DataLine {
        file: String,
        line: usize,
        msg: String,
    },

    #[error("LoRA: {msg}")]
    Lora { msg: String },

    #[error("sampling option `{option}` {msg}")]
    Sampling { option: &'static str, msg: String },

    #[error(
        "{file}: not a GGUF file (it starts with {magic:?}, not \"GGUF\"); bitlora reads GGUF models from llama.cpp, QVAC Fabric and bitnet.cpp"
    )]
    NotGguf { file: String, magic: [u8; 4] },

    #[error("{file}: GGUF version {version} is not supported (versions 2 and 3 are)")]
    GgufVersion { file: String, version: u32 },

    /// The header or a tensor's data runs past the end of the bytes there are.
    #[error(
        "{file}: truncated: {what} needs {needed} bytes at offset {offset} but the file has {len} (an interrupted download or copy: get the file again)"
    )]
    GgufTruncated {
        file: String,
        what: String,
        offset: u64,
        needed: u64,
        len: u64,
    },

    /// A count in the header that the remaining bytes cannot hold (checked before allocating).
    #[error(
        "{file}: the {what} is {count}, but the rest of the file can hold at most {max}; the file is damaged"
    )]
    GgufCount {
        file: String,
        what: &'static str,
        count: u64,
        max: u64,
    },

    #[error("{file}: metadata `{key}` has the unknown value type {type_id} (at offset {offset})")]
    GgufValueType {
        file: String,
        key: String,
        type_id: u32,
        offset: u64,
    },

    #[error("{file}: tensor `{tensor}` has the unknown ggml type {type_id}")]
    GgufTensorType {
        file: String,
        tensor: String,
        type_id: u32,
    },

    #[error(
        "{file}: tensor `{tensor}` starts at data offset {offset}, not a multiple of the alignment {alignment}"
    )]
    GgufAlignment {
        file: String,
        tensor: String,
        offset: u64,
        alignment: u64,
    },

    #[error("{file}: metadata `{key}` {problem}")]
    GgufMetadata {
        file: String,
        key: String,
        problem: String,
    },

    /// Any other structural problem of a GGUF header, at a byte offset.
    #[error("{file}: {msg} (at offset {offset})")]
    GgufFormat {
        file: String,
        offset: u64,
        msg: String,
    },

    /// A shape check inside an op failed: a bug in the caller, not bad user input.
    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },
}
