"""transformers' own reading of a GGUF file: token ids and logits for a few sentences.

    python tests/gguf/reference.py MODEL.gguf OUT.safetensors

transformers dequantizes the file with the `gguf` package, builds its config and
tokenizer from the metadata, and runs LlamaForCausalLM in f32. The output holds,
per sentence i, `ids.i` (int64 [T]) and `logits.i` (float32 [T, vocab]).

    python tests/gguf/reference.py --hf DIR OUT.safetensors

does the same for an HF directory (mezod's export of a GGUF-sourced model).
"""

import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

SENTENCES = [
    "The capital of France is",
    "A warm and witty story; the cast is terrific!",
    "It was a dull, plodding film with nothing to say.",
    "def add(a, b):\n    return a + b",
    "<|im_start|>user\nWhat is MeZO?<|im_end|>",
]


def main():
    args = sys.argv[1:]
    if args[0] == "--hf":
        source, out = args[1], args[2]
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    else:
        path, out = args
        folder, name = os.path.split(os.path.abspath(path))
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    tensors = {}
    with torch.no_grad():
        for i, text in enumerate(SENTENCES):
            ids = tok(text, return_tensors="pt")["input_ids"]
            tensors[f"ids.{i}"] = ids[0].to(torch.int64).contiguous()
            tensors[f"logits.{i}"] = model(ids).logits[0].float().contiguous()
    save_file(tensors, out)


if __name__ == "__main__":
    main()
