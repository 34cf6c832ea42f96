"""Input checks of components: the raw value an API caller sends before Gradio's own processing, which fails with a
generic error on text where a number or a flag is expected: numbers may come as numeric text, and must be finite;
a checkbox takes true or false only. Each error names the field by its label."""

from __future__ import annotations

import math
from typing import Any

import gradio as gr

from .errors import kind_of

__all__ = ["finite", "strict", "finite_number"]


def finite_number(value: Any, label: str) -> float:
    """`value` (a number, or text holding one) as a finite number.

    Raises:
        gr.Error: naming `label`, for anything else (NaN and infinity included).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise gr.Error(
            f"{label} must be a number, got {kind_of(value)}.", title="Invalid setting", print_exception=False
        )
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise gr.Error(
                f"{label} must be a number, got {value[:40]!r}.", title="Invalid setting", print_exception=False
            ) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise gr.Error(f"{label} must be a finite number, got {value}.", title="Invalid setting", print_exception=False)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        value = int(value)
    return value


def finite(component: gr.components.Component) -> gr.components.Component:
    """`component` (a slider or a number box) with its value checked by `finite_number` before Gradio's own
    processing; returns it."""
    original = component.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is None and isinstance(component, gr.Number):
            return original(payload)
        return original(finite_number(payload, component.label or "The value"))

    component.preprocess = preprocess
    return component


def strict(checkbox: gr.Checkbox) -> gr.Checkbox:
    """`checkbox` taking true or false only (the text "false" would otherwise count as ticked); returns it."""
    original = checkbox.preprocess

    def preprocess(payload: Any) -> Any:
        if not isinstance(payload, bool):
            got = f"the text {payload[:40]!r}" if isinstance(payload, str) else kind_of(payload)
            raise gr.Error(
                f"{checkbox.label or 'The checkbox'} must be true or false, got {got}.",
                title="Invalid setting",
                print_exception=False,
            )
        return original(payload)

    checkbox.preprocess = preprocess
    return checkbox
