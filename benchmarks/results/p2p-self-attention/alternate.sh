# Usage: bash alternate.sh BEFORE_CHECKOUT AFTER_CHECKOUT (e.g. a git worktree of 26fcdf9, and main);
# run from the repository root with the project's venv active. One process per checkout and round,
# alternating, each on one thread timed in CPU time (measure.py); one JSON line per process.
script="$(pwd)/benchmarks/results/p2p-self-attention/measure.py"
for round in 1 2; do
  for tree in "$1" "$2"; do
    echo "$tree $(cd "$tree" && PYTHONPATH="$tree" python "$script" 2>/dev/null | tail -1)"
  done
done
