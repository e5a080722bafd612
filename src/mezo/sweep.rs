//! One pass over the parameters that adds a multiple of z: the only place z exists.
//!
//! Two generators (the job's `mezo.rng`):
//! - `torch`: z is `torch.manual_seed(seed); torch.randn_like(p)` for each tensor in
//!   canonical order, exactly what the reference MeZO draws.  Needed for parity with
//!   PyTorch and the default on GPUs, where libtorch's generator is fast.
//! - `fast`: z comes from [`fast_rng`](super::fast_rng) (counter-based), is written
//!   chunk by chunk into a small buffer and applied at once, over all of the job's
//!   threads.  torch's CPU generator is serial and needs a temporary the size of the
//!   tensor; this one is parallel, needs one chunk per thread and gives the same z
//!   for any thread count or chunk size.  The default on CPU.
//!
//! Each element of z is standard normal or, with `mezo.perturbation:
//! rademacher`, ±1 (torch: `randint_like(p, 2)·2 − 1`; fast: one Philox bit per
//! element).  The step's [`Form`] shapes z: dense; zeroed outside Sparse MeZO's
//! [`Mask`]; or, for LOZO, low rank on every matrix (see [`LowRank`]).
//!
//! Every tensor is updated in place where it lives, its z made on (or copied
//! to) its own device: a model split over several devices needs no gathering,
//! and holds one z temporary at a time.  torch's generator keeps a state per
//! device, so with `rng: torch` a tensor's z depends on which device holds
//! it (a run keeps its split for that reason); the fast generator's does not.

use tch::{Device, Kind, Tensor};

use super::fast_rng::{fill_normals, fill_signs};
pub use super::lozo::LowRank;
use super::lozo::{outer_sum, Factors};
use super::mask::Mask;
use crate::model::ParamList;
pub use mezod_core::mezo_options::{Perturbation, Rng, DEFAULT_CHUNK};

/// `p ← keep·(p + pre·z) + post·z` for one tensor.  Perturbations have
/// `keep = 1, pre = 0`; only the final update with weight decay uses all three.
#[derive(Debug, Clone, Copy)]
pub struct Update {
    pub keep: f64,
    pub pre: f64,
    pub post: f64,
}

impl Update {
    pub fn add(scale: f64) -> Update {
        Update {
            keep: 1.0,
            pre: 0.0,
            post: scale,
        }
    }
    fn plain(&self) -> bool {
        self.keep == 1.0 && self.pre == 0.0
    }
}

/// How a step's z is shaped.
pub enum Form {
    Dense,
    /// Sparse MeZO: z zeroed where the mask is clear.
    Masked(Mask),
    LowRank(LowRank),
}

impl Form {
    fn mask(&self) -> Option<&Mask> {
        match self {
            Form::Masked(m) => Some(m),
            _ => None,
        }
    }
    fn low_rank(&self) -> Option<LowRank> {
        match self {
            Form::LowRank(l) => Some(*l),
            _ => None,
        }
    }
}

/// Elements of z drawn and added at a time within a chunk: 16 KiB of z, which
/// with its 16 KiB of weights stays in a core's first-level cache between the
/// drawing and the adding (a whole chunk's would go out to the second level and
/// back).  A multiple of 8, so that every piece of a chunk that starts on a
/// byte of the mask does too, and of the fast generator's batch of normals, so
/// that no two pieces compute the same batch.
const PIECE: usize = 4096;

/// Draws z and applies updates with it.
pub struct ZSweep {
    rng: Rng,
    perturbation: Perturbation,
    threads: usize,
    chunk: usize,
}

/// A contiguous f32 CPU tensor's storage, shared by the pass's threads, each
/// writing only its own chunks.
struct SharedF32<'m> {
    ptr: *mut f32,
    len: usize,
    stream: u32,
    /// Applied in turn to each element, with one draw of z.
    updates: Vec<Update>,
    /// The tensor's packed mask bits, when the step has a mask.
    mask: Option<&'m [u8]>,
    /// A matrix's factors, when z is low rank.
    factors: Option<Factors>,
}

// SAFETY: the threads of one pass write disjoint chunks of each tensor, and
// nothing else touches the parameters during a pass (one step at a time).
unsafe impl Send for SharedF32<'_> {}
unsafe impl Sync for SharedF32<'_> {}

impl ZSweep {
    pub fn new(rng: Rng, threads: usize) -> ZSweep {
        ZSweep::with_chunk(rng, threads, DEFAULT_CHUNK)
    }

    /// A chunk size other than the default (the result does not depend on it).
    pub fn with_chunk(rng: Rng, threads: usize, chunk: usize) -> ZSweep {
        ZSweep {
            rng,
            perturbation: Perturbation::Gaussian,
            threads: threads.max(1),
            chunk: chunk.max(1),
        }
    }

    /// The same sweep drawing z from `perturbation`.
    pub fn with_perturbation(self, perturbation: Perturbation) -> ZSweep {
        ZSweep {
            perturbation,
            ..self
        }
    }

    pub fn rng(&self) -> Rng {
        self.rng
    }

    pub fn perturbation(&self) -> Perturbation {
        self.perturbation
    }

    /// One pass: for each tensor (in canonical order, tensor `i` is stream `i`),
    /// `update(param)` gives its coefficients.
    pub fn apply(&self, params: &ParamList, seed: u64, update: impl Fn(bool) -> Update) {
        self.apply_shaped(params, seed, &Form::Dense, update)
    }

    /// [`apply`](Self::apply) with z shaped by `form`.
    pub fn apply_shaped(
        &self,
        params: &ParamList,
        seed: u64,
        form: &Form,
        update: impl Fn(bool) -> Update,
    ) {
        self.apply_in_turn(params, seed, form, |decays| vec![update(decays)])
    }

    /// Several passes with the same z in one: each element gets the updates
    /// `updates(param)` gives, in turn, from one draw.  Each element's
    /// operations are those of the passes made one after another, in their
    /// order, so the weights come out with the same bits; z is drawn once
    /// instead of once per pass (a replica's catch-up over the directions it
    /// does not measure: `+εz, −2εz, +εz` in one draw).
    pub fn apply_in_turn(
        &self,
        params: &ParamList,
        seed: u64,
        form: &Form,
        updates: impl Fn(bool) -> Vec<Update>,
    ) {
        let _guard = tch::no_grad_guard();
        let mask = form.mask();
        let low_rank = form.low_rank();
        let is_matrix = |t: &Tensor| low_rank.is_some() && t.dim() == 2;
        match self.rng {
            Rng::Torch => {
                // Every matrix's V first, from the basis seed; then U and the
                // dense z in canonical order from the pass's seed.
                let vs: Vec<Option<Tensor>> = match low_rank {
                    Some(l) => {
                        tch::manual_seed(l.basis as i64);
                        params
                            .iter()
                            .map(|p| {
                                is_matrix(&p.tensor).then(|| {
                                    let cols = p.tensor.size()[1];
                                    self.draw_torch(&p.tensor, Some(&[cols, l.rank as i64]))
                                })
                            })
                            .collect()
                    }
                    None => Vec::new(),
                };
                tch::manual_seed(seed as i64);
                for (i, p) in params.iter().enumerate() {
                    let mut z = match (low_rank, vs.get(i).and_then(Option::as_ref)) {
                        (Some(l), Some(v)) => {
                            let rows = p.tensor.size()[0];
                            outer_sum(&self.draw_torch(&p.tensor, Some(&[rows, l.rank as i64])), v)
                        }
                        _ => self.draw_torch(&p.tensor, None),
                    };
                    if let Some(mask) = mask {
                        let m = mask.whole(i, p.tensor.numel() as i64);
                        let _ = z.g_mul_(&m.view(p.tensor.size().as_slice()));
                    }
                    apply_torch_in_turn(&p.tensor, z, &updates(p.decays));
                }
            }
            Rng::Fast => {
                let mut cpu_f32 = Vec::new();
                for (stream, p) in params.iter().enumerate() {
                    let u = updates(p.decays);
                    let t = &p.tensor;
                    let factors = low_rank
                        .filter(|_| is_matrix(t))
                        .map(|l| self.factors(t, seed, stream as u32, l));
                    if t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous() {
                        cpu_f32.push(SharedF32 {
                            ptr: t.data_ptr() as *mut f32,
                            len: t.numel(),
                            stream: stream as u32,
                            updates: u,
                            mask: mask.map(|m| m.host_bytes(stream)),
                            factors,
                        });
                    } else {
                        self.apply_fast_any(t, seed, stream as u32, &u, mask, factors.as_ref());
                    }
                }
                self.apply_fast_f32(&cpu_f32, seed);
            }
        }
    }

    /// Elements `start ..` of the fast generator's z for tensor `stream`.
    fn fill(&self, seed: u64, stream: u32, start: u64, out: &mut [f32]) {
        match self.perturbation {
            Perturbation::Gaussian => fill_normals(seed, stream, start, out),
            Perturbation::Rademacher => fill_signs(seed, stream, start, out),
        }
    }

    /// [`fill`](Self::fill), or the elements of `U·Vᵀ` when the tensor has factors.
    fn fill_z(&self, seed: u64, stream: u32, start: usize, out: &mut [f32], f: Option<&Factors>) {
        match f {
            Some(f) => f.fill(start, out),
            None => self.fill(seed, stream, start as u64, out),
        }
    }

    /// A matrix's factors, drawn on the tensor's own stream (see [`Factors::draw`]).
    fn factors(&self, t: &Tensor, seed: u64, stream: u32, l: LowRank) -> Factors {
        let (rows, cols) = (t.size()[0] as usize, t.size()[1] as usize);
        Factors::draw(rows, cols, seed, l, |seed, out| {
            self.fill(seed, stream, 0, out)
        })
    }

    /// torch's draws at the dtype and device of `like`: a whole z shaped as
    /// `like` (`randn_like`, strides included), or a LOZO factor of `shape`
    /// (`randn`); ±1 directions are `randint(2)·2 − 1` either way.
    fn draw_torch(&self, like: &Tensor, shape: Option<&[i64]>) -> Tensor {
        let opts = (like.kind(), like.device());
        match (self.perturbation, shape) {
            (Perturbation::Gaussian, None) => like.randn_like(),
            (Perturbation::Gaussian, Some(shape)) => Tensor::randn(shape, opts),
            (Perturbation::Rademacher, shape) => {
                let mut z = match shape {
                    None => like.randint_like(2),
                    Some(shape) => Tensor::randint(2, shape, opts),
                };
                let _ = z.g_mul_scalar_(2.0);
                let _ = z.g_sub_scalar_(1.0);
                z
            }
        }
    }

    /// The parallel kernel for contiguous f32 CPU tensors: thread t takes chunks
    /// t, t + T, t + 2T, … of every tensor.  Threads live for one pass only, so
    /// no idle pool sits beside libtorch's threads during the forward passes
    /// (starting two threads costs microseconds against a pass of milliseconds).
    fn apply_fast_f32(&self, tensors: &[SharedF32], seed: u64) {
        // A thread is worth starting for a few chunks of work, not for less.
        let total: usize = tensors.iter().map(|x| x.len).sum();
        let threads = self.threads.min(total.div_ceil(4 * DEFAULT_CHUNK)).max(1);
        let chunk = self.chunk;
        let work = |t: usize| {
            let mut z = vec![0f32; chunk.min(PIECE)];
            for x in tensors {
                for first in (t * chunk..x.len).step_by(threads * chunk) {
                    let end = (first + chunk).min(x.len);
                    // The thread's chunk, a piece at a time, so that z is still
                    // in the core's first-level cache when it is added.
                    for start in (first..end).step_by(PIECE) {
                        let len = PIECE.min(end - start);
                        // SAFETY: [start, start + len) lies inside the tensor and no
                        // other thread takes this chunk (see SharedF32).
                        let part = unsafe { std::slice::from_raw_parts_mut(x.ptr.add(start), len) };
                        let z = &mut z[..len];
                        prefetch(part);
                        self.fill_z(seed, x.stream, start, z, x.factors.as_ref());
                        if let Some(bits) = x.mask {
                            mask_z(z, bits, start);
                        }
                        for u in &x.updates {
                            let (keep, pre, post) = (u.keep as f32, u.pre as f32, u.post as f32);
                            if u.plain() {
                                for (p, z) in part.iter_mut().zip(z.iter()) {
                                    *p += post * z;
                                }
                            } else {
                                for (p, z) in part.iter_mut().zip(z.iter()) {
                                    *p = (*p + pre * z) * keep + post * z;
                                }
                            }
                        }
                    }
                }
            }
        };
        let work = &work;
        std::thread::scope(|s| {
            for t in 1..threads {
                s.spawn(move || work(t));
            }
            work(0);
        });
    }

    /// Other dtypes and devices: z chunk by chunk on the CPU, converted to the
    /// tensor's dtype and device, applied with the same tensor operations as `torch`.
    fn apply_fast_any(
        &self,
        tensor: &Tensor,
        seed: u64,
        stream: u32,
        updates: &[Update],
        mask: Option<&Mask>,
        factors: Option<&Factors>,
    ) {
        let n = tensor.numel();
        let flat = tensor.view([-1]);
        // Off the CPU each chunk is one copy to the device: make them few.
        // A multiple of 8, so that a chunk starts on a byte of the mask.
        let chunk = if tensor.device() == Device::Cpu {
            self.chunk
        } else {
            self.chunk.max(1 << 22)
        }
        .next_multiple_of(8);
        let mut buf = vec![0f32; chunk.min(n.max(1))];
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            self.fill_z(seed, stream, start, &mut buf[..len], factors);
            let mut z = Tensor::from_slice(&buf[..len])
                .to_device(tensor.device())
                .to_kind(tensor.kind());
            if let Some(mask) = mask {
                let _ = z.g_mul_(&mask.slice(stream as usize, start as i64, len as i64));
            }
            apply_torch_in_turn(&flat.narrow(0, start as i64, len as i64), z, updates);
            start += len;
        }
    }
}

/// Asks the core to bring `part` into its cache while z is being drawn for it,
/// so that drawing (arithmetic) and fetching (memory) overlap instead of
/// taking turns.
#[inline(always)]
fn prefetch(part: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in part.chunks(16) {
        // SAFETY: a prefetch is a hint; it reads nothing and cannot fault.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
}

/// [`apply_torch`] for each of `updates` in turn, each on its own copy of z
/// (the last on z itself): the same operations as one pass per update.
fn apply_torch_in_turn(t: &Tensor, z: Tensor, updates: &[Update]) {
    if let Some((last, first)) = updates.split_last() {
        for &u in first {
            apply_torch(t, z.copy(), u);
        }
        apply_torch(t, z, *last);
    }
}

/// `t ← keep·(t + pre·z) + post·z` with in-place tensor operations on z's storage
/// (the operation order is the one the step has always used, so old runs resume exactly).
fn apply_torch(t: &Tensor, mut z: Tensor, u: Update) {
    let mut t = t.shallow_clone();
    if u.plain() {
        let _ = z.g_mul_scalar_(u.post);
        let _ = t.g_add_(&z);
    } else if u.pre == 0.0 {
        // Decay then add (n-SPSA's update passes).
        let _ = t.g_mul_scalar_(u.keep);
        let _ = z.g_mul_scalar_(u.post);
        let _ = t.g_add_(&z);
    } else {
        let _ = z.g_mul_scalar_(u.pre);
        let _ = t.g_add_(&z);
        let _ = t.g_mul_scalar_(u.keep);
        let _ = z.g_mul_scalar_(u.post / u.pre);
        let _ = t.g_add_(&z);
    }
}

/// z·0 or z·1 for elements `start ..` of a tensor whose mask is `bits`, as the
/// tensor path's `z *= mask` computes it; whole bytes at a time once `start`
/// is on a byte (the default chunk always is), where the eight products vectorize.
fn mask_z(z: &mut [f32], bits: &[u8], start: usize) {
    debug_assert!(
        bits.len() * 8 >= start + z.len(),
        "a mask shorter than its tensor"
    );
    let head = ((8 - start % 8) % 8).min(z.len());
    let (head, rest) = z.split_at_mut(head);
    for (k, z) in head.iter_mut().enumerate() {
        let e = start + k;
        *z *= f32::from((bits[e / 8] >> (e % 8)) & 1);
    }
    let first_byte = (start + head.len()) / 8;
    let tail_byte = first_byte + rest.len() / 8;
    let mut bytes = rest.chunks_exact_mut(8);
    for (z, &byte) in (&mut bytes).zip(&bits[first_byte..]) {
        for (j, z) in z.iter_mut().enumerate() {
            *z *= f32::from((byte >> j) & 1);
        }
    }
    let tail = bytes.into_remainder();
    if let Some(&byte) = bits.get(tail_byte) {
        for (j, z) in tail.iter_mut().enumerate() {
            *z *= f32::from((byte >> j) & 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mezo::fast_rng::fill_normals;
    use crate::model::{Param, ParamList};

    /// A vector a few pieces long and a matrix (LOZO's factors apply to it).
    fn zeros() -> ParamList {
        let param = |name: &str, shape: &[i64], decays| Param {
            name: name.into(),
            tensor: Tensor::zeros(shape, (Kind::Float, Device::Cpu)),
            decays,
        };
        ParamList(vec![
            param("v", &[3 * PIECE as i64 + 5], false),
            param("w", &[61, 97], true),
        ])
    }

    fn same(a: &ParamList, b: &ParamList) -> bool {
        a.iter()
            .zip(b.iter())
            .all(|(a, b)| a.tensor.equal(&b.tensor))
    }

    /// Several updates in turn from one draw of z leave the bits that the
    /// same updates made pass after pass leave: both generators, dense and
    /// low-rank z, f32 (the CPU's own loop) and bf16 (tensor operations).
    #[test]
    fn updates_in_turn_from_one_draw_equal_one_pass_each() {
        let eps = 1e-3;
        let passes = [eps, -2.0 * eps, eps].map(Update::add);
        for rng in [Rng::Fast, Rng::Torch] {
            for kind in [Kind::Float, Kind::BFloat16] {
                for form in [Form::Dense, Form::LowRank(LowRank { rank: 2, basis: 9 })] {
                    // Weights that are not zero, so that the additions round.
                    let start = || {
                        tch::manual_seed(3);
                        let p = zeros();
                        for param in p.iter() {
                            let w = Tensor::randn(param.tensor.size(), (Kind::Float, Device::Cpu));
                            let mut t = param.tensor.shallow_clone();
                            t.set_data(&w.to_kind(kind));
                        }
                        p
                    };
                    let z = ZSweep::new(rng, 2);
                    let one_by_one = start();
                    for u in passes {
                        z.apply_shaped(&one_by_one, 11, &form, |_| u);
                    }
                    let in_turn = start();
                    z.apply_in_turn(&in_turn, 11, &form, |_| passes.to_vec());
                    assert!(same(&one_by_one, &in_turn), "{rng:?} {kind:?}");
                    assert!(
                        !same(&one_by_one, &start()),
                        "{rng:?} {kind:?}: nothing moved"
                    );
                }
            }
        }
    }

    #[test]
    fn chunks_split_into_pieces_give_the_same_weights() {
        for perturbation in [Perturbation::Gaussian, Perturbation::Rademacher] {
            for form in [Form::Dense, Form::LowRank(LowRank { rank: 2, basis: 9 })] {
                let run = |threads, chunk| {
                    let p = zeros();
                    let z = ZSweep::with_chunk(Rng::Fast, threads, chunk)
                        .with_perturbation(perturbation);
                    z.apply_shaped(&p, 5, &form, |_| Update::add(1.0));
                    z.apply_shaped(&p, 6, &form, |_| Update {
                        keep: 0.75,
                        pre: 0.5,
                        post: -0.25,
                    });
                    p
                };
                // Chunks of one element: no chunk is ever split.
                let reference = run(1, 1);
                // Chunks of several pieces, with pieces that start inside a
                // batch of the generator, and chunks smaller than a piece.
                for (threads, chunk) in [
                    (1, DEFAULT_CHUNK),
                    (2, 2 * PIECE + 3),
                    (3, PIECE + 1),
                    (2, 700),
                ] {
                    assert!(
                        same(&reference, &run(threads, chunk)),
                        "{perturbation:?}, {} threads, chunk {chunk}",
                        threads
                    );
                }
            }
        }
        // One dense pass from zeros leaves exactly z.
        let p = zeros();
        ZSweep::new(Rng::Fast, 2).apply(&p, 5, |_| Update::add(1.0));
        for (stream, param) in p.iter().enumerate() {
            let mut z = vec![0f32; param.tensor.numel()];
            fill_normals(5, stream as u32, 0, &mut z);
            assert!(
                param.tensor.view([-1]).equal(&Tensor::from_slice(&z)),
                "{}",
                param.name
            );
        }
    }
}
