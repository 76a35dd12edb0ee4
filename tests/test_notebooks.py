"""The notebooks in notebooks/ run top to bottom in a real Jupyter kernel (nbclient), in their
tiny setting (DIFFUSION_JAX_NOTEBOOK_TINY=1), and write the figures they promise; the copies in
the repository carry no outputs."""

import pathlib

import nbformat
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, python_env

nbclient = pytest.importorskip('nbclient')

NOTEBOOKS = sorted((ROOT / 'notebooks').glob('*.ipynb'))
# The figures each notebook writes to DIFFUSION_JAX_NOTEBOOK_OUT.
FIGURES = {
    'quickstart': ['forward_process.png', 'loss_curve.png', 'samples.png', 'trajectory.gif'],
    'pretrained': ['ancestral.png', 'ddim.png', 'progressive.png', 'interpolation.png'],
    'guidance_and_editing': ['cfg_sweep.png', 'cfg_accuracy.png', 'sdedit.png'],
}


def test_every_notebook_is_listed_and_stripped():
    assert sorted(p.stem for p in NOTEBOOKS) == sorted(FIGURES)
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == 'code']
        assert all(not c.outputs and c.execution_count is None for c in code), path.name
        assert '%pip install' in code[0].source, f'{path.name}: the first cell installs'
        assert 'DIFFUSION_JAX_NOTEBOOK_TINY' in code[1].source, path.name


@pytest.mark.slow
@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_its_tiny_setting(path, tmp_path, data_dir):
    nb = nbformat.read(path, as_version=4)
    env = python_env(num_devices=2, fast_compiles=True, DIFFUSION_JAX_NOTEBOOK_TINY='1',
                     DIFFUSION_JAX_NOTEBOOK_OUT=str(tmp_path), TFDS_DATA_DIR=data_dir,
                     MPLBACKEND='Agg')
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                     resources={'metadata': {'path': str(tmp_path)}})
    client.execute(env=env)  # Raises CellExecutionError naming the failing cell.
    for name in FIGURES[path.stem]:
        with Image.open(tmp_path / name) as image:
            frames = getattr(image, 'n_frames', 1)
            pixels = np.asarray(image.convert('L'))
        assert pixels.std() > 0, f'{name} is blank'
        if name.endswith('.gif'):
            assert frames >= 20, f'{name}: {frames} frames'
    stdout = ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                     for o in c.outputs if o.get('name') == 'stdout')
    assert 'tiny setting' in stdout


def test_notebook_figures_match_their_names():
    # Every figure a notebook promises is a path it writes (catches a renamed output).
    for path in NOTEBOOKS:
        source = pathlib.Path(path).read_text()
        for name in FIGURES[path.stem]:
            assert f"'{name}'" in source, f'{path.name} does not write {name}'
