//! Sparse MeZO's mask: which weights a step perturbs and updates.
//!
//! Liu et al. (2024) perturb only the small-magnitude weights of each tensor:
//! `m = |θ| ≤ h`, with `h` the tensor's magnitude quantile at `1 − sparsity`.
//! Here both are recomputed at the start of every step from the weights as
//! they are, so they are a pure function of θ: a replayed step, which starts
//! from bit-identical weights, recomputes the same thresholds and the same mask,
//! and nothing needs logging.  (A threshold fixed from the base weights would
//! break LoRA, whose B matrices start at zero.)
//!
//! The mask must outlive the first perturbation — after `θ + εz` the weights no
//! longer tell which were small — so it is kept for the step's passes, packed
//! one bit per weight (1/32 of f32 weights, 1/16 of bf16): the only state any
//! estimator keeps beside the weights, and in the job's memory estimate.
//!
//! The threshold comes from a strided sample of at most [`SAMPLE`] elements per
//! tensor (a selection over the whole tensor each step would cost more than
//! the step's sweeps); `kthvalue` is an exact selection, so the sample's
//! quantile is one of the tensor's own magnitudes and compares exactly in any
//! dtype.  `scripts/mezo_rebuild.py` restates it with the same operations.

use tch::{Kind, Tensor};

use crate::model::ParamList;

/// Elements sampled per tensor for its threshold.
pub const SAMPLE: i64 = 1 << 16;
/// Elements compared and packed at once (bounds the temporaries; a multiple of 8).
const CHUNK: i64 = 1 << 20;

/// One packed bit per weight, per tensor: bit `i % 8` of byte `i / 8` is set
/// when element `i` is perturbed.
pub struct Mask {
    bits: Vec<Tensor>,
}

/// 1, 2, 4, …, 128: each of 8 consecutive elements' place in its byte.
fn place_values(device: tch::Device) -> Tensor {
    Tensor::from_slice(&[1u8, 2, 4, 8, 16, 32, 64, 128]).to_device(device)
}

/// The magnitude below which a tensor's weights are perturbed: the
/// `ceil(keep · m)`-th smallest |θ| of a strided sample of m elements.
pub fn threshold(tensor: &Tensor, keep: f64) -> f64 {
    let flat = tensor.reshape([-1]);
    threshold_on_host(&flat, keep).unwrap_or_else(|| threshold_with_torch(&flat, keep))
}

/// Every `stride`-th element is sampled, and the sample's k-th smallest
/// magnitude is the threshold: (stride, k) for `n` elements.
fn sample_plan(n: i64, keep: f64) -> (i64, i64) {
    let stride = (n / SAMPLE).max(1);
    let m = (n + stride - 1) / stride;
    (stride, ((keep * m as f64).ceil() as i64).clamp(1, m))
}

/// [`threshold`] by torch's exact selection (`kthvalue`), on the tensor's device.
fn threshold_with_torch(flat: &Tensor, keep: f64) -> f64 {
    let n = flat.size()[0];
    let (stride, k) = sample_plan(n, keep);
    let sample = flat.slice(0, 0, n, stride).abs().to_kind(Kind::Float);
    sample.kthvalue(k, 0, false).0.double_value(&[])
}

/// [`threshold`] for a contiguous CPU tensor of f32 or bf16, selected in Rust
/// (`select_nth_unstable`, exact like `kthvalue`; NaN above everything as
/// there).  No torch operation runs, so libtorch's OpenMP threads, which spin
/// for a while after each parallel operation, do not wake between the z passes
/// and compete with the sweep's threads for the cores.
fn threshold_on_host(flat: &Tensor, keep: f64) -> Option<f64> {
    let weights = HostWeights::of(flat)?;
    let (stride, k) = sample_plan(flat.numel() as i64, keep);
    let stride = stride as usize;
    let mut sample: Vec<f32> = match weights {
        HostWeights::F32(x) => x.iter().step_by(stride).map(|x| x.abs()).collect(),
        HostWeights::Bf16(x) => x.iter().step_by(stride).map(|&b| widen(b).abs()).collect(),
    };
    let (_, kth, _) = sample.select_nth_unstable_by(k as usize - 1, f32::total_cmp);
    Some(f64::from(*kth))
}

/// A contiguous CPU tensor's weights, read in place: the dtypes the host
/// paths handle (others go through torch).
enum HostWeights<'t> {
    F32(&'t [f32]),
    Bf16(&'t [u16]),
}

impl<'t> HostWeights<'t> {
    fn of(flat: &'t Tensor) -> Option<Self> {
        let n = flat.numel();
        if flat.device() != tch::Device::Cpu || !flat.is_contiguous() || n == 0 {
            return None;
        }
        let ptr = flat.data_ptr();
        // SAFETY: a contiguous CPU tensor of `n` elements of the matched type,
        // borrowed for as long as the slice.
        Some(match flat.kind() {
            Kind::Float => Self::F32(unsafe { std::slice::from_raw_parts(ptr as *const f32, n) }),
            Kind::BFloat16 => {
                Self::Bf16(unsafe { std::slice::from_raw_parts(ptr as *const u16, n) })
            }
            _ => return None,
        })
    }
}

/// A bf16 weight's bits as the f32 it widens to (exactly).
fn widen(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// `|θ| ≤ h`, packed, for a contiguous CPU tensor of f32 or bf16 (the fast
/// generator's case), computed in place from its memory: one pass, split over
/// torch's intra-op threads, and no temporaries.  torch's path below makes
/// five tensors per chunk (|θ|, the comparison, its bytes, their products, the
/// sums), which every step re-allocated between forward passes, fragmenting the
/// heap: a job's peak then rose above the estimate.  The comparison is the one
/// torch makes: `h` is one of the tensor's own magnitudes (see [`threshold`]),
/// exact in f32, and a bf16 weight widens to f32 exactly.
fn pack_on_host(flat: &Tensor, h: f64) -> Option<Tensor> {
    let weights = HostWeights::of(flat)?;
    let n = flat.numel();
    // Every byte is written below; zeros would run a parallel fill first.
    let packed = Tensor::empty([n.div_ceil(8) as i64], (Kind::Uint8, tch::Device::Cpu));
    // SAFETY: `packed` is a fresh contiguous u8 CPU tensor of that many bytes.
    let out =
        unsafe { std::slice::from_raw_parts_mut(packed.data_ptr() as *mut u8, packed.numel()) };
    let h = h as f32;
    match weights {
        HostWeights::F32(x) => pack_parallel(x, out, |x| x.abs() <= h),
        HostWeights::Bf16(x) => pack_parallel(x, out, |b| widen(b).abs() <= h),
    }
    Some(packed)
}

/// `|θ| ≤ h`, packed, with torch's operations on the tensor's device (a GPU),
/// [`CHUNK`] elements at a time.
fn pack_with_torch(flat: &Tensor, h: f64) -> Tensor {
    let n = flat.size()[0];
    let places = place_values(flat.device());
    let packed = Tensor::zeros([(n + 7) / 8], (Kind::Uint8, flat.device()));
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        let small = flat.narrow(0, start, len).abs().le(h);
        let padded = (len + 7) / 8 * 8;
        let small = if padded > len {
            Tensor::cat(
                &[
                    small,
                    Tensor::zeros([padded - len], (Kind::Bool, flat.device())),
                ],
                0,
            )
        } else {
            small
        };
        let bytes = (small.view([-1, 8]).to_kind(Kind::Uint8) * &places).sum_dim_intlist(
            Some(&[1i64][..]),
            false,
            Kind::Uint8,
        );
        packed.narrow(0, start / 8, padded / 8).copy_(&bytes);
        start += len;
    }
    packed
}

/// Bit `j` of byte `i` of `out` = `small(x[8i + j])`, over torch's thread
/// count; part 0 on the calling thread, so a tensor under one chunk (most of
/// them) starts no thread at all.
fn pack_parallel<T: Copy + Sync>(x: &[T], out: &mut [u8], small: impl Fn(T) -> bool + Sync) {
    let threads = (tch::get_num_threads().max(1) as usize).min(x.len() / CHUNK as usize + 1);
    let bytes_each = out.len().div_ceil(threads).max(1);
    let pack = |part: usize, bytes: &mut [u8]| {
        let from = part * bytes_each * 8;
        let x = &x[from..(from + bytes.len() * 8).min(x.len())];
        for (byte, xs) in bytes.iter_mut().zip(x.chunks(8)) {
            *byte = xs
                .iter()
                .enumerate()
                .fold(0u8, |b, (j, &v)| b | (u8::from(small(v)) << j));
        }
    };
    let pack = &pack;
    let mut parts = out.chunks_mut(bytes_each).enumerate();
    let first = parts.next();
    std::thread::scope(|s| {
        for (part, bytes) in parts {
            s.spawn(move || pack(part, bytes));
        }
        if let Some((part, bytes)) = first {
            pack(part, bytes);
        }
    });
}

impl Mask {
    /// The mask of the weights as they are: per tensor, `|θ| ≤ threshold`.
    pub fn of(params: &ParamList, sparsity: f64) -> Mask {
        let _guard = tch::no_grad_guard();
        let keep = 1.0 - sparsity;
        let bits = params
            .iter()
            .map(|p| {
                let flat = p.tensor.reshape([-1]);
                if flat.numel() == 0 {
                    // Nothing to select (and no sample to take a threshold from).
                    return Tensor::zeros([0], (Kind::Uint8, flat.device()));
                }
                let h = threshold(&flat, keep);
                pack_on_host(&flat, h).unwrap_or_else(|| pack_with_torch(&flat, h))
            })
            .collect();
        Mask { bits }
    }

    /// Elements `start .. start + len` of tensor `i`'s mask as a bool tensor
    /// on its device (`start` a multiple of 8).
    pub fn slice(&self, i: usize, start: i64, len: i64) -> Tensor {
        debug_assert_eq!(start % 8, 0);
        let bytes = self.bits[i].narrow(0, start / 8, (len + 7) / 8);
        bytes
            .unsqueeze(1)
            .bitwise_and_tensor(&place_values(bytes.device()))
            .ne(0)
            .view([-1])
            .narrow(0, 0, len)
    }

    /// Tensor `i`'s mask, whole (for z drawn by torch, a tensor at a time).
    pub fn whole(&self, i: usize, numel: i64) -> Tensor {
        self.slice(i, 0, numel)
    }

    /// Tensor `i`'s packed bits in host memory (CPU tensors only).
    pub fn host_bytes(&self, i: usize) -> &[u8] {
        let b = &self.bits[i];
        assert_eq!(b.device(), tch::Device::Cpu);
        if b.numel() == 0 {
            return &[]; // an empty tensor's data pointer may be null
        }
        // SAFETY: a contiguous CPU u8 tensor owned by self, alive as long as the borrow.
        unsafe { std::slice::from_raw_parts(b.data_ptr() as *const u8, b.numel()) }
    }

    /// How many weights the mask selects.
    pub fn count(&self) -> i64 {
        self.bits
            .iter()
            .map(|b| {
                let ones: u32 = Vec::<u8>::try_from(b.to_device(tch::Device::Cpu))
                    .unwrap_or_default()
                    .iter()
                    .map(|x| x.count_ones())
                    .sum();
                ones as i64
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Param;
    use tch::Device;

    #[test]
    fn the_mask_selects_the_small_weights_of_each_tensor_and_unpacks_as_it_packed() {
        let _rng = crate::torch_rng_lock();
        tch::manual_seed(9);
        for kind in [Kind::Float, Kind::BFloat16] {
            let params = ParamList(vec![
                Param {
                    name: "w".into(),
                    // Large enough that the threshold comes from a sample.
                    tensor: Tensor::randn([700, 131], (kind, Device::Cpu)),
                    decays: true,
                },
                Param {
                    name: "b".into(),
                    tensor: Tensor::randn([13], (kind, Device::Cpu)) * 10.0,
                    decays: false,
                },
                Param {
                    name: "empty".into(),
                    tensor: Tensor::randn([0, 4], (kind, Device::Cpu)),
                    decays: false,
                },
            ]);
            let mask = Mask::of(&params, 0.75);
            for (i, p) in params.iter().enumerate() {
                let n = p.tensor.numel() as i64;
                if n == 0 {
                    assert_eq!(
                        mask.whole(i, 0).numel(),
                        0,
                        "an empty tensor selects nothing"
                    );
                    continue;
                }
                let h = threshold(&p.tensor, 0.25);
                let want = p.tensor.reshape([-1]).abs().le(h);
                assert!(mask.whole(i, n).equal(&want), "{kind:?} {}", p.name);
                let part = mask.slice(i, 8, n.min(40) - 8);
                assert!(part.equal(&want.narrow(0, 8, n.min(40) - 8)));
                let frac = want
                    .to_kind(Kind::Float)
                    .mean(Kind::Float)
                    .double_value(&[]);
                assert!(
                    (0.2..0.3).contains(&frac) || n < 100,
                    "{kind:?} {}: {frac}",
                    p.name
                );
            }
            let selected = mask.count();
            assert_eq!(
                selected,
                params
                    .iter()
                    .enumerate()
                    .map(|(i, p)| mask
                        .whole(i, p.tensor.numel() as i64)
                        .sum(Kind::Int64)
                        .int64_value(&[]))
                    .sum::<i64>()
            );
        }
    }

    #[test]
    fn thresholds_and_bits_made_on_the_host_are_torchs() {
        let _rng = crate::torch_rng_lock();
        tch::manual_seed(4);
        // Sizes off a byte, across threads' parts, and over one chunk.
        for n in [1i64, 13, 64, 1000, CHUNK + 77, 3 * CHUNK + 5] {
            for kind in [Kind::Float, Kind::BFloat16] {
                let x = Tensor::randn([n], (kind, Device::Cpu));
                if n > 13 {
                    // A NaN, both zeros and an infinity compare as torch compares them.
                    for (i, v) in [(3, f64::NAN), (5, 0.0), (6, -0.0), (9, f64::NEG_INFINITY)] {
                        let _ = x.narrow(0, i, 1).fill_(v);
                    }
                }
                let h = threshold(&x, 0.3);
                for keep in [1e-9, 0.3, 1.0] {
                    let host = threshold_on_host(&x, keep).expect("a CPU tensor");
                    let torch = threshold_with_torch(&x, keep);
                    assert_eq!(
                        host.to_bits(),
                        torch.to_bits(),
                        "{kind:?} n {n} keep {keep}"
                    );
                }
                let host = pack_on_host(&x, h).expect("a CPU tensor packs on the host");
                assert!(host.equal(&pack_with_torch(&x, h)), "{kind:?} n {n}");
            }
        }
        let strided = Tensor::randn([64, 8], (Kind::Float, Device::Cpu)).t_();
        assert!(
            pack_on_host(&strided, 0.5).is_none(),
            "only contiguous tensors"
        );
    }
}
