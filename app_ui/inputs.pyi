"""Input components that check the raw value an API caller sends before Gradio's own processing, which fails with a
generic error on text where a number or a flag is expected: numbers may come as numeric text, and must be finite;
a checkbox takes true or false only. Each error names the field by its label."""
from __future__ import annotations

import math
from typing import Any

import gradio as gr

from .errors import kind_of

__all__ = ["FiniteNumber", "FiniteSlider", "StrictCheckbox", "finite_number"]


def finite_number(value: Any, label: str) -> float:
    """`value` (a number, or text holding one) as a finite number.

    Raises:
        gr.Error: naming `label`, for anything else (NaN and infinity included).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise gr.Error(f"{label} must be a number, got {kind_of(value)}.", title="Invalid setting",
                       print_exception=False)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise gr.Error(f"{label} must be a number, got {value[:40]!r}.", title="Invalid setting",
                           print_exception=False) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise gr.Error(f"{label} must be a finite number, got {value}.", title="Invalid setting",
                       print_exception=False)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 63:
        value = int(value)
    return value

from gradio.events import Dependency

class FiniteSlider(gr.Slider):
    """`gr.Slider` whose value must be a finite number (numeric text is read as its number)."""

    def get_block_name(self) -> str:
        return "slider"

    def preprocess(self, payload: Any) -> Any:
        return super().preprocess(finite_number(payload, self.label or "The value"))
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class FiniteNumber(gr.Number):
    """`gr.Number` whose value must be a finite number (numeric text is read as its number)."""

    def get_block_name(self) -> str:
        return "number"

    def preprocess(self, payload: Any) -> Any:
        if payload is None:
            return super().preprocess(payload)
        return super().preprocess(finite_number(payload, self.label or "The value"))
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class StrictCheckbox(gr.Checkbox):
    """`gr.Checkbox` that takes true or false only (the text "false" would otherwise count as ticked)."""

    def get_block_name(self) -> str:
        return "checkbox"

    def preprocess(self, payload: Any) -> Any:
        if not isinstance(payload, bool):
            got = f"the text {payload[:40]!r}" if isinstance(payload, str) else kind_of(payload)
            raise gr.Error(f"{self.label or 'The checkbox'} must be true or false, got {got}.",
                           title="Invalid setting", print_exception=False)
        return super().preprocess(payload)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component