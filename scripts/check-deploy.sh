#!/usr/bin/env bash
# check-deploy.sh: validate everything under deploy/, offline once the tools are installed.
#
#   scripts/check-deploy.sh            # from anywhere; prints one line per check, then
#                                      # "N passed, M failed"; exit 1 if anything failed
#
# What it checks:
#   * the kustomize base and the example overlay render (`kubectl kustomize`);
#   * every rendered built-in object against Kubernetes' schemas (kubernetes-validate
#     --strict, for each version in K8S_VERSIONS), and that its kind exists there;
#   * every custom resource (KEDA, Prometheus Operator, k6-operator) against the strict
#     schemas in deploy/schemas/, failing on a custom kind that has no schema;
#   * both Dockerfiles (hadolint), compose.yaml (compose-spec schema, and Debian's
#     docker-compose v1 `config`), the examples (TestRun, GitHub workflow, shell), YAML
#     style (yamllint) and this script (shellcheck);
#   * a self-test: deliberately broken manifests must be rejected, so a validator that
#     silently stopped checking shows up as a failure.
#
# Tools: a Python venv at ${K6_INGEST_CACHE:-$HOME/.cache/k6-ingest}/tools-venv, built from
# deploy/tools-requirements.txt (exact pins) and reused while that file is unchanged.
# kubectl must already be installed (it is not in Debian's archive). docker-compose v1
# and python3-venv are installed with apt-get when missing and running as root.
#
# Knobs: K8S_VERSIONS ("1.30 1.34"), K6_INGEST_CACHE, PYTHON (python3), KUBECTL (kubectl),
#        K6_INGEST_SKIP_COMPOSE_V1=1 to skip the docker-compose v1 check.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CACHE_DIR=${K6_INGEST_CACHE:-$HOME/.cache/k6-ingest}
VENV=$CACHE_DIR/tools-venv
REQUIREMENTS=deploy/tools-requirements.txt
PYTHON=${PYTHON:-python3}
KUBECTL=${KUBECTL:-kubectl}
# The oldest Kubernetes minor the manifests support, and a recent one.
read -r -a K8S_VERSIONS <<<"${K8S_VERSIONS:-1.30 1.34}"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

PASSED=0
FAILED=0
START=$SECONDS

say() { printf '%s\n' "$*"; }

# check NAME COMMAND...: run COMMAND quietly; one PASS/FAIL line, the output on failure.
check() {
    local name=$1
    shift
    local log="$WORK/log"
    if "$@" >"$log" 2>&1; then
        PASSED=$((PASSED + 1))
        say "PASS  $name"
    else
        FAILED=$((FAILED + 1))
        say "FAIL  $name"
        sed -e 's/^/      /' "$log" | tail -n 40
    fi
}

# fail NAME REASON: a check that could not run counts as failed.
fail() {
    FAILED=$((FAILED + 1))
    say "FAIL  $1"
    say "      $2"
}

summary() {
    say "time: $((SECONDS - START)) s"
    say "$PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]
}

APT_UPDATED=0
apt_install() {
    [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null || return 1
    if [ "$APT_UPDATED" -eq 0 ]; then
        apt-get update -qq || return 1
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# --- tools ------------------------------------------------------------------------------

setup_venv() {
    local stamp="$VENV/.requirements.sha256" want
    want=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
    if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] \
        && "$VENV/bin/python" -c 'import yaml, jsonschema, kubernetes_validate' 2>/dev/null; then
        return 0
    fi
    if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
        apt_install python3-venv || { echo "$PYTHON has no venv/ensurepip module"; return 1; }
    fi
    # Called from an `if`, where errexit is off: every step checks its own status.
    rm -rf "$VENV" && mkdir -p "$CACHE_DIR" || return 1
    "$PYTHON" -m venv "$VENV" || return 1
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        -r "$REQUIREMENTS" || return 1
    echo "$want" >"$stamp"
}

if ! setup_venv >"$WORK/setup.log" 2>&1; then
    fail "tools: venv at $VENV" "installing from $REQUIREMENTS failed:"
    sed -e 's/^/      /' "$WORK/setup.log" | tail -n 40
    summary || true
    exit 1
fi
say "tools ready: $VENV ($((SECONDS - START)) s)"
export PATH="$VENV/bin:$PATH"
PY="$VENV/bin/python"
VALIDATE_CRDS=(python deploy/schemas/validate_crds.py)

# --- YAML, schemas ----------------------------------------------------------------------

check "yamllint deploy/" yamllint --strict -c deploy/.yamllint.yaml deploy/
check "schemas: deploy/schemas/*.json are valid JSON Schemas" \
    check-jsonschema --check-metaschema deploy/schemas/*.json

# --- Kubernetes -------------------------------------------------------------------------

render() { "$KUBECTL" kustomize "$1" >"$2"; }

validate_rendered() {
    local label=$1 dir=$2 out=$3 min_crds=$4 version
    if ! command -v "$KUBECTL" >/dev/null; then
        fail "$label: kubectl kustomize $dir" \
            "kubectl not found ($KUBECTL): install it, it provides kustomize; k8s checks not run"
        return
    fi
    check "$label: kubectl kustomize $dir" render "$dir" "$out"
    if [ ! -s "$out" ]; then
        fail "$label: validation" "nothing rendered; k8s checks not run"
        return
    fi
    for version in "${K8S_VERSIONS[@]}"; do
        check "$label: built-in kinds, kubernetes-validate --strict -k $version" \
            kubernetes-validate --strict --quiet --no-warn -k "$version" "$out"
        check "$label: custom resources vs deploy/schemas (kinds known to $version)" \
            "${VALIDATE_CRDS[@]}" --k8s-version "$version" --require "$min_crds" "$out"
    done
}

validate_rendered "k8s base" deploy/k8s/base "$WORK/base.yaml" 3
validate_rendered "k8s overlay example" deploy/k8s/overlays/example "$WORK/overlay.yaml" 3

# Self-test: typos that only strict validation catches must make the validators fail.
self_test() {
    local src=$1 bad="$WORK/broken.yaml"
    "$PY" - "$src" "$bad" <<'PYTHON' || return 1
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
hits = set()
for d in docs:
    if d["kind"] == "Deployment":
        d["spec"]["replica"] = 2                    # typo of `replicas`
        hits.add("Deployment")
    if d["kind"] == "ScaledObject":
        d["spec"]["minReplicaCont"] = 1             # typo of `minReplicaCount`
        hits.add("ScaledObject")
    if d["kind"] == "ServiceMonitor":
        d["spec"]["endpoints"][0]["interval"] = 30  # must be a duration string
        hits.add("ServiceMonitor")
assert hits == {"Deployment", "ScaledObject", "ServiceMonitor"}, hits
yaml.safe_dump_all(docs, open(sys.argv[2], "w"))
PYTHON
    local version=${K8S_VERSIONS[0]} rc=0
    if kubernetes-validate --strict --quiet --no-warn -k "$version" "$bad"; then
        echo "kubernetes-validate accepted spec.replica in a Deployment"
        rc=1
    fi
    local errors
    errors=$("${VALIDATE_CRDS[@]}" "$bad" 2>&1 >/dev/null) && {
        echo "validate_crds.py accepted the broken custom resources"
        rc=1
    }
    for needle in "'minReplicaCont' was unexpected" "interval: 30 is not of type 'string'"; do
        grep -qF "$needle" <<<"$errors" || { echo "missing error: $needle"; rc=1; }
    done
    printf 'apiVersion: example.com/v1\nkind: Unknown\nmetadata: {name: x}\nspec: {}\n' \
        >"$WORK/unknown.yaml"
    if "${VALIDATE_CRDS[@]}" "$WORK/unknown.yaml"; then
        echo "validate_crds.py accepted a custom kind without a schema"
        rc=1
    fi
    return "$rc"
}
if [ -s "$WORK/base.yaml" ]; then
    check "self-test: broken manifests are rejected" self_test "$WORK/base.yaml"
else
    fail "self-test: broken manifests are rejected" "base did not render"
fi

# --- container image --------------------------------------------------------------------

check "hadolint deploy/Dockerfile" hadolint --no-color deploy/Dockerfile
check "hadolint deploy/examples/k6-runner.Dockerfile" hadolint --no-color deploy/examples/k6-runner.Dockerfile

# --- compose ----------------------------------------------------------------------------

check "compose.yaml: compose-spec schema" \
    check-jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml

if [ "${K6_INGEST_SKIP_COMPOSE_V1:-0}" = 1 ]; then
    say "SKIP  compose.yaml: docker-compose v1 config (K6_INGEST_SKIP_COMPOSE_V1=1)"
else
    if ! command -v docker-compose >/dev/null; then
        apt_install docker-compose >"$WORK/apt.log" 2>&1 || true
    fi
    if command -v docker-compose >/dev/null; then
        check "compose.yaml: docker-compose $(docker-compose version --short 2>/dev/null) config -q" \
            docker-compose -f deploy/compose.yaml config -q
    else
        fail "compose.yaml: docker-compose v1 config" \
            "docker-compose not found and apt-get install failed (root needed); set K6_INGEST_SKIP_COMPOSE_V1=1 to skip"
    fi
fi

# --- examples ---------------------------------------------------------------------------

check "examples: k6-testrun.yaml custom resources (TestRun)" \
    "${VALIDATE_CRDS[@]}" --k8s-version "${K8S_VERSIONS[0]}" --require 1 deploy/examples/k6-testrun.yaml
check "examples: k6-testrun.yaml built-in kinds" \
    kubernetes-validate --strict --quiet --no-warn -k "${K8S_VERSIONS[0]}" deploy/examples/k6-testrun.yaml
check "examples: k6-testrun-split.yaml custom resources (TestRun)" \
    "${VALIDATE_CRDS[@]}" --k8s-version "${K8S_VERSIONS[0]}" --require 1 deploy/examples/k6-testrun-split.yaml
check "examples: k6-testrun-split.yaml built-in kinds" \
    kubernetes-validate --strict --quiet --no-warn -k "${K8S_VERSIONS[0]}" deploy/examples/k6-testrun-split.yaml
check "examples: github-actions-k6.yaml (GitHub workflow schema)" \
    check-jsonschema --builtin-schema vendor.github-workflows deploy/examples/github-actions-k6.yaml
check "shellcheck deploy/examples/*.sh scripts/check-deploy.sh" \
    shellcheck deploy/examples/k6-run-and-submit.sh scripts/check-deploy.sh

summary
