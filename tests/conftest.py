"""pytest configuration shared by all minisd tests.

Markers:
- `slow`: full-size CPU checks. Skipped unless `--runslow` is given or `MINISD_SLOW=1` is set
  (`pytest -q tests --runslow`). Selecting them explicitly with `-m slow` also runs them.
- `gpu`: needs a CUDA device; skipped when none is available.
"""
import os
import pytest


def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', default=False, help='run tests marked slow')


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: full-size CPU check, skipped unless --runslow, MINISD_SLOW=1 or -m slow')
    config.addinivalue_line('markers', 'gpu: needs a CUDA device')


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption('--runslow') or os.environ.get('MINISD_SLOW') == '1' or 'slow' in (config.getoption('-m') or '')
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    for item in items:
        if 'slow' in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason='slow: use --runslow or MINISD_SLOW=1'))
        if 'gpu' in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason='gpu: no CUDA device'))


@pytest.fixture(scope='session', autouse=True)
def one_thread():
    "One torch thread per test process: the models here are tiny, and on a small or shared CPU more threads oversubscribe it."
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(int(os.environ.get('MINISD_TEST_THREADS', 1)))
    yield
    torch.set_num_threads(n)
