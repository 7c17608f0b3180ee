"""`dfserve rollout`: in-process (--local) or through a server (--url), same options."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from dfserve.server import video

log = logging.getLogger(__name__)
# -o by suffix; a path ending in "/", an existing folder or no suffix is a folder of PNGs.
ENCODERS = {".mp4": video.encode_mp4, ".gif": video.encode_gif, ".webm": video.encode_webm}


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags given (server/cli.py makes one per SamplingConfig field)."""
    from dfserve.model.request import SAMPLING_FIELDS

    return {k: getattr(args, k) for k in SAMPLING_FIELDS if getattr(args, k, None) is not None}


def parse_actions(text: str | None) -> list[str | int] | None:
    if not text:
        return None
    return [int(a) if a.strip().isdigit() else a.strip() for a in text.split(",") if a.strip()]


def read_context(args: argparse.Namespace, resolution: int) -> np.ndarray | None:
    """uint8 (K, R, R, 3) from --context images or --context-video; None for --example."""
    try:
        if args.context:
            frames = []
            for path in args.context:
                where = f"context: {path}"
                frames.append(video.decode_image(Path(path).read_bytes()))
        elif args.context_video:
            where = f"context_video: {args.context_video}"
            frames = video.decode_video(Path(args.context_video).read_bytes())
        else:
            return None
    except ValueError as e:  # name the file: "context: b.png: input is not a decodable image"
        raise ValueError(f"{where}: {e}") from e
    return np.stack([video.resize_frame(f, resolution) for f in frames])


def output_kind(out: Path) -> str:
    """"frames" (a folder of PNGs) or the suffix of a video format dfserve writes; a
    ValueError naming the accepted ones for anything else (never MP4 bytes in a .gif)."""
    if str(out).endswith(os.sep) or out.is_dir() or not out.suffix:
        return "frames"
    if out.suffix.lower() not in ENCODERS:
        raise ValueError(f"output: {out.suffix!r} is not a format dfserve writes; accepted: "
                         f"{', '.join(ENCODERS)}, or a folder (ending in /) for PNGs")
    return out.suffix.lower()


def check_files(args: argparse.Namespace) -> None:
    """Refuse a missing input file or an unknown output format before any work is done."""
    output_kind(args.output)
    inputs = [("context", p) for p in args.context or []]
    inputs += [("context_video", args.context_video)] if args.context_video else []
    for flag, path in inputs:
        if not Path(path).is_file():
            raise ValueError(f"{flag}: {path}: no such file")


def write_output(frames: list[np.ndarray], out: Path, fps: int) -> None:
    kind = output_kind(out)
    if kind == "frames":
        out.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames):
            (out / f"{i:03d}.png").write_bytes(video.encode_png(frame))
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(ENCODERS[kind](frames, fps))


def run_local(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from dfserve.model.bundle import load_bundle, resolve_bundle
    from dfserve.model.request import prepare
    from dfserve.model.rollout import RolloutEngine

    bundle = load_bundle(resolve_bundle(args.model))
    context = read_context(args, bundle.config.network.resolution)
    actions = parse_actions(args.actions)
    context_actions: list[str | int] | None = None
    if context is None:
        examples = bundle.examples()
        name = args.example or next(iter(examples), None)
        if name not in examples:
            raise ValueError(f"example: {name!r} is not one of {sorted(examples)}")
        ex = examples[name]
        context, context_actions = ex.context, list(ex.context_actions)
        actions = actions or list(ex.actions)
    prepared = prepare(bundle.config, context, actions, args.frames, sampling_overrides(args),
                       args.seed, context_actions)  # fmt: skip
    log.debug("rollout of %s: %d frames, %s, seed %d", bundle.config.name,
              prepared.request.frames, prepared.request.sampling, args.seed)
    for note in prepared.notes:
        print(f"note: {note}")
    engine = RolloutEngine(bundle, device=args.device)
    frames = []
    with Progress(transient=True) as progress:
        task = progress.add_task("rolling out", total=prepared.request.frames)
        for _, frame in engine.rollout(prepared.request):
            frames.append(video.frames_to_uint8(frame.cpu()))
            progress.advance(task)
    write_output(frames, args.output, bundle.config.data.fps)
    print(f"{len(frames)} frames written to {args.output}")
    return 0


def run_remote(args: argparse.Namespace) -> int:
    from dfserve.clients.remote_cli import run_remote as remote

    def encode(pngs: list[bytes], fps: int) -> None:  # -o x.gif / x.webm from the stream
        write_output([video.decode_image(p) for p in pngs], args.output, fps)

    return remote(args, output_kind(args.output), encode, sampling_overrides(args),
                  parse_actions(args.actions))
