"""How a sweep turns its config into trial configs: grid cells (axes of keys that move together
included) and the trial's seed named in overrides."""
from pathlib import Path

import pytest

from pipelines.core.config import ConfigError, load_config
from pipelines.sweep import SweepConfig, cell_label, job_config

CLAIM = "pipelines/configs/claims/sre2l.yaml"


def test_linked_grid_keys_move_together_and_seed_fills_overrides(tmp_path):
    sweep = load_config(SweepConfig, CLAIM, [f'arms.sre2l=["data.condensed={tmp_path}/recover-seed{{seed}}"]'], False)
    cells = sweep.cells()
    assert len(cells) == 3
    assert cell_label(cells[0]) == "condensed_ipc=1, batch_size=10"
    (tmp_path / "recover-seed3").mkdir()
    _, cfg = job_config(sweep, "sre2l", cells[2], 3, "stamp")
    assert (cfg.data.condensed, cfg.data.condensed_ipc, cfg.train.batch_size) == (
        f"{tmp_path}/recover-seed3", 50, 32)
    assert cfg.seed == 3 and cfg.run_name == "sweep-sre2l-stamp-sre2l-50-32-s3"
    with pytest.raises(ConfigError, match="data.condensed"):  # seed 4's set is not there
        job_config(sweep, "sre2l", cells[2], 4, "stamp")


def test_a_linked_axis_needs_one_value_per_key():
    with pytest.raises(ConfigError, match="one per key"):
        load_config(SweepConfig, CLAIM, ['grid={"data.condensed_ipc, train.batch_size": [[1, 10], [10]]}'], False)


CLAIMS = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "claims"


@pytest.mark.parametrize("path", sorted(str(p) for p in CLAIMS.glob("*.yaml")), ids=lambda p: Path(p).stem)
def test_every_shipped_claim_resolves_every_trial_config(path):
    # a typo in an arm, a grid key or an override fails here, not hours into `make claim-...`
    sweep = load_config(SweepConfig, path, [], False)
    for arm in sweep.arms:
        for cell in sweep.cells():
            try:
                job_config(sweep, arm, cell, sweep.seeds[0], "ci")
            except ConfigError as exc:  # an input the claim's make target builds first (SRe2L's sets)
                if not str(exc).startswith("data.condensed:"):
                    raise
