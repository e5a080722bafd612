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
//! element).  Sparse MeZO's [`Mask`] zeroes z outside the step's mask before it
//! is added, in every pass and with either generator.

use tch::{Device, Kind, Tensor};

use super::fast_rng::{fill_normals, fill_signs};
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
    update: Update,
    /// The tensor's packed mask bits, when the step has a mask.
    mask: Option<&'m [u8]>,
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
        self.apply_masked(params, seed, None, update)
    }

    /// [`apply`](Self::apply) with z zeroed where `mask` is clear.
    pub fn apply_masked(
        &self,
        params: &ParamList,
        seed: u64,
        mask: Option<&Mask>,
        update: impl Fn(bool) -> Update,
    ) {
        let _guard = tch::no_grad_guard();
        match self.rng {
            Rng::Torch => {
                tch::manual_seed(seed as i64);
                for (i, p) in params.iter().enumerate() {
                    let mut z = match self.perturbation {
                        Perturbation::Gaussian => p.tensor.randn_like(),
                        Perturbation::Rademacher => {
                            let mut z = p.tensor.randint_like(2);
                            let _ = z.g_mul_scalar_(2.0);
                            let _ = z.g_sub_scalar_(1.0);
                            z
                        }
                    };
                    if let Some(mask) = mask {
                        let m = mask.whole(i, p.tensor.numel() as i64);
                        let _ = z.g_mul_(&m.view(p.tensor.size().as_slice()));
                    }
                    apply_torch(&p.tensor, z, update(p.decays));
                }
            }
            Rng::Fast => {
                let mut cpu_f32 = Vec::new();
                for (stream, p) in params.iter().enumerate() {
                    let u = update(p.decays);
                    let t = &p.tensor;
                    if t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous() {
                        cpu_f32.push(SharedF32 {
                            ptr: t.data_ptr() as *mut f32,
                            len: t.numel(),
                            stream: stream as u32,
                            update: u,
                            mask: mask.map(|m| m.host_bytes(stream)),
                        });
                    } else {
                        self.apply_fast_any(t, seed, stream as u32, u, mask);
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
            let mut z = vec![0f32; chunk];
            for x in tensors {
                let (keep, pre, post) = (
                    x.update.keep as f32,
                    x.update.pre as f32,
                    x.update.post as f32,
                );
                let plain = x.update.plain();
                for start in (t * chunk..x.len).step_by(threads * chunk) {
                    let len = chunk.min(x.len - start);
                    // SAFETY: [start, start + len) lies inside the tensor and no
                    // other thread takes this chunk (see SharedF32).
                    let part = unsafe { std::slice::from_raw_parts_mut(x.ptr.add(start), len) };
                    let z = &mut z[..len];
                    self.fill(seed, x.stream, start as u64, z);
                    if let Some(bits) = x.mask {
                        // z·0 or z·1, as the tensor path's `z *= mask` computes it.
                        for (k, z) in z.iter_mut().enumerate() {
                            let e = start + k;
                            *z *= ((bits[e / 8] >> (e % 8)) & 1) as f32;
                        }
                    }
                    if plain {
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
        u: Update,
        mask: Option<&Mask>,
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
            self.fill(seed, stream, start as u64, &mut buf[..len]);
            let mut z = Tensor::from_slice(&buf[..len])
                .to_device(tensor.device())
                .to_kind(tensor.kind());
            if let Some(mask) = mask {
                let _ = z.g_mul_(&mask.slice(stream as usize, start as i64, len as i64));
            }
            apply_torch(&flat.narrow(0, start as i64, len as i64), z, u);
            start += len;
        }
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
