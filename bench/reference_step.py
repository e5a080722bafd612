"""The Python restatement of the reference MeZO step, timed like `mezod bench`.

    python bench/reference_step.py --model PATH --mode forward|step [--batch 8]
        [--tokens 64] [--iters 3] [--threads 2]

Same model (an HF directory, or a GGUF file through transformers' GGUF loader),
same synthetic batch (the formula of `mezod bench`), same loss, same thread
count; the step is `tests/reference/mezo_reference.py`'s zo_step + zo_update
(princeton-nlp/MeZO's trainer, restated). Prints one JSON line.
"""

import argparse
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
from mezo_reference import zo_forward, zo_step, zo_update  # noqa: E402


def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--mode", choices=["forward", "step"], required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.model.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(a.model))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size
    ids = torch.tensor(
        [[(i * 7919 + j * 104729 + 13) % (vocab - 1) + 1 for j in range(a.tokens)] for i in range(a.batch)]
    )
    batch = (ids, torch.ones_like(ids))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def once(i):
        if a.mode == "forward":
            return zo_forward(model, batch).item()
        g, loss, _ = zo_step(model, named, batch, i, 1e-3)
        zo_update(named, i, g, 1e-7, 0.0)
        return loss

    once(0)
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass
    start = time.perf_counter()
    for i in range(1, a.iters + 1):
        loss = once(i)
    secs = (time.perf_counter() - start) / a.iters
    print(json.dumps({"mode": a.mode, "seconds_per_iter": secs, "peak_rss_bytes": peak_rss(), "last_loss": loss}))


if __name__ == "__main__":
    main()
