//! `rng: fast`: standard normals from a counter-based generator.
//!
//! Element `i` of parameter tensor `t` in the step with seed `s` is a pure
//! function of `(s, t, i)`: Philox 4x32-10 (Salmon et al., SC 2011, "Parallel
//! random numbers: as easy as 1, 2, 3") with key = `s` and counter =
//! `(i / 4 as u64, t, 0)` gives four 32-bit words, and one Box–Muller transform
//! of each word pair gives normals `4b .. 4b+3` of block `b`.  Any thread can
//! therefore produce any piece of z without producing what comes before it:
//! results are identical for every thread count and chunk size, and no buffer
//! larger than a chunk ever exists.
//!
//! The transform uses only IEEE-exact operations (+, −, ×, ÷, √) and fixed
//! polynomials for ln, sin and cos — no libm, no fused multiply-add — so z is
//! bit-identical on every x86-64 or ARM machine, with or without the AVX2 build
//! of the kernel, and a script can rebuild it (`scripts/mezo_rebuild.py`).
//!
//! Written here rather than taken from a crate: the crates that implement Philox
//! produce one block at a time behind `RngCore`, which neither vectorizes nor
//! offers this fixed normal transform; the generator itself is twenty lines and
//! is checked against Random123's known-answer vectors.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox 4x32 with 10 rounds, one block.
#[inline(always)]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = M0 as u64 * c[0] as u64;
        let p1 = M1 as u64 * c[2] as u64;
        c = [
            (p1 >> 32) as u32 ^ c[1] ^ k[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

/// Blocks per batch (a multiple of 8, the AVX2 width).
const LANES: usize = 16;
/// Normals per batch of lanes.
const BATCH: usize = 4 * LANES;

const TWO_POW_M24: f32 = 1.0 / 16_777_216.0;
const LN_2: f32 = std::f32::consts::LN_2;
const SQRT_2: f32 = std::f32::consts::SQRT_2;
const HALF_PI: f32 = std::f32::consts::FRAC_PI_2;

/// ln(u) for u in (0, 1], to about 1e-7 relative: u = m·2^e with m in
/// [√½, √2), ln m = 2·atanh((m−1)/(m+1)) by its series to s⁹.
#[inline(always)]
fn ln_unit(u: f32) -> f32 {
    let bits = u.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let big = m > SQRT_2;
    m = if big { m * 0.5 } else { m };
    e += big as i32;
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series = 1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0))));
    e as f32 * LN_2 + 2.0 * s * series
}

/// (cos x, sin x) for x in [0, π/2), Taylor series to x¹² and x¹¹ (error below 6e-8).
#[inline(always)]
fn cos_sin_quarter(x: f32) -> (f32, f32) {
    let x2 = x * x;
    let sin = x
        * (1.0
            + x2 * (-1.0 / 6.0
                + x2 * (1.0 / 120.0
                    + x2 * (-1.0 / 5040.0 + x2 * (1.0 / 362_880.0 + x2 * (-1.0 / 39_916_800.0))))));
    let cos = 1.0
        + x2 * (-0.5
            + x2 * (1.0 / 24.0
                + x2 * (-1.0 / 720.0
                    + x2 * (1.0 / 40320.0
                        + x2 * (-1.0 / 3_628_800.0 + x2 * (1.0 / 479_001_600.0))))));
    (cos, sin)
}

/// Box–Muller: two standard normals from two 32-bit words.  `a` gives the radius
/// from u = (⌊a/2⁸⌋ + 1)/2²⁴ in (0, 1]; `b` gives the angle, its top two bits
/// the quadrant and the next 24 the position within it.
#[inline(always)]
fn box_muller(a: u32, b: u32) -> (f32, f32) {
    let u = ((a >> 8) + 1) as f32 * TWO_POW_M24;
    let r = (-2.0 * ln_unit(u)).sqrt();
    let (c, s) = cos_sin_quarter(((b >> 6) & 0x00ff_ffff) as f32 * TWO_POW_M24 * HALF_PI);
    let q = b >> 30;
    // Rotate (c, s) by q quarter turns: swap on odd q, then flip signs.
    let (x, y) = if q & 1 == 1 { (s, c) } else { (c, s) };
    let x = f32::from_bits(x.to_bits() ^ (((q ^ (q >> 1)) & 1) << 31));
    let y = f32::from_bits(y.to_bits() ^ ((q >> 1) << 31));
    (r * x, r * y)
}

/// The four words of blocks `first .. first + LANES`, word-major.
type Words = [[u32; LANES]; 4];

/// Philox on each block in turn (scalar 32×32→64 multiplies are cheap).
#[inline(always)]
fn philox_lanes(key: [u32; 2], stream: u32, first: u64) -> Words {
    let mut words = [[0u32; LANES]; 4];
    for l in 0..LANES {
        let b = first + l as u64;
        let w = philox4x32_10([b as u32, (b >> 32) as u32, stream, 0], key);
        for j in 0..4 {
            words[j][l] = w[j];
        }
    }
    words
}

/// Philox on eight blocks per AVX2 register: `vpmuludq` multiplies the even
/// 32-bit lanes, so odd lanes are shifted down, multiplied, and blended back.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn philox_lanes_avx2(key: [u32; 2], stream: u32, first: u64) -> Words {
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn mulhilo(x: __m256i, m: __m256i) -> (__m256i, __m256i) {
        let even = _mm256_mul_epu32(x, m);
        let odd = _mm256_mul_epu32(_mm256_srli_epi64::<32>(x), m);
        let hi = _mm256_blend_epi32::<0b1010_1010>(_mm256_srli_epi64::<32>(even), odd);
        let lo = _mm256_blend_epi32::<0b1010_1010>(even, _mm256_slli_epi64::<32>(odd));
        (hi, lo)
    }
    let (m0, m1) = (_mm256_set1_epi32(M0 as i32), _mm256_set1_epi32(M1 as i32));
    let mut words = [[0u32; LANES]; 4];
    for half in 0..LANES / 8 {
        let mut lo = [0u32; 8];
        let mut hi = [0u32; 8];
        for l in 0..8 {
            let b = first + (half * 8 + l) as u64;
            lo[l] = b as u32;
            hi[l] = (b >> 32) as u32;
        }
        let mut c0 = _mm256_loadu_si256(lo.as_ptr().cast());
        let mut c1 = _mm256_loadu_si256(hi.as_ptr().cast());
        let mut c2 = _mm256_set1_epi32(stream as i32);
        let mut c3 = _mm256_setzero_si256();
        let mut k = key;
        for round in 0..10 {
            if round > 0 {
                k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
            }
            let (hi0, lo0) = mulhilo(c0, m0);
            let (hi1, lo1) = mulhilo(c2, m1);
            let k0 = _mm256_set1_epi32(k[0] as i32);
            let k1 = _mm256_set1_epi32(k[1] as i32);
            c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), k0);
            c1 = lo1;
            c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), k1);
            c3 = lo0;
        }
        for (j, c) in [c0, c1, c2, c3].into_iter().enumerate() {
            _mm256_storeu_si256(words[j][half * 8..].as_mut_ptr().cast(), c);
        }
    }
    words
}

/// Box–Muller on every word pair of a batch, in element order (this vectorizes).
#[inline(always)]
fn transform(w: &Words, out: &mut [f32; BATCH]) {
    for (l, z) in out.chunks_exact_mut(4).enumerate() {
        let (z0, z1) = box_muller(w[0][l], w[1][l]);
        let (z2, z3) = box_muller(w[2][l], w[3][l]);
        z.copy_from_slice(&[z0, z1, z2, z3]);
    }
}

/// Fill `out` with elements `start .. start + out.len()` of z for parameter
/// `stream` under step seed `seed`, with `words` as the Philox kernel.
#[inline(always)]
fn fill_with(
    words: impl Fn([u32; 2], u32, u64) -> Words,
    seed: u64,
    stream: u32,
    start: u64,
    out: &mut [f32],
) {
    let key = [seed as u32, (seed >> 32) as u32];
    let mut tmp = [0f32; BATCH];
    let mut i = 0usize;
    let mut pos = start;
    while i < out.len() {
        let block = pos / 4;
        let group_first = block - block % LANES as u64;
        let skip = (pos - group_first * 4) as usize;
        let n = (BATCH - skip).min(out.len() - i);
        let w = words(key, stream, group_first);
        match <&mut [f32; BATCH]>::try_from(&mut out[i..i + n]) {
            Ok(whole) => transform(&w, whole),
            Err(_) => {
                transform(&w, &mut tmp);
                out[i..i + n].copy_from_slice(&tmp[skip..skip + n]);
            }
        }
        i += n;
        pos += n as u64;
    }
}

fn fill_portable(seed: u64, stream: u32, start: u64, out: &mut [f32]) {
    fill_with(philox_lanes, seed, stream, start, out)
}

/// The AVX2 build: vector Philox, and the transform compiled for 256-bit
/// registers.  Bit-identical to the portable build: integer arithmetic is
/// exact and the transform uses no fused multiply-add.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_avx2(seed: u64, stream: u32, start: u64, out: &mut [f32]) {
    fill_with(
        |k, s, f| unsafe { philox_lanes_avx2(k, s, f) },
        seed,
        stream,
        start,
        out,
    )
}

/// Elements `start .. start + out.len()` of the standard-normal sequence of
/// parameter `stream` under step seed `seed`.
pub fn fill_normals(seed: u64, stream: u32, start: u64, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { fill_avx2(seed, stream, start, out) };
    }
    fill_portable(seed, stream, start, out)
}

/// Signs per Philox block: its 128 bits.
const SIGNS_PER_BLOCK: u64 = 128;

/// Elements `start .. start + out.len()` of the ±1 (Rademacher) sequence of
/// parameter `stream` under step seed `seed`.  Element `i` is bit `i mod 32` of
/// word `(i mod 128) / 32` of Philox block `i / 128` with counter
/// `(block, stream, 1)` (the 1 keeps it apart from the normals' counters): a
/// set bit is −1, a clear one +1.  One block gives 128 elements and no
/// transform is needed, so this costs a small fraction of `fill_normals`.
pub fn fill_signs(seed: u64, stream: u32, start: u64, out: &mut [f32]) {
    let key = [seed as u32, (seed >> 32) as u32];
    let one = 1f32.to_bits();
    let mut i = 0usize;
    let mut pos = start;
    while i < out.len() {
        let block = pos / SIGNS_PER_BLOCK;
        let words = philox4x32_10([block as u32, (block >> 32) as u32, stream, 1], key);
        let first = (pos % SIGNS_PER_BLOCK) as usize;
        let n = (SIGNS_PER_BLOCK as usize - first).min(out.len() - i);
        if n == SIGNS_PER_BLOCK as usize {
            // A whole block, word by word: the same bits, in a form the compiler
            // vectorizes (a mask per lane, no shift by a varying amount).
            for (word, zs) in words.iter().zip(out[i..i + n].chunks_exact_mut(32)) {
                for (j, z) in zs.iter_mut().enumerate() {
                    *z = if word & (1u32 << j) != 0 { -1.0 } else { 1.0 };
                }
            }
            i += n;
            pos += n as u64;
            continue;
        }
        for (k, z) in out[i..i + n].iter_mut().enumerate() {
            let bit = first + k;
            let sign = (words[bit / 32] >> (bit % 32)) & 1;
            *z = f32::from_bits(one | (sign << 31));
        }
        i += n;
        pos += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_are_the_bits_of_their_block_and_any_window_matches_the_whole() {
        let mut whole = vec![0f32; 1000];
        fill_signs(77, 3, 0, &mut whole);
        let words = philox4x32_10([1, 0, 3, 1], [77, 0]);
        for (k, z) in whole[128..256].iter().enumerate() {
            let bit = (words[k / 32] >> (k % 32)) & 1;
            assert_eq!(*z, if bit == 1 { -1.0 } else { 1.0 }, "element {}", 128 + k);
        }
        for (start, len) in [(0, 1), (5, 200), (127, 2), (128, 128), (999, 1), (300, 700)] {
            let mut part = vec![0f32; len];
            fill_signs(77, 3, start as u64, &mut part);
            assert_eq!(part, whole[start..start + len], "window {start}+{len}");
        }
        let minus = whole.iter().filter(|&&z| z == -1.0).count();
        assert!(whole.iter().all(|&z| z == 1.0 || z == -1.0));
        assert!((430..570).contains(&minus), "{minus} of 1000 are −1");
        let mut other = vec![0f32; 1000];
        fill_signs(77, 4, 0, &mut other);
        assert_ne!(other, whole, "each tensor has its own stream");
    }

    #[test]
    fn philox_matches_random123_known_answers() {
        // Random123's tests/kat_vectors, the three "philox4x32 10" lines.
        let kat = [
            (
                [0u32; 4],
                [0u32; 2],
                [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
            ),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (ctr, key, want) in kat {
            assert_eq!(philox4x32_10(ctr, key), want);
        }
    }

    #[test]
    fn batched_kernel_equals_one_block_at_a_time() {
        let seed = 0x1234_5678_9abc_def0u64;
        let mut got = vec![0f32; 200];
        fill_normals(seed, 7, 0, &mut got);
        for (b, four) in got.chunks(4).enumerate() {
            let w = philox4x32_10([b as u32, 0, 7, 0], [seed as u32, (seed >> 32) as u32]);
            let (z0, z1) = box_muller(w[0], w[1]);
            let (z2, z3) = box_muller(w[2], w[3]);
            assert_eq!(four, &[z0, z1, z2, z3][..four.len()], "block {b}");
        }
    }

    #[test]
    fn any_window_equals_the_same_slice_of_the_whole() {
        let mut whole = vec![0f32; 1000];
        fill_normals(99, 3, 0, &mut whole);
        for (start, len) in [(0, 1), (1, 5), (63, 2), (64, 64), (65, 300), (997, 3)] {
            let mut part = vec![0f32; len];
            fill_normals(99, 3, start as u64, &mut part);
            assert_eq!(part, whole[start..start + len], "window {start}+{len}");
        }
        let mut scalar = vec![0f32; 1000];
        fill_portable(99, 3, 0, &mut scalar);
        assert_eq!(
            scalar, whole,
            "the dispatched kernel differs from the portable one"
        );
    }

    #[test]
    fn elementary_functions_are_accurate() {
        for i in 1..=1000 {
            let u = i as f32 / 1000.0;
            assert!((ln_unit(u) as f64 - (u as f64).ln()).abs() < 2e-7, "ln {u}");
            let x = u * HALF_PI * 0.999;
            let (c, s) = cos_sin_quarter(x);
            assert!((c as f64 - (x as f64).cos()).abs() < 2e-7, "cos {x}");
            assert!((s as f64 - (x as f64).sin()).abs() < 2e-7, "sin {x}");
        }
        assert!((ln_unit(TWO_POW_M24) as f64 - (2f64.powi(-24)).ln()).abs() < 1e-5);
        assert_eq!(ln_unit(1.0), 0.0);
    }

    /// Φ(x), for the Kolmogorov–Smirnov test (Abramowitz–Stegun 7.1.26, |error| < 1.5e-7).
    fn normal_cdf(x: f64) -> f64 {
        let t = 1.0 / (1.0 + 0.3275911 * x.abs() / 2f64.sqrt());
        let poly = t
            * (0.254829592
                + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
        let erf = 1.0 - poly * (-(x * x) / 2.0).exp();
        0.5 * (1.0 + if x >= 0.0 { erf } else { -erf })
    }

    #[test]
    fn output_is_standard_normal() {
        let n = 1 << 20;
        let mut z = vec![0f32; n];
        fill_normals(2024, 0, 0, &mut z);
        let m = |k: i32| z.iter().map(|&v| (v as f64).powi(k)).sum::<f64>() / n as f64;
        let (mean, var, skew, kurt) = (m(1), m(2), m(3), m(4));
        // Standard errors at n = 2^20: mean 0.001, var 0.0014, skew 0.0024, kurtosis 0.0048.
        assert!(mean.abs() < 0.005, "mean {mean}");
        assert!((var - 1.0).abs() < 0.007, "variance {var}");
        assert!(skew.abs() < 0.012, "third moment {skew}");
        assert!((kurt - 3.0).abs() < 0.05, "fourth moment {kurt}");
        // Kolmogorov–Smirnov: critical value at α = 0.001 is 1.95/√n.
        let mut sorted: Vec<f64> = z.iter().map(|&v| v as f64).collect();
        sorted.sort_by(f64::total_cmp);
        let d = sorted
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let f = normal_cdf(x);
                (f - i as f64 / n as f64).max((i + 1) as f64 / n as f64 - f)
            })
            .fold(0.0, f64::max);
        assert!(d < 1.95 / (n as f64).sqrt(), "KS distance {d}");
        // Neighbouring elements (same block, neighbouring blocks) are uncorrelated.
        for lag in [1usize, 2, 4, 64] {
            let c = z
                .iter()
                .zip(&z[lag..])
                .map(|(&a, &b)| (a * b) as f64)
                .sum::<f64>()
                / n as f64;
            assert!(c.abs() < 0.005, "lag-{lag} correlation {c}");
        }
        // Different parameters (streams) and seeds give unrelated sequences.
        let mut other = vec![0f32; 4096];
        fill_normals(2024, 1, 0, &mut other);
        let c = z
            .iter()
            .zip(&other)
            .map(|(&a, &b)| (a * b) as f64)
            .sum::<f64>()
            / 4096.0;
        assert!(c.abs() < 0.07, "stream correlation {c}");
    }

    #[test]
    #[ignore = "a throughput probe, run by hand: cargo test --release fast_rng -- --ignored --nocapture"]
    fn throughput() {
        let mut z = vec![1f32; 1 << 24];
        fill_normals(1, 0, 0, &mut z);
        let t = std::time::Instant::now();
        fill_normals(1, 0, 0, &mut z);
        let s = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        fill_portable(1, 0, 0, &mut z);
        let p = t.elapsed().as_secs_f64();
        println!(
            "one thread: {:.0} M normals/s (dispatched), {:.0} M/s (portable)",
            z.len() as f64 / s / 1e6,
            z.len() as f64 / p / 1e6
        );
    }
}
