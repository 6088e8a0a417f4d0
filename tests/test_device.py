"""Nothing in the model, interventions, analysis or patching assumes the CPU.

Two checks: the model runs (forward, hooked forward, backward, interventions) entirely
on the ``meta`` device, where any tensor made on the CPU by mistake raises a device
mismatch; and a scan of the source for ``"cpu"``, ``.cpu()`` and tensor constructors
without ``device=`` outside the few places listed below with their reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from helpers import LAYOUTS, randomize_routing, tiny_model

from hooked_attnres import RunCacheDict
from hooked_attnres.analysis import recency_schedule, schedule_deviation
from hooked_attnres.interventions import patch_committed, patch_sources, set_weights
from hooked_attnres.model.generation import sample_logits, sampling_probabilities

PACKAGE = Path(__file__).resolve().parent.parent / "hooked_attnres"
SCANNED = [
    *sorted((PACKAGE / "model").glob("*.py")),
    *sorted((PACKAGE / "interventions").glob("*.py")),
    *sorted((PACKAGE / "analysis").glob("*.py")),
    PACKAGE / "patching.py",
]
CONSTRUCTORS = {
    "zeros", "ones", "full", "empty", "arange", "tensor", "randn", "rand", "randint",
    "linspace", "eye",
}  # fmt: skip
# (file, function) -> why a CPU string or a constructor without device= is right there
ALLOWED = {
    ("model/hooked_attnres.py", "init_weights"): "a seeded CPU generator: the same weights "
    "on every device (copied into the parameters, wherever they are)",
    ("analysis/bootstrap.py", "as_numpy"): "the one copy of results to the host, per table",
    ("analysis/schedule.py", "weights"): "an analytic table, compared on the host",
    ("model/tokenization.py", "to_tokens_and_mask"): "token ids from text; forward moves "
    "them to the model's device",
    ("interventions/routing.py", "hooks"): "a [n_sources] mask; mask_hook moves it to the "
    "logits' device",
}


def _enclosing_functions(tree: ast.AST) -> dict[ast.AST, str]:
    owner: dict[ast.AST, str] = {}

    def visit(node: ast.AST, name: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = (
                child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else name
            )
            owner[child] = inner
            visit(child, inner)

    visit(tree, "<module>")
    return owner


def _offenders(allowed=None) -> list[str]:
    allowed = ALLOWED if allowed is None else allowed
    found = []
    for path in SCANNED:
        relative = str(path.relative_to(PACKAGE))
        tree = ast.parse(path.read_text())
        owner = _enclosing_functions(tree)
        for node in ast.walk(tree):
            where = (relative, owner.get(node, "<module>"))
            if where in allowed or where[1] == "__init__":  # parameters: moved by model.to
                continue
            line = f"{relative}:{getattr(node, 'lineno', '?')} in {where[1]}"
            if isinstance(node, ast.Constant) and node.value == "cpu":
                found.append(f'{line}: the string "cpu"')
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                func = node.func
                if func.attr == "cpu" and not node.args:
                    found.append(f"{line}: .cpu()")
                elif (
                    isinstance(func.value, ast.Name)
                    and func.value.id == "torch"
                    and func.attr in CONSTRUCTORS
                    and not any(k.arg == "device" for k in node.keywords)
                ):
                    found.append(f"{line}: torch.{func.attr}(...) without device=")
    return found


def test_no_hard_coded_cpu_in_model_interventions_analysis_patching():
    offenders = _offenders()
    assert not offenders, "\n".join(offenders)


def test_every_allowed_place_is_still_needed():
    unallowed = _offenders(allowed={})
    for (path, function), reason in ALLOWED.items():
        assert any(line.startswith(path) and f" in {function}:" in line for line in unallowed), (
            f"{path}:{function} no longer needs its exception ({reason}); remove it"
        )


def test_the_scan_would_catch_a_hard_coded_cpu(tmp_path, monkeypatch):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch\n"
        "def f(x):\n"
        "    a = torch.zeros(3)\n"
        "    b = x.cpu()\n"
        "    return x.to('cpu'), a, b\n"
    )
    monkeypatch.setattr(f"{__name__}.SCANNED", [bad])
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path)
    assert len(_offenders()) == 3


def meta_state(model, batch: int = 2, n_pos: int = 5):
    tokens = torch.zeros(batch, n_pos, dtype=torch.long, device="meta")
    return model.embed_state(tokens)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_model_runs_on_the_meta_device(layout):
    """Forward (fused and every hook watched), backward through the hand-written router
    and RMSNorm backward passes, a pass from a sublayer, and routing interventions: any
    tensor created on the CPU would raise a device mismatch here."""
    model = randomize_routing(tiny_model(attnres_layout=layout, attnres_recency_bias=0.5))
    model = model.to("meta")
    assert model.cfg.device == "meta"
    with torch.no_grad():
        logits = model(meta_state(model), start_at_layer=0)
    assert logits.device.type == "meta" and logits.shape == (2, 5, model.cfg.d_vocab)
    identity = [(lambda name: True, lambda activation, hook: None)]
    with torch.no_grad(), model.hooks(fwd_hooks=identity):
        watched = model(meta_state(model), start_at_layer=0)
    assert watched.device.type == "meta"
    for param in model.parameters():
        param.grad = None
    model(meta_state(model), start_at_layer=0).sum().backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())
    if layout == "none":
        return
    site = model.sites()[-1]
    hooks = [
        *set_weights(model, "uniform", routers=[site]),
        *patch_sources(model, "embedding", "mean"),
        *patch_committed(model, "embedding", "zero"),
    ]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        patched = model(meta_state(model), start_at_layer=0)
    assert patched.device.type == "meta"


def test_routing_stays_float32_in_a_bfloat16_model_on_meta():
    model = randomize_routing(tiny_model(attnres_layout="kimi")).to("meta", torch.bfloat16)
    dtypes = {}

    def record(activation, hook):
        dtypes[hook.name] = activation.dtype

    watch = [(lambda name: name.endswith(("hook_weights", "hook_logits", "hook_scale")), record)]
    with torch.no_grad(), model.hooks(fwd_hooks=watch):
        model(meta_state(model), start_at_layer=0)
    assert dtypes and set(dtypes.values()) == {torch.float32}


class FakeMPS(torch.overrides.TorchFunctionMode):
    """Apple's MPS device, which has no float64, faked on the host: a tensor moved
    ``.to("mps")`` (and whatever is computed from one) reports ``device`` mps, and an op
    on it that gives float64 raises MPS's ``TypeError``; ``.to("cpu")`` leaves it."""

    def __init__(self):
        super().__init__()
        self.ids: set[int] = set()
        self.kept: list[torch.Tensor] = []  # alive, so that their ids are not reused

    def _mark(self, tensor):
        if tensor.dtype == torch.float64:
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype (faked)")
        self.ids.add(id(tensor))
        self.kept.append(tensor)
        return tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == torch.Tensor.device.__get__ and id(args[0]) in self.ids:
            return torch.device("mps")
        if func is torch.Tensor.to:
            devices = [
                a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device))
            ]
            if devices:
                rest = [a for a in args[1:] if not isinstance(a, (str, torch.device))]
                kwargs = {k: v for k, v in kwargs.items() if k != "device"}
                moved = args[0].to(*rest, **kwargs).view_as(args[0])
                return self._mark(moved) if torch.device(devices[0]).type == "mps" else moved
        out = func(*args, **kwargs)
        inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if any(id(a) in self.ids for a in inputs):
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor):
                    self._mark(tensor)
        return out


def test_top_p_sampling_runs_on_a_device_without_float64():
    """Audit 104: top_p sums the mass before each token in float64 (audit 101), and MPS
    has no float64: sampling with top_p raised "Cannot convert a MPS Tensor to float64"
    there (faked here). That sum is done on the host for such a device, and the filtered
    distribution, on the logits' device, equals the one computed on the CPU."""
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(0)) * 4
    on_cpu = sampling_probabilities(logits, top_p=0.9)
    with FakeMPS():
        on_mps = logits.to("mps")
        assert on_mps.device.type == "mps"
        with pytest.raises(TypeError, match="float64"):  # the fake refuses float64
            on_mps.double()
        probs = sampling_probabilities(on_mps, top_p=0.9)
        assert probs.device.type == "mps"
        drawn = sample_logits(on_mps, top_p=0.9, generator=torch.Generator().manual_seed(1))
        assert drawn.device.type == "mps"
    assert torch.equal(probs, on_cpu)
    assert (on_cpu.gather(-1, drawn[:, None]) > 0).all()


def test_schedule_deviation_runs_on_a_device_without_float64():
    """Audit 109: schedule_deviation compares the cached routing weights with the
    schedule in float64 (``.double()``), which MPS lacks (faked here): it raised "Cannot
    convert a MPS Tensor to float64". The comparison is done on the host for such a
    device, and gives the deviation computed by hand from the CPU weights."""
    model = randomize_routing(tiny_model(attnres_layout="cumulative"), seed=2).eval()
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens)
    schedule = recency_schedule(model.cfg.n_layers, model.cfg.attnres_num_blocks, 3.0)
    names = {site: site.hook("weights") for site in model.sites()}
    by_hand = max(
        float((cache[name].double() - schedule.weights(site.layer, site.kind)).abs().max())
        for site, name in names.items()
    )
    with FakeMPS():
        # a RunCacheDict: it records the run's padding (none), as schedule_deviation needs
        on_mps = RunCacheDict({name: cache[name].to("mps") for name in names.values()})
        assert all(w.device.type == "mps" for w in on_mps.values())
        deviation = schedule_deviation(model, on_mps, schedule)
    assert by_hand > 0.01  # the routing is content-dependent: a deviation to get right
    assert deviation == by_hand
