"""The rollout engine: context -> frames, chunk by chunk, many rollouts per forward pass.

Dimensions: B rollouts in a forward, A frames in the forward, h frames in a chunk, C channels,
R resolution, N tokens per frame, L layers, Hd heads, d head dim.

Semantics (the "recompute" reference, what the research code does at every denoising row):
a rollout is cut into chunks of `chunk_size` frames; chunk k sees the last
`n_frames - chunk_size` finished frames as history. At each row of the scheduling matrix the
network sees history + chunk; history frames and chunk frames that are already clean sit at the
context level (relabelled, or really noised once with the rollout's generator), the others at
their row's level. The chunk frames move one row with the per-frame sampler.

The KV cache is an exact shortcut for that: attention is block-causal, so a frame whose input
and all earlier inputs are fixed has fixed keys/values. A forward starts at the first frame not
yet cached and ends at the last moving frame; finished frames at its front are committed to the
cache as a side effect (that is the "one pass at the context level"). When the history window
slides, its first frame changes and every cached key with it, so the cache is rebuilt by
including the whole history in the next forward — once per chunk, not once per row.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from dfserve.model.bundle import Bundle
from dfserve.model.config import SamplingConfig
from dfserve.model.edge_fill import EdgeFill
from dfserve.model.frame_stack import (
    check_context_frames,
    frame_stack,
    max_context_frames,
    stack,
    stacked_count,
    unstack,
)
from dfserve.model.network import BatchKV
from dfserve.model.samplers import SamplerState, draw_noise, sampler_step
from dfserve.model.scheduling import scheduling_matrix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutRequest:
    context: Tensor  # (K, C, R, R) float in [-1, 1]
    actions: tuple[int, ...]  # one per generated frame: actions[i] produces generated frame i
    sampling: SamplingConfig
    seed: int = 0
    context_actions: tuple[int, ...] | None = None  # the actions that produced the context frames

    @property
    def frames(self) -> int:
        return len(self.actions)


class KVCache:
    """One rollout's keys/values, preallocated for a whole window: (L, n_frames*N, Hd, d)."""

    def __init__(self, layers: int, tokens: int, heads: int, head_dim: int, like: Tensor):
        self.keys = like.new_zeros(layers, tokens, heads, head_dim)
        self.values = like.new_zeros(layers, tokens, heads, head_dim)
        self.start = 0  # global index of the first cached frame
        self.end = 0  # one past the last cached frame

    def reset(self, start: int) -> None:
        self.start = self.end = start


@dataclass
class RolloutState:
    """Everything one rollout carries between rows; the engine itself is stateless.

    Frames here are the network's: with frame_stack k (model/frame_stack.py) each holds k
    single frames, and only `emitted` and the request count single frames."""

    request: RolloutRequest
    generator: torch.Generator
    inputs: list[Tensor]  # network input of finished frames from `dropped` on (context level)
    clean: list[Tensor]  # the same finished frames, clean
    frame_actions: list[int]  # conditioning action of every frame, context included
    n_context: int
    cache: KVCache | None
    # the chunk being generated
    chunk_start: int = 0
    chunk_x: Tensor | None = None  # (h, C, R, R)
    chunk_clean: list[Tensor | None] = field(default_factory=list)
    chunk_inputs: list[Tensor | None] = field(default_factory=list)
    matrix: np.ndarray | None = None
    row: int = 0
    sampler_state: SamplerState = field(default_factory=SamplerState)
    emitted: int = 0  # generated single frames handed out so far
    rows_done: int = 0
    dropped: int = 0  # finished frames forgotten: out of the window and handed out
    stack: int = 1  # single frames per network frame (frame_stack)

    @property
    def finished(self) -> int:
        """Global index one past the last finished frame before the current chunk."""
        return self.dropped + len(self.clean)

    @property
    def total_frames(self) -> int:
        return self.n_context + stacked_count(self.request.frames, self.stack)

    @property
    def next_to_emit(self) -> int:
        """Global index of the network frame that holds the next single frame to hand out."""
        return self.n_context + self.emitted // self.stack

    @property
    def done(self) -> bool:
        return self.emitted >= self.request.frames


@dataclass
class _Forward:
    """What one rollout contributes to a batched forward pass."""

    state: RolloutState
    first: int  # global index of the first frame in the forward
    x: Tensor  # (A, C, R, R)
    levels: Tensor  # (A,)
    actions: Tensor  # (A,)
    use_cache: bool
    before: Tensor | None = None  # input of frame first-1 when it is inside the window


_Commit = tuple[_Forward, list[Tensor], list[Tensor]]  # keys/values per layer, to cache


@dataclass
class _Undo:
    """What `step` may change in one rollout, taken before it, put back if it raises: the
    fields (lists copied, since steps extend and trim them in place), the generator's
    position, and the cache's span (keys written past its end are never read)."""

    state: RolloutState
    fields: dict[str, object]
    generator: Tensor
    cache_span: tuple[int, int] | None

    @classmethod
    def take(cls, st: RolloutState) -> _Undo:
        fields = {k: list(v) if isinstance(v, list) else v for k, v in vars(st).items()}
        span = (st.cache.start, st.cache.end) if st.cache is not None else None
        return cls(st, fields, st.generator.get_state(), span)

    def restore(self) -> None:
        vars(self.state).update(self.fields)
        self.state.generator.set_state(self.generator)
        if self.state.cache is not None and self.cache_span is not None:
            self.state.cache.start, self.state.cache.end = self.cache_span


class RolloutEngine:
    def __init__(self, bundle: Bundle, device: str | torch.device = "cpu", use_cache: bool = True):
        self.bundle = bundle
        self.device = torch.device(device)
        self.net = bundle.network.to(self.device).eval()
        # The network runs in its weights' dtype (bfloat16/float16 for speed, float32, or
        # float64 in the exactness tests); its KV caches are kept in that dtype. The sampler's
        # state (noisy frames, x0, the dpmpp_2m history) stays at least float32: rounding it
        # to 8 bits of mantissa at every row would compound over a long rollout.
        self.net_dtype = next(self.net.parameters()).dtype
        self.dtype = torch.float64 if self.net_dtype == torch.float64 else torch.float32
        self.schedule = bundle.schedule
        self.cfg = bundle.config
        # A network whose frames see only earlier frames (the DiT) can cache keys/values and
        # run only the frames that matter; one that is not causal in time (the research code's
        # U-Net: GroupNorm spans the window) recomputes the whole window at every row.
        self.causal: bool = getattr(self.net, "causal", True)
        self.use_cache = use_cache and self.causal
        self.window = self.cfg.network.max_frames
        # frame_stack: the loop runs on stacked frames; requests and outputs are single frames
        self.stack = frame_stack(self.cfg)

    # --- public API ------------------------------------------------------------------------

    def bytes_per_rollout(self) -> int:
        """Memory one live rollout needs at most: its preallocated KV cache, its window of
        frames (inputs + clean + chunk), and its share of a row's activations (the largest
        forward is a window rebuild: every frame, every layer's keys/values and MLP)."""
        n = self.cfg.network
        word = torch.finfo(self.net_dtype).bits // 8
        tokens = self.window * n.tokens_per_frame
        cache = 2 * n.depth * tokens * n.width * word
        frames = 3 * self.window * n.channels * n.resolution**2 * word
        activations = tokens * n.width * (4 + int(n.mlp_ratio)) * word + tokens * tokens * word
        return cache + frames + activations

    def max_batch_for(self, budget_bytes: int) -> int:
        """How many rollouts fit a memory budget (at least one)."""
        return max(1, budget_bytes // self.bytes_per_rollout())

    def start(self, request: RolloutRequest) -> RolloutState:
        """Validate a request and build its state (noising context frames in 'noised' mode)."""
        self.validate(request)
        s = request.sampling
        gen = torch.Generator(device="cpu").manual_seed(request.seed)
        ctx_actions = request.context_actions or (self.net.null_action,) * len(request.context)
        context = stack(request.context.to(self.device, self.dtype), self.stack)
        inputs = [self._context_input(frame, s, gen) for frame in context]
        cache = None
        if self.use_cache:
            n = self.cfg.network
            tokens = self.window * n.tokens_per_frame
            like = context.to(self.net_dtype)
            cache = KVCache(n.depth, tokens, n.heads, n.width // n.heads, like)
        return RolloutState(
            request=request,
            generator=gen,
            inputs=inputs,
            clean=list(context),
            frame_actions=list(ctx_actions) + list(request.actions),
            n_context=len(context),
            cache=cache,
            stack=self.stack,
        )

    def validate(self, request: RolloutRequest) -> None:
        net, s, k = self.cfg.network, request.sampling, self.stack
        s.validate(self.window, self.cfg.diffusion.timesteps)
        shape = (net.channels // k, net.resolution, net.resolution)
        if request.context.dim() != 4 or tuple(request.context.shape[1:]) != shape:
            raise ValueError(f"context: frames must be {shape}, got {tuple(request.context.shape)}")
        check_context_frames(len(request.context), k)
        if not 1 <= len(request.context) // k <= self.window - s.chunk_size:
            most = f"n_frames - chunk_size = {self.window - s.chunk_size}"
            if k > 1:  # the window and chunks count stacked frames
                most = ("(n_frames - chunk_size) x frame_stack = "
                        f"{max_context_frames(self.cfg, s.chunk_size)}")
            raise ValueError(f"context: {len(request.context)} frames; between {k} and {most} "
                             "are accepted")  # fmt: skip
        if request.frames < 1:
            raise ValueError("frames: must be >= 1")
        all_actions = list(request.actions) + list(request.context_actions or ())
        bad = [a for a in all_actions if not 0 <= a <= net.n_actions]
        if bad:
            raise ValueError(f"actions: {bad[:3]} outside [0, {net.n_actions - 1}]")
        if request.context_actions is not None and len(request.context_actions) != len(
            request.context
        ):
            raise ValueError("context_actions: need one per context frame")

    def extend(self, state: RolloutState, actions: list[int]) -> None:
        """Append actions (one more frame each) to a live rollout: interactive play.

        A chunk is planned from the actions known when it starts, so with chunk_size 1 the
        frames equal those of a rollout given every action up front (a test); with larger
        chunks a short extension makes a shorter chunk."""
        n = self.cfg.network.n_actions
        bad = [a for a in actions if not 0 <= a <= n]
        if bad:
            raise ValueError(f"actions: {bad[:3]} outside [0, {n - 1}]")
        state.request = replace(state.request, actions=state.request.actions + tuple(actions))
        state.frame_actions.extend(actions)

    @staticmethod
    def between_chunks(state: RolloutState) -> bool:
        """Whether the rollout's next step starts a chunk (or it has no chunk yet): rollouts
        that start their chunks together need forwards of the same sizes all chunk long."""
        return state.matrix is None or state.row >= state.matrix.shape[0] - 1

    def rollout(self, request: RolloutRequest) -> Iterator[tuple[int, Tensor]]:
        """Generate frames one rollout at a time, yielding (index, frame) as each is clean."""
        state = self.start(request)
        while not state.done:
            yield from self.step([state])[0]

    @torch.no_grad()
    def step(self, states: list[RolloutState]) -> list[list[tuple[int, Tensor]]]:
        """One denoising row for every rollout, in one batched forward pass (per size group).

        Returns, per rollout, the generated frames (index, (C, R, R)) that became clean and are
        next in order. A frame is the sampler's x0 on the data's [-1, 1] scale but not clamped
        to it: the research code does not clamp either (tests/model/test_df_import.py matches
        its frames), and pixels are clipped where they are made (frames_to_uint8 in
        server/video.py).

        All or nothing: when it raises, every state is as it was before the call, so a caller
        may step the same rollouts again (the worker retries them one by one to find the one
        that fails). Every x0 is computed before any cache or sampler moves, and the chunk
        set-up that precedes the forward (history, noise drawn from the generator) is undone.
        """
        live = [st for st in states if not st.done]
        undo = [_Undo.take(st) for st in live]
        try:
            return self._step(states, live)
        except BaseException:
            for u in undo:
                u.restore()
            raise

    def _step(self, states: list[RolloutState], live: list[RolloutState]
              ) -> list[list[tuple[int, Tensor]]]:
        out: dict[int, list[tuple[int, Tensor]]] = {id(st): [] for st in states}
        for st in live:
            if self.between_chunks(st):
                # An extended rollout may already hold its next frames: the unseen rest of a
                # stacked frame (frame_stack > 1). They need no forward, and maybe no chunk.
                out[id(st)] = self._emit(st)
                if not st.done:
                    self._start_chunk(st)
        specs = [self._plan(st) for st in live if not st.done]
        commits: list[_Commit] = []
        x0s = self._run_forwards(specs, commits)
        guided = [sp for sp in specs if sp.state.request.sampling.guidance != 1.0 and len(sp.x)]
        if guided:
            x0s_uncond = self._run_unconditional(guided)
            for sp in guided:
                w = sp.state.request.sampling.guidance
                x0s[id(sp)] = w * x0s[id(sp)] - (w - 1) * x0s_uncond[id(sp)]
        # Every x0 is known: only now do caches and samplers move.
        for sp, keys, values in commits:
            self._commit(sp, keys, values)
        for sp in specs:
            out[id(sp.state)] += self._advance(sp, x0s[id(sp)])
        return [out[id(st)] for st in states]

    # --- chunks and rows -------------------------------------------------------------------

    def _start_chunk(self, st: RolloutState) -> None:
        s = st.request.sampling
        if st.chunk_x is not None:  # the previous chunk is finished: make it history
            st.inputs.extend(t for t in st.chunk_inputs if t is not None)
            st.clean.extend(t for t in st.chunk_clean if t is not None)
        st.chunk_start = st.finished
        h = min(s.chunk_size, st.total_frames - st.chunk_start)
        self._forget_old_frames(st, h)
        net = self.cfg.network
        st.chunk_x = draw_noise(
            torch.Size((h, net.channels, net.resolution, net.resolution)),
            st.generator,
            self.cfg.diffusion.clip_noise,
            st.clean[-1],
        )
        st.chunk_clean = [None] * h
        st.chunk_inputs = [None] * h
        st.matrix = scheduling_matrix(s.schedule, s.steps, h, s.uncertainty_scale)
        st.row = 0
        st.sampler_state = SamplerState()
        if st.cache is not None and st.cache.start != self._history_start(st):
            st.cache.reset(self._history_start(st))  # the window slid: rebuild from its start

    def _forget_old_frames(self, st: RolloutState, h: int) -> None:
        """Keep memory flat on 1,000-frame rollouts and endless sessions: frames before the
        history window that were already handed out are never read again."""
        keep_from = min(self._history_start(st, h), st.next_to_emit)
        drop = keep_from - st.dropped
        if drop > 0:
            del st.inputs[:drop], st.clean[:drop]
            st.dropped += drop

    def _history_start(self, st: RolloutState, h: int | None = None) -> int:
        """First frame of the window of the current chunk (h frames, known once it started)."""
        if self.causal:
            return max(0, st.chunk_start - (self.window - st.request.sampling.chunk_size))
        # the research code's loop (df_base.validation_step): start_frame = max(0, curr_frame +
        # horizon - n_tokens), so a shorter last chunk sees more history
        if h is None:
            assert st.chunk_x is not None
            h = len(st.chunk_x)
        return max(0, st.chunk_start + h - self.window)

    def _row_levels(self, st: RolloutState) -> tuple[Tensor, Tensor]:
        assert st.matrix is not None
        levels_of = self.schedule.sampling_levels(st.request.sampling.steps)
        m = torch.from_numpy(st.matrix)
        return levels_of[m[st.row]].to(self.device), levels_of[m[st.row + 1]].to(self.device)

    def _plan(self, st: RolloutState, cached: bool = True) -> _Forward:
        """The frames this rollout needs in this row's forward, with their levels and actions.

        cached: start after the frames in the rollout's KV cache; without it (or without a
        cache) the forward starts at the history window's first frame, as a recompute does."""
        assert st.chunk_x is not None
        from_levels, to_levels = self._row_levels(st)
        moving = (from_levels != to_levels).nonzero().flatten()
        if not len(moving):  # an idle row: no forward (and nothing to commit before the next)
            return self._idle(st)
        last = st.chunk_start + int(moving.max())
        if not self.causal:  # later frames (still pure noise) change the earlier ones' output
            last = st.chunk_start + len(st.chunk_x) - 1
        cache = st.cache if cached else None
        first = cache.end if cache is not None else self._history_start(st)
        ctx_level = st.request.sampling.context_noise
        xs, levels = [], []
        for g in range(first, last + 1):
            t = g - st.chunk_start
            if t < 0:
                xs.append(st.inputs[g - st.dropped])
                levels.append(ctx_level)
            elif (finished := st.chunk_inputs[t]) is not None:
                xs.append(finished)
                levels.append(ctx_level)
            else:
                xs.append(st.chunk_x[t])
                levels.append(int(from_levels[t]))
        return _Forward(
            state=st,
            first=first,
            x=torch.stack(xs),
            levels=torch.tensor(levels, device=self.device),
            actions=self._actions(st, first, last),
            use_cache=cache is not None,
            before=self._input(st, first - 1) if first > self._history_start(st) else None,
        )

    def _actions(self, st: RolloutState, first: int, last: int) -> Tensor:
        """The conditioning action of network frames first..last. Stacked frames take the null
        action: frame_stack belongs to the research U-Net, which has no action input."""
        if self.stack > 1:
            return torch.full((last + 1 - first,), self.net.null_action, device=self.device)
        return torch.tensor(st.frame_actions[first : last + 1], device=self.device)

    def _idle(self, st: RolloutState) -> _Forward:
        """The empty forward of a row in which no frame of the chunk moves."""
        assert st.chunk_x is not None
        empty = st.chunk_x[:0]
        none = torch.zeros(0, dtype=torch.long, device=self.device)
        return _Forward(state=st, first=st.chunk_start, x=empty, levels=none, actions=none,
                        use_cache=False)

    def _input(self, st: RolloutState, g: int) -> Tensor:
        """The network input of finished frame g (history or an already clean chunk frame)."""
        t = g - st.chunk_start
        if t < 0:
            return st.inputs[g - st.dropped]
        frame = st.chunk_inputs[t]
        assert frame is not None, "only finished frames precede a forward"
        return frame

    def _advance(self, sp: _Forward, x0: Tensor) -> list[tuple[int, Tensor]]:
        """Apply the sampler to the chunk's frames and hand out frames that became clean."""
        st = sp.state
        s = st.request.sampling
        assert st.chunk_x is not None
        from_levels, to_levels = self._row_levels(st)
        h = len(st.chunk_x)
        lo = sp.first - st.chunk_start  # chunk index of the forward's first frame (may be < 0)
        chunk_x0 = st.chunk_x.clone()  # frames outside the forward do not move this row
        begin, end = max(lo, 0), min(lo + len(x0), h)
        chunk_x0[begin:end] = x0[begin - lo : end - lo]
        st.chunk_x, st.sampler_state = sampler_step(
            s.sampler, self.schedule, st.chunk_x, chunk_x0, from_levels, to_levels,
            st.sampler_state, s.eta, st.generator,
        )  # fmt: skip
        st.row += 1
        st.rows_done += 1
        for t in range(h):
            if st.chunk_clean[t] is None and int(to_levels[t]) < 0:
                st.chunk_x[t] = self._fill_edges(st, t)
                st.chunk_clean[t] = st.chunk_x[t]
                st.chunk_inputs[t] = self._context_input(st.chunk_x[t], s, st.generator)
        return self._emit(st)

    def _fill_edges(self, st: RolloutState, t: int) -> Tensor:
        """Chunk frame t as it finishes: with an edge fill (model.edge_fill), the tiles that
        entered the scrolled view are drawn, not the denoiser's average. Frames finish in
        order, so the frame before it is already clean."""
        assert st.chunk_x is not None
        fill: EdgeFill | None = getattr(self.net, "edge_fill", None)  # the DiT's only
        if fill is None:
            return st.chunk_x[t]
        previous = st.clean[-1] if t == 0 else st.chunk_clean[t - 1]
        assert previous is not None, "the frame before a finishing frame is clean"
        return fill.fill(previous, st.chunk_x[t], st.generator)

    def _emit(self, st: RolloutState) -> list[tuple[int, Tensor]]:
        """The next single frames, in order, as far as their network frames are clean."""
        out = []
        while not st.done:
            g = st.next_to_emit
            t = g - st.chunk_start
            if t < 0:
                frame: Tensor | None = st.clean[g - st.dropped]
            else:
                frame = st.chunk_clean[t] if t < len(st.chunk_clean) else None
            if frame is None:
                break
            if self.stack > 1:  # the single frame's channels within its stacked frame
                frame = unstack(frame[None], self.stack)[st.emitted % self.stack]
            out.append((st.emitted, frame))
            st.emitted += 1
        return out

    def _context_input(self, frame: Tensor, s: SamplingConfig, gen: torch.Generator) -> Tensor:
        """What the network sees for a finished frame: relabelled, scaled (DF v1.5's
        stabilization: sqrt(alpha_bar) x, no noise) or noised once (DF)."""
        if s.context_noise_mode == "relabel" or s.context_noise < 0:
            return frame
        if s.context_noise_mode == "scaled":
            level = torch.tensor([s.context_noise], device=frame.device)
            return self.schedule.q_sample(frame[None], level, torch.zeros_like(frame[None]))[0]
        noise = draw_noise(frame.shape, gen, self.cfg.diffusion.clip_noise, frame)
        level = torch.tensor([s.context_noise], device=frame.device)
        return self.schedule.q_sample(frame[None], level, noise[None])[0]

    # --- batched forward passes ------------------------------------------------------------

    def _run_forwards(self, specs: list[_Forward], commits: list[_Commit] | None = None
                      ) -> dict[int, Tensor]:
        """Group rollouts by forward size (padding a 1-frame row to a 15-frame rebuild would
        waste the batch) and run one forward per group. Returns x0 per spec id; the keys and
        values of frames to cache go to `commits`, for the caller to write.

        A row in which no frame moves needs no forward (a pyramid whose uncertainty scale
        exceeds its steps has such rows between frames): its x0 is empty."""
        x0s: dict[int, Tensor] = {id(sp): sp.x for sp in specs if not len(sp.x)}
        specs = [sp for sp in specs if len(sp.x)]
        for group in _size_groups(specs, exact=not self.causal):
            x0s.update(self._forward_group(group, commits))
        return x0s

    def _forward_group(self, group: list[_Forward], commits: list[_Commit] | None
                       ) -> dict[int, Tensor]:
        A = max(len(sp.x) for sp in group)
        x, levels, actions, positions, valid = self._pad(group, A)
        before = torch.zeros_like(x[:, 0])
        # a finished frame is labelled the context level, in the cache as in a recompute
        nothing = self.cfg.diffusion.timesteps - 1
        before_level = torch.full((len(group),), nothing, device=self.device)
        for b, sp in enumerate(group):
            if sp.before is not None:
                before[b] = sp.before
                before_level[b] = sp.state.request.sampling.context_noise
        cache = self._batch_cache(group)
        out, keys, values = self.net(x.to(self.net_dtype), levels, actions, positions, valid,
                                     cache, before.to(self.net_dtype), before_level)  # fmt: skip
        x0 = self.schedule.to_x0(out.to(self.dtype), x, levels)
        result = {}
        for b, sp in enumerate(group):
            n = len(sp.x)
            result[id(sp)] = x0[b, :n]
            if sp.use_cache:
                assert commits is not None, "a cached forward's keys must be committed"
                commits.append((sp, [k[b] for k in keys], [v[b] for v in values]))
        return result

    def _pad(self, group: list[_Forward], A: int) -> tuple[Tensor, ...]:
        B = len(group)
        frame_shape = group[0].x.shape[1:]
        x = torch.zeros((B, A) + tuple(frame_shape), device=self.device, dtype=self.dtype)
        levels = torch.full((B, A), -1, dtype=torch.long, device=self.device)
        actions = torch.full((B, A), self.net.null_action, dtype=torch.long, device=self.device)
        positions = torch.zeros((B, A), dtype=torch.long, device=self.device)
        valid = torch.zeros((B, A), dtype=torch.bool, device=self.device)
        for b, sp in enumerate(group):
            n = len(sp.x)
            x[b, :n], levels[b, :n], actions[b, :n] = sp.x, sp.levels, sp.actions
            positions[b] = sp.first + torch.arange(A, device=self.device)
            valid[b, :n] = True
        return x, levels, actions, positions, valid

    def _batch_cache(self, group: list[_Forward]) -> BatchKV | None:
        """Stack the rollouts' caches, trimmed to the longest one; None when all are empty."""
        N = self.cfg.network.tokens_per_frame
        lengths = [
            (sp.state.cache.end - sp.state.cache.start) * N
            if sp.use_cache and sp.state.cache is not None
            else 0
            for sp in group
        ]
        K = max(lengths)
        if K == 0:
            return None
        keys, values = [], []
        for layer in range(self.cfg.network.depth):
            keys.append(torch.stack([self._cached(sp, layer, K, 0) for sp in group]))
            values.append(torch.stack([self._cached(sp, layer, K, 1) for sp in group]))
        valid = torch.arange(K, device=self.device)[None, :] < torch.tensor(
            lengths, device=self.device
        )[:, None]
        return BatchKV(keys, values, valid)

    def _cached(self, sp: _Forward, layer: int, K: int, which: int) -> Tensor:
        cache = sp.state.cache
        if cache is None or not sp.use_cache:
            net = self.cfg.network
            head_dim = net.width // net.heads
            return torch.zeros(K, net.heads, head_dim, device=self.device, dtype=self.net_dtype)
        return (cache.keys if which == 0 else cache.values)[layer, :K]

    def _commit(self, sp: _Forward, keys: list[Tensor], values: list[Tensor]) -> None:
        """Write finished frames at the front of the forward into the rollout's cache."""
        st = sp.state
        cache = st.cache
        assert cache is not None
        N = self.cfg.network.tokens_per_frame
        n_final = 0
        for g in range(sp.first, sp.first + len(sp.x)):
            t = g - st.chunk_start
            if t >= 0 and st.chunk_inputs[t] is None:
                break
            n_final += 1
        if n_final == 0:
            return
        lo, hi = (cache.end - cache.start) * N, (cache.end - cache.start + n_final) * N
        for layer in range(len(keys)):
            cache.keys[layer, lo:hi] = keys[layer][: n_final * N]
            cache.values[layer, lo:hi] = values[layer][: n_final * N]
        cache.end += n_final

    def _run_unconditional(self, specs: list[_Forward]) -> dict[int, Tensor]:
        """History guidance's second branch (DFoT 'vanilla'): the whole window without cache,
        history replaced by fresh noise at level T-1 each row, and no actions."""
        T = self.cfg.diffusion.timesteps
        uncond = []
        for sp in specs:
            st = sp.state
            full = self._plan_without_cache(st)
            n_hist = st.chunk_start - full.first
            noise = draw_noise(
                full.x[:n_hist].shape, st.generator, self.cfg.diffusion.clip_noise, full.x
            )
            full.x[:n_hist] = noise
            full.levels[:n_hist] = T - 1
            full.actions[:] = self.net.null_action
            uncond.append((sp, full))
        x0s = self._run_forwards([full for _, full in uncond])
        result = {}
        for sp, full in uncond:
            skip = sp.first - full.first  # align to the conditional forward's frames
            result[id(sp)] = x0s[id(full)][skip:]
        return result

    def _plan_without_cache(self, st: RolloutState) -> _Forward:
        """The whole window's forward, ignoring the cache; its frames are a copy that the
        caller may overwrite (history guidance puts noise in place of the history)."""
        sp = self._plan(st, cached=False)
        sp.x = sp.x.clone()
        return sp


def _size_groups(specs: list[_Forward], exact: bool = False) -> list[list[_Forward]]:
    """Split into at most two groups: short row forwards and long (window rebuild) ones.

    exact: one group per length, never padding (padded frames would enter a non-causal
    network's statistics)."""
    if not specs:
        return []
    if exact:
        lengths = sorted({len(sp.x) for sp in specs})
        return [[sp for sp in specs if len(sp.x) == n] for n in lengths]
    threshold = 2 * max(1, min(len(sp.x) for sp in specs))
    short = [sp for sp in specs if len(sp.x) <= threshold]
    long = [sp for sp in specs if len(sp.x) > threshold]
    return [g for g in (short, long) if g]
