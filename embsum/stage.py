"""The entry point shared by every stage program (``python -m embsum.train.<stage>``, ``embsum.serve.control``).

A stage is a plain Ray driver: it reads the config (+ dotted overrides), connects to Ray, does its
work and writes a small JSON result (``--result``) that the CLI chains on. Errors at the boundary
are one readable line and a non-zero exit; ``--debug`` (or EMBSUM_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embsum.config import Config, load_config
from embsum.registry import RegistryError

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, ConnectionError, KeyError, RegistryError)


def write_result(path: str | Path | None, result: dict[str, Any]) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(p)


def stage_main(prog: str, doc: str | None, fn: Callable[[Config, argparse.Namespace], dict[str, Any]],
               argv: list[str] | None = None,
               add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=(doc or "").strip().splitlines()[0] if doc else None)
    p.add_argument("--config", default="ray_config.yaml", help="run config (YAML)")
    p.add_argument("--result", default=None, help="write the stage's result JSON here")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    if add_args:
        add_args(p)
    p.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. train.lr=3e-4")
    a = p.parse_intermixed_args(argv)  # options may follow the positionals (`deploy --version 7 k=v`)
    debug = a.debug or os.environ.get("EMBSUM_DEBUG") == "1"
    try:
        cfg = load_config(a.config, a.overrides)
        result = fn(cfg, a)
        write_result(a.result, result)
        return 0
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:  # noqa: BLE001 - a stage must end with one readable line
        if debug:
            traceback.print_exc()
        else:
            print(f"error: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''} "
                  f"(rerun with --debug for the traceback)", file=sys.stderr, flush=True)
        return 1
