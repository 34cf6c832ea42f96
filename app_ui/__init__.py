"""The LoRA Recycle app's tabs: UI values in, `recycle` calls, UI values out. ``app.py`` assembles them.

One module per tab (`fewshot`, `invert`, `pool`: each lays out its components, wires its events and holds its
handlers; the inversion tab's handlers are in `inversion`, `invert_lora` and `hub_loras`) and the state they share:
`limits`, `errors` (what is shown to the user and how), `settings` (paths, the path policy, the startup defaults)
and `state` (the model cache and the per-session store). Everything that holds memory between requests is bounded:
loaded models (`ModelCache`), per-session state (`SessionStore`: the loaded LoRA and the latest inversion of each of
a few sessions), and the zip files of inversion runs (deleted with their session entry). Errors meant for the user
(`USER_ERRORS`) are shown as they are; anything else is logged and reported as a generic error, and the app keeps
serving.

Imports go one way: ``app.py`` → ``app_ui`` → ``recycle``.
"""

from __future__ import annotations

from .errors import USER_ERRORS, InputError
from .examples import ExampleTask, find_examples, shipped_test_split
from .fewshot import EMPTY_CARDS, FewShot
from .hub_loras import HubLoRAList
from .invert import PRUNING_PRESETS, Inversion
from .limits import (
    INITIAL_CLASSES,
    MAX_CLASSES,
    MAX_FILE_SIZE,
    MAX_IMAGES,
    MAX_INVERT_IMAGES,
    MAX_INVERT_STEPS,
    MAX_POOL_GALLERY,
    RESULT_SESSIONS,
)
from .markup import md_code, md_text
from .pool import PoolBrowser
from .settings import AppSettings, Defaults, PathPolicy, PriorChoice, resolve_defaults
from .state import ModelCache, SessionStore

__all__ = [
    "InputError",
    "AppSettings",
    "Defaults",
    "PathPolicy",
    "ModelCache",
    "SessionStore",
    "FewShot",
    "Inversion",
    "HubLoRAList",
    "PoolBrowser",
    "PriorChoice",
    "ExampleTask",
    "find_examples",
    "shipped_test_split",
    "resolve_defaults",
    "USER_ERRORS",
    "EMPTY_CARDS",
    "INITIAL_CLASSES",
    "MAX_CLASSES",
    "MAX_IMAGES",
    "MAX_FILE_SIZE",
    "MAX_INVERT_IMAGES",
    "MAX_INVERT_STEPS",
    "RESULT_SESSIONS",
    "PRUNING_PRESETS",
    "MAX_POOL_GALLERY",
    "md_code",
    "md_text",
]
