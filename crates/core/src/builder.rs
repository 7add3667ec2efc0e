//! Building a [`Model`] from tensors handed over one at a time, so that no whole safetensors
//! file need be in memory (the browser streams each tensor out of its IndexedDB chunks).
//!
//! ```text
//! let mut b = ModelBuilder::new("config.json", config_json)?;
//! for each file:   for span in b.add_file(name, first_bytes, file_len)?:   (the tensors it needs)
//!                      b.add_tensor(&span.name, bytes of span.start..span.end)?
//! let model = b.finish()?;
//! ```
//! Each tensor is converted when it arrives (floats to f32, master projections quantized to
//! ternary, packed bytes kept), so memory holds the model being built plus one tensor (with
//! [`ModelBuilder::add_tensor_from`], plus a 64 KiB piece of one). The
//! checks and error messages are those of [`Model::from_bytes`], and `finish` reports the same
//! first problem: the tensors are taken in the same order by the same code (`model::assemble`).

use std::collections::HashMap;

use safetensors::Dtype;

use crate::config::{Config, WeightFormat};
use crate::error::{Error, Result};
use crate::model::{self, Model, TensorSource, projections};
use crate::quant::TernaryLinear;
use crate::table::Table;
use crate::weights::{self, TensorSpan};

/// A model under construction; see the module docs.
pub struct ModelBuilder {
    config: Config,
    /// The files added so far, in order (error messages name them).
    files: Vec<String>,
    /// The tensors the model reads, with the (O, I) of master projections: those outside the
    /// layers by full name, a layer's by their name after `model.layers.{l}.` (one list for all
    /// layers, so a config claiming 1e9 layers costs nothing before the weights disagree).
    wanted: Wanted,
    /// Declared by a file's header: name -> (file index, dtype, shape, byte length). A later
    /// file declaring the same name wins, as in `WeightFiles`.
    declared: HashMap<String, (usize, Dtype, Vec<usize>, u64)>,
    /// Tensors received, converted.
    got: HashMap<String, Slot>,
}

/// Which tensor names the model reads (see [`ModelBuilder`]'s `wanted`).
struct Wanted {
    outside: HashMap<String, Option<(usize, usize)>>,
    per_layer: HashMap<String, Option<(usize, usize)>>,
    layers: usize,
}

impl Wanted {
    fn new(config: &Config) -> Wanted {
        // Layer 0's names stand for every layer's.
        let one = Config {
            num_hidden_layers: 1,
            ..config.clone()
        };
        let (mut outside, mut per_layer) = (HashMap::new(), HashMap::new());
        for n in model::tensor_names(&one) {
            match n.strip_prefix("model.layers.0.") {
                Some(rest) => per_layer.insert(rest.to_string(), None),
                None => outside.insert(n, None),
            };
        }
        if config.weight_format == WeightFormat::Master {
            for (name, o, i) in projections(config) {
                per_layer.insert(format!("{name}.weight"), Some((o, i)));
            }
        }
        Wanted {
            outside,
            per_layer,
            layers: config.num_hidden_layers,
        }
    }

    /// `Some(master shape)` when the model reads `name`, None when it does not.
    fn get(&self, name: &str) -> Option<Option<(usize, usize)>> {
        if let Some(w) = self.outside.get(name) {
            return Some(*w);
        }
        let (l, rest) = name.strip_prefix("model.layers.")?.split_once('.')?;
        // Only the canonical spelling of the layer number (no "+1", "01").
        let l: usize = l.parse().ok().filter(|n: &usize| n.to_string() == l)?;
        (l < self.layers).then(|| self.per_layer.get(rest).copied())?
    }
}

struct Slot {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Data,
}

enum Data {
    F32(Vec<f32>),
    U8(Vec<u8>),
    /// A master projection quantized on arrival (its shape was the expected one).
    Linear(TernaryLinear),
    /// A master projection that held a NaN or an infinity (not quantized: the error's).
    NonFinite {
        index: usize,
        value: f32,
    },
    /// The embedding or the head, kept as a [`Table`] on arrival (bf16 where lossless), so the
    /// f32 values are never held beside the rest of the model.
    Table(Table),
    /// A dtype no tensor of the model can have: only its name is kept, for the error.
    Other,
}

impl ModelBuilder {
    /// Parses `config.json`; fails as [`Model::from_bytes`] does on a bad config.
    pub fn new(config_name: &str, config_json: &[u8]) -> Result<ModelBuilder> {
        let config = Config::from_json(config_name, config_json)?;
        let wanted = Wanted::new(&config);
        Ok(ModelBuilder {
            config,
            files: Vec::new(),
            wanted,
            declared: HashMap::new(),
            got: HashMap::new(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Adds a safetensors file by its header: `prefix` is the file's first bytes (the 8-byte
    /// length and the JSON header, and at least 9 bytes, or the whole file when it is shorter),
    /// `file_len` its size. Fails as [`Model::from_bytes`] does on a truncated file or one that
    /// is not safetensors.
    /// Returns the tensors of this file that the model reads, by offset: pass each one's bytes
    /// to [`ModelBuilder::add_tensor`].
    pub fn add_file(
        &mut self,
        name: &str,
        prefix: &[u8],
        file_len: u64,
    ) -> Result<Vec<TensorSpan>> {
        let spans = weights::parse_header(name, prefix, file_len)?;
        let index = self.files.len();
        self.files.push(name.to_string());
        let mut needed = Vec::new();
        for span in spans {
            if self.wanted.get(&span.name).is_none() {
                continue;
            }
            // A tensor redeclared by a later file replaces the earlier one.
            self.got.remove(&span.name);
            self.declared.insert(
                span.name.clone(),
                (index, span.dtype, span.shape.clone(), span.end - span.start),
            );
            needed.push(span);
        }
        Ok(needed)
    }

    /// Hands over one tensor's bytes (exactly its span of the file named by the last
    /// [`ModelBuilder::add_file`] that declared it); converts it at once.
    pub fn add_tensor(&mut self, name: &str, bytes: Vec<u8>) -> Result<()> {
        self.add_tensor_from(name, bytes.len() as u64, |at, out| {
            out.copy_from_slice(&bytes[at..at + out.len()]);
        })
    }

    /// [`ModelBuilder::add_tensor`] for bytes that live elsewhere (the browser's JS heap):
    /// `read(offset, out)` fills `out` with the tensor's bytes from `offset`. Packed bytes are
    /// read straight into the model's buffer and floats in small pieces, so memory holds the
    /// converted tensor and never a second, raw copy of it.
    pub fn add_tensor_from(
        &mut self,
        name: &str,
        len: u64,
        mut read: impl FnMut(usize, &mut [u8]),
    ) -> Result<()> {
        let Some((file, dtype, shape, want)) = self.declared.get(name).cloned() else {
            return Err(Error::Shape {
                op: "load tensor",
                msg: format!("tensor `{name}` was not declared by the header of an added file"),
            });
        };
        if len != want {
            return Err(Error::Shape {
                op: "load tensor",
                msg: format!(
                    "{}: tensor `{name}` is {want} bytes by its header but {len} were given",
                    self.files[file]
                ),
            });
        }
        let len = len as usize;
        // Bytes per element of the float dtypes (the piece size below is a multiple of each);
        // None for every other dtype, whose bytes are not read at all.
        let float_size = match dtype {
            Dtype::F32 => Some(4),
            Dtype::BF16 | Dtype::F16 => Some(2),
            _ => None,
        };
        let floats = |size: usize, read: &mut dyn FnMut(usize, &mut [u8])| {
            const PIECE: usize = 64 * 1024; // a multiple of every float size
            let mut piece = vec![0u8; PIECE.min(len)];
            let mut out = Vec::with_capacity(len / size);
            for at in (0..len).step_by(PIECE) {
                let n = PIECE.min(len - at);
                read(at, &mut piece[..n]);
                out.extend(weights::decode_f32(dtype, &piece[..n])?);
            }
            Some(out)
        };
        let master = self.wanted.get(name).flatten();
        let data = match (dtype, float_size, master) {
            (Dtype::U8, ..) => {
                let mut v = vec![0u8; len];
                read(0, &mut v);
                Data::U8(v)
            }
            (_, None, _) => Data::Other,
            (_, Some(size), Some((o, i))) if shape == [o, i] => {
                floats(size, &mut read).map_or(Data::Other, |w| {
                    match w.iter().position(|x| !x.is_finite()) {
                        Some(index) => Data::NonFinite {
                            index,
                            value: w[index],
                        },
                        None => Data::Linear(TernaryLinear::from_master(&w, o, i)),
                    }
                })
            }
            (_, Some(size), _) if model::is_table(name) => {
                floats(size, &mut read).map_or(Data::Other, |w| {
                    match w.iter().position(|x| !x.is_finite()) {
                        Some(index) => Data::NonFinite {
                            index,
                            value: w[index],
                        },
                        None => Data::Table(Table::new(w)),
                    }
                })
            }
            (_, Some(size), _) => floats(size, &mut read).map_or(Data::Other, Data::F32),
        };
        self.got.insert(
            name.to_string(),
            Slot {
                file,
                dtype,
                shape,
                data,
            },
        );
        Ok(())
    }

    /// Builds the model from the tensors received.
    pub fn finish(mut self) -> Result<Model> {
        if self.files.is_empty() {
            return Err(Error::NoWeights);
        }
        let config = self.config.clone();
        model::assemble(config, &mut self)
    }

    /// The tensor `name` with its shape checked (the first step of every read).
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Slot> {
        let Some(slot) = self.got.remove(name) else {
            if let Some((file, ..)) = self.declared.get(name) {
                return Err(Error::Shape {
                    op: "load tensor",
                    msg: format!(
                        "{}: tensor `{name}` was declared but its bytes were never added",
                        self.files[*file]
                    ),
                });
            }
            return Err(Error::MissingTensor {
                name: name.to_string(),
                files: self.files.join(", "),
            });
        };
        weights::check_shape(&self.files[slot.file], name, &slot.shape, shape)?;
        Ok(slot)
    }

    fn dtype_error(&self, name: &str, slot: &Slot, expected: &'static str) -> Error {
        Error::TensorDtype {
            file: self.files[slot.file].clone(),
            name: name.to_string(),
            dtype: format!("{:?}", slot.dtype),
            expected,
        }
    }
}

impl TensorSource for ModelBuilder {
    fn f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let slot = self.take(name, shape)?;
        match slot.data {
            Data::F32(v) => Ok(v),
            _ => Err(self.dtype_error(name, &slot, "F32, BF16 or F16")),
        }
    }

    fn u8(&mut self, name: &str, shape: &[usize]) -> Result<Vec<u8>> {
        let slot = self.take(name, shape)?;
        match slot.data {
            Data::U8(v) => Ok(v),
            _ => Err(self.dtype_error(name, &slot, "U8")),
        }
    }

    fn table(&mut self, name: &str, shape: &[usize]) -> Result<Table> {
        let slot = self.take(name, shape)?;
        match slot.data {
            Data::NonFinite { index, value } => Err(Error::BadValue {
                file: self.file_of(name),
                name: name.to_string(),
                what: model::non_finite(index, value),
            }),
            Data::Table(t) => Ok(t),
            _ => Err(self.dtype_error(name, &slot, "F32, BF16 or F16")),
        }
    }

    fn master_linear(&mut self, name: &str, o: usize, i: usize) -> Result<TernaryLinear> {
        let slot = self.take(name, &[o, i])?;
        match slot.data {
            Data::NonFinite { index, value } => Err(Error::BadValue {
                file: self.file_of(name),
                name: name.to_string(),
                what: model::non_finite(index, value),
            }),
            Data::Linear(lin) => Ok(lin),
            _ => Err(self.dtype_error(name, &slot, "F32, BF16 or F16")),
        }
    }

    fn file_of(&self, name: &str) -> String {
        self.declared
            .get(name)
            .map_or("?".to_string(), |(f, ..)| self.files[*f].clone())
    }
}
