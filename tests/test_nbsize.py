"The notebook-shrinking step of CI (`.ci/nbsize.py`): what it keeps of a figure."
import base64, importlib.util, io, json
from pathlib import Path
import numpy as np
from PIL import Image

_spec = importlib.util.spec_from_file_location('nbsize', Path(__file__).parents[1]/'.ci'/'nbsize.py')
nbsize = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(nbsize)

def _png(a, mode):
    buf = io.BytesIO(); Image.fromarray(a, mode).save(buf, 'PNG'); return buf.getvalue()

def _pixels(b, mode='L'): return np.asarray(Image.open(io.BytesIO(b)).convert(mode)).astype(int)

def test_grey_keeps_black_and_white():
    rng = np.random.default_rng(0)
    a = np.zeros((64, 64), np.uint8)
    a[8:40, 20:26] = 255                                     # a white stroke on black
    a[48:] = rng.integers(0, 256, (16, 64))                  # and every grey level below it
    out = _pixels(nbsize._shrink_png(_png(a, 'L')))
    assert set(np.unique(out)) <= set(range(0, 256, 51))    # six evenly spaced levels
    assert (out[8:40, 20:26] == 255).all() and out[0, 0] == 0
    assert np.abs(out - a).max() <= 26                       # each pixel to its nearest level

def test_colour_figure_gets_a_small_palette():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    out = nbsize._shrink_png(_png(a, 'RGB'))
    assert len(np.unique(_pixels(out, 'RGB').reshape(-1, 3), axis=0)) <= 32

def test_transparent_figure_untouched():
    a = np.zeros((8, 8, 4), np.uint8); a[..., 3] = 128
    b = _png(a, 'RGBA')
    assert nbsize._shrink_png(b) is b

def test_shrink_drops_duplicate_formats_and_progress_html(tmp_path):
    png = base64.b64encode(_png(np.full((16, 16), 255, np.uint8), 'L')).decode()
    nb = {'cells': [{'cell_type': 'code', 'id': 'x', 'metadata': {}, 'source': [], 'execution_count': 1, 'outputs': [
        {'output_type': 'display_data', 'metadata': {}, 'data': {'image/png': png, 'image/jpeg': png, 'text/plain': ['<Figure>']}},
        {'output_type': 'display_data', 'metadata': {}, 'data': {'text/html': ['<progress value="3" max="10"></progress>']}}]}],
          'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}
    fn = tmp_path/'nb.ipynb'; fn.write_text(json.dumps(nb))
    assert nbsize.report([str(fn)])                           # two formats of one figure, a progress bar: reported
    nbsize.shrink(str(fn))
    outs = json.loads(fn.read_text())['cells'][0]['outputs']
    assert len(outs) == 1 and 'image/jpeg' not in outs[0]['data'] and 'image/png' in outs[0]['data']
    assert not nbsize.report([str(fn)])
