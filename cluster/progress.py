"""What the user sees while a batch runs: a progress bar per running prompt on a terminal, plain lines otherwise.
Names and messages (prompts, errors quoting them) are shown through printable(): a prompt holding ESC [2J or a
newline cannot clear the terminal or forge a line of the log."""

from __future__ import annotations

import sys
import time

from pipeline.request import Frame, Progress

from .prompts import printable

__all__ = ["ProgressReporter", "LineReporter", "make_reporter", "cache_note", "duration"]


def cache_note(cache: dict | None) -> str:
    """' (fbcache 0.08: 11 of 20 steps computed)' for a Result's step cache summary; '' without one."""
    if not cache:
        return ""
    return (f" ({cache['policy']} {cache['threshold']:g}: {cache['computed_steps']} of {cache['steps']} steps "
            f"computed)")


class ProgressReporter:
    """Silent base: the interface the driver calls."""

    def note(self, text: str) -> None:
        """What the driver is doing before any prompt runs (starting Ray, placing replicas): seconds that would
        otherwise pass without a line. Lines mode only: a bar has nothing to describe yet, and quiet is quiet."""

    def start(self, index: int, name: str, replica: int, attempt: int) -> None: ...

    def event(self, index: int, event) -> None: ...

    def finish(self, index: int, ok: bool, message: str) -> None: ...

    def close(self) -> None: ...


def duration(seconds: float) -> str:
    """'4.2 s', '3 min 05 s', '2 h 07 min': for elapsed times and ETAs in log lines."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    seconds = round(seconds)
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class LineReporter(ProgressReporter):
    """One line per milestone, for logs, CI and anything that is not a terminal: started, then a line with the
    elapsed time and an ETA every `every_s` seconds at most while it denoises and decodes (so a long run never looks
    hung, and a fast one is not a line per step), denoised, done.

    The ETA is the stage's: the mean time per step (frame) so far times the steps (frames) left, counted from the
    end of the text encoding (the last step)."""

    def __init__(self, stream=None, every_s: float = 5.0, clock=time.perf_counter):
        self.stream = stream or sys.stderr
        self.every_s, self.clock = every_s, clock
        self.started: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.stage_began: dict[int, float] = {}  # when the current stage (denoise, decode) began
        self.last_line: dict[int, float] = {}  # when the last line about this prompt was printed

    def _say(self, index: int | None, text: str) -> None:
        if index is not None:
            self.last_line[index] = self.clock()
        print(text, file=self.stream, flush=True)

    def note(self, text):
        self._say(None, text)

    def start(self, index, name, replica, attempt):
        name = printable(name, 80)
        self.started[index] = self.stage_began[index] = self.clock()
        self.names[index] = name
        retry = f" (attempt {attempt + 1})" if attempt else ""
        self._say(index, f"[{index}] {name}: started on replica {replica}{retry}")

    def event(self, index, event):
        if index not in self.started:
            return
        now = self.clock()
        if isinstance(event, Progress) and event.stage == "encode":
            self.stage_began[index] = now  # denoising starts now: its ETA should not count the text encoder
        elif isinstance(event, Progress) and event.stage == "denoise":
            if event.step == event.total:
                computed = "" if event.computed is None else f", {event.computed} computed"
                self._say(index, f"[{index}] denoised ({event.total} steps{computed}) in "
                                 f"{duration(now - self.started[index])}")
                self.stage_began[index] = now  # decoding starts now
            elif self._due(index, now):
                computed = "" if event.computed is None else f" ({event.computed} computed)"
                self._progress(index, now, f"step {event.step}/{event.total}{computed}", event.step, event.total,
                               "denoising")
        elif isinstance(event, Frame) and event.index + 1 < event.total and self._due(index, now):
            self._progress(index, now, f"frame {event.index + 1}/{event.total} decoded", event.index + 1,
                           event.total, "decoding")

    def _due(self, index: int, now: float) -> bool:
        return now - self.last_line.get(index, self.started[index]) >= self.every_s

    def _progress(self, index, now, what, done, total, stage) -> None:
        per = (now - self.stage_began[index]) / done
        self._say(index, f"[{index}] {what}, {duration(now - self.started[index])} elapsed, {stage} ETA "
                         f"{duration(per * (total - done))}")

    def finish(self, index, ok, message):
        took = self.clock() - self.started.get(index, self.clock())
        for state in (self.started, self.stage_began, self.last_line, self.names):
            state.pop(index, None)
        self._say(None, f"[{index}] {'done' if ok else 'FAILED'} in {duration(took)}: {printable(message, 2000)}")


class BarReporter(ProgressReporter):
    """tqdm bars, one per running prompt: denoising steps, then decoded frames."""

    def __init__(self):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bars: dict[int, object] = {}
        self.names: dict[int, str] = {}
        self.slots: dict[int, int] = {}

    def start(self, index, name, replica, attempt):
        self.finish_bar(index)
        self.names[index] = name
        free = min(set(range(len(self.slots) + 1)) - set(self.slots.values()))
        self.slots[index] = free
        label = f"[{index}] {printable(name, 40)}" + (f" (retry {attempt})" if attempt else "")
        self.bars[index] = self._tqdm(total=1, desc=label, position=free, leave=False, unit="step", dynamic_ncols=True)

    def event(self, index, event):
        bar = self.bars.get(index)
        if bar is None:
            return
        if isinstance(event, Progress) and event.stage == "denoise":
            if bar.total != event.total or bar.unit != "step":
                bar.reset(total=event.total)
                bar.unit = "step"
            bar.n = event.step
            if event.computed is not None:  # with a step cache: how many of the steps so far ran the blocks
                bar.set_postfix_str(f"{event.computed}/{event.step} computed", refresh=False)
            bar.refresh()
        elif isinstance(event, Frame):
            if bar.unit != "frame":
                bar.reset(total=event.total)
                bar.unit = "frame"
                bar.set_postfix_str("", refresh=False)
                bar.set_description(f"[{index}] decoding")
            bar.n = event.index + 1
            bar.refresh()

    def finish_bar(self, index):
        bar = self.bars.pop(index, None)
        if bar is not None:
            bar.close()
        self.slots.pop(index, None)

    def finish(self, index, ok, message):
        self.finish_bar(index)
        self._tqdm.write(f"[{index}] {'done' if ok else 'FAILED'}: {printable(message, 2000)}", file=sys.stderr)

    def close(self):
        for index in list(self.bars):
            self.finish_bar(index)


def make_reporter(mode: str | bool | None) -> ProgressReporter:
    """'bars', 'lines', False/None (silent) or 'auto' (bars on a terminal, lines otherwise)."""
    if not mode:
        return ProgressReporter()
    if mode == "auto":
        mode = "bars" if sys.stderr.isatty() else "lines"
    return BarReporter() if mode == "bars" else LineReporter()
