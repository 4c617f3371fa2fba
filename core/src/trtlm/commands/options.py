"""Click parameter types shared by the commands: every number is range-checked where it is parsed.

A bad value is a click usage error naming the option and the value (``--tp-size 0``), printed by
:func:`trtlm.cli.main` as one ``error:`` line, before any file is read or written.  Only click is
imported here (``trtlm --help`` must not import torch).
"""
from __future__ import annotations

import re

import click

#: >= 1: parallel sizes, workers, batch sizes, lengths, calibration sizes, group sizes.
POSITIVE = click.IntRange(min=1)
#: >= 0: top-k (0 = off), seeds.
NON_NEGATIVE = click.IntRange(min=0)
#: temperature: 0 (greedy) or more.
NON_NEGATIVE_FLOAT = click.FloatRange(min=0.0)
#: a fraction in [0, 1] (SmoothQuant alpha).
UNIT = click.FloatRange(0.0, 1.0)
#: top-p: (0, 1].
TOP_P = click.FloatRange(0.0, 1.0, min_open=True)
#: seconds: > 0.
POSITIVE_FLOAT = click.FloatRange(min=0.0, min_open=True)


class DeviceType(click.ParamType):
    """``cpu``, ``cuda`` or ``cuda:N``: spelling checked here (no torch import); whether the device
    exists is checked by :func:`trtlm.devices.resolve_device` when the command runs."""

    name = "device"

    def convert(self, value, param, ctx):
        from trtlm.devices import check_device_name
        from trtlm.errors import UserError

        try:
            return check_device_name(str(value), flag="")
        except UserError as exc:
            self.fail(str(exc).strip(), param, ctx)


DEVICE = DeviceType()


class TokenIdsType(click.ParamType):
    """Comma-separated token ids, each >= 0 (``1,2,3``)."""

    name = "ids"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        text = str(value)
        parts = [t.strip() for t in text.split(",") if t.strip()]
        if not parts:
            self.fail(f"{text!r}: no token ids", param, ctx)
        ids = []
        for t in parts:
            if not re.fullmatch(r"[+-]?\d+", t):
                self.fail(f"{text!r}: {t!r} is not an integer (expected comma-separated token ids)", param, ctx)
            if int(t) < 0:
                self.fail(f"{text!r}: token id {t} is negative", param, ctx)
            ids.append(int(t))
        return ids


TOKEN_IDS = TokenIdsType()


def check_moe_sizes(tp_size: int, moe_tp_size: int | None, moe_ep_size: int | None) -> None:
    """``--moe-tp-size x --moe-ep-size`` must equal ``--tp-size``: say what was given and what would be valid.

    Only the values the user gave are named (an omitted one is derived from the others).
    """
    from trtlm.errors import UserError

    divisors = [d for d in range(1, tp_size + 1) if tp_size % d == 0]
    valid = ", ".join(map(str, divisors))
    if moe_ep_size is not None and moe_tp_size is not None:
        if moe_tp_size * moe_ep_size != tp_size:
            pairs = ", ".join(f"{tp_size // d}x{d}" for d in divisors)
            raise UserError(f"--moe-tp-size {moe_tp_size} x --moe-ep-size {moe_ep_size} = {moe_tp_size * moe_ep_size}, "
                            f"but it must equal --tp-size {tp_size} (valid moe_tp x moe_ep: {pairs})")
    elif moe_ep_size is not None and tp_size % moe_ep_size:
        raise UserError(f"--moe-ep-size {moe_ep_size} does not divide --tp-size {tp_size} "
                        f"(experts are split over ep ranks inside the tp ranks; valid --moe-ep-size: {valid})")
    elif moe_tp_size is not None and tp_size % moe_tp_size:
        raise UserError(f"--moe-tp-size {moe_tp_size} does not divide --tp-size {tp_size} "
                        f"(valid --moe-tp-size: {valid})")
