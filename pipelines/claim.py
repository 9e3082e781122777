"""The sweep job under the name the distillation claims were first run with.

    python -m pipelines.claim --config pipelines/configs/claims/dot.yaml   # == python -m pipelines.sweep ...
"""
from pipelines.core.config import run_cli
from pipelines.sweep import SweepConfig, main

if __name__ == "__main__":
    run_cli(SweepConfig, main)
