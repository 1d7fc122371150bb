#!/usr/bin/env bash
# One device session on the H200: the GPU tests, the decode benchmark, then the
# matmul benchmark, in ~8 minutes.
#
#   bash scripts/gpu_session.sh                  # default shapes x M 1..8192
#   bash scripts/gpu_session.sh --shapes llama3-8b.gate_up --m 1,16   # arguments go to lowbit.bench.run
#
# Writes into $OUT (the device tool's output folder; /tmp/lowbit-gpu-session elsewhere):
#   env.txt, gpu_tests.log, tune.log, <gpu>.json (tuning cache), decode.json, decode.md,
#   h200.json, h200.md (at most 8 files come back from the device tool)
# The lead copies h200.json, h200.md and decode.* to docs/perf/. The benchmark's
# short table is the last thing printed.
#
# Environment:
#   LOWBIT_COMMIT     the commit to record where the device copy has no .git
#   LOWBIT_SESSION_S  seconds for the whole session (default 480); the benchmark gets
#                     what the tests and the decode run leave, less a margin, as --budget-s
#   LOWBIT_TEST_K     a pytest -k filter for the GPU tests (default: all)
#   LOWBIT_STEPS      which steps to run, in this order (default "tests decode bench";
#                     also "sweep" and "tune": lowbit tune on the benchmark's shapes, whose
#                     cache file is copied to $OUT for kernels/tuned/)
#   LOWBIT_TUNE_SHAPES, LOWBIT_TUNE_RECIPES, LOWBIT_TUNE_M, LOWBIT_TUNE_S: what "tune" covers
#   LOWBIT_WHEELS     folder with an optional gemlite wheel (default: .whl/, git-ignored:
#                     carry it). Without it the gemlite peer is reported as unavailable.
#   PYTHON            the interpreter (default: python, else python3)
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/lowbit-gpu-session}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
SESSION_S="${LOWBIT_SESSION_S:-480}"
STEPS="${LOWBIT_STEPS:-tests decode bench}"
start=$SECONDS
rc=0

for f in "${LOWBIT_WHEELS:-.whl}"/gemlite-*.whl; do
  [ -e "$f" ] && "$PY" -m pip install --no-deps --no-index -q "$f" && echo "installed $f"
done

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,memory.used,memory.total --format=csv
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

case " $STEPS " in *" tests "*)
  "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider --maxfail=10 ${LOWBIT_TEST_K:+-k "$LOWBIT_TEST_K"} 2>&1 \
    | tail -n 40 | tee "$OUT/gpu_tests.log"
  r=$?; rc=$(( rc || r )); echo "gpu tests: exit $r after $(( SECONDS - start )) s" ;;
esac
case " $STEPS " in *" sweep "*)
  "$PY" scripts/sweep_weight_only.py --out "$OUT" --budget-s 150 > "$OUT/sweep.log" 2>&1
  r=$?; rc=$(( rc || r )); sed -n '/== summary ==/,$p' "$OUT/sweep.log"; echo "sweep: exit $r after $(( SECONDS - start )) s" ;;
esac
case " $STEPS " in *" tune "*)
  # the shipped H200 table: the benchmark's and the decode model's shapes
  "$PY" -m lowbit tune --model "${LOWBIT_TUNE_SHAPES:-llama3-8b,llama3-70b.down,smollm2-135m.gate_up,128256x4096}" \
    --recipe ${LOWBIT_TUNE_RECIPES:-a16w4-int-g128 a16w4-mxfp4 a16w8-int8 a8w8-fp8 a8w8-int8} \
    --m "${LOWBIT_TUNE_M:-1,16,128,1024,8192}" \
    --budget-s "${LOWBIT_TUNE_S:-240}" \
    > "$OUT/tune.log" 2>&1
  r=$?; rc=$(( rc || r )); tail -n 3 "$OUT/tune.log"; cp "$HOME"/.cache/lowbit/tuning/*.json "$OUT/" 2>/dev/null
  echo "tune: exit $r after $(( SECONDS - start )) s" ;;
esac
case " $STEPS " in *" bench "*)
  budget=$(( SESSION_S - (SECONDS - start) - 60 ))
  [ "$budget" -lt 60 ] && budget=60
  "$PY" -m lowbit.bench.run --out "$OUT" --budget-s "$budget" "$@" > /tmp/lowbit-bench.log 2>&1
  r=$?; rc=$(( rc || r )); sed -n '/^| shape/,/^$/p' "$OUT/h200.md" | head -n 40; echo "bench: exit $r after $(( SECONDS - start )) s" ;;
esac
case " $STEPS " in *" decode "*)
  "$PY" -m lowbit.bench.decode --out "$OUT" 2>&1 | tee /tmp/lowbit-decode.log | tail -n 12
  r=$?; rc=$(( rc || r )); echo "decode: exit $r after $(( SECONDS - start )) s" ;;
esac
exit $rc
