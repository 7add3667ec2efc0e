//! A small seeded RNG (SplitMix64): deterministic across platforms and targets (wasm32 too),
//! so random models and test inputs are reproducible from a seed alone.

#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// The whole state: `Rng::new(rng.state())` continues exactly where `rng` is.
    pub fn state(&self) -> u64 {
        self.state
    }

    /// The state's increment per draw (SplitMix64's golden-ratio gamma).
    pub const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    /// Moves on by `n` draws of [`Rng::next_u64`] (or of [`Rng::uniform`], one each) in O(1):
    /// the k-th draw after the state s is `mix(s + k * GAMMA)`, which is also how a GPU kernel
    /// computes draw k of a stream in parallel (bitlora-gpu's dropout).
    pub fn skip(&mut self, n: u64) {
        self.state = self.state.wrapping_add(n.wrapping_mul(Self::GAMMA));
    }

    /// Next 64 random bits (SplitMix64, Steele et al. 2014).
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(Self::GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 24 bits of precision (every value exactly representable in f32).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform integer in 0..n (n > 0); the modulo bias is below 2^-32 for the n we use.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Standard normal via Box-Muller.
    pub fn normal(&mut self) -> f32 {
        let u1 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * libm::log(1.0 - u1)).sqrt() * libm::cos(std::f64::consts::TAU * u2)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn skip_equals_drawing() {
        for n in [0u64, 1, 7, 1000] {
            let (mut a, mut b) = (Rng::new(42), Rng::new(42));
            (0..n).for_each(|_| {
                a.uniform();
            });
            b.skip(n);
            assert_eq!(a.state(), b.state());
            assert_eq!(a.next_u64(), b.next_u64());
        }
    }
}
