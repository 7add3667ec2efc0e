// One AdamW step with PyTorch's semantics (torch.optim.AdamW; bitlora_core::optim::AdamW::step)
// on one tensor, elementwise, after global-norm clipping by the factor `coef`:
//   g *= coef (written back, as the CPU clips the gradients in place)
//   p *= 1 - lr * weight_decay
//   m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
//   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
// with step_size = lr / (1 - b1^t) and bc2_sqrt = sqrt(1 - b2^t) computed on the CPU in f64
// and passed as uniforms, as optim.rs does.
// Dispatch (ceil(N / WG), 1, 1), or (WG-blocks split over x and y when N / WG > 65535).

override WG: u32 = 64u; // workgroup size

struct Params {
    n: u32,
    row: u32, // elements per dispatch row (gid.y stride)
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
    coef: f32,
}

@group(0) @binding(0) var<uniform> u: Params;
@group(0) @binding(1) var<storage, read_write> p: array<f32>; // (N) parameters
@group(0) @binding(2) var<storage, read_write> g: array<f32>; // (N) gradients
@group(0) @binding(3) var<storage, read_write> m: array<f32>; // (N) first moment
@group(0) @binding(4) var<storage, read_write> v: array<f32>; // (N) second moment

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.y * u.row + gid.x;
    if gid.x >= u.row || j >= u.n {
        return;
    }
    var gj = g[j];
    if u.coef < 1.0 {
        gj *= u.coef;
        g[j] = gj;
    }
    var pj = p[j] * (1.0 - u.lr * u.weight_decay);
    let mj = u.beta1 * m[j] + (1.0 - u.beta1) * gj;
    let vj = u.beta2 * v[j] + (1.0 - u.beta2) * gj * gj;
    let denom = sqrt(vj) / u.bc2_sqrt + u.eps;
    pj -= u.step_size * mj / denom;
    m[j] = mj;
    v[j] = vj;
    p[j] = pj;
}
