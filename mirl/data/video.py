"""Video in the data: a row's `video` column becomes a Video (models/vision.py: its frames in time order, and their
times), chosen by three options that every recipe reading --data has:

    --video-fps 2          frames kept per second of the clip (Qwen2-VL's and EasyR1's default)
    --video-max-frames 8   at most this many, evenly spaced over the whole clip (a long clip is seen sparser)
    --video-max-pixels 602112   each frame scaled down, keeping its shape, to at most this many pixels (qwen-vl-utils'
                           and EasyR1's 768 x 28 x 28; 0: as it is)

The column may hold:
    a path          a video file (relative to the data file's folder), decoded with PyAV (FFmpeg): frames at about
                    --video-fps over its duration, at most --video-max-frames, the first and the last included
    a list          frame images (paths, {'bytes', 'path'}, PIL images) taken as the clip's frames, in order;
                    more than --video-max-frames are thinned evenly (there is no timing to apply --video-fps to)
    an array        frames as numbers 0-255, (F, H, W, 3) RGB or (F, H, W) grey (a numpy array or nested lists)

The number of frames is qwen-vl-utils' smart_nframes: duration * fps, raised to 4 and lowered to --video-max-frames
and to the clip's frame count (those two floored to even), then floored to an even count (Qwen2-VL takes frames in
pairs); a clip of one frame, or --video-max-frames 1, gives one. The frames are evenly spaced from the first to the
last (rounded to the nearest index). A missing file, a file FFmpeg cannot open or decode, a clip with no video
stream or no frames is a DataError naming the row and field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..models.vision import Video, load_image


@dataclass(frozen=True)
class VideoOptions:
    """How the frames of a video are chosen (the --video-* options)."""

    fps: float = 2.0
    max_frames: int = 8
    max_pixels: int = 768 * 28 * 28


def _nearest(x: float) -> int:
    """x rounded half up (Python's round() rounds half to even)."""
    return math.floor(x + 0.5)


def spaced_indices(n: int, k: int) -> list[int]:
    """k indices evenly spaced over range(n), the first and last included (k <= n); one index: the first.

    >>> spaced_indices(10, 4)
    [0, 3, 6, 9]
    """
    if k == 1:
        return [0]
    return [_nearest(i * (n - 1) / (k - 1)) for i in range(k)]


def frame_count(n_frames: int, native_fps: float, fps: float, max_frames: int) -> int:
    """How many frames to keep of a clip of n_frames at native_fps (qwen-vl-utils' smart_nframes): duration * fps,
    at least 4, at most max_frames and n_frames floored to even, floored to even; 1 when that leaves none.

    >>> frame_count(90, 30.0, 2.0, 8), frame_count(78, 30.0, 2.0, 8), frame_count(5, 30.0, 2.0, 8)  # 3, 2.6, 1/6 s
    (6, 4, 4)
    """
    even = lambda x: 2 * math.floor(x / 2)  # noqa: E731
    most = even(min(max_frames, n_frames))
    if most < 2:
        return 1
    return even(min(max(n_frames / native_fps * fps, 4), most))


def sample_indices(n_frames: int, native_fps: float, fps: float, max_frames: int) -> list[int]:
    """The indices of the frames to keep of a clip of n_frames at native_fps (frame_count of them, spaced_indices)."""
    if n_frames <= 0:
        return []
    return spaced_indices(n_frames, frame_count(n_frames, native_fps, fps, max_frames))


def capped_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled down by one factor so that width * height <= max_pixels (each at least 1); unchanged
    when it already fits or max_pixels is 0.

    >>> capped_size(64, 48, 768)   # a quarter of the pixels: half of each side
    (32, 24)
    """
    if max_pixels <= 0 or width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def _capped(frames: list, max_pixels: int) -> list:
    from PIL import Image

    out = []
    for f in frames:
        size = capped_size(*f.size, max_pixels)
        out.append(f if size == f.size else f.resize(size, Image.BILINEAR))
    return out


def decode_video(path: Path, where: str, options: VideoOptions) -> Video:
    """The frames of a video file chosen by `options` (module docstring), decoded with PyAV; DataError naming `where`
    for a missing, unreadable or empty file."""
    import av

    if not path.exists():
        raise DataError(f"{where}: video file {path} does not exist")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{where}: {path} has no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0.0)
            frames, times = [], []
            counted = rate and stream.frames > 0  # MKV, WebM and some streams have no count in the header
            wanted = set(sample_indices(stream.frames, rate, options.fps, options.max_frames)) if counted else None
            for i, frame in enumerate(container.decode(stream)):
                if wanted is None or i in wanted:  # no frame count in the header: every frame, chosen below
                    frames.append(frame.to_image())
                    times.append(float(frame.time) if frame.time is not None else i / (rate or 1.0))
                if wanted is not None and i >= max(wanted):
                    break
    except DataError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"{where}: unreadable video {path} ({type(e).__name__}: {e})") from e
    if not frames:
        raise DataError(f"{where}: video {path} has no frames")
    if wanted is None:  # choose among the decoded frames, at the rate their times show
        span = times[-1] - times[0]
        rate = (len(frames) - 1) / span if span > 0 else options.fps
        keep = sample_indices(len(frames), rate, options.fps, options.max_frames)
        frames, times = [frames[i] for i in keep], [times[i] for i in keep]
    return Video(tuple(_capped(frames, options.max_pixels)), tuple(times))


def _array_frames(x, where: str) -> list:
    import numpy as np
    from PIL import Image

    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: a frames array must be numbers, (F, H, W, 3) or (F, H, W) ({e})") from e
    if a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[-1] != 3):
        raise DataError(f"{where}: a frames array must be (F, H, W, 3) or (F, H, W), got shape {tuple(a.shape)}")
    if not np.isfinite(a).all() or a.min(initial=0) < 0 or a.max(initial=0) > 255:
        raise DataError(f"{where}: frame values must be numbers from 0 to 255")
    return [Image.fromarray(f.astype(np.uint8), "RGB" if a.ndim == 4 else "L") for f in a]


def read_video(x, where: str, base: str | Path = "", options: VideoOptions = VideoOptions()) -> Video:
    """A row's video (module docstring: a path, a list of frame images or a frames array; a Video passes) -> Video.
    Bad input is a DataError naming `where`."""
    import numpy as np
    from PIL import Image

    if isinstance(x, Video):
        return x
    if isinstance(x, str):
        p = Path(x) if Path(x).is_absolute() or not base else Path(base) / x
        return decode_video(p, where, options)
    is_image_list = isinstance(x, (list, tuple)) and all(
        isinstance(f, (str, dict, bytes, Image.Image)) for f in x
    )  # (an empty list too: it has no frames)
    if is_image_list:
        frames = [load_image(f, f"{where} frame {i}", base) for i, f in enumerate(x)]
    elif isinstance(x, (list, tuple, np.ndarray)):
        frames = _array_frames(x, where)
    else:
        raise DataError(
            f"{where}: a video must be a file path, a list of frame images or a frames array, got {type(x).__name__}"
        )
    if not frames:
        raise DataError(f"{where}: the video has no frames")
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        raise DataError(f"{where}: the frames differ in size ({', '.join(f'{w}x{h}' for w, h in sorted(sizes))})")
    if len(frames) > options.max_frames:
        frames = [frames[i] for i in spaced_indices(len(frames), options.max_frames)]
    return Video(tuple(_capped(frames, options.max_pixels)), None)
