//! Page choice: the pseudo-random generator and the access patterns of
//! [`amsvm_abi::pattern`]. Pure code, also compiled into the host tests of
//! `vmm/src/images.rs`.

use super::math;

/// SplitMix64 step: a good 64-bit mixer, used to seed and to hash.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    mix64(*state)
}

/// The SplitMix64 finaliser: a bijective 64-bit mixing function.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// xoshiro256++ (Blackman & Vigna), seeded through SplitMix64.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let s = [splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm)];
        Rng { s }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, n)` (`n > 0`), by multiply-shift; the bias is below `n / 2^64`.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// True with probability `pct / 100`.
    pub fn percent(&mut self, pct: u32) -> bool {
        self.below(100) < pct as u64
    }
}

/// A pseudo-random bijection of `[0, n)`: a keyed mixing permutation of the enclosing
/// power-of-two range, restricted to `[0, n)` by cycle walking. Used to spread Zipf ranks
/// (hot pages) over the whole working set.
#[derive(Clone, Debug)]
pub struct Permutation {
    n: u64,
    bits: u32,
    mask: u64,
    keys: [u64; 3],
}

impl Permutation {
    pub fn new(n: u64, seed: u64) -> Self {
        assert!(n > 0);
        let bits = (64 - (n - 1).leading_zeros()).max(2);
        let mask = if bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 };
        let mut sm = seed;
        // Odd multipliers and an additive key: every round is a bijection mod 2^bits.
        let keys = [splitmix64(&mut sm) | 1, splitmix64(&mut sm) | 1, splitmix64(&mut sm)];
        Permutation { n, bits, mask, keys }
    }

    fn round(&self, mut x: u64) -> u64 {
        let half = (self.bits / 2).max(1);
        x = x.wrapping_add(self.keys[2]) & self.mask;
        x = x.wrapping_mul(self.keys[0]) & self.mask;
        x ^= x >> half;
        x = x.wrapping_mul(self.keys[1]) & self.mask;
        x ^= x >> half;
        x
    }

    /// The image of `i` (`i < n`).
    pub fn apply(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        // The cycle of `i` under `round` contains `i` itself, so this ends; on average
        // after fewer than two rounds, since n > 2^(bits-1).
        let mut x = self.round(i);
        while x >= self.n {
            x = self.round(x);
        }
        x
    }
}

/// Zipf distribution over ranks `1..=n` with P(k) proportional to `k^-s`, sampled by
/// rejection-inversion (W. Hörmann, G. Derflinger: "Rejection-inversion to generate
/// variates from monotone discrete distributions", 1996): constant expected time for any
/// `n` and any `s > 0`, no tables.
#[derive(Clone, Debug)]
pub struct Zipf {
    n: f64,
    s: f64,
    h_integral_x1: f64,
    h_integral_n: f64,
    squeeze: f64,
}

impl Zipf {
    /// `n >= 1`, `s > 0`.
    pub fn new(n: u64, s: f64) -> Self {
        assert!(n >= 1 && s > 0.0);
        let mut z = Zipf { n: n as f64, s, h_integral_x1: 0.0, h_integral_n: 0.0, squeeze: 0.0 };
        z.h_integral_x1 = z.h_integral(1.5) - 1.0;
        z.h_integral_n = z.h_integral(z.n + 0.5);
        z.squeeze = 2.0 - z.h_integral_inverse(z.h_integral(2.5) - z.h(2.0));
        z
    }

    /// A rank in `1..=n`; rank 1 is the most popular.
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        loop {
            let u = self.h_integral_n + rng.unit_f64() * (self.h_integral_x1 - self.h_integral_n);
            let x = self.h_integral_inverse(u);
            let mut k = math::round_half_away(x);
            if k < 1.0 {
                k = 1.0;
            } else if k > self.n {
                k = self.n;
            }
            if k - x <= self.squeeze || u >= self.h_integral(k + 0.5) - self.h(k) {
                return k as u64;
            }
        }
    }

    /// h(x) = x^-s.
    fn h(&self, x: f64) -> f64 {
        math::exp(-self.s * math::ln(x))
    }

    /// H(x) = (x^(1-s) - 1) / (1 - s), or ln(x) for s = 1: an antiderivative of h.
    fn h_integral(&self, x: f64) -> f64 {
        let log_x = math::ln(x);
        helper2((1.0 - self.s) * log_x) * log_x
    }

    /// The inverse of H.
    fn h_integral_inverse(&self, x: f64) -> f64 {
        let mut t = x * (1.0 - self.s);
        if t < -1.0 {
            // Only rounding errors bring t below -1; clamp to keep the log finite.
            t = -1.0;
        }
        math::exp(helper1(t) * x)
    }
}

/// ln(1 + x) / x, continuous at 0.
fn helper1(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        math::ln_1p(x) / x
    } else {
        1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x))
    }
}

/// (e^x - 1) / x, continuous at 0.
fn helper2(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        math::exp_m1(x) / x
    } else {
        1.0 + x * 0.5 * (1.0 + x * (1.0 / 3.0) * (1.0 + 0.25 * x))
    }
}

/// A hot spot of `hot` consecutive pages (wrapping around the working set) that gets
/// `hot_access_pct`% of the accesses; the rest go uniformly to the other pages. Every
/// `phase_accesses` accesses (0 = never) it jumps to a new place, disjoint from the old
/// one whenever the hot spot is at most half of the working set.
#[derive(Clone, Debug)]
pub struct Hotspot {
    n: u64,
    hot: u64,
    hot_access_pct: u32,
    phase_accesses: u64,
    base: u64,
    in_phase: u64,
}

impl Hotspot {
    pub fn new(n: u64, hot_pct: u32, hot_access_pct: u32, phase_accesses: u64, rng: &mut Rng) -> Self {
        assert!(n > 0);
        // u64 arithmetic (no u128 division, which would be a library call); a working
        // set is far below 2^57 pages.
        let hot = (n.saturating_mul(hot_pct as u64) / 100).clamp(1, n);
        let base = rng.below(n);
        Hotspot { n, hot, hot_access_pct, phase_accesses, base, in_phase: 0 }
    }

    /// Pages in the hot spot.
    #[allow(dead_code)] // used by the host tests
    pub fn hot_pages(&self) -> u64 {
        self.hot
    }

    /// First page of the hot spot now.
    #[allow(dead_code)] // used by the host tests
    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn sample(&mut self, rng: &mut Rng) -> u64 {
        if self.phase_accesses != 0 && self.in_phase == self.phase_accesses {
            self.in_phase = 0;
            self.base = self.next_base(rng);
        }
        self.in_phase += 1;
        let offset = if self.hot == self.n || rng.percent(self.hot_access_pct) {
            rng.below(self.hot)
        } else {
            self.hot + rng.below(self.n - self.hot)
        };
        (self.base + offset) % self.n
    }

    fn next_base(&self, rng: &mut Rng) -> u64 {
        if self.n == 1 {
            return 0;
        }
        let step = if 2 * self.hot <= self.n {
            // A distance d in [hot, n - hot] keeps [base+d, base+d+hot) clear of
            // [base, base+hot) modulo n.
            self.hot + rng.below(self.n - 2 * self.hot + 1)
        } else {
            1 + rng.below(self.n - 1)
        };
        (self.base + step) % self.n
    }
}

/// Picks the page of every access according to one of [`amsvm_abi::pattern`].
#[derive(Clone, Debug)]
pub enum PageSampler {
    Sequential { n: u64, next: u64 },
    Uniform { n: u64 },
    Zipf { zipf: Zipf, perm: Permutation },
    Hotspot(Hotspot),
}

impl PageSampler {
    pub fn sample(&mut self, rng: &mut Rng) -> u64 {
        match self {
            PageSampler::Sequential { n, next } => {
                let page = *next;
                *next = if page + 1 == *n { 0 } else { page + 1 };
                page
            }
            PageSampler::Uniform { n } => rng.below(*n),
            PageSampler::Zipf { zipf, perm } => perm.apply(zipf.sample(rng) - 1),
            PageSampler::Hotspot(h) => h.sample(rng),
        }
    }
}
