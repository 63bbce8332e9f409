"""The one progress display: a live rich bar on a terminal, plain log lines elsewhere (DVC, CI logs)."""

from __future__ import annotations

import time


class Progress:
    """`with Progress(console, "train", total, start, unit="steps", log_every=50) as bar: bar.update(done, text)`.

    The rate is measured from the start (or from `start`, for a resumed run). On a terminal the bar is live;
    elsewhere a line is printed every `log_every` units and at the end (never, with log_every 0).
    """

    def __init__(self, console, description: str, total: int, start: int = 0, unit: str = "steps", log_every=0):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.console, self.description, self.total, self.start = console, description, total, start
        self.unit, self.log_every = unit, log_every
        self.done, self.rate, self.started = start, 0.0, time.perf_counter()
        self.live = console.is_terminal
        self.bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(f"{{task.fields[rate]:.2f}} {unit}/s"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[text]}"),
            console=console,
            disable=not self.live,
        )
        self.task = self.bar.add_task(description, total=total, completed=start, rate=0.0, text="")

    def __enter__(self) -> Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def update(self, done: int, text: str = "") -> None:
        self.done = done
        self.rate = (done - self.start) / max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(self.task, completed=done, rate=self.rate, text=text)
        if not self.live and self.log_every and (done % self.log_every == 0 or done == self.total):
            eta = (self.total - done) / self.rate if self.rate > 0 else float("nan")
            rate = f"{self.rate:.2f} {self.unit}/s"
            self.console.print(f"{self.description} {done}/{self.total}  {rate}  eta {eta:.0f}s  {text}")

    def advance(self) -> None:
        self.update(self.done + 1)
