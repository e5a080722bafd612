//! LOZO's low-rank directions (Chen et al., 2024): each weight matrix's z is
//! `U·Vᵀ`, V shared by `basis_every` consecutive steps.  The sweep draws the
//! factors with either generator and asks here for z's elements; the step rule
//! itself is MeZO's (see `method.rs`).

use tch::Tensor;

/// LOZO's directions: each 2-D tensor's z is `U·Vᵀ`, U (rows × rank) drawn
/// from the pass's seed as its z would be, V (columns × rank) from `basis` on
/// the same stream; other tensors keep their dense z.  The product is the
/// fixed-order sum of `rank` outer products, `z = u₀v₀ᵀ + u₁v₁ᵀ + …`, each
/// element a product then an addition rounded in turn (no matrix multiply,
/// whose summation order depends on the library and its threads): the same
/// bits on every replay, and in `scripts/mezo_rebuild.py`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LowRank {
    pub rank: usize,
    pub basis: u64,
}

/// A matrix's factors for the fast generator, in f32: `u` is rows × rank
/// (row-major, as drawn), `vt` is Vᵀ, rank × columns (V is drawn columns ×
/// rank; stored transposed so that a row of z reads each column of Vᵀ
/// contiguously).
pub(super) struct Factors {
    u: Vec<f32>,
    vt: Vec<f32>,
    cols: usize,
    rank: usize,
}

impl Factors {
    /// A rows × cols matrix's U (from the pass's `seed`) and V (from the
    /// `basis` seed), each drawn by `draw(seed, out)` as the first elements of
    /// the matrix's z would be.
    pub(super) fn draw(
        rows: usize,
        cols: usize,
        seed: u64,
        l: LowRank,
        draw: impl Fn(u64, &mut [f32]),
    ) -> Factors {
        let mut u = vec![0f32; rows * l.rank];
        let mut v = vec![0f32; cols * l.rank];
        draw(seed, &mut u);
        draw(l.basis, &mut v);
        let mut vt = vec![0f32; cols * l.rank];
        for (c, row) in v.chunks_exact(l.rank).enumerate() {
            for (k, &x) in row.iter().enumerate() {
                vt[k * cols + c] = x;
            }
        }
        Factors {
            u,
            vt,
            cols,
            rank: l.rank,
        }
    }

    /// Elements `start ..` of the flattened `U·Vᵀ`: each element is
    /// `u₀v₀ + u₁v₁ + …` summed in k order, every product and sum rounded in
    /// turn (no fused multiply-add), as torch's sum of broadcast outer products
    /// computes it; one k at a time over a row's stretch, which vectorizes.
    pub(super) fn fill(&self, start: usize, out: &mut [f32]) {
        let (r, cols) = (self.rank, self.cols);
        let mut done = 0;
        while done < out.len() {
            let e = start + done;
            let (row, col) = (e / cols, e % cols);
            let len = (cols - col).min(out.len() - done);
            let u = &self.u[row * r..row * r + r];
            let z = &mut out[done..done + len];
            for (z, v) in z.iter_mut().zip(&self.vt[col..col + len]) {
                *z = u[0] * v;
            }
            for (k, &uk) in u.iter().enumerate().skip(1) {
                let v = &self.vt[k * cols + col..k * cols + col + len];
                for (z, v) in z.iter_mut().zip(v) {
                    *z += uk * v;
                }
            }
            done += len;
        }
    }
}

/// `U·Vᵀ` as the fixed-order sum of the rank's outer products (see [`LowRank`]).
pub(super) fn outer_sum(u: &Tensor, v: &Tensor) -> Tensor {
    let term = |k: i64| u.narrow(1, k, 1) * v.narrow(1, k, 1).tr();
    let mut z = term(0);
    for k in 1..u.size()[1] {
        let _ = z.g_add_(&term(k));
    }
    z
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The fast generator's element-wise `U·Vᵀ` and torch's sum of outer
    /// products give the same bits for the same factors, from any start.
    #[test]
    fn the_fast_and_the_torch_product_agree_bit_for_bit() {
        let (rows, cols) = (7, 13);
        for rank in [1, 2, 5] {
            let l = LowRank { rank, basis: 3 };
            let draw = |seed: u64, out: &mut [f32]| {
                for (i, x) in out.iter_mut().enumerate() {
                    *x = ((seed as f32 + 1.0) * (i as f32 * 0.37 + 0.11)).sin();
                }
            };
            let f = Factors::draw(rows, cols, 9, l, draw);
            let mut fast = vec![0f32; rows * cols];
            f.fill(0, &mut fast[..40]);
            f.fill(40, &mut fast[40..]);
            let (mut u, mut v) = (vec![0f32; rows * rank], vec![0f32; cols * rank]);
            draw(9, &mut u);
            draw(3, &mut v);
            let opts = (Kind::Float, Device::Cpu);
            let u = Tensor::from_slice(&u)
                .view([rows as i64, rank as i64])
                .to_kind(opts.0);
            let v = Tensor::from_slice(&v).view([cols as i64, rank as i64]);
            let torch = outer_sum(&u, &v).contiguous().view([-1]);
            assert!(torch.equal(&Tensor::from_slice(&fast)), "rank {rank}");
        }
    }
}
