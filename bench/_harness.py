"""What the performance benchmarks share: the device, timing, peak memory, and the Markdown tables.

Timing: the median of several runs after a warm-up, with the compared implementations interleaved
(A B A B ...) so that a machine shared with other jobs slows them alike.

Peak memory, the extra bytes a piece of code allocates on top of what is live when it starts:
- on a GPU, ``torch.cuda.max_memory_allocated`` minus the bytes allocated before;
- on a CPU, replayed from ``torch.profiler``'s allocation events (``profile_memory=True``): every
  allocation and free of the torch allocator in order, whose running sum peaks at the extra bytes.
  This counts tensor memory exactly (not Python objects, nor the allocator's retained pages).
Live bytes (weights, gradients, optimizer states) come from ``torch.cuda.memory_allocated`` on a
GPU, else from the storages of every live tensor (each counted once).
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine() -> str:
    """One line describing where the numbers come from."""
    if torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    else:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor() or "unknown CPU")
        where = f"CPU {cpu}, {torch.get_num_threads()} thread(s) (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
    return f"{where}; torch {torch.__version__}; Python {platform.python_version()}"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_times(functions: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of every timed run of each function, run A B C A B C ... after ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_ in range(warmup + repeats):
        for name, function in functions.items():
            synchronize()
            start = time.perf_counter()
            function()
            synchronize()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(functions: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function (:func:`interleaved_times`)."""
    return {name: statistics.median(values) for name, values in interleaved_times(functions, repeats, warmup).items()}


def peak_extra_bytes(function: Callable[[], Any]) -> int:
    """Peak bytes allocated by ``function`` above what was live when it started (see the module doc)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        function()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def live_bytes() -> int:
    """Bytes of every live tensor's storage, each counted once (weights, gradients, optimizer states)."""
    gc.collect()
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    storages: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on every object touches deprecated torch module attributes
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, ReferenceError, NotImplementedError):  # tensors without a plain storage
                continue
    return sum(storages.values())


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f}"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, title: str, sections: list[str]) -> Path:
    """``bench/results/{name}-{cpu|cuda}.md``: the title, the machine, then the sections; also printed."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{device().type}.md"
    text = "\n\n".join([f"# {title}", f"Machine: {machine()}.", *sections]) + "\n"
    path.write_text(text, encoding="utf-8")
    print(text)
    return path


def quickstart_datasets(output_dir: str) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The quickstart's config (no prepared-data cache, ``output_dir`` for scratch), its tokenizer, its
    training blocks and its evaluation sets, built as a run builds them."""
    from mft_plugin.config.errors import load_config
    from mft_plugin.models.loading import load_tokenizer
    from mft_plugin.train.context import RecipeContext
    from mft_plugin.train.recipe import build_datasets

    config = load_config(REPO / "yaml_examples" / "quickstart.yml")
    config = config.model_copy(update={"dataset_prepared_path": None, "output_dir": output_dir})
    tokenizer = load_tokenizer(config)
    train, eval_sets = build_datasets(config, RecipeContext(config=config, tokenizer=tokenizer, output_dir=Path(output_dir)))
    return config, tokenizer, train, eval_sets
