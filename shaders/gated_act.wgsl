// Gated activation of the FFN, elementwise over (T, F): out = act(gate) * up, with
//   ACT = 0: relu(g)^2 (BitNet b1.58 2B-4T),  ACT = 1: silu(g) = g / (1 + exp(-g)) (1bitLLM).
// Dispatch (ceil(F / WG), T, 1).

override F: u32;        // ffn width
override ACT: u32 = 0u; // 0 relu^2, 1 silu
override WG: u32 = 64u; // workgroup size

@group(0) @binding(0) var<storage, read> gate: array<f32>;      // (T, F)
@group(0) @binding(1) var<storage, read> up: array<f32>;        // (T, F)
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // (T, F)

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    if gid.x >= F {
        return;
    }
    let idx = gid.y * F + gid.x;
    let g = gate[idx];
    var a: f32;
    if ACT == 0u {
        let r = max(g, 0.0);
        a = r * r;
    } else {
        a = g / (1.0 + exp(-g));
    }
    out[idx] = a * up[idx];
}
