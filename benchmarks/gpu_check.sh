#!/usr/bin/env bash
# The GPU checks, as one script for a lent CUDA machine (see benchmarks/RESULTS.md):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. the GPU-relevant tests with the machine's own transformers (the range pyproject allows);
#    failures are rerun with the pinned transformers when its wheel is in .whl/;
# 2. benchmarks/bench_w4a16.py: kernels per layer with the GEMV block sweep, then Llama-shaped
#    decoding; each part under its own time limit, into OUT_DIR/layers and OUT_DIR/e2e;
# 3. benchmarks/bench_w8a8.py: the W8A8 GEMM against bfloat16 cuBLAS, into OUT_DIR/w8a8;
# 4. benchmarks/bench_kv_gpu.py: KV4 decode attention at 32k tokens, batch 8, against SDPA over
#    a float16 cache (issue 12: at least 2x), into OUT_DIR/kv.
# 5. benchmarks/bench_block_sparse_gpu.py: block-sparse attention forward and backward against
#    FlashAttention (SDPA) at 8k and 16k tokens, densities 100/50/25/12.5%, into OUT_DIR/block_sparse.
# Runs from the source tree without installing: hfcompress_triton is linked to triton_kernels/.
set -u
out="${1:-${OUT:-benchmarks/out/gpu}}"
mkdir -p "$out" /tmp/hfc_path
ln -sfn "$PWD/triton_kernels" /tmp/hfc_path/hfcompress_triton
export PYTHONPATH="$PWD:/tmp/hfc_path" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"

tests=(tests/triton_kernels tests/integrations tests/quant tests/techniques/test_gptq_algorithm.py)
# The bundled models cannot be installed on the device, and a missing optional package (peft,
# compressed-tensors) must cost only the tests that import it, not the whole run.
pytest_flags=(-q -rfEs -m "not real_model" --continue-on-collection-errors)
timeout 150 python3 -m pytest "${pytest_flags[@]}" "${tests[@]}" 2>&1 | tee "$out/pytest.log"
status=${PIPESTATUS[0]}
if [ "$status" != 0 ] && ls .whl/transformers-*.whl >/dev/null 2>&1; then
    echo "== rerunning the failures with the pinned transformers"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/transformers-*.whl
    PYTHONPATH="/tmp/site:$PYTHONPATH" timeout 120 python3 -m pytest "${pytest_flags[@]}" --lf \
        "${tests[@]}" 2>&1 | tee "$out/pytest_pinned.log"
fi

timeout 140 python3 benchmarks/bench_w4a16.py --sweep gemv --out "$out/layers" 2>&1 | tee "$out/bench_layers.log"
timeout 140 python3 benchmarks/bench_w4a16.py --no-layers --e2e --out "$out/e2e" 2>&1 | tee "$out/bench_e2e.log"
# 3. the W8A8 Triton GEMM against bfloat16 cuBLAS (issue 11: at least 1.5x at M = 2048 on the
#    7B shapes), with the block sweep.
timeout 100 python3 benchmarks/bench_w8a8.py --sweep --out "$out/w8a8" 2>&1 | tee "$out/bench_w8a8.log"
# 4. KV4 decode attention against SDPA over a float16 cache (issue 12: at least 2x at 32k, batch 8).
timeout 60 python3 benchmarks/bench_kv_gpu.py --out "$out/kv" 2>&1 | tee "$out/bench_kv.log"
# 5. Block-sparse attention (issue 13): the kernel against FlashAttention, forward and backward.
timeout 120 python3 benchmarks/bench_block_sparse_gpu.py --out "$out/block_sparse" 2>&1 | tee "$out/bench_block_sparse.log"
