import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / 'fixtures'
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

torch.set_num_threads(min(2, os.cpu_count() or 1))  # the fixtures were made with 2 threads
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
