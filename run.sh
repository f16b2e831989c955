#!/usr/bin/env bash
# The one entry point on a fresh Debian machine: installs whatever is missing
# (FFCV's Debian libraries, uv, the locked Python environment), then runs.
#
#   ./run.sh demo [--out DIR]     the whole study (Fashion-MNIST source, generated targets)
#   ./run.sh test [pytest args]   the test suite
#
# Safe to run again: each step checks first and says what it does.
set -euo pipefail
cd "$(dirname "$0")"
say() { echo "[setup] $*"; }

what="${1:-}"
case "$what" in
  demo|test) shift ;;
  *) echo "usage: ./run.sh demo [--out DIR] | ./run.sh test [pytest args]" >&2; exit 2 ;;
esac

# 1. Debian libraries FFCV 1.0.2 compiles against, and Zalando's Fashion-MNIST (the demo's
#    source task, IDX files under /usr/share/datasets/fashion-mnist); for the tests also
#    Chromium, which renders the report page headless.
wanted=(libopencv-dev libturbojpeg0-dev pkg-config dataset-fashion-mnist)
[ "$what" = test ] && wanted+=(chromium)
missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  say "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "Debian packages present: ${wanted[*]}"
fi

# 2. uv, from PyPI.
if command -v uv >/dev/null 2>&1; then
  UV=(uv)
elif python3 -m uv --version >/dev/null 2>&1; then
  UV=(python3 -m uv)
else
  say "installing uv (pip install --user uv)"
  python3 -m pip install --quiet --user uv 2>/dev/null \
    || python3 -m pip install --quiet --user --break-system-packages uv
  UV=(python3 -m uv)
fi
say "uv: $("${UV[@]}" --version)"

# 3. The locked environment (.venv); FFCV builds from source the first time.
#    The tests also build the docs site (mkdocs, the `docs` group).
#    Compiled to bytecode at install: a run starts many Python processes (Ray's workers,
#    MLflow's server), and where PYTHONDONTWRITEBYTECODE is set (as in many containers and
#    CI images) each would otherwise compile torch, Ray and MLflow again as it imports them.
groups=(); [ "$what" = test ] && groups=(--group docs)
say "syncing the locked environment into .venv (uv sync --locked --compile-bytecode ${groups[*]:-})"
"${UV[@]}" sync --locked --quiet --compile-bytecode "${groups[@]}"

if [ "$what" = demo ]; then
  say "running: study demo $*"
  exec "${UV[@]}" run --locked --no-sync study demo "$@"
else
  say "running: pytest $*"
  exec "${UV[@]}" run --locked --no-sync pytest "$@"
fi
