// RMSNorm over each row of x, as transformers' BitNetRMSNorm:
//   y = w * (x * inv),  inv = 1 / sqrt(mean(x^2) + EPS)
// One workgroup of WG invocations per row; dispatch (T, 1, 1).
//
// Entry point `main_quant` is the fused RMSNorm + int8 activation quantization that every
// BitLinear's input goes through: it also writes y's codes and scale exactly as
// act_quant.wgsl computes them from y (the same f32 y, the same max, the same rounding), in one
// dispatch instead of two.
//
// The sum of squares is taken in a fixed parallel order that the CPU reference mirrors term
// for term (crates/core/src/ops.rs sum_squares_lanes). RMSNorm feeds the int8 activation
// quantizer, whose rounding is discontinuous, so GPU and CPU must add the same terms in the
// same order to stay on the same side of a rounding boundary. The order: the row is read as
// vec4 groups (the last one padded with zeros, which leave a sum of squares unchanged); lane l
// adds the squares of groups l, l + LANES, l + 2 LANES, ... into a vec4 of running sums, one
// per position in the group; its lane sum is (s.x + s.y) + (s.z + s.w); then the LANES lane
// sums are added pairwise in a tree (lane l += lane l + h, for h = LANES/2 .. 1). It replaced
// a serial pass by one invocation (50 us per 2,048-wide norm on an H100, 36% of a decoded
// token's GPU time on the 1b shape).
//
// Each square x*x is rounded on its own, as on the CPU (Rust never fuses a multiply into an
// add): the squares go through workgroup memory, written by one invocation and added by
// another, so no compiler can contract the multiply and the add into an FMA.
//
// The workgroup is WG = 4 LANES wide: all WG invocations load and square a chunk and write the
// outputs (at T = 1, a decoded token, one workgroup does the whole row, and 64 invocations
// left those loops latency-bound); the first LANES add.

override C: u32;   // row width
override EPS: f32; // rms_norm_eps

const LANES: u32 = 64u; // the CPU mirror's ops::RMS_LANES
const WG: u32 = 256u;   // workgroup size, a multiple of LANES
const CH4: u32 = WG;    // vec4 groups per chunk (1,024 values, 4 KiB): one per invocation

@group(0) @binding(0) var<storage, read> x: array<f32>;       // (T, C)
@group(0) @binding(1) var<storage, read> w: array<f32>;       // (C)
@group(0) @binding(2) var<storage, read_write> y: array<f32>; // (T, C)
@group(0) @binding(3) var<storage, read_write> xq: array<u32>;    // (T, ceil(C/4)) int8 x4 (main_quant)
@group(0) @binding(4) var<storage, read_write> scale: array<f32>; // (T) s_a (main_quant)

var<workgroup> sq: array<vec4<f32>, CH4>; // squares of one chunk's groups
var<workgroup> part: array<f32, LANES>;   // lane sums, then the tree
var<workgroup> ymax: array<f32, WG>;      // main_quant: max |y| per invocation, then the tree

// 1 / sqrt(mean(x^2) + EPS) of the row at `base`; every invocation calls it (barriers).
fn inv_rms(base: u32, lid: u32) -> f32 {
    let n4 = (C + 3u) / 4u; // vec4 groups in the row
    // Invocation lid squares group k = (lid - 32) mod WG of each chunk, which lane k % LANES
    // adds: never lid itself (lid - k = 32 mod 64).
    let k = (lid + WG - 32u) % WG;
    var acc = vec4<f32>();
    for (var g0 = 0u; g0 < n4; g0 += CH4) {
        let n = min(CH4, n4 - g0); // groups in this chunk
        if k < n {
            let c = 4u * (g0 + k);
            var v = vec4<f32>();
            if c + 3u < C {
                v = vec4<f32>(x[base + c], x[base + c + 1u], x[base + c + 2u], x[base + c + 3u]);
            } else {
                for (var j = 0u; j < 4u; j++) {
                    if c + j < C {
                        v[j] = x[base + c + j];
                    }
                }
            }
            sq[k] = v * v;
        }
        workgroupBarrier();
        // CH4 is a multiple of LANES, so lane lid adds groups lid, lid + LANES, ... of the row.
        if lid < LANES {
            for (var j = lid; j < n; j += LANES) {
                acc += sq[j];
            }
        }
        workgroupBarrier();
    }
    if lid < LANES {
        part[lid] = (acc.x + acc.y) + (acc.z + acc.w);
    }
    workgroupBarrier();
    for (var h = LANES / 2u; h > 0u; h >>= 1u) {
        if lid < h {
            part[lid] = part[lid] + part[lid + h];
        }
        workgroupBarrier();
    }
    return 1.0 / sqrt(part[0] / f32(C) + EPS);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let base = wid.x * C;
    let inv = inv_rms(base, lid);
    for (var c = lid; c < C; c += WG) {
        y[base + c] = w[c] * (x[base + c] * inv);
    }
}

// RMSNorm, then act_quant.wgsl on its output: s_a = 127 / max(max|y|, 1e-5),
// codes clamp(round(y * s_a), -128, 127) packed four per u32, little-endian, padding 0.
@compute @workgroup_size(WG)
fn main_quant(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let base = wid.x * C;
    let inv = inv_rms(base, lid);
    var m = 0.0;
    for (var c = lid; c < C; c += WG) {
        let v = w[c] * (x[base + c] * inv);
        y[base + c] = v;
        m = max(m, abs(v));
    }
    // A max is exact in any order.
    ymax[lid] = m;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h >>= 1u) {
        if lid < h {
            ymax[lid] = max(ymax[lid], ymax[lid + h]);
        }
        workgroupBarrier();
    }
    let s_a = 127.0 / max(ymax[0], 1e-5);
    if lid == 0u {
        scale[wid.x] = s_a;
    }
    // y again from the same operands: the same f32 as the one written above.
    let c4 = (C + 3u) / 4u;
    for (var k = lid; k < c4; k += WG) {
        var word = 0u;
        for (var j = 0u; j < 4u; j++) {
            let c = 4u * k + j;
            if c < C {
                let v = w[c] * (x[base + c] * inv);
                let q = i32(clamp(round(v * s_a), -128.0, 127.0));
                word |= (bitcast<u32>(q) & 0xffu) << (8u * j);
            }
        }
        xq[wid.x * c4 + k] = word;
    }
}
