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

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "setup: need Python >= 3.11"; exit 1; }
[ -x .venv/bin/python ] || python3 -m venv .venv
spec="."
[ -n "$extra" ] && spec=".[$extra]"
.venv/bin/pip install -q --disable-pip-version-check -e "$spec"
# Bytecode now: containerd may run the shim with PYTHONDONTWRITEBYTECODE set, and an editable install
# would then compile every module on every start and delete.
.venv/bin/python -m compileall -q shim >/dev/null
