import json
import os
import sys
import tempfile
from pathlib import Path

# One thread per process, this one and every process a test starts: the tiny models' operations are far
# too small to split, and on a busy 2-core machine OpenMP and OpenBLAS threads waiting for each other made
# small matrix products 13x and scipy's 2048-d square root 3x slower (the golden tokens are the same
# with one thread and with two). Set before numpy and torch start their thread pools.
for name in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ[name] = '1'

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / 'fixtures'
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

torch.set_num_threads(1)
# the weight-digest cache of sample_CoDe.py goes to a throw-away folder, not the user's ~/.cache
os.environ['XDG_CACHE_HOME'] = tempfile.mkdtemp(prefix='code-var-tests-')

import tiny  # noqa: E402


def run_main(script, args):
    """Run a script's main() in this process with these command-line arguments, as the shell would
    (bad input ends in SystemExit(2) with one line on stderr)."""
    from utils.cli import main_guard
    old = sys.argv
    sys.argv = [script.__file__, *args]
    try:
        main_guard(script.main)
    finally:
        sys.argv = old


def user_error(script, args, capsys):
    """Run main() on bad input: it must exit with status 2 and print exactly one line, no traceback.
    Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(script, args)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.count('\n') == 1 and 'Traceback' not in err, err
    return err


@pytest.fixture(scope='session')
def models():
    return tiny.tiny_vae(), tiny.tiny_drafter(), tiny.tiny_refiner()


@pytest.fixture(scope='session')
def checkpoints(tmp_path_factory):
    return tiny.save_checkpoints(tmp_path_factory.mktemp('checkpoints'))


@pytest.fixture(scope='session')
def golden():
    return json.loads((FIXTURES / 'cases.json').read_text()), np.load(FIXTURES / 'expected.npz')


@pytest.fixture
def cheap_decode(monkeypatch):
    """The VQVAE decode, most of a tiny sampling run's time on the CPU, replaced by a cheap picture of the
    features, for tests about tokens, labels and layout rather than pixels (each image still follows its f_hat)."""
    from models import VQVAE

    def decode(self, f_hat):
        return torch.nn.functional.interpolate(f_hat[:, :3].float(), size=256, mode='nearest').sigmoid()
    monkeypatch.setattr(VQVAE, 'decode', decode)
