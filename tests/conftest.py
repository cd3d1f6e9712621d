"""Test set-up: four simulated CPU devices, configured before JAX is imported anywhere."""

import os

from tests.xla_flags import FAST_COMPILE

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
# Quick XLA:CPU compilation for every test and the subprocesses they start (an XLA_FLAGS of
# your own wins).
os.environ.setdefault("XLA_FLAGS", FAST_COMPILE)
# aurora-train and forecast keep a persistent compilation cache under $XDG_CACHE_HOME: one
# per test session, so tests share it (and exercise it) without touching the user's home.
_SESSION_CACHE = None
if "XDG_CACHE_HOME" not in os.environ:
    import tempfile

    os.environ["XDG_CACHE_HOME"] = _SESSION_CACHE = tempfile.mkdtemp(prefix="aurora-loop-test-cache-")


# Background work (tests/background.py): modules with a start_background_work(tmp_path_factory,
# names) function start their subprocess jobs as soon as collection ends; the scenario matrix's
# tests go last, so that its cells use the idle core while everything else runs.
BACKGROUND_MODULES = ("test_docs", "test_scenarios")  # submission order: the docs' jobs are waited for first


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.module.__name__.endswith("test_scenarios") and item.name.startswith("test_scenario["))


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    names = {}
    for item in session.items:
        names.setdefault(item.module.__name__.rsplit(".", 1)[-1], (item.module, set()))[1].add(item.name)
    for module_name in BACKGROUND_MODULES:
        if module_name in names:
            module, selected = names[module_name]
            # pytest's own fixture object: the jobs' directories live under the session's basetemp.
            module.start_background_work(session.config._tmp_path_factory, selected)


def pytest_sessionfinish(session, exitstatus):
    import shutil

    from tests import background

    background.stop_all()
    if _SESSION_CACHE is not None:  # a few hundred MB of compiled programs per session
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
