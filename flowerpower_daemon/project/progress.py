"""Hamilton's tqdm progress bar (``with_adapter.progressbar``), honest about failures.

Hamilton's own :class:`~hamilton.plugins.h_tqdm.ProgressBar` counts a node that
raised as done and ends every run with "Execution Complete!" at 100 %, so a
failed attempt of ``pipeline run`` looked like a success above its error line.
This one leaves a failed node uncounted and ends with "failed in NODE".
Imported only when the bar is wanted (tqdm is the ``progressbar`` extra).
"""

from __future__ import annotations

from typing import Any

from hamilton.plugins import h_tqdm

__all__ = ["ProgressBar"]


class ProgressBar(h_tqdm.ProgressBar):  # type: ignore[misc]
    """Per-node progress that stops where a node failed."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc=desc)
        self._failed: str | None = None

    def run_after_node_execution(
        self, *, node_name: str = "", success: bool = True, **future_kwargs: Any
    ) -> None:
        if success:
            super().run_after_node_execution(**future_kwargs)
        else:
            self._failed = node_name

    def run_after_graph_execution(self, *, success: bool = True, **future_kwargs: Any) -> None:
        bar = self.progress_bar
        if success or bar is None:
            super().run_after_graph_execution(**future_kwargs)
            return
        where = f" in {self._failed}" if self._failed else ""
        bar.set_description_str(f"{self.desc} -> failed{where}")
        bar.set_postfix({})
        bar.close()
        self._failed = None
