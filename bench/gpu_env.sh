# Sourced by bench/gpu_check.sh and bench/gpu_quality.sh: the interpreter ($PY), the corpus
# ($CORPUS) and, on the lent GPU machine (no network, no .venv), the wheels that
# bench/gpu_wheelhouse.py packed into .gpu/, installed once under /tmp/charlm-site.
if [ -z "${PY:-}" ]; then [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; fi
CORPUS=${CORPUS:-../shared/data/nietzsche.txt}
if [ -d .gpu/whl ] && [ ! -x .venv/bin/python ]; then  # the lent machine: no .venv there (a CPU host keeps its own)
  if [ ! -f /tmp/charlm-site/.installed ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/charlm-site .gpu/whl/*.whl ||
      { echo "gpu_env: installing .gpu/whl failed"; exit 1; }
    touch /tmp/charlm-site/.installed
  fi
  export PYTHONPATH="/tmp/charlm-site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/charlm-site/bin:$PATH"
  [ -f "$CORPUS" ] || CORPUS=.gpu/nietzsche.txt
fi
export PYTHONUNBUFFERED=1
