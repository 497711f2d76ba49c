"""`disagg plan`: AIConfigurator's predicted best layouts for an SLA, as our
labels, placed on the inventory's hosts (or on N hosts of G GPUs).

AIConfigurator (the optional extra `disagg[plan]`, pinned) runs offline on
the performance database it ships. It is used through its CLI and the files
it saves (`<save-dir>/<model>_<system>_.../{agg,disagg}/best_config_topn.csv`
and `exp_config.yaml`): 0.12.0 announces that its Python entry points move
to another distribution, while the CLI keeps its name and arguments.
"""

from __future__ import annotations

import csv
import json
import re
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata, resources
from pathlib import Path

from disagg.core.errors import InventoryError, ToolError, UsageError
from disagg.core.topology import Cluster, Host, Topology, place
from disagg.perf.extras import run_logged, tool

# it takes 17-40 s on a 2-core machine
AICONFIGURATOR_TIMEOUT = 900

AIC_VERSION = "0.12.0"
MODES = ("disagg", "agg")


@dataclass
class Candidate:
    """One configuration AIConfigurator ranked, in our terms."""

    mode: str  # disagg | agg, as AIConfigurator names them
    rank: int  # its rank within the mode
    label: str
    gpus: int
    replicas: int
    tokens_per_gpu: float
    tokens_per_user: float
    ttft_ms: float
    tpot_ms: float
    concurrency: int  # over all replicas: what to run the benchmark at
    placement: list[dict] | None = None
    unplaceable: str | None = None  # why, when it cannot be placed
    # AIConfigurator also returns its best effort when nothing meets the SLA
    meets_sla: bool | None = None
    source: dict = field(default_factory=dict)  # AIConfigurator's row, as saved

    @property
    def disaggregated(self) -> bool:
        return self.mode == "disagg"


# -- AIConfigurator's files --------------------------------------------------


def _int(row: dict, key: str) -> int:
    return int(float(row[key]))


def candidate(row: dict, mode: str, total_gpus: int, rank: int) -> Candidate:
    """One row of best_config_topn.csv as a labelled candidate. A disagg row
    is one replica of xPyD ((p)workers x (d)workers); replicas multiply dp.
    Shapes our labels cannot express (pipeline or attention data parallel
    inside a worker) keep their numbers but are marked unplaceable."""
    per_replica = _int(row, "num_total_gpus")
    replicas = max(1, total_gpus // per_replica)
    if mode == "disagg":
        p_tp, d_tp = _int(row, "(p)tp"), _int(row, "(d)tp")
        label = (
            f"context_tp{p_tp}dp{_int(row, '(p)workers') * replicas}"
            f"_generate_tp{d_tp}dp{_int(row, '(d)workers') * replicas}"
        )
        inner = {
            f"{side} {k}": _int(row, f"({p}){k}")
            for side, p in (("context", "p"), ("generate", "d"))
            for k in ("pp", "dp")
        }
    else:
        label = f"baseline_tp{_int(row, 'tp')}dp{replicas}"
        inner = {f"baseline {k}": _int(row, k) for k in ("pp", "dp")}
    c = Candidate(
        mode=mode,
        rank=rank,
        label=label,
        gpus=per_replica * replicas,
        replicas=replicas,
        tokens_per_gpu=float(row["tokens/s/gpu"]),
        tokens_per_user=float(row["tokens/s/user"]),
        ttft_ms=float(row["ttft"]),
        tpot_ms=float(row["tpot"]),
        concurrency=_int(row, "concurrency") * replicas,
        source=dict(row),
    )
    beyond = [f"{k}{v}" for k, v in inner.items() if v != 1]
    if beyond:
        c.unplaceable = f"{', '.join(beyond)} inside a worker is not expressible as a disagg label"
    return c


def read_saved(save_dir: Path) -> list[Candidate]:
    """Every candidate in a directory AIConfigurator saved its results to."""
    found = []
    for mode in MODES:
        for table in sorted(Path(save_dir).rglob(f"{mode}/best_config_topn.csv")):
            config = (table.parent / "exp_config.yaml").read_text()
            total_gpus = int(re.search(r"^total_gpus:\s*(\d+)", config, re.M).group(1))
            with open(table, newline="") as f:
                for rank, row in enumerate(csv.DictReader(f), 1):
                    found.append(candidate(row, mode, total_gpus, rank))
    return found


# -- what AIConfigurator supports ----------------------------------------------


def _core() -> Path:
    try:
        return Path(str(resources.files("aiconfigurator_core")))
    except ModuleNotFoundError:
        raise ToolError("AIConfigurator is not installed: pip install 'disagg[plan]'") from None


def supported_models() -> list[str]:
    """Models whose config ships with AIConfigurator (it cannot download others offline)."""
    names = (p.name.removesuffix("_config.json") for p in (_core() / "model_configs").glob("*_config.json"))
    return sorted(n.replace("--", "/", 1) for n in names)


def supported_systems() -> list[str]:
    """Systems with a performance database."""
    data = _core() / "systems" / "data"
    return sorted(p.stem for p in (_core() / "systems").glob("*.yaml") if (data / p.stem).is_dir())


def check_supported(model: str, system: str) -> None:
    if not (Path(model) / "config.json").is_file() and model not in supported_models():
        raise UsageError(
            f"model {model!r} is not in AIConfigurator {AIC_VERSION}'s database (it cannot download "
            f"others here); supported models: {', '.join(supported_models())}"
        )
    if system not in supported_systems():
        raise UsageError(
            f"system {system!r} is unknown to AIConfigurator {AIC_VERSION}; "
            f"supported systems: {', '.join(supported_systems())}"
        )


# -- running it -----------------------------------------------------------------


@dataclass
class Request:
    model: str
    system: str
    gpus: int
    isl: int = 3000
    osl: int = 150
    sla_tokens_per_user: float = 50.0
    sla_ttft_ms: float | None = None
    backend: str = "vllm"
    top_n: int = 5

    @property
    def tpot_ms(self) -> float:
        """The SLA as AIConfigurator takes it: tokens/s/user -> ms per output token."""
        return 1000.0 / self.sla_tokens_per_user


def aiconfigurator_binary() -> str:
    return tool("aiconfigurator", "AIConfigurator", "plan")


def aiconfigurator_command(binary: str, request: Request, save_dir: Path) -> list[str]:
    args = [
        binary,
        "cli",
        "default",
        "--model-path",
        request.model,
        "--system",
        request.system,
        "--backend",
        request.backend,
        "--total-gpus",
        str(request.gpus),
        "--isl",
        str(request.isl),
        "--osl",
        str(request.osl),
        "--tpot",
        f"{request.tpot_ms:g}",
        "--top-n",
        str(request.top_n),
        "--save-dir",
        str(save_dir),
        "--no-color",
    ]
    if request.sla_ttft_ms is not None:
        args += ["--ttft", f"{request.sla_ttft_ms:g}"]
    return args


def run(request: Request, save_dir: Path) -> tuple[list[Candidate], float]:
    """Run AIConfigurator into save_dir (kept: the raw files behind every
    number); returns its candidates and the seconds it took."""
    binary = aiconfigurator_binary()
    check_supported(request.model, request.system)
    save_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    code = run_logged(
        aiconfigurator_command(binary, request, save_dir), save_dir / "aiconfigurator.log", AICONFIGURATOR_TIMEOUT
    )
    seconds = time.monotonic() - start
    if code is None:
        raise ToolError(
            f"aiconfigurator ran past {AICONFIGURATOR_TIMEOUT} s and was stopped; see {save_dir / 'aiconfigurator.log'}"
        )
    if code:
        lines = [
            line
            for line in (save_dir / "aiconfigurator.log").read_text().splitlines()
            if "[E]" in line or "error" in line
        ]
        raise ToolError(
            f"aiconfigurator exited {code}: {(lines or ['see ' + str(save_dir / 'aiconfigurator.log')])[-1][:300]}"
        )
    candidates = read_saved(save_dir)
    check_sla(candidates, request)
    return candidates, seconds


# -- placement -------------------------------------------------------------------


def synthetic_cluster(gpus: int, gpus_per_host: int) -> Cluster:
    """ceil(gpus / gpus_per_host) hosts, each allowed to run any role."""
    count = -(-gpus // gpus_per_host)
    hosts = tuple(Host(f"host{i}", f"host{i}", gpus_per_host) for i in range(1, count + 1))
    names = tuple(h.name for h in hosts)
    return Cluster(hosts, {"context": names, "generate": names, "baseline": names, "head": names[:1]}, names[0])


def place_all(candidates: list[Candidate], cluster: Cluster) -> None:
    for c in candidates:
        if c.unplaceable:
            continue
        try:
            c.placement = [w.as_dict() for w in place(Topology.parse(c.label), cluster)]
        except InventoryError as e:
            c.unplaceable = str(e).removeprefix(f"label {c.label!r}: ")


def check_sla(candidates: list[Candidate], request: Request) -> None:
    for c in candidates:
        c.meets_sla = c.tokens_per_user >= request.sla_tokens_per_user and (
            request.sla_ttft_ms is None or c.ttft_ms <= request.sla_ttft_ms
        )


def ranked(candidates: list[Candidate]) -> list[Candidate]:
    """Those that meet the SLA first, then by predicted tokens/s/GPU."""
    return sorted(candidates, key=lambda c: (c.meets_sla is False, -c.tokens_per_gpu, c.rank))


def pick(candidates: list[Candidate], mode: str) -> Candidate | None:
    """The best placeable candidate of mode that meets the SLA."""
    eligible = [c for c in candidates if c.mode == mode and not c.unplaceable and c.meets_sla is not False]
    return ranked(eligible)[0] if eligible else None


def placement_text(c: Candidate) -> str:
    if c.unplaceable:
        return f"no: {c.unplaceable}"
    where: dict[tuple[str, str], int] = {}
    for w in c.placement or []:
        where[(w["role"], w["host"])] = where.get((w["role"], w["host"]), 0) + 1
    return "; ".join(f"{role} x{n} on {host}" for (role, host), n in where.items())


def as_dict(request: Request, candidates: list[Candidate], seconds: float, save_dir: Path) -> dict:
    disagg, agg = pick(candidates, "disagg"), pick(candidates, "agg")
    return {
        "request": {**asdict(request), "tpot_ms": request.tpot_ms},
        "aiconfigurator": {"version": _version(), "seconds": round(seconds, 1), "save_dir": str(save_dir)},
        "candidates": [asdict(c) for c in ranked(candidates)],
        "pick": {"label": disagg and disagg.label, "baseline_label": agg and agg.label},
    }


def _version() -> str | None:
    try:
        return metadata.version("aiconfigurator")
    except metadata.PackageNotFoundError:
        return None


def predictions(plan_file: Path) -> dict[str, dict]:
    """{label: predicted point} from a plan.json that `disagg plan` wrote."""
    data = json.loads(Path(plan_file).read_text())
    out: dict[str, dict] = {}
    for c in data["candidates"]:
        out.setdefault(c["label"], {k: c[k] for k in ("tokens_per_gpu", "tokens_per_user", "ttft_ms", "concurrency")})
    return out
