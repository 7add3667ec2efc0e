// Embedding gather: out[t, :] = table[tokens[t], :] for the tokens whose id falls in this
// chunk of the table. A table larger than one storage binding (2B-4T: 128256 x 2560 f32 =
// 1.3 GB) is split along V into chunks of consecutive rows, one dispatch each; a token is
// written by the one dispatch whose rows [row0, row0 + rows) hold its id.
// The table is f32, or bf16 packed two per word (BF16: element 2k in the low half, 2k + 1 in
// the high half), widened exactly to the same f32.
// Dispatch (ceil(C / WG), T, 1). Token ids are checked against V on the CPU before dispatch.

override C: u32;          // hidden size
override WG: u32 = 64u;   // workgroup size
override BF16 = false;    // the table is bf16 pairs, else f32 bits

struct Dims {
    t: u32,    // T, tokens
    row0: u32, // first vocabulary id in this chunk
    rows: u32, // VC, rows in this chunk
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> tokens: array<u32>;    // (T)
@group(0) @binding(2) var<storage, read> table: array<u32>;     // (VC, C) f32 or bf16: rows row0 .. row0+VC of (V, C)
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // (T, C)

// Element i of the chunk as f32 (bf16: its bits shifted up, exact).
fn table_at(i: u32) -> f32 {
    if BF16 {
        let word = table[i >> 1u];
        return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (i & 1u) == 1u));
    }
    return bitcast<f32>(table[i]);
}

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let t = gid.y;
    if c >= C || t >= dims.t {
        return;
    }
    let tok = tokens[t];
    if tok < dims.row0 || tok - dims.row0 >= dims.rows {
        return;
    }
    out[t * C + c] = table_at((tok - dims.row0) * C + c);
}
