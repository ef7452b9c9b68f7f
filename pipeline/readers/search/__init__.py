"""Search over the job's output: MaxSim maths (maxsim), text towers (text), the VideoSearch API (index)."""

from pipeline.readers.search.errors import NoTextTowerError, SearchError, SettingsMismatchError
from pipeline.readers.search.index import MODES, Hit, SearchParams, VideoSearch, nearest_to_video
from pipeline.readers.search.maxsim import bases_as_rows, maxsim_scores
from pipeline.readers.search.text import TextTower, load_text_tower

__all__ = ["MODES", "Hit", "NoTextTowerError", "SearchError", "SearchParams", "SettingsMismatchError", "TextTower",
           "VideoSearch", "bases_as_rows", "load_text_tower", "maxsim_scores", "nearest_to_video"]
