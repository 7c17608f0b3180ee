"""Frame stacking: the diffusion-forcing research code's `frame_stack` option.

With frame_stack k the network never sees single frames. k consecutive frames are concatenated
along channels into one stacked frame (k*C channels, frame order within it: the first frame's
channels first, as the reference's `b (t fs) c -> t b (fs c)`), and everything the sampling
loop counts is counted in stacked frames: the window (n_frames // k), the context (context
frames // k), the chunk size, the noise of a chunk (k*C channels), the scheduling matrix.
Only the ends are in single frames: the context a user gives and the frames handed out.

The reference refuses a context that is not a multiple of k (df_base._preprocess_batch), so
dfserve does too. It also needs the whole video to be a multiple of k; a server is asked for a
frame count instead, so dfserve generates whole stacked frames and hands out the frames asked
for: when the count is not a multiple of k, the surplus frames of the last stacked frame stay
unseen unless the rollout is extended (a session), which then hands them out without a new
forward. For counts that are multiples of k this is the reference's loop exactly.
"""

from __future__ import annotations

from torch import Tensor

from dfserve.model.config import BundleConfig
from dfserve.model.errors import FieldError


def frame_stack(config: BundleConfig) -> int:
    """Frames per network frame: the U-Net's setting; 1 for every other architecture."""
    return config.unet.frame_stack if config.unet is not None else 1


def image_channels(config: BundleConfig) -> int:
    """Channels of one frame as users see it (the network's are frame_stack times more)."""
    return config.network.channels // frame_stack(config)


def max_context_frames(config: BundleConfig, chunk_size: int) -> int:
    """The most single context frames a request can use: the window less one chunk, both
    counted in stacked frames."""
    return (config.network.max_frames - chunk_size) * frame_stack(config)


def stack(frames: Tensor, k: int) -> Tensor:
    """(n*k, C, R, R) single frames -> (n, k*C, R, R) stacked frames."""
    n, c = len(frames) // k, frames.shape[1]
    if n * k != len(frames):
        raise ValueError(f"{len(frames)} frames do not stack by {k}")
    return frames.reshape(n, k * c, *frames.shape[2:])


def unstack(stacked: Tensor, k: int) -> Tensor:
    """(n, k*C, R, R) stacked frames -> (n*k, C, R, R) single frames, in order."""
    return stacked.reshape(len(stacked) * k, stacked.shape[1] // k, *stacked.shape[2:])


def stacked_count(frames: int, k: int) -> int:
    """Stacked frames that hold `frames` single frames (the last one possibly in part)."""
    return -(-frames // k)


def check_context_frames(n: int, k: int) -> None:
    """A context must fill whole stacked frames (the reference raises the same)."""
    if n % k:
        raise FieldError(
            "context", f"{n} frames; this model stacks frame_stack = {k} frames "
            f"into each network frame, so the context must be a multiple of {k}"
        )
