#!/usr/bin/env bash
# Shared setup: Debian packages when missing, a venv in .venv, the project installed editable into it.
# Usage: tools/setup.sh [extra]   (extra: test, dev … ; default test). Run as root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=${1:-test}

packages=(containerd runc busybox-static)
if [ -n "$extra" ]; then
  # the upstream .proto files the compatibility test compares ours with
  packages+=(golang-github-containerd-containerd-dev golang-github-containerd-cgroups-dev
             golang-github-containerd-ttrpc-dev golang-github-gogo-protobuf-dev
             criu)  # checkpoint tests probe it and skip with the reason when it cannot dump here
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# The Python for .venv: $PYTHON if set, else CPython 3.12 or newer, on PATH or installed by pyenv, else
# python3 (>= 3.11). From 3.12 on the zygote makes its modules' objects immortal, and each shim server
# copies far less of its memory (shim/memory.py). 3.12 first: it starts ~1.5 ms faster than 3.13 here.
pick_python() {
  local pyenv=${PYENV_ROOT:-$HOME/.pyenv}/versions candidates=("${PYTHON:-}")
  [ -n "${PYTHON:-}" ] || candidates=(python3.12 $(ls -d "$pyenv"/3.12*/bin/python3 2>/dev/null | sort -rV)
    python3.14 python3.13 $(ls -d "$pyenv"/3.1[3-9]*/bin/python3 2>/dev/null | sort -rV) python3)
  for c in "${candidates[@]}"; do
    "$c" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && { echo "$c"; return; }
  done
  return 1
}
if [ ! -x .venv/bin/python ]; then
  python=$(pick_python) || { echo "setup: need Python >= 3.11 (PYTHON=${PYTHON:-unset})"; exit 1; }
  echo "setup: .venv with $("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  "$python" -m venv .venv
  # pip 25.1+ writes console scripts without `import re`: ~9 ms off every `start` and `delete`
  .venv/bin/pip install -q --disable-pip-version-check -U pip || echo "setup: pip not upgraded; keeping its own"
fi
spec="."
[ -n "$extra" ] && spec=".[$extra]"
# compat: a plain path in a .pth. The default editable mode installs an import hook that loads pathlib and
# more at every interpreter start (~19 ms per `start` and `delete`).
.venv/bin/pip install -q --disable-pip-version-check -e "$spec" --config-settings editable_mode=compat ||
  .venv/bin/pip install -q --disable-pip-version-check -e "$spec"
# Bytecode now: containerd may run the shim with PYTHONDONTWRITEBYTECODE set, and an editable install
# would then compile every module on every start and delete.
.venv/bin/python -m compileall -q shim >/dev/null
