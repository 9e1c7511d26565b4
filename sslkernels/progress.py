"""Training progress on stderr: a tqdm bar updated every step on a terminal; one plain line per
epoch otherwise, so a log file gets a readable line per epoch instead of a carriage-return
stream that grows by a bar per step."""
from __future__ import annotations

import sys
import time


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """``update(step, loss, images)`` after each step (``step`` counts from 1); ``close()`` at
    the end. ``steps_per_epoch`` and ``total`` are in steps; ``initial`` is the step a resumed
    run starts from. ``enabled=False`` prints nothing.

    The rate shown is images per second (all views of all ranks count once per image)."""

    def __init__(self, total: int, steps_per_epoch: int, *, initial: int = 0,
                 enabled: bool = True, stream=None, desc: str = ""):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.per_epoch, self.enabled = total, steps_per_epoch, enabled
        self.epochs = -(-total // steps_per_epoch)
        self.bar = None
        self._reset_epoch()
        if enabled and is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", file=self.stream,
                            desc=desc or None, dynamic_ncols=True, leave=True)

    def _reset_epoch(self):
        self.t0, self.images, self.loss_sum, self.n = time.perf_counter(), 0, 0.0, 0

    def update(self, step: int, loss: float, images: int, **extra) -> None:
        if not self.enabled:
            return
        self.images += images
        self.loss_sum += loss
        self.n += 1
        rate = self.images / max(1e-9, time.perf_counter() - self.t0)
        if self.bar is not None:
            epoch = (step - 1) // self.per_epoch + 1
            fields = "".join(f" {k} {v:.4g}" for k, v in extra.items())
            self.bar.set_postfix_str(f"epoch {epoch}/{self.epochs} loss {loss:.4f}{fields} "
                                     f"{rate:.0f} img/s", refresh=False)
            self.bar.update(1)
            if step % self.per_epoch == 0:
                self._reset_epoch()
            return
        if step % self.per_epoch == 0 or step == self.total:
            epoch = -(-step // self.per_epoch)
            fields = "".join(f"  {k} {v:.4g}" for k, v in extra.items())
            print(f"epoch {epoch}/{self.epochs}  step {step}/{self.total}  "
                  f"loss {self.loss_sum / self.n:.4f} (epoch mean){fields}  {rate:.0f} img/s",
                  file=self.stream, flush=True)
            self._reset_epoch()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
