#!/usr/bin/env bash
# Validate docker/compose.yaml with the real Compose CLI, built from source through the Go module proxy.
#
# The Docker engine is not needed: `docker compose config` only parses, interpolates and checks the model
# against the Compose specification. The CLI plugin is built once (a few minutes on 2 cores) into the git-ignored
# .cache/tools/ and reused; the version is pinned below.
#
#   docker/validate.sh            build if needed, then `docker-compose -f docker/compose.yaml config -q`
#   docker/validate.sh --build    only build (prints the binary's path)
#   docker/validate.sh --print    print the resolved model (`config` without -q)
#
# Needs `go` (>= the version named by the compose module's go.mod: 1.26.8 for v5.6.0).
set -euo pipefail

COMPOSE_MODULE="github.com/docker/compose/v5"
COMPOSE_VERSION="${ONRAMP_COMPOSE_VERSION:-v5.6.0}"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# compose.yaml requires ONRAMP_PSEUDONYM_KEY (`${...:?}`: `up` refuses to start without it). `config` only checks the
# model, so a placeholder stands in for it: the check never needs the real key, and --print never shows it.
PLACEHOLDER_KEY="validate-only-placeholder-not-a-pseudonymization-key"
tools_dir="${repo_root}/.cache/tools/compose-${COMPOSE_VERSION}"
binary="${tools_dir}/docker-compose"

build() {
    if [[ -x "${binary}" ]]; then
        return 0
    fi
    command -v go >/dev/null || { echo "error: go not found; install Go to build docker-compose ${COMPOSE_VERSION}" >&2; exit 2; }
    mkdir -p "${tools_dir}"
    # `go install <module>/cmd@<version>` refuses modules whose go.mod has exclude/replace directives (compose
    # has some), so fetch the module source and build it as the main module instead.
    local src
    src="$(GOFLAGS=-mod=mod go mod download -json "${COMPOSE_MODULE}@${COMPOSE_VERSION}" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    [[ -d "${src}" ]] || { echo "error: could not download ${COMPOSE_MODULE}@${COMPOSE_VERSION}" >&2; exit 2; }
    local started=$SECONDS
    (cd "${src}" && CGO_ENABLED=0 GOFLAGS=-mod=readonly nice -n 19 go build -trimpath \
        -ldflags "-s -w -X ${COMPOSE_MODULE}/internal.Version=${COMPOSE_VERSION}" \
        -o "${binary}.tmp" ./cmd)
    mv "${binary}.tmp" "${binary}"
    echo "built ${binary} in $((SECONDS - started))s" >&2
}

case "${1:-}" in
    --build) build; echo "${binary}" ;;
    --print) build; (cd "${repo_root}" && ONRAMP_PSEUDONYM_KEY="${PLACEHOLDER_KEY}" "${binary}" -f docker/compose.yaml config) ;;
    "") build; (cd "${repo_root}" && ONRAMP_PSEUDONYM_KEY="${PLACEHOLDER_KEY}" "${binary}" -f docker/compose.yaml config -q) && echo "docker/compose.yaml: valid (docker compose ${COMPOSE_VERSION})" ;;
    *) echo "usage: $0 [--build|--print]" >&2; exit 2 ;;
esac
