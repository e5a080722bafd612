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
//! bit-identical on every x86-64 or ARM machine, whichever build of the kernel
//! runs (portable, AVX2 or AVX-512: [`Build`]), and a script can rebuild it
//! (`scripts/mezo_rebuild.py`).
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

/// Blocks per batch (a multiple of 16, the AVX-512 width).
const LANES: usize = 32;
/// Normals per batch of lanes.
const BATCH: usize = 4 * LANES;

const TWO_POW_M24: f32 = 1.0 / 16_777_216.0;
const MINUS_TWO_LN_2: f32 = -2.0 * std::f32::consts::LN_2;
const SQRT_2: f32 = std::f32::consts::SQRT_2;
const HALF_PI: f32 = std::f32::consts::FRAC_PI_2;
/// The angle of one step of the 24-bit position within a quadrant.
const ANGLE_STEP: f32 = HALF_PI * TWO_POW_M24;
const SIGN: u32 = 0x8000_0000;

/// −2·ln(k/2²⁴) for an integer k in 1 ..= 2²⁴ (given as f32, which holds it
/// exactly), to about 1e-7 relative: k/2²⁴ = m·2^e with m in [√½, √2),
/// ln m = 2·atanh((m−1)/(m+1)) by its series to s⁹.
///
/// The factors −2 and 2⁻²⁴ are powers of two, taken into the exponent and the
/// constants rather than multiplied in: scaling by a power of two commutes
/// with rounding (nothing here comes near the subnormals), so this is exactly
/// −2 times the series for ln u at u = k·2⁻²⁴ computed with those factors as
/// multiplications, with three fewer operations.
#[inline(always)]
fn minus_two_ln_scaled(k: f32) -> f32 {
    let bits = k.to_bits();
    // k ≥ 1: no sign bit; the exponent of k/2²⁴ is that of k less 24.
    let mut e = (bits >> 23) as i32 - (127 + 24);
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let big = m > SQRT_2;
    m = if big { m * 0.5 } else { m };
    e += big as i32;
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series = 1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0))));
    e as f32 * MINUS_TWO_LN_2 + -4.0 * s * series
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
    let r = minus_two_ln_scaled(((a >> 8) + 1) as f32).sqrt();
    // One multiplication by π/2·2⁻²⁴ (exact: a power of two times π/2) rounds
    // as the two by 2⁻²⁴ and π/2 would.
    let (c, s) = cos_sin_quarter(((b >> 6) & 0x00ff_ffff) as f32 * ANGLE_STEP);
    // Rotate (c, s) by q = b >> 30 quarter turns: swap on odd q, then flip
    // the signs, x's when q is 1 or 2 (bit 31 differs from bit 30), y's when
    // q is 2 or 3 (bit 31).
    let (x, y) = if b & (1 << 30) != 0 { (s, c) } else { (c, s) };
    let x = f32::from_bits(x.to_bits() ^ ((b ^ (b << 1)) & SIGN));
    let y = f32::from_bits(y.to_bits() ^ (b & SIGN));
    (r * x, r * y)
}

/// The four words of blocks `first .. first + LANES`, word-major.
type Words = [[u32; LANES]; 4];

/// Philox on each block in turn (scalar 32×32→64 multiplies are cheap): the
/// words of blocks `first .. first + LANES`, block `b` with counter
/// `(b, stream, tag)`.
#[inline(always)]
fn philox_lanes(key: [u32; 2], stream: u32, tag: u32, first: u64) -> Words {
    let mut words = [[0u32; LANES]; 4];
    for l in 0..LANES {
        let b = first + l as u64;
        let w = philox4x32_10([b as u32, (b >> 32) as u32, stream, tag], key);
        for j in 0..4 {
            words[j][l] = w[j];
        }
    }
    words
}

/// Philox on eight blocks per AVX2 register: `vpmuludq` multiplies the even
/// 32-bit lanes, so odd lanes are shifted down, multiplied, and blended back.
/// The batch's registers go through each round together: one register's
/// rounds are a chain of dependent multiplies, and several chains side by side
/// keep the multipliers busy.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn philox_lanes_avx2(key: [u32; 2], stream: u32, tag: u32, first: u64) -> Words {
    use std::arch::x86_64::*;
    const R: usize = LANES / 8;
    #[inline(always)]
    unsafe fn mulhilo(x: __m256i, m: __m256i) -> (__m256i, __m256i) {
        let even = _mm256_mul_epu32(x, m);
        let odd = _mm256_mul_epu32(_mm256_srli_epi64::<32>(x), m);
        let hi = _mm256_blend_epi32::<0b1010_1010>(_mm256_srli_epi64::<32>(even), odd);
        let lo = _mm256_blend_epi32::<0b1010_1010>(even, _mm256_slli_epi64::<32>(odd));
        (hi, lo)
    }
    let (m0, m1) = (_mm256_set1_epi32(M0 as i32), _mm256_set1_epi32(M1 as i32));
    let (lo, hi) = counters(first);
    let mut c = [[_mm256_setzero_si256(); 4]; R];
    for (r, c) in c.iter_mut().enumerate() {
        c[0] = _mm256_loadu_si256(lo[r * 8..].as_ptr().cast());
        c[1] = _mm256_loadu_si256(hi[r * 8..].as_ptr().cast());
        c[2] = _mm256_set1_epi32(stream as i32);
        c[3] = _mm256_set1_epi32(tag as i32);
    }
    for k in round_keys(key) {
        let k0 = _mm256_set1_epi32(k[0] as i32);
        let k1 = _mm256_set1_epi32(k[1] as i32);
        for c in c.iter_mut() {
            let (hi0, lo0) = mulhilo(c[0], m0);
            let (hi1, lo1) = mulhilo(c[2], m1);
            *c = [
                _mm256_xor_si256(_mm256_xor_si256(hi1, c[1]), k0),
                lo1,
                _mm256_xor_si256(_mm256_xor_si256(hi0, c[3]), k1),
                lo0,
            ];
        }
    }
    let mut words = [[0u32; LANES]; 4];
    for (r, c) in c.iter().enumerate() {
        for (j, c) in c.iter().enumerate() {
            _mm256_storeu_si256(words[j][r * 8..].as_mut_ptr().cast(), *c);
        }
    }
    words
}

/// The low and high words of the block numbers `first .. first + LANES`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn counters(first: u64) -> ([u32; LANES], [u32; LANES]) {
    let mut lo = [0u32; LANES];
    let mut hi = [0u32; LANES];
    for l in 0..LANES {
        let b = first + l as u64;
        lo[l] = b as u32;
        hi[l] = (b >> 32) as u32;
    }
    (lo, hi)
}

/// The key of each of Philox's ten rounds.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn round_keys(key: [u32; 2]) -> [[u32; 2]; 10] {
    let mut keys = [key; 10];
    for r in 1..10 {
        keys[r] = [
            keys[r - 1][0].wrapping_add(W0),
            keys[r - 1][1].wrapping_add(W1),
        ];
    }
    keys
}

/// Philox on sixteen blocks per AVX-512 register, as [`philox_lanes_avx2`] does
/// on eight; the batch's registers go through each round together, so that
/// their multiplies overlap.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn philox_lanes_avx512(key: [u32; 2], stream: u32, tag: u32, first: u64) -> Words {
    use std::arch::x86_64::*;
    const R: usize = LANES / 16;
    // The products' halves gathered by one two-source permute each: lane 2i
    // takes its word from `even`, lane 2i + 1 from `odd` (index bit 4 picks
    // the second source).
    let pick_hi = _mm512_setr_epi32(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    let pick_lo = _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
    let mulhilo = |x: __m512i, m: __m512i| {
        let even = _mm512_mul_epu32(x, m);
        let odd = _mm512_mul_epu32(_mm512_srli_epi64::<32>(x), m);
        (
            _mm512_permutex2var_epi32(even, pick_hi, odd),
            _mm512_permutex2var_epi32(even, pick_lo, odd),
        )
    };
    let (m0, m1) = (_mm512_set1_epi32(M0 as i32), _mm512_set1_epi32(M1 as i32));
    let (lo, hi) = counters(first);
    let mut c = [[_mm512_setzero_si512(); 4]; R];
    for (r, c) in c.iter_mut().enumerate() {
        c[0] = _mm512_loadu_si512(lo[r * 16..].as_ptr().cast());
        c[1] = _mm512_loadu_si512(hi[r * 16..].as_ptr().cast());
        c[2] = _mm512_set1_epi32(stream as i32);
        c[3] = _mm512_set1_epi32(tag as i32);
    }
    for k in round_keys(key) {
        let k0 = _mm512_set1_epi32(k[0] as i32);
        let k1 = _mm512_set1_epi32(k[1] as i32);
        for c in c.iter_mut() {
            let (hi0, lo0) = mulhilo(c[0], m0);
            let (hi1, lo1) = mulhilo(c[2], m1);
            // 0x96: the three-way exclusive or.
            *c = [
                _mm512_ternarylogic_epi32::<0x96>(hi1, c[1], k0),
                lo1,
                _mm512_ternarylogic_epi32::<0x96>(hi0, c[3], k1),
                lo0,
            ];
        }
    }
    let mut words = [[0u32; LANES]; 4];
    for (r, c) in c.iter().enumerate() {
        for (j, c) in c.iter().enumerate() {
            _mm512_storeu_si512(words[j][r * 16..].as_mut_ptr().cast(), *c);
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

/// A Philox kernel: [`philox_lanes`] or one of its vector builds.
trait Kernel: Fn([u32; 2], u32, u32, u64) -> Words {}
impl<F: Fn([u32; 2], u32, u32, u64) -> Words> Kernel for F {}

/// Fill `out` with elements `start .. start + out.len()` of z for parameter
/// `stream` under step seed `seed`, with `words` as the Philox kernel.
#[inline(always)]
fn normals_with(words: impl Kernel, seed: u64, stream: u32, start: u64, out: &mut [f32]) {
    let key = [seed as u32, (seed >> 32) as u32];
    let mut tmp = [0f32; BATCH];
    let mut i = 0usize;
    let mut pos = start;
    while i < out.len() {
        let block = pos / 4;
        let group_first = block - block % LANES as u64;
        let skip = (pos - group_first * 4) as usize;
        let n = (BATCH - skip).min(out.len() - i);
        let w = words(key, stream, 0, group_first);
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

/// Signs per Philox block: its 128 bits.
const SIGNS_PER_BLOCK: u64 = 128;

/// Fill `out` with elements `start .. start + out.len()` of the ±1 sequence
/// for parameter `stream` under step seed `seed`, with `words` as the Philox
/// kernel (see [`fill_signs`]).
#[inline(always)]
fn signs_with(words: impl Kernel, seed: u64, stream: u32, start: u64, out: &mut [f32]) {
    let key = [seed as u32, (seed >> 32) as u32];
    let mut i = 0usize;
    let mut pos = start;
    while i < out.len() {
        let block = pos / SIGNS_PER_BLOCK;
        let group_first = block - block % LANES as u64;
        let offset = (pos - group_first * SIGNS_PER_BLOCK) as usize;
        let n = (LANES * SIGNS_PER_BLOCK as usize - offset).min(out.len() - i);
        let w = words(key, stream, 1, group_first);
        signs_of(&w, offset, &mut out[i..i + n]);
        i += n;
        pos += n as u64;
    }
}

/// [`signs_with`] for the portable build, one block at a time: scalar Philox
/// gains nothing from a batch, and the signs of one block are written while
/// its words are still in registers.
fn signs_portable(seed: u64, stream: u32, start: u64, out: &mut [f32]) {
    let key = [seed as u32, (seed >> 32) as u32];
    let mut i = 0usize;
    let mut pos = start;
    while i < out.len() {
        let block = pos / SIGNS_PER_BLOCK;
        let words = philox4x32_10([block as u32, (block >> 32) as u32, stream, 1], key);
        let first = (pos % SIGNS_PER_BLOCK) as usize;
        let n = (SIGNS_PER_BLOCK as usize - first).min(out.len() - i);
        let mut w = [[0u32; LANES]; 4];
        for (j, word) in words.into_iter().enumerate() {
            w[j][0] = word;
        }
        signs_of(&w, first, &mut out[i..i + n]);
        i += n;
        pos += n as u64;
    }
}

/// Elements `offset .. offset + out.len()` of a batch's signs: element `e` is
/// bit `e mod 32` of word `(e mod 128) / 32` of the batch's block `e / 128`.
#[inline(always)]
fn signs_of(w: &Words, offset: usize, out: &mut [f32]) {
    let mut e = offset;
    let mut k = 0;
    while k < out.len() {
        let word = w[e % 128 / 32][e / 128];
        if e % 32 == 0 && out.len() - k >= 32 {
            // A whole word: the same bits, in a form the compiler vectorizes
            // (a mask per lane, no shift by a varying amount).
            for (j, z) in out[k..k + 32].iter_mut().enumerate() {
                *z = if word & (1u32 << j) != 0 { -1.0 } else { 1.0 };
            }
            k += 32;
            e += 32;
        } else {
            out[k] = if word & (1u32 << (e % 32)) != 0 {
                -1.0
            } else {
                1.0
            };
            k += 1;
            e += 1;
        }
    }
}

/// The builds of the kernels, all with identical output: integer arithmetic is
/// exact, and the transform's floating-point operations are the same IEEE
/// operations in the same order at every vector width (Rust never fuses a
/// multiply and an add on its own).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Build {
    Portable,
    /// Vector Philox on eight blocks per register, the transform compiled for
    /// 256-bit registers.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Sixteen blocks per register, the transform on 512-bit registers.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Build {
    /// The builds this CPU runs, fastest last (the tests compare them).  Only
    /// these, and [`Build::best`], may be given to [`Build::normals`] and
    /// [`Build::signs`].
    #[cfg(test)]
    fn available() -> Vec<Build> {
        #[allow(unused_mut)]
        let mut builds = vec![Build::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                builds.push(Build::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                builds.push(Build::Avx512);
            }
        }
        builds
    }

    fn best() -> Build {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Build::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Build::Avx2;
            }
        }
        Build::Portable
    }

    fn normals(self, seed: u64, stream: u32, start: u64, out: &mut [f32]) {
        match self {
            Build::Portable => normals_with(philox_lanes, seed, stream, start, out),
            // SAFETY: a vector build is only ever one of `available()`'s,
            // which the CPU runs.
            #[cfg(target_arch = "x86_64")]
            Build::Avx2 => unsafe { avx2::normals(seed, stream, start, out) },
            #[cfg(target_arch = "x86_64")]
            Build::Avx512 => unsafe { avx512::normals(seed, stream, start, out) },
        }
    }

    fn signs(self, seed: u64, stream: u32, start: u64, out: &mut [f32]) {
        match self {
            Build::Portable => signs_portable(seed, stream, start, out),
            // SAFETY: as in `normals`.
            #[cfg(target_arch = "x86_64")]
            Build::Avx2 => unsafe { avx2::signs(seed, stream, start, out) },
            #[cfg(target_arch = "x86_64")]
            Build::Avx512 => unsafe { avx512::signs(seed, stream, start, out) },
        }
    }
}

/// The fill functions compiled for AVX2.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn normals(seed: u64, stream: u32, start: u64, out: &mut [f32]) {
        normals_with(
            |k, s, t, f| unsafe { philox_lanes_avx2(k, s, t, f) },
            seed,
            stream,
            start,
            out,
        )
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn signs(seed: u64, stream: u32, start: u64, out: &mut [f32]) {
        signs_with(
            |k, s, t, f| unsafe { philox_lanes_avx2(k, s, t, f) },
            seed,
            stream,
            start,
            out,
        )
    }
}

/// The fill functions compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn normals(seed: u64, stream: u32, start: u64, out: &mut [f32]) {
        normals_with(
            |k, s, t, f| unsafe { philox_lanes_avx512(k, s, t, f) },
            seed,
            stream,
            start,
            out,
        )
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn signs(seed: u64, stream: u32, start: u64, out: &mut [f32]) {
        signs_with(
            |k, s, t, f| unsafe { philox_lanes_avx512(k, s, t, f) },
            seed,
            stream,
            start,
            out,
        )
    }
}

/// Elements `start .. start + out.len()` of the standard-normal sequence of
/// parameter `stream` under step seed `seed`.
pub fn fill_normals(seed: u64, stream: u32, start: u64, out: &mut [f32]) {
    Build::best().normals(seed, stream, start, out)
}

/// Elements `start .. start + out.len()` of the ±1 (Rademacher) sequence of
/// parameter `stream` under step seed `seed`.  Element `i` is bit `i mod 32` of
/// word `(i mod 128) / 32` of Philox block `i / 128` with counter
/// `(block, stream, 1)` (the 1 keeps it apart from the normals' counters): a
/// set bit is −1, a clear one +1.  One block gives 128 elements and no
/// transform is needed, so this costs a small fraction of `fill_normals`.
pub fn fill_signs(seed: u64, stream: u32, start: u64, out: &mut [f32]) {
    Build::best().signs(seed, stream, start, out)
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
    }

    #[test]
    fn every_build_gives_the_portable_bits() {
        let builds = Build::available();
        eprintln!("builds on this CPU: {builds:?}");
        // Windows that start and end inside a batch, on a batch's edge, and
        // span several batches; a counter whose block number needs 64 bits.
        let windows = [
            (0u64, 10_000usize),
            (3, 1),
            (127, 130),
            (4093, 8200),
            (1 << 34, 5000),
        ];
        for (seed, stream) in [(99u64, 3u32), (u64::MAX, u32::MAX)] {
            for (start, len) in windows {
                let mut normals = vec![0f32; len];
                let mut signs = vec![0f32; len];
                Build::Portable.normals(seed, stream, start, &mut normals);
                Build::Portable.signs(seed, stream, start, &mut signs);
                for &build in &builds {
                    let mut z = vec![0f32; len];
                    build.normals(seed, stream, start, &mut z);
                    let same = z
                        .iter()
                        .zip(&normals)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{build:?} normals differ at {start}+{len}");
                    build.signs(seed, stream, start, &mut z);
                    assert_eq!(z, signs, "{build:?} signs differ at {start}+{len}");
                }
            }
        }
    }

    #[test]
    fn elementary_functions_are_accurate() {
        let minus_two_ln = |k: u32| -2.0 * (k as f64 / 16_777_216.0).ln();
        for i in 1..=1000 {
            let k = (i as u64 * (1 << 24) / 1000) as u32;
            let want = minus_two_ln(k);
            let got = minus_two_ln_scaled(k as f32) as f64;
            assert!((got - want).abs() < 4e-7 * want.max(1.0), "−2 ln at {k}");
            let x = i as f32 / 1000.0 * HALF_PI * 0.999;
            let (c, s) = cos_sin_quarter(x);
            assert!((c as f64 - (x as f64).cos()).abs() < 2e-7, "cos {x}");
            assert!((s as f64 - (x as f64).sin()).abs() < 2e-7, "sin {x}");
        }
        assert!((minus_two_ln_scaled(1.0) as f64 - minus_two_ln(1)).abs() < 2e-5);
        assert_eq!(minus_two_ln_scaled(16_777_216.0), 0.0);
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
        // The tails: P(|z| > 3) = 2.700e-3 and P(|z| > 4) = 6.334e-5, i.e.
        // 2831 ± 53 and 66 ± 8 of 2^20; the largest |z| is √(2·24·ln 2) ≈ 5.77
        // (u is at least 2⁻²⁴).
        let beyond = |t: f32| z.iter().filter(|v| v.abs() > t).count();
        let (three, four) = (beyond(3.0), beyond(4.0));
        assert!((2620..3040).contains(&three), "{three} beyond 3σ");
        assert!((35..100).contains(&four), "{four} beyond 4σ");
        assert!(
            z.iter().all(|v| v.abs() <= 5.78),
            "beyond the largest radius"
        );
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
        // 2^24 elements drawn a cache-sized piece at a time, as a sweep draws them.
        let mut z = vec![0f32; 1024];
        let n = 1u64 << 24;
        type Fill = fn(Build, u64, u32, u64, &mut [f32]);
        for build in Build::available() {
            for (what, fill) in [("normals", Build::normals as Fill), ("signs", Build::signs)] {
                let mut best = f64::MAX;
                for seed in 0..5 {
                    let t = std::time::Instant::now();
                    for start in (0..n).step_by(z.len()) {
                        fill(build, seed, 0, start, &mut z);
                    }
                    std::hint::black_box(&z);
                    best = best.min(t.elapsed().as_secs_f64());
                }
                println!(
                    "{build:?} {what}: {:.3} ns each on one thread",
                    best * 1e9 / n as f64
                );
            }
        }
    }
}
