"""`dfserve` command line: serve, api, worker, rollout, models, dataset, train, eval, bench.

Each subcommand parses its flags and delegates to one function elsewhere; heavy imports
(torch, fastapi) happen inside the subcommand so `dfserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args, get_origin

from dfserve.model.config import sampling_types

log = logging.getLogger("dfserve")
OWN_LOGGERS = ("dfserve",)  # what -v turns to DEBUG: dfserve.model, .server, .clients


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(getattr(args, "verbose", False))
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe (`| head`) shows here, not at interpreter exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`dfserve models | head -1`): nothing more can be written.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return user_error(args.command, "the output was closed before the end (broken pipe)")
    except Exception as e:
        if not is_user_error(e):
            raise
        return user_error(args.command, describe_error(e))


def configure_logging(verbose: bool) -> None:
    """INFO for everything; -v turns on DEBUG for dfserve's own loggers only (libraries such
    as PIL or httpx would flood the terminal with theirs)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose:
        for name in OWN_LOGGERS:
            logging.getLogger(name).setLevel(logging.DEBUG)


def is_user_error(e: BaseException) -> bool:
    """Bad values (ValueError), unreadable or unwritable files (OSError), and refusals of a
    dfserve server (the client's DfserveError): the user's to fix, so no traceback."""
    if isinstance(e, (ValueError, OSError)):
        return True
    client = sys.modules.get("dfserve.clients.client")  # never imported: none of its errors
    return client is not None and isinstance(e, client.DfserveError)


def describe_error(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return str(e)


def user_error(command: str, message: str) -> int:
    """One `error:` line on stderr and exit code 2, for every user error of every command."""
    print(f"dfserve {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error style: one line (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dfserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="API + worker + embedded queue in one process")
    _server_flags(p)
    p.add_argument("--max-batch", type=int)
    p.add_argument("--device")
    _dtype_flag(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("api", help="the API alone, against DFSERVE_REDIS_URL")
    _server_flags(p)
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("worker", help="one worker, against DFSERVE_REDIS_URL")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--max-batch", type=int)
    p.add_argument("--model", help="bundle id or folder")
    _dtype_flag(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("rollout", help="generate a video from context frames and actions")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a dfserve server, e.g. http://127.0.0.1:8000")
    where.add_argument("--local", action="store_true", help="run the engine in-process")
    p.add_argument("--model", help="bundle id or folder (default: the packaged default)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--context", nargs="+", type=Path, help="context frames (PNG/JPEG)")
    src.add_argument("--context-video", type=Path, help="context frames from a video")
    src.add_argument("--example", help="a bundled example, see `dfserve models`")
    p.add_argument("--actions", help="comma separated names or indices, one per frame")
    p.add_argument("--frames", type=int)
    _sampling_flags(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--api-key", help="Bearer key for --url (or DFSERVE_API_KEY)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="out.mp4, out.gif, out.webm (by the suffix), or a folder (ending in / "
                        "or without a suffix) for 000.png, 001.png, ...")  # fmt: skip
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("models", help="the bundles this installation can serve")
    p.add_argument("--json", action="store_true", help="the document of GET /v1/models")
    p.add_argument("--models-dir", type=Path, action="append",
                   help="more bundle folders (default: DFSERVE_MODELS_DIR)")
    p.add_argument("--model", help="the default model (default: DFSERVE_MODEL)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("dataset", help="generate training data from a real environment")
    p.add_argument("env", choices=["crafter"])
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--seed-start", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=72,
                   help="render size in pixels; crafter tiles are size // 9 px (72: 8-px tiles)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_dataset)

    p = sub.add_parser("train", help="train a world model (resumable)")
    p.add_argument("--config", default="crafter-cpu-gated",
                   help="a preset name (default: the default model's denoiser)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--heldout", type=Path, help="held-out data for examples")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--objective", choices=["diffusion_forcing", "teacher_forcing"],
                   default="diffusion_forcing")  # fmt: skip
    p.add_argument("--minutes", type=float, help="stop after this wall-clock budget")
    p.add_argument("--steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--clean-history", type=float,
                   help="P(a window's history is nearly clean) (default: the preset's)")
    p.add_argument("--gate-loss", type=float,
                   help="weight of the copy gate's cross-entropy (default: the preset's)")
    p.add_argument("--min-lr-ratio", type=float,
                   help="cosine floor of the lr when --steps is set (1 = constant lr)")
    p.add_argument("--init", type=Path,
                   help="warm start from this bundle's weights (same architecture)")
    p.add_argument("--device")
    p.add_argument("--run-dir", type=Path, help="checkpoints and logs (default: OUT.run)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    p.add_argument("--seed", type=int, help="weight init, data order and noise (default 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is faster on a busy box)")
    p.add_argument("--edge-fill", action="store_true",
                   help="train only the edge fill of --config (model/edge_fill.py) onto the "
                        "--init bundle's denoiser, which stays as it is")  # fmt: skip
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="world-model metrics against the environment")
    p.add_argument("--model", required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("eval"))
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--context", type=int, default=4)
    _sampling_flags(p)
    p.add_argument("--long-frames", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--windows", dest="windows_per_episode", type=int,
                   help="rollout windows per held-out episode (default 2)")
    p.add_argument("--fidelity-episodes", type=int, help="action-fidelity episodes (default 4)")
    p.add_argument("--fidelity-frames", type=int, help="frames per action branch (default 8)")
    p.add_argument("--persistence-contexts", type=int,
                   help="random-move rollouts for the persistence measure (default 8)")
    p.add_argument("--persistence-frames", type=int, help="their length (default 240; 0 = off)")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-batch", type=int, help="rollouts per forward pass (default 32)")
    p.add_argument("--no-video", action="store_true", help="skip the MP4s")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is faster on a busy box)")
    p.add_argument("--update-card", action="store_true",
                   help="write the metrics into the bundle's README.md and eval_grid.png")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="the performance suite")
    p.add_argument("--model")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="fewer frames, for CI")
    p.add_argument("--engine-only", action="store_true", help="skip the service figures")
    p.add_argument("--redis-url", help="the Redis of the service figures (default: "
                   "DFSERVE_REDIS_URL, else redis://127.0.0.1:6379/0)")
    p.add_argument("--device")
    _dtype_flag(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("import", help="turn a research checkpoint into a bundle")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    k = kinds.add_parser("diffusion-forcing",
                         help="a DF v1.5 (buoyancy99/diffusion-forcing) Unet3D checkpoint")
    k.add_argument("checkpoint", type=Path, help="the Lightning .ckpt (read weights-only)")
    k.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    k.add_argument("--config", default="dmlab",
                   help="dmlab, minecraft, or the run's Hydra config.yaml (default dmlab)")
    k.add_argument("--name", help="bundle id (default: the --out folder's name)")
    k.set_defaults(func=cmd_import)
    return parser


DTYPES = ("float32", "bfloat16", "float16")


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    """One flag per sampling setting, made from model.config.SamplingConfig's fields (the
    one list of them): --chunk-size for chunk_size, a Literal's names as the choices. Unset
    flags (None) leave the model's default (model.request.sampling_from)."""
    for name, kind in sampling_types().items():
        kinds = {"choices": get_args(kind)} if get_origin(kind) is Literal else {"type": kind}
        p.add_argument(f"--{name.replace('_', '-')}", help="default: the model's", **kinds)


def _dtype_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=DTYPES, help="weights and KV caches (default: "
                   "bfloat16 on a GPU, float32 on a CPU)")


def _server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", help="bundle id or folder (default: the packaged default)")


def _settings(args: argparse.Namespace) -> Any:
    from dfserve.server.settings import Settings

    overrides = {
        "model": getattr(args, "model", None),
        "device": getattr(args, "device", None),
        "max_batch": getattr(args, "max_batch", None),
        "dtype": getattr(args, "dtype", None),
    }
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def cmd_serve(args: argparse.Namespace) -> int:
    from dfserve.server.serve import run_serve

    run_serve(_settings(args), args.host, args.port)
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from dfserve.server.serve import run_api

    run_api(_settings(args), args.host, args.port)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from dfserve.server.worker import run_worker

    run_worker(_settings(args))
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    from dfserve.server.rollout_cli import check_files, run_local, run_remote

    check_files(args)  # before loading a model or calling a server
    return run_remote(args) if args.url else run_local(args)


def cmd_models(args: argparse.Namespace) -> int:
    from dfserve.server.catalog import Catalog
    from dfserve.server.routes.models import model_list
    from dfserve.server.settings import Settings

    # The server's own catalog and limits, so --json is exactly what GET /v1/models answers.
    flags = {"models_dir": args.models_dir, "model": args.model}
    doc = model_list(Catalog.from_settings(
        Settings(**{k: v for k, v in flags.items() if v is not None})))
    if args.json:
        print(doc.model_dump_json(indent=2, exclude_none=True))
        return 0
    for m in doc.models:
        acts = f"{len(m.actions)} actions" if m.actions is not None else "unconditional"
        print(f"{m.id}{' (default)' if m.default else ''}: {m.resolution}x{m.resolution} @ "
              f"{m.fps} fps, window {m.n_frames} frames, {acts}, "
              f"examples: {', '.join(m.examples) or '-'}")  # fmt: skip
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    from dfserve.model.data.crafter import generate_dataset

    out = generate_dataset(args.out, args.episodes, args.steps, args.seed_start, args.workers,
                           size=args.size)
    print(f"dataset written to {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dfserve.model.train import train_from_cli

    return train_from_cli(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from dfserve.model.evaluate import evaluate_from_cli

    return evaluate_from_cli(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from dfserve.server.bench import run_bench

    return run_bench(args)


def cmd_import(args: argparse.Namespace) -> int:
    from dfserve.model.importers.diffusion_forcing import import_checkpoint

    out = import_checkpoint(args.checkpoint, args.out, args.config, args.name)
    print(f"wrote {out} (serve it: dfserve serve --model {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
