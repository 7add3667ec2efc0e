// The FFN's gated product for decoding, in one dispatch: out (T, F) = act(gate) * up with
//   gate = (x_q . W_g^T) / (s_a * s_g),   up = (x_q . W_u^T) / (s_a * s_u),
// W_g and W_u ternary (F, C) in transformers' packed layout, as ternary_matmul.wgsl reads them,
// and act as gated_act.wgsl (ACT = 0: relu(g)^2, ACT = 1: silu). Each product is exact in i32
// and every float operation is the one ternary_matmul.wgsl and then gated_act.wgsl perform, on
// the same values, so the output equals those three dispatches bit for bit (the kernel tests
// check it); gate and up never reach memory.
//
// Blocking: ternary_matmul.wgsl's one-token kernel. A workgroup is LANES x SPLIT invocations
// and owns LANES consecutive packed rows p (4 LANES outputs) of both matrices for one token;
// invocation (x, y) adds words k = y, y + SPLIT, ... of row p of each matrix, and the SPLIT
// parts meet in workgroup memory (atomicAdd on i32: exact, order-free).
// Dispatch (ceil(O4 / LANES), T, 1).

requires packed_4x8_integer_dot_product;

override I: u32;                   // in features (C)
override O: u32;                   // out features (F)
override SPLIT: u32 = 64u;         // invocations sharing each output's K range (workgroup y)
override LANES: u32 = 4u;          // packed rows per workgroup (workgroup x)
override ACT: u32 = 0u;            // 0 relu^2, 1 silu
override O4: u32 = (O + 3u) / 4u;  // packed rows
override I4: u32 = (I + 3u) / 4u;  // x_q words per token = weight words per packed row

@group(0) @binding(0) var<storage, read> xq: array<u32>;        // (T, ceil(I/4)) int8 x4
@group(0) @binding(1) var<storage, read> sa: array<f32>;        // (T) s_a
@group(0) @binding(2) var<storage, read> wg: array<u32>;        // W_g: (ceil(I/4), ceil(O/4)) words
@group(0) @binding(3) var<storage, read> sg: array<f32>;        // (1) s_g
@group(0) @binding(4) var<storage, read> wu: array<u32>;        // W_u: (ceil(I/4), ceil(O/4)) words
@group(0) @binding(5) var<storage, read> su: array<f32>;        // (1) s_u
@group(0) @binding(6) var<storage, read_write> out: array<f32>; // (T, O)

// [matrix (gate, up)][slot s][lane x]: the workgroup's sums over its SPLIT parts.
var<workgroup> part: array<atomic<i32>, 8u * LANES>;

// The int8 dot products of activation word x with the four slots' signed codes of weight word
// ww (the unpacking of ternary_matmul.wgsl).
fn dot_word(x: u32, ww: u32) -> vec4<i32> {
    let u = (vec4<u32>(ww) >> vec4<u32>(0u, 2u, 4u, 6u)) & vec4<u32>(0x03030303u);
    let c = ((u | vec4<u32>(0x80808080u)) - vec4<u32>(0x01010101u)) ^ vec4<u32>(0x80808080u);
    return vec4<i32>(dot4I8Packed(x, c.x), dot4I8Packed(x, c.y), dot4I8Packed(x, c.z), dot4I8Packed(x, c.w));
}

fn add_part(m: u32, lane: u32, a: vec4<i32>) {
    let base = m * 4u * LANES + lane;
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
    let t = group.y;
    for (var e = li; e < 8u * LANES; e += LANES * SPLIT) {
        atomicStore(&part[e], 0);
    }
    // Row p (clamped: the rows past O4 of the last group compute row O4-1 and write nothing).
    let pc = min(group.x * LANES + lid.x, O4 - 1u);
    let r = t * I4;
    var g = vec4<i32>();
    var u = vec4<i32>();
    // Four words a step, loaded before any is used: the loads overlap instead of each step
    // waiting on memory (the sums are integers: exact in any order).
    var k = lid.y;
    for (; k + 3u * SPLIT < I4; k += 4u * SPLIT) {
        let x0 = xq[r + k];
        let x1 = xq[r + k + SPLIT];
        let x2 = xq[r + k + 2u * SPLIT];
        let x3 = xq[r + k + 3u * SPLIT];
        let g0 = wg[k * O4 + pc];
        let g1 = wg[(k + SPLIT) * O4 + pc];
        let g2 = wg[(k + 2u * SPLIT) * O4 + pc];
        let g3 = wg[(k + 3u * SPLIT) * O4 + pc];
        let u0 = wu[k * O4 + pc];
        let u1 = wu[(k + SPLIT) * O4 + pc];
        let u2 = wu[(k + 2u * SPLIT) * O4 + pc];
        let u3 = wu[(k + 3u * SPLIT) * O4 + pc];
        g += dot_word(x0, g0) + dot_word(x1, g1) + dot_word(x2, g2) + dot_word(x3, g3);
        u += dot_word(x0, u0) + dot_word(x1, u1) + dot_word(x2, u2) + dot_word(x3, u3);
    }
    for (; k < I4; k += SPLIT) {
        let x = xq[r + k];
        g += dot_word(x, wg[k * O4 + pc]);
        u += dot_word(x, wu[k * O4 + pc]);
    }
    workgroupBarrier();
    add_part(0u, lid.x, g);
    add_part(1u, lid.x, u);
    workgroupBarrier();

    let s_a = sa[t];
    let s_g = sg[0];
    let s_u = su[0];
    for (var e = li; e < 4u * LANES; e += LANES * SPLIT) {
        let p = group.x * LANES + e % LANES;
        let o = p + (e / LANES) * O4;
        if p < O4 && o < O {
            let gv = f32(atomicLoad(&part[e])) / (s_a * s_g);
            let uv = f32(atomicLoad(&part[4u * LANES + e])) / (s_a * s_u);
            var a: f32;
            if ACT == 0u {
                let rl = max(gv, 0.0);
                a = rl * rl;
            } else {
                a = gv / (1.0 + exp(-gv));
            }
            out[t * O + o] = a * uv;
        }
    }
}
