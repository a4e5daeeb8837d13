# The README's two commands: `make demo` and `make test`.  Both set up .venv (pinned, see
# requirements.txt), build the compiled renderer and landmark predictor and fetch the model assets;
# they are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Model files come from upstream, or from a mirror folder; ../shared/models is used when present.
FG3D_ASSET_MIRROR ?= $(if $(wildcard ../shared/models/beyond3dmm),$(abspath ../shared/models),)
export FG3D_ASSET_MIRROR
SUFFIX := $(shell $(PYTHON) -c "import sysconfig;print(sysconfig.get_config_var('EXT_SUFFIX'))")
EXT := fg3d_blender/render_ext/_raster$(SUFFIX) fg3d_blender/landmark_ext/_ert$(SUFFIX)

.PHONY: demo test test-fast lint setup build assets addon clean

demo: setup
	$(PY) -m fg3d_blender demo -o out

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

setup: $(VENV)/.stamp $(EXT) assets

$(VENV)/.stamp: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(EXT) &: fg3d_blender/render_ext/_raster.pyx fg3d_blender/landmark_ext/_ert.pyx setup.py $(VENV)/.stamp
	$(PY) setup.py -q build_ext --inplace

build: $(EXT)

assets: $(VENV)/.stamp
	$(PY) -m fg3d_blender fetch-assets

addon: setup
	$(PY) build_addon.py --no-wheels

clean:
	rm -rf build dist out fg3d_blender/render_ext/_raster.c fg3d_blender/render_ext/*.so \
		fg3d_blender/landmark_ext/_ert.c fg3d_blender/landmark_ext/*.so
