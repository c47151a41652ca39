"""Convert and cache the bundled models ahead of time (the first use does it otherwise).

python scripts/prepare_models.py [smollm2-135m minilm-l6]
"""

from __future__ import annotations

import argparse
import logging

from tqdm.auto import tqdm

from hfcompress.models import BUNDLED_MODELS, resolve_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=list(BUNDLED_MODELS), choices=list(BUNDLED_MODELS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for name in tqdm(args.names, desc="models"):
        print(f"{name}: {resolve_model_path(name)}")


if __name__ == "__main__":
    main()
