//! What the step tests share: small parameter lists, a quadratic loss, and z
//! as each generator must have drawn it, to check the steps' rules against.

use crate::mezo::step::{mezo_step, Gradient, StepConfig};
use crate::mezo::sweep::{Perturbation, Rng, ZSweep};
use crate::model::{Param, ParamList};
use anyhow::Result;
use mezod_core::estimator::{Estimator, DEFAULT_BASIS_EVERY};
use tch::{Device, Kind, Tensor};

/// LOZO of rank `rank` (its V's lifetime does not matter where the test
/// gives the step its basis seed).
pub(crate) fn lozo(rank: usize) -> Estimator {
    Estimator::Lozo {
        rank,
        basis_every: DEFAULT_BASIS_EVERY,
    }
}

pub(crate) fn params(kind: Kind) -> ParamList {
    tch::manual_seed(123);
    ParamList(vec![
        Param {
            name: "layers.0.fc.weight".into(),
            tensor: Tensor::randn([8, 16], (kind, Device::Cpu)),
            decays: true,
        },
        Param {
            name: "layers.0.fc.bias".into(),
            tensor: Tensor::randn([8], (kind, Device::Cpu)),
            decays: false,
        },
    ])
}

pub(crate) fn copy(p: &ParamList) -> ParamList {
    ParamList(
        p.iter()
            .map(|q| Param {
                name: q.name.clone(),
                tensor: q.tensor.copy(),
                decays: q.decays,
            })
            .collect(),
    )
}

pub(crate) fn same(a: &ParamList, b: &ParamList) -> bool {
    a.iter()
        .zip(b.iter())
        .all(|(x, y)| x.tensor.equal(&y.tensor))
}

pub(crate) fn torch() -> ZSweep {
    ZSweep::new(Rng::Torch, 1)
}

/// ‖w‖² of the first parameter, read live (it moves with the perturbations).
pub(crate) fn quadratic_loss(p: &ParamList) -> impl FnMut() -> Result<f64> {
    let w = p.0[0].tensor.shallow_clone();
    move || {
        Ok(w.to_kind(Kind::Float)
            .pow_tensor_scalar(2)
            .sum(Kind::Float)
            .double_value(&[]))
    }
}

/// A few steps of live training with a quadratic loss; returns the gradients.
pub(crate) fn train(p: &ParamList, z: &ZSweep, cfg: &StepConfig, seeds: &[u64]) -> Vec<f64> {
    seeds
        .iter()
        .map(|&seed| {
            let mut loss = quadratic_loss(p);
            mezo_step(p, z, seed, cfg, Gradient::Measure(&mut loss))
                .unwrap()
                .projected_grad
        })
        .collect()
}

pub(crate) const DECAYED: StepConfig = StepConfig {
    eps: 1e-3,
    lr: 1e-2,
    weight_decay: 0.1,
};

/// z of each tensor as the step must have drawn it.
pub(crate) fn drawn_z(rng: Rng, p: &ParamList, seed: u64) -> Vec<Tensor> {
    match rng {
        Rng::Torch => {
            tch::manual_seed(seed as i64);
            p.iter().map(|q| q.tensor.randn_like()).collect()
        }
        Rng::Fast => p
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let mut z = vec![0f32; q.tensor.numel()];
                crate::mezo::fast_rng::fill_normals(seed, i as u32, 0, &mut z);
                Tensor::from_slice(&z)
                    .to_kind(q.tensor.kind())
                    .view(q.tensor.size().as_slice())
            })
            .collect(),
    }
}

/// z as a sweep with `perturbation` draws it (torch's or the fast generator's).
pub(crate) fn drawn(rng: Rng, perturbation: Perturbation, p: &ParamList, seed: u64) -> Vec<Tensor> {
    match (rng, perturbation) {
        (_, Perturbation::Gaussian) => drawn_z(rng, p, seed),
        (Rng::Torch, Perturbation::Rademacher) => {
            tch::manual_seed(seed as i64);
            p.iter()
                .map(|q| q.tensor.randint_like(2) * 2.0 - 1.0)
                .collect()
        }
        (Rng::Fast, Perturbation::Rademacher) => p
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let mut z = vec![0f32; q.tensor.numel()];
                crate::mezo::fast_rng::fill_signs(seed, i as u32, 0, &mut z);
                Tensor::from_slice(&z)
                    .to_kind(q.tensor.kind())
                    .view(q.tensor.size().as_slice())
            })
            .collect(),
    }
}

/// LOZO's direction as the sweep must draw it: `U·Vᵀ` on matrices (U from
/// the step's seed, V from the basis seed), the dense z elsewhere.
pub(crate) fn drawn_low_rank(
    rng: Rng,
    p: &ParamList,
    seed: u64,
    basis: u64,
    rank: i64,
) -> Vec<Tensor> {
    let dense = drawn_z(rng, p, seed);
    let fast = |seed: u64, stream: usize, rows: i64| {
        let mut x = vec![0f32; (rows * rank) as usize];
        crate::mezo::fast_rng::fill_normals(seed, stream as u32, 0, &mut x);
        Tensor::from_slice(&x).view([rows, rank])
    };
    let mut vs = Vec::new();
    if rng == Rng::Torch {
        tch::manual_seed(basis as i64);
        for q in p.iter().filter(|q| q.tensor.dim() == 2) {
            vs.push(Tensor::randn(
                [q.tensor.size()[1], rank],
                (q.tensor.kind(), Device::Cpu),
            ));
        }
        tch::manual_seed(seed as i64);
    }
    let mut vs = vs.into_iter();
    p.iter()
        .enumerate()
        .map(|(i, q)| {
            let size = q.tensor.size();
            if size.len() != 2 {
                return match rng {
                    Rng::Torch => q.tensor.randn_like(),
                    Rng::Fast => dense[i].shallow_clone(),
                };
            }
            let (u, v) = match rng {
                Rng::Torch => (
                    Tensor::randn([size[0], rank], (q.tensor.kind(), Device::Cpu)),
                    vs.next().unwrap(),
                ),
                Rng::Fast => (fast(seed, i, size[0]), fast(basis, i, size[1])),
            };
            u.to_kind(Kind::Double)
                .matmul(&v.to_kind(Kind::Double).tr())
                .to_kind(q.tensor.kind())
        })
        .collect()
}
