"""Rebuild fine-tuned weights from a .mezo file in PyTorch, without mezod.

A .mezo file lists each MeZO step's seed, projected gradient and learning rate
for a base model.  This script replays them on the base's safetensors exactly as
mezod does (three passes per step: +εz, −2εz, then restore and update), drawing z
with the file's generator:

- `torch`: `torch.manual_seed(seed)`, then `torch.randn_like(p)` per parameter in
  the file's order (the reference MeZO's draws);
- `fast`: Philox 4x32-10 (key = seed, counter = (i / 4, parameter index, 0)) and
  one Box–Muller transform per word pair, in float32 with the same operations
  as mezod (numpy, below), so the result is bit-identical.

and with the file's estimator and perturbation (version 3 files):

- `perturbation: rademacher`: z = ±1; torch: `randint_like(p, 2)·2 − 1`; fast:
  bit i mod 32 of word (i mod 128)/32 of the Philox block with counter
  (i / 128, parameter index, 1), a set bit being −1;
- `estimator: sparse`: at the start of each step, per parameter, h = the
  ⌈(1 − sparsity)·m⌉-th smallest |θ| of the m elements θ[::max(n // 65536, 1)],
  and z is multiplied by the mask |θ| ≤ h in every pass of the step;
- `estimator: fzoo`: per direction +εu then −εu (the loss at θ and at θ + εu were
  measured there), then one update pass per direction with coefficient
  −η·g_j / (N·σ) (none when σ = 0), weight decay with the first.

and LOZO's low-rank directions (version 4 files, `estimator: lozo`): the passes
are MeZO's (or n-SPSA's), but each 2-D parameter's z is U·Vᵀ with U (rows × rank)
drawn from the pass's seed and V (columns × rank) from the step's `basis` seed,
summed as u₀v₀ᵀ + u₁v₁ᵀ + … in that order (no matmul); torch: every matrix's V
first (`manual_seed(basis)`, `randn(cols, rank)` per matrix in order), then
`manual_seed(seed)` and per parameter `randn(rows, rank)` (matrices) or
`randn_like(p)`; fast: U and V are the first rows·rank and cols·rank elements of
the parameter's stream under the two seeds.

Usage:
    mezo_rebuild.py TUNE.mezo --base MODEL_DIR -o OUT.safetensors [--check OTHER.safetensors]

--check compares the rebuilt tensors with another safetensors file (e.g. the
`model/model.safetensors` that mezod exported, or `mezod apply`'s) and fails
unless every tensor is bit-identical.
"""

import argparse
import hashlib
import json
import math
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

# Philox 4x32-10 (Salmon et al., SC 2011).
M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, key):
    """Vectorized over blocks: c0..c3 are uint32 arrays, key a (k0, k1) pair."""
    c = [x.astype(np.uint64) for x in (c0, c1, c2, c3)]
    k0, k1 = key
    for rnd in range(10):
        if rnd > 0:
            k0, k1 = (k0 + W0) & 0xFFFFFFFF, (k1 + W1) & 0xFFFFFFFF
        p0 = M0 * c[0]
        p1 = M1 * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0), p1 & MASK32,
             (p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1), p0 & MASK32]
    return [x.astype(np.uint32) for x in c]


F = np.float32
TWO_POW_M24 = F(1.0) / F(16777216.0)
LN_2 = F(np.log(2.0))
SQRT_2 = F(np.sqrt(2.0))
HALF_PI = F(np.pi / 2)


def ln_unit(u):
    bits = u.view(np.uint32)
    e = ((bits >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int32) - 127
    m = ((bits & np.uint32(0x007FFFFF)) | np.uint32(0x3F800000)).view(np.float32)
    big = m > SQRT_2
    m = np.where(big, m * F(0.5), m)
    e = e + big.astype(np.int32)
    s = (m - F(1.0)) / (m + F(1.0))
    s2 = s * s
    series = F(1.0) + s2 * (F(1.0) / F(3.0) + s2 * (F(1.0) / F(5.0) + s2 * (F(1.0) / F(7.0) + s2 * (F(1.0) / F(9.0)))))
    return e.astype(np.float32) * LN_2 + F(2.0) * s * series


def cos_sin_quarter(x):
    x2 = x * x
    sin = x * (F(1.0) + x2 * (F(-1.0) / F(6.0) + x2 * (F(1.0) / F(120.0) + x2 * (
        F(-1.0) / F(5040.0) + x2 * (F(1.0) / F(362880.0) + x2 * (F(-1.0) / F(39916800.0)))))))
    cos = F(1.0) + x2 * (F(-0.5) + x2 * (F(1.0) / F(24.0) + x2 * (F(-1.0) / F(720.0) + x2 * (
        F(1.0) / F(40320.0) + x2 * (F(-1.0) / F(3628800.0) + x2 * (F(1.0) / F(479001600.0)))))))
    return cos, sin


def box_muller(a, b):
    u = ((a >> np.uint32(8)) + np.uint32(1)).astype(np.float32) * TWO_POW_M24
    r = np.sqrt(F(-2.0) * ln_unit(u))
    c, s = cos_sin_quarter(((b >> np.uint32(6)) & np.uint32(0x00FFFFFF)).astype(np.float32) * TWO_POW_M24 * HALF_PI)
    q = b >> np.uint32(30)
    odd = (q & np.uint32(1)) == 1
    x, y = np.where(odd, s, c), np.where(odd, c, s)
    x = (x.view(np.uint32) ^ (((q ^ (q >> np.uint32(1))) & np.uint32(1)) << np.uint32(31))).view(np.float32)
    y = (y.view(np.uint32) ^ ((q >> np.uint32(1)) << np.uint32(31))).view(np.float32)
    return r * x, r * y


def fast_normals(seed, stream, n):
    """Elements 0..n of z for parameter `stream` under step seed `seed`."""
    blocks = np.arange((n + 3) // 4, dtype=np.uint64)
    lo = (blocks & MASK32).astype(np.uint32)
    hi = (blocks >> np.uint64(32)).astype(np.uint32)
    w = philox4x32_10(lo, hi, np.full_like(lo, stream), np.zeros_like(lo), (seed & 0xFFFFFFFF, seed >> 32))
    z0, z1 = box_muller(w[0], w[1])
    z2, z3 = box_muller(w[2], w[3])
    return np.stack([z0, z1, z2, z3], axis=1).reshape(-1)[:n]


def fast_signs(seed, stream, n):
    """Elements 0..n of the ±1 direction of parameter `stream` under step seed `seed`."""
    blocks = np.arange((n + 127) // 128, dtype=np.uint64)
    lo = (blocks & MASK32).astype(np.uint32)
    hi = (blocks >> np.uint64(32)).astype(np.uint32)
    w = philox4x32_10(lo, hi, np.full_like(lo, stream), np.ones_like(lo), (seed & 0xFFFFFFFF, seed >> 32))
    words = np.stack(w, axis=1)  # [blocks, 4]
    bits = (words[:, :, None] >> np.arange(32, dtype=np.uint32)) & np.uint32(1)
    return (np.float32(1.0) - np.float32(2.0) * bits.reshape(-1).astype(np.float32))[:n]


def torch_draw(shape, dtype, rademacher):
    """A tensor of torch's draws: `randn`, or `randint(2)·2 − 1` (a whole z draws
    what `randn_like(p)` / `randint_like(p, 2)` would)."""
    if rademacher:
        z = torch.randint(0, 2, shape, dtype=dtype)
        mul_scalar_(z, 2.0)
        torch.ops.aten.sub_.Scalar(z, 1.0)
        return z
    return torch.randn(shape, dtype=dtype)


def outer_sum(u, v):
    """U·Vᵀ as u₀v₀ᵀ + u₁v₁ᵀ + …, each a rounded product then a rounded sum."""
    z = u[:, 0:1] * v[:, 0:1].T
    for k in range(1, u.shape[1]):
        z += u[:, k:k + 1] * v[:, k:k + 1].T
    return z


def draw(rng, params, seed, perturbation="gaussian", masks=None, low_rank=None):
    """z for every parameter, in order (zeroed outside `masks`, when given;
    U·Vᵀ on matrices when `low_rank` = (rank, basis seed) is given)."""
    rademacher = perturbation == "rademacher"
    matrix = [low_rank is not None and p.dim() == 2 for p in params]
    rank = low_rank[0] if low_rank else 0
    if rng == "torch":
        vs = []
        if low_rank:
            torch.manual_seed(low_rank[1])
            vs = [torch_draw((p.shape[1], rank), p.dtype, rademacher) if m else None
                  for p, m in zip(params, matrix)]
        torch.manual_seed(seed)
        zs = []
        for i, p in enumerate(params):
            if matrix[i]:
                z = outer_sum(torch_draw((p.shape[0], rank), p.dtype, rademacher), vs[i])
            else:
                z = torch_draw(p.shape, p.dtype, rademacher)
            zs.append(z)
    else:
        fill = fast_signs if rademacher else fast_normals
        zs = []
        for i, p in enumerate(params):
            if matrix[i]:
                u = fill(seed, i, p.shape[0] * rank).reshape(p.shape[0], rank)
                v = fill(low_rank[1], i, p.shape[1] * rank).reshape(p.shape[1], rank)
                z = outer_sum(u, v)
            else:
                z = fill(seed, i, p.numel())
            zs.append(torch.from_numpy(np.ascontiguousarray(z)).reshape(p.shape).to(p.dtype))
    if masks is not None:
        for z, m in zip(zs, masks):
            z.mul_(m)
    return zs


def sparse_masks(params, sparsity):
    """Sparse MeZO's mask of each parameter, from the weights as the step finds them."""
    keep = 1.0 - sparsity
    masks = []
    for p in params:
        flat = p.reshape(-1)
        n = flat.numel()
        sample = flat[0:n:max(n // 65536, 1)].abs().float()
        m = sample.numel()
        k = min(max(math.ceil(keep * m), 1), m)
        h = sample.kthvalue(k).values.item()
        masks.append(flat.abs().le(h).reshape(p.shape))
    return masks


def mul_scalar_(t, s):
    """`t *= s` through aten's `mul_.Scalar`, the operation mezod calls.  Python's
    `t.mul_(s)` goes through `mul_.Tensor`, which for bf16/f16 tensors multiplies by
    the float scalar itself, where `mul_.Scalar` first rounds it to the tensor's
    dtype: the results differ in the last bit."""
    return torch.ops.aten.mul_.Scalar(t, s)


def sweep(rng, params, seed, coefficients, perturbation="gaussian", masks=None, low_rank=None):
    """p ← keep·(p + pre·z) + post·z with the operations mezod uses."""
    zs = draw(rng, params, seed, perturbation, masks, low_rank)
    for p, z, (keep, pre, post) in zip(params, zs, coefficients):
        fused = rng == "fast" and p.dtype == torch.float32
        if keep == 1.0 and pre == 0.0:
            if fused:  # mezod's CPU kernel: p + f32(post)·z per element
                p.copy_(p + torch.from_numpy(np.float32(post) * z.numpy()))
            else:
                p.add_(mul_scalar_(z, post))
        elif fused:  # (p + f32(pre)·z)·f32(keep) + f32(post)·z per element
            pn, zn = p.numpy(), z.numpy()
            p.copy_(torch.from_numpy((pn + np.float32(pre) * zn) * np.float32(keep) + np.float32(post) * zn))
        elif pre == 0.0:  # decay then add (n-SPSA's update passes)
            mul_scalar_(p, keep)
            p.add_(mul_scalar_(z, post))
        else:
            p.add_(mul_scalar_(z, pre))
            mul_scalar_(p, keep)
            p.add_(mul_scalar_(z, post / pre))


def rebuild(tune, base_dir):
    stored = load_file(os.path.join(base_dir, "model.safetensors"))
    dtype = DTYPES[tune["dtype"]]
    params = []
    for entry in tune["params"]:
        name = entry["name"]
        candidates = [name] + [name[len(p):] for p in ("model.", "transformer.", "decoder.") if name.startswith(p)] \
            + [p + name for p in ("model.", "transformer.", "decoder.")]
        found = next((c for c in candidates if c in stored), None)
        if found is None:
            sys.exit(f"{name} is not in {base_dir}/model.safetensors")
        t = stored[found].to(dtype).contiguous().clone()
        if list(t.shape) != entry["shape"]:
            sys.exit(f"{name}: shape {list(t.shape)} in the base, {entry['shape']} in the file")
        params.append(t)
    check_identity(tune, params)
    eps, wd, rng = tune["eps"], tune["weight_decay"], tune["rng"]
    estimator = tune.get("estimator", "mezo")
    perturbation = tune.get("perturbation", "gaussian")
    with torch.no_grad():
        for i, step in enumerate(tune["steps"]):
            assert step["step"] == i, "steps must be 0, 1, 2, …"
            seed, g, lr = step["seed"], step["projected_grad"], step["lr"]
            more = step.get("more", [])
            seeds = [seed] + [m[0] for m in more]
            grads = [g] + [m[1] for m in more]
            masks = sparse_masks(params, tune.get("sparsity", 0.75)) if estimator == "sparse" else None
            low_rank = None
            if estimator == "lozo":
                if "basis" not in step:
                    sys.exit(f"step {i} of a lozo file has no basis seed")
                low_rank = (tune.get("rank", 1), step["basis"])

            def each(s, coefficients):
                sweep(rng, params, s, coefficients, perturbation, masks, low_rank)

            def updates(posts):  # one pass per direction, weight decay with the first
                for j, (s, post) in enumerate(zip(seeds, posts)):
                    each(s, [(1.0 - lr * wd if j == 0 and wd != 0.0 and e["decays"] else 1.0, 0.0, post)
                             for e in tune["params"]])

            if estimator == "fzoo":  # each direction +εu, −εu, then the updates scaled by 1/σ
                if "spread" not in step:
                    sys.exit(f"step {i} of an fzoo file has no spread σ")
                sigma, n = step["spread"], len(seeds)
                for s in seeds:
                    each(s, [(1.0, 0.0, eps)] * len(params))
                    each(s, [(1.0, 0.0, -eps)] * len(params))
                updates([-lr * gj / (n * sigma) if sigma > 0.0 else 0.0 for gj in grads])
            elif not more:  # MeZO: +εz, −2εz, then restore and update in one pass
                each(seed, [(1.0, 0.0, eps)] * len(params))
                each(seed, [(1.0, 0.0, -2.0 * eps)] * len(params))
                each(seed, [(1.0 - lr * wd, eps, -lr * g) if wd != 0.0 and e["decays"] else (1.0, 0.0, eps - lr * g)
                            for e in tune["params"]])
            else:  # n-SPSA: measure every direction at the same θ, then apply each in turn
                for s in seeds:
                    for scale in (eps, -2.0 * eps, eps):
                        each(s, [(1.0, 0.0, scale)] * len(params))
                n = float(len(seeds))
                updates([-lr * gj / n for gj in grads])
    return {e["name"]: p for e, p in zip(tune["params"], params)}


def check_identity(tune, params):
    h = hashlib.sha256()
    for entry, p in zip(tune["params"], params):
        h.update(entry["name"].encode())
        h.update(b"\n")
        h.update(",".join(str(d) for d in p.shape).encode())
        h.update(b"\n")
        h.update(p.contiguous().view(torch.uint8).numpy().tobytes())
    if h.hexdigest() != tune["base"]["weights_sha256"]:
        sys.exit(f"this base is not the one the fine-tune was made on (weights hash {h.hexdigest()}, "
                 f"expected {tune['base']['weights_sha256']})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tune")
    ap.add_argument("--base", required=True, help="the base model's Hugging Face directory")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--check", help="a safetensors file that must hold identical tensors")
    args = ap.parse_args()
    tune = json.load(open(args.tune))
    if tune.get("format") != "mezo":
        sys.exit(f"{args.tune} is not a .mezo file")
    if tune.get("tuning", "full") != "full":
        sys.exit(f"{args.tune} is a {tune['tuning']} fine-tune; this script rebuilds full fine-tunes "
                 "(rebuild it with `mezod apply`)")
    if tune.get("version", 99) not in (1, 3, 4):
        sys.exit(f"{args.tune} is a version-{tune.get('version')} .mezo file; "
                 "this script reads versions 1, 3 and 4")
    tensors = rebuild(tune, args.base)
    save_file(tensors, args.output, metadata={"format": "pt"})
    print(f"{args.output}: {len(tune['steps'])} steps applied ({tune['rng']} z, {tune['dtype']})")
    if args.check:
        other = load_file(args.check)
        bad = [n for n, t in tensors.items() if n not in other or not torch.equal(t, other[n])]
        if bad:
            worst = max((t.float() - other[n].float()).abs().max().item() for n, t in tensors.items() if n in other)
            sys.exit(f"differs from {args.check} in {len(bad)} tensors (e.g. {bad[0]}; max |diff| {worst:.3e})")
        print(f"identical to {args.check}: {len(tensors)} tensors, bit for bit")


if __name__ == "__main__":
    main()
