// Sum of squares, in a fixed order (the same bits every run): the global gradient norm's
// square for clipping and the NaN/inf guard (bitlora_core::optim::AdamW::grad_norm sums the
// same squares in f64; here f32, each invocation over a strided slice, then a tree per
// workgroup). Two dispatches: pass 1 (square = 1) over the N values, G workgroups, each
// writing its partial sum to out[wg]; pass 2 (square = 0) over those G partials, one
// workgroup, writing the total to out[0].
// Dispatch (G, 1, 1) with G <= WG.

override WG: u32 = 256u; // workgroup size, a power of two

struct Params {
    n: u32,
    square: u32,
    stride: u32, // invocations in the dispatch: G * WG
    _pad: u32,
}

@group(0) @binding(0) var<uniform> u: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

var<workgroup> part: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    var s = 0.0;
    for (var j = gid.x; j < u.n; j += u.stride) {
        let v = x[j];
        s += select(v, v * v, u.square != 0u);
    }
    part[lid.x] = s;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h /= 2u) {
        if lid.x < h {
            part[lid.x] += part[lid.x + h];
        }
        workgroupBarrier();
    }
    if lid.x == 0u {
        out[wid.x] = part[0];
    }
}
