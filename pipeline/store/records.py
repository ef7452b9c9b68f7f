"""The two records at an output's root: its settings and the summary of its last run.

    settings.json                     the settings every video row was made with (pipeline.store.contract)
    run.json                          summary of the last run

settings.json is written whole in one step (a reader sees the old or the new settings, never a part).
"""

from __future__ import annotations

import json

from pipeline.store.filesystem import OutputRoot


class Records(OutputRoot):
    """settings.json and run.json of pipeline.store.storage.OutputStore."""

    # ---- the settings contract (see pipeline.store.contract) -----------------------------------------------------
    SETTINGS_FILE = "settings.json"

    def read_settings(self) -> dict | None:
        return self._read_json(self.SETTINGS_FILE)

    def write_settings(self, settings: dict) -> None:
        """Record the output's settings, whole in one step."""
        self.fs.create_dir(self.path, recursive=True)
        self._replace(f"{self.path}/{self.SETTINGS_FILE}", json.dumps(settings, indent=2).encode())

    # ---- the last run ----------------------------------------------------------------------------------------------
    def write_run_summary(self, summary: dict) -> None:
        self.fs.create_dir(self.path, recursive=True)
        with self.fs.open_output_stream(f"{self.path}/run.json") as out:
            out.write(json.dumps(summary, indent=2, default=str).encode())

    def read_run_summary(self) -> dict | None:
        return self._read_json("run.json")

    def _read_json(self, name: str) -> dict | None:
        """A JSON file at the output root; None when absent."""
        try:
            with self.fs.open_input_stream(f"{self.path}/{name}") as src:
                return json.loads(src.read())
        except FileNotFoundError:
            return None
