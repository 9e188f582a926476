"The README's two commands are the ones CI runs."
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text): return re.findall(r'```bash\n(.*?)```', text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    setup, tests = [b.strip() for b in _bash_blocks((ROOT/'README.md').read_text())][:2]
    ci = (ROOT/'.ci'/'run').read_text()
    assert tests in ci.splitlines(), f'.ci/run must run the README test command: {tests}'
    install = setup.split('&&')[1].strip()         # .venv/bin/pip install -e ".[dev]"
    assert install.replace('pip install', 'pip install --quiet') in ci or install in ci
    assert 'medssm demo' in setup
