"""The Ray Train trainer a run starts (pretrain/launch/trainer.py): the embedded Ray's trainer leaves out the three
cluster-only helper actors and keeps everything else, and the workers' warm-up imports what it is given.
(`tests/test_train.py::test_cli_trains_and_samples` runs the whole embedded start.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import ray.train

from pretrain.launch.trainer import trainer_class


def _callbacks(embedded: bool) -> list[str]:
    trainer = trainer_class(embedded)(train_loop_per_worker=lambda: None,
                                      scaling_config=ray.train.ScalingConfig(num_workers=1))
    return [type(c).__name__ for c in trainer._create_default_callbacks()]


def test_embedded_trainer_drops_only_the_cluster_helpers():
    cluster, embedded = _callbacks(False), _callbacks(True)
    helpers = {"DatasetsCallback", "PlacementGroupCleanerCallback"}
    assert helpers <= set(cluster)  # a remote cluster keeps Ray Train's defaults
    assert not helpers & set(embedded)
    assert embedded == [c for c in cluster if c not in helpers]  # the rest, in Ray Train's order
    assert "BackendSetupCallback" in embedded  # the process group is still Ray Train's


def test_warm_up_imports_on_a_thread_and_wait_returns_when_done():
    code = (
        "import sys, threading; from pretrain.launch import trainer\n"
        "assert 'pretrain.scaling.fit' not in sys.modules\n"
        "trainer.start(('pretrain.scaling.fit',)); trainer.wait()\n"
        "assert 'pretrain.scaling.fit' in sys.modules\n"
        "assert not any(t.name == 'pretrain-warm-up' for t in threading.enumerate())\n"
        "import deepspeed.ops; assert deepspeed.ops.__compatible_ops__['deepspeed_shm_comm'] is False\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def _sees_coordinator(config: dict) -> None:
    """Training function: records whether Ray Train's autoscaling coordinator actor is alive during training."""
    import ray

    try:
        ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        seen = True
    except ValueError:
        seen = False
    with open(config["out"], "w") as f:
        json.dump({"coordinator": seen, "rank": ray.train.get_context().get_world_rank()}, f)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("embedded", [True, False])  # in this order: the coordinator outlives the run that started it
def test_embedded_run_starts_no_autoscaling_coordinator(tmp_path, ray_local, embedded):
    """A fixed-size run on the embedded Ray trains without the coordinator actor; on a cluster (the control,
    which shows the check sees the actor) Ray Train starts it."""
    out = tmp_path / "seen.json"
    trainer = trainer_class(embedded)(
        train_loop_per_worker=_sees_coordinator, train_loop_config={"out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(name=f"embedded-{embedded}", storage_path=str(tmp_path / "ray")))
    trainer.fit()
    assert json.loads(out.read_text()) == {"coordinator": not embedded, "rank": 0}
