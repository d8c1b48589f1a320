#!/usr/bin/env bash
# Entry point for people and CI: sets the machine up (scripts/bootstrap.sh),
# then runs the demo, the tests or the benchmark from the project venv.
set -euo pipefail

REPO="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"

usage() {
    cat <<USAGE
usage: $0 COMMAND [ARGS...]
  demo  [args]         run 'zfast demo' (throw-away namespaces, live stats, failover)
  test  [pytest args]  run the test suite (default args: -q -ra)
  bench [args]         run tools/bench.py
  vmtest [args]        Debian 12's kernel in a VM: packet fixtures and native XDP on
                       virtio-net (zfast.lab.vm; --help for its options; docs/vm.md)
Each command first runs scripts/bootstrap.sh (needs root, Debian); \`test -m unit\`
runs as any user once the venv exists.
USAGE
}

cmd="${1:-}"
(($#)) && shift
case "$cmd" in
    demo)
        bash "$REPO/scripts/bootstrap.sh"
        # no cd: relative paths in the demo's args stay the caller's
        exec "$REPO/.venv/bin/zfast" demo "$@" ;;
    test)
        # The set-up needs root. Without it, once a root run has made the venv, the tests
        # run as they are: `-m unit` passes, what needs root fails saying so (never skips).
        if ((EUID != 0)) && [[ -x $REPO/.venv/bin/python ]]; then
            echo "run.sh: not root, machine set-up skipped" >&2
        else
            bash "$REPO/scripts/bootstrap.sh"
        fi
        cd "$REPO"
        # No args: the whole suite, terse. With args, pytest.ini's testpaths (tests)
        # applies unless they name paths, so `./run.sh test tests/e2e -x` selects.
        (($#)) || set -- tests -q -ra
        exec "$REPO/.venv/bin/python" -m pytest "$@" ;;
    bench)
        bash "$REPO/scripts/bootstrap.sh"
        cd "$REPO"
        exec "$REPO/.venv/bin/python" tools/bench.py "$@" ;;
    vmtest)
        bash "$REPO/scripts/bootstrap.sh"
        cd "$REPO"
        exec nice -n 19 "$REPO/.venv/bin/python" -m zfast.lab.vm "$@" ;;
    -h|--help|help)
        usage ;;
    *)
        usage >&2
        exit 2 ;;
esac
