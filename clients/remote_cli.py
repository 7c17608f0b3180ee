"""`dfserve rollout --url URL ...`: the same options as --local, run by a server through the
Python client, with a live progress bar fed by the frame stream.

-o out.mp4 writes the server's MP4; -o DIR/ (or a path without a suffix) writes the streamed
PNGs as DIR/000.png, 001.png, ... (the server's exact frames); other formats (out.gif,
out.webm) are encoded here from the streamed frames by the caller's `encode`. Errors of the
API (DfserveError) are left to the CLI, which prints them as one `error:` line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dfserve.clients.client import Client
from dfserve.clients.params import RolloutParams

Encode = Callable[[list[bytes], int], None]  # streamed PNGs and fps -> the output file


def request_params(args: argparse.Namespace, sampling: dict[str, Any],
                   actions: list[str | int] | None) -> RolloutParams:  # fmt: skip
    """The rollout() keywords from `dfserve rollout` flags; `sampling` and `actions` come
    parsed by the command (server/rollout_cli.py), which knows the model's sampling fields."""
    params: dict[str, Any] = dict(sampling)
    params |= {"model": args.model, "actions": actions, "frames": args.frames, "seed": args.seed}
    if args.context:
        params["context"] = [Path(p) for p in args.context]
    elif args.context_video:
        params["context_video"] = Path(args.context_video)
    else:
        params["example"] = args.example  # None: the server's rule (its default example)
    return cast(RolloutParams, {k: v for k, v in params.items() if v is not None})


def run_remote(args: argparse.Namespace, kind: str, encode: Encode, sampling: dict[str, Any],
               actions: list[str | int] | None) -> int:  # fmt: skip
    """kind: "frames" (a folder of PNGs), ".mp4" (the server's MP4) or another suffix that
    `encode` writes from the streamed frames."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    console = Console(stderr=True)
    out: Path = args.output
    key = args.api_key or os.environ.get("DFSERVE_API_KEY")
    params = request_params(args, sampling, actions)
    if "example" not in params and "context" not in params and "context_video" not in params:
        with Client(args.url, key) as c:  # --example omitted: the model's first example
            model = c.model(args.model) if args.model else next(
                m for m in c.models() if m.get("default"))
        if not model["examples"]:
            raise ValueError("example: the model has no examples; pass --context or "
                             "--context-video")  # fmt: skip
        params["example"] = model["examples"][0]
    with Client(args.url, key) as client:
        return _run(client, params, out, kind, encode, console)


def _run(client: Client, params: RolloutParams, out: Path, kind: str, encode: Encode,
         console: Console) -> int:
    rollout = client.rollout(**params)
    for note in rollout.notes:
        console.print(f"note: {note}")
    status = rollout.status()
    total = status.progress.frames_total
    to_dir = kind == "frames"
    if to_dir:
        out.mkdir(parents=True, exist_ok=True)
    pngs: list[bytes] = []
    done: dict[str, Any] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=not sys.stderr.isatty()) as progress:
        task = progress.add_task(f"rollout {rollout.id[:8]}", total=total, rate="")
        try:
            for ev in rollout.events(format="png"):
                if ev["type"] == "queued":
                    progress.update(task, description=f"queued (position {ev['position']})")
                elif ev["type"] == "started":
                    progress.update(task, description=f"rollout {rollout.id[:8]}")
                elif ev["type"] == "frame":
                    if to_dir:
                        (out / f"{ev['index']:03d}.png").write_bytes(ev["image"])
                    elif kind != ".mp4":
                        pngs.append(ev["image"])
                    elapsed = progress.tasks[0].elapsed or 0
                    rate = f"{(ev['index'] + 1) / elapsed:.1f} frames/s" if elapsed else ""
                    progress.update(task, completed=ev["index"] + 1, rate=rate)
                elif ev["type"] == "done":
                    done = ev
        except KeyboardInterrupt:
            rollout.cancel()
            console.print(f"cancelled rollout {rollout.id}")
            return 130
    if done.get("status") != "succeeded":
        console.print(f"[red]rollout {rollout.id} {done.get('status')}[/]: "
                      f"{done.get('error') or ''}")  # fmt: skip
        return 1
    if kind == ".mp4":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(rollout.video())
    elif not to_dir:
        encode(pngs, int(status.params["fps"]))
    print(f"{total} frames written to {out} (rollout {rollout.id})")
    return 0
