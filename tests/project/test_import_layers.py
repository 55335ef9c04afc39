"""The package's imports run one way: down its floors and never in a circle (tools/import_layers.py)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKER = ROOT / "tools" / "import_layers.py"


def check(package: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECKER), str(package)], capture_output=True, text=True,
                          timeout=120, check=False)


def test_the_package_has_no_upward_import_and_no_cycle():
    done = check(ROOT / "iapo_jax")
    assert done.returncode == 0, done.stdout + done.stderr
    assert " upward 0 cycles 0" in done.stdout


def test_the_checker_finds_an_upward_import_and_a_cycle_through_an_init(tmp_path):
    package = tmp_path / "iapo_jax"
    for folder in ("theory", "models"):
        (package / folder).mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "theory" / "__init__.py").write_text("")
    # theory sits below models: an import inside a function still counts.
    (package / "theory" / "curves.py").write_text("def f():\n    from iapo_jax.models.kv_cache import X\n")
    # The package __init__ re-exports a submodule that imports from that __init__.
    (package / "models" / "__init__.py").write_text("from iapo_jax.models.kv_cache import X\n")
    (package / "models" / "kv_cache.py").write_text("from iapo_jax.models import config\nX = 1\n")
    (package / "models" / "config.py").write_text("from . import kv_cache\n")
    done = check(package)
    assert done.returncode == 1
    assert "UP     iapo_jax.theory.curves -> iapo_jax.models.kv_cache" in done.stdout
    assert "CYCLE  iapo_jax.models, iapo_jax.models.config, iapo_jax.models.kv_cache" in done.stdout
