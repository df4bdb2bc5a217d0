#!/usr/bin/env bash
# make image / make image-test: build the Dockerfile's two targets with whatever engine runs
# here, and check them as a user would use them. Every failure says why in one line and exits
# non-zero; nothing is skipped.
#
#   bash docker/image.sh build   both targets: $IMAGE:pipeline and $IMAGE:serve
#   bash docker/image.sh test    build, then inside the images: the fast tests, dvc repro on demo
#                                data for one backbone (dvc status clean, files owned by the
#                                invoking user), and the served model answering a POSTed JPEG
#
# Settings (environment or make variables):
#   ENGINE     docker or podman (default: docker when its daemon answers, else podman; as root
#              with apt-get, podman, debootstrap and runc are installed when neither is there)
#   IMAGE      image name (default localhost/agecascade)
#   BASE       base image (default docker.io/library/debian:bookworm-slim; when it cannot be
#              pulled, a bookworm base is made locally with debootstrap + import)
#   WHEELS     a wheelhouse folder given to pip as --find-links (offline builds); without it, the
#              host pip's own file:// indexes (`pip config`) are passed in, so the image takes
#              what the host's pip would take
#   CA_BUNDLE  a CA bundle for TLS-intercepting networks, passed as the build secret `ca`
#              (default: the host pip's `cert` setting, if any); never written into a layer
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
IMAGE=${IMAGE:-localhost/agecascade}
BASE=${BASE:-docker.io/library/debian:bookworm-slim}
LOCAL_BASE=localhost/agecascade-base:bookworm
TEST_SPEC=(tests/test_cli.py tests/test_imaging.py tests/test_crops.py tests/test_nets.py
           tests/test_compute.py tests/test_detect.py tests/test_landmarks.py tests/test_predict.py
           tests/test_registry.py tests/test_serve.py tests/test_features.py)
TEST_BACKBONE=resnet50

die() { echo "make image: $*" >&2; exit 1; }
say() { echo "== $*"; }

install_podman() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    || die "no container engine (docker or podman) here, and no root apt-get to install podman"
  say "installing podman, debootstrap and runc with apt-get"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq podman debootstrap runc >/dev/null \
    || die "apt-get install podman debootstrap runc failed"
}

choose_engine() {
  if [ -z "${ENGINE:-}" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
    else command -v podman >/dev/null || install_podman; ENGINE=podman; fi
  fi
  command -v "$ENGINE" >/dev/null || die "ENGINE=$ENGINE is not installed"
  BUILD_FLAGS=()
  [ "$ENGINE" = podman ] && BUILD_FLAGS+=(--format docker)  # OCI images drop HEALTHCHECK
  say "engine: $($ENGINE --version)"
}

# A sandboxed host (as these development machines are) may refuse crun's or the host's rlimits:
# then the engine gets docker/containers.conf (runc, explicit nofile/nproc), never the host's
# own configuration files.
runs() { timeout 120 "$ENGINE" run --rm "$1" true >/dev/null 2>&1; }
settle_runtime() {
  if [ "$ENGINE" = podman ] && ! runs "$1"; then
    export CONTAINERS_CONF=$ROOT/docker/containers.conf
    runs "$1" || die "podman cannot start a container here, not even with $CONTAINERS_CONF"
    say "podman runs containers with $CONTAINERS_CONF (runc, explicit ulimits)"
  fi
}

local_base() {
  if "$ENGINE" image inspect "$LOCAL_BASE" >/dev/null 2>&1; then return; fi
  command -v debootstrap >/dev/null || { [ "$ENGINE" = podman ] && install_podman; } \
    || die "cannot pull $BASE and debootstrap is not installed to make a base"
  local dir; dir=$(mktemp -d)
  say "$BASE cannot be pulled: debootstrap --variant=minbase bookworm -> $LOCAL_BASE"
  debootstrap --variant=minbase bookworm "$dir" http://deb.debian.org/debian >"$dir.log" 2>&1 \
    || { tail -3 "$dir.log"; die "debootstrap bookworm failed (log $dir.log)"; }
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
  tar -C "$dir" -c . | "$ENGINE" import - "$LOCAL_BASE" >/dev/null || die "$ENGINE import failed"
  rm -rf "$dir" "$dir.log"
}

choose_base() {
  if ! "$ENGINE" image inspect "$BASE" >/dev/null 2>&1 \
      && ! timeout 300 "$ENGINE" pull -q "$BASE" >/dev/null 2>&1; then
    local_base
    BASE=$LOCAL_BASE
  fi
  say "base: $BASE"
  settle_runtime "$BASE"
}

# A setting of the host's pip (its environment first, then its config files), or nothing.
pip_setting() {
  python3 -m pip config list 2>/dev/null | sed -n "s/^\(:env:\|global\)\.$1='\(.*\)'\$/\2/p" | head -1
}

# pip's sources and certificate inside the build, as the host's pip has them.
pip_settings() {
  PIP_FLAGS=()
  if [ -n "${WHEELS:-}" ]; then
    [ -d "$WHEELS" ] || die "WHEELS=$WHEELS is not a folder"
    PIP_FLAGS+=(--build-context "wheels=$(cd "$WHEELS" && pwd)" --build-arg PIP_FIND_LINKS=/wheels)
    say "wheelhouse: $WHEELS (--find-links)"
  else
    local urls; urls=$(pip_setting extra-index-url | tr ' ' '\n' | grep '^file://' || true)
    if [ -n "$urls" ]; then
      local parent inside
      parent=$(python3 -c 'import os,sys; print(os.path.commonpath([u[7:] for u in sys.argv[1:]]))' $urls)
      inside=$(for u in $urls; do echo "file:///wheels${u#file://$parent}"; done | tr '\n' ' ')
      PIP_FLAGS+=(--build-context "wheels=$parent" --build-arg "PIP_EXTRA_INDEX_URL=${inside% }")
      say "the host pip's local indexes: $(echo $urls)"
    fi
  fi
  CA=${CA_BUNDLE:-$(pip_setting cert)}
  if [ -n "$CA" ]; then
    [ -s "$CA" ] || die "CA bundle $CA is missing or empty"
    PIP_FLAGS+=(--secret "id=ca,src=$CA")
    say "CA bundle (build secret, not in any layer): $CA"
  fi
}

build() {
  choose_engine
  choose_base
  pip_settings
  local target start
  for target in serve pipeline; do
    start=$SECONDS
    local command=("$ENGINE" build "${BUILD_FLAGS[@]}" --target "$target" --build-arg "BASE=$BASE"
                   "${PIP_FLAGS[@]}" -t "$IMAGE:$target" .)
    say "${CONTAINERS_CONF:+CONTAINERS_CONF=$CONTAINERS_CONF }$(printf '%q ' "${command[@]}")"
    local log="${TMPDIR:-/tmp}/agecascade-build-$target.log"
    "${command[@]}" > "$log" 2>&1 \
      || { tail -20 "$log"; die "building target $target failed ($log)"; }
    say "$IMAGE:$target built in $((SECONDS - start)) s, $("$ENGINE" image inspect -f '{{.Size}}' "$IMAGE:$target" | awk '{printf "%.2f GB", $1/1e9}')"
    rm -f "$log"
  done
}

image_test() {
  build
  WORK=$(mktemp -d)
  SERVER="agecascade-serve-$$"
  trap '"$ENGINE" rm -f "$SERVER" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
  local work=$WORK name=$SERVER
  local run=("$ENGINE" run --rm --no-healthcheck)

  say "who runs it, and what it holds"
  local uid; uid=$("${run[@]}" "$IMAGE:pipeline" id -u)
  [ "$uid" != 0 ] || die "the pipeline image runs as root"
  [ "$("${run[@]}" "$IMAGE:serve" id -u)" != 0 ] || die "the serve image runs as root"
  "${run[@]}" "$IMAGE:pipeline" sh -c 'test ! -e /workspace/.venv && test ! -e /workspace/.git && test -z "$(ls -A /run/secrets 2>/dev/null)"' \
    || die "the image holds the build machine's .venv, .git or a secret"
  if [ -n "$CA" ]; then
    "${run[@]}" -v "$CA:/tmp/host-ca.pem:ro" \
      "$IMAGE:pipeline" python /workspace/docker/no_host_certificates.py /tmp/host-ca.pem \
      || die "a certificate of the build machine's bundle is in the image"
  fi

  say "a fresh clone of this checkout, owned by the invoking user, mounted at /workspace"
  git clone -q "$ROOT" "$work/checkout"
  local user; user=$(id -u):$(id -g)
  # As root, stand in for a normal user: the checkout and the container get uid 4242, as
  # `--user "$(id -u):$(id -g)"` gives them on a user's machine.
  if [ "$(id -u)" = 0 ]; then user=4242:4242; chown -R "$user" "$work/checkout"; fi
  say "the fast tests inside the pipeline image"
  local shared=()
  [ -d ../shared ] && shared=(-v "$(cd ../shared && pwd):/shared:ro")
  "${run[@]}" --user "$user" -v "$work/checkout:/workspace" "${shared[@]}" "$IMAGE:pipeline" python -m pytest -q -p no:cacheprovider --disable-warnings "${TEST_SPEC[@]}" \
    || die "tests failed inside the image"

  say "dvc repro lopo_b@$TEST_BACKBONE on demo data"
  "${run[@]}" --user "$user" -v "$work/checkout:/workspace" "$IMAGE:pipeline" sh -c "
      set -e
      agecascade demo-data --out data > /dev/null
      dvc commit -q data.dvc < /dev/null
      dvc repro -q lopo_b@$TEST_BACKBONE
      dvc status lopo_b@$TEST_BACKBONE | tee /tmp/status
      grep -q 'up to date' /tmp/status
      agecascade register --candidate models/$TEST_BACKBONE/fgnet_b/metrics.json --no-onnx \
        --out /tmp/registry.json" \
    || die "dvc repro inside the image failed, or dvc status was not clean"
  local foreign
  foreign=$(find "$work/checkout" ! -user "${user%%:*}" -print -quit)
  [ -z "$foreign" ] || die "the container wrote $foreign, not owned by $user"

  say "the serve image on loopback, answering a POSTed JPEG"
  "$ENGINE" run -d --name "$name" --user "$user" --network host -e PORT=18080 2> >(grep -v "systemd connection" >&2) \
    -v "$work/checkout:/mlflow" "$IMAGE:serve" >/dev/null
  local real=()  # a real photo, when ../shared is there, must come back with a detected face
  local photos=(../shared/datasets/fgnet-dev/images/*.JPG)
  [ -f "${photos[0]}" ] && real=("${photos[0]}")
  python3 docker/post_photo.py 18080 "$work/checkout/data/fgnet/images" "${real[@]}" \
    || { "$ENGINE" logs "$name" 2>&1 | tail -20; die "the served model did not answer a POSTed JPEG"; }
  healthy "$name" || die "the serve container's HEALTHCHECK did not pass"
  say "the HEALTHCHECK passes"
  say "image-test passed"
}

# Podman runs HEALTHCHECKs from systemd timers, which a host without systemd lacks: run it once.
healthy() {
  if [ "$ENGINE" = podman ]; then podman healthcheck run "$1" >/dev/null; return; fi
  local i
  for i in $(seq 60); do
    [ "$(docker inspect -f '{{.State.Health.Status}}' "$1")" = healthy ] && return
    sleep 5
  done
  return 1
}

case "${1:-}" in
  build) build ;;
  test) image_test ;;
  *) die "usage: bash docker/image.sh build|test" ;;
esac
