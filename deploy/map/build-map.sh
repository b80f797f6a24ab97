#!/usr/bin/env bash
# Build the MONAI Application Package (MAP) of one app with `monai-deploy package`.
#
#   deploy/map/build-map.sh APP [--models DIR] [--tag IMAGE:TAG] [--platform x86_64] [-- PACKAGER ARGS]
#     APP       classify | report | study (the folder apps/APP with __main__.py, app.yaml, requirements.txt)
#     --models  models root holding medsiglip/ and/or medgemma/ to bake into the MAP; without it, mount
#               them at /opt/holoscan/models at run time
#
# Needs: docker with buildx, and the packager: pip install "medgemma-deploy[map-build]" (holoscan-cli
# <= 4.2; later releases dropped `monai-deploy package`). Run from anywhere; paths are resolved
# against the repository root.
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
usage() { echo "usage: $0 classify|report|study [--models DIR] [--tag IMAGE:TAG] [--platform P] [-- ARGS]" >&2; exit 2; }

[ $# -ge 1 ] || usage
app="$1"; shift
case "$app" in classify|report|study) ;; *) usage ;; esac
app_dir="$repo/apps/$app"
[ -f "$app_dir/__main__.py" ] || { echo "$0: $app_dir has no __main__.py yet" >&2; exit 2; }

models=""
version="$(sed -n 's/^  version: *//p' "$app_dir/app.yaml" | head -1)"
tag="medgemma-deploy-$app:${version:-0.1.0}"
platform="x86_64"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --models) models="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --platform) platform="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) usage ;;
  esac
done

command -v monai-deploy >/dev/null 2>&1 || {
  echo "$0: monai-deploy not found: pip install 'holoscan-cli>=4,<=4.2' (the map-build extra)" >&2; exit 2; }
command -v docker >/dev/null 2>&1 || { echo "$0: docker (with buildx) is required to build a MAP" >&2; exit 2; }

# The package itself is not on PyPI: install it (without dependencies; requirements.txt has those)
# into a folder the packager copies to /opt/holoscan/lib, which the MAP puts on PYTHONPATH.
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
python3 -m pip install --quiet --no-deps --target "$stage/lib" "$repo"

args=(package "$app_dir" --config "$app_dir/app.yaml" --add "$stage/lib" --tag "$tag" --platform "$platform")
[ -n "$models" ] && args+=(--models "$models")
echo "+ monai-deploy ${args[*]} ${extra[*]:-}"
monai-deploy "${args[@]}" "${extra[@]}"
echo "built $tag; run it with: monai-deploy run $tag -i INPUT -o OUTPUT  (see deploy/map/README.md)"
