// RMSNorm over each row of x, as transformers' BitNetRMSNorm:
//   y = w * (x * inv),  inv = 1 / sqrt(mean(x^2) + EPS)
// One workgroup per row; dispatch (T, 1, 1).
//
// The sum of squares is accumulated by one invocation in index order, the same order as the
// CPU reference (crates/core/src/ops.rs rms_norm). RMSNorm feeds the int8 activation
// quantizer, whose rounding is discontinuous: matching the reference's summation order keeps
// GPU and CPU on the same side of a rounding boundary (a parallel tree sum would flip an int8
// code now and then). The serial pass reads C floats per row, negligible next to the matmul
// that consumes the row. To keep that serial pass short on GPUs (one invocation reading a
// 3,072-float row from global memory, one dependent load after another, took ~100 us per
// row on an H100), the row goes a chunk of CH values at a time: all invocations square their
// values into workgroup memory in parallel (x*x rounded alone, as on the CPU, which never
// fuses the multiply into the add), then invocation 0 adds the chunk in index order from
// workgroup memory. The last chunk is padded with zeros, which leave a sum of squares
// unchanged. Same terms, same order: the same bits as the reference.

override C: u32;        // row width
override EPS: f32;      // rms_norm_eps
override WG: u32 = 64u; // workgroup size

@group(0) @binding(0) var<storage, read> x: array<f32>;       // (T, C)
@group(0) @binding(1) var<storage, read> w: array<f32>;       // (C)
@group(0) @binding(2) var<storage, read_write> y: array<f32>; // (T, C)

override CH: u32 = WG * 4u; // chunk of the serial sum

var<workgroup> inv_rms: f32;
var<workgroup> sq: array<f32, CH>; // x*x of one chunk

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let base = wid.x * C;
    var ss = 0.0;
    for (var c0 = 0u; c0 < C; c0 += CH) {
        for (var cc = lid; cc < CH; cc += WG) {
            var v = 0.0;
            if c0 + cc < C {
                v = x[base + c0 + cc];
            }
            sq[cc] = v * v;
        }
        workgroupBarrier();
        if lid == 0u {
            for (var cc = 0u; cc < CH; cc++) {
                ss += sq[cc];
            }
        }
        workgroupBarrier();
    }
    if lid == 0u {
        inv_rms = 1.0 / sqrt(ss / f32(C) + EPS);
    }
    workgroupBarrier();
    let inv = inv_rms;
    for (var c = lid; c < C; c += WG) {
        y[base + c] = w[c] * (x[base + c] * inv);
    }
}
