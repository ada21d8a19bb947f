# Sourced by the launch scripts beside it: the Python that has nftune and verl, first on PATH
# (what `source .venv/bin/activate` does), so that verl's Ray workers run it too.
# Default: the repository's .venv (docs/scale.md's install); NFTUNE_PYTHON=/path/python for
# another.
ROOT="$(cd "$HERE/../.." && pwd)"
if [ -z "${NFTUNE_PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then
        NFTUNE_PYTHON="$ROOT/.venv/bin/python"
    else
        NFTUNE_PYTHON="$(command -v python3)"
    fi
fi
if ! "$NFTUNE_PYTHON" -c "import nftune, verl" 2>/dev/null; then
    echo "$(basename "$0"): $NFTUNE_PYTHON cannot import nftune and verl; install them with" \
         "'python3 -m venv .venv && .venv/bin/pip install -e \".[verl]\"' in $ROOT" \
         "(docs/scale.md), or set NFTUNE_PYTHON" >&2
    exit 1
fi
export PATH="$(dirname "$NFTUNE_PYTHON"):$PATH"
