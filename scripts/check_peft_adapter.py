"""Check an adapter that mezod exported (a run's `adapter/`) against PEFT.

Loads the base model with transformers and puts the adapter on it with the
`peft` package (`PeftModel.from_pretrained`), then compares its logits with
what mezod says the tuned model computes:

* LoRA: the merged model mezod exported beside it (`RUN/model`), on a few texts;
* prefix tuning (or either kind): `--expect FILE.json`, mezod's own logits
  `{"ids": [[...], ...], "logits": [[[...]]], ...}` for the given token ids.

They must agree to float tolerance and (unless --allow-noop) differ from the
base model's, so the adapter is really in use.

    python scripts/check_peft_adapter.py BASE_DIR RUN/adapter [RUN/model] [--expect F]
"""

import argparse
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

TEXTS = ["the movie was great", "A warm and witty story; the cast is terrific!"]


def load(path):
    cfg = AutoConfig.from_pretrained(path)
    cls = AutoModelForMaskedLM if cfg.model_type in ("bert", "roberta") else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def logits(model, inputs):
    with torch.no_grad():
        return [model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0] for ids in inputs]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("merged", nargs="?", help="the merged model mezod exported (LoRA)")
    ap.add_argument("--expect", help="mezod's logits for given ids (JSON)")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--allow-noop", action="store_true")
    args = ap.parse_args()
    if args.expect:
        expect = json.load(open(args.expect))
        inputs = [torch.tensor([ids]) for ids in expect["ids"]]
        reference = [torch.tensor(rows) for rows in expect["logits"]]
        what = "mezod"
    elif args.merged:
        tok = AutoTokenizer.from_pretrained(args.base)
        inputs = [tok(t, return_tensors="pt")["input_ids"] for t in TEXTS]
        reference = logits(load(args.merged), inputs)
        what = "merged"
    else:
        sys.exit("give the merged model (LoRA) or --expect FILE.json")
    base = logits(load(args.base), inputs)
    peft = PeftModel.from_pretrained(load(args.base), args.adapter).eval()
    with_adapter = logits(peft, inputs)
    diff = max((a - b).abs().max().item() for a, b in zip(with_adapter, reference))
    moved = max((a - b).abs().max().item() for a, b in zip(with_adapter, base))
    kind = peft.peft_config["default"].peft_type.value
    print(f"{kind}: PEFT vs {what}: max |diff| {diff:.3e}; adapter vs base: max |diff| {moved:.3e}")
    if diff > args.atol:
        sys.exit(f"the PEFT adapter and {what} disagree (max |diff| {diff:.3e} > {args.atol})")
    if moved == 0.0 and not args.allow_noop:
        sys.exit("the adapter changes nothing: logits equal the base model's")


if __name__ == "__main__":
    main()
