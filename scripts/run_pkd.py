"""Distil a GLUE teacher into a shallower student with a PKD recipe; the same as
``hfcompress distill``, and runnable under ``accelerate launch``.

    python scripts/run_pkd.py --teacher outputs/glue/minilm-l6-rte --task rte \\
        --recipe recipes/minilm_pkd_skip3.yaml --output outputs/minilm-pkd3-rte
    accelerate launch --multi_gpu --num_processes 2 scripts/run_pkd.py ...   # 2 processes (gloo on CPU)
"""

from __future__ import annotations

import sys

from hfcompress.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
