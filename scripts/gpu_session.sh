#!/usr/bin/env bash
# One device session on the H200: the GPU tests, then the benchmark, in ~8 minutes.
#
#   bash scripts/gpu_session.sh                  # default shapes (llama3-8b gate_up and o,
#                                                # llama3-70b down, smollm2 gate_up) x M 1..8192
#   bash scripts/gpu_session.sh --all            # further arguments go to lowbit.bench.run
#   bash scripts/gpu_session.sh --shapes llama3-8b.gate_up --m 1,16
#
# Writes into $OUT (the device tool's output folder; /tmp/lowbit-gpu-session elsewhere):
#   env.txt, gpu_tests.log, bench.log, h200.json, h200.md
# The lead copies h200.json and h200.md to docs/perf/. The benchmark's short table is
# the last thing printed.
#
# Environment:
#   LOWBIT_COMMIT     the commit to record where the device copy has no .git
#                     (LOWBIT_COMMIT=<sha> bash scripts/gpu_session.sh)
#   LOWBIT_SESSION_S  seconds for the whole session (default 480); the benchmark gets
#                     what the tests leave, less a margin, as --budget-s
#   LOWBIT_WHEELS     folder with an optional gemlite wheel or sdist (default: wheels/,
#                     untracked files travel to the device; .whl/ is looked at too, it is
#                     git-ignored: carry it): gemlite-0.6.0.post2.tar.gz
#                     is pure Python and is put on PYTHONPATH, a .whl is pip-installed
#                     offline. Without it the gemlite peer is reported as unavailable.
#   PYTHON            the interpreter (default: python, else python3)
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/lowbit-gpu-session}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
SESSION_S="${LOWBIT_SESSION_S:-480}"
start=$SECONDS

for f in "${LOWBIT_WHEELS:-wheels}"/gemlite-* .whl/gemlite-*; do
  [ -e "$f" ] || continue
  case "$f" in
    *.whl) "$PY" -m pip install --no-deps --no-index -q "$f" && echo "installed $f" ;;
    *.tar.gz)
      mkdir -p /tmp/lowbit-peers && tar xzf "$f" -C /tmp/lowbit-peers \
        && for d in /tmp/lowbit-peers/gemlite-*/; do export PYTHONPATH="$PYTHONPATH:${d%/}"; done \
        && echo "gemlite from $f on PYTHONPATH" ;;
  esac
done

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,memory.used,memory.total --format=csv
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

"$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=$?
echo "gpu tests: exit $tests_rc after $(( SECONDS - start )) s"

# leave ~90 s for the method in flight when the budget runs out (the budget is checked
# between shapes and between methods)
budget=$(( SESSION_S - (SECONDS - start) - 90 ))
[ "$budget" -lt 60 ] && budget=60
"$PY" -m lowbit.bench.run --out "$OUT" --budget-s "$budget" "$@" 2>&1 | tee "$OUT/bench.log"
bench_rc=$?
exit $(( tests_rc != 0 || bench_rc != 0 ))
