// Greedy decoding's next token on the GPU: the index of the largest logit of one row, the
// lowest index on ties, a NaN never chosen (0 when every logit is NaN), as
// bitlora_core::generate::argmax. The id goes into next[0], the token input of the next
// decoding pass, so that pass can be recorded and submitted before this one is read back.
// One workgroup; dispatch (1, 1, 1).

override V: u32; // vocabulary (row width)

const WG: u32 = 256u;
const NONE: u32 = 0xffffffffu; // no candidate yet

@group(0) @binding(0) var<storage, read> logits: array<f32>;    // (V)
@group(0) @binding(1) var<storage, read_write> next: array<u32>; // (>= 1) token input

var<workgroup> best_v: array<f32, WG>;
var<workgroup> best_i: array<u32, WG>;

// NaN by its bits: a compiler may assume `v != v` is false.
fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

// Whether candidate (v, i) beats the best so far (bv, bi).
fn beats(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return bi == NONE || v > bv || (v == bv && i < bi);
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
    var bv = 0.0;
    var bi = NONE;
    for (var i = lid; i < V; i += WG) {
        let v = logits[i];
        if !is_nan(v) && beats(v, i, bv, bi) {
            bv = v;
            bi = i;
        }
    }
    best_v[lid] = bv;
    best_i[lid] = bi;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h >>= 1u) {
        if lid < h {
            let i = best_i[lid + h];
            if i != NONE && beats(best_v[lid + h], i, best_v[lid], best_i[lid]) {
                best_v[lid] = best_v[lid + h];
                best_i[lid] = i;
            }
        }
        workgroupBarrier();
    }
    if lid == 0u {
        next[0] = select(best_i[0], 0u, best_i[0] == NONE);
    }
}
