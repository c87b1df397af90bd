//! The few `f64` functions the Zipf sampler needs (`core` has no `ln`/`exp`). Pure code,
//! also compiled into the host tests of `vmm/src/images.rs`.
//!
//! Accuracy is a few ulps over the ranges the sampler uses, which is far more than a
//! page-popularity distribution needs.

/// ln 2 split in two (as in fdlibm): the high part has its low 32 mantissa bits clear, so
/// `k * LN2_HI` is exact for the exponents used here.
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000); // 6.93147180369123816490e-01
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76); // 1.90821492927058770002e-10
const SQRT2: f64 = core::f64::consts::SQRT_2;

/// Natural logarithm. `ln(0) = -inf`, negative or NaN input gives NaN, `ln(inf) = inf`.
pub fn ln(x: f64) -> f64 {
    if x.is_nan() || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 {
        return f64::NEG_INFINITY;
    }
    if x.is_infinite() {
        return x;
    }
    let mut bits = x.to_bits();
    let mut e: i64 = 0;
    if bits >> 52 == 0 {
        // Subnormal: scale into the normal range first.
        bits = (x * f64::from_bits(0x4350_0000_0000_0000)).to_bits(); // * 2^54
        e -= 54;
    }
    e += ((bits >> 52) & 0x7ff) as i64 - 1023;
    // Mantissa m in [1, 2); bring it into [sqrt(2)/2, sqrt(2)).
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m > SQRT2 {
        m *= 0.5;
        e += 1;
    }
    // ln(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716.
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    // 2 (s + s^3/3 + s^5/5 + ... + s^23/23): the next term is below 2^-60 relative.
    let mut p = 1.0 / 23.0;
    let mut k = 21.0;
    while k >= 3.0 {
        p = p * z + 1.0 / k;
        k -= 2.0;
    }
    let ln_m = 2.0 * s + 2.0 * s * z * p;
    let ef = e as f64;
    ef * LN2_HI + (ln_m + ef * LN2_LO)
}

/// `e^x`. Overflows to `inf` above ~709.78, underflows to 0 below ~-745.1.
pub fn exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x > 709.782_712_893_384 {
        return f64::INFINITY;
    }
    if x < -745.133_219_101_941_1 {
        return 0.0;
    }
    // x = k ln2 + r, |r| <= ln2 / 2.
    let kf = round_half_away(x * core::f64::consts::LOG2_E);
    let k = kf as i64;
    let r = (x - kf * LN2_HI) - kf * LN2_LO;
    // Taylor series of e^r to r^14/14!: the rest is below 2^-60 for |r| <= 0.347.
    let mut p = 1.0;
    let mut n = 14.0;
    while n >= 1.0 {
        p = 1.0 + p * r / n;
        n -= 1.0;
    }
    scale_pow2(p, k)
}

/// `ln(1 + x)`, accurate for small `x` as well.
pub fn ln_1p(x: f64) -> f64 {
    let u = 1.0 + x;
    if u == 1.0 {
        x
    } else if u.is_infinite() {
        u
    } else {
        // Compensates the rounding of 1 + x (Goldberg's trick).
        ln(u) * x / (u - 1.0)
    }
}

/// `e^x - 1`, accurate for small `x` as well.
pub fn exp_m1(x: f64) -> f64 {
    if x.abs() > 0.5 {
        return exp(x) - 1.0;
    }
    let u = exp(x);
    if u == 1.0 {
        x
    } else {
        let um1 = u - 1.0;
        if um1 == -1.0 {
            -1.0
        } else {
            // Kahan's trick: the rounding errors of u and ln(u) cancel.
            um1 * x / ln(u)
        }
    }
}

/// Rounds to the nearest integer, halves away from zero (for |x| < 2^52).
pub fn round_half_away(x: f64) -> f64 {
    if x.abs() >= 4_503_599_627_370_496.0 {
        return x; // already integral
    }
    let t = (x.abs() + 0.5) as i64 as f64;
    if x < 0.0 {
        -t
    } else {
        t
    }
}

/// `p * 2^k` without overflowing intermediate results (p in [0.5, 2]).
fn scale_pow2(p: f64, k: i64) -> f64 {
    if k > 1023 {
        return scale_pow2(p * f64::from_bits(0x7fe0_0000_0000_0000), k - 1023); // * 2^1023
    }
    if k < -1022 {
        // Go through a normal intermediate value, then let the final multiply round
        // once into the subnormal range.
        return scale_pow2(p * f64::from_bits(0x0010_0000_0000_0000), k + 1022); // * 2^-1022
    }
    p * f64::from_bits(((k + 1023) as u64) << 52)
}
