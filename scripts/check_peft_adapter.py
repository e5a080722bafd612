"""Check a LoRA adapter that mezod exported against PEFT and transformers.

Loads the base model with transformers, puts the PEFT adapter on it
(`PeftModel.from_pretrained`), and compares its logits on a few texts with
those of the merged model mezod exported beside it (`model/`): they must agree
to float tolerance, and (unless --allow-noop) differ from the base model's, so
the adapter is really in use.

    python scripts/check_peft_adapter.py BASE_DIR RUN/adapter RUN/model
"""

import argparse
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, AutoConfig

TEXTS = ["the movie was great", "A warm and witty story; the cast is terrific!"]


def load(path):
    cfg = AutoConfig.from_pretrained(path)
    cls = AutoModelForMaskedLM if cfg.model_type in ("bert", "roberta") else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def logits(model, tok):
    with torch.no_grad():
        return [model(**tok(t, return_tensors="pt")).logits for t in TEXTS]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("merged")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--allow-noop", action="store_true")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.base)
    base = logits(load(args.base), tok)
    peft = PeftModel.from_pretrained(load(args.base), args.adapter).eval()
    with_adapter = logits(peft, tok)
    merged = logits(load(args.merged), tok)
    diff = max((a - b).abs().max().item() for a, b in zip(with_adapter, merged))
    moved = max((a - b).abs().max().item() for a, b in zip(with_adapter, base))
    print(f"PEFT vs merged: max |diff| {diff:.3e}; adapter vs base: max |diff| {moved:.3e}")
    if diff > args.atol:
        sys.exit(f"the PEFT adapter and the merged model disagree (max |diff| {diff:.3e} > {args.atol})")
    if moved == 0.0 and not args.allow_noop:
        sys.exit("the adapter changes nothing: logits equal the base model's")


if __name__ == "__main__":
    main()
