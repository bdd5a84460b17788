"""File templates written by ``init`` and ``pipeline new``."""

from __future__ import annotations

__all__ = [
    "PIPELINE_MODULE_TEMPLATE",
    "PIPELINE_YAML_TEMPLATE",
    "PROJECT_README_TEMPLATE",
    "PROJECT_YAML_TEMPLATE",
]

PROJECT_YAML_TEMPLATE = """\
name: {name}

job_queue:
  type: taskiq

adapter:
  hamilton_tracker:
    api_url: ${{HAMILTON_API_URL:-http://localhost:8241}}
    ui_url: ${{HAMILTON_UI_URL:-http://localhost:8242}}
"""

PROJECT_README_TEMPLATE = """\
# {name}

A FlowerPower project. Add a pipeline with `flowerpower-daemon pipeline new NAME`,
run it with `flowerpower-daemon pipeline run NAME`.
"""

PIPELINE_MODULE_TEMPLATE = '''\
"""Pipeline {name}: each function is a node of the Hamilton DAG.

A function's parameters name its inputs: other functions, `params` from
conf/pipelines/{name}.yml, or inputs given at run time.
"""


def values(count: int = 5) -> list[float]:
    """Some numbers to work on (replace with your data source)."""
    return [float(i) for i in range(1, count + 1)]


def scaled(values: list[float], factor: float) -> list[float]:
    """The values times `factor` (set in params)."""
    return [v * factor for v in values]


def total(scaled: list[float]) -> float:
    """The sum of the scaled values."""
    return sum(scaled)


def mean(scaled: list[float]) -> float:
    """The mean of the scaled values."""
    return sum(scaled) / len(scaled) if scaled else 0.0
'''

PIPELINE_YAML_TEMPLATE = """\
run:
  inputs: {{}}
  final_vars: [total, mean]
  config: {{}}
  cache: false
  executor:
    type: local
  max_retries: 0
  retry_delay: 5.0
  jitter_factor: 0.0

schedule: {{}}

params:
  factor: 2.0
"""
