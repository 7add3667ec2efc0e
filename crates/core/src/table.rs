//! The model's (V, C) float tables, the token embedding and the language-model head, stored
//! as bf16 where that is lossless.
//!
//! Checkpoints keep these tables in bf16 (BitNet's, and the random bench models), and a CPU
//! token is bound by the bytes it reads: the f32 head was 72-79% of a decoded token's bytes
//! (BENCHMARKS.md, issue 14). bf16 -> f32 is exact (the bits shifted into the top half), so a
//! table whose every value is a bf16 is kept as its bf16 bits, half the bytes, and each reader
//! widens the values as it goes: the same f32 values enter the same operations in the same
//! order, and every result is the f32 table's bit for bit (`ops::matmul_t_fast_bf16`,
//! `ops::matmul_acc_bf16`, [`Table::push_row`]). A table with any other value stays f32, so
//! results never change. One copy is kept either way.
//!
//! Code that wants the values as an f32 slice (`&table[..]`, `&*table`: the GPU upload, tests)
//! still gets one through `Deref`: for a bf16 table that widens the table once and keeps the
//! f32 copy for the table's life ([`Table::has_f32_copy`]), 3x the bf16 bytes in all; prefer
//! [`Table::to_f32`] (a copy that goes when dropped) or the kernels here. The CPU forward,
//! decoding and training never make that copy. Mutable access (`&mut table[..]`) turns a bf16
//! table into an f32 one, since the values written need not be bf16.

use std::borrow::Cow;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::OnceLock;

use crate::ops;

/// How a [`Table`] holds its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableDtype {
    F32,
    /// bf16 bits; every value widens to the f32 it was made from exactly.
    Bf16,
}

/// A float table (V, C) row-major, the embedding or the head: bf16 where lossless, else f32.
pub struct Table {
    data: Data,
    /// The f32 values of a bf16 table, made by the first `Deref` and kept (see the module).
    f32_copy: OnceLock<Vec<f32>>,
}

enum Data {
    F32(Vec<f32>), // (V*C)
    /// (ceil(V*C / 2)) bf16 bits two to a u32 (in memory order, so the buffer reads as the
    /// (V*C) u16s: [`Table::as_bf16`]), and V*C. Packed in the f32 vector's own allocation.
    Bf16(Vec<u32>, usize),
}

impl Table {
    /// The table of `values`, stored as bf16 when every value is exactly a bf16 (else f32, the
    /// vector itself). The bf16 bits are packed into the vector's own memory, which then
    /// shrinks to half, so converting never holds more than the f32 table did (the model is
    /// built in wasm memory, which never shrinks: its peak is what a tab keeps).
    pub fn new(values: Vec<f32>) -> Table {
        if !values.iter().all(|&x| ops::f32_to_bf16_exact(x).is_some()) {
            return Table::new_f32(values);
        }
        let n = values.len();
        // f32 -> u32 of the same size and alignment: std collects this in place.
        let mut buf: Vec<u32> = values.into_iter().map(f32::to_bits).collect();
        // Pair k (values 2k, 2k+1) goes to word k <= 2k: every word is read before written.
        for k in 0..n.div_ceil(2) {
            let lo = ((buf[2 * k] >> 16) as u16).to_ne_bytes();
            let hi = buf
                .get(2 * k + 1)
                .map_or(0, |&b| (b >> 16) as u16)
                .to_ne_bytes();
            buf[k] = u32::from_ne_bytes([lo[0], lo[1], hi[0], hi[1]]);
        }
        buf.truncate(n.div_ceil(2));
        buf.shrink_to_fit();
        Table {
            data: Data::Bf16(buf, n),
            f32_copy: OnceLock::new(),
        }
    }

    /// The table of `values` kept as f32 whatever they are (tests and measurements comparing
    /// the two storages, which give the same results).
    pub fn new_f32(values: Vec<f32>) -> Table {
        Table {
            data: Data::F32(values),
            f32_copy: OnceLock::new(),
        }
    }

    pub fn dtype(&self) -> TableDtype {
        match self.data {
            Data::F32(_) => TableDtype::F32,
            Data::Bf16(..) => TableDtype::Bf16,
        }
    }

    /// Number of values (V*C).
    pub fn len(&self) -> usize {
        match &self.data {
            Data::F32(v) => v.len(),
            Data::Bf16(_, n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the values as stored (not counting an f32 copy made by `Deref`).
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::F32(v) => 4 * v.len(),
            Data::Bf16(b, _) => 4 * b.len(),
        }
    }

    /// The bf16 bits (V*C), when stored as bf16.
    pub fn as_bf16(&self) -> Option<&[u16]> {
        match &self.data {
            Data::Bf16(b, n) => Some(bf16_view(b, *n)),
            Data::F32(_) => None,
        }
    }

    /// Value k (row-major index), as f32.
    pub fn get(&self, k: usize) -> Option<f32> {
        match &self.data {
            Data::F32(v) => v.get(k).copied(),
            Data::Bf16(b, n) => bf16_view(b, *n).get(k).map(|&x| ops::bf16_to_f32(x)),
        }
    }

    /// The values as f32: borrowed when stored as f32, else widened into a new vector that
    /// goes when dropped.
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match &self.data {
            Data::F32(v) => Cow::Borrowed(v),
            Data::Bf16(b, n) => Cow::Owned(widen(bf16_view(b, *n))),
        }
    }

    /// The values as an f32 vector (the table itself when stored as f32).
    pub fn into_f32(self) -> Vec<f32> {
        match self.data {
            Data::F32(v) => v,
            Data::Bf16(b, n) => widen(bf16_view(&b, n)),
        }
    }

    /// Appends row `row` (C values, C = `c`) to `out`: the embedding lookup. Panics when the
    /// row is past the table's end (token ids are checked before they get here).
    pub fn push_row(&self, out: &mut Vec<f32>, row: usize, c: usize) {
        let range = row * c..(row + 1) * c;
        match &self.data {
            Data::F32(v) => out.extend_from_slice(&v[range]),
            Data::Bf16(b, n) => {
                out.extend(bf16_view(b, *n)[range].iter().map(|&x| ops::bf16_to_f32(x)))
            }
        }
    }

    /// y (T, V) = x (T, C) . table^T, C = `c`, V = `v`: the head's forward
    /// (`ops::matmul_t_fast`, or its bf16 twin, equal bit for bit).
    pub fn matmul_t(&self, x: &[f32], c: usize, v: usize) -> Vec<f32> {
        match &self.data {
            Data::F32(w) => ops::matmul_t_fast(x, w, c, v),
            Data::Bf16(w, n) => ops::matmul_t_fast_bf16(x, bf16_view(w, *n), c, v),
        }
    }

    /// y (T, C) += g (T, V) . table (V, C): the head's backward (`ops::matmul_acc`, or its
    /// bf16 twin, equal bit for bit).
    pub fn matmul_acc(&self, y: &mut [f32], g: &[f32], v: usize, c: usize) {
        match &self.data {
            Data::F32(w) => ops::matmul_acc(y, g, w, v, c),
            Data::Bf16(w, n) => ops::matmul_acc_bf16(y, g, bf16_view(w, *n), v, c),
        }
    }

    /// Whether `Deref` has made (and the table keeps) an f32 copy of a bf16 table.
    pub fn has_f32_copy(&self) -> bool {
        self.f32_copy.get().is_some()
    }

    /// Drops the f32 copy `Deref` made, if any (e.g. once the table is on the GPU).
    pub fn drop_f32_copy(&mut self) {
        self.f32_copy = OnceLock::new();
    }
}

/// The first `n` u16s of `words` (n <= 2 * words.len()): the bf16 bits of a packed table.
fn bf16_view(words: &[u32], n: usize) -> &[u16] {
    assert!(
        n <= 2 * words.len(),
        "bf16_view: {n} values in {} words",
        words.len()
    );
    // SAFETY: the n u16s lie within the words' initialised memory (checked just above), u16's
    // alignment (2) divides u32's (4), every bit pattern is a u16, and the view borrows
    // `words` immutably for its lifetime. Words were packed in memory order (`to_ne_bytes`),
    // so u16 k is value k on either byte order.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u16>(), n) }
}

/// bf16 bits -> f32 values.
fn widen(b: &[u16]) -> Vec<f32> {
    b.iter().map(|&x| ops::bf16_to_f32(x)).collect()
}

impl From<Vec<f32>> for Table {
    fn from(values: Vec<f32>) -> Table {
        Table::new(values)
    }
}

impl Clone for Table {
    /// Clones the values, not an f32 copy made by `Deref`.
    fn clone(&self) -> Table {
        let data = match &self.data {
            Data::F32(v) => Data::F32(v.clone()),
            Data::Bf16(b, n) => Data::Bf16(b.clone(), *n),
        };
        Table {
            data,
            f32_copy: OnceLock::new(),
        }
    }
}

/// The values as f32 (so a model's Debug output shows every value exactly, whatever the
/// storage) and the storage.
impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Values<'a>(&'a Table);
        impl fmt::Debug for Values<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match &self.0.data {
                    Data::F32(v) => f.debug_list().entries(v).finish(),
                    Data::Bf16(b, n) => f
                        .debug_list()
                        .entries(bf16_view(b, *n).iter().map(|&x| ops::bf16_to_f32(x)))
                        .finish(),
                }
            }
        }
        f.debug_struct("Table")
            .field("dtype", &self.dtype())
            .field("values", &Values(self))
            .finish()
    }
}

/// The values as an f32 slice. For a bf16 table this makes an f32 copy on first use and keeps
/// it (see the module): code that can should read through the methods above instead.
impl Deref for Table {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &self.data {
            Data::F32(v) => v,
            Data::Bf16(b, n) => self.f32_copy.get_or_init(|| widen(bf16_view(b, *n))),
        }
    }
}

/// Mutable f32 values: a bf16 table becomes an f32 one (what is written need not be a bf16).
impl DerefMut for Table {
    fn deref_mut(&mut self) -> &mut [f32] {
        if let Data::Bf16(b, n) = &self.data {
            let v = self
                .f32_copy
                .take()
                .unwrap_or_else(|| widen(bf16_view(b, *n)));
            self.data = Data::F32(v);
        }
        self.f32_copy = OnceLock::new();
        match &mut self.data {
            Data::F32(v) => v,
            Data::Bf16(..) => unreachable!("a bf16 table was made f32 just above"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Random values rounded to bf16 (to nearest, ties to even), as a bf16 checkpoint holds.
    fn bf16_values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| half::bf16::from_f32(rng.normal()).to_f32())
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn bf16_only_where_lossless() {
        let v = bf16_values(1000, 1);
        assert_eq!(Table::new(v.clone()).dtype(), TableDtype::Bf16);
        assert_eq!(Table::new_f32(v.clone()).dtype(), TableDtype::F32);
        assert_eq!(Table::new(vec![]).dtype(), TableDtype::Bf16);
        // One value with a low bit set keeps the whole table f32, untouched.
        let mut w = v.clone();
        w[999] = f32::from_bits(w[999].to_bits() | 1);
        let t = Table::new(w.clone());
        assert_eq!(t.dtype(), TableDtype::F32);
        assert_eq!(bits(&t.to_f32()), bits(&w));
        // Signed zeros, subnormals of bf16, extremes: exact.
        let odd: Vec<f32> = [-0.0, 0.0, 1e-40, 3e38, -3e38]
            .into_iter()
            .map(|x| half::bf16::from_f32(x).to_f32())
            .chain([f32::from_bits(0x0001_0000), half::bf16::MAX.to_f32()])
            .collect();
        let t = Table::new(odd.clone());
        assert_eq!(t.dtype(), TableDtype::Bf16);
        assert_eq!(bits(&t.to_f32()), bits(&odd));
        assert_eq!(t.bytes(), 4 * odd.len().div_ceil(2)); // 7 values: 4 words
    }

    #[test]
    fn readers_see_the_f32_values() {
        let (v, c) = (37, 13);
        let vals = bf16_values(v * c, 2);
        let t = Table::new(vals.clone());
        assert_eq!(t.dtype(), TableDtype::Bf16);
        assert_eq!(bits(&t.to_f32()), bits(&vals));
        assert_eq!(t.get(5).map(f32::to_bits), Some(vals[5].to_bits()));
        assert_eq!(t.get(v * c), None);
        let mut row = vec![1.5];
        t.push_row(&mut row, 36, c);
        assert_eq!(bits(&row[1..]), bits(&vals[36 * c..]));
        assert!(
            !t.has_f32_copy(),
            "reading through the methods made an f32 copy"
        );
        assert_eq!(
            format!("{:?}", t).replace("Bf16", "F32"),
            format!("{:?}", Table::new_f32(vals.clone()))
        );
        // Deref makes (and keeps) the f32 copy; mutation makes the table f32.
        let mut t2 = t.clone();
        assert_eq!(bits(&t2[..]), bits(&vals));
        assert!(t2.has_f32_copy() && !t.has_f32_copy());
        t2.drop_f32_copy();
        assert!(!t2.has_f32_copy());
        t2[3] = 0.1;
        assert_eq!(t2.dtype(), TableDtype::F32);
        assert_eq!(t2.get(3), Some(0.1));
        assert_eq!(bits(&t2.into_f32()[4..]), bits(&vals[4..]));
        assert_eq!(bits(&t.into_f32()), bits(&vals));
    }
}
