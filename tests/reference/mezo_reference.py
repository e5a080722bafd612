"""A restatement of the reference MeZO step in PyTorch, over the transformers model.

Follows princeton-nlp/MeZO `large_models/trainer.py`: `zo_perturb_parameters`,
`zo_step` and `zo_update` (seeded with `torch.manual_seed`, z drawn with
`torch.normal` per parameter in `named_parameters()` order, eval mode, no
autograd).  Given a finished `mezod run` output directory, it replays the same
steps from the same seeds and batches, computing the losses itself, and writes
its projected gradients and final weights so a test can compare them with mezod's.

Usage: mezo_reference.py RUN_DIR OUT_DIR
"""

import json
import os
import sys

import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast


def zo_perturb_parameters(named_params, seed, eps, scaling_factor=1):
    torch.manual_seed(seed)
    for _, param in named_params:
        z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
        param.data = param.data + scaling_factor * z * eps


def zo_forward(model, batch):
    """Mean next-token cross-entropy over real tokens (mezod's causal_lm objective)."""
    model.eval()
    with torch.inference_mode():
        ids, mask = batch
        kwargs = dict(input_ids=ids, attention_mask=mask)
        if model.config.model_type != "opt":
            pos = mask.long().cumsum(-1) - 1
            kwargs["position_ids"] = pos.masked_fill(mask == 0, 1)
        logits = model(**kwargs).logits.float()
        target_ok = (mask[:, 1:] * mask[:, :-1]).bool()
        targets = ids[:, 1:].masked_fill(~target_ok, -100)
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
        )


def zo_step(model, named_params, batch, seed, eps):
    zo_perturb_parameters(named_params, seed, eps, scaling_factor=1)
    loss1 = zo_forward(model, batch)
    zo_perturb_parameters(named_params, seed, eps, scaling_factor=-2)
    loss2 = zo_forward(model, batch)
    projected_grad = ((loss1 - loss2) / (2 * eps)).item()
    zo_perturb_parameters(named_params, seed, eps, scaling_factor=1)
    return projected_grad, loss1.item(), loss2.item()


def zo_update(named_params, seed, projected_grad, lr, weight_decay):
    torch.manual_seed(seed)
    for name, param in named_params:
        z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
        # The reference exempts names with "bias"/"layer_norm"/"layernorm"; mezod also
        # exempts the other norm weights (LLaMA's model.norm, GPT-2's ln_*), as documented.
        exempt = any(k in name for k in ("bias", "layer_norm", "layernorm", "norm.", ".ln_"))
        if not exempt:
            param.data = param.data - lr * (projected_grad * z + weight_decay * param.data)
        else:
            param.data = param.data - lr * (projected_grad * z)


def main(run_dir, out_dir):
    with open(os.path.join(run_dir, "spec.yaml")) as f:
        spec = yaml.safe_load(f)
    assert spec["task"]["kind"] == "causal_lm", "the restatement covers the causal_lm objective"
    model_dir = spec["model"]["path"]
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir, padding_side="left")
    field = spec["data"]["text_field"]
    with open(spec["data"]["train"]) as f:
        train = [json.loads(line)[field] for line in f if line.strip()]
    steps = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [s for s in steps if s["kind"] == "step"]
    named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    eps, wd = spec["mezo"]["eps"], spec["mezo"].get("weight_decay", 0.0)
    grads = []
    for s in steps:
        texts = [train[i] for i in s["batch"]]
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=spec["task"]["max_length"])
        g, l1, l2 = zo_step(model, named_params, (enc.input_ids, enc.attention_mask), s["seed"], eps)
        zo_update(named_params, s["seed"], g, s["lr"], wd)
        grads.append(dict(step=s["step"], projected_grad=g, loss_plus=l1, loss_minus=l2))
    os.makedirs(out_dir, exist_ok=True)
    save_file({n: p.detach().contiguous() for n, p in named_params}, os.path.join(out_dir, "weights.safetensors"))
    with open(os.path.join(out_dir, "grads.json"), "w") as f:
        json.dump(grads, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
