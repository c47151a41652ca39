#!/usr/bin/env bash
# benchmarks/bench_pkd.py on a lent CUDA machine, as parallel processes (one per task and
# seed; the small models leave the GPU mostly idle, so they share it), then one merged table:
#   bash benchmarks/gpu_pkd.sh OUT_DIR TEACHER GLUE_DIR SECONDS
# TEACHER: the pre-trained all-MiniLM-L6-v2 folder (the machine cannot install the package);
# GLUE_DIR: the GLUE folder; SECONDS: the time every process gets, after which what finished
# is reported (models and logs go to $PKD_RUNS, default OUT_DIR/runs). Wheels in .whl/ (transformers pinned, datasets and its own needs) are installed
# first when present (SKIP_WHEELS=1: not); BENCH_EXTRA adds bench_pkd.py arguments to every run.
set -u
out="$1" teacher="$2" glue="$3" seconds="$4"
mkdir -p "$out" /tmp/hfc_path
ln -sfn "$PWD/triton_kernels" /tmp/hfc_path/hfcompress_triton
if [ -z "${SKIP_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD:/tmp/hfc_path"
else
    export PYTHONPATH="$PWD:/tmp/hfc_path${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2 HF_DATASETS_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1
python3 -c "import torch, transformers, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" || exit 1

runs="${PKD_RUNS:-$out/runs}"  # models and per-run logs; PKD_RUNS moves them elsewhere
mkdir -p "$runs"
common=(--teacher-model "$teacher" --data-dir "$glue" --out "$runs" --seed-all-tasks --augment-budget 40000 ${BENCH_EXTRA:-})
all=teacher,ft,kd,pkd-skip,pkd-skip-aug,kd-aug,pkd-last,pkd-skip-aug-w4rtn,pkd-skip-aug-w4gptq,pkd-skip-w4rtn,pkd-skip-w4gptq
core=teacher,ft,kd,pkd-skip,pkd-skip-aug
pids=()
launch() {  # name, then bench_pkd arguments
    local name="$1"
    shift
    timeout "$seconds" python3 benchmarks/bench_pkd.py "${common[@]}" --results-name "results-$name.json" "$@" \
        >"$runs/$name.log" 2>&1 &
    pids+=($!)
}
for task in sst2 cola stsb mrpc rte; do
    launch "$task-s42" --tasks "$task" --seeds 42 --variants "$all"
done
for seed in 43 44; do
    for task in mrpc rte stsb cola; do
        launch "$task-s$seed" --tasks "$task" --seeds "$seed" --variants "$core"
    done
done
wait "${pids[@]}"
python3 benchmarks/bench_pkd.py --report --tasks sst2,mrpc,rte,stsb,cola --out "$runs" | tee "$out/table.md"
python3 -c "import json, sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); import bench_pkd; \
print(json.dumps(bench_pkd.load_all_results(Path(sys.argv[1])), indent=1))" "$runs" >"$out/results.json"
tar czf "$out/logs.tgz" -C "$runs" $(cd "$runs" && ls *.log)
