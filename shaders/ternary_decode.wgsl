// Decoding's BitLinear products with the RMSNorm and the int8 activation quantization of their
// input folded in: one dispatch where three ran (rms_norm.wgsl main_quant, then
// ternary_matmul.wgsl once or twice), for one token (T = 1).
//
//   y_n  = nw * (x * inv),  inv = 1 / sqrt(mean(x^2) + EPS)            (rms_norm.wgsl)
//   s_a  = 127 / max(max|y_n|, 1e-5),  x_q = clamp(round(y_n s_a))     (act_quant.wgsl)
//   main:     y[y_row0] (=, or += with ACCUM) (x_q . W^T) / (s_a * s_w)
//   main_kv:  the same for W and W2 into y and y2 (the k and v projections, into the cache)
//   main_glu: out = act((x_q . W^T) / (s_a s_w)) * ((x_q . W2^T) / (s_a s_w2))  (ternary_glu)
//
// Why: at T = 1 the norm ran as its own dispatch on one workgroup (10-16 us on an H100, most
// of it latency, four per layer), and every dispatch costs the host ~7 us of recording.
// Here every workgroup normalises and quantizes the row itself, into workgroup memory, from
// x and nw that the first workgroups bring into L2 for the rest; the row is small (a few KiB)
// next to the weights each workgroup streams.
//
// Bit-exactness: the prologue is rms_norm.wgsl's, operation for operation: the sum of squares
// in the same lane order through workgroup memory (no FMA can form), the same inv, y_n, max
// and rounding, so s_a and the codes are those main_quant writes (the kernel tests compare the
// fused dispatch with the three it replaces, bit for bit). The product is
// ternary_matmul.wgsl's one-token kernel reading the codes from workgroup memory; its sums are
// exact integers and its epilogue the same f32 operations.
//
// Blocking: ternary_matmul.wgsl's one-token kernel, LANES x SPLIT = 256 invocations (the norm
// needs exactly 256: WG below; the launcher checks). Dispatch (ceil(O4 / LANES), 1, 1).

requires packed_4x8_integer_dot_product;

override I: u32;                   // in features (the normalised row's width)
override O: u32;                   // out features (of each matrix)
override EPS: f32;                 // rms_norm_eps
override SPLIT: u32 = 64u;         // invocations sharing each output's K range (workgroup y)
override LANES: u32 = 4u;          // packed rows per workgroup (workgroup x)
override ACCUM: bool = false;      // main: y += result instead of y = result
override ACT: u32 = 0u;            // main_glu: 0 relu^2, 1 silu
override O4: u32 = (O + 3u) / 4u;  // packed rows
override I4: u32 = (I + 3u) / 4u;  // x_q words = weight words per packed row

const RMS_LANES: u32 = 64u; // rms_norm.wgsl's LANES (the CPU mirror's ops::RMS_LANES)
const WG: u32 = 256u;       // invocations per workgroup = LANES * SPLIT
const CH4: u32 = WG;        // vec4 groups per chunk of the sum of squares

struct Dims {
    y_row0: u32, // row of y (and y2) written
}

@group(0) @binding(0) var<uniform> dims: Dims;                 // main, main_kv
@group(0) @binding(1) var<storage, read> x: array<f32>;        // (1, I) the row to normalise
@group(0) @binding(2) var<storage, read> nw: array<f32>;       // (I) the norm's weight
@group(0) @binding(3) var<storage, read> w: array<u32>;        // W: (ceil(I/4), ceil(O/4)) words
@group(0) @binding(4) var<storage, read> sw: array<f32>;       // (1) s_w
@group(0) @binding(5) var<storage, read_write> y: array<f32>;   // (R, O), R > y_row0; main_glu: (1, O)
@group(0) @binding(6) var<storage, read> w2: array<u32>;       // W2 (main_kv, main_glu)
@group(0) @binding(7) var<storage, read> sw2: array<f32>;      // (1) s_w2
@group(0) @binding(8) var<storage, read_write> y2: array<f32>; // (R, O) (main_kv)

var<workgroup> sq: array<vec4<f32>, CH4>;    // squares of one chunk's groups
var<workgroup> lane: array<f32, RMS_LANES>;  // lane sums, then the tree
var<workgroup> ymax: atomic<u32>;            // max |y_n| as bits (ordered as u32 for >= 0)
var<workgroup> xs: array<u32, I4>;           // the row's codes, four per word
// [matrix][slot s][lane x]: the workgroup's sums over its SPLIT parts.
var<workgroup> part: array<atomic<i32>, 8u * LANES>;

// 1 / sqrt(mean(x^2) + EPS): rms_norm.wgsl's inv_rms for the row at 0.
fn inv_rms(lid: u32) -> f32 {
    let n4 = (I + 3u) / 4u;
    let k = (lid + WG - 32u) % WG;
    var acc = vec4<f32>();
    for (var g0 = 0u; g0 < n4; g0 += CH4) {
        let n = min(CH4, n4 - g0);
        if k < n {
            let c = 4u * (g0 + k);
            var v = vec4<f32>();
            if c + 3u < I {
                v = vec4<f32>(x[c], x[c + 1u], x[c + 2u], x[c + 3u]);
            } else {
                for (var j = 0u; j < 4u; j++) {
                    if c + j < I {
                        v[j] = x[c + j];
                    }
                }
            }
            sq[k] = v * v;
        }
        workgroupBarrier();
        if lid < RMS_LANES {
            for (var j = lid; j < n; j += RMS_LANES) {
                acc += sq[j];
            }
        }
        workgroupBarrier();
    }
    if lid < RMS_LANES {
        lane[lid] = (acc.x + acc.y) + (acc.z + acc.w);
    }
    workgroupBarrier();
    // rms_norm.wgsl's tree (lane l += lane l + h, h = 32 .. 1), each addition the same, done
    // by one invocation: one barrier instead of six.
    if lid == 0u {
        for (var h = RMS_LANES / 2u; h > 0u; h >>= 1u) {
            for (var l = 0u; l < h; l++) {
                lane[l] = lane[l] + lane[l + h];
            }
        }
    }
    workgroupBarrier();
    return 1.0 / sqrt(lane[0] / f32(I) + EPS);
}

// Normalises and quantizes the row into xs (rms_norm.wgsl main_quant's operations); returns
// s_a. Every invocation calls it (barriers); the part sums are zeroed on the way.
fn norm_quant(lid: u32) -> f32 {
    for (var e = lid; e < 8u * LANES; e += WG) {
        atomicStore(&part[e], 0);
    }
    if lid == 0u {
        atomicStore(&ymax, 0u);
    }
    let inv = inv_rms(lid); // its barriers also publish the zeros
    var m = 0.0;
    for (var c = lid; c < I; c += WG) {
        m = max(m, abs(nw[c] * (x[c] * inv)));
    }
    // A max is exact in any order, and non-negative floats order as their bits do.
    atomicMax(&ymax, bitcast<u32>(m));
    workgroupBarrier();
    let s_a = 127.0 / max(bitcast<f32>(atomicLoad(&ymax)), 1e-5);
    for (var k = lid; k < I4; k += WG) {
        var word = 0u;
        for (var j = 0u; j < 4u; j++) {
            let c = 4u * k + j;
            if c < I {
                let v = nw[c] * (x[c] * inv);
                let q = i32(clamp(round(v * s_a), -128.0, 127.0));
                word |= (bitcast<u32>(q) & 0xffu) << (8u * j);
            }
        }
        xs[k] = word;
    }
    workgroupBarrier();
    return s_a;
}

// The four int8 dot products of activation word a with the four slots' signed codes of
// weight word ww (ternary_matmul.wgsl's unpacking).
fn dot_word(a: u32, ww: u32) -> vec4<i32> {
    let u = (vec4<u32>(ww) >> vec4<u32>(0u, 2u, 4u, 6u)) & vec4<u32>(0x03030303u);
    let c = ((u | vec4<u32>(0x80808080u)) - vec4<u32>(0x01010101u)) ^ vec4<u32>(0x80808080u);
    return vec4<i32>(dot4I8Packed(a, c.x), dot4I8Packed(a, c.y), dot4I8Packed(a, c.z), dot4I8Packed(a, c.w));
}

// Row pc of W (words k0, k0 + SPLIT, ...) against the codes: four words a step, loaded
// before any is used (integer sums: exact in any order).
fn row_w(pc: u32, k0: u32) -> vec4<i32> {
    var a = vec4<i32>();
    var k = k0;
    for (; k + 3u * SPLIT < I4; k += 4u * SPLIT) {
        let w0 = w[k * O4 + pc];
        let w1 = w[(k + SPLIT) * O4 + pc];
        let w2_ = w[(k + 2u * SPLIT) * O4 + pc];
        let w3 = w[(k + 3u * SPLIT) * O4 + pc];
        a += dot_word(xs[k], w0) + dot_word(xs[k + SPLIT], w1)
            + dot_word(xs[k + 2u * SPLIT], w2_) + dot_word(xs[k + 3u * SPLIT], w3);
    }
    for (; k < I4; k += SPLIT) {
        a += dot_word(xs[k], w[k * O4 + pc]);
    }
    return a;
}

// The same for W2.
fn row_w2(pc: u32, k0: u32) -> vec4<i32> {
    var a = vec4<i32>();
    var k = k0;
    for (; k + 3u * SPLIT < I4; k += 4u * SPLIT) {
        let w0 = w2[k * O4 + pc];
        let w1 = w2[(k + SPLIT) * O4 + pc];
        let w2_ = w2[(k + 2u * SPLIT) * O4 + pc];
        let w3 = w2[(k + 3u * SPLIT) * O4 + pc];
        a += dot_word(xs[k], w0) + dot_word(xs[k + SPLIT], w1)
            + dot_word(xs[k + 2u * SPLIT], w2_) + dot_word(xs[k + 3u * SPLIT], w3);
    }
    for (; k < I4; k += SPLIT) {
        a += dot_word(xs[k], w2[k * O4 + pc]);
    }
    return a;
}

// Matrix m's sums of lane x into the workgroup's totals.
fn add_part(m: u32, x: u32, a: vec4<i32>) {
    let base = m * 4u * LANES + x;
    atomicAdd(&part[base], a.x);
    atomicAdd(&part[base + LANES], a.y);
    atomicAdd(&part[base + 2u * LANES], a.z);
    atomicAdd(&part[base + 3u * LANES], a.w);
}

@compute @workgroup_size(LANES, SPLIT)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let s_a = norm_quant(li);
    // Row p (clamped: the rows past O4 of the last group compute row O4-1 and write nothing).
    let pc = min(group.x * LANES + lid.x, O4 - 1u);
    let a = row_w(pc, lid.y);
    add_part(0u, lid.x, a);
    workgroupBarrier();
    let s_w = sw[0];
    for (var e = li; e < 4u * LANES; e += WG) {
        let p = group.x * LANES + e % LANES;
        let o = p + (e / LANES) * O4;
        if p < O4 && o < O {
            let r = f32(atomicLoad(&part[e])) / (s_a * s_w);
            let at = dims.y_row0 * O + o;
            if ACCUM {
                y[at] = y[at] + r;
            } else {
                y[at] = r;
            }
        }
    }
}

@compute @workgroup_size(LANES, SPLIT)
fn main_kv(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let s_a = norm_quant(li);
    let pc = min(group.x * LANES + lid.x, O4 - 1u);
    let a = row_w(pc, lid.y);
    let b = row_w2(pc, lid.y);
    add_part(0u, lid.x, a);
    add_part(1u, lid.x, b);
    workgroupBarrier();
    let s_w = sw[0];
    let s_w2 = sw2[0];
    for (var e = li; e < 4u * LANES; e += WG) {
        let p = group.x * LANES + e % LANES;
        let o = p + (e / LANES) * O4;
        if p < O4 && o < O {
            let at = dims.y_row0 * O + o;
            y[at] = f32(atomicLoad(&part[e])) / (s_a * s_w);
            y2[at] = f32(atomicLoad(&part[4u * LANES + e])) / (s_a * s_w2);
        }
    }
}

@compute @workgroup_size(LANES, SPLIT)
fn main_glu(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let s_a = norm_quant(li);
    let pc = min(group.x * LANES + lid.x, O4 - 1u);
    let g = row_w(pc, lid.y);
    let u = row_w2(pc, lid.y);
    add_part(0u, lid.x, g);
    add_part(1u, lid.x, u);
    workgroupBarrier();
    let s_g = sw[0];
    let s_u = sw2[0];
    for (var e = li; e < 4u * LANES; e += WG) {
        let p = group.x * LANES + e % LANES;
        let o = p + (e / LANES) * O4;
        if p < O4 && o < O {
            let gv = f32(atomicLoad(&part[e])) / (s_a * s_g);
            let uv = f32(atomicLoad(&part[4u * LANES + e])) / (s_a * s_u);
            var act: f32;
            if ACT == 0u {
                let rl = max(gv, 0.0);
                act = rl * rl;
            } else {
                act = gv / (1.0 + exp(-gv));
            }
            y[o] = act * uv;
        }
    }
}
