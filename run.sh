#!/usr/bin/env bash
# Set-up and entry points. Idempotent: the venv is (re)installed only when pyproject.toml or
# constraints.txt changed since the last install.
#   ./run.sh repro [dvc repro args]   install, then run the whole default pipeline
#   ./run.sh profile NAME [dvc exp run args]
#                                     install, then the pipeline under profiles/NAME.yaml merged
#                                     over params.yaml, as a DVC experiment (full: the full study)
#   ./run.sh test  [pytest args]      install, then run the test suite (2 processes, one test file
#                                     each at a time: HONES_TEST_PROCESSES=0 runs it in this one)
set -euo pipefail
cd "$(dirname "$0")"
VENV=$(realpath -m "${HONES_VENV:-.venv}")  # absolute: PATH below must not depend on the cwd
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
  # torch and torchvision are pinned exactly (torch==2.14.1 + torchvision==0.29.1: the CUDA build,
  # which runs on a CPU too, and a pair whose operators import together); constraints.txt pins
  # the rest as tested.
  "$VENV/bin/python" -m pip install -q --no-compile -c constraints.txt -e ".[test]"
  # Byte-compiled here on every core: pip compiles one file at a time (about half of the
  # install), and without .pyc files every stage would compile what it imports, each time where
  # PYTHONDONTWRITEBYTECODE is set. Like pip, this ignores the few files of installed packages
  # that do not compile (their Python 2 examples), so its exit status is not checked.
  "$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" > /dev/null || :
  echo "$want" > "$stamp"
}

cmd=${1:-}
shift || true
case "$cmd" in
  repro)
    install
    export PATH="$VENV/bin:$PATH"
    dvc repro "$@"
    ;;
  profile)
    name=${1:?usage: ./run.sh profile NAME [dvc exp run args] (profiles/NAME.yaml)}
    shift
    install
    export PATH="$VENV/bin:$PATH"
    # The profile is checked (keys, schema) before anything runs; one --set-param per line.
    overrides=$(python -m stages.profile "$name")
    mapfile -t args <<< "$overrides"
    dvc exp run -n "$name-$(date -u +%Y%m%d-%H%M%S)" "${args[@]}" "$@"
    echo "profile $name done: reports/hones_report.html, timings/timings.md; dvc exp show lists the run."
    echo "back to the default: git checkout -- params.yaml dvc.lock metrics plots reports timings,"
    echo "then dvc checkout (outputs in your cache) or ./run.sh repro (the rest)"
    ;;
  test)
    install
    export PATH="$VENV/bin:$PATH"
    # Most of the end-to-end tests' time is stage processes starting (imports) one after another:
    # two test files at a time use both cores of a CI machine.
    python -m pytest -n "${HONES_TEST_PROCESSES:-2}" --dist loadfile "$@"
    ;;
  install)
    install
    ;;
  *)
    echo "usage: ./run.sh {repro|profile NAME|test|install} [args...]" >&2
    exit 2
    ;;
esac
