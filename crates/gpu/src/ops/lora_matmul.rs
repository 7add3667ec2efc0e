//! Launcher for `shaders/lora_matmul.wgsl`.

use crate::GpuError;
use crate::record::{Kernel, Recorder, at_least, expect, rows};
use crate::tensor::{DType, GpuTensor};

pub const SOURCE: &str = include_str!("../../../../shaders/lora_matmul.wgsl");
pub const SOURCE_REDUCE: &str = include_str!("../../../../shaders/lora_matmul_reduce.wgsl");

/// The LoRA products of one adapted projection with in features I, out features O, rank R
/// and scale s, forward and backward (PEFT: `y = BitLinear(x) + s * (x A^T) B^T`):
///
/// | method          | computes            | shapes                                   |
/// |-----------------|---------------------|------------------------------------------|
/// | [`down`]        | u = x A^T           | x (T, I), A (R, I), u (T, R)             |
/// | [`up_add`]      | y += s u B^T        | u (T, R), B (O, R), y (T, O)             |
/// | [`up_add_at`]   | y[row0..] += s u B^T| u (T, R), B (O, R), y (R', O), R' >= row0+T |
/// | [`grad_b`]      | dB += s dY^T u      | dY (T, O), u (T, R), dB (O, R)           |
/// | [`grad_u`]      | du = s dY B         | dY (T, O), B (O, R), du (T, R)           |
/// | [`grad_a`]      | dA += du^T x        | du (T, R), x (T, I), dA (R, I)           |
/// | [`grad_x_add`]  | dx += du A          | du (T, R), A (R, I), dx (T, I)           |
/// | [`grad_b_set`]  | dB = s dY^T u       | as grad_b                                |
/// | [`grad_a_set`]  | dA = du^T x         | as grad_a                                |
/// | [`grad_x`]      | dx = du A           | as grad_x_add                            |
///
/// The `_set` and [`grad_x`] forms overwrite instead of adding: the GPU training step writes
/// each projection's gradients once per call (no clearing pass) and adds them into the CPU's
/// gradients after the readback. All f32.
///
/// On a GPU, [`down`] and [`grad_u`] (R outputs per token, a sum over I or O) run as
/// `lora_matmul_reduce.wgsl`, one workgroup per output splitting the sum; CPU adapters keep
/// the one-invocation-per-output kernel ([`LoraMatmul::with_reduce`] chooses explicitly). Dropout, when on, is applied by the caller to x (and to du A) elementwise.
///
/// [`down`]: LoraMatmul::down
/// [`up_add`]: LoraMatmul::up_add
/// [`up_add_at`]: LoraMatmul::up_add_at
/// [`grad_b`]: LoraMatmul::grad_b
/// [`grad_u`]: LoraMatmul::grad_u
/// [`grad_a`]: LoraMatmul::grad_a
/// [`grad_x_add`]: LoraMatmul::grad_x_add
/// [`grad_b_set`]: LoraMatmul::grad_b_set
/// [`grad_a_set`]: LoraMatmul::grad_a_set
/// [`grad_x`]: LoraMatmul::grad_x
#[derive(Clone, Debug)]
pub struct LoraMatmul {
    /// (TA, TB, ACC) = (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (0, 0, 0), (0, 0, 1)
    nt: Kernel,
    nt_acc: Kernel,
    tn: Kernel,
    tn_acc: Kernel,
    nn: Kernel,
    nn_acc: Kernel,
    /// `lora_matmul_reduce.wgsl` for down (TB = 1) and grad_u (TB = 0), when on.
    reduce: Option<(Kernel, Kernel)>,
    i: usize,
    o: usize,
    r: usize,
}

impl LoraMatmul {
    /// The split-sum kernels on GPUs, the plain ones on CPU adapters (lavapipe, SwiftShader).
    pub fn new(device: &wgpu::Device, i: usize, o: usize, r: usize) -> LoraMatmul {
        let gpu = device.adapter_info().device_type != wgpu::DeviceType::Cpu;
        Self::with_reduce(device, i, o, r, gpu)
    }

    /// With `reduce`: down and grad_u split their sums across a workgroup per output.
    pub fn with_reduce(
        device: &wgpu::Device,
        i: usize,
        o: usize,
        r: usize,
        reduce: bool,
    ) -> LoraMatmul {
        let red = |tb: f64| {
            Kernel::new(
                device,
                "lora_matmul_reduce",
                SOURCE_REDUCE,
                &[("TB", tb), ("ACC", 0.0), ("WG", super::c(super::WG))],
            )
        };
        // Distinct labels per form, for `bench --profile`'s table.
        let k = |name: &'static str, ta: f64, tb: f64, acc: f64| {
            Kernel::new(
                device,
                name,
                SOURCE,
                &[
                    ("TA", ta),
                    ("TB", tb),
                    ("ACC", acc),
                    ("WG", super::c(super::WG)),
                ],
            )
        };
        LoraMatmul {
            nt: k("lora_matmul nt", 0.0, 1.0, 0.0),
            nt_acc: k("lora_matmul nt acc", 0.0, 1.0, 1.0),
            tn: k("lora_matmul tn", 1.0, 0.0, 0.0),
            tn_acc: k("lora_matmul tn acc", 1.0, 0.0, 1.0),
            nn: k("lora_matmul nn", 0.0, 0.0, 0.0),
            nn_acc: k("lora_matmul nn acc", 0.0, 0.0, 1.0),
            reduce: reduce.then(|| (red(1.0), red(0.0))),
            i,
            o,
            r,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn product(
        &self,
        rec: &mut Recorder,
        kernel: &Kernel,
        [m, n, k]: [usize; 3],
        alpha: f32,
        a: &GpuTensor,
        b: &GpuTensor,
        out: &GpuTensor,
        out_row0: usize,
    ) -> Result<(), GpuError> {
        let fit = |v: usize| {
            u32::try_from(v).map_err(|_| GpuError::Shape {
                op: "lora_matmul",
                msg: format!("{v} does not fit a u32 shader constant"),
            })
        };
        let dims = rec.uniform_words(&[fit(m)?, fit(n)?, fit(k)?, alpha.to_bits(), fit(out_row0)?]);
        // lora_matmul_reduce.wgsl: a workgroup per output; lora_matmul.wgsl: an invocation.
        let groups = if kernel.name == "lora_matmul_reduce" {
            [n, m, 1]
        } else {
            // Outputs numbered row-major over the whole grid: G groups a row of the grid.
            let total = (m * n).div_ceil(super::WG);
            let g = total.clamp(1, 32_768);
            [g, total.div_ceil(g), 1]
        };
        rec.dispatch(kernel, &[&dims, &a.buffer, &b.buffer, &out.buffer], groups)
    }

    /// u (T, R) = x (T, I) . A^T, A (R, I).
    pub fn down(
        &self,
        rec: &mut Recorder,
        x: &GpuTensor,
        a: &GpuTensor,
        u: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "lora_matmul down";
        let t = rows(OP, x, DType::F32, self.i)?;
        expect(OP, a, DType::F32, &[self.r, self.i])?;
        expect(OP, u, DType::F32, &[t, self.r])?;
        let kernel = self.reduce.as_ref().map_or(&self.nt, |(nt, _)| nt);
        self.product(rec, kernel, [t, self.r, self.i], 1.0, x, a, u, 0)
    }

    /// y (T, O) += s u (T, R) . B^T, B (O, R).
    pub fn up_add(
        &self,
        rec: &mut Recorder,
        u: &GpuTensor,
        b: &GpuTensor,
        scale: f32,
        y: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "lora_matmul up_add";
        let t = rows(OP, u, DType::F32, self.r)?;
        expect(OP, b, DType::F32, &[self.o, self.r])?;
        expect(OP, y, DType::F32, &[t, self.o])?;
        self.product(rec, &self.nt_acc, [t, self.o, self.r], scale, u, b, y, 0)
    }

    /// As [`LoraMatmul::up_add`], adding into rows `y_row0 .. y_row0 + T` of a taller
    /// y (R, O) (the k and v projections add into the KV cache).
    pub fn up_add_at(
        &self,
        rec: &mut Recorder,
        u: &GpuTensor,
        b: &GpuTensor,
        scale: f32,
        y: &GpuTensor,
        y_row0: usize,
    ) -> Result<(), GpuError> {
        const OP: &str = "lora_matmul up_add_at";
        let t = rows(OP, u, DType::F32, self.r)?;
        expect(OP, b, DType::F32, &[self.o, self.r])?;
        at_least(OP, y, DType::F32, y_row0 + t, self.o)?;
        self.product(
            rec,
            &self.nt_acc,
            [t, self.o, self.r],
            scale,
            u,
            b,
            y,
            y_row0,
        )
    }

    /// dB (O, R) += s dY (T, O)^T . u (T, R).
    pub fn grad_b(
        &self,
        rec: &mut Recorder,
        dy: &GpuTensor,
        u: &GpuTensor,
        scale: f32,
        db: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "lora_matmul grad_b";
        let t = rows(OP, dy, DType::F32, self.o)?;
        expect(OP, u, DType::F32, &[t, self.r])?;
        expect(OP, db, DType::F32, &[self.o, self.r])?;
        self.product(rec, &self.tn_acc, [self.o, self.r, t], scale, dy, u, db, 0)
    }

    /// dB (O, R) = s dY (T, O)^T . u (T, R).
    pub fn grad_b_set(
        &self,
        rec: &mut Recorder,
        dy: &GpuTensor,
        u: &GpuTensor,
        scale: f32,
        db: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "lora_matmul grad_b_set";
        let t = rows(OP, dy, DType::F32, self.o)?;
        expect(OP, u, DType::F32, &[t, self.r])?;
        expect(OP, db, DType::F32, &[self.o, self.r])?;
        self.product(rec, &self.tn, [self.o, self.r, t], scale, dy, u, db, 0)
    }

    /// dA (R, I) = du (T, R)^T . x (T, I).
    pub fn grad_a_set(
        &self,
        rec: &mut Recorder,
        du: &GpuTensor,
        x: &GpuTensor,
        da: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "lora_matmul grad_a_set";
        let t = rows(OP, du, DType::F32, self.r)?;
        expect(OP, x, DType::F32, &[t, self.i])?;
        expect(OP, da, DType::F32, &[self.r, self.i])?;
        self.product(rec, &self.tn, [self.r, self.i, t], 1.0, du, x, da, 0)
    }

    /// dx (T, I) = du (T, R) . A (R, I).
    pub fn grad_x(
        &self,
        rec: &mut Recorder,
        du: &GpuTensor,
        a: &GpuTensor,
        dx: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "lora_matmul grad_x";
        let t = rows(OP, du, DType::F32, self.r)?;
        expect(OP, a, DType::F32, &[self.r, self.i])?;
        expect(OP, dx, DType::F32, &[t, self.i])?;
        self.product(rec, &self.nn, [t, self.i, self.r], 1.0, du, a, dx, 0)
    }

    /// du (T, R) = s dY (T, O) . B (O, R).
    pub fn grad_u(
        &self,
        rec: &mut Recorder,
        dy: &GpuTensor,
        b: &GpuTensor,
        scale: f32,
        du: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "lora_matmul grad_u";
        let t = rows(OP, dy, DType::F32, self.o)?;
        expect(OP, b, DType::F32, &[self.o, self.r])?;
        expect(OP, du, DType::F32, &[t, self.r])?;
        let kernel = self.reduce.as_ref().map_or(&self.nn, |(_, nn)| nn);
        self.product(rec, kernel, [t, self.r, self.o], scale, dy, b, du, 0)
    }

    /// dA (R, I) += du (T, R)^T . x (T, I).
    pub fn grad_a(
        &self,
        rec: &mut Recorder,
        du: &GpuTensor,
        x: &GpuTensor,
        da: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "lora_matmul grad_a";
        let t = rows(OP, du, DType::F32, self.r)?;
        expect(OP, x, DType::F32, &[t, self.i])?;
        expect(OP, da, DType::F32, &[self.r, self.i])?;
        self.product(rec, &self.tn_acc, [self.r, self.i, t], 1.0, du, x, da, 0)
    }

    /// dx (T, I) += du (T, R) . A (R, I).
    pub fn grad_x_add(
        &self,
        rec: &mut Recorder,
        du: &GpuTensor,
        a: &GpuTensor,
        dx: &GpuTensor,
    ) -> Result<(), GpuError> {
        const OP: &str = "lora_matmul grad_x_add";
        let t = rows(OP, du, DType::F32, self.r)?;
        expect(OP, a, DType::F32, &[self.r, self.i])?;
        expect(OP, dx, DType::F32, &[t, self.i])?;
        self.product(rec, &self.nn_acc, [t, self.i, self.r], 1.0, du, a, dx, 0)
    }
}
