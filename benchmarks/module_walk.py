"""How often a walk of a `kis` command from flag to saved file enters each kis_lens module (issue 22).

    .venv/bin/python benchmarks/module_walk.py     # ~1 min on 2 cores; writes benchmarks/results/module_walk.json

Runs `kis all` (and one edit of `kis lifelong`) on the in-process tiny-gpt2, offline, into a temporary folder, under
sys.setprofile, and records the call tree of the functions defined in kis_lens source files (import-time module
code, generated dataclass methods and everything outside kis_lens are left out; a kis_lens call made from
library code hangs under the nearest kis_lens caller). Loops are collapsed: consecutive sibling calls of one
function merge into one call whose children are every iteration's, aligned in order, so a per-layer or per-batch
loop counts once. The collapsed tree is walked depth-first, noting the module of each frame entered and of each
frame returned to; a stay is a maximal run of consecutive notes in one module. Per module: its stays (entries)
and where each came from. The issue's target: every module entered at most twice. "loop_bodies_merged" repeats
the numbers with a loop whose body makes several calls (next batch, then run it) merged to one iteration too.
"reader" walks the tree as a reader of the code does: a function already read is not read again (its later calls
are skipped), and besides the stays it counts the calls into each module from another one (a return to a module
is not a new jump for a reader who keeps their place). "modules_read_once" goes further, as the issue's review
counted (every module entered by a call once, re-entries by returns only): a module already read is not entered
again, so a module's stays are 1 plus the modules it is the first to call; only the drivers exceed 2.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "module_walk.json"
TARGET = 2  # the "done when": each module entered at most twice
SHOWN = 10  # the most entered modules whose entries the report lists one by one
PACKAGE = ROOT / "kis_lens"
TINY_ALL = ["--model_name", "tiny-gpt2", "--knowledge_type", "all", "--record_size", "8"]
TINY_CORPUS = ["--max_tokens", "1500", "--no_progress", "--device", "cpu"]
TINY_LIFELONG = [
    *("--model_name", "tiny-gpt2", "--editors", "rome", "--layer", "0", "--n_edits", "1"),
    *("--eval_every", "1", "--probe_every", "1", "--value_steps", "2", "--value_prompts", "2"),
    *("--n_unedited", "2", "--heldout_texts", "2", "--heldout_tokens", "16", "--fluency_prompts", "1"),
    *("--fluency_tokens", "4", "--bootstrap", "20", "--max_tokens", "1500", "--no_progress", "--device", "cpu"),
]


@dataclass
class Call:
    """One call of a kis_lens function (after collapsing: one loop of them), with the kis_lens calls under it."""

    module: str  # "runner", "editing.values"
    function: str  # its qualified name
    children: list[Call] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        """Return (module, function): what makes two calls the same function."""
        return self.module, self.function


def merge_into(kept: Call, other: Call) -> None:
    """Merge another call of the same function into kept: other's children aligned in order onto kept's."""
    position = 0
    for child in other.children:
        match = next((i for i in range(position, len(kept.children)) if kept.children[i].key == child.key), None)
        if match is None:  # a call this iteration makes and the earlier ones did not: it keeps its place
            kept.children.insert(position, child)
            position += 1
        else:
            merge_into(kept.children[match], child)
            position = match + 1


def add_child(parent: Call, child: Call) -> None:
    """Append a finished call to its parent, merging it into the previous sibling when that is the same function."""
    if parent.children and parent.children[-1].key == child.key:
        merge_into(parent.children[-1], child)
    else:
        parent.children.append(child)


def collapse_loop_bodies(call: Call) -> None:
    """Merge each run of siblings that repeats the run just before it (a loop body of several calls) into that run.

    The one-function rule alone leaves a loop whose body makes several calls (next batch, then run it) at one
    entry per iteration; this counts such a body once too. Works in place, from the top down."""
    children, start = call.children, 0
    while start < len(children):
        for width in range(1, (len(children) - start) // 2 + 1):
            body, again = children[start : start + width], children[start + width : start + 2 * width]
            if [c.key for c in body] == [c.key for c in again]:
                for kept, other in zip(body, again):
                    merge_into(kept, other)
                del children[start + width : start + 2 * width]
                break
        else:
            start += 1
    for child in children:
        collapse_loop_bodies(child)


class CallRecorder:
    """A sys.setprofile hook that builds the collapsed tree of kis_lens calls as they return."""

    def __init__(self, package: Path = PACKAGE) -> None:
        self.prefix = str(package.resolve()) + "/"
        self.root = Call("", "<root>")
        self.stack: list[tuple[FrameType, Call | None]] = []  # kis_lens frames; None: inside import-time code
        self.where: dict[Any, tuple[str, str] | None] = {}  # code object -> (module, function), None: not ours

    def _identify(self, frame: FrameType) -> tuple[str, str] | None:
        code = frame.f_code
        if code not in self.where:
            filename = str(code.co_filename)
            ours = filename.startswith(self.prefix)
            module = filename[len(self.prefix) :].removesuffix(".py").replace("/", ".").removesuffix(".__init__")
            self.where[code] = (module, code.co_qualname) if ours else None
        return self.where[code]

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        """Push a kis_lens frame on call, and on its return hang its (collapsed) call under its caller."""
        if event == "call":
            found = self._identify(frame)
            if found is None:
                return
            skipping = frame.f_code.co_name == "<module>" or (self.stack and self.stack[-1][1] is None)
            self.stack.append((frame, None if skipping else Call(*found)))
        elif event == "return" and self.stack and self.stack[-1][0] is frame:
            _, call = self.stack.pop()
            if call is not None:
                add_child(self.stack[-1][1] if self.stack and self.stack[-1][1] else self.root, call)


def record(work: Callable[[], Any]) -> tuple[Call, Any]:
    """Return the collapsed tree of the kis_lens calls work makes, and what work returned."""
    recorder = CallRecorder()
    sys.setprofile(recorder)
    try:
        returned = work()
    finally:
        sys.setprofile(None)
    return recorder.root, returned


def walk(root: Call) -> list[tuple[str, str, str]]:
    """Return the depth-first notes of the walk: (module, function, how) for each frame entered or returned to."""
    notes: list[tuple[str, str, str]] = []

    def visit(call: Call) -> None:
        notes.append((call.module, call.function, "call"))
        for child in call.children:
            visit(child)
            notes.append((call.module, call.function, "return"))

    for top in root.children:
        visit(top)
    return notes


def reader_notes(root: Call) -> list[tuple[str, str, str]]:
    """Return the walk's notes when every function is read once: a call of a function already read is skipped."""
    read: set[tuple[str, str]] = set()
    notes: list[tuple[str, str, str]] = []

    def visit(call: Call) -> None:
        read.add(call.key)
        notes.append((call.module, call.function, "call"))
        for child in call.children:
            if child.key not in read:
                visit(child)
                notes.append((call.module, call.function, "return"))

    for top in root.children:
        if top.key not in read:
            visit(top)
    return notes


def module_read_once_notes(root: Call) -> list[tuple[str, str, str]]:
    """Return the walk's notes for a reader who reads each module once: a call into a module already read is
    skipped (it is known), calls within a module are read in place, and returning to a caller is noted.

    Here a module's stays are 1 plus the modules it is the first to call, and the walk has 2M - 1 stays for M
    modules: every module can be entered at most twice only where no module is the first to call two others."""
    read: set[str] = set()
    notes: list[tuple[str, str, str]] = []

    def read_body(call: Call) -> None:
        for child in call.children:
            if child.module == call.module:
                read_body(child)
            elif child.module not in read:
                visit(child)
                notes.append((call.module, call.function, "return"))

    def visit(call: Call) -> None:
        read.add(call.module)
        notes.append((call.module, call.function, "call"))
        read_body(call)

    for top in root.children:
        if top.module not in read:
            visit(top)
    return notes


def call_entries(notes: list[tuple[str, str, str]]) -> dict[str, int]:
    """Return per module how many times the walk calls into it from another module (returns left out)."""
    entries: Counter[str] = Counter()
    previous_module: str | None = None
    for module, _, how in notes:
        if how == "call" and module != previous_module:
            entries[module] += 1
        previous_module = module
    return dict(sorted(entries.items(), key=lambda item: (-item[1], item[0])))


def stays(notes: list[tuple[str, str, str]]) -> dict[str, Any]:
    """Return the walk's stays per module, the total, the returns to a module already left, and where each came from."""
    entries: Counter[str] = Counter()
    sources: dict[str, Counter[str]] = {}
    returns_to_left = 0
    previous: tuple[str, str, str] | None = None
    for note in notes:
        if previous is not None and note[0] == previous[0]:
            previous = note
            continue
        module, function, how = note
        if entries[module]:
            returns_to_left += how == "return"
        entries[module] += 1
        came_from = "(start)" if previous is None else f"{previous[0]}.{previous[1]}"
        sources.setdefault(module, Counter())[f"{how} {function} from {came_from}"] += 1
        previous = note
    ranked = sorted(entries.items(), key=lambda item: (-item[1], item[0]))
    return {
        "max_entries": ranked[0][1] if ranked else 0,
        "modules_over_target": [module for module, count in ranked if count > TARGET],
        "total_stays": sum(entries.values()),
        "modules": len(entries),
        "re_entries": sum(entries.values()) - len(entries),
        "returns_to_a_module_already_left": returns_to_left,
        "entries": dict(ranked),
        "from_where": {module: dict(sources[module].most_common()) for module, _ in ranked[:SHOWN]},
    }


def module_walk(arguments: list[str], output_dir: str | Path) -> dict[str, Any]:
    """Run `kis <arguments> --output_dir <output_dir>` in this process under the recorder; return its walk's numbers:
    with calls of one function merged (the issue's rule), and with loop bodies of several calls merged too."""
    from kis_lens.cli import main

    root, code = record(lambda: main([*arguments, "--output_dir", str(output_dir)]))
    if code != 0:
        raise SystemExit(f"kis {' '.join(arguments)} exited with {code}")
    found = {"command": f"kis {' '.join(arguments)} --output_dir <tmp>", **stays(walk(root))}
    collapse_loop_bodies(root)
    read_once = reader_notes(root)
    calls = call_entries(read_once)
    reader = {**stays(read_once), "call_entries": calls, "max_call_entries": max(calls.values(), default=0)}
    return {
        **found,
        "loop_bodies_merged": stays(walk(root)),
        "reader": reader,
        "modules_read_once": stays(module_read_once_notes(root)),
    }


def walk_kis_all(output_dir: str | Path) -> dict[str, Any]:
    """Return the walk of `kis all` on tiny-gpt2 into output_dir (the offline run the tests make)."""
    return module_walk(["all", *TINY_ALL, *TINY_CORPUS], output_dir)


def walk_kis_lifelong(output_dir: str | Path) -> dict[str, Any]:
    """Return the walk of one ROME edit of `kis lifelong` on tiny-gpt2 into output_dir."""
    return module_walk(["lifelong", *TINY_LIFELONG], output_dir)


def main() -> int:
    """Measure `kis all` and one edit of `kis lifelong`, print the numbers and write them to RESULTS."""
    import time

    found: dict[str, Any] = {"target_max_entries": TARGET}
    for name, measure in (("kis_all", walk_kis_all), ("kis_lifelong_one_edit", walk_kis_lifelong)):
        with tempfile.TemporaryDirectory() as folder:
            started, cpu = time.perf_counter(), time.process_time()
            found[name] = measure(folder)
            found[name]["seconds_under_the_profiler"] = round(time.perf_counter() - started, 1)
            found[name]["cpu_seconds_under_the_profiler"] = round(time.process_time() - cpu, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(found, indent=2) + "\n", encoding="utf-8")
    for name in ("kis_all", "kis_lifelong_one_edit"):
        numbers = found[name]
        print(
            f"{name}: {numbers['modules']} modules, {numbers['total_stays']} stays, {numbers['re_entries']} re-entries "
            f"({numbers['returns_to_a_module_already_left']} by a return), most entered "
            f"{numbers['max_entries']}x (target {TARGET}); over target: {', '.join(numbers['modules_over_target'])}"
        )
        for module, count in list(numbers["entries"].items())[:8]:
            print(f"  {module:28s} {count}")
        reader = numbers["reader"]
        print(
            f"  read once: {reader['total_stays']} stays, most entered {reader['max_entries']}x; calls into a module "
            f"from another: {sum(reader['call_entries'].values())}, most {reader['max_call_entries']}x"
        )
        for module, count in list(reader["call_entries"].items())[:8]:
            print(f"    {module:26s} {count} calls in, {reader['entries'][module]} stays")
        once = numbers["modules_read_once"]
        print(
            f"  each module read once: {once['total_stays']} stays in {once['modules']} modules; over 2: "
            + ", ".join(f"{module} {once['entries'][module]}" for module in once["modules_over_target"])
        )
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
