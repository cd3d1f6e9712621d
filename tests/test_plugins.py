"""Callback plugins: ``module:Class`` specs and the ``aurora_loop.callbacks`` entry-point group,
loaded and firing in a real Trainer.fit."""

from __future__ import annotations

import textwrap

import optax
import pytest

from aurora_loop.callbacks import Callback, EarlyStopping
from aurora_loop.data import ArrayLoader
from aurora_loop.errors import UsageError
from aurora_loop.model.batch import stack_samples
from aurora_loop.parallel import make_mesh
from aurora_loop.plugins import ENTRY_POINT_GROUP, entry_point_callbacks, load_callback, load_callbacks
from aurora_loop.tasks.conv import ConvTask
from aurora_loop.trainer import Trainer
from tests.synthetic import make_samples

PLUGIN_SOURCE = textwrap.dedent(
    '''
    from aurora_loop.callbacks import Callback


    class HookLog(Callback):
        """Records the hooks it sees."""

        def __init__(self, tag="plain", every=1):
            self.tag, self.every, self.events = tag, every, []

        @property
        def state_key(self):
            return "HookLog-" + self.tag

        def on_fit_start(self, trainer):
            self.events.append("fit_start")

        def on_step(self, trainer, step, metrics):
            if step % self.every == 0:
                self.events.append(("step", step))

        def on_validate(self, trainer, step, metrics):
            self.events.append(("validate", step, "loss" in metrics))

        def on_epoch_end(self, trainer, epoch, metrics):
            self.events.append(("epoch", epoch))

        def on_sync(self, trainer, step):
            self.events.append(("sync", step))

        def on_fit_end(self, trainer):
            self.events.append("fit_end")


    def not_a_callback():
        return object()
    '''
)


@pytest.fixture()
def plugin_dir(tmp_path, monkeypatch):
    """A module on sys.path and a tiny installed distribution declaring it as an entry point."""
    (tmp_path / "aurora_demo_plugin.py").write_text(PLUGIN_SOURCE)
    dist = tmp_path / "aurora_demo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: aurora-demo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\ndemo_hooklog = aurora_demo_plugin:HookLog\nbroken = aurora_demo_plugin:Missing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_plugins_load_and_their_hooks_fire_in_fit(plugin_dir):
    assert "demo_hooklog" in entry_point_callbacks()
    from_path = load_callback('aurora_demo_plugin:HookLog={"tag": "path"}')
    from_entry_point = load_callback('demo_hooklog={"tag": "ep", "every": 2}')
    example = load_callback('examples.custom_callback:GradNormWatchdog={"threshold": 0.0}')
    assert (from_path.tag, from_entry_point.tag, from_entry_point.every) == ("path", "ep", 2)

    samples = make_samples(12, grid=(8, 16))
    train = ArrayLoader(samples[:8], 2, stack_samples, seed=0)
    val = ArrayLoader(samples[8:], 2, stack_samples, shuffle=False)
    trainer = Trainer([from_path, from_entry_point, example], optimizer=optax.adam(1e-3), max_epochs=1, mesh=make_mesh(1))
    trainer.fit(ConvTask(features=8, depth=2), train, val)

    assert from_path.events == [
        "fit_start", ("step", 1), ("step", 2), ("step", 3), ("step", 4),
        ("validate", 4, True), ("epoch", 0), ("sync", 4), "fit_end",
    ]
    assert from_entry_point.events == ["fit_start", ("step", 2), ("step", 4), ("validate", 4, True), ("epoch", 0), ("sync", 4), "fit_end"]
    assert example.spikes == 4  # every gradient norm exceeds 0
    assert trainer.meta_state()["callbacks"]["GradNormWatchdog"] == {"spikes": 4, "in_a_row": 4}


def test_builtin_callbacks_load_by_spec():
    stopper = load_callback('aurora_loop.callbacks:EarlyStopping={"patience": 7, "monitor": "val/rmse/z500"}')
    assert isinstance(stopper, EarlyStopping) and stopper.patience == 7 and stopper.monitor == "val/rmse/z500"
    assert [type(cb).__name__ for cb in load_callbacks(["aurora_loop.callbacks:ProgressBar", "aurora_loop.callbacks:TerminateOnNaN={}"])] == ["ProgressBar", "TerminateOnNaN"]
    assert isinstance(load_callback("aurora_loop.callbacks:ProgressBar"), Callback)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("nosuch_plugin_name", "no entry point 'nosuch_plugin_name'"),
        ("no_such_module_xyz:Thing", "cannot import module 'no_such_module_xyz'"),
        ("aurora_demo_plugin:Nope", "has no attribute 'Nope'"),
        ("aurora_demo_plugin:HookLog={tag: 1}", "not valid JSON"),
        ("aurora_demo_plugin:HookLog=[1, 2]", "must be a JSON object"),
        ('aurora_demo_plugin:HookLog={"colour": "red"}', "bad keyword arguments"),
        ("aurora_demo_plugin:not_a_callback", "not an aurora_loop.callbacks.Callback"),
        ("a b:c", "not of the form module.path:ClassName"),
        ("broken", "loading entry point 'aurora_demo_plugin:Missing' failed"),
        ('aurora_loop.callbacks:EarlyStopping={"mode": "sideways"}', "rejected its arguments"),
    ],
)
def test_bad_specs_are_one_line_usage_errors(plugin_dir, spec, message):
    with pytest.raises(UsageError, match=message) as info:
        load_callback(spec)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"--callback {spec!r}")
