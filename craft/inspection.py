"""What a model offers CRAFT: its target stacks, their mode spectra, and the cost of candidate ranks.

Compute first (:func:`inspect_model` returns plain data), present second (:func:`format_report`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from torch import nn

from .factors import check_ranks
from .targets import find_targets, stack_weights
from .tucker import energy_kept, hosvd

__all__ = ["StackReport", "ModelReport", "inspect_model", "default_candidates", "format_report"]

AXES = ("layers", "out", "in")


@dataclass
class StackReport:
    """One projection type: its modules, stack shape and energy kept per axis at candidate ranks."""

    name: str
    shape: tuple[int, int, int]
    first_module: str
    last_module: str
    energy: dict[str, dict[int, float]]  # axis -> rank -> share of that mode's energy kept
    fit: dict[str, float] = field(default_factory=dict)  # "rL/rO/rI" -> share of the stack kept


@dataclass
class ModelReport:
    """Everything ``craft-search inspect`` shows, as data."""

    model_class: str
    num_parameters: int
    targets: list[str]
    auto_targets: bool
    stacks: list[StackReport]
    candidates: list[tuple[int, int, int]]
    adapter_parameters: dict[str, int]  # "rL/rO/rI" -> n_p * (rL^2 + rO^2 + rI^2)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def _key(ranks: Sequence[int]) -> str:
    return "/".join(str(r) for r in ranks)


def _axis_candidates(length: int, steps: Sequence[int]) -> list[int]:
    return sorted({r for r in steps if r < length} | {length})


def default_candidates(shape: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Rank triples worth comparing: all layers, and out / in ranks from 8 up to 128."""
    layers, d_out, d_in = shape
    widths = [r for r in (8, 16, 32, 64, 100, 128) if r <= min(d_out, d_in)] or [min(d_out, d_in)]
    return [(layers, r, r) for r in widths] + [(max(1, layers // 2), widths[-1], widths[-1])]


def inspect_model(
    model: nn.Module,
    target_modules: list[str] | None = None,
    candidates: Sequence[Sequence[int]] | None = None,
) -> ModelReport:
    """Decompose every target stack once and report energies and adapter sizes.

    Args:
        model: the model to inspect.
        target_modules: as in :class:`craft.CraftConfig`; None detects query / value.
        candidates: rank triples (layers, out, in) to price; None uses :func:`default_candidates`.
    """
    stacks = find_targets(model, target_modules)
    shapes = [s.shape for s in stacks]
    smallest = tuple(min(s[i] for s in shapes) for i in range(3))
    triples = [tuple(int(r) for r in c) for c in (candidates or default_candidates(smallest))]
    check_ranks(stacks, tuple(max(t[i] for t in triples) for i in range(3)))
    top = tuple(max(t[i] for t in triples) for i in range(3))
    reports = []
    for stack in stacks:
        weights = stack_weights(model, stack).double()
        tucker = hosvd(weights, top)  # spectra are full whatever the ranks
        total = float(weights.pow(2).sum())
        energy = {
            axis: {r: energy_kept(spectrum, r) for r in _axis_candidates(length, (1, 2, 4, 8, 16, 32, 64, 100, 128, 256))}
            for axis, spectrum, length in zip(AXES, tucker.spectra, stack.shape)
        }
        # A truncated HOSVD is an orthogonal projection: kept share = ||G_r||^2 / ||W||^2.
        fit = {_key(t): (float(tucker.core[: t[0], : t[1], : t[2]].pow(2).sum()) / total if total else 1.0) for t in triples}
        reports.append(StackReport(stack.name, stack.shape, stack.sites[0].module_name, stack.sites[-1].module_name, energy, fit))
    n_p = len(stacks)
    return ModelReport(
        model_class=type(model).__name__,
        num_parameters=sum(p.numel() for p in model.parameters()),
        targets=[s.name for s in stacks],
        auto_targets=target_modules is None,
        stacks=reports,
        candidates=triples,
        adapter_parameters={_key(t): n_p * sum(r * r for r in t) for t in triples},
    )


def format_report(report: ModelReport, source: str = "") -> str:
    """The report as the text ``craft-search inspect`` prints."""
    lines = [
        f"model: {source or report.model_class}",
        f"class: {report.model_class}, {report.num_parameters / 1e6:.1f}M parameters",
        f"targets ({'detected' if report.auto_targets else 'given'}): {', '.join(report.targets)}  (n_p = {len(report.targets)})",
    ]
    name_width = max([10] + [len(s.name) for s in report.stacks])  # long names: an encoder-decoder's stacks
    for s in report.stacks:
        lines.append(
            f"  {s.name:<{name_width}} stack {s.shape[0]} x {s.shape[1]} x {s.shape[2]} (layers x out x in)  "
            f"{s.first_module} .. {s.last_module}"
        )
    lines += ["", "Energy kept per mode (share of the squared norm on the leading r singular vectors of each unfolding):"]
    for s in report.stacks:
        for axis in AXES:
            cells = "  ".join(f"r={r}: {e:6.1%}" for r, e in s.energy[axis].items())
            lines.append(f"  {s.name + '/' + axis:<{name_width + 7}} {cells}")
    widths = [max(16, len(s.name) + 7) for s in report.stacks]  # "kept " + name and two spaces
    header = f"  {'rank_layers/out/in':<20}{'adapter params':>15}" + "".join(
        f"{'kept ' + s.name:>{w}}" for s, w in zip(report.stacks, widths)
    )
    lines += [
        "",
        "Candidate ranks (adapter params = n_p x (r_layers^2 + r_out^2 + r_in^2), head apart; kept = stack energy in the truncated Tucker):",
        header,
    ]
    for t in report.candidates:
        k = _key(t)
        lines.append(
            f"  {k:<20}{report.adapter_parameters[k]:>15,}"
            + "".join(f"{s.fit[k]:>{w}.1%}" for s, w in zip(report.stacks, widths))
        )
    return "\n".join(lines)
