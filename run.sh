#!/usr/bin/env bash
# Set-up and entry points. Idempotent: the venv is (re)installed only when pyproject.toml or
# constraints.txt changed since the last install.
#   ./run.sh repro [dvc repro args]   install, then run the whole default pipeline
#   ./run.sh quick [dvc exp run args] install, then the quick tour: the pipeline under
#                                     profiles/quick.yaml, as a DVC experiment (~20 min on 2 cores)
#   ./run.sh test  [pytest args]      install, then run the test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV=${HONES_VENV:-.venv}
PY=${PYTHON:-python3}

install() {
  local stamp want
  want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
  stamp="$VENV/.hones-installed"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch is pinned exactly (torch==2.13.0, a CPU wheel); constraints.txt pins the rest as tested.
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test]"
  echo "$want" > "$stamp"
}

cmd=${1:-}
shift || true
case "$cmd" in
  repro)
    install
    export PATH="$PWD/$VENV/bin:$PATH"
    dvc repro "$@"
    ;;
  quick)
    install
    export PATH="$PWD/$VENV/bin:$PATH"
    # The profile is checked (keys, schema) before anything runs; one --set-param per line.
    overrides=$(python -m stages.profile quick)
    mapfile -t args <<< "$overrides"
    dvc exp run -n "quick-$(date -u +%Y%m%d-%H%M%S)" "${args[@]}" "$@"
    echo "quick tour done: reports/hones_report.html; timings/timings.md. params.yaml now holds the"
    echo "profile (dvc exp show lists the run); back to the default: git checkout params.yaml"
    ;;
  test)
    install
    export PATH="$PWD/$VENV/bin:$PATH"
    python -m pytest "$@"
    ;;
  install)
    install
    ;;
  *)
    echo "usage: ./run.sh {repro|quick|test|install} [args...]" >&2
    exit 2
    ;;
esac
