"""Fine-tune and/or score models on GLUE; the same as ``hfcompress eval glue``.

    python scripts/run_glue.py --model minilm-l6 --finetune --tasks rte,mrpc --output-dir outputs/glue
    python scripts/run_glue.py --model teacher=outputs/glue/minilm-l6-{task} \\
        --model student=outputs/student-{task} --tasks rte,mrpc --markdown outputs/glue.md

Run ``python scripts/run_glue.py --help`` for every option.
"""

from __future__ import annotations

import sys

from hfcompress.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "glue", *sys.argv[1:]]))
