#!/usr/bin/env bash
# The container images of this repository, built and smoke-tested with whichever of docker, podman or buildah
# works here (CONTAINER_TOOL=docker|podman|buildah picks one):
#   launch/container.sh build [--base IMAGE] [--torch-index URL]   ->  images mnist-ddp:train and mnist-ddp:serve
#   launch/container.sh smoke [--base IMAGE]
# build: launch/Dockerfile's two targets; --base and --torch-index become its BASE and TORCH_INDEX.
# smoke: builds both (from a local Debian base made with debootstrap when the default base cannot be pulled),
# then runs inside them: a 2-rank training run and its export (the parity gate runs in the image); the same run
# as two nodes of one rank each, met through the PET_* variables the Kubeflow operators set; and serve_cli on
# launch/samples with that export, in the serve image (where `import torch` must fail) and in the train image.
# One line per check; a non-zero exit when any fails. Its containers, base image and files go on every exit.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TRAIN=mnist-ddp:train
SERVE=mnist-ddp:serve
DEFAULT_BASE=$(sed -n 's/^ARG BASE=//p' "$ROOT/launch/Dockerfile")
# buildah (and podman build) run steps with chroot isolation unless told otherwise: an OCI runtime cannot set
# rlimits in unprivileged sandboxes and some CI runners, and chroot needs nothing of the kernel. BUILDAH_ISOLATION=oci
# restores the default.
export BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"

die() { echo "container.sh: error: $*" >&2; exit 1; }

usage() {  # [WHAT WAS WRONG]
  [[ -z ${1:-} ]] || echo "container.sh: error: $1" >&2
  sed -n '4,5p' "${BASH_SOURCE[0]}" | sed 's/^# */usage: /' >&2
  exit 2
}

pick_tool() {
  if [[ -n "${CONTAINER_TOOL:-}" ]]; then
    case $CONTAINER_TOOL in docker|podman|buildah) ;; *) die "CONTAINER_TOOL=$CONTAINER_TOOL: use docker, podman or buildah";; esac
    command -v "$CONTAINER_TOOL" >/dev/null || die "CONTAINER_TOOL=$CONTAINER_TOOL is not on PATH"
    TOOL=$CONTAINER_TOOL
    return
  fi
  for TOOL in docker podman buildah; do
    command -v "$TOOL" >/dev/null 2>&1 || continue
    [[ $TOOL != docker ]] || docker info >/dev/null 2>&1 || continue  # a docker CLI without its daemon cannot build
    return
  done
  die "no container tool: looked for docker (with a running daemon), podman and buildah; install one" \
      "(apt-get install buildah, or podman, or Docker Engine: https://docs.docker.com/engine/install/)"
}

# build_image TARGET TAG [NAME=VALUE]...: one target of launch/Dockerfile, its build args, tagged only when whole.
build_image() {
  local target=$1 tag=$2 arg
  shift 2
  local args=(-f "$ROOT/launch/Dockerfile" --target "$target" -t "$tag")
  for arg in "$@"; do args+=(--build-arg "$arg"); done
  echo "==> building $tag with $TOOL${*:+ ($*)}" >&2
  local rc=0 previous
  previous=$("$TOOL" images -q "$tag" 2>/dev/null | head -n 1 || true)  # buildah fails on a tag it lacks
  case $TOOL in
    buildah) buildah bud --layers --force-rm "${args[@]}" "$ROOT" || rc=$? ;;  # tags only after its last step
    *) "$TOOL" build --force-rm "${args[@]}" "$ROOT" || rc=$? ;;
  esac
  (( rc == 0 )) || die "building $tag failed at the step shown above (exit $rc); $tag was not tagged by this build"
  # The image this build untagged, unless another tag or a container still uses it (rmi without -f refuses).
  [[ -z $previous || $previous == "$("$TOOL" images -q "$tag" 2>/dev/null | head -n 1 || true)" ]] \
    || "$TOOL" rmi "$previous" >/dev/null 2>&1 || true
}

image_size() { "$TOOL" images --format '{{.Size}}' "$1" | head -n 1; }

build_both() {  # BASE (empty: the Dockerfile's default) TORCH_INDEX
  local base=()
  [[ -z $1 ]] || base=("BASE=$1")
  build_image serve "$SERVE" ${base[@]+"${base[@]}"}
  build_image train "$TRAIN" ${base[@]+"${base[@]}"} ${2:+"TORCH_INDEX=$2"}
}

cmd_build() {
  local base="" index=""
  while (( $# )); do
    case $1 in
      --base) [[ $# -ge 2 && -n $2 ]] || die "--base needs an image, e.g. --base docker.io/library/python:3.11-slim"
              base=$2; shift 2 ;;
      --torch-index) [[ $# -ge 2 && -n $2 ]] || die "--torch-index needs a URL, e.g. https://download.pytorch.org/whl/cu126"
                     index=$2; shift 2 ;;
      *) usage "unknown argument '$1' of build" ;;
    esac
  done
  pick_tool
  build_both "$base" "$index"
  echo "built $TRAIN ($(image_size "$TRAIN")) and $SERVE ($(image_size "$SERVE")) with $TOOL"
}

# --- smoke --------------------------------------------------------------------------------------------------
WORK="" PREFIX="mnist-ddp-smoke-$$" TEMP_IMAGES=()

kill_tree() {  # PID: it and every process below it (a step's timeout, buildah run, torchrun and its workers)
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do kill_tree "$child"; done
  kill "$1" 2>/dev/null || true
}

cleanup() {
  local pid names
  for pid in $(jobs -p); do kill_tree "$pid"; done
  wait 2>/dev/null || true
  case $TOOL in
    buildah) names=$(buildah containers --format '{{.ContainerName}}' 2>/dev/null | grep "^$PREFIX-" || true)
             [[ -z $names ]] || buildah rm $names >/dev/null 2>&1 || true ;;
    *) names=$("$TOOL" ps -a --format '{{.Names}}' 2>/dev/null | grep "^$PREFIX-" || true)
       [[ -z $names ]] || "$TOOL" rm -f $names >/dev/null 2>&1 || true ;;
  esac
  (( ${#TEMP_IMAGES[@]} == 0 )) || "$TOOL" rmi "${TEMP_IMAGES[@]}" >/dev/null 2>&1 || true
  if [[ -n $WORK ]] && ! rm -rf --one-file-system "$WORK" 2>/dev/null; then
    echo "container.sh: warning: could not remove all of $WORK (files of the containers' user): remove it by hand" >&2
  fi
}

# A Debian base with python3, made here: for machines that reach Debian's archive but no image registry.
local_base() {
  local tag="localhost/$PREFIX-base:bookworm" root="$WORK/base/root"
  command -v debootstrap >/dev/null || die "$DEFAULT_BASE cannot be pulled and debootstrap is not installed" \
    "(apt-get install debootstrap), or pass --base IMAGE"
  (( EUID == 0 )) || die "$DEFAULT_BASE cannot be pulled, and making a local base with debootstrap needs root; pass --base IMAGE"
  echo "==> $DEFAULT_BASE cannot be pulled: making a Debian bookworm base with debootstrap" >&2
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" \
    "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" > "$WORK/debootstrap.log" 2>&1 \
    || { tail -n 5 "$WORK/debootstrap.log" >&2; die "debootstrap failed (set DEBIAN_MIRROR to a reachable mirror)"; }
  # This machine's trust store, so that pip in the build reaches the registry as the host does (a TLS-inspecting
  # proxy's CA included); pip's own certificates do not know such a CA, hence PIP_CERT.
  [[ ! -f /etc/ssl/certs/ca-certificates.crt ]] || cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -cf "$WORK/base/rootfs.tar" . && rm -rf "$root"
  printf '%s\n' 'FROM scratch' 'ADD rootfs.tar /' \
    'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    'CMD ["python3"]' > "$WORK/base/Dockerfile"
  TEMP_IMAGES+=("$tag")
  case $TOOL in
    buildah) buildah bud -q -t "$tag" "$WORK/base" >/dev/null ;;
    *) "$TOOL" build -q -t "$tag" "$WORK/base" >/dev/null ;;
  esac
  rm -f "$WORK/base/rootfs.tar"
  BASE=$tag
}

# in_image NAME IMAGE [--entrypoint CMD] [--cpu N] [--env K=V]... [ARG]...: ARGs to the image's own entry point
# (or to CMD), as its own user, on CPU N alone if given, with the smoke folder at /smoke and launch/ at
# /src/launch (read-only); host network.
in_image() {
  local name="$PREFIX-$1" image=$2 entry=() envs=() pin=() cpuset=()
  shift 2
  [[ ${1:-} != --entrypoint ]] || { entry=("$2"); shift 2; }
  [[ ${1:-} != --cpu ]] || { pin=(taskset -c "$2"); cpuset=(--cpuset-cpus="$2"); shift 2; }
  while [[ ${1:-} == --env ]]; do envs+=(--env "$2"); shift 2; done
  local mounts=(-v "$WORK/smoke:/smoke:z" -v "$ROOT/launch:/src/launch:ro,z")  # z: SELinux relabels them
  case $TOOL in
    buildah)
      # buildah run does not apply the image's entry point: read it from the image, as a runtime would.
      (( ${#entry[@]} )) || read -ra entry <<< "$(buildah inspect --type image \
        --format '{{range .OCIv1.Config.Entrypoint}}{{.}} {{end}}' "$image")"
      buildah from --pull=never --name "$name" "$image" >/dev/null
      local rc=0
      # The host's UTS namespace, as docker's --network=host gives: torchrun advertises its hostname, which a
      # container's own name would not resolve to.
      timeout --foreground 600 ${pin[@]+"${pin[@]}"} buildah run --isolation="$BUILDAH_ISOLATION" --uts=host \
        ${envs[@]+"${envs[@]}"} "${mounts[@]}" "$name" -- "${entry[@]}" "$@" || rc=$?
      buildah rm "$name" >/dev/null
      return $rc ;;
    *)
      timeout --foreground 600 "$TOOL" run --rm --name "$name" --network=host --ipc=host ${cpuset[@]+"${cpuset[@]}"} \
        ${envs[@]+"${envs[@]}"} "${mounts[@]}" \
        ${entry:+--entrypoint "${entry[0]}"} "$image" "$@" ;;
  esac
}

PASSED=0 FAILED=0
report() {  # STATUS WHAT STARTED [LOG]
  local status=$1 what=$2 took=$(( SECONDS - $3 ))
  if [[ $status == PASS ]]; then
    PASSED=$((PASSED + 1))
    echo "smoke: PASS  $what (${took} s)"
  else
    FAILED=$((FAILED + 1))
    echo "smoke: FAIL  $what (${took} s)"
    [[ -z ${4:-} || ! -f $4 ]] || tail -n 20 "$4" | sed 's/^/    /'
  fi
}

TRAIN_ARGS=(--data-dir /smoke/data --epochs 1 --val-size 64 --device cpu)
CPUS=()  # two of the CPUs this script may use: the one-node run takes both, each node of the two-node run one

check_train_and_export() {
  local t0=$SECONDS log="$WORK/train.log"
  if in_image train "$TRAIN" --cpu "${CPUS[0]},${CPUS[1]}" --standalone --nproc-per-node=2 -m distributed.train "${TRAIN_ARGS[@]}" \
       --run-dir /smoke/one > "$log" 2>&1 \
     && in_image export "$TRAIN" --entrypoint python -m export --run-dir /smoke/one >> "$log" 2>&1 \
     && in_image verify "$TRAIN" --entrypoint python -m export --verify /smoke/one/export >> "$log" 2>&1; then
    report PASS "1 epoch at 2 ranks in $TRAIN, exported and verified there (the parity gate ran in the image)" $t0
  else
    report FAIL "1 epoch at 2 ranks in $TRAIN, exported and verified there" $t0 "$log"
  fi
}

check_two_nodes() {
  local t0=$SECONDS port rank pids=() ok=1
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # Each node on one of the one-node run's two CPUs: the trainer splits a node's cores between its ranks, so
  # every rank has one thread in both runs, and the two runs must end on the same weights, bit for bit.
  for rank in 0 1; do
    in_image "node$rank" "$TRAIN" --cpu "${CPUS[$rank]}" --env PET_NNODES=2 --env PET_NPROC_PER_NODE=1 \
      --env "PET_NODE_RANK=$rank" --env PET_MASTER_ADDR=127.0.0.1 --env "PET_MASTER_PORT=$port" \
      -m distributed.train "${TRAIN_ARGS[@]}" --run-dir /smoke/two > "$WORK/node$rank.log" 2>&1 &
    pids+=($!)
  done
  for rank in 0 1; do wait "${pids[$rank]}" || ok=0; done
  local same=""
  (( ok )) && same=$(python3 - "$WORK/smoke/one/metrics.json" "$WORK/smoke/two/metrics.json" 2>> "$WORK/node0.log" <<'EOF'
import json, sys
one, two = (json.load(open(p)) for p in sys.argv[1:])
fields = ("world_size", "steps", "replica_weight_sha256")
if all(one[f] == two[f] for f in fields) and len(set(two["replica_weight_sha256"])) == 1:
    print(f"{two['steps']} steps at world size {two['world_size']}, weights sha256 {two['replica_weight_sha256'][0][:12]}")
else:
    sys.exit("the runs differ: " + "; ".join(f"{f} {one[f]} vs {two[f]}" for f in fields))
EOF
  ) || true
  if [[ -n $same ]]; then
    report PASS "2 nodes x 1 rank (torchrun given PET_* alone) = 1 node x 2 ranks: $same" $t0
  else
    report FAIL "2 nodes x 1 rank (torchrun given PET_* alone) = 1 node x 2 ranks" $t0 "$WORK/node0.log"
  fi
}

check_serve() {
  local t0=$SECONDS log="$WORK/serve.log" rows images
  local predict=(predict /src/launch/samples --model /smoke/one/export --format csv)
  # find_spec: absent (exit 0) is told apart from a container that failed to start (exit 1 or more).
  local absent='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ("torch", "distributed")))'
  images=$(find "$ROOT/launch/samples" -maxdepth 1 -type f ! -name '*.py' | wc -l)  # all but make_samples.py
  if in_image serve "$SERVE" "${predict[@]}" --output /smoke/serve.csv > "$log" 2>&1 \
     && in_image serve-in-train "$TRAIN" --entrypoint serve_cli "${predict[@]}" --output /smoke/train.csv >> "$log" 2>&1 \
     && cmp "$WORK/smoke/serve.csv" "$WORK/smoke/train.csv" >> "$log" 2>&1 \
     && rows=$(( $(wc -l < "$WORK/smoke/serve.csv") - 1 )) && (( rows == images )) \
     && in_image no-torch "$SERVE" --entrypoint python -c "$absent" >> "$log" 2>&1; then
    report PASS "$SERVE predicts launch/samples ($rows rows) as $TRAIN does; neither torch nor the trainer is installed there" $t0
  else
    report FAIL "$SERVE predicts launch/samples ($images images) as $TRAIN does, without torch" $t0 "$log"
  fi
}

cmd_smoke() {
  BASE=""
  while (( $# )); do
    case $1 in
      --base) [[ $# -ge 2 && -n $2 ]] || die "--base needs an image"; BASE=$2; shift 2 ;;
      *) usage "unknown argument '$1' of smoke" ;;
    esac
  done
  pick_tool
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/mnist-ddp-smoke.XXXXXX")
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  mkdir -p "$WORK/base" "$WORK/smoke"
  chmod 777 "$WORK/smoke"  # the images run as their own non-root user
  local start=$SECONDS
  read -ra CPUS <<< "$(python3 -c 'import os; c = sorted(os.sched_getaffinity(0)); print(c[0], c[-1])')"
  if [[ -z $BASE ]]; then
    if timeout 120 "$TOOL" pull -q "$DEFAULT_BASE" >/dev/null 2>&1; then BASE=$DEFAULT_BASE; else local_base; fi
  fi
  build_both "$BASE" ""
  report PASS "built $TRAIN ($(image_size "$TRAIN")) and $SERVE ($(image_size "$SERVE")) with $TOOL on $BASE" $start
  in_image data "$TRAIN" --entrypoint python /src/launch/synthetic_mnist.py /smoke/data > "$WORK/data.log" 2>&1 \
    || { cat "$WORK/data.log" >&2; die "could not write the synthetic data inside $TRAIN"; }
  check_train_and_export
  check_two_nodes
  check_serve
  echo "smoke: $PASSED passed, $FAILED failed in $(( SECONDS - start )) s"
  (( FAILED == 0 ))
}

case ${1:-} in
  build) shift; cmd_build "$@" ;;
  smoke) shift; cmd_smoke "$@" ;;
  "") usage ;;
  *) usage "unknown command '$1'" ;;
esac
