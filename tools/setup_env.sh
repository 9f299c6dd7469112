#!/usr/bin/env bash
# Build the development environment in .venv from nothing: pinned packages from the registries,
# detectron2 from the `sal-detectron2` wheel (see docs/environment.md), this project editable.
#
# Idempotent: a stamp records a hash of every input; when nothing changed a rerun exits at once.
# Any failing step stops the script with a message naming that step.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
D2_DIST="sal-detectron2==0.7.2"
STAMP="$VENV/.d2_reclass-setup"

fail() { echo "make setup: FAILED at step '$1'. Fix the cause above and rerun 'make setup'." >&2; exit 1; }
step() { echo "==> $1"; }

inputs_hash() {
    cat "$ROOT/requirements/base.txt" "$ROOT/requirements/constraints.txt" "$ROOT/setup.py" \
        "$ROOT/requirements/projects.txt" "$ROOT/tools/setup_env.sh" | sha256sum | cut -d' ' -f1
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(inputs_hash)" ]]; then
    echo "Environment in $VENV is up to date."
    exit 0
fi

command -v "$PYTHON" >/dev/null || { echo "make setup: $PYTHON not found; install Python 3.11." >&2; exit 1; }

step "create virtual environment $VENV"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV" || fail "create venv"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

step "install pinned packages (torch takes about 80 s the first time)"
"${PIP[@]}" install -r "$ROOT/requirements/base.txt" -c "$ROOT/requirements/constraints.txt" \
    || fail "install pinned packages"

if ! "$VENV/bin/python" -c "import detectron2, detectron2.projects.point_rend" 2>/dev/null; then
    step "install detectron2 ($D2_DIST, repacked as a pure-Python wheel)"
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    # The only registry copy of detectron2 ships a _C extension built for CPython 3.10 under a
    # cp310 tag. Its Python code is upstream's; drop the foreign .so and retag it so pip installs
    # it here. detectron2 then runs without compiled ops (torchvision supplies RoIAlign and NMS).
    "${PIP[@]}" download --no-deps --only-binary=:all: --python-version 3.10 "$D2_DIST" -d "$WORK" \
        || fail "download $D2_DIST"
    (
        cd "$WORK"
        "$VENV/bin/python" -m wheel unpack sal_detectron2-*.whl -d unpacked
        rm -f unpacked/*/detectron2/_C*.so
        wheel_file=$(ls unpacked/*/*.dist-info/WHEEL)
        sed -i -e 's/^Root-Is-Purelib:.*/Root-Is-Purelib: true/' -e 's/^Tag:.*/Tag: py3-none-any/' "$wheel_file"
        mkdir -p repacked && "$VENV/bin/python" -m wheel pack unpacked/* -d repacked
    ) || fail "repack $D2_DIST"
    "${PIP[@]}" install "$WORK"/repacked/*.whl -c "$ROOT/requirements/constraints.txt" \
        || fail "install detectron2"
fi

step "install the detectron2 projects the tests use (requirements/projects.txt)"
# --no-deps: their metadata asks for detectron2 by URL and pins conflicting versions (see the
# file); --no-build-isolation: the maskformer2 sdist's setup.py imports the installed torch.
"${PIP[@]}" install --no-deps --no-build-isolation -r "$ROOT/requirements/projects.txt" \
    -c "$ROOT/requirements/constraints.txt" || fail "install projects"

step "install d2_reclass (editable)"
"${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT" || fail "install d2_reclass"

step "check"
# pip check must be clean except for the unmet requirements requirements/projects.txt accepts,
# each on a "# pip-check-accepts: <pip check line>" comment.
accepted="$(sed -n 's/^# pip-check-accepts: //p' "$ROOT/requirements/projects.txt")"
unexpected="$("${PIP[@]}" check | grep -vxF -e "No broken requirements found." \
    -e "${accepted:-No broken requirements found.}" || true)"
[[ -z "$unexpected" ]] || { echo "$unexpected" >&2; fail "pip check"; }
"$VENV/bin/python" -c "import detectron2, d2_reclass; print('detectron2', detectron2.__version__)" \
    || fail "import check"

inputs_hash >"$STAMP"
echo "Environment ready in $VENV."
