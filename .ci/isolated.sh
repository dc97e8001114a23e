# Sourced by .ci/sanitize and .ci/valgrind: build the extension with extra
# compiler flags into a temporary package and run pytest against it.
#
# After `isolated_build "CFLAGS" "LDFLAGS"`: $work (temporary, removed on
# exit), $python (a venv of its own with pytest, so no installed copy of
# apsw_backup -- an editable install, say -- can shadow the build) and
# PYTHONPATH pointing at the built package.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Every such build is also the warnings check: -Wall -Wextra -Werror.
# ISOLATED_API=limited builds against the Limited API, as the wheels are.
isolated_build() {
  local cflags="$1 -Wall -Wextra -Werror" ldflags=$2 full=1
  [ "${ISOLATED_API:-full}" = limited ] && full=0
  ${PYTHON:-python3} -m venv "$work/venv"
  python="$work/venv/bin/python"
  "$python" -m pip install -q --disable-pip-version-check \
    "setuptools>=77" wheel pytest hypothesis
  mkdir -p "$work/pkg"
  cp -r "$root/apsw_backup" "$work/pkg/"
  rm -f "$work"/pkg/apsw_backup/*.so
  (cd "$root" && CFLAGS="$cflags" LDFLAGS="$ldflags" APSW_BACKUP_FULL_API=$full \
     "$python" setup.py -q build_ext -b "$work/build" -t "$work/obj") \
     >"$work/build.log" 2>&1 || { cat "$work/build.log"; return 1; }
  cp "$work"/build/apsw_backup/_apsw_backup*.so "$work/pkg/apsw_backup/"
  export PYTHONPATH="$work/pkg"
}

# Fails unless the tests will import the build made above.
check_loaded() {
  local loaded
  loaded=$(cd "$work" && "$python" -c 'import apsw_backup._apsw_backup as m; print(m.__file__)')
  case "$loaded" in
    "$work"/*) echo "testing the build at $loaded" ;;
    *) echo "FAIL: tests would import $loaded, not the build under test"; return 1 ;;
  esac
}

# pytest from outside the checkout; relative test paths are taken from root,
# and with no test path at all it runs tests/.
# Usage: run_pytest [launcher args...] -- [pytest args...]
run_pytest() {
  local launcher=() args=() a
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do launcher+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  local paths=0
  for a in "$@"; do
    case "$a" in
      -*) args+=("$a") ;;
      /*) args+=("$a"); [ -e "${a%%::*}" ] && paths=1 ;;
      *) if [ -e "$root/${a%%::*}" ]; then args+=("$root/$a"); paths=1; else args+=("$a"); fi ;;
    esac
  done
  # Options only (say -m "not heavy"): the whole suite.
  [ "$paths" = 1 ] || args+=("$root/tests")
  (cd "$work" && "${launcher[@]}" "$python" -m pytest -q -p no:cacheprovider \
     --rootdir "$root" -c "$root/pyproject.toml" "${args[@]}")
}
